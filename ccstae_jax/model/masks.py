"""Detector masks: the ring that selects diffraction spots, the spot disks and their shrink schedule (radii from
`ccstae_jax.model.geometry`).

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


def pixel_radii(shape: tuple[int, int], center: tuple[float, float]) -> np.ndarray:
    """Distance of every pixel from ``center`` (row, col) in pixels, on the host: ``(H, W)`` float64."""
    h, w = shape
    return np.hypot(np.arange(h)[:, None] - center[0], np.arange(w)[None, :] - center[1])


def static_ring_mask(
    shape: tuple[int, int], inner: float, outer: float, *, center: tuple[float, float] | None = None
) -> np.ndarray:
    """`ring_mask` computed on the host (NumPy, float64 radii), for masks fixed when a function is traced: static
    pixel lists and constants, which must not become tracers under ``jit``. ``(H, W)`` bool."""
    h, w = shape
    r = pixel_radii(shape, (h // 2, w // 2) if center is None else center)
    return (r > inner) & (r <= outer)


@dataclasses.dataclass(frozen=True)
class MaskSchedule:
    """How the loss mask evolves with the (possibly fractional) epoch; radii in pixels.

    Epochs ``< shrink_start``: the full ring. From ``shrink_start`` on, the ring is intersected with a *spot mask*
    built from the current base: disks of ``spot_radius`` around every local maximum of the base brighter than a
    threshold (`spot_mask`). Every spot keeps its own disk, so the mask never collapses to a single disk (the
    reference's ring update does). ``spot_radius`` shrinks linearly from ``spot_radius_start`` to
    ``spot_radius_end`` over ``shrink_epochs``.
    """

    shrink_start: float
    shrink_epochs: float
    spot_radius_start: float
    spot_radius_end: float

    def spot_radius(self, epoch: ArrayLike) -> jax.Array:
        frac = jnp.clip((jnp.asarray(epoch, jnp.float32) - self.shrink_start) / max(self.shrink_epochs, 1e-6), 0.0, 1.0)
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
