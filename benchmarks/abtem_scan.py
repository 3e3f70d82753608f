"""WS2 polycrystal 4D-STEM scans computed by abTEM multislice, with ground-truth labels, in our HDF5 layout.

Our own simulator (`ccstae_jax.data.simulate`) is kinematic and was written together with the strain code it tests.
This script makes scans whose diffraction physics comes from elsewhere: abTEM 1.0.11 (GPL-3; imported lazily, run
it in its own virtualenv, see ``benchmarks/README.md``).

What it computes, per grain ``k`` (grain parameters from `ccstae_jax.data.simulate.make_grains`, so the grain map,
strains and rotations are those ``ccstae simulate`` draws for the same scan, grain count and seed):

1. A monolayer 1H-WS2 (W at (0, 0), S2 at (1/3, 2/3) of ``a1 = a (1, 0)``, ``a2 = a (-1/2, sqrt(3)/2)``; S planes
   1.57 A above and below W) deformed by ``A = (I + eps) R(theta)`` about the cell centre, cut to a square cell of
   side ``L = oversample / q_pixel`` (312.5 A by default). The cut is not periodic (a rotated, strained lattice
   does not fit the cell); the probes sit within one lattice constant of the cell centre, more than 150 A from the
   seam. Grain 0 is the reference grain: ``eps = 0``, ``theta = 0``.
2. abTEM multislice (Lobato parametrisation, infinite projection, one slice per atomic plane: 3 slices of 1.57 A;
   ``gpts`` = 3072 x 3072, 0.10 A; no aberrations, no thermal vibrations) for ``positions`` probe positions
   (default 4, seeded, within +-a/2 of the centre), ``energy`` 300 keV, aperture semi-angle ``probe_mrad``.
3. Diffraction intensities on abTEM's fine reciprocal grid (``1/L`` = q_pixel / oversample), summed over
   ``oversample x oversample`` blocks centred on the zero beam (a detector pixel integrates its area), and cropped
   to ``detector x detector`` (200 x 200) with the zero beam at pixel ``(detector // 2, detector // 2)``. Intensities
   are fractions of the probe's electrons per pixel (a pattern sums to about 0.995: the rest falls outside the crop).

Axis mapping (checked by ``--check``, which recovers the labels' strain and rotation from the spots): abTEM's atom
``x`` is the first axis of its waves and ``kx`` the second-to-last axis of its diffraction patterns, increasing
with the array index after the fft-shift. With our atoms placed at ``(x, y)`` in our frame, abTEM's ``kx`` is our
detector ``Qx`` (axis 2, pattern rows, positive downwards) and ``ky`` our ``Qy`` (axis 3, columns): no transpose
or flip is applied.

The scan is then assembled like our simulator does: every position takes, for each grain, one of that grain's
probe-position patterns (a seeded random choice per position, the same index for every grain mixed there), mixed
across grain boundaries with Gaussian weights (`simulate`'s mixing, ``boundary_sigma`` scan pixels), and the
Auto4DSTEM noise (`ccstae_jax.data.noise.add_background_noise_numpy`, NumPy generator seeded per scan row with
``(seed, 1, row)`` as in the simulator) is added.

Output layout (format ``"ccstae-abtem-1"``; `simulate_to_hdf5`'s layout where it applies): ``/data`` float32
``(Rx, Ry, 200, 200)`` chunked by scan row; ``/labels/{strain_xx, strain_yy, shear_xy, rotation}`` float32
(rotation in radians), ``/labels/grain_index`` int32, ``/labels/interior`` bool; ``/grains/params`` ``(K, 4)``,
``/grains/seeds``; root attributes ``format``, ``conventions``, ``source``, ``reference_region``, ``noise_level``,
``noise_applied``, ``seed``, ``q_pixel``, ``disk_radius`` (nominal ``alpha / (lambda q_pixel)``, px),
``pattern_centre``, ``lattice_constant``, ``lattice_symmetry`` (6), ``detector_size``, ``crop``,
``central_frac`` (measured on the reference grain), ``counts``, ``intensity_scale``, ``lorentz_width``, ``config``
(JSON).

The clean per-grain patterns are computed once and cached in an ``.npz`` beside the outputs (``--cache``); later
calls with the same geometry, grains and seed reuse them (any scan size, any noise level).

Usage::

    python benchmarks/abtem_scan.py OUT.h5 --probe-mrad 3.0 --noise 0.25 --scan 24 --grains 10 --seed 0
    python benchmarks/abtem_scan.py 'out/small_probe_{noise}.h5' --probe-mrad 0.7 --noise 0 25 --check

``{noise}`` in the output name is replaced by the noise level in percent (needed when several levels are given).
Run it with an interpreter that has abTEM and ``ccstae_jax`` (``pip install -e`` of this repo) when the cache has to
be computed; once cached, the project's own interpreter is enough.

``--check`` measures the central and the six first-order disks of every clean per-grain pattern (`disk_centre`:
centroids of small disks, circles fitted to the edges of large ones), recovers ``(exx, eyy, exy, theta)`` by least
squares and a polar decomposition, and prints the errors against the labels, with the disk radius, the reference
grain's ``|g1|`` and the fraction of the intensity lying off the predicted disks (what the cut's seam and the cell's
periodicity could scatter there).
After writing a noise-free file the script measures the mean pattern of its reference region the same way.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FORMAT = "ccstae-abtem-1"
ABTEM_VERSION = "1.0.11"
#: Vertical distance between the W plane and each S plane of 1H-WS2 (Angstrom).
S_HEIGHT = 1.57


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The multislice and detector geometry (lengths in Angstrom, angles in mrad, pixels of the stored pattern).

    Attributes:
      probe_mrad: aperture semi-angle of the probe.
      energy_ev: beam energy in eV.
      lattice_constant: WS2 in-plane lattice constant ``a``.
      q_pixel: reciprocal-space size of a stored detector pixel, 1/Angstrom.
      detector: stored patterns are ``detector x detector`` with the zero beam at ``(detector // 2,) * 2``.
      oversample: abTEM's reciprocal grid is ``oversample`` times finer than ``q_pixel`` (odd, so a stored pixel
        is centred on the zero beam); the cell side is ``oversample / q_pixel``.
      gpts: real-space grid points per side of the multislice cell.
      positions: probe positions simulated per grain.
      precision: abTEM float precision, ``"float32"`` or ``"float64"``.
    """

    probe_mrad: float = 3.0
    energy_ev: float = 300e3
    lattice_constant: float = 3.153
    q_pixel: float = 0.0096
    detector: int = 200
    oversample: int = 3
    gpts: int = 3072
    positions: int = 4
    precision: str = "float32"

    def __post_init__(self):
        if not self.probe_mrad > 0:
            raise ValueError(f"probe_mrad={self.probe_mrad!r} must be > 0")
        if not self.energy_ev > 0:
            raise ValueError(f"energy_ev={self.energy_ev!r} must be > 0")
        if self.oversample < 1 or self.oversample % 2 == 0:
            raise ValueError(f"oversample={self.oversample!r} must be a positive odd integer")
        if self.positions < 1:
            raise ValueError(f"positions={self.positions!r} must be >= 1")
        if self.precision not in ("float32", "float64"):
            raise ValueError(f"precision={self.precision!r}: expected 'float32' or 'float64'")
        half = self.oversample * (self.detector // 2) + self.oversample // 2
        # The stored crop must sit inside abTEM's antialiased band (2/3 of the grid's Nyquist frequency).
        if half + 1 > (self.gpts // 2) * 2 / 3:
            raise ValueError(
                f"gpts={self.gpts} is too coarse: the {self.detector} px crop at oversample {self.oversample} needs "
                f"{half} fine pixels from the zero beam, beyond the antialias cutoff {(self.gpts // 2) * 2 / 3:.0f}"
            )

    @property
    def cell(self) -> float:
        """Side of the square multislice cell (Angstrom)."""
        return self.oversample / self.q_pixel

    @property
    def sampling(self) -> float:
        """Real-space grid spacing (Angstrom)."""
        return self.cell / self.gpts

    @property
    def wavelength(self) -> float:
        """Relativistic electron wavelength (Angstrom)."""
        return electron_wavelength(self.energy_ev)

    @property
    def disk_radius(self) -> float:
        """Nominal diffraction-disk radius in stored pixels: ``alpha / (lambda q_pixel)``."""
        return self.probe_mrad * 1e-3 / (self.wavelength * self.q_pixel)

    @property
    def g1_px(self) -> float:
        """Unstrained first-order spot distance in stored pixels: ``2 / (sqrt(3) a q_pixel)``."""
        return 2.0 / (math.sqrt(3.0) * self.lattice_constant * self.q_pixel)


def electron_wavelength(energy_ev: float) -> float:
    """Relativistic de Broglie wavelength in Angstrom of an electron of kinetic energy ``energy_ev`` (eV)."""
    h, m, e, c = 6.62607015e-34, 9.1093837015e-31, 1.602176634e-19, 299792458.0
    ev = e * energy_ev
    return h / math.sqrt(2 * m * ev * (1 + ev / (2 * m * c * c))) * 1e10


# ---------------------------------------------------------------------------------------------------------------------
# Lattice and multislice
# ---------------------------------------------------------------------------------------------------------------------
def deformation(params: np.ndarray) -> np.ndarray:
    """Real-space deformation ``A = (I + eps) R(theta)`` of ``params = (exx, eyy, exy, theta)``: ``(2, 2)``."""
    exx, eyy, exy, th = (float(v) for v in params)
    c, s = math.cos(th), math.sin(th)
    return np.array([[1 + exx, exy], [exy, 1 + eyy]]) @ np.array([[c, -s], [s, c]])


def ws2_positions(params: np.ndarray, *, cell: float, lattice_constant: float = 3.153,
                  s_height: float = S_HEIGHT) -> tuple[list[str], np.ndarray]:
    """Atoms of a deformed 1H-WS2 monolayer cut to the square ``[0, cell)^2``.

    The unstrained lattice has a W atom at the cell centre; every atom position ``r`` (relative to the centre) is
    mapped to ``A r`` with ``A = deformation(params)``. The cell's z extent is ``3 * s_height``: S at
    ``s_height / 2`` and ``5 s_height / 2``, W at ``3 s_height / 2``.

    Returns:
      ``(symbols, positions)``: ``N`` chemical symbols and ``(N, 3)`` float64 positions (Angstrom, (x, y, z)).
    """
    a = float(lattice_constant)
    basis = np.array([[a, 0.0], [-a / 2, a * math.sqrt(3) / 2]])  # rows a1, a2
    to_cart = deformation(params) @ basis.T  # lattice coordinates -> deformed Cartesian offsets
    corners = (np.array([[0, 0], [1, 0], [0, 1], [1, 1]], float) - 0.5) * cell
    n = int(np.ceil(np.abs(corners @ np.linalg.inv(to_cart).T).max())) + 2
    i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    ij = np.stack([i.ravel(), j.ravel()], 1).astype(np.float64)
    symbols: list[str] = []
    chunks = []
    for sym, frac, z in (("S", (1 / 3, 2 / 3), 0.5), ("W", (0.0, 0.0), 1.5), ("S", (1 / 3, 2 / 3), 2.5)):
        xy = (ij + np.asarray(frac)) @ to_cart.T + cell / 2
        keep = np.all((xy >= 0) & (xy < cell), axis=1)
        xy = xy[keep]
        chunks.append(np.column_stack([xy, np.full(len(xy), z * s_height)]))
        symbols += [sym] * len(xy)
    return symbols, np.concatenate(chunks)


def probe_offsets(geometry: Geometry, seed: int) -> np.ndarray:
    """``(positions, 2)`` probe offsets from the cell centre (Angstrom), uniform in ``[-a/2, a/2]^2``, seeded."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xAB7E]))
    half = geometry.lattice_constant / 2
    return rng.uniform(-half, half, size=(geometry.positions, 2))


def bin_centred(fine: np.ndarray, *, oversample: int, detector: int) -> np.ndarray:
    """Sums ``oversample x oversample`` blocks of fft-shifted patterns, centred on the zero beam, and crops.

    Args:
      fine: ``(..., N, N)`` intensities with the zero beam at ``(N // 2, N // 2)``.
      oversample: odd block size.
      detector: output side.

    Returns:
      ``(..., detector, detector)`` float64; output pixel ``(detector // 2,) * 2`` is the block around the zero beam.
    """
    n = fine.shape[-1]
    start = n // 2 - oversample * (detector // 2) - oversample // 2
    stop = start + oversample * detector
    if start < 0 or stop > n or fine.shape[-2] != n:
        raise ValueError(f"patterns of shape {fine.shape[-2:]} are too small for {detector} px at oversample "
                         f"{oversample} (need {oversample * detector} fine pixels around the centre)")
    crop = np.asarray(fine[..., start:stop, start:stop], np.float64)
    shape = crop.shape[:-2] + (detector, oversample, detector, oversample)
    return crop.reshape(shape).sum(axis=(-3, -1))


def multislice_patterns(params: np.ndarray, geometry: Geometry, *, seed: int, log=print) -> tuple[np.ndarray, dict]:
    """Clean diffraction patterns of every grain by abTEM multislice.

    Args:
      params: ``(K, 4)`` grain parameters ``(exx, eyy, exy, theta)``.
      geometry: the multislice and detector geometry.
      seed: seeds the probe positions.
      log: progress printer.

    Returns:
      ``(patterns, info)``: ``(K, positions, detector, detector)`` float32 fractions of the probe per pixel, and a
      dict with the probe offsets, the slice count, atoms per cell, abTEM's version and the seconds spent.
    """
    import abtem
    import ase

    if abtem.__version__ != ABTEM_VERSION:
        log(f"warning: abTEM {abtem.__version__} found, the script was written for {ABTEM_VERSION}")
    abtem.config.set({"device": "cpu", "fft": "fftw", "dask.lazy": False, "precision": geometry.precision,
                      "diagnostics.progress_bar": False})
    offsets = probe_offsets(geometry, seed)
    scan = abtem.CustomScan(geometry.cell / 2 + offsets)
    probe = abtem.Probe(semiangle_cutoff=geometry.probe_mrad, energy=geometry.energy_ev)
    out = np.empty((len(params), geometry.positions, geometry.detector, geometry.detector), np.float32)
    t_start = time.perf_counter()
    n_atoms = []
    for k, p in enumerate(np.asarray(params, np.float64)):
        t0 = time.perf_counter()
        symbols, xyz = ws2_positions(p, cell=geometry.cell, lattice_constant=geometry.lattice_constant)
        atoms = ase.Atoms(symbols, positions=xyz, cell=[geometry.cell, geometry.cell, 3 * S_HEIGHT], pbc=True)
        potential = abtem.Potential(atoms, gpts=geometry.gpts, slice_thickness=S_HEIGHT, projection="infinite",
                                    parametrization="lobato").build(lazy=False)
        waves = probe.multislice(potential, scan=scan, lazy=False)
        fine = waves.diffraction_patterns(max_angle="full", parity="same")
        fine_arr = np.asarray(fine.array).reshape(geometry.positions, geometry.gpts, geometry.gpts)
        out[k] = bin_centred(fine_arr, oversample=geometry.oversample, detector=geometry.detector)
        n_atoms.append(len(atoms))
        log(f"grain {k}: {len(atoms)} atoms, {potential.array.shape[0]} slices, {geometry.positions} probes, "
            f"{time.perf_counter() - t0:.0f} s")
    info = dict(offsets=offsets, slices=int(potential.array.shape[0]), atoms=np.asarray(n_atoms),
                abtem_version=abtem.__version__, seconds=time.perf_counter() - t_start)
    return out, info


# ---------------------------------------------------------------------------------------------------------------------
# Scan assembly
# ---------------------------------------------------------------------------------------------------------------------
def grain_setup(*, scan: int, grains: int, seed: int, boundary_sigma: float = 0.7, max_strain: float = 0.02):
    """The simulator's grains and labels for a ``scan x scan`` polycrystal: ``(config, grains, labels)``."""
    from ccstae_jax.data.simulate import SimulationConfig, grain_labels, make_grains

    config = SimulationConfig(scan_shape=(scan, scan), n_grains=grains, seed=seed, boundary_sigma=boundary_sigma,
                              max_strain=max_strain, noise_level=None)
    g = make_grains(config)
    return config, g, grain_labels(config, grains=g)


def pattern_choice(scan_shape: tuple[int, int], n_positions: int, seed: int) -> np.ndarray:
    """Which probe-position pattern each scan position uses: ``(Rx, Ry)`` int, seeded."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    return rng.integers(0, n_positions, size=scan_shape)


def assemble_rows(patterns: np.ndarray, config, grains, choice: np.ndarray, *, noise: float | None):
    """Yields ``(row, data[row])`` of the scan: boundary-mixed per-grain patterns, then the noise.

    Args:
      patterns: ``(K, P, H, W)`` clean per-grain patterns (fractions of the probe per pixel).
      config: the `SimulationConfig` of the grains (scan shape, mixing width, noise constants, seed).
      grains: `Grains` of ``config``.
      choice: ``(Rx, Ry)`` pattern index per position (`pattern_choice`).
      noise: background weight ``w`` in [0, 1] (``0`` = scaled, noise-free), or ``None`` for the raw mixture.

    Yields:
      ``(r, (Ry, H, W) float32)``; with noise the values are ``intensity_scale``-scaled counts as in our simulator.
    """
    from ccstae_jax.data.noise import add_background_noise_numpy
    from ccstae_jax.data.simulate import _mixing_kernel, _mixing_weights

    k, n_pos = patterns.shape[:2]
    if k != config.n_grains:
        raise ValueError(f"patterns hold {k} grains, the grain map has {config.n_grains}")
    if choice.shape != config.scan_shape or choice.min() < 0 or choice.max() >= n_pos:
        raise ValueError(f"choice of shape {choice.shape} must be {config.scan_shape} with values in [0, {n_pos})")
    kernel = _mixing_kernel(config.boundary_sigma)
    rx, ry = config.scan_shape
    for r in range(rx):
        wts = _mixing_weights(grains.gmap, slice(r, r + 1), k, kernel)[0]  # (Ry, K)
        row = np.zeros((ry,) + patterns.shape[2:], np.float64)
        for c in range(ry):
            for g in np.flatnonzero(wts[c] > 0):
                row[c] += wts[c, g] * patterns[g, choice[r, c]]
        row = row.astype(np.float32)
        if noise is not None:
            rng = np.random.default_rng([config.seed, 1, int(r)])
            row = add_background_noise_numpy(row, noise, rng=rng, counts=config.counts, scale=config.intensity_scale,
                                             lorentz_width=config.lorentz_width)
        yield r, row


def write_scan(path, patterns: np.ndarray, *, config, grains, labels, geometry: Geometry, noise: float,
               info: dict, central_frac: float) -> Path:
    """Writes one scan in the ``ccstae-abtem-1`` layout (module docstring), atomically (temporary name, rename)."""
    import h5py

    from ccstae_jax.data.simulate import CONVENTIONS

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    choice = pattern_choice(config.scan_shape, patterns.shape[1], config.seed)
    rx, ry = config.scan_shape
    h, w = patterns.shape[2:]
    settings = dict(probe_mrad=geometry.probe_mrad, energy_ev=geometry.energy_ev, gpts=geometry.gpts,
                    oversample=geometry.oversample, cell_A=geometry.cell, sampling_A=geometry.sampling,
                    slices=int(info["slices"]), slice_thickness_A=S_HEIGHT, positions=geometry.positions,
                    probe_offsets_A=np.asarray(info["offsets"]).round(4).tolist(), precision=geometry.precision,
                    abtem_version=str(info["abtem_version"]), scan=list(config.scan_shape), grains=config.n_grains,
                    seed=config.seed, boundary_sigma=config.boundary_sigma, max_strain=config.max_strain,
                    noise_level=noise)
    source = (f"abTEM {info['abtem_version']} multislice of a strained, rotated 1H-WS2 monolayer per grain: "
              f"{geometry.energy_ev / 1e3:g} kV, probe semi-angle {geometry.probe_mrad:g} mrad, no aberrations, "
              f"Lobato potential, {int(info['slices'])} slices of {S_HEIGHT} A, {geometry.cell:g} A square "
              f"non-periodic cell on {geometry.gpts}^2 points, diffraction summed {geometry.oversample}x"
              f"{geometry.oversample} to {geometry.q_pixel} 1/A per pixel; {geometry.positions} probe positions "
              f"per grain, Voronoi scan with Gaussian boundary mixing (sigma {config.boundary_sigma} scan px).")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w", track_order=True) as f:
            dset = f.create_dataset("data", shape=(rx, ry, h, w), dtype=np.float32, chunks=(1, ry, h, w),
                                    track_times=False)
            group = f.create_group("labels")
            for name, arr in labels.items():
                group.create_dataset(name, data=arr, track_times=False)
            g = f.create_group("grains")
            g.create_dataset("params", data=grains.params, track_times=False)
            g.create_dataset("seeds", data=grains.seeds, track_times=False)
            g.attrs["columns"] = "strain_xx, strain_yy, shear_xy, rotation_rad"
            a = f.attrs
            a["format"] = FORMAT
            a["conventions"] = CONVENTIONS
            a["source"] = source
            a["reference_region"] = np.asarray(config.reference_bounds, np.int64)
            a["noise_level"] = float(noise)
            a["noise_applied"] = True
            a["seed"] = config.seed
            a["q_pixel"] = geometry.q_pixel
            a["disk_radius"] = geometry.disk_radius
            a["detector_size"] = geometry.detector
            a["crop"] = np.asarray((0, geometry.detector), np.int64)
            a["pattern_centre"] = np.asarray((geometry.detector // 2,) * 2, np.int64)
            a["lattice_constant"] = geometry.lattice_constant
            a["central_frac"] = float(central_frac)
            a["lattice_symmetry"] = 6
            a["counts"] = config.counts
            a["intensity_scale"] = config.intensity_scale
            a["lorentz_width"] = config.lorentz_width
            a["config"] = json.dumps(settings, sort_keys=True)
            for r, row in assemble_rows(patterns, config, grains, choice, noise=noise):
                dset[r] = row
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Physics check: disk centres -> affine -> strain
# ---------------------------------------------------------------------------------------------------------------------
#: Disks larger than this radius (px) are located by their edge (`disk_centre`), smaller ones by their centroid.
EDGE_FIT_ABOVE_PX = 8.0


def disk_centre(pattern: np.ndarray, guess, radius: float, *, method: str | None = None) -> tuple[np.ndarray, float]:
    """Sub-pixel centre and radius of one diffraction disk.

    Two estimators, both indifferent to the disk's edge profile and to its sub-pixel position:

    * ``"centroid"`` (small disks): the iterated intensity centroid over the pixels within ``radius + 3`` of the
      estimate, after subtracting the background ``b``, the median of the pixels ``radius + 2 < d <= radius + 4``
      away. Exact for a disk with a flat or centrosymmetric interior on a flat background.
    * ``"edge"`` (large disks, whose interiors carry a few per cent of dynamical contrast that would pull a
      centroid): along 180 rays from the estimate, the radius where the (bilinearly interpolated) profile crosses
      half-way between its mean over ``[rho - 4, rho - 2.5]`` and over ``[rho + 2.5, rho + 4]``; a circle fitted to
      those edge points (algebraic least squares), three times.

    Args:
      pattern: ``(H, W)`` intensities.
      guess: ``(row, col)`` start, within about 1 px of the disk centre (`disk_peaks`).
      radius: nominal disk radius (px).
      method: ``"centroid"`` or ``"edge"``; default ``"edge"`` when ``radius > EDGE_FIT_ABOVE_PX``.

    Returns:
      ``((row, col), rho)``: for ``"centroid"`` ``rho = sqrt(area / pi)`` with the area ``sum(clip((I - b) / m, 0,
      1))`` (``m`` the median of ``I - b`` within ``radius - 1.5``); for ``"edge"`` the fitted circle's radius.

    Raises:
      ValueError: no disk (no positive level, fewer than half the rays crossing), or the centre moved more than
        ``radius / 2 + 2`` px from ``guess``.
    """
    method = method or ("edge" if radius > EDGE_FIT_ABOVE_PX else "centroid")
    if method not in ("centroid", "edge"):
        raise ValueError(f"method={method!r}: expected 'centroid' or 'edge'")
    guess = np.asarray(guess, np.float64)
    centre, rho = (_edge_circle if method == "edge" else _centroid)(np.asarray(pattern, np.float64), guess, radius)
    if np.hypot(*(centre - guess)) > radius / 2 + 2:
        raise ValueError(f"disk {method} from {tuple(guess.round(1))} wandered to {tuple(centre.round(1))}")
    return centre, rho


def _centroid(pattern, guess, radius, iterations: int = 20):
    centre = guess.copy()
    half = int(math.ceil(radius)) + 5
    for _ in range(iterations):
        r0, c0 = (int(round(v)) for v in centre)
        r_lo, c_lo = max(0, r0 - half), max(0, c0 - half)
        win = pattern[r_lo: r0 + half + 1, c_lo: c0 + half + 1]
        rows, cols = np.mgrid[r_lo: r_lo + win.shape[0], c_lo: c_lo + win.shape[1]].astype(np.float64)
        dist = np.hypot(rows - centre[0], cols - centre[1])
        ring = (dist > radius + 2) & (dist <= radius + 4)
        j = win - np.median(win[ring])
        level = float(np.median(j[dist < max(radius - 1.5, 1.0)]))
        if not level > 0:
            raise ValueError(f"no disk near {tuple(guess.round(1))}: disk level {level:.3g} above background")
        use = dist <= radius + 3
        new = np.array([np.sum(j[use] * rows[use]), np.sum(j[use] * cols[use])]) / np.sum(j[use])
        if np.hypot(*(new - guess)) > radius / 2 + 2:
            break
        done = np.hypot(*(new - centre)) < 1e-9
        centre = new
        if done:
            break
    return new, math.sqrt(float(np.sum(np.clip(j[use] / level, 0.0, 1.0))) / math.pi)


def _edge_circle(pattern, guess, radius, rays: int = 180, iterations: int = 3):
    from scipy.ndimage import map_coordinates

    centre, rho = guess.copy(), float(radius)
    phi = np.linspace(0.0, 2 * np.pi, rays, endpoint=False)
    steps = np.arange(-4.0, 4.0 + 1e-9, 0.05)
    for _ in range(iterations):
        rad = rho + steps
        pts = centre[:, None, None] + np.stack([np.cos(phi)[:, None] * rad, np.sin(phi)[:, None] * rad])
        prof = map_coordinates(pattern, pts.reshape(2, -1), order=1, mode="nearest").reshape(rays, len(rad))
        half = 0.5 * (prof[:, steps < -2.5].mean(1) + prof[:, steps > 2.5].mean(1))
        edge_phi, edge_r = [], []
        for i in range(rays):
            down = np.flatnonzero((prof[i, :-1] >= half[i]) & (prof[i, 1:] < half[i]))
            if down.size == 0:
                continue
            k = down[np.argmin(np.abs(steps[down]))]
            t = (prof[i, k] - half[i]) / (prof[i, k] - prof[i, k + 1])
            edge_phi.append(phi[i])
            edge_r.append(rad[k] + t * (rad[k + 1] - rad[k]))
        if len(edge_r) < rays // 2:
            raise ValueError(f"no disk edge around {tuple(guess.round(1))}: {len(edge_r)} of {rays} rays cross it")
        x = centre[0] + np.cos(edge_phi) * np.asarray(edge_r)
        y = centre[1] + np.sin(edge_phi) * np.asarray(edge_r)
        sol, *_ = np.linalg.lstsq(np.column_stack([x, y, np.ones_like(x)]), x * x + y * y, rcond=None)
        centre = sol[:2] / 2
        rho = math.sqrt(sol[2] + centre @ centre)
    return centre, rho


def disk_peaks(pattern: np.ndarray, radius: float) -> np.ndarray:
    """The pattern correlated with a flat disk of ``radius`` px (FFT, zero padded): ``(H, W)``, peaked at the
    disk centres (to about a pixel)."""
    h, w = pattern.shape
    n = int(math.ceil(radius)) + 1
    yy, xx = np.mgrid[-n: n + 1, -n: n + 1]
    kernel = (np.hypot(yy, xx) <= radius).astype(np.float64)
    shape = (h + 2 * n + 1, w + 2 * n + 1)
    f = np.fft.rfft2(np.asarray(pattern, np.float64), shape) * np.fft.rfft2(kernel, shape)
    return np.fft.irfft2(f, shape)[n: n + h, n: n + w]


def first_order_g(geometry: Geometry) -> np.ndarray:
    """The six unstrained first-order vectors in stored pixels, ``(6, 2)`` (qx, qy), sorted by angle."""
    from ccstae_jax.data.simulate import reciprocal_lattice

    g, _ = reciprocal_lattice(lattice_constant=geometry.lattice_constant,
                              k_max=1.01 * 2 / (math.sqrt(3) * geometry.lattice_constant))
    g = g / geometry.q_pixel
    return g[np.argsort(np.arctan2(g[:, 1], g[:, 0]))]


def find_first_order(pattern: np.ndarray, geometry: Geometry):
    """Measures the central disk and the six first-order disks of a pattern, without knowing the grain.

    The central disk is the peak of `disk_peaks` within ``2 * radius`` of the pattern centre. The first-order
    spots start from the unstrained hexagon of radius ``|g1|`` around it, turned (0.25 degree steps over 60
    degrees) to the largest sum of `disk_peaks` of the pattern without its central disk at its six corners; each
    corner moves to the peak within 3 px and is measured by `disk_centre`.

    Args:
      pattern: ``(H, W)`` intensities.
      geometry: the detector geometry (disk radius, ``|g1|``, centre).

    Returns:
      ``(centre, spots, radii)``: ``(2,)`` central-disk centre (px); ``(6, 2)`` first-order centres relative to it,
      sorted by angle; ``(7,)`` measured radii (central disk first).
    """
    from scipy.ndimage import map_coordinates

    r = geometry.disk_radius
    corr = disk_peaks(pattern, r)
    rows, cols = np.mgrid[: pattern.shape[0], : pattern.shape[1]]
    mid = geometry.detector // 2
    near = np.hypot(rows - mid, cols - mid) <= 2 * r
    start = np.unravel_index(np.argmax(np.where(near, corr, -np.inf)), pattern.shape)
    centre, rho0 = disk_centre(pattern, start, r)
    dist = np.hypot(rows - centre[0], cols - centre[1])
    corr = disk_peaks(np.where(dist <= rho0 + 2, 0.0, pattern), r)  # the bright central disk masked
    g = first_order_g(geometry)
    phi = np.deg2rad(np.arange(0.0, 60.0, 0.25))
    turned = np.einsum("pij,sj->psi", np.stack([[np.cos(phi), -np.sin(phi)], [np.sin(phi), np.cos(phi)]])
                       .transpose(2, 0, 1), g) + centre  # (angles, 6, 2)
    score = map_coordinates(corr, turned.reshape(-1, 2).T, order=1, cval=-np.inf).reshape(len(phi), 6).sum(1)
    guesses = turned[int(np.argmax(score))]
    fits = []
    for p in guesses:
        r0, c0 = (int(round(v)) for v in p)
        box = corr[max(0, r0 - 3): r0 + 4, max(0, c0 - 3): c0 + 4]
        if box.size == 0:
            raise ValueError(f"first-order spot near {tuple(p.round(1))} lies outside the pattern")
        i, j = np.unravel_index(np.argmax(box), box.shape)
        fits.append(disk_centre(pattern, (max(0, r0 - 3) + i, max(0, c0 - 3) + j), r))
    spots = np.array([f[0] for f in fits]) - centre
    order = np.argsort(np.arctan2(spots[:, 1], spots[:, 0]))
    radii = np.array([rho0] + [fits[i][1] for i in order])
    return centre, spots[order], radii


def strain_from_spots(spots: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, float]:
    """Recovers ``(exx, eyy, exy, theta)`` from six measured first-order spots.

    Least squares ``q_i = M g_(i+s) + t`` over the six cyclic matchings ``s`` of the angle-sorted lists (the best
    residual wins), then ``A = M^-T`` and the left polar decomposition ``A = (I + eps) R(theta)``. ``theta`` is
    defined modulo 60 degrees (the lattice's symmetry).

    Args:
      spots: ``(6, 2)`` spot positions (px, (qx, qy)) sorted by angle.
      g: ``(6, 2)`` unstrained vectors sorted by angle (`first_order_g`).

    Returns:
      ``(params, rms)``: ``(4,)`` float64 and the rms fit residual in px.
    """
    best = None
    design = np.column_stack([np.zeros(6), np.zeros(6), np.ones(6)])
    for s in range(6):
        gs = np.roll(g, -s, axis=0)
        design[:, :2] = gs
        sol, *_ = np.linalg.lstsq(design, spots, rcond=None)  # spots = design @ sol: sol = [M^T; t]
        res = spots - design @ sol
        rms = float(np.sqrt(np.mean(res**2)))
        if best is None or rms < best[1]:
            best = (sol[:2].T.copy(), rms)
    m, rms = best
    a = np.linalg.inv(m).T
    w, sv, vt = np.linalg.svd(a)
    u = w @ vt
    if np.linalg.det(u) < 0:
        raise ValueError("the fitted spot transform flips handedness; the spots were matched wrongly")
    p = w @ np.diag(sv) @ w.T
    theta = math.atan2(u[1, 0], u[0, 0])
    return np.array([p[0, 0] - 1, p[1, 1] - 1, 0.5 * (p[0, 1] + p[1, 0]), theta]), rms


def wrap60(angle):
    """Angle difference wrapped to ``[-30, 30)`` degrees (in radians)."""
    return (np.asarray(angle) + math.pi / 6) % (math.pi / 3) - math.pi / 6


def physics_check(patterns: np.ndarray, params: np.ndarray, geometry: Geometry) -> dict:
    """Recovers every grain's ``(exx, eyy, exy, theta)`` from its clean patterns and compares with the labels.

    Args:
      patterns: ``(K, P, H, W)`` clean per-grain patterns.
      params: ``(K, 4)`` labels.
      geometry: detector geometry.

    Returns:
      dict with ``recovered`` ``(K, P, 4)``, ``errors`` ``(K, P, 4)`` (theta wrapped modulo 60 degrees, radians),
      ``max_abs_error`` per quantity, ``rms_px`` ``(K, P)``, ``radius_px`` (central-disk radius, mean),
      ``g1_px_measured`` (mean first-order distance in the reference grain 0), ``centre_px`` (mean central-disk
      centre), ``off_disk_fraction`` (largest, over patterns, fraction of the intensity farther than
      ``radius + 3`` px from every spot the labels predict up to ``|q| < detector / 2``).
    """
    from ccstae_jax.data.simulate import reciprocal_lattice

    g = first_order_g(geometry)
    k, n = patterns.shape[:2]
    rec = np.zeros((k, n, 4))
    rms = np.zeros((k, n))
    radii, centres, g1 = [], [], []
    all_g, _ = reciprocal_lattice(lattice_constant=geometry.lattice_constant, k_max=2 * geometry.q_pixel *
                                  geometry.detector)
    rows, cols = np.mgrid[: geometry.detector, : geometry.detector] - geometry.detector // 2
    off = 0.0
    for i in range(k):
        a_t = np.linalg.inv(deformation(params[i])).T
        spots_all = np.vstack([[0.0, 0.0], all_g / geometry.q_pixel @ a_t.T])
        near = np.zeros(rows.shape, bool)
        for q in spots_all:
            near |= np.hypot(rows - q[0], cols - q[1]) <= geometry.disk_radius + 3
        for j in range(n):
            centre, spots, rad = find_first_order(patterns[i, j], geometry)
            rec[i, j], rms[i, j] = strain_from_spots(spots, g)
            radii.append(rad[0])
            centres.append(centre)
            if i == 0:
                g1.append(np.linalg.norm(spots, axis=1).mean())
            off = max(off, float(patterns[i, j][~near].sum() / patterns[i, j].sum()))
    err = rec - params[:, None, :]
    err[..., 3] = wrap60(err[..., 3])
    names = ("strain_xx", "strain_yy", "shear_xy", "rotation")
    return dict(recovered=rec, errors=err, rms_px=rms,
                max_abs_error={nm: float(np.abs(err[..., q]).max()) for q, nm in enumerate(names)},
                radius_px=float(np.mean(radii)), centre_px=np.mean(centres, axis=0),
                g1_px_measured=float(np.mean(g1)), off_disk_fraction=off)


def beam_fractions(pattern: np.ndarray, geometry: Geometry) -> tuple[float, float]:
    """Fractions of a reference-grain pattern's intensity within ``disk_radius + 1`` px of the pattern centre (the
    central disk) and of the six unstrained first-order positions (all six together)."""
    rows, cols = np.mgrid[: pattern.shape[0], : pattern.shape[1]] - geometry.detector // 2
    total = float(pattern.sum())

    def near(q):
        return np.hypot(rows - q[0], cols - q[1]) <= geometry.disk_radius + 1

    first = np.any([near(q) for q in first_order_g(geometry)], axis=0)
    return float(pattern[near((0.0, 0.0))].sum()) / total, float(pattern[first].sum()) / total


def describe_file(path, geometry: Geometry) -> dict:
    """Disk radius, first-order distance and strain of the mean pattern over a file's reference region."""
    import h5py

    with h5py.File(path, "r") as f:
        r0, r1, c0, c1 = (int(v) for v in f.attrs["reference_region"])
        mean = f["data"][r0:r1, c0:c1].mean(axis=(0, 1))
    centre, spots, radii = find_first_order(mean, geometry)
    params, rms = strain_from_spots(spots, first_order_g(geometry))
    return dict(centre=centre, radius_px=float(radii[0]), spot_radius_px=float(radii[1:].mean()),
                g1_px=float(np.linalg.norm(spots, axis=1).mean()), params=params, rms_px=rms)


# ---------------------------------------------------------------------------------------------------------------------
# Cache and command line
# ---------------------------------------------------------------------------------------------------------------------
def _cache_meta(geometry: Geometry, params: np.ndarray, seed: int) -> str:
    return json.dumps(dict(geometry=dataclasses.asdict(geometry), params=np.asarray(params).round(12).tolist(),
                           seed=seed), sort_keys=True)


def load_or_compute(cache: Path, geometry: Geometry, params: np.ndarray, *, seed: int, recompute: bool = False,
                    log=print) -> tuple[np.ndarray, dict]:
    """The clean per-grain patterns from ``cache`` if it was made with the same geometry, grains and seed; else
    computes them (`multislice_patterns`) and writes the cache (atomically)."""
    meta = _cache_meta(geometry, params, seed)
    if cache.exists() and not recompute:
        with np.load(cache, allow_pickle=False) as z:
            if str(z["meta"]) == meta:
                log(f"using cached patterns {cache}")
                info = json.loads(str(z["info"]))
                info["offsets"] = np.asarray(info["offsets"])
                return z["patterns"], info
        log(f"{cache} was made with other settings; recomputing")
    patterns, info = multislice_patterns(params, geometry, seed=seed, log=log)
    info_json = json.dumps({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in info.items()})
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}.npz")
    np.savez_compressed(tmp, patterns=patterns, meta=np.array(meta), info=np.array(info_json))
    os.replace(tmp, cache)
    log(f"wrote {cache} ({info['seconds']:.0f} s of multislice)")
    return patterns, info


def _noise_name(w: float) -> str:
    pct = 100 * w
    return f"{pct:.0f}" if abs(pct - round(pct)) < 1e-9 else f"{pct:g}"


def main(argv=None) -> int:
    from ccstae_jax.data.noise import parse_noise_level

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", nargs="?", help="output .h5; '{noise}' in the name becomes the noise level in percent")
    p.add_argument("--probe-mrad", type=float, default=3.0, help="probe aperture semi-angle (mrad)")
    p.add_argument("--noise", nargs="+", default=["0"],
                   help="noise level(s): fractions (0.25) or percentages (25, '25%%'); default 0")
    p.add_argument("--scan", type=int, default=24, help="scan side (positions)")
    p.add_argument("--grains", type=int, default=10, help="Voronoi grains (grain 0 = reference)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--positions", type=int, default=4, help="probe positions simulated per grain")
    p.add_argument("--boundary-sigma", type=float, default=0.7, help="boundary mixing width (scan px)")
    p.add_argument("--gpts", type=int, default=3072, help="multislice grid points per side")
    p.add_argument("--oversample", type=int, default=3, help="fine reciprocal pixels per stored pixel (odd)")
    p.add_argument("--precision", choices=("float32", "float64"), default="float32")
    p.add_argument("--cache", help="clean-pattern cache .npz (default: beside the output)")
    p.add_argument("--recompute", action="store_true", help="ignore an existing cache")
    p.add_argument("--check", action="store_true", help="measure every grain's disks and print the errors")
    a = p.parse_args(argv)
    if a.out is None and not a.check:
        p.error("give an output file, or --check")
    try:
        levels = [parse_noise_level(v) for v in a.noise]
        geometry = Geometry(probe_mrad=a.probe_mrad, gpts=a.gpts, oversample=a.oversample, positions=a.positions,
                            precision=a.precision)
    except ValueError as err:
        p.error(str(err))
    if a.out is not None and len(levels) > 1 and "{noise}" not in a.out:
        p.error(f"several noise levels need '{{noise}}' in the output name, got {a.out!r}")
    if a.scan < 1 or a.grains < 1:
        p.error(f"--scan {a.scan} and --grains {a.grains} must be >= 1")

    config, grains, labels = grain_setup(scan=a.scan, grains=a.grains, seed=a.seed, boundary_sigma=a.boundary_sigma)
    folder = Path(a.out).parent if a.out else Path(".")
    cache = Path(a.cache) if a.cache else folder / f"abtem_patterns_{a.probe_mrad:g}mrad_{a.grains}g_seed{a.seed}.npz"
    print(f"cell {geometry.cell:g} A on {geometry.gpts}^2 ({geometry.sampling:.4f} A), probe {geometry.probe_mrad:g} "
          f"mrad: nominal disk radius {geometry.disk_radius:.3f} px, |g1| {geometry.g1_px:.3f} px")
    patterns, info = load_or_compute(cache, geometry, grains.params, seed=a.seed, recompute=a.recompute)

    if a.check:
        res = physics_check(patterns, grains.params, geometry)
        print("grain  exx_label  eyy_label  exy_label  theta_label_deg | max |err| exx eyy exy theta_deg | rms px")
        for i, prm in enumerate(grains.params):
            e = np.abs(res["errors"][i]).max(axis=0)
            print(f"{i:5d} {prm[0]:+10.5f} {prm[1]:+10.5f} {prm[2]:+10.5f} {math.degrees(prm[3]):16.3f} | "
                  f"{e[0]:.1e} {e[1]:.1e} {e[2]:.1e} {math.degrees(e[3]):.1e} | {res['rms_px'][i].max():.4f}")
        m = res["max_abs_error"]
        print(f"max |error| over {patterns.shape[0]} grains x {patterns.shape[1]} probes: exx {m['strain_xx']:.2e}, "
              f"eyy {m['strain_yy']:.2e}, exy {m['shear_xy']:.2e}, theta {math.degrees(m['rotation']):.2e} deg")
        print(f"central disk: centre ({res['centre_px'][0]:.4f}, {res['centre_px'][1]:.4f}) px, radius "
              f"{res['radius_px']:.3f} px (nominal {geometry.disk_radius:.3f}); reference |g1| "
              f"{res['g1_px_measured']:.4f} px (nominal {geometry.g1_px:.4f}); intensity off the disks "
              f"{res['off_disk_fraction']:.1e}")

    if a.out is None:
        return 0
    central, first = beam_fractions(patterns[0].mean(axis=0), geometry)
    print(f"reference grain: central disk {central:.4f} of the intensity, the six first-order disks {first:.2e}")
    for w in levels:
        out = Path(a.out.replace("{noise}", _noise_name(w)))
        t0 = time.perf_counter()
        write_scan(out, patterns, config=config, grains=grains, labels=labels, geometry=geometry, noise=w,
                   info=info, central_frac=central)
        print(f"wrote {out} ({time.perf_counter() - t0:.1f} s)")
        if w == 0:
            d = describe_file(out, geometry)
            exx, eyy, exy, theta = d["params"]
            print(f"  its reference-region mean pattern: disk radius {d['radius_px']:.3f} px (first-order "
                  f"{d['spot_radius_px']:.3f}), |g1| {d['g1_px']:.3f} px, strain ({exx:+.1e}, {eyy:+.1e}, "
                  f"{exy:+.1e}), rotation {math.degrees(wrap60(theta)):+.3f} deg")
        else:
            px = math.pi * geometry.disk_radius**2
            print(f"  noise {w:.0%}: a first-order disk gets {config.counts * (1 - w) * first / 6:.0f} electrons "
                  f"a pattern ({config.counts * (1 - w) * first / 6 / px:.2g} per pixel)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
