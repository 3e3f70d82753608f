"""Built-in polycrystalline 4D-STEM simulator (kinematic, JAX rendering, streamed to HDF5).

By default a Voronoi polycrystal of monolayer WS2 seen down [0001]. Each grain ``k`` carries a lab-frame
strain and an in-plane rotation; its real-space lattice is deformed by ``A = (I + eps) R(theta)`` (left
polar form) so the spots of its pattern sit at ``A^-T g = (I + eps)^-1 R(theta) g``. One pattern is
rendered per grain (convergent-beam disks with a soft edge, kinematic intensities, a strong central
beam), then patterns are mixed at grain boundaries with Gaussian weights and the Auto4DSTEM noise is
added, batch by batch (rows of the scan), so a 256 x 256 scan never sits in memory.

Options for the variety of real data (all off by default, which leaves the output unchanged): square
and rectangular lattices (`LATTICES`); several phases per scan (heterostructures, `PHASES`), labelled
relative to the reference phase; vacuum around a flake-shaped specimen; an elliptical projector
distortion of the whole pattern; and descan, a zero beam that moves linearly with the probe position
(then every position is rendered with its own sub-pixel shift instead of once per grain).

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
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import h5py
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ccstae_jax import atomic, conventions
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
    "LATTICES",
    "PHASES",
    "parse_phases",
    "reciprocal_lattice",
    "kinematic_intensities",
    "one_atom_intensities",
    "spot_table",
    "deformation_matrix",
    "spot_transform",
    "distortion_matrix",
    "descan_shifts",
    "render_patterns",
    "pattern_function",
    "make_grains",
    "grain_labels",
    "simulate_scan",
    "simulate_to_hdf5",
]

FORMAT = "ccstae-sim-1"

CONVENTIONS = (
    f"{conventions.FRAME}. {conventions.STRAIN}, radians. A real-space lattice deformation A = (I + eps) R(theta), "
    "R(theta) = [[cos, -sin], [sin, cos]], puts the reciprocal (diffraction) spots at A^{-T} g (g = unstrained "
    "reciprocal vectors, pixel units relative to the pattern centre, (qx, qy) = (row, col)). (Matches py4DSTEM's "
    "frame.)"
)

# Benchmark geometry (data.md section 2): 256 px detector at 0.0096 1/A per pixel, crop [28:228].
_BENCH_DETECTOR = 256
_BENCH_Q_PIXEL = 0.0096
_BENCH_CROP_START = 28
_BENCH_REFERENCE = (30, 60, 10, 40)
_BENCH_SCAN = 256
_Z_W, _Z_S = 74.0, 16.0
_Z_GENERIC = 42.0  # the one atom per cell of the square and rectangular lattices

#: Lattices of the simulator -> their rotational symmetry n (rotations are defined modulo 2 pi / n).
#: Real-space bases: hexagonal a1 = a (1, 0), a2 = a (-1/2, sqrt(3)/2); square a1 = a (1, 0), a2 = a (0, 1);
#: rectangular a1 = a (1, 0), a2 = b (0, 1) with b = lattice_aspect * a.
LATTICES: dict[str, int] = {"hexagonal": 6, "square": 4, "rectangular": 2}

#: Built-in phases (1H transition-metal dichalcogenides): name -> (a in Angstrom, Z of the metal, Z of the
#: chalcogen). The Z enter the kinematic intensities of the hexagonal lattice.
PHASES: dict[str, tuple[float, float, float]] = {
    "WS2": (3.153, 74.0, 16.0),
    "WSe2": (3.282, 74.0, 34.0),
    "MoS2": (3.160, 42.0, 16.0),
    "MoSe2": (3.288, 42.0, 34.0),
}
_PHASE_NAMES = {name.lower(): name for name in PHASES}
# Fields of SimulationConfig written to the JSON configuration only when they differ from their defaults.
_SCENE_FIELDS = ("lattice", "lattice_aspect", "lattice_angle", "ellipticity", "ellipticity_angle", "descan", "phases",
                 "phase_fractions", "vacuum")


def _phase_error(spec) -> ValueError:
    return ValueError(
        f"phases: unknown phase {spec!r}; built-in: {', '.join(PHASES)} (or NAME:A with a lattice constant "
        "A in Angstrom)"
    )


def _parse_phase(spec) -> tuple[str, float]:
    """One phase: a built-in name, ``"NAME:A"`` or a ``(name, a)`` pair -> ``(name, a)``."""
    if isinstance(spec, str):
        name, sep, value = spec.strip().partition(":")
        name = name.strip()
        if not sep:
            if name.lower() not in _PHASE_NAMES:
                raise _phase_error(spec)
            canon = _PHASE_NAMES[name.lower()]
            return canon, PHASES[canon][0]
        try:
            a = float(value)
        except ValueError:
            raise ValueError(f"phases: {spec!r} has lattice constant {value.strip()!r}; expected a number "
                             "in Angstrom") from None
    elif isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str):
        name = spec[0].strip()
        try:
            a = float(spec[1])
        except (TypeError, ValueError):
            raise ValueError(f"phases: {spec!r} has lattice constant {spec[1]!r}; expected a number") from None
    else:
        raise ValueError(f"phases: entry {spec!r}; expected a name, 'NAME:A' or a (name, a) pair")
    if not name:
        raise ValueError(f"phases: entry {spec!r} has an empty name")
    if not (a > 0 and math.isfinite(a)):
        raise ValueError(f"phases: {name} has lattice constant {a!r}; expected a positive number of Angstrom")
    return _PHASE_NAMES.get(name.lower(), name), a


def parse_phases(phases) -> tuple[tuple[str, float], ...]:
    """Parses phases into ``((name, a), ...)``, ``a`` in Angstrom.

    Accepts a comma-separated string (``"WS2,WSe2"``, as typed on the command line) or a sequence whose
    entries are built-in names (`PHASES`, case-insensitive), ``"NAME:A"`` strings (a custom lattice
    constant; a built-in name keeps its atoms, another name gets WS2's) or ``(name, a)`` pairs.

    Raises:
      ValueError: an unknown name without a lattice constant, a bad number, or no phase at all.
    """
    if isinstance(phases, str):
        phases = [p for p in phases.split(",") if p.strip()]
    try:
        out = tuple(_parse_phase(p) for p in phases)
    except TypeError:
        raise ValueError(f"phases={phases!r}: expected names like 'WS2,WSe2' or (name, a) pairs") from None
    if not out:
        raise ValueError("phases: empty; give at least one phase (e.g. 'WS2')")
    return out


def _phase_atoms(name: str) -> tuple[float, float]:
    """``(Z metal, Z chalcogen)`` of a phase; a name outside `PHASES` scatters like WS2."""
    _, zm, zx = PHASES.get(_PHASE_NAMES.get(name.lower(), ""), PHASES["WS2"])
    return zm, zx


def _parse_descan(descan) -> tuple[float, float, float, float]:
    try:
        values = np.asarray(descan, dtype=np.float64).ravel() if not isinstance(descan, str) else np.array([np.nan])
    except (TypeError, ValueError):
        values = np.array([np.nan])
    if values.size == 1:
        values = np.array([values[0], 0.0, 0.0, values[0]])
    if values.size != 4 or not np.all(np.isfinite(values)):
        raise ValueError(f"descan={descan!r}: expected one number (px) or 4 finite numbers J = (j00, j01, j10, j11)")
    return tuple(float(v) for v in values)


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
      lattice: ``"hexagonal"`` (1H-WS2 structure factors), ``"square"`` or ``"rectangular"`` (one atom
        per cell, ``f(s) = Z / (s^2 + s0^2)`` with Z = 42, and the Debye-Waller factor); see `LATTICES`.
        ``lattice_constant`` is ``a``, the length of ``a1`` along +x.
      lattice_aspect: ``b / a`` of the rectangular lattice (at least 5 % away from 1; unused otherwise).
      lattice_angle: orientation of the reference lattice on the detector, radians counter-clockwise from +Qx
        toward +Qy (0: ``a1`` along +Qx). Every grain turns with it; the labels' rotations stay relative to the
        reference lattice and their strains are in the detector's frame, as always. At 0 the first-order spots of a
        hexagonal or square lattice lie on the detector's axes, where the pixel grid samples them alike.
      ellipticity: projector distortion ``e`` (0.02 = 2 %) in [0, 0.5): a detector position is
        ``q' = c + D (q - c)``, ``D = R(angle) diag(1 + e/2, 1 - e/2) R(-angle)``, ``c`` the zero beam; the
        whole pattern (spots, disks, central beam) is rendered exactly through ``D`` (disks become
        ellipses; intensities divided by ``det D`` so totals are kept). Labels stay the specimen's.
      ellipticity_angle: direction of the major stretch, radians counter-clockwise from +Qx toward +Qy.
      descan: ``J`` row-major ``(j00, j01, j10, j11)`` in detector pixels (or one number ``d`` for
        ``J = d I``): the zero beam of scan position ``(r, c)`` (the whole pattern and the noise glow)
        moves by ``J @ (r / (Rx - 1) - 1/2, c / (Ry - 1) - 1/2)`` along (Qx, Qy). Non-zero ``J`` renders
        every position with its own sub-pixel shift (slower than the once-per-grain default).
      phases: ``((name, a), ...)`` (or names / ``"NAME:A"`` strings, see `parse_phases`); ``None`` = one
        phase of lattice constant ``lattice_constant``. Grain 0 (the reference) is phase 0, the others
        draw a phase from the seed. Labels are relative to the unstrained lattice of phase 0: a grain of
        phase ``p`` with strain ``eps`` is labelled ``(a_p / a_0)(I + eps) - I``. ``lattice_constant``
        must then be left at its default or equal ``a_0``.
      phase_fractions: relative odds of each phase for grains 1..K-1 (``None`` = equal odds).
      vacuum: fraction of scan positions, in [0, 0.9], outside the specimen: a flake with a smooth random
        boundary that always contains the reference region (grown by the mixing radius, which caps the
        fraction on tiny scans). Vacuum patterns hold only the central beam (the whole probe), mixed with
        the specimen at the flake edge like grains at a boundary; their strain labels are NaN.
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
    lattice: str = "hexagonal"
    lattice_aspect: float = 1.25
    lattice_angle: float = 0.0
    ellipticity: float = 0.0
    ellipticity_angle: float = 0.0
    descan: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    phases: tuple[tuple[str, float], ...] | None = None
    phase_fractions: tuple[float, ...] | None = None
    vacuum: float = 0.0

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
        self._check_scene(fix)

    def _check_scene(self, fix):
        lattice = str(self.lattice).strip().lower()
        if lattice not in LATTICES:
            raise ValueError(f"lattice={self.lattice!r}: expected one of {', '.join(LATTICES)}")
        fix("lattice", lattice)
        aspect = _finite(self.lattice_aspect, "lattice_aspect")
        if not aspect > 0:
            raise ValueError(f"lattice_aspect={self.lattice_aspect!r} must be > 0 (b / a)")
        if lattice == "rectangular" and abs(aspect - 1.0) < 0.05:
            raise ValueError(f"lattice_aspect={self.lattice_aspect!r}: a rectangular lattice needs b / a at least "
                             "5 % away from 1 (use lattice='square')")
        fix("lattice_aspect", aspect)
        fix("lattice_angle", _finite(self.lattice_angle, "lattice_angle"))
        e = _finite(self.ellipticity, "ellipticity")
        if not 0.0 <= e < 0.5:
            raise ValueError(f"ellipticity={self.ellipticity!r} must be in [0, 0.5) (0.02 = 2 % stretch)")
        fix("ellipticity", e)
        fix("ellipticity_angle", _finite(self.ellipticity_angle, "ellipticity_angle"))
        fix("descan", _parse_descan(self.descan))
        if self.phases is not None:
            phases = parse_phases(self.phases)
            fix("phases", phases)
            a0 = phases[0][1]
            default_a = type(self).__dataclass_fields__["lattice_constant"].default
            if self.lattice_constant not in (default_a, a0):
                raise ValueError(f"lattice_constant={self.lattice_constant!r} conflicts with the reference phase "
                                 f"{phases[0][0]} (a = {a0}); leave it at its default when phases are given")
        if self.phase_fractions is not None:
            if self.phases is None:
                raise ValueError("phase_fractions given without phases")
            try:
                fr = tuple(float(v) for v in self.phase_fractions)
            except (TypeError, ValueError):
                raise ValueError(f"phase_fractions={self.phase_fractions!r}: expected numbers") from None
            if len(fr) != len(self.phases) or not all(v >= 0 and math.isfinite(v) for v in fr) or not sum(fr) > 0:
                raise ValueError(f"phase_fractions={self.phase_fractions!r}: expected {len(self.phases)} "
                                 "non-negative numbers, not all zero (one per phase)")
            fix("phase_fractions", fr)
        v = _finite(self.vacuum, "vacuum")
        if not 0.0 <= v <= 0.9:
            raise ValueError(f"vacuum={self.vacuum!r} must be in [0, 0.9] (fraction of scan positions)")
        fix("vacuum", v)

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

    @property
    def phase_list(self) -> tuple[tuple[str, float], ...]:
        """``((name, a), ...)`` of the phases; one phase (WS2, or "generic" off the hexagonal lattice) when
        ``phases`` is None."""
        if self.phases is not None:
            return self.phases
        return (("WS2" if self.lattice == "hexagonal" else "generic", float(self.lattice_constant)),)

    @property
    def reference_lattice_constant(self) -> float:
        """``a`` of the reference phase (phase 0) in Angstrom: the lattice the labels are relative to."""
        return self.phase_list[0][1]

    @property
    def lattice_symmetry(self) -> int:
        """Rotational symmetry n of the lattice (6, 4 or 2)."""
        return LATTICES[self.lattice]

    @property
    def first_order_length(self) -> float:
        """``|g|`` of the shortest reciprocal vector of the unstrained reference phase, 1/Angstrom."""
        return _first_order_length(self.lattice, self.reference_lattice_constant, self.lattice_aspect)

    @property
    def spot_spacing(self) -> float:
        """Distance of the first-order spots from the zero beam in detector pixels (unstrained reference)."""
        return self.first_order_length / self.pixel_size

    @property
    def has_descan(self) -> bool:
        """Whether the zero beam moves with the probe position (per-position rendering)."""
        return any(v != 0.0 for v in self.descan)

    def to_json(self) -> str:
        """The configuration as a JSON string (stored in the HDF5 file).

        The scene options (lattice, ellipticity, descan, phases, vacuum) appear only when they differ from
        their defaults, so the default scene has the same configuration string as the plain polycrystal.
        """
        fields = dataclasses.asdict(self)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in _SCENE_FIELDS:
            if fields[name] == defaults[name]:
                del fields[name]
        return json.dumps(fields, sort_keys=True)


def _finite(value, name: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: expected a number") from None
    if not math.isfinite(out):
        raise ValueError(f"{name}={value!r} must be finite")
    return out


def _lattice_basis(lattice: str, a: float, aspect: float) -> np.ndarray:
    """Real-space basis, rows ``a1, a2`` in the (x, y) frame, Angstrom."""
    if lattice == "hexagonal":
        return np.array([[a, 0.0], [-a / 2, a * math.sqrt(3) / 2]])
    if lattice == "square":
        return np.array([[a, 0.0], [0.0, a]])
    if lattice == "rectangular":
        return np.array([[a, 0.0], [0.0, aspect * a]])
    raise ValueError(f"lattice={lattice!r}: expected one of {', '.join(LATTICES)}")


def _first_order_length(lattice: str, a: float, aspect: float) -> float:
    recip = np.linalg.inv(_lattice_basis(lattice, a, aspect)).T
    return float(min(np.linalg.norm(recip[0]), np.linalg.norm(recip[1]), np.linalg.norm(recip[0] + recip[1]),
                     np.linalg.norm(recip[0] - recip[1])))


def distortion_matrix(ellipticity: float, angle: float) -> np.ndarray:
    """Projector distortion ``D = R(angle) diag(1 + e/2, 1 - e/2) R(-angle)`` (float64 ``(2, 2)``).

    A point ``q`` of the undistorted pattern (relative to the zero beam, (qx, qy) px) lands at ``D q``.
    """
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return rot @ np.diag([1.0 + ellipticity / 2, 1.0 - ellipticity / 2]) @ rot.T


def descan_shifts(config: SimulationConfig, *, rows: slice | None = None) -> np.ndarray:
    """Descan shift of the zero beam, ``(n, Ry, 2)`` float64 detector px along (Qx, Qy).

    ``shift(r, c) = J @ (r / (Rx - 1) - 1/2, c / (Ry - 1) - 1/2)`` (a scan axis of length 1 contributes 0);
    zeros when ``config.descan`` is zero. ``rows`` selects scan rows (default all).
    """
    rx, ry = config.scan_shape
    rows = slice(0, rx) if rows is None else rows
    r = np.arange(rows.start, rows.stop, dtype=np.float64)
    c = np.arange(ry, dtype=np.float64)
    u = r / (rx - 1) - 0.5 if rx > 1 else np.zeros_like(r)
    v = c / (ry - 1) - 0.5 if ry > 1 else np.zeros_like(c)
    j = np.asarray(config.descan, np.float64).reshape(2, 2)
    return j[:, 0] * u[:, None, None] + j[:, 1] * v[None, :, None]


# ---------------------------------------------------------------------------------------------
# Lattice and intensities (host numpy, float64)
# ---------------------------------------------------------------------------------------------
def reciprocal_lattice(
    *, lattice_constant: float = 3.153, k_max: float = 1.4, lattice: str = "hexagonal", aspect: float = 1.25
) -> tuple[np.ndarray, np.ndarray]:
    """Unstrained reciprocal-lattice vectors of a 2D lattice (by default a hexagonal [0001] monolayer).

    Real-space basis in the (x, y) frame: hexagonal (120 degree convention) ``a1 = a (1, 0)``,
    ``a2 = a (-1/2, sqrt(3)/2)``; square ``a2 = a (0, 1)``; rectangular ``a2 = b (0, 1)``, ``b = aspect * a``.
    Reciprocal vectors ``g = h b1 + k b2`` with ``b_i . a_j = delta_ij`` (no 2 pi).

    Args:
      lattice_constant: ``a`` in Angstrom.
      k_max: keep ``0 < |g| <= k_max`` (1/Angstrom).
      lattice: one of `LATTICES`.
      aspect: ``b / a`` of the rectangular lattice.

    Returns:
      ``(g, hk)``: ``(S, 2)`` float64 vectors (1/Angstrom, components (x, y)) sorted by length then
      angle, and ``(S, 2)`` int Miller indices.
    """
    a = float(lattice_constant)
    basis = _lattice_basis(lattice, a, float(aspect))  # rows a1, a2
    recip = np.linalg.inv(basis).T  # rows b1, b2
    n = int(math.ceil(k_max * max(a, float(np.abs(basis).max())))) + 2
    h, k = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    hk = np.stack([h.ravel(), k.ravel()], axis=1)
    g = hk @ recip
    norm = np.linalg.norm(g, axis=1)
    keep = (norm > 0) & (norm <= k_max * (1 + 1e-12))
    g, hk, norm = g[keep], hk[keep], norm[keep]
    order = np.lexsort((np.arctan2(g[:, 1], g[:, 0]), np.round(norm, 9)))
    return g[order], hk[order]


def kinematic_intensities(
    g: np.ndarray, hk: np.ndarray, *, debye_waller: float = 0.5, z_metal: float = _Z_W, z_chalcogen: float = _Z_S
) -> np.ndarray:
    """Kinematic |F(g)|^2 of a 1H-MX2 monolayer (M at (0, 0), X2 at (1/3, 2/3); WS2 by default), sum 1.

    ``F = f_M(s) + 2 f_X(s) exp(2 pi i (h/3 + 2k/3))``, ``s = |g| / 2``, ``f(s) = Z / (s^2 + s0^2)``
    with ``s0 = 0.3 Z^(1/3)``, times the Debye-Waller factor ``exp(-B |g|^2 / 2)``.

    Args:
      g: ``(S, 2)`` reciprocal vectors in 1/Angstrom.
      hk: ``(S, 2)`` Miller indices.
      debye_waller: ``B`` in Angstrom^2.
      z_metal, z_chalcogen: atomic numbers of M and X (W 74, Mo 42, S 16, Se 34).

    Returns:
      ``(S,)`` float64 relative intensities summing to 1 (centrosymmetric: 6-fold symmetric pattern).
    """
    s = np.linalg.norm(g, axis=1) / 2

    def f(z):
        return z / (s**2 + (0.3 * z ** (1 / 3)) ** 2)

    phase = np.exp(2j * np.pi * (hk[:, 0] / 3 + 2 * hk[:, 1] / 3))
    amp = f(z_metal) + 2 * f(z_chalcogen) * phase
    inten = np.abs(amp) ** 2 * np.exp(-debye_waller * np.sum(g**2, axis=1) / 2)
    return inten / inten.sum()


def one_atom_intensities(g: np.ndarray, *, z: float = _Z_GENERIC, debye_waller: float = 0.5) -> np.ndarray:
    """Kinematic intensities of a lattice with one atom per cell, normalised to sum 1.

    ``|f(s)|^2 exp(-B |g|^2 / 2)`` with ``f(s) = Z / (s^2 + s0^2)``, ``s = |g| / 2``, ``s0 = 0.3 Z^(1/3)``:
    smoothly falling with ``|g|`` and as symmetric as the lattice.

    Args:
      g: ``(S, 2)`` reciprocal vectors in 1/Angstrom.
      z: atomic number.
      debye_waller: ``B`` in Angstrom^2.

    Returns:
      ``(S,)`` float64 relative intensities summing to 1.
    """
    s = np.linalg.norm(g, axis=1) / 2
    f = z / (s**2 + (0.3 * z ** (1 / 3)) ** 2)
    inten = f**2 * np.exp(-debye_waller * np.sum(g**2, axis=1) / 2)
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


def spot_table(config: SimulationConfig, *, phase: int = 0) -> SpotTable:
    """The unstrained spot list (pixel units) and intensities of phase ``phase`` of ``config``.

    Hexagonal lattices use the 1H-MX2 structure factor with the phase's atoms; square and rectangular
    lattices one atom per cell (`one_atom_intensities`).
    """
    phases = config.phase_list
    if not 0 <= phase < len(phases):
        raise ValueError(f"phase={phase!r}: expected 0 .. {len(phases) - 1} ({len(phases)} phases)")
    name, a = phases[phase]
    g, hk = reciprocal_lattice(lattice_constant=a, k_max=config.k_max, lattice=config.lattice,
                               aspect=config.lattice_aspect)
    if config.lattice == "hexagonal":
        z_metal, z_chalcogen = _phase_atoms(name)
        inten = kinematic_intensities(g, hk, debye_waller=config.debye_waller, z_metal=z_metal,
                                      z_chalcogen=z_chalcogen)
    else:
        inten = one_atom_intensities(g, debye_waller=config.debye_waller)
    c, s = math.cos(config.lattice_angle), math.sin(config.lattice_angle)
    g = g @ np.array([[c, s], [-s, c]])  # each (gx, gy) turned by lattice_angle toward +Qy
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


def _centres_and_amps(params, translation, g_px, amp, central, distortion):
    """Disk centres ``(S + 1, 2)`` (central beam first) at ``translation + D M g`` and their amplitudes."""
    m = spot_transform(params[:4])
    gx, gy = g_px[:, 0], g_px[:, 1]
    if distortion is None:
        centres = jnp.stack([m[0, 0] * gx + m[0, 1] * gy, m[1, 0] * gx + m[1, 1] * gy], -1) + translation  # (S, 2)
    else:
        d00, d01, d10, d11 = distortion
        sx, sy = m[0, 0] * gx + m[0, 1] * gy, m[1, 0] * gx + m[1, 1] * gy
        centres = jnp.stack([d00 * sx + d01 * sy, d10 * sx + d11 * sy], -1) + translation
    centres = jnp.concatenate([translation[None, :], centres], 0)
    amps = jnp.concatenate([jnp.reshape(central, (1,)).astype(amp.dtype), amp])
    return centres, amps


def _disk_profile(dx, dy, radius, edge, distortion):
    """Disk profile at detector offsets ``(dx, dy)`` from a disk centre (undistorted through ``D^-1``)."""
    if distortion is not None:  # back to the undistorted frame: D^-1 (q - centre)
        d00, d01, d10, d11 = distortion
        det = d00 * d11 - d01 * d10
        i00, i01, i10, i11 = d11 / det, -d01 / det, -d10 / det, d00 / det
        dx, dy = i00 * dx + i01 * dy, i10 * dx + i11 * dy
    rho = jnp.sqrt(dx * dx + dy * dy + 1e-12)  # the 1e-12 keeps d(rho) finite at a disk centre
    return jax.nn.sigmoid(-2.0 * (rho - radius) / edge)  # = 0.5 (1 - tanh((rho - r) / w)), accurate tails


def _render_one(params, translation, *, qx, qy, g_px, amp, central, radius, edge, distortion=None):
    """One pattern: disks at ``translation + D M g`` (``D`` = ``distortion``, row-major floats, or identity)
    and the central beam at ``translation``; with ``D`` a pixel ``q`` takes the undistorted profile at
    ``D^-1 (q - centre)`` (elliptical disks). All products elementwise (no matmul)."""
    centres, amps = _centres_and_amps(params, translation, g_px, amp, central, distortion)
    dx = qx[:, None, None] - centres[None, None, :, 0]
    dy = qy[None, :, None] - centres[None, None, :, 1]
    profile = _disk_profile(dx, dy, radius, edge, distortion)
    return jnp.sum(profile * amps, axis=-1)


# A disk's profile sigmoid(-2 (rho - r) / w) is exactly 0 in float32 beyond rho = r + _ZERO_EDGES * w.
_ZERO_EDGES = 56.0


def _window_size(radius: float, edge: float, distortion) -> int:
    """Side of the square window (px) holding every non-zero pixel of one disk (`_render_one_windowed`)."""
    stretch = 1.0 if distortion is None else float(np.linalg.norm(np.reshape(distortion, (2, 2)), 2))
    return 2 * (int(math.ceil((radius + _ZERO_EDGES * edge) * stretch)) + 1)


def _render_one_windowed(params, translation, *, qx, qy, g_px, amp, central, radius, edge, distortion=None,
                         window):
    """`_render_one` evaluated only in a ``window`` x ``window`` block around each disk, where its profile is
    non-zero (outside, float32 gives exactly 0), and added disk by disk: the same per-pixel terms, summed
    in another order. ``window`` (from `_window_size`) must not exceed the pattern."""
    centres, amps = _centres_and_amps(params, translation, g_px, amp, central, distortion)
    h, w = qx.shape[0], qy.shape[0]
    half = window // 2
    ox = jnp.clip(jnp.floor(centres[:, 0] - qx[0]).astype(jnp.int32) - half + 1, 0, h - window)
    oy = jnp.clip(jnp.floor(centres[:, 1] - qy[0]).astype(jnp.int32) - half + 1, 0, w - window)
    steps = jnp.arange(window, dtype=jnp.float32)

    def add_disk(k, canvas):
        wx = qx[0] + (ox[k].astype(jnp.float32) + steps)  # the pixels' own coordinates (integers, exact)
        wy = qy[0] + (oy[k].astype(jnp.float32) + steps)
        dx = wx[:, None] - centres[k, 0]
        dy = wy[None, :] - centres[k, 1]
        term = _disk_profile(dx, dy, radius, edge, distortion) * amps[k]
        block = jax.lax.dynamic_slice(canvas, (ox[k], oy[k]), (window, window))
        return jax.lax.dynamic_update_slice(canvas, block + term, (ox[k], oy[k]))

    return jax.lax.fori_loop(0, centres.shape[0], add_disk, jnp.zeros((h, w), jnp.float32))


def _distortion(config: SimulationConfig) -> tuple[float, float, float, float] | None:
    if config.ellipticity == 0.0:
        return None
    return tuple(float(v) for v in distortion_matrix(config.ellipticity, config.ellipticity_angle).ravel())


def _spot_arrays(config: SimulationConfig, phase: int | None) -> tuple[np.ndarray, np.ndarray, float]:
    """``(g_px (S, 2), integrated spot intensities (S,), central-beam intensity)`` of a phase; ``phase=None``
    is vacuum: no spot (one of zero intensity) and the whole probe in the central beam."""
    if phase is None:
        return np.zeros((1, 2)), np.zeros(1), 1.0
    spots = spot_table(config, phase=phase)
    return spots.g_px, spots.intensity, config.central_frac


def _amplitude_area(config: SimulationConfig) -> float:
    """Detector area of one disk: intensities are divided by it to give per-pixel amplitudes."""
    area = _disk_area(config.disk_radius, config.disk_edge)
    distortion = _distortion(config)
    if distortion is not None:  # a density: the stretched pattern keeps its total
        area = area * (distortion[0] * distortion[3] - distortion[1] * distortion[2])
    return area


def _render_constants(config: SimulationConfig, phase: int | None = 0):
    g_px, intensity, central = _spot_arrays(config, phase)
    start, stop = config.crop_bounds
    centre = config.detector_size // 2
    coords = jnp.arange(start, stop, dtype=jnp.float32) - centre
    area = _amplitude_area(config)
    distortion = _distortion(config)
    return dict(
        qx=coords,
        qy=coords,
        g_px=jnp.asarray(g_px, jnp.float32),
        amp=jnp.asarray(intensity / area, jnp.float32),
        central=jnp.float32(central / area),
        radius=float(config.disk_radius),
        edge=float(config.disk_edge),
        distortion=distortion,
    )


def pattern_function(
    config: SimulationConfig, *, translation: bool = False, phase: int = 0
) -> Callable[[jax.Array], jax.Array]:
    """A differentiable single-grain renderer ``params -> pattern``.

    Args:
      config: geometry (detector, crop, lattice, disk, central fraction, ellipticity; no descan).
      translation: if True the function takes 6 parameters, the last two a shift ``(tx, ty)`` of the
        whole pattern (central beam included) in detector pixels along (Qx, Qy).
      phase: which of ``config.phase_list`` (0 = the reference phase); ``params`` are then the strain of
        the grain relative to that phase's own unstrained lattice.

    Returns:
      ``f(params)`` mapping ``(4,)`` = ``(strain_xx, strain_yy, shear_xy, theta)`` (or ``(6,)``) to the
      noise-free cropped pattern ``(H, W)`` float32 (fraction of the probe per pixel; sums to about
      1 minus what falls outside the crop). Differentiable (``jax.jacfwd``) and jittable.
    """
    const = _render_constants(config, phase)

    def f(params):
        params = jnp.asarray(params, jnp.float32)
        shift = params[4:6] if translation else jnp.zeros((2,), jnp.float32)
        return _render_one(params, shift, **const)

    return f


def render_patterns(params: ArrayLike, config: SimulationConfig, *, phase: int = 0) -> jax.Array:
    """Renders one noise-free pattern per grain.

    Args:
      params: ``(K, 4)`` grain parameters ``(strain_xx, strain_yy, shear_xy, theta)`` relative to the
        unstrained lattice of phase ``phase``.
      config: the geometry.
      phase: which of ``config.phase_list``.

    Returns:
      ``(K, H, W)`` float32 cropped patterns (central beam at `SimulationConfig.pattern_centre`).
    """
    const = _render_constants(config, phase)
    params = jnp.asarray(np.asarray(params, np.float32).reshape(-1, 4))
    return _render_many(params, **const)


@functools.partial(jax.jit, static_argnames=("radius", "edge", "distortion"))
def _render_many(params, *, qx, qy, g_px, amp, central, radius, edge, distortion=None):
    def one(p):
        return _render_one(p, jnp.zeros((2,), jnp.float32), qx=qx, qy=qy, g_px=g_px, amp=amp,
                           central=central, radius=radius, edge=edge, distortion=distortion)

    return jax.lax.map(one, params, batch_size=4)


@functools.partial(jax.jit, static_argnames=("radius", "edge", "distortion", "window"))
def _render_pairs(params, table, shift, weight, *, qx, qy, g_px, amp, central, radius, edge, distortion=None,
                  window=None):
    """``weight[i] * pattern(params[i])`` shifted by ``shift[i]`` with spot table ``table[i]``: ``(P, H, W)``.

    ``g_px (T, S, 2)``, ``amp (T, S)``, ``central (T,)`` stack the tables (zero-padded spots). With a
    ``window`` each disk is evaluated only where it is non-zero (`_render_one_windowed`).
    """
    def one(args):
        p, t, sh, wt = args
        kw = dict(qx=qx, qy=qy, g_px=g_px[t], amp=amp[t], central=central[t], radius=radius, edge=edge,
                  distortion=distortion)
        if window is None:
            return wt * _render_one(p, sh, **kw)
        return wt * _render_one_windowed(p, sh, window=window, **kw)

    return jax.lax.map(one, (params, table, shift, weight))


# ---------------------------------------------------------------------------------------------
# Grain map, boundary mixing, labels (host numpy)
# ---------------------------------------------------------------------------------------------
class Grains(NamedTuple):
    """A Voronoi polycrystal on the scan grid.

    Attributes:
      seeds: ``(K, 2)`` float64 seed positions (scan row, column).
      params: ``(K, 4)`` float64 ``(strain_xx, strain_yy, shear_xy, theta)`` relative to the unstrained
        lattice of the reference phase (the labels); grain 0 is the reference grain with all zeros.
      gmap: ``(Rx, Ry)`` int32 Voronoi grain index, -1 in vacuum; the reference region (grown by the
        mixing radius) belongs to grain 0.
      phase: ``(K,)`` int32 phase of each grain (index into ``config.phase_list``; grain 0 is phase 0).
      own_params: ``(K, 4)`` float64 the strain relative to each grain's own phase (what is rendered);
        equal to ``params`` for grains of the reference phase.
    """

    seeds: np.ndarray
    params: np.ndarray
    gmap: np.ndarray
    phase: np.ndarray | None = None
    own_params: np.ndarray | None = None


def _mixing_kernel(sigma: float) -> np.ndarray:
    if sigma <= 0:
        return np.ones(1)
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def make_grains(config: SimulationConfig) -> Grains:
    """Draws the grain seeds, parameters, phases and Voronoi map for ``config`` (deterministic in ``seed``).

    Phases and the vacuum boundary come from their own random streams, so the seeds, strains and
    rotations of the grains do not depend on those options.
    """
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
    reference = (slice(max(0, r0 - margin), r1 + margin), slice(max(0, c0 - margin), c1 + margin))
    if config.vacuum > 0:
        gmap[_vacuum_mask(config, reference)] = -1
    gmap[reference] = 0
    phase = _draw_phases(config)
    labels = params if config.phases is None else own_to_label(params, phase, config)
    return Grains(seeds, labels, gmap, phase, params)


def own_to_label(own: np.ndarray, phase: np.ndarray, config: SimulationConfig) -> np.ndarray:
    """Grain parameters relative to the reference phase from those relative to each grain's own phase.

    A grain of phase ``p`` with strain ``eps`` has the real-space deformation ``(a_p / a_0)(I + eps) R``
    relative to the unstrained reference lattice, so its label strain is ``(a_p / a_0)(I + eps) - I``
    (a symmetric matrix: the rotation is unchanged).

    Args:
      own: ``(K, 4)`` ``(strain_xx, strain_yy, shear_xy, theta)`` relative to each grain's phase.
      phase: ``(K,)`` phase indices.
      config: gives the phases' lattice constants.

    Returns:
      ``(K, 4)`` float64 labels (rows of the reference phase returned unchanged).
    """
    a = np.array([lc for _, lc in config.phase_list], np.float64)
    label = np.array(own, np.float64, copy=True)
    ratio = a[phase] / a[0]
    sel = ratio != 1.0
    r = ratio[sel]
    label[sel, 0] = r * (1.0 + own[sel, 0]) - 1.0
    label[sel, 1] = r * (1.0 + own[sel, 1]) - 1.0
    label[sel, 2] = r * own[sel, 2]
    return label


def _draw_phases(config: SimulationConfig) -> np.ndarray:
    """``(K,)`` int32 phase per grain: 0 for grain 0, the others drawn with ``phase_fractions`` odds."""
    k = config.n_grains
    phase = np.zeros(k, np.int32)
    if config.phases is None:
        return phase
    n = len(config.phases)
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0x5EED, 1]))
    odds = np.ones(n) if config.phase_fractions is None else np.asarray(config.phase_fractions, np.float64)
    phase[1:] = rng.choice(n, size=k - 1, p=odds / odds.sum())
    return phase


def _vacuum_mask(config: SimulationConfig, reference: tuple[slice, slice]) -> np.ndarray:
    """``(Rx, Ry)`` bool: the positions outside a random flake, ``round(vacuum * Rx * Ry)`` of them.

    The flake is star-shaped around a centre between the reference region and the scan centre, with a
    smooth radius ``r(phi) = exp(sum_k (a_k cos k phi + b_k sin k phi))``, k = 2..5; positions are ranked
    by ``|x - centre| / r(phi)`` and the outermost become vacuum. The ``reference`` slices never are; the
    centre is moved toward the reference region until the region lies inside the flake.
    """
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0x5EED, 2]))
    rx, ry = config.scan_shape
    harm = np.arange(2, 6)
    coef = rng.normal(0.0, 0.3 / harm[:, None], size=(len(harm), 2))
    u = rng.uniform(0.6, 1.0)
    rows, cols = np.meshgrid(np.arange(rx, dtype=np.float64), np.arange(ry, dtype=np.float64), indexing="ij")
    protected = np.zeros((rx, ry), bool)
    protected[reference] = True
    r0, r1, c0, c1 = config.reference_bounds
    ref_centre = np.array([(r0 + r1 - 1) / 2, (c0 + c1 - 1) / 2])
    scan_centre = np.array([(rx - 1) / 2, (ry - 1) / 2])
    n_vac = min(int(round(config.vacuum * rx * ry)), int((~protected).sum()))
    if n_vac == 0:
        return np.zeros((rx, ry), bool)
    for _ in range(8):
        centre = ref_centre + u * (scan_centre - ref_centre)
        dr, dc = rows - centre[0], cols - centre[1]
        phi = np.arctan2(dc, dr)
        radius = np.exp(np.sum(coef[:, 0, None, None] * np.cos(harm[:, None, None] * phi)
                               + coef[:, 1, None, None] * np.sin(harm[:, None, None] * phi), axis=0))
        level = np.hypot(dr, dc) / radius
        order = np.argsort(-np.where(protected, -np.inf, level), axis=None, kind="stable")[:n_vac]
        threshold = level.ravel()[order[-1]]
        if level[protected].max() < threshold:
            break
        u *= 0.5
    vac = np.zeros(rx * ry, bool)
    vac[order] = True
    return vac.reshape(rx, ry)


def _mixing_weights(
    gmap: np.ndarray, rows: slice, n_grains: int, kernel: np.ndarray, vacuum: bool = False
) -> np.ndarray:
    """Gaussian-smoothed one-hot grain weights for scan rows ``rows``: ``(n, Ry, K)`` float64
    (``(n, Ry, K + 1)`` with ``vacuum``: the last class is vacuum, ``gmap == -1``).

    Each output element is computed with the same sequence of operations whatever slab it belongs
    to, so row batches reproduce the full-scan result bit for bit. Edges replicate the border grain.
    """
    rad = (len(kernel) - 1) // 2
    r0, r1 = rows.start, rows.stop
    idx = np.clip(np.arange(r0 - rad, r1 + rad), 0, gmap.shape[0] - 1)
    slab = np.pad(gmap[idx], ((0, 0), (rad, rad)), mode="edge")
    onehot = (slab[..., None] == np.arange(n_grains)).astype(np.float64)
    if vacuum:
        onehot = np.concatenate([onehot, (slab == -1)[..., None].astype(np.float64)], axis=-1)
    n, n_classes = r1 - r0, onehot.shape[-1]
    out = np.zeros((n, slab.shape[1], n_classes))
    for t, kt in enumerate(kernel):
        out += kt * onehot[t: t + n]
    res = np.zeros((n, gmap.shape[1], n_classes))
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

    Mixed boundary positions take the label of their dominant grain (largest mixing weight), or are
    vacuum where vacuum dominates.

    Returns:
      dict with ``strain_xx, strain_yy, shear_xy`` (dimensionless, relative to the unstrained reference
      phase) and ``rotation`` (radians in [0, 2 pi)), each ``(Rx, Ry)`` float32, NaN in vacuum;
      ``grain_index`` ``(Rx, Ry)`` int32 (dominant grain, -1 in vacuum); ``interior`` ``(Rx, Ry)`` bool
      (grain interior after eroding ``interior_erosion`` scan pixels; False in vacuum); ``vacuum``
      ``(Rx, Ry)`` bool; ``phase`` ``(Rx, Ry)`` int8 (-1 in vacuum); ``zero_beam`` ``(Rx, Ry, 2)`` float32,
      the zero-beam position (row, col) in pattern pixels (the pattern centre plus the descan shift).
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
        wts = _mixing_weights(grains.gmap, slice(r0, r1), config.n_grains, kernel, config.vacuum > 0)
        dominant[r0:r1] = np.argmax(wts, axis=-1)
        n_mix = max(n_mix, int((wts > 0).sum(-1).max()))
    return dominant, n_mix


def _labels_from_dominant(config, grains, dominant):
    """Labels from the dominant class per position (``config.n_grains`` = vacuum)."""
    vac = dominant == config.n_grains
    grain = np.where(vac, 0, dominant) if vac.any() else dominant
    p = grains.params[grain].astype(np.float32)
    if vac.any():
        p[vac] = np.nan
    interior = _erode_labels(dominant, int(config.interior_erosion))
    grain_phase = np.zeros(len(grains.params), np.int32) if grains.phase is None else grains.phase
    phase = grain_phase[grain].astype(np.int8)
    phase[vac] = -1
    centre = np.asarray(config.pattern_centre, np.float64)
    return {
        "strain_xx": p[..., 0],
        "strain_yy": p[..., 1],
        "shear_xy": p[..., 2],
        "rotation": p[..., 3],
        "grain_index": np.where(vac, -1, dominant).astype(np.int32),
        "interior": interior & ~vac,
        "vacuum": vac,
        "phase": phase,
        "zero_beam": (centre + descan_shifts(config)).astype(np.float32),
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
def _noisy_rows(mixed, rows, key, glow_shift, *, w, counts, scale, lorentz_width):
    """The noise on mixed rows ``(n, Ry, H, W)`` with a glow centred on each position's shifted zero beam."""
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, rows)
    noise = functools.partial(add_background_noise, w=w, counts=counts, scale=scale, lorentz_width=lorentz_width)
    return jax.vmap(lambda k, x, sh: noise(x, key=k, glow_shift=sh))(keys, mixed, glow_shift)


