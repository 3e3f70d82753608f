"""Detector masks: the ring that selects diffraction spots, its automatic radii, and the shrink schedule.

All masks are on the pattern grid ``(H, W)`` (rows = Qx, columns = Qy). Radii are in detector pixels measured from the
pattern centre; the default centre is the central-beam position ``(H // 2, W // 2)``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


def radius_map(shape: tuple[int, int], center: tuple[float, float] | None = None) -> jax.Array:
    """Distance of each pixel centre from ``center`` (row, column) in pixels, ``(H, W)`` float32."""
    h, w = shape
    cr, cc = (h // 2, w // 2) if center is None else center
    rows = jnp.arange(h, dtype=jnp.float32)[:, None] - cr
    cols = jnp.arange(w, dtype=jnp.float32)[None, :] - cc
    return jnp.sqrt(rows**2 + cols**2)


def ring_mask(
    shape: tuple[int, int], inner: ArrayLike, outer: ArrayLike, *, center: tuple[float, float] | None = None
) -> jax.Array:
    """Boolean ring ``inner < r <= outer`` (pixels), ``(H, W)``. Radii may be traced arrays (no recompilation)."""
    r = radius_map(shape, center)
    return (r > inner) & (r <= outer)


def static_ring_mask(
    shape: tuple[int, int], inner: float, outer: float, *, center: tuple[float, float] | None = None
) -> np.ndarray:
    """`ring_mask` computed on the host (NumPy, float64 radii), for masks fixed when a function is traced: static
    pixel lists and constants, which must not become tracers under ``jit``. ``(H, W)`` bool."""
    h, w = shape
    cr, cc = (h // 2, w // 2) if center is None else center
    r = np.hypot(np.arange(h)[:, None] - cr, np.arange(w)[None, :] - cc)
    return (r > inner) & (r <= outer)


def disk_mask(shape: tuple[int, int], radius: ArrayLike, *, center: tuple[float, float] | None = None) -> jax.Array:
    """Boolean disk ``r <= radius``, ``(H, W)``."""
    return radius_map(shape, center) <= radius


def radial_profile(pattern: ArrayLike, *, center: tuple[float, float] | None = None) -> np.ndarray:
    """Mean intensity in 1-pixel-wide annuli, ``(H, W)`` → ``(n_bins,)`` (bin i covers ``i <= r < i + 1``)."""
    pattern = np.asarray(pattern, np.float64)
    r = np.asarray(radius_map(pattern.shape, center))
    bins = np.floor(r).astype(int)
    total = np.bincount(bins.ravel(), pattern.ravel())
    count = np.bincount(bins.ravel())
    return total / np.maximum(count, 1)


def auto_ring_radii(
    mean_pattern: ArrayLike, *, center: tuple[float, float] | None = None, margin: float = 4.0
) -> tuple[float, float]:
    """Ring radii (pixels) read from the radial profile of the mean pattern.

    The inner radius sits past the central disk (where the profile first falls below a low level after its peak) and
    before the first-order spots; the outer radius encloses the outermost clear peak of the profile, capped by the
    largest circle that fits in the pattern. ``margin`` pixels of slack are added on both sides of the spots.

    Args:
      mean_pattern: ``(H, W)`` mean diffraction pattern.

    Returns:
      ``(inner, outer)`` in pixels.
    """
    mean_pattern = np.asarray(mean_pattern, np.float64)
    if mean_pattern.ndim != 2:
        raise ValueError(f"auto_ring_radii: expected a (H, W) mean pattern, got shape {mean_pattern.shape}")
    h, w = mean_pattern.shape
    r_max = min(h, w) / 2 - 1
    prof = radial_profile(mean_pattern, center=center)[: int(r_max)]
    if prof.size < 8 or not np.isfinite(prof).all() or prof.max() <= 0:
        raise ValueError("auto_ring_radii: the mean pattern has no usable radial profile (blank or too small)")
    # Central disk: from the centre until the profile drops below 5% of its central value.
    below = np.nonzero(prof < 0.05 * prof[:3].max())[0]
    disk_edge = int(below[0]) if below.size else 3
    # A decreasing background (central-disk tail, diffuse scattering) is followed by its running minimum from the
    # centre outwards; diffraction rings are bumps that rise above it.
    excess = prof - np.minimum.accumulate(prof)
    excess[:disk_edge] = 0.0
    if excess.max() <= 0:
        raise ValueError("auto_ring_radii: no diffraction rings found outside the central disk")
    peaks = np.nonzero(excess > 0.2 * excess.max())[0]
    first, last = peaks[0], peaks[-1]
    inner = max(float(disk_edge), first - margin)
    outer = min(float(r_max), last + margin)
    return float(inner), float(outer)


@dataclasses.dataclass(frozen=True)
class MaskSchedule:
    """How the loss mask evolves with the epoch (all radii in pixels).

    Epochs ``< shrink_start``: the full ring ``(inner, outer)``. From ``shrink_start`` on, the ring is intersected with a
    *spot mask* built from the current base: disks of ``spot_radius`` around every local maximum of the base
    brighter than ``spot_threshold`` times the brightest base pixel in the ring. Every spot above the threshold keeps its own disk, so
    the mask never collapses to a single disk (the reference's ring update does). ``spot_radius`` shrinks linearly
    from ``spot_radius_start`` to ``spot_radius_end`` over ``shrink_epochs``.
    """

    inner: float
    outer: float
    shrink_start: int = 2
    shrink_epochs: int = 4
    spot_radius_start: float = 8.0
    spot_radius_end: float = 5.0
    spot_threshold: float = 0.25

    def spot_radius(self, epoch: ArrayLike) -> jax.Array:
        frac = jnp.clip((jnp.asarray(epoch, jnp.float32) - self.shrink_start) / max(self.shrink_epochs, 1), 0.0, 1.0)
        return self.spot_radius_start + frac * (self.spot_radius_end - self.spot_radius_start)


def spot_mask(base: ArrayLike, ring: ArrayLike, radius: ArrayLike, *, threshold: float, max_radius: int) -> jax.Array:
    """Disks of ``radius`` around the bright local maxima (spots) of the base inside the ring, ``(H, W)`` float32.

    Args:
      base: ``(H, W)`` base pattern.
      ring: ``(H, W)`` boolean ring.
      radius: dilation radius in pixels (may be traced); must be ``<= max_radius`` (static window size).
      threshold: fraction of the brightest in-ring base pixel that counts as a spot.
    """
    base = jax.lax.stop_gradient(jnp.asarray(base, jnp.float32))
    ring = jnp.asarray(ring, bool)
    inring = jnp.where(ring, base, -jnp.inf)
    local_max = jax.lax.reduce_window(inring, -jnp.inf, jax.lax.max, (3, 3), (1, 1), "SAME")
    seeds = ((inring >= local_max) & (inring > threshold * jnp.max(inring))).astype(jnp.float32)
    # Dilation by a disk of (traced) radius: convolve the seeds with the disk indicator.
    k = int(max_radius)
    offs = jnp.arange(-k, k + 1, dtype=jnp.float32)
    disk = ((offs[:, None] ** 2 + offs[None, :] ** 2) <= jnp.asarray(radius, jnp.float32) ** 2).astype(jnp.float32)
    hits = jax.lax.conv_general_dilated(
        seeds[None, None], disk[None, None], window_strides=(1, 1), padding="SAME",
        precision=jax.lax.Precision.HIGHEST,
    )[0, 0]
    return (hits > 0.5).astype(jnp.float32) * ring
