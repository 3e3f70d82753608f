"""Built-in polycrystalline WS2 4D-STEM simulator (kinematic, JAX rendering, streamed to HDF5).

A Voronoi polycrystal of monolayer WS2 seen down [0001]. Each grain ``k`` carries a lab-frame strain
and an in-plane rotation; its real-space lattice is deformed by ``A = (I + eps) R(theta)`` (left polar
form) so the spots of its pattern sit at ``A^-T g = (I + eps)^-1 R(theta) g``. One pattern is rendered
per grain (convergent-beam disks with a soft edge, kinematic intensities, a strong central beam), then
patterns are mixed at grain boundaries with Gaussian weights and the Auto4DSTEM noise is added, batch
by batch (rows of the scan), so a 256 x 256 scan never sits in memory.

Frame (project-wide; see `CONVENTIONS`): data are ``(Rx, Ry, Qx, Qy)``; x = detector axis 2 (rows of a
pattern), y = axis 3 (columns); ``eps = [[strain_xx, shear_xy], [shear_xy, strain_yy]]`` (tensor
shear), ``R(theta) = [[cos, -sin], [sin, cos]]``, theta in radians counter-clockwise from +Qx toward
+Qy. Positive ``strain_xx`` = lattice stretched along x = spots move inward along Qx.

Example:
    >>> cfg = SimulationConfig(scan_shape=(8, 8), detector_size=64, n_grains=3, disk_radius=2.0)
    >>> data, labels = simulate_scan(cfg)
    >>> data.shape, labels["strain_xx"].shape
    ((8, 8, 50, 50), (8, 8))
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import h5py
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ccstae_jax.data.noise import (
    DEFAULT_COUNTS,
    DEFAULT_LORENTZ_WIDTH,
    DEFAULT_SCALE,
    add_background_noise,
    add_background_noise_numpy,
    parse_noise_level,
)

__all__ = [
    "CONVENTIONS",
    "FORMAT",
    "SimulationConfig",
    "Grains",
    "SpotTable",
    "reciprocal_lattice",
    "kinematic_intensities",
    "spot_table",
    "deformation_matrix",
    "spot_transform",
    "render_patterns",
    "pattern_function",
    "make_grains",
    "grain_labels",
    "simulate_scan",
    "simulate_to_hdf5",
]

FORMAT = "ccstae-sim-1"

CONVENTIONS = (
    "4D data (Rx, Ry, Qx, Qy): scan row, scan column, detector row, detector column. "
    "Physics frame: x = detector Qx = array axis 2 (rows of a pattern), y = Qy = axis 3 (columns). "
    "Strain is the real-space lattice strain in that frame: a real-space lattice deformation "
    "A = (I + eps) R(theta), eps = [[strain_xx, shear_xy], [shear_xy, strain_yy]] (tensor shear), "
    "R(theta) = [[cos, -sin], [sin, cos]], rotation theta in radians counter-clockwise from +Qx toward +Qy. "
    "Reciprocal (diffraction) spots sit at A^{-T} g (g = unstrained reciprocal vectors, pixel units "
    "relative to the pattern centre, (qx, qy) = (row, col)). Positive strain_xx = lattice stretched "
    "along x = spots move inward along Qx. (Matches py4DSTEM's frame.)"
)

# Benchmark geometry (data.md section 2): 256 px detector at 0.0096 1/A per pixel, crop [28:228].
_BENCH_DETECTOR = 256
_BENCH_Q_PIXEL = 0.0096
_BENCH_CROP_START = 28
_BENCH_REFERENCE = (30, 60, 10, 40)
_BENCH_SCAN = 256
_Z_W, _Z_S = 74.0, 16.0


@dataclasses.dataclass(frozen=True)
class SimulationConfig:
    """Configuration of the polycrystal simulator (all lengths in pixels unless stated).

    Attributes:
      scan_shape: ``(Rx, Ry)`` probe positions.
      detector_size: ``N``, the full square detector; the central beam sits at pixel ``(N//2, N//2)``.
      crop: ``(start, stop)`` kept on both detector axes; ``None`` = the benchmark's centred crop
        scaled to ``N`` (``(28, 228)`` for ``N = 256``, giving 200 x 200 patterns). ``(0, N)`` keeps all.
      q_pixel: reciprocal-space pixel size in 1/Angstrom; ``None`` = ``0.0096 * 256 / N``.
      lattice_constant: WS2 in-plane lattice constant ``a`` in Angstrom.
      k_max: largest reciprocal vector rendered, 1/Angstrom (1.4 gives 54 reflections).
      disk_radius: convergent-beam disk radius in detector pixels.
      disk_edge: soft-edge width ``w`` of the disk profile ``0.5 * (1 - tanh((rho - r) / w))``.
      central_frac: fraction of the probe intensity in the central (000) disk.
      debye_waller: ``B`` in Angstrom^2 of the factor ``exp(-B |g|^2 / 2)``.
      n_grains: number of Voronoi grains including the reference grain (index 0).
      max_strain: grain strains ``strain_xx, strain_yy, shear_xy ~ U[-max_strain, max_strain]``.
      boundary_sigma: Gaussian width (scan pixels) of the mixing of patterns across boundaries; 0 = none.
      noise_level: Auto4DSTEM background weight ``w`` in [0, 1] (also '25%' etc.), or ``None`` to
        store the raw patterns (each summing to about 1, no scale) so noise can be added on the fly.
      counts: electrons per probe of the noise model.
      intensity_scale: output multiplier of the noise model (``1e5 / 4``).
      lorentz_width: HWHM of the noise glow in cycles per pixel.
      seed: random seed (grain map, strains, rotations and noise).
      reference_region: ``(r0, r1, c0, c1)`` scan rows r0:r1, columns c0:c1 covered by the
        unstrained, unrotated reference grain; ``None`` = the paper's ``(30, 60, 10, 40)`` scaled to
        the scan shape.
      interior_erosion: scan pixels eroded from each grain for the ``interior`` label mask.
      batch_rows: scan rows generated per device batch (does not change the result).
    """

    scan_shape: tuple[int, int] = (256, 256)
    detector_size: int = 256
    crop: tuple[int, int] | None = None
    q_pixel: float | None = None
    lattice_constant: float = 3.153
    k_max: float = 1.4
    disk_radius: float = 3.7
    disk_edge: float = 0.5
    central_frac: float = 0.95
    debye_waller: float = 0.5
    n_grains: int = 24
    max_strain: float = 0.02
    boundary_sigma: float = 0.7
    noise_level: float | None = 0.0
    counts: float = DEFAULT_COUNTS
    intensity_scale: float = DEFAULT_SCALE
    lorentz_width: float = DEFAULT_LORENTZ_WIDTH
    seed: int = 0
    reference_region: tuple[int, int, int, int] | None = None
    interior_erosion: int = 2
    batch_rows: int = 4

    def __post_init__(self):
        def fix(name, value):
            object.__setattr__(self, name, value)

        try:
            scan = tuple(int(s) for s in self.scan_shape)
        except TypeError:
            raise ValueError(f"scan_shape={self.scan_shape!r}: expected two positive ints") from None
        if len(scan) != 2 or min(scan) < 1:
            raise ValueError(f"scan_shape={self.scan_shape!r}: expected two positive ints")
        fix("scan_shape", scan)
        if int(self.detector_size) < 4:
            raise ValueError(f"detector_size={self.detector_size!r} must be >= 4")
        fix("detector_size", int(self.detector_size))
        if self.crop is not None:
            crop = tuple(int(c) for c in self.crop)
            if len(crop) != 2 or not 0 <= crop[0] < crop[1] <= self.detector_size:
                raise ValueError(
                    f"crop={self.crop!r}: expected (start, stop) with 0 <= start < stop <= "
                    f"detector_size={self.detector_size}"
                )
            fix("crop", crop)
        if self.noise_level is not None:
            fix("noise_level", parse_noise_level(self.noise_level))
        for name in ("lattice_constant", "k_max", "disk_radius", "disk_edge", "counts", "intensity_scale",
                     "lorentz_width"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")
        if self.q_pixel is not None and not self.q_pixel > 0:
            raise ValueError(f"q_pixel={self.q_pixel!r} must be > 0 (1/Angstrom per pixel)")
        if not 0.0 <= self.central_frac <= 1.0:
            raise ValueError(f"central_frac={self.central_frac!r} must be in [0, 1]")
        if not 0.0 <= self.max_strain < 0.5:
            raise ValueError(f"max_strain={self.max_strain!r} must be in [0, 0.5)")
        if self.boundary_sigma < 0:
            raise ValueError(f"boundary_sigma={self.boundary_sigma!r} must be >= 0")
        if self.debye_waller < 0:
            raise ValueError(f"debye_waller={self.debye_waller!r} must be >= 0")
        if int(self.n_grains) < 1:
            raise ValueError(f"n_grains={self.n_grains!r} must be >= 1")
        fix("n_grains", int(self.n_grains))
        if int(self.batch_rows) < 1:
            raise ValueError(f"batch_rows={self.batch_rows!r} must be >= 1")
        fix("batch_rows", int(self.batch_rows))
        if int(self.interior_erosion) < 0:
            raise ValueError(f"interior_erosion={self.interior_erosion!r} must be >= 0")
        fix("seed", int(self.seed))
        if self.reference_region is not None:
            region = tuple(int(v) for v in self.reference_region)
            r0, r1, c0, c1 = region if len(region) == 4 else (0, 0, 0, 0)
            if len(region) != 4 or not (0 <= r0 < r1 <= scan[0] and 0 <= c0 < c1 <= scan[1]):
                raise ValueError(
                    f"reference_region={self.reference_region!r}: expected (r0, r1, c0, c1) with "
                    f"0 <= r0 < r1 <= {scan[0]} and 0 <= c0 < c1 <= {scan[1]}"
                )
            fix("reference_region", region)

    # ----- resolved geometry -----
    @property
    def crop_bounds(self) -> tuple[int, int]:
        """``(start, stop)`` of the detector crop on both axes."""
        if self.crop is not None:
            return self.crop
        start = int(round(_BENCH_CROP_START * self.detector_size / _BENCH_DETECTOR))
        return (start, self.detector_size - start)

    @property
    def pattern_shape(self) -> tuple[int, int]:
        """``(H, W)`` of a stored (cropped) pattern."""
        start, stop = self.crop_bounds
        return (stop - start, stop - start)

    @property
    def pattern_centre(self) -> tuple[int, int]:
        """Pixel ``(row, col)`` of the central beam in a cropped pattern (``(100, 100)`` by default)."""
        c = self.detector_size // 2 - self.crop_bounds[0]
        return (c, c)

    @property
    def pixel_size(self) -> float:
        """Reciprocal-space pixel size in 1/Angstrom."""
        if self.q_pixel is not None:
            return float(self.q_pixel)
        return _BENCH_Q_PIXEL * _BENCH_DETECTOR / self.detector_size

    @property
    def reference_bounds(self) -> tuple[int, int, int, int]:
        """``(r0, r1, c0, c1)`` of the reference region in scan pixels."""
        if self.reference_region is not None:
            return self.reference_region
        rx, ry = self.scan_shape
        r0, r1, c0, c1 = _BENCH_REFERENCE
        r0s, c0s = math.floor(r0 * rx / _BENCH_SCAN), math.floor(c0 * ry / _BENCH_SCAN)
        r1s = min(rx, max(r0s + 1, math.ceil(r1 * rx / _BENCH_SCAN)))
        c1s = min(ry, max(c0s + 1, math.ceil(c1 * ry / _BENCH_SCAN)))
        return (r0s, r1s, c0s, c1s)

    def to_json(self) -> str:
        """The configuration as a JSON string (stored in the HDF5 file)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


# ---------------------------------------------------------------------------------------------
# Lattice and intensities (host numpy, float64)
# ---------------------------------------------------------------------------------------------
def reciprocal_lattice(*, lattice_constant: float = 3.153, k_max: float = 1.4) -> tuple[np.ndarray, np.ndarray]:
    """Unstrained reciprocal-lattice vectors of a hexagonal [0001] monolayer.

    Real-space basis (120 degree convention): ``a1 = a (1, 0)``, ``a2 = a (-1/2, sqrt(3)/2)`` in the
    (x, y) frame; reciprocal vectors ``g = h b1 + k b2`` with ``b_i . a_j = delta_ij`` (no 2 pi).

    Args:
      lattice_constant: ``a`` in Angstrom.
      k_max: keep ``0 < |g| <= k_max`` (1/Angstrom).

    Returns:
      ``(g, hk)``: ``(S, 2)`` float64 vectors (1/Angstrom, components (x, y)) sorted by length then
      angle, and ``(S, 2)`` int Miller indices.
    """
    a = float(lattice_constant)
    basis = np.array([[a, 0.0], [-a / 2, a * math.sqrt(3) / 2]])  # rows a1, a2
    recip = np.linalg.inv(basis).T  # rows b1, b2
    n = int(math.ceil(k_max * a)) + 2
    h, k = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    hk = np.stack([h.ravel(), k.ravel()], axis=1)
    g = hk @ recip
    norm = np.linalg.norm(g, axis=1)
    keep = (norm > 0) & (norm <= k_max * (1 + 1e-12))
    g, hk, norm = g[keep], hk[keep], norm[keep]
    order = np.lexsort((np.arctan2(g[:, 1], g[:, 0]), np.round(norm, 9)))
    return g[order], hk[order]


def kinematic_intensities(g: np.ndarray, hk: np.ndarray, *, debye_waller: float = 0.5) -> np.ndarray:
    """Kinematic |F(g)|^2 of 1H-WS2 (W at (0, 0), S2 at (1/3, 2/3)), normalised to sum 1.

    ``F = f_W(s) + 2 f_S(s) exp(2 pi i (h/3 + 2k/3))``, ``s = |g| / 2``, ``f(s) = Z / (s^2 + s0^2)``
    with ``s0 = 0.3 Z^(1/3)``, times the Debye-Waller factor ``exp(-B |g|^2 / 2)``.

    Args:
      g: ``(S, 2)`` reciprocal vectors in 1/Angstrom.
      hk: ``(S, 2)`` Miller indices.
      debye_waller: ``B`` in Angstrom^2.

    Returns:
      ``(S,)`` float64 relative intensities summing to 1 (centrosymmetric: 6-fold symmetric pattern).
    """
    s = np.linalg.norm(g, axis=1) / 2

    def f(z):
        return z / (s**2 + (0.3 * z ** (1 / 3)) ** 2)

    phase = np.exp(2j * np.pi * (hk[:, 0] / 3 + 2 * hk[:, 1] / 3))
    amp = f(_Z_W) + 2 * f(_Z_S) * phase
    inten = np.abs(amp) ** 2 * np.exp(-debye_waller * np.sum(g**2, axis=1) / 2)
    return inten / inten.sum()


class SpotTable(NamedTuple):
    """Unstrained spots of the simulated pattern.

    Attributes:
      g_px: ``(S, 2)`` float64 reciprocal vectors in detector pixels relative to the pattern centre,
        components ``(qx, qy) = (row, col)``.
      intensity: ``(S,)`` float64 integrated disk intensities (sum ``1 - central_frac``).
      hk: ``(S, 2)`` Miller indices.
    """

    g_px: np.ndarray
    intensity: np.ndarray
    hk: np.ndarray


def spot_table(config: SimulationConfig) -> SpotTable:
    """The unstrained spot list (pixel units) and intensities for ``config``."""
    g, hk = reciprocal_lattice(lattice_constant=config.lattice_constant, k_max=config.k_max)
    inten = kinematic_intensities(g, hk, debye_waller=config.debye_waller)
    return SpotTable(g / config.pixel_size, inten * (1.0 - config.central_frac), hk)


# ---------------------------------------------------------------------------------------------
# Differentiable rendering (JAX)
# ---------------------------------------------------------------------------------------------
def deformation_matrix(params: ArrayLike) -> jax.Array:
    """Real-space lattice deformation ``A = (I + eps) R(theta)``.

    Args:
      params: ``(..., 4)`` = ``(strain_xx, strain_yy, shear_xy, theta)`` (theta in radians, CCW from
        +x toward +y).

    Returns:
      ``(..., 2, 2)`` matrices acting on column vectors ``(x, y)``.
    """
    p = jnp.asarray(params)
    exx, eyy, exy, th = p[..., 0], p[..., 1], p[..., 2], p[..., 3]
    c, s = jnp.cos(th), jnp.sin(th)
    row0 = jnp.stack([(1 + exx) * c + exy * s, -(1 + exx) * s + exy * c], -1)
    row1 = jnp.stack([exy * c + (1 + eyy) * s, -exy * s + (1 + eyy) * c], -1)
    return jnp.stack([row0, row1], -2)


def spot_transform(params: ArrayLike) -> jax.Array:
    """Diffraction-space transform ``A^-T = (I + eps)^-1 R(theta)`` mapping unstrained g to spots.

    Args:
      params: ``(..., 4)`` = ``(strain_xx, strain_yy, shear_xy, theta)``.

    Returns:
      ``(..., 2, 2)``; spot ``q = M @ g`` with ``g, q`` as ``(qx, qy)`` column vectors.
    """
    p = jnp.asarray(params)
    exx, eyy, exy, th = p[..., 0], p[..., 1], p[..., 2], p[..., 3]
    det = (1 + exx) * (1 + eyy) - exy**2
    i00, i01, i11 = (1 + eyy) / det, -exy / det, (1 + exx) / det
    c, s = jnp.cos(th), jnp.sin(th)
    # Elementwise products, not matmul: default-precision f32 dots are TF32/bf16 on GPUs/TPUs.
    row0 = jnp.stack([i00 * c + i01 * s, -i00 * s + i01 * c], -1)
    row1 = jnp.stack([i01 * c + i11 * s, -i01 * s + i11 * c], -1)
    return jnp.stack([row0, row1], -2)


def _disk_area(radius: float, edge: float) -> float:
    # Integral of 0.5 (1 - tanh((rho - r) / w)) over the plane (Sommerfeld, exact up to exp(-2r/w)).
    return math.pi * radius**2 + math.pi**3 * edge**2 / 12


def _render_one(params, translation, *, qx, qy, g_px, amp, central, radius, edge):
    m = spot_transform(params[:4])
    gx, gy = g_px[:, 0], g_px[:, 1]
    centres = jnp.stack([m[0, 0] * gx + m[0, 1] * gy, m[1, 0] * gx + m[1, 1] * gy], -1) + translation  # (S, 2)
    centres = jnp.concatenate([translation[None, :], centres], 0)
    amps = jnp.concatenate([jnp.reshape(central, (1,)).astype(amp.dtype), amp])
    dx = qx[:, None, None] - centres[None, None, :, 0]
    dy = qy[None, :, None] - centres[None, None, :, 1]
    rho = jnp.sqrt(dx * dx + dy * dy + 1e-12)  # the 1e-12 keeps d(rho) finite at a disk centre
    profile = jax.nn.sigmoid(-2.0 * (rho - radius) / edge)  # = 0.5 (1 - tanh((rho - r) / w)), accurate tails
    return jnp.sum(profile * amps, axis=-1)


def _render_constants(config: SimulationConfig):
    spots = spot_table(config)
    start, stop = config.crop_bounds
    centre = config.detector_size // 2
    coords = jnp.arange(start, stop, dtype=jnp.float32) - centre
    area = _disk_area(config.disk_radius, config.disk_edge)
    return dict(
        qx=coords,
        qy=coords,
        g_px=jnp.asarray(spots.g_px, jnp.float32),
        amp=jnp.asarray(spots.intensity / area, jnp.float32),
        central=jnp.float32(config.central_frac / area),
        radius=float(config.disk_radius),
        edge=float(config.disk_edge),
    )


def pattern_function(config: SimulationConfig, *, translation: bool = False) -> Callable[[jax.Array], jax.Array]:
    """A differentiable single-grain renderer ``params -> pattern``.

    Args:
      config: geometry (detector, crop, lattice, disk, central fraction).
      translation: if True the function takes 6 parameters, the last two a shift ``(tx, ty)`` of the
        whole pattern (central beam included) in detector pixels along (Qx, Qy).

    Returns:
      ``f(params)`` mapping ``(4,)`` = ``(strain_xx, strain_yy, shear_xy, theta)`` (or ``(6,)``) to the
      noise-free cropped pattern ``(H, W)`` float32 (fraction of the probe per pixel; sums to about
      1 minus what falls outside the crop). Differentiable (``jax.jacfwd``) and jittable.
    """
    const = _render_constants(config)

    def f(params):
        params = jnp.asarray(params, jnp.float32)
        shift = params[4:6] if translation else jnp.zeros((2,), jnp.float32)
        return _render_one(params, shift, **const)

    return f


def render_patterns(params: ArrayLike, config: SimulationConfig) -> jax.Array:
    """Renders one noise-free pattern per grain.

    Args:
      params: ``(K, 4)`` grain parameters ``(strain_xx, strain_yy, shear_xy, theta)``.
      config: the geometry.

    Returns:
      ``(K, H, W)`` float32 cropped patterns (central beam at `SimulationConfig.pattern_centre`).
    """
    const = _render_constants(config)
    params = jnp.asarray(np.asarray(params, np.float32).reshape(-1, 4))
    return _render_many(params, **const)


@functools.partial(jax.jit, static_argnames=("radius", "edge"))
def _render_many(params, *, qx, qy, g_px, amp, central, radius, edge):
    def one(p):
        return _render_one(p, jnp.zeros((2,), jnp.float32), qx=qx, qy=qy, g_px=g_px, amp=amp,
                           central=central, radius=radius, edge=edge)

    return jax.lax.map(one, params, batch_size=4)


# ---------------------------------------------------------------------------------------------
# Grain map, boundary mixing, labels (host numpy)
# ---------------------------------------------------------------------------------------------
class Grains(NamedTuple):
    """A Voronoi polycrystal on the scan grid.

    Attributes:
      seeds: ``(K, 2)`` float64 seed positions (scan row, column).
      params: ``(K, 4)`` float64 ``(strain_xx, strain_yy, shear_xy, theta)``; grain 0 is the reference
        grain with all zeros.
      gmap: ``(Rx, Ry)`` int32 Voronoi grain index; the reference region (grown by the mixing radius)
        belongs to grain 0.
    """

    seeds: np.ndarray
    params: np.ndarray
    gmap: np.ndarray


def _mixing_kernel(sigma: float) -> np.ndarray:
    if sigma <= 0:
        return np.ones(1)
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def make_grains(config: SimulationConfig) -> Grains:
    """Draws the grain seeds, parameters and Voronoi map for ``config`` (deterministic in ``seed``)."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0x5EED]))
    rx, ry = config.scan_shape
    r0, r1, c0, c1 = config.reference_bounds
    k = config.n_grains
    seeds = np.empty((k, 2))
    seeds[0] = ((r0 + r1 - 1) / 2, (c0 + c1 - 1) / 2)
    seeds[1:] = rng.uniform((0.0, 0.0), (rx, ry), size=(k - 1, 2))
    params = np.zeros((k, 4))
    params[1:, :3] = rng.uniform(-config.max_strain, config.max_strain, size=(k - 1, 3))
    params[1:, 3] = rng.uniform(0.0, 2 * np.pi, size=k - 1)
    gmap = np.empty((rx, ry), np.int32)
    cols = np.arange(ry, dtype=np.float64)
    for i in range(rx):  # row by row keeps memory at O(Ry * K)
        d2 = (i - seeds[:, 0, None]) ** 2 + (cols[None, :] - seeds[:, 1, None]) ** 2
        gmap[i] = np.argmin(d2, axis=0)
    margin = (len(_mixing_kernel(config.boundary_sigma)) - 1) // 2
    gmap[max(0, r0 - margin): r1 + margin, max(0, c0 - margin): c1 + margin] = 0
    return Grains(seeds, params, gmap)


def _mixing_weights(gmap: np.ndarray, rows: slice, n_grains: int, kernel: np.ndarray) -> np.ndarray:
    """Gaussian-smoothed one-hot grain weights for scan rows ``rows``: ``(n, Ry, K)`` float64.

    Each output element is computed with the same sequence of operations whatever slab it belongs
    to, so row batches reproduce the full-scan result bit for bit. Edges replicate the border grain.
    """
    rad = (len(kernel) - 1) // 2
    r0, r1 = rows.start, rows.stop
    idx = np.clip(np.arange(r0 - rad, r1 + rad), 0, gmap.shape[0] - 1)
    slab = np.pad(gmap[idx], ((0, 0), (rad, rad)), mode="edge")
    onehot = (slab[..., None] == np.arange(n_grains)).astype(np.float64)
    n = r1 - r0
    out = np.zeros((n, slab.shape[1], n_grains))
    for t, kt in enumerate(kernel):
        out += kt * onehot[t: t + n]
    res = np.zeros((n, gmap.shape[1], n_grains))
    for t, kt in enumerate(kernel):
        res += kt * out[:, t: t + gmap.shape[1]]
    return res / res.sum(-1, keepdims=True)


def _erode_labels(index: np.ndarray, width: int) -> np.ndarray:
    if width == 0:
        return np.ones(index.shape, bool)
    pad = np.pad(index, width, mode="edge")
    rx, ry = index.shape
    ok = np.ones(index.shape, bool)
    for di in range(2 * width + 1):
        for dj in range(2 * width + 1):
            ok &= pad[di: di + rx, dj: dj + ry] == index
    return ok


def _sparse_rows(weights: np.ndarray, n_mix: int) -> tuple[np.ndarray, np.ndarray]:
    """Keeps the ``n_mix`` largest weights per position, ordered by grain index (zeros pad)."""
    top = np.argsort(-weights, axis=-1, kind="stable")[..., :n_mix]
    top = np.sort(top, axis=-1)
    w = np.take_along_axis(weights, top, -1)
    return top.astype(np.int32), w.astype(np.float32)


def grain_labels(config: SimulationConfig, *, grains: Grains | None = None) -> dict[str, np.ndarray]:
    """Ground-truth labels of the simulated scan.

    Mixed boundary positions take the label of their dominant grain (largest mixing weight).

    Returns:
      dict with ``strain_xx, strain_yy, shear_xy`` (dimensionless) and ``rotation`` (radians in
      [0, 2 pi)), each ``(Rx, Ry)`` float32; ``grain_index`` ``(Rx, Ry)`` int32 (dominant grain);
      ``interior`` ``(Rx, Ry)`` bool (grain interior after eroding ``interior_erosion`` scan pixels).
    """
    grains = make_grains(config) if grains is None else grains
    dominant, _ = _dominant_and_mix_count(config, grains)
    return _labels_from_dominant(config, grains, dominant)


def _dominant_and_mix_count(config, grains):
    rx = config.scan_shape[0]
    kernel = _mixing_kernel(config.boundary_sigma)
    dominant = np.empty(config.scan_shape, np.int32)
    n_mix = 1
    step = max(1, 2**20 // max(1, config.scan_shape[1] * config.n_grains))
    for r0 in range(0, rx, step):
        r1 = min(rx, r0 + step)
        wts = _mixing_weights(grains.gmap, slice(r0, r1), config.n_grains, kernel)
        dominant[r0:r1] = np.argmax(wts, axis=-1)
        n_mix = max(n_mix, int((wts > 0).sum(-1).max()))
    return dominant, n_mix


def _labels_from_dominant(config, grains, dominant):
    p = grains.params[dominant].astype(np.float32)
    return {
        "strain_xx": p[..., 0],
        "strain_yy": p[..., 1],
        "shear_xy": p[..., 2],
        "rotation": p[..., 3],
        "grain_index": dominant.astype(np.int32),
        "interior": _erode_labels(dominant, int(config.interior_erosion)),
    }


# ---------------------------------------------------------------------------------------------
# Batch generator
# ---------------------------------------------------------------------------------------------
@jax.jit
def _mix_rows(patterns, idx, wts):
    """``out[r, c] = sum_m wts[r, c, m] * patterns[idx[r, c, m]]`` as a fixed sequence of elementwise
    adds, so each value is independent of the batch size (no matmul blocking)."""
    out = jnp.zeros(idx.shape[:2] + patterns.shape[1:], jnp.float32)
    for m in range(idx.shape[-1]):
        out = out + wts[..., m, None, None] * patterns[idx[..., m]]
    return out


@functools.partial(jax.jit, static_argnames=("w", "counts", "scale", "lorentz_width"))
def _mix_noisy_rows(patterns, idx, wts, rows, key, *, w, counts, scale, lorentz_width):
    """`_mix_rows` then the noise, one PRNG key per scan row (``fold_in(key, row)``)."""
    out = _mix_rows(patterns, idx, wts)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, rows)
    noise = functools.partial(add_background_noise, w=w, counts=counts, scale=scale, lorentz_width=lorentz_width)
    return jax.vmap(lambda k, x: noise(x, key=k))(keys, out)


class _Generator:
    """Renders the grain patterns once, then produces scan rows batch by batch on the device."""

    def __init__(self, config: SimulationConfig):
        self.config = config
        self.grains = make_grains(config)
        dominant, self.n_mix = _dominant_and_mix_count(config, self.grains)
        self.labels = _labels_from_dominant(config, self.grains, dominant)
        self.kernel = _mixing_kernel(config.boundary_sigma)
        self.patterns = render_patterns(self.grains.params, config)
        self.noise_key = jax.random.fold_in(jax.random.key(config.seed), 1)
        self._noise = None if config.noise_level is None else dict(
            w=config.noise_level, counts=config.counts, scale=config.intensity_scale,
            lorentz_width=config.lorentz_width)

    def _dispatch(self, r0: int, r1: int) -> jax.Array:
        n = self.config.batch_rows
        wts = _mixing_weights(self.grains.gmap, slice(r0, r1), self.config.n_grains, self.kernel)
        idx, w = _sparse_rows(wts, self.n_mix)
        if r1 - r0 < n:  # pad to a fixed batch shape (one compilation)
            pad = ((0, n - (r1 - r0)), (0, 0), (0, 0))
            idx, w = np.pad(idx, pad), np.pad(w, pad)
        rows = np.arange(r0, r0 + n, dtype=np.uint32)
        if self._noise is None:
            return _mix_rows(self.patterns, idx, w)
        if jax.default_backend() == "cpu":
            # jax.random.poisson is slow on CPUs; NumPy's sampler, seeded per scan row, keeps the result a
            # function of (seed, row) only (batching does not change it).
            mixed = np.asarray(_mix_rows(self.patterns, idx, w))
            out = np.empty_like(mixed)
            for i, r in enumerate(rows):
                rng = np.random.default_rng([self.config.seed, 1, int(r)])
                out[i] = add_background_noise_numpy(mixed[i], rng=rng, **self._noise)
            return out
        return _mix_noisy_rows(self.patterns, idx, w, rows, self.noise_key, **self._noise)

    def batches(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yields ``(r0, r1, data[r0:r1])`` host float32 arrays; the next batch is computed meanwhile."""
        rx, n = self.config.scan_shape[0], self.config.batch_rows
        starts = list(range(0, rx, n))
        pending = self._dispatch(starts[0], min(rx, starts[0] + n))
        for i, r0 in enumerate(starts):
            r1 = min(rx, r0 + n)
            current = pending
            if i + 1 < len(starts):
                nxt = starts[i + 1]
                pending = self._dispatch(nxt, min(rx, nxt + n))
            yield r0, r1, np.asarray(current)[: r1 - r0]


def simulate_scan(config: SimulationConfig) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Simulates a whole scan in memory (small scans, tests).

    Args:
      config: the simulation configuration.

    Returns:
      ``(data, labels)``: ``data`` ``(Rx, Ry, H, W)`` float32 (noisy and scaled as
      `add_background_noise` unless ``noise_level is None``); ``labels`` as `grain_labels`.
      Identical to the ``/data`` and ``/labels`` written by `simulate_to_hdf5` for the same config.
    """
    gen = _Generator(config)
    data = np.empty(config.scan_shape + config.pattern_shape, np.float32)
    for r0, r1, block in gen.batches():
        data[r0:r1] = block
    return data, gen.labels


def _umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def simulate_to_hdf5(path: str | os.PathLike, config: SimulationConfig, *, progress: bool = True) -> Path:
    """Simulates a scan and streams it to an HDF5 file, batch of rows by batch of rows.

    Layout (format ``"ccstae-sim-1"``): ``/data`` float32 ``(Rx, Ry, Qx, Qy)`` chunked by scan row;
    ``/labels/{strain_xx, strain_yy, shear_xy, rotation}`` float32 ``(Rx, Ry)`` (rotation in
    radians), ``/labels/grain_index`` int32, ``/labels/interior`` bool; ``/grains/params`` float64
    ``(K, 4)`` = ``(exx, eyy, exy, theta)`` and ``/grains/seeds``; root attributes ``format``,
    ``conventions``, ``reference_region`` (r0, r1, c0, c1), ``noise_level`` (w; NaN when raw),
    ``noise_applied``, ``seed``, ``q_pixel``, ``disk_radius``, ``disk_edge``, ``detector_size``,
    ``crop``, ``pattern_centre``, ``lattice_constant``, ``central_frac``, ``lattice_symmetry`` (6),
    ``counts``, ``intensity_scale``, ``lorentz_width``, ``config`` (JSON).

    The file is written under a temporary name in the same folder and renamed when complete, so the
    final name never holds a partial file; its permissions follow the umask like any new file's
    (``0o666 & ~umask``).

    Args:
      path: destination ``.h5`` file (overwritten if it exists).
      config: the simulation configuration.
      progress: show a tqdm progress bar.

    Returns:
      The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    gen = _Generator(config)
    rx, ry = config.scan_shape
    h, w = config.pattern_shape
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w", track_order=True) as f:
            dset = f.create_dataset(
                "data", shape=(rx, ry, h, w), dtype=np.float32, chunks=(1, ry, h, w), track_times=False
            )
            labels = f.create_group("labels")
            for name, arr in gen.labels.items():
                labels.create_dataset(name, data=arr, track_times=False)
            grains = f.create_group("grains")
            grains.create_dataset("params", data=gen.grains.params, track_times=False)
            grains.create_dataset("seeds", data=gen.grains.seeds, track_times=False)
            grains.attrs["columns"] = "strain_xx, strain_yy, shear_xy, rotation_rad"
            attrs = f.attrs
            attrs["format"] = FORMAT
            attrs["conventions"] = CONVENTIONS
            attrs["reference_region"] = np.asarray(config.reference_bounds, np.int64)
            attrs["noise_level"] = np.nan if config.noise_level is None else float(config.noise_level)
            attrs["noise_applied"] = config.noise_level is not None
            attrs["seed"] = config.seed
            attrs["q_pixel"] = config.pixel_size
            attrs["disk_radius"] = config.disk_radius
            attrs["disk_edge"] = config.disk_edge
            attrs["detector_size"] = config.detector_size
            attrs["crop"] = np.asarray(config.crop_bounds, np.int64)
            attrs["pattern_centre"] = np.asarray(config.pattern_centre, np.int64)
            attrs["lattice_constant"] = config.lattice_constant
            attrs["central_frac"] = config.central_frac
            attrs["lattice_symmetry"] = 6
            attrs["counts"] = config.counts
            attrs["intensity_scale"] = config.intensity_scale if config.noise_level is not None else 1.0
            attrs["lorentz_width"] = config.lorentz_width
            attrs["config"] = config.to_json()
            batches = gen.batches()
            if progress:
                from tqdm.auto import tqdm

                batches = tqdm(batches, total=-(-rx // config.batch_rows), desc=f"simulate {path.name}",
                               unit="batch")
            for r0, r1, block in batches:
                dset[r0:r1] = block
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the final file gets a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