@functools.partial(jax.jit, static_argnames=("w", "counts", "scale", "lorentz_width"))
def _mix_noisy_rows(patterns, idx, wts, rows, key, *, w, counts, scale, lorentz_width):
    """`_mix_rows` then the noise, one PRNG key per scan row (``fold_in(key, row)``)."""
    out = _mix_rows(patterns, idx, wts)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, rows)
    noise = functools.partial(add_background_noise, w=w, counts=counts, scale=scale, lorentz_width=lorentz_width)
    return jax.vmap(lambda k, x: noise(x, key=k))(keys, out)


def _class_patterns(config: SimulationConfig, grains: Grains) -> jax.Array:
    """``(C, H, W)`` noise-free pattern of every mixing class: the K grains, then vacuum if any."""
    if config.phases is None and config.vacuum == 0:
        return render_patterns(grains.params, config)
    out = np.empty((config.n_grains + (config.vacuum > 0),) + config.pattern_shape, np.float32)
    for p in range(len(config.phase_list)):
        sel = np.flatnonzero(grains.phase == p)
        if sel.size:
            out[sel] = np.asarray(render_patterns(grains.own_params[sel], config, phase=p))
    if config.vacuum > 0:
        out[-1] = np.asarray(_render_many(jnp.zeros((1, 4), jnp.float32), **_render_constants(config, None)))[0]
    return jnp.asarray(out)


class _PairRenderer:
    """Per-position rendering (descan): every (position, class) pair with a non-zero mixing weight is
    rendered with the position's own shift, ``_PAIRS`` pairs per call, and summed on the host in class
    order (as `_mix_rows` does)."""

    _PAIRS = 8

    def __init__(self, config: SimulationConfig, grains: Grains):
        n_phases = len(config.phase_list)
        tables = [_spot_arrays(config, p) for p in range(n_phases)]
        params, table = [grains.own_params], [grains.phase]
        if config.vacuum > 0:  # the last class: no specimen, its own table
            tables.append(_spot_arrays(config, None))
            params.append(np.zeros((1, 4)))
            table.append(np.array([n_phases]))
        self.params = np.concatenate(params).astype(np.float32)  # (C, 4) per class
        self.table = np.concatenate(table).astype(np.int32)  # (C,) spot table per class
        area = _amplitude_area(config)
        s_max = max(len(t[0]) for t in tables)
        g_px = np.zeros((len(tables), s_max, 2))
        amp = np.zeros((len(tables), s_max))  # zero-padded spots contribute exactly 0
        for i, (g, inten, _) in enumerate(tables):
            g_px[i, : len(g)] = g
            amp[i, : len(g)] = inten / area
        self.const = _render_constants(config, 0)
        self.const.update(g_px=jnp.asarray(g_px, jnp.float32), amp=jnp.asarray(amp, jnp.float32),
                          central=jnp.asarray(np.array([t[2] for t in tables]) / area, jnp.float32))
        window = _window_size(config.disk_radius, config.disk_edge, self.const["distortion"])
        # A window per disk is far cheaper than every pixel for every disk (when it fits in the pattern).
        self.const["window"] = window if window <= min(config.pattern_shape) else None

    def mix(self, wts: np.ndarray, shifts: np.ndarray) -> np.ndarray:
        """``(n, Ry, H, W)`` float32 mixed patterns from weights ``(n, Ry, C)`` and shifts ``(n, Ry, 2)``."""
        n, ry, n_classes = wts.shape
        flat = wts.reshape(n * ry, n_classes)
        pos, cls = np.nonzero(flat)  # position-major, classes ascending
        weight = flat[pos, cls].astype(np.float32)
        shift = shifts.reshape(n * ry, 2).astype(np.float32)
        h, w = self.const["qx"].shape[0], self.const["qy"].shape[0]
        out = np.zeros((n * ry, h, w), np.float32)
        for s0 in range(0, len(pos), self._PAIRS):
            p, c, wt = pos[s0: s0 + self._PAIRS], cls[s0: s0 + self._PAIRS], weight[s0: s0 + self._PAIRS]
            pad = self._PAIRS - len(p)
            c_full, wt_full = np.pad(c, (0, pad)), np.pad(wt, (0, pad))
            sh = np.pad(shift[p], ((0, pad), (0, 0)))
            block = np.asarray(_render_pairs(self.params[c_full], self.table[c_full], sh, wt_full, **self.const))
            for i, pi in enumerate(p):
                out[pi] += block[i]
        return out.reshape(n, ry, h, w)


class _Generator:
    """Renders the grain patterns once (or every position, with descan), then produces scan rows batch by
    batch on the device."""

    def __init__(self, config: SimulationConfig):
        self.config = config
        self.grains = make_grains(config)
        dominant, self.n_mix = _dominant_and_mix_count(config, self.grains)
        self.labels = _labels_from_dominant(config, self.grains, dominant)
        self.kernel = _mixing_kernel(config.boundary_sigma)
        self.vacuum = config.vacuum > 0
        if config.has_descan:
            self.pairs = _PairRenderer(config, self.grains)
        else:
            self.patterns = _class_patterns(config, self.grains)
        self.noise_key = jax.random.fold_in(jax.random.key(config.seed), 1)
        self._noise = None if config.noise_level is None else dict(
            w=config.noise_level, counts=config.counts, scale=config.intensity_scale,
            lorentz_width=config.lorentz_width)

    def _dispatch_descan(self, r0: int, r1: int) -> np.ndarray:
        wts = _mixing_weights(self.grains.gmap, slice(r0, r1), self.config.n_grains, self.kernel, self.vacuum)
        shifts = descan_shifts(self.config, rows=slice(r0, r1))
        mixed = self.pairs.mix(wts, shifts)
        if self._noise is None:
            return mixed
        rows = np.arange(r0, r1, dtype=np.uint32)
        if jax.default_backend() == "cpu":
            out = np.empty_like(mixed)
            for i, r in enumerate(rows):
                rng = np.random.default_rng([self.config.seed, 1, int(r)])
                out[i] = add_background_noise_numpy(mixed[i], rng=rng, glow_shift=shifts[i], **self._noise)
            return out
        n = self.config.batch_rows
        pad = ((0, n - (r1 - r0)),) + ((0, 0),) * 3
        rows = np.arange(r0, r0 + n, dtype=np.uint32)
        return _noisy_rows(np.pad(mixed, pad), rows, self.noise_key, np.pad(shifts, pad[:3]).astype(np.float32),
                           **self._noise)

    def _dispatch(self, r0: int, r1: int) -> jax.Array:
        if self.config.has_descan:
            return self._dispatch_descan(r0, r1)
        n = self.config.batch_rows
        wts = _mixing_weights(self.grains.gmap, slice(r0, r1), self.config.n_grains, self.kernel, self.vacuum)
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


def simulate_to_hdf5(path: str | os.PathLike, config: SimulationConfig, *, progress: bool = True) -> Path:
    """Simulates a scan and streams it to an HDF5 file, batch of rows by batch of rows.

    Layout (format ``"ccstae-sim-1"``): ``/data`` float32 ``(Rx, Ry, Qx, Qy)`` chunked by scan row;
    ``/labels/{strain_xx, strain_yy, shear_xy, rotation}`` float32 ``(Rx, Ry)`` (rotation in
    radians; NaN in vacuum), ``/labels/grain_index`` int32 (-1 in vacuum), ``/labels/interior`` bool,
    ``/labels/vacuum`` bool, ``/labels/phase`` int8 (-1 in vacuum), ``/labels/zero_beam`` float32
    ``(Rx, Ry, 2)`` (row, col of the zero beam in pattern pixels); ``/grains/params`` float64 ``(K, 4)``
    = ``(exx, eyy, exy, theta)`` (relative to the reference phase), ``/grains/seeds`` and
    ``/grains/phase`` int32 ``(K,)``; root attributes ``format``, ``conventions``, ``reference_region``
    (r0, r1, c0, c1), ``noise_level`` (w; NaN when raw), ``noise_applied``, ``seed``, ``q_pixel``,
    ``disk_radius``, ``disk_edge``, ``detector_size``, ``crop``, ``pattern_centre``,
    ``lattice_constant`` (of the reference phase), ``central_frac``, ``lattice_symmetry`` (6, 4 or 2),
    ``counts``, ``intensity_scale``, ``lorentz_width``, ``config`` (JSON), ``lattice``,
    ``lattice_aspect``, ``spot_spacing`` (first-order spot distance, detector px), ``ellipticity``,
    ``ellipticity_angle`` (radians), ``descan`` (J row-major, px), ``phases`` (JSON list of
    ``[name, a]``), ``vacuum`` (requested fraction).

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
    atomic.remove_stale(path)
    with atomic.replace_atomically(path) as tmp:
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
            grains.create_dataset("phase", data=gen.grains.phase, track_times=False)
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
            attrs["lattice_constant"] = config.lattice_constant if config.phases is None else config.phases[0][1]
            attrs["central_frac"] = config.central_frac
            attrs["lattice_symmetry"] = config.lattice_symmetry
            attrs["counts"] = config.counts
            attrs["intensity_scale"] = config.intensity_scale if config.noise_level is not None else 1.0
            attrs["lorentz_width"] = config.lorentz_width
            attrs["config"] = config.to_json()
            attrs["lattice"] = config.lattice
            attrs["lattice_aspect"] = config.lattice_aspect
            attrs["spot_spacing"] = config.spot_spacing
            attrs["ellipticity"] = config.ellipticity
            attrs["ellipticity_angle"] = config.ellipticity_angle
            attrs["descan"] = np.asarray(config.descan, np.float64)
            attrs["phases"] = json.dumps([list(p) for p in config.phase_list])
            attrs["vacuum"] = config.vacuum
            batches = gen.batches()
            if progress:
                from tqdm.auto import tqdm

                batches = tqdm(batches, total=-(-rx // config.batch_rows), desc=f"simulate {path.name}",
                               unit="batch")
            for r0, r1, block in batches:
                dset[r0:r1] = block
    return path
