"""py4DSTEM correlation strain mapping: the classical baseline CC-ST-AE is compared against.

py4DSTEM is an optional, GPL-licensed extra (``pip install "ccstae-jax[baseline]"``, i.e. ``py4dstem-lite==0.14.16``,
which works with numpy 2). It is imported lazily inside the functions that need it; importing this module needs only
numpy (and h5py for :func:`write_strain_h5`). Without py4DSTEM, :func:`py4dstem_strain_map` raises
:class:`BaselineUnavailable` with the install hint.

Pipeline (per pattern, streamed in chunks of ``config.chunk_size`` positions):

1. Template: py4DSTEM's synthetic probe (a logistic disk of the known radius) or the central disk of the scan's mean
   pattern, turned into a cross-correlation kernel (``Probe.get_kernel``, ``'sigmoid'`` edge trench by default).
2. Central beam: located per pattern (intensity centroid) and, by default, removed with a smooth annular window,
   because its correlation peak (~300x the diffracted spots) rings through py4DSTEM's DFT-upsampled sub-pixel
   refinement (``Py4DSTEMConfig.central_beam``).
3. Disk detection: ``py4DSTEM.braggvectors.find_Bragg_disks`` (cross-correlation, sub-pixel ``'multicorr'``).
4. Lattice fit (``method="perpattern"``, default): the lattice orientation is voted for by the peaks that match the
   low-order shells of the known unstrained lattice; the rotated unstrained lattice indexes all peaks (py4DSTEM's
   ``index_bragg_directions``), and py4DSTEM's ``fit_lattice_vectors`` refines origin, g1 and g2 by
   intensity-weighted least squares; peaks are re-indexed against the fitted lattice (within
   ``max_peak_spacing_px``) and refitted until stable. No segmentation and no single reference orientation is
   needed, so grains rotated anywhere in 0..360 deg work (py4DSTEM's one-reference ``StrainMap`` silently fails on
   such data; ``method="strainmap"`` runs it, for single-orientation scans).
5. Strain: EXACT left polar decomposition against the known unstrained lattice (no linearisation).

Scan geometry, set from our simulated file's attributes by :func:`config_from_attrs` and the subprocess entry:

* Disk radius: the template's. For disks large against the lattice spacing s, the central-beam window and the
  template's trench are capped to end 1 px before the first-order disks (and before the neighbouring disks).
* Lattice: hexagonal, square or rectangular (``lattice``, ``lattice_aspect``); |g1| from ``lattice_constant`` (of the
  reference phase) and ``q_pixel``; rotations modulo 60, 90 or 180 deg (the output's ``symmetry`` attribute, which
  ``ccstae evaluate`` uses).
* Descan: every pattern has its own origin (its beam centre, refined by the lattice fit), so a drifting zero beam
  needs nothing else.
* Several phases: every grain is fitted against the reference phase's lattice, so the lattice mismatch appears as
  strain (as in the labels); the indexing tolerances widen by the mismatch.
* Elliptical distortion: calibrated from the Bragg vector map of the whole scan (``Py4DSTEMConfig.ellipse``), not
  taken from the file; on a strained polycrystal the fit absorbs the grains' mean deviatoric strain.
* Vacuum: patterns whose diffracted spots are much weaker than the scan's (``Py4DSTEMConfig.vacuum_threshold``) are
  emptied, so they come out invalid.

Accuracy floor: on our simulator's default disks (tanh edge 0.5 px) the point-sampled disks alias, which biases every
correlation peak by ~0.02 px (rms; measured 0.018 px with 'multicorr', 0.03 px with 'poly'); the noise-free strain MAE
is then ~1-2e-4 (8x8 scan, 4 grains: strain_xx / strain_yy / shear_xy 1.6e-4 / 2.3e-4 / 0.6e-4). With a 0.75 px edge
it is ~5e-5, with a 1 px edge (spot error 0.001 px) ~1e-5.

Conventions (the project's):

* 4D data (Rx, Ry, Qx, Qy); x = Qx = array axis 2 (pattern rows), y = Qy = axis 3 (pattern columns).
* Reciprocal vectors are (qx, qy) = (row, col) pixel offsets from the pattern centre. With ``G_meas`` and ``G_ref``
  the measured and unstrained reciprocal bases (columns g1, g2), ``T = G_meas G_ref^-1`` maps unstrained to measured
  spots, the real-space lattice deformation is ``D = T^-T`` and its left polar decomposition
  ``D = (I + eps) R(theta)`` gives ``eps = [[strain_xx, shear_xy], [shear_xy, strain_yy]]`` (lab frame, tensor shear)
  and ``R(theta) = [[cos, -sin], [sin, cos]]``.
* Positive ``strain_xx``: the lattice is stretched along x, so the spots move inward along Qx.
* ``rotation`` is in radians, counter-clockwise from +Qx toward +Qy, reported modulo the lattice symmetry
  (60 deg for hexagonal, 90 deg for square, 180 deg for rectangular) in [0, period).
* Strain is absolute (against the known unstrained |g1|), not referenced to a region. If ``g1_length_px`` is not
  known it is estimated as the scan median of first-shell radii, which makes the strain relative to that median.

Threading trap: with numpy >= 2 wheels and several OpenBLAS threads, py4DSTEM's ``'multicorr'`` disk detection runs
~20x slower (many tiny complex matrix products). Set ``OPENBLAS_NUM_THREADS=1`` (and ``MPLBACKEND=Agg``,
``TQDM_DISABLE=1``) *before* Python starts, e.g. ``env OPENBLAS_NUM_THREADS=1 ccstae baseline ...``. Inside a running
process the pool can still be resized through OpenBLAS's own API: this module (a) limits it to
``Py4DSTEMConfig.blas_threads`` during detection with ``threadpoolctl`` if installed, else by calling the loaded
OpenBLAS's ``*openblas_set_num_threads*`` through ctypes (Linux; measured 826 -> 42 ms per pattern on 2 cores),
else warns; and (b) offers :func:`run_baseline_subprocess`, which runs ``python -m ccstae_jax.baselines.py4dstem``
with :data:`BASELINE_ENV` set — the way the CLI and the benchmark call it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ccstae_jax import conventions
from ccstae_jax.errors import CcstaeError

__all__ = [
    "BASELINE_ENV",
    "INSTALL_HINT",
    "BaselineUnavailable",
    "Py4DSTEMConfig",
    "VACUUM_THRESHOLD",
    "beam_centres",
    "canonical_lattice",
    "config_from_attrs",
    "default_g1_angle_deg",
    "g1_length_from_attrs",
    "lattice_aspect_from_attrs",
    "lattice_symmetry",
    "phase_mismatch_from_attrs",
    "py4dstem_available",
    "py4dstem_strain_map",
    "reference_basis",
    "run_baseline_subprocess",
    "run_cli",
    "shortest_spacing",
    "strain_from_reciprocal_bases",
    "suppress_central_beam",
    "write_strain_h5",
]

INSTALL_HINT = 'pip install "ccstae-jax[baseline]"  (the extra installs py4dstem-lite==0.14.16, GPL-3)'

#: Environment for a process that runs the baseline: one BLAS thread (see the module docstring), no GUI, no bars.
BASELINE_ENV: dict[str, str] = {
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MPLBACKEND": "Agg",
    "TQDM_DISABLE": "1",
}

#: Angle between the unstrained g1 and g2 (deg) of each lattice.
LATTICE_ANGLE_DEG = {"hex": 60.0, "square": 90.0, "rect": 90.0}
#: Rotational symmetry period of each lattice's pattern (deg): rotations are reported modulo it.
ROTATION_PERIOD_DEG = {"hex": 60.0, "square": 90.0, "rect": 180.0}
#: Other spellings of the lattice names (the simulator's ``lattice`` attribute) -> the names used here.
LATTICE_ALIASES = {"hexagonal": "hex", "rectangular": "rect"}

MAP_KEYS = conventions.QUANTITIES

CONVENTIONS = (
    f"maps (Rx, Ry) of {conventions.FRAME}. {conventions.STRAIN}, radians, modulo the lattice symmetry in [0, "
    "period). Strain from the left polar decomposition D = (I + eps) R(theta) of the real-space deformation "
    "D = T^-T, T mapping the unstrained to the measured reciprocal basis in (qx, qy) pixels. Absolute strain against "
    "the known unstrained lattice (no reference region). Invalid positions are NaN with valid = False."
)


class BaselineUnavailable(CcstaeError):
    """py4DSTEM (the optional ``baseline`` extra) is not importable in this Python environment."""


@dataclasses.dataclass(frozen=True)
class Py4DSTEMConfig:
    """Parameters of the py4DSTEM correlation strain-mapping baseline.

    Defaults are the recommended values of the tested recipe (``py4dstem.md`` §6); ``None`` means "derived from
    the disk radius / |g1|" as stated per field, and the resolved values are recorded in the output ``parameters``.

    Attributes:
        probe_radius_px: Radius (detector px) of the diffraction disks. Required: py4DSTEM's own estimate
            (``get_probe_size``) is biased by strong background (0.2-1 px at 50-70 % noise, 5x worse strain).
            :func:`config_from_attrs` reads it from our simulated file (``disk_radius_px``).
        probe_edge_px: Full width (px) of the synthetic probe's logistic edge, ``1 / (1 + exp(4 (r - R) / width))``.
            Our simulator's ``0.5 (1 - tanh((r - R) / w))`` edge equals this with ``width = 2 w``.
        probe: ``"synthetic"`` (logistic disk of ``probe_radius_px``, centred) or ``"mean_pattern"`` (the central
            disk, within 1.3 radii of its centre, of the scan's mean pattern).
        kernel: ``"sigmoid"`` (disk minus a sine-squared trench: insensitive to smooth background; use for disks) or
            ``"flat"`` (the probe itself; better for Gaussian spots).
        trench: Inner and outer radius of the ``"sigmoid"`` trench, in units of ``probe_radius_px``. The outer
            radius is capped at ``s - probe_radius_px - 1`` px (``s`` = the shortest unstrained lattice spacing), so
            for large disks the trench ends before the neighbouring disks begin.
        corr_power: Correlation power (1 = cross-correlation, 0 = phase correlation). Below 1 is much worse here.
        sigma_cc: Gaussian smoothing (px) of the correlation before peak finding (0 = none).
        subpixel: ``"multicorr"`` (DFT upsampling, most accurate), ``"poly"`` (parabola, ~10x faster, about as
            accurate once shot noise dominates) or ``"pixel"``.
        upsample_factor: Upsampling for ``"multicorr"``.
        min_absolute_intensity: Drop correlation maxima below this value (data units).
        min_relative_intensity: Drop maxima dimmer than this fraction of the ``relative_to_peak``-th brightest.
        vacuum_threshold: Vacuum test after detection. A pattern's spot strength is its brightest maximum at
            least half the shortest unstrained spacing from its beam centre (a diffracted spot: neither the central
            beam nor the edge of the central-beam window); a pattern whose strength is below this fraction of the
            scan median strength is taken as vacuum and all its maxima are dropped, so it comes out invalid (an
            absolute intensity threshold set from the data, as ``minAbsoluteIntensity`` would be by hand). Assumes
            most of the scan is specimen. 0 = off (the default); :func:`config_from_attrs` sets
            ``VACUUM_THRESHOLD`` for a scan with vacuum.
        relative_to_peak: Index of the reference maximum for ``min_relative_intensity``; ``None`` = the brightest
            diffracted spot (0 when the central beam is suppressed, else 1), which makes the threshold independent
            of how much intensity the central beam holds (95 % in our simulations: spots are 300x dimmer).
        min_peak_spacing_px: Minimum distance between maxima; ``None`` = 0.45 |g1|.
        edge_boundary_px: Ignore maxima this close to the detector edge (truncated disks bias the fit: the most
            important detection parameter); ``None`` = max(8, ceil(probe_radius_px + 3)).
        max_num_peaks: Keep at most this many (brightest) maxima per pattern.
        max_peak_spacing_px: A peak is indexed only if within this distance (px) of its fitted lattice site.
        shell_tolerance: Orientation vote: a peak matches a reference shell (|g1|, sqrt(3) |g1|, 2 |g1| hex;
            |g1|, sqrt(2) |g1|, 2 |g1| square) if | |q| / |v| - 1 | < this.
        orientation_tolerance_deg: Width (deg) of the orientation vote's smoothing and refinement window.
        orientation_candidates: How many orientation-vote maxima are tried (the one indexing most peaks wins).
        max_strain: First indexing pass against the rotated unstrained lattice accepts peaks within
            ``max_peak_spacing_px + max_strain |q|``; a fitted |g1| or |g2| differing from the unstrained one
            by more than this fraction is rejected (position invalid).
        min_num_peaks: Minimum number of indexed peaks (the central beam included when kept) for a valid fit.
        fit_weights: ``"intensity"`` (py4DSTEM's weighting of ``fit_lattice_vectors``) or ``"uniform"``.
        refine_iterations: Re-index-and-refit rounds after the first fit.
        central_beam: ``"suppress"`` (default) multiplies each pattern by a smooth annular window that zeroes the
            central beam (and the background glow centred on it) before correlation; ``"keep"`` leaves patterns
            as they are. Why: 'multicorr' refines peaks by band-limited (DFT) interpolation of the whole
            correlation map, and the central beam's peak (~300x the spots) rings through it, mostly along the
            detector row and column through the centre: measured on our noise-free simulation, spot errors of up to
            0.65 px (rms 0.09 px) with the beam kept vs 0.03 px (rms 0.018 px) suppressed. The lattice fit then
            takes the origin from the diffracted spots (Friedel pairs). ``"perpattern"`` only (``"strainmap"``
            always keeps the beam).
        central_beam_mask_px: (inner, outer) radii (px) of the window: 0 inside ``inner``, 1 beyond ``outer``,
            sine-squared between; ``None`` = (probe_radius_px + 3, probe_radius_px + 6), with the outer radius
            capped at ``s - probe_radius_px - 1`` (``s`` = the shortest unstrained spacing: the window then ends
            before the first-order disks begin) and the inner at the outer minus 1.5 px.
        origin: ``None`` = each pattern's central-beam centre (intensity centroid around its brightest pixel)
            seeds the origin; or a fixed ``(qx0, qy0)`` in px. Either way the lattice fit refines the origin per
            pattern.
        ellipse: ``"none"`` (default) or ``"fit"``: calibrate an elliptical distortion of the patterns as
            py4DSTEM does, by fitting an ellipse (``py4DSTEM.process.calibration.fit_ellipse_1D``) to the
            first-order ring of the Bragg vector map (every detected peak relative to its pattern's beam centre,
            weighted by intensity, on a 4x finer grid, within 0.85-1.15 times the shortest unstrained spacing),
            then correcting each peak about its pattern's beam centre with py4DSTEM's elliptical correction scaled
            to unit determinant (so the pixel size, hence |g1|, stays valid) before the lattice fit. Needs grains
            of several orientations; strained grains bias it by their mean deviatoric strain. ``"perpattern"``
            only.
        method: ``"perpattern"`` (default; any grain orientation) or ``"strainmap"`` (py4DSTEM's ``StrainMap``: one
            basis picked on the Bragg vector map, valid only for single-orientation scans; in-memory input).
        bvm_min_relative_intensity: ``"strainmap"`` only: threshold of the Bragg-vector-map maxima, relative to
            the brightest diffracted maximum.
        chunk_size: Patterns read and processed per chunk (bounds memory for streamed scans).
        blas_threads: Limit numpy's BLAS pool to this many threads during detection (needs ``threadpoolctl``; else a
            warning if ``OPENBLAS_NUM_THREADS`` is not 1). ``None`` leaves it alone.
    """

    probe_radius_px: float
    probe_edge_px: float = 1.0
    probe: str = "synthetic"
    kernel: str = "sigmoid"
    trench: tuple[float, float] = (1.0, 2.0)
    corr_power: float = 1.0
    sigma_cc: float = 0.0
    subpixel: str = "multicorr"
    upsample_factor: int = 16
    min_absolute_intensity: float = 0.0
    min_relative_intensity: float = 0.05
    vacuum_threshold: float = 0.0
    relative_to_peak: int | None = None
    min_peak_spacing_px: float | None = None
    edge_boundary_px: int | None = None
    max_num_peaks: int = 70
    max_peak_spacing_px: float = 3.0
    shell_tolerance: float = 0.06
    orientation_tolerance_deg: float = 2.0
    orientation_candidates: int = 2
    max_strain: float = 0.06
    min_num_peaks: int = 5
    fit_weights: str = "intensity"
    refine_iterations: int = 4
    central_beam: str = "suppress"
    central_beam_mask_px: tuple[float, float] | None = None
    origin: tuple[float, float] | None = None
    ellipse: str = "none"
    method: str = "perpattern"
    bvm_min_relative_intensity: float = 0.01
    chunk_size: int = 256
    blas_threads: int | None = 1

    def __post_init__(self):
        def bad(name, value, expected):
            raise ValueError(f"Py4DSTEMConfig.{name} = {value!r}: expected {expected}")

        if not (isinstance(self.probe_radius_px, (int, float)) and self.probe_radius_px > 0):
            bad("probe_radius_px", self.probe_radius_px, "a positive number of detector pixels")
        if not self.probe_edge_px > 0:
            bad("probe_edge_px", self.probe_edge_px, "> 0 px")
        choices = {
            "probe": ("synthetic", "mean_pattern"),
            "kernel": ("sigmoid", "flat"),
            "subpixel": ("multicorr", "poly", "pixel"),
            "method": ("perpattern", "strainmap"),
            "central_beam": ("suppress", "keep"),
            "fit_weights": ("intensity", "uniform"),
            "ellipse": ("none", "fit"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                bad(name, getattr(self, name), f"one of {allowed}")
        if len(self.trench) != 2 or not 0 < self.trench[0] < self.trench[1]:
            bad("trench", self.trench, "(inner, outer) radii in probe radii with 0 < inner < outer")
        for name in ("upsample_factor", "max_num_peaks", "min_num_peaks", "orientation_candidates", "chunk_size"):
            value = getattr(self, name)
            if not (isinstance(value, (int, np.integer)) and value >= 1):
                bad(name, value, "an integer >= 1")
        if not (isinstance(self.refine_iterations, (int, np.integer)) and self.refine_iterations >= 0):
            bad("refine_iterations", self.refine_iterations, "an integer >= 0")
        if self.min_num_peaks < 3:
            bad("min_num_peaks", self.min_num_peaks, ">= 3 (origin + two lattice vectors)")
        if self.relative_to_peak is not None and not (
            isinstance(self.relative_to_peak, (int, np.integer)) and self.relative_to_peak >= 0
        ):
            bad("relative_to_peak", self.relative_to_peak, "None or an integer >= 0")
        if self.central_beam_mask_px is not None and not (
            len(self.central_beam_mask_px) == 2 and 0 <= self.central_beam_mask_px[0] < self.central_beam_mask_px[1]
        ):
            bad("central_beam_mask_px", self.central_beam_mask_px, "None or (inner, outer) px with 0 <= inner < outer")
        if self.edge_boundary_px is not None and not (
            isinstance(self.edge_boundary_px, (int, np.integer)) and self.edge_boundary_px >= 1
        ):
            bad("edge_boundary_px", self.edge_boundary_px, "None or an integer >= 1 (py4DSTEM asserts an int)")
        for name in ("max_peak_spacing_px", "shell_tolerance", "orientation_tolerance_deg", "max_strain"):
            if not getattr(self, name) > 0:
                bad(name, getattr(self, name), "> 0")
        if self.min_peak_spacing_px is not None and not self.min_peak_spacing_px >= 0:
            bad("min_peak_spacing_px", self.min_peak_spacing_px, "None or >= 0 px")
        if self.origin is not None and len(self.origin) != 2:
            bad("origin", self.origin, "None or (qx0, qy0) in px")
        if not 0.0 <= self.vacuum_threshold < 1.0:
            bad("vacuum_threshold", self.vacuum_threshold, "a fraction in [0, 1)")
        if self.ellipse != "none" and self.method != "perpattern":
            bad("ellipse", self.ellipse, "'none' with method='strainmap' (the ellipse fit is 'perpattern' only)")
        if self.blas_threads is not None and not self.blas_threads >= 1:
            bad("blas_threads", self.blas_threads, "None or an integer >= 1")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary of all fields."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Py4DSTEMConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown Py4DSTEMConfig keys {unknown}; known: {sorted(names)}")
        kw = dict(d)
        return cls(**_tuple_fields(kw))


# ----------------------------------------------------------------------------------------------- small pure helpers
def canonical_lattice(lattice: str) -> str:
    """``"hex"``, ``"square"`` or ``"rect"`` for any accepted spelling (``"hexagonal"``, ``"rectangular"``)."""
    name = LATTICE_ALIASES.get(str(lattice).strip().lower(), str(lattice).strip().lower())
    if name not in LATTICE_ANGLE_DEG:
        raise ValueError(
            f"lattice = {lattice!r}: expected one of {tuple(LATTICE_ANGLE_DEG) + tuple(LATTICE_ALIASES)}"
        )
    return name


def _lattice_angle(lattice: str) -> float:
    return LATTICE_ANGLE_DEG[canonical_lattice(lattice)]


def _rotation_period(lattice: str) -> float:
    return ROTATION_PERIOD_DEG[canonical_lattice(lattice)]


def lattice_symmetry(lattice: str) -> int:
    """Rotational order n of the lattice's pattern (6 hex, 4 square, 2 rectangular)."""
    return int(round(360.0 / _rotation_period(lattice)))


def default_g1_angle_deg(lattice: str = "hex") -> float:
    """Direction (deg from +Qx toward +Qy) of an unstrained first-order spot at rotation 0.

    The project's convention (``ccstae_jax.data.simulate``): the real-space basis has a1 = a (1, 0) along +x and,
    for the hexagonal lattice, a2 = a (-1/2, sqrt(3)/2); the reciprocal b1 = (1, 1/sqrt(3)) / a then points at
    30 deg (hex; spots at 30 + n 60 deg) and at 0 deg for the square and rectangular lattices.
    """
    return 30.0 if _lattice_angle(lattice) == 60.0 else 0.0


def reference_basis(
    g1_length_px: float, lattice: str = "hex", *, g1_angle_deg: float | None = None, aspect: float = 1.0
) -> np.ndarray:
    """Unstrained reciprocal basis in detector pixels.

    Args:
        g1_length_px: |g1| of the unstrained lattice (px): the reciprocal vector b1 of the real-space a1.
        lattice: ``"hex"`` (g2 at +60 deg from g1), ``"square"`` (g2 at +90 deg) or ``"rect"`` (g2 at +90 deg,
            ``|g2| = |g1| / aspect``); the simulator's ``"hexagonal"``/``"rectangular"`` are accepted too.
        g1_angle_deg: Direction of g1 at rotation 0, deg from +Qx toward +Qy; ``None`` =
            :func:`default_g1_angle_deg` (30 deg hex, 0 deg square and rect: real-space a1 along +x).
        aspect: ``b / a`` of the rectangular lattice (real-space a2 = b (0, 1)); ignored otherwise.

    Returns:
        (2, 2) array, columns g1 (at ``g1_angle_deg``) and g2 (at ``g1_angle_deg`` + 60/90 deg), rows (qx, qy).
    """
    step = _lattice_angle(lattice)
    if canonical_lattice(lattice) == "rect" and not (float(aspect) > 0 and math.isfinite(float(aspect))):
        raise ValueError(f"aspect = {aspect!r}: expected b / a > 0 for the rectangular lattice")
    g2_scale = 1.0 / float(aspect) if canonical_lattice(lattice) == "rect" else 1.0
    a1 = math.radians(default_g1_angle_deg(lattice) if g1_angle_deg is None else float(g1_angle_deg))
    a2 = a1 + math.radians(step)
    return float(g1_length_px) * np.array(
        [[math.cos(a1), g2_scale * math.cos(a2)], [math.sin(a1), g2_scale * math.sin(a2)]]
    )


def shortest_spacing(g_ref: np.ndarray) -> float:
    """Length of the shortest non-zero lattice vector h g1 + k g2 of a (2, 2) basis (columns g1, g2), px."""
    hk = np.array([(h, k) for h in range(-2, 3) for k in range(-2, 3) if (h, k) != (0, 0)], np.float64)
    return float(np.min(np.linalg.norm(hk @ np.asarray(g_ref, np.float64).T, axis=1)))


def strain_from_reciprocal_bases(
    g_meas: np.ndarray, g_ref: np.ndarray, *, period_deg: float | None = 60.0
) -> dict[str, np.ndarray]:
    """Exact lab-frame strain and rotation from measured vs unstrained reciprocal bases.

    ``T = G_meas G_ref^-1`` (measured spot = T unstrained spot), real-space deformation ``D = T^-T``, left polar
    decomposition ``D = V R`` with ``V = sqrt(D D^T)``; ``eps = V - I``, ``theta = atan2(R[1, 0], R[0, 0])``.

    Args:
        g_meas: (..., 2, 2) measured basis, columns g1, g2, rows (qx, qy) in px.
        g_ref: (2, 2) or (..., 2, 2) unstrained basis in the same indices.
        period_deg: Report the rotation modulo this period (deg) in [0, period); ``None`` = (-pi, pi].

    Returns:
        dict of (...) arrays: ``strain_xx``, ``strain_yy``, ``shear_xy`` (dimensionless, tensor shear) and
        ``rotation`` (radians, CCW from +Qx toward +Qy).
    """
    g_meas = np.asarray(g_meas, dtype=np.float64)
    t = g_meas @ np.linalg.inv(np.asarray(g_ref, dtype=np.float64))
    d = np.swapaxes(np.linalg.inv(t), -1, -2)
    w, u = np.linalg.eigh(d @ np.swapaxes(d, -1, -2))
    v = (u * np.sqrt(np.clip(w, 0.0, None))[..., None, :]) @ np.swapaxes(u, -1, -2)
    r = np.linalg.inv(v) @ d
    theta = np.arctan2(r[..., 1, 0], r[..., 0, 0])
    if period_deg is not None:
        theta = np.mod(theta, math.radians(period_deg))
        theta = np.where(theta >= math.radians(period_deg), 0.0, theta)  # float round-up at the period
    return {
        "strain_xx": v[..., 0, 0] - 1.0,
        "strain_yy": v[..., 1, 1] - 1.0,
        "shear_xy": 0.5 * (v[..., 0, 1] + v[..., 1, 0]),
        "rotation": theta,
    }


def _attr(attrs: Mapping[str, Any], *names: str):
    for n in names:
        if n in attrs:
            v = attrs[n]
            return v.decode() if isinstance(v, bytes) else v
    return None


def _lattice_from_attrs(attrs: Mapping[str, Any]) -> str | None:
    lat = _attr(attrs, "lattice")
    if isinstance(lat, str):
        try:
            return canonical_lattice(lat)
        except ValueError:
            pass
    sym = _attr(attrs, "lattice_symmetry")
    if sym is not None:
        return {6: "hex", 4: "square", 2: "rect"}.get(int(np.asarray(sym).item()))
    return None


def lattice_aspect_from_attrs(attrs: Mapping[str, Any]) -> float:
    """``b / a`` of a rectangular lattice from the file attribute ``lattice_aspect`` (1.0 when absent)."""
    v = _attr(attrs, "lattice_aspect")
    return 1.0 if v is None else float(v)


def g1_length_from_attrs(attrs: Mapping[str, Any], *, lattice: str | None = None) -> float:
    """Unstrained first-order |g1| in detector pixels from our data file's root attributes.

    Uses ``g1_length_px`` if stored; else ``lattice_constant`` a (Å; of the reference phase when the scan holds
    several) and ``q_pixel`` (Å^-1 per px): hexagonal |g1| = 2 / (sqrt(3) a) / q_pixel (WS2: a = 3.153 Å,
    0.0096 Å^-1/px -> 38.1 px), square and rectangular 1 / a / q_pixel (g1 is the reciprocal of a1 = a (1, 0); the
    rectangular g2 is |g1| / ``lattice_aspect``). The lattice comes from ``lattice`` (argument), else the attrs
    ``lattice`` / ``lattice_symmetry`` (6 = hex, 4 = square, 2 = rect), else hexagonal. The attributes describe the
    stored detector grid (before any reader binning).

    Raises:
        ValueError: naming the missing or invalid attribute and listing those present.
    """
    direct = _attr(attrs, "g1_length_px")
    if direct is not None:
        return float(direct)
    a = _attr(attrs, "lattice_constant", "lattice_constant_A")
    q = _attr(attrs, "q_pixel", "q_pixel_size")
    if a is None or q is None:
        missing = [n for n, v in (("lattice_constant", a), ("q_pixel", q)) if v is None]
        raise ValueError(
            f"cannot get |g1| from the file attributes: missing {missing} (have {sorted(attrs)}); "
            "pass g1_length_px explicitly"
        )
    a, q = float(a), float(q)
    if not (a > 0 and q > 0):
        raise ValueError(f"lattice_constant = {a} Å and q_pixel = {q} 1/Å/px must both be > 0")
    lattice = canonical_lattice(lattice or _lattice_from_attrs(attrs) or "hex")
    return (2.0 / (math.sqrt(3.0) * a) if lattice == "hex" else 1.0 / a) / q


#: ``vacuum_threshold`` that :func:`config_from_attrs` sets for a scan with vacuum: on our simulations a pattern's
#: spot strength relative to the scan median is >= 0.6 on the specimen and <= 0.4 in vacuum at up to 50 % noise.
VACUUM_THRESHOLD = 0.5


def phase_mismatch_from_attrs(attrs: Mapping[str, Any]) -> float:
    """Largest relative lattice-constant difference ``max_p |a_p / a_0 - 1|`` of the file's ``phases`` attribute
    (a JSON list of ``[name, a]``, the reference phase first); 0 for one phase or none recorded."""
    raw = _attr(attrs, "phases")
    if raw is None:
        return 0.0
    try:
        phases = json.loads(raw) if isinstance(raw, str) else list(raw)
        consts = [float(p[1]) for p in phases]
    except (TypeError, ValueError, IndexError, json.JSONDecodeError):
        raise ValueError(f"file attribute phases = {raw!r}: expected a JSON list of [name, a] pairs") from None
    if len(consts) < 2 or not consts[0] > 0:
        return 0.0
    return float(max(abs(a / consts[0] - 1.0) for a in consts))


def config_from_attrs(attrs: Mapping[str, Any], **overrides) -> Py4DSTEMConfig:
    """A :class:`Py4DSTEMConfig` set up, as a careful user would, from what our simulated file's attributes say.

    * ``disk_radius_px`` / ``disk_radius`` -> ``probe_radius_px``; ``disk_edge_px`` / ``disk_edge`` (the
      simulator's tanh width w) -> ``probe_edge_px = 2 w``.
    * ``phases`` with several lattice constants (strain is fitted against the reference phase, so another phase
      appears as a strain of up to m = ``phase_mismatch_from_attrs``): ``max_strain`` and ``shell_tolerance``
      widen by m, so grains of every phase are indexed.
    * ``ellipticity`` > 0: ``ellipse = "fit"`` (the elliptical distortion is calibrated from the Bragg vector map
      of the whole scan, as py4DSTEM does; the true value is not used).
    * ``vacuum`` > 0: ``vacuum_threshold = VACUUM_THRESHOLD``, so patterns without specimen spots (the central
      beam and noise) hold no peaks and come out invalid.

    ``overrides`` replace any field.

    Raises:
        ValueError: no disk radius in ``attrs`` and none in ``overrides``; an unreadable ``phases`` attribute.
    """
    kw: dict[str, Any] = {}
    r = _attr(attrs, "disk_radius_px", "disk_radius")
    if r is not None:
        kw["probe_radius_px"] = float(r)
    w = _attr(attrs, "disk_edge_px", "disk_edge")
    if w is not None:
        kw["probe_edge_px"] = 2.0 * float(w)
    mismatch = phase_mismatch_from_attrs(attrs)
    if mismatch > 0:
        defaults = {f.name: f.default for f in dataclasses.fields(Py4DSTEMConfig)}
        kw["max_strain"] = defaults["max_strain"] + mismatch
        kw["shell_tolerance"] = defaults["shell_tolerance"] + mismatch
    e = _attr(attrs, "ellipticity")
    if e is not None and float(e) > 0:
        kw["ellipse"] = "fit"
    v = _attr(attrs, "vacuum")
    if v is not None and float(v) > 0:
        kw["vacuum_threshold"] = VACUUM_THRESHOLD
    kw.update(overrides)
    if "probe_radius_px" not in kw:
        raise ValueError(
            f"no disk radius in the file attributes (looked for 'disk_radius_px'; have {sorted(attrs)}): "
            "pass probe_radius_px (the diffraction-disk radius in detector pixels)"
        )
    return Py4DSTEMConfig(**kw)


def beam_centres(patterns: np.ndarray, *, radius_px: float, iterations: int = 2) -> np.ndarray:
    """Central-beam centre of each pattern: intensity centroid of the disk around the brightest region.

    The brightest pixel of the patterns box-filtered over the disk diameter starts the search; then the
    intensity centroid within ``radius_px + 1`` of the current estimate is taken ``iterations`` times.

    Args:
        patterns: (n, H, W) patterns.
        radius_px: Central-disk radius (px).
        iterations: Centroid refinements.

    Returns:
        (n, 2) float64 centres (qx, qy) = (row, col) in px.
    """
    from scipy.ndimage import uniform_filter

    patterns = np.asarray(patterns, dtype=np.float64)
    n, h, w = patterns.shape
    size = max(1, int(round(2 * radius_px)) | 1)
    smooth = uniform_filter(patterns, size=(1, size, size), mode="constant")
    flat = smooth.reshape(n, -1).argmax(axis=1)
    centres = np.column_stack([flat // w, flat % w]).astype(np.float64)
    half = int(math.ceil(radius_px + 1.0))
    for _ in range(iterations):
        for i in range(n):
            cx, cy = int(round(centres[i, 0])), int(round(centres[i, 1]))
            x0, x1 = max(0, cx - half), min(h, cx + half + 1)
            y0, y1 = max(0, cy - half), min(w, cy + half + 1)
            win = patterns[i, x0:x1, y0:y1]
            qx, qy = np.meshgrid(np.arange(x0, x1), np.arange(y0, y1), indexing="ij")
            inside = np.hypot(qx - centres[i, 0], qy - centres[i, 1]) <= radius_px + 1.0
            wt = np.where(inside, np.clip(win, 0.0, None), 0.0)
            total = wt.sum()
            if total > 0:
                centres[i] = (wt * qx).sum() / total, (wt * qy).sum() / total
    return centres


def suppress_central_beam(patterns: np.ndarray, centres: np.ndarray, *, radii_px) -> np.ndarray:
    """Multiply each pattern by a smooth annular window that removes the central beam.

    Window: 0 for ``rho < inner``, ``sin^2(pi/2 (rho - inner) / (outer - inner))`` between, 1 beyond ``outer``,
    ``rho`` = distance (px) from the pattern's centre.

    Args:
        patterns: (n, H, W) patterns.
        centres: (n, 2) centres (qx, qy) px, e.g. from :func:`beam_centres`.
        radii_px: (inner, outer) radii in px.

    Returns:
        (n, H, W) float64 windowed patterns.
    """
    patterns = np.asarray(patterns, dtype=np.float64)
    inner, outer = float(radii_px[0]), float(radii_px[1])
    _, h, w = patterns.shape
    qx = np.arange(h, dtype=np.float64)[None, :, None]
    qy = np.arange(w, dtype=np.float64)[None, None, :]
    c = np.asarray(centres, np.float64)
    rho = np.sqrt((qx - c[:, 0, None, None]) ** 2 + (qy - c[:, 1, None, None]) ** 2)
    t = np.clip((rho - inner) / (outer - inner), 0.0, 1.0)
    return patterns * np.sin(0.5 * np.pi * t) ** 2


# ----------------------------------------------------------------------------------------------- py4DSTEM access
def py4dstem_available() -> bool:
    """Whether py4DSTEM can be imported here (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("py4DSTEM") is not None


def _import_py4dstem():
    """Import py4DSTEM lazily, with the environment it needs; :class:`BaselineUnavailable` if missing."""
    os.environ.setdefault("MPLBACKEND", "Agg")  # harmless once matplotlib is loaded; py4DSTEM imports pyplot
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import py4DSTEM
            from emdfile import PointList
            from py4DSTEM.braggvectors import find_Bragg_disks
            from py4DSTEM.process.strain.latticevectors import fit_lattice_vectors, index_bragg_directions
    except ImportError as e:
        raise BaselineUnavailable(
            f"the py4DSTEM baseline needs py4DSTEM, which is not importable in {sys.executable} ({e}). "
            f"Install the optional extra: {INSTALL_HINT}"
        ) from e
    return dict(
        py4DSTEM=py4DSTEM,
        PointList=PointList,
        find_Bragg_disks=find_Bragg_disks,
        fit_lattice_vectors=fit_lattice_vectors,
        index_bragg_directions=index_bragg_directions,
    )


_OPENBLAS_SYMBOLS = [
    (f"{pre}openblas_get_num_threads{suf}", f"{pre}openblas_set_num_threads{suf}")
    for pre in ("scipy_", "")
    for suf in ("64_", "_64_", "")
]


def _openblas_controls() -> list[tuple[Callable[[], int], Callable[[int], None]]]:
    """(get, set) thread-count functions of every OpenBLAS loaded in this process (Linux; else empty)."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return []
    controls = []
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in _OPENBLAS_SYMBOLS:
            get, set_ = getattr(lib, get_name, None), getattr(lib, set_name, None)
            if get is not None and set_ is not None:
                get.restype = ctypes.c_int
                set_.argtypes = [ctypes.c_int]
                controls.append((get, set_))
                break
    return controls


@contextlib.contextmanager
def _limit_blas(n: int | None):
    """Limit numpy's BLAS threads to ``n`` inside the block (threadpoolctl, else OpenBLAS's own API via ctypes)."""
    if n is None:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    if threadpool_limits is not None:
        with threadpool_limits(limits=int(n), user_api="blas"):
            yield
        return
    controls = _openblas_controls()
    if not controls and os.environ.get("OPENBLAS_NUM_THREADS") != "1" and (os.cpu_count() or 1) > 1:
        warnings.warn(
            "py4DSTEM disk detection can be ~20x slower with multithreaded OpenBLAS (numpy >= 2) and the BLAS "
            "thread count could not be limited here. Set OPENBLAS_NUM_THREADS=1 before Python starts, install "
            "threadpoolctl, or use ccstae_jax.baselines.py4dstem.run_baseline_subprocess",
            RuntimeWarning,
            stacklevel=3,
        )
    before = [get() for get, _ in controls]
    for _, set_ in controls:
        set_(int(n))
    try:
        yield
    finally:
        for (_, set_), k in zip(controls, before):
            set_(k)


# ----------------------------------------------------------------------------------------------- input handling
class _Source:
    """Flat (n, H, W) float32 access to an in-memory (Rx, Ry, Qx, Qy) array or a streaming Scan."""

    def __init__(self, obj):
        self.attrs: Mapping[str, Any] | None = None
        array_like = hasattr(obj, "shape") and hasattr(obj, "dtype") and not hasattr(obj, "read")
        if isinstance(obj, np.ndarray) or array_like:
            arr = np.asarray(obj)
            if arr.ndim != 4:
                raise ValueError(
                    f"patterns must be a 4-D array (Rx, Ry, Qx, Qy); got shape {arr.shape}"
                )
            if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
                raise ValueError(f"patterns must be a real numeric array; got dtype {arr.dtype}")
            self.scan_shape = tuple(int(s) for s in arr.shape[:2])
            self.pattern_shape = tuple(int(s) for s in arr.shape[2:])
            flat = arr.reshape((-1,) + self.pattern_shape)
            self.read = lambda a, b: np.asarray(flat[a:b], dtype=np.float32)
            self.in_memory = arr
        elif all(hasattr(obj, n) for n in ("scan_shape", "pattern_shape", "read")):
            self.scan_shape = tuple(int(s) for s in obj.scan_shape)
            self.pattern_shape = tuple(int(s) for s in obj.pattern_shape)
            self.read = obj.read
            self.in_memory = None
            attrs = getattr(obj, "attrs", None)
            self.attrs = attrs if isinstance(attrs, Mapping) else None
            self._scan = obj
        else:
            raise TypeError(
                "patterns_or_scan must be a (Rx, Ry, Qx, Qy) array or a Scan (ccstae_jax.data.readers.open_scan) "
                f"with scan_shape, pattern_shape and read(start, stop); got {type(obj).__name__}"
            )
        if min(self.scan_shape) < 1:
            raise ValueError(f"empty scan: scan shape {self.scan_shape}")
        if min(self.pattern_shape) < 8:
            raise ValueError(f"patterns of shape {self.pattern_shape} are too small for disk detection")
        self.n = self.scan_shape[0] * self.scan_shape[1]

    def mean_pattern(self, chunk: int) -> np.ndarray:
        if self.in_memory is None and hasattr(self._scan, "mean_pattern"):
            return np.asarray(self._scan.mean_pattern(), dtype=np.float64)
        total = np.zeros(self.pattern_shape)
        for a in range(0, self.n, chunk):
            total += self.read(a, min(a + chunk, self.n)).sum(0, dtype=np.float64)
        return total / self.n


def _resolved(config: Py4DSTEMConfig, spacing_px: float) -> dict[str, Any]:
    """The parameters left to be derived (``None`` fields), from the disk radius and the shortest spacing (px)."""
    r = float(config.probe_radius_px)
    s = float(spacing_px)
    if s < 2.0 * r + 2.0:
        raise ValueError(
            f"disks of radius {r:g} px overlap or touch at the shortest lattice spacing {s:.3g} px (need spacing >= "
            "2 radius + 2 px): correlation disk detection cannot separate them; check probe_radius_px and |g1|"
        )
    suppress = config.central_beam == "suppress" and config.method == "perpattern"
    mask = None
    if suppress:
        if config.central_beam_mask_px is not None:
            mask = [float(v) for v in config.central_beam_mask_px]
        else:
            outer = min(r + 6.0, s - r - 1.0)
            mask = [min(r + 3.0, outer - 1.5), outer]
    trench = [r * config.trench[0], min(r * config.trench[1], s - r - 1.0)]
    return dict(
        central_beam="suppress" if suppress else "keep",
        central_beam_mask_px=mask,
        trench_px=trench if trench[1] > trench[0] else [r * config.trench[0], r * config.trench[1]],
        relative_to_peak=(
            (0 if suppress else 1) if config.relative_to_peak is None else int(config.relative_to_peak)
        ),
        min_peak_spacing_px=(
            0.45 * s if config.min_peak_spacing_px is None else float(config.min_peak_spacing_px)
        ),
        edge_boundary_px=(
            max(8, int(math.ceil(r + 3.0))) if config.edge_boundary_px is None else int(config.edge_boundary_px)
        ),
    )


def _make_kernel(p4d, config: Py4DSTEMConfig, pattern_shape, src: _Source, res) -> tuple[np.ndarray, dict]:
    """Cross-correlation template (H, W) with its centre at the array origin, as py4DSTEM expects."""
    py4DSTEM = p4d["py4DSTEM"]
    r = float(config.probe_radius_px)
    info: dict[str, Any] = {}
    if config.probe == "synthetic":
        probe = py4DSTEM.Probe.generate_synthetic_probe(radius=r, width=config.probe_edge_px, Qshape=pattern_shape)
        origin = (pattern_shape[0] / 2.0, pattern_shape[1] / 2.0)
    else:
        from py4DSTEM.process.calibration import get_probe_size

        mean = src.mean_pattern(config.chunk_size)
        r_est, qx0, qy0 = get_probe_size(mean)
        qx, qy = np.meshgrid(np.arange(pattern_shape[0]), np.arange(pattern_shape[1]), indexing="ij")
        disk = np.hypot(qx - qx0, qy - qy0) < 1.3 * r
        probe = py4DSTEM.Probe(mean * disk)
        origin = (float(qx0), float(qy0))
        info.update(mean_pattern_radius_estimate_px=float(r_est), mean_pattern_centre_px=[float(qx0), float(qy0)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if config.kernel == "sigmoid":
            kernel = probe.get_kernel(mode="sigmoid", origin=origin, radii=tuple(res["trench_px"]))
        else:
            kernel = probe.get_kernel(mode="flat", origin=origin)
    kernel = np.asarray(getattr(kernel, "data", kernel), dtype=np.float64)
    if not np.all(np.isfinite(kernel)):
        raise ValueError(f"the {config.kernel!r} kernel from the {config.probe!r} probe is not finite")
    return kernel, info


def _detect(p4d, patterns: np.ndarray, kernel: np.ndarray, config: Py4DSTEMConfig, res: dict) -> list[np.ndarray]:
    """py4DSTEM disk detection on (n, H, W) patterns -> per pattern (m, 3) array of (qx, qy, intensity) px."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = p4d["find_Bragg_disks"](np.asarray(patterns, dtype=np.float64), kernel,
                                        sigma_cc=config.sigma_cc, **_detection_kwargs(config, res))
    if not isinstance(found, list):
        found = [found]
    return [np.column_stack([q.qx, q.qy, q.intensity]).astype(np.float64) for q in found]


def _vote_orientations(dx, dy, inten, g_ref: np.ndarray, period: float, config: Py4DSTEMConfig) -> list[float]:
    """Candidate lattice rotations (deg, modulo ``period``) from peaks matching low-order reference shells.

    Every peak whose radius matches a reference lattice vector v (|v| <= 2.05 |g1|) within ``shell_tolerance``
    votes, weighted by its intensity, for the rotation angle(q) - angle(v). Returns up to
    ``orientation_candidates`` vote maxima (at least 2 x ``orientation_tolerance_deg`` apart), best first, each
    refined as the weighted circular mean of the votes within ``orientation_tolerance_deg``.
    """
    hk = np.array([(h, k) for h in range(-3, 4) for k in range(-3, 4) if (h, k) != (0, 0)])
    v = hk @ g_ref.T
    vr = np.hypot(v[:, 0], v[:, 1])
    g = vr.min()
    v, vr = v[vr <= 2.05 * g], vr[vr <= 2.05 * g]
    va = np.degrees(np.arctan2(v[:, 1], v[:, 0]))
    r = np.hypot(dx, dy)
    a = np.degrees(np.arctan2(dy, dx))
    match = np.abs(r[:, None] / vr[None, :] - 1.0) < config.shell_tolerance  # (peaks, ref vectors)
    pi, vi = np.nonzero(match)
    if len(pi) == 0:
        return []
    phi = np.mod(a[pi] - va[vi], period)
    w = np.clip(inten[pi], 0.0, None) + 1e-12
    tol = config.orientation_tolerance_deg
    # circular histogram in 0.25 deg bins, smoothed over +-tol
    nb = int(round(period / 0.25))
    hist = np.bincount(np.floor(phi / 0.25).astype(int) % nb, weights=w, minlength=nb)
    half = max(1, int(round(tol / 0.25)))
    kernel = np.ones(2 * half + 1)
    smooth = np.convolve(np.concatenate([hist[-half:], hist, hist[:half]]), kernel, mode="valid")
    out: list[float] = []
    for b in np.argsort(-smooth):
        if smooth[b] <= 0 or len(out) >= config.orientation_candidates:
            break
        centre = (b + 0.5) * 0.25
        if any(abs((centre - c + period / 2) % period - period / 2) < 2 * tol for c in out):
            continue
        d = (phi - centre + period / 2) % period - period / 2
        near = np.abs(d) <= tol + 0.25
        shift = np.sum(w[near] * d[near]) / np.sum(w[near]) if near.any() else 0.0
        out.append(float(np.mod(centre + shift, period)))
    return out


def _fit_one(p4d, peaks: np.ndarray, seed, g_ref: np.ndarray, config: Py4DSTEMConfig, period: float):
    """Per-pattern lattice fit around the origin ``seed`` (px): orientation vote, py4DSTEM indexing and fit.

    For each candidate orientation phi, the rotated unstrained lattice R(phi) G_ref indexes all peaks
    (``index_bragg_directions``); peaks within ``max_peak_spacing_px + max_strain |q|`` of their site are fitted
    (``fit_lattice_vectors``: origin, g1, g2), then all peaks are re-indexed against the fitted lattice with
    ``max_peak_spacing_px`` and refitted until the indexed set is stable. The candidate indexing the most peaks
    wins.

    Returns (x0, y0, G (2, 2) columns g1 g2 in G_ref's indices, error, n_indexed) or None.
    """
    if len(peaks) < config.min_num_peaks:
        return None
    qx, qy, inten = peaks[:, 0], peaks[:, 1], peaks[:, 2]
    x0, y0 = float(seed[0]), float(seed[1])
    dx, dy = qx - x0, qy - y0
    weights = inten if config.fit_weights == "intensity" else np.ones_like(inten)
    g = float(np.linalg.norm(g_ref[:, 0]))
    g_len = np.linalg.norm(g_ref, axis=0)
    best = None
    for phi in _vote_orientations(dx, dy, inten, g_ref, period, config):
        c, s_ = math.cos(math.radians(phi)), math.sin(math.radians(phi))
        g0 = np.array([[c, -s_], [s_, c]]) @ g_ref
        ox, oy, gm = x0, y0, g0
        tol = config.max_peak_spacing_px + config.max_strain * np.hypot(dx, dy)
        ok = None
        fit = None
        for _ in range(config.refine_iterations + 1):
            h, k, _ = p4d["index_bragg_directions"](ox, oy, qx, qy, tuple(gm[:, 0]), tuple(gm[:, 1]))
            pred_x = ox + h * gm[0, 0] + k * gm[0, 1]
            pred_y = oy + h * gm[1, 0] + k * gm[1, 1]
            ok_new = np.hypot(qx - pred_x, qy - pred_y) < tol
            if ok is not None and np.array_equal(ok_new, ok):
                break
            ok = ok_new
            fit = _lattice_fit(p4d, qx, qy, weights, h, k, ok, x0, y0, config.min_num_peaks)
            if fit is None:
                break
            ox, oy, gm, _ = fit
            tol = config.max_peak_spacing_px
        if fit is None:
            continue
        gm = fit[2]
        if not np.all(np.isfinite(gm)) or abs(np.linalg.det(gm)) < 1e-9 * g * g:
            continue
        # the fitted basis must stay close to the rotated reference basis
        if np.any(np.abs(np.linalg.norm(gm, axis=0) / g_len - 1.0) > config.max_strain):
            continue
        n_ok = int(ok.sum())
        if best is None or n_ok > best[-1] or (n_ok == best[-1] and fit[3] < best[3]):
            best = (*fit, n_ok)
    return best


def _lattice_fit(p4d, qx, qy, weights, h, k, ok, x0, y0, min_num_peaks):
    """py4DSTEM ``fit_lattice_vectors`` on the peaks selected by ``ok`` -> (ox, oy, G, error) or None."""
    n_ok = int(ok.sum())
    if n_ok < min_num_peaks:
        return None
    pl = p4d["PointList"](
        data=np.zeros(
            n_ok,
            dtype=[("qx", float), ("qy", float), ("intensity", float), ("g1_ind", int), ("g2_ind", int)],
        )
    )
    pl.data["qx"], pl.data["qy"], pl.data["intensity"] = qx[ok], qy[ok], weights[ok]
    pl.data["g1_ind"], pl.data["g2_ind"] = h[ok], k[ok]
    fit = p4d["fit_lattice_vectors"](pl, x0, y0, minNumPeaks=min_num_peaks)
    if fit[0] is None:
        return None
    fx0, fy0, g1x, g1y, g2x, g2y, err = fit
    # fit_lattice_vectors fits q - (x0, y0) = origin_offset + h g1 + k g2
    return float(x0 + fx0), float(y0 + fy0), np.array([[g1x, g2x], [g1y, g2y]], dtype=np.float64), float(err)


def _drop_vacuum(peaks: list[np.ndarray], seeds: np.ndarray, fraction: float, min_radius_px: float):
    """Empties the peak lists of patterns whose spot strength is below ``fraction`` of the scan median.

    Spot strength: the brightest peak at least ``min_radius_px`` from the pattern's beam centre (0 if none).
    Returns (peaks, threshold in intensity units, number of patterns emptied).
    """
    strength = np.zeros(len(peaks))
    for i, (p, c) in enumerate(zip(peaks, seeds)):
        if len(p):
            far = np.hypot(p[:, 0] - c[0], p[:, 1] - c[1]) >= min_radius_px
            strength[i] = p[far, 2].max(initial=0.0)
    threshold = float(fraction * np.median(strength)) if len(strength) else 0.0
    empty = strength < threshold
    return [p[:0] if e else p for p, e in zip(peaks, empty)], threshold, int(empty.sum())


def _fit_ellipse(peaks, seeds, spacing_px: float, *, sampling: int = 4) -> dict[str, Any]:
    """Elliptical distortion from the first-order ring of the Bragg vector map (py4DSTEM's ``fit_ellipse_1D``).

    The map accumulates every peak at its offset from its pattern's beam centre (bilinear, weighted by intensity)
    on a grid ``sampling`` times finer than the detector's (as py4DSTEM's ``BraggVectors.histogram(sampling=...)``;
    coarse bins bias the fitted axes by the bins' spread), centred on a zero offset; the ellipse is fitted to the
    map within 0.85-1.15 ``spacing_px`` of the centre.

    Returns:
        dict: ``a``, ``b`` (semi-axes, px), ``theta`` (radians from +Qx toward +Qy of the major axis), ``centre``
        (offset of the ellipse centre from the beam centres, px), ``ellipticity`` ``(a - b) / ((a + b) / 2)`` and
        ``correction``: the (2, 2) unit-determinant matrix ``T / sqrt(det T)`` with ``T = I - (1 - b/a) u u^T``
        (``u`` along the major axis: py4DSTEM's elliptical correction of calibrated Bragg vectors), which maps the
        fitted ellipse onto a circle of radius ``sqrt(a b)``.
    """
    from py4DSTEM.process.calibration import fit_ellipse_1D

    half = int(math.ceil(1.25 * spacing_px * sampling)) + 2
    size = 2 * half + 1
    bvm = np.zeros((size, size))
    for p, c in zip(peaks, seeds):
        if len(p) == 0:
            continue
        x, y = (p[:, 0] - c[0]) * sampling + half, (p[:, 1] - c[1]) * sampling + half
        ok = (x >= 0) & (y >= 0) & (x < size - 1) & (y < size - 1)
        x, y, w = x[ok], y[ok], np.clip(p[ok, 2], 0.0, None)
        x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
        fx, fy = x - x0, y - y0
        np.add.at(bvm, (x0, y0), w * (1 - fx) * (1 - fy))
        np.add.at(bvm, (x0 + 1, y0), w * fx * (1 - fy))
        np.add.at(bvm, (x0, y0 + 1), w * (1 - fx) * fy)
        np.add.at(bvm, (x0 + 1, y0 + 1), w * fx * fy)
    radii = (0.85 * spacing_px * sampling, 1.15 * spacing_px * sampling)
    qx, qy = np.meshgrid(np.arange(size) - half, np.arange(size) - half, indexing="ij")
    ring = (np.hypot(qx, qy) > radii[0]) & (np.hypot(qx, qy) <= radii[1])
    if not np.any(bvm[ring] > 0):
        raise ValueError(
            f"ellipse fit: the Bragg vector map holds no peak within {0.85 * spacing_px:.1f}-"
            f"{1.15 * spacing_px:.1f} px of the beam centre (no first-order spots detected); use ellipse='none'"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x0, y0, a, b, theta = fit_ellipse_1D(bvm, center=(half, half), fitradii=radii)
    a, b, theta = float(a) / sampling, float(b) / sampling, float(theta)
    if not (np.isfinite([a, b, theta]).all() and 0 < b <= a):
        raise ValueError(f"ellipse fit failed on the Bragg vector map: semi-axes {a!r}, {b!r}")
    u = np.array([math.cos(theta), math.sin(theta)])
    t = np.eye(2) - (1.0 - b / a) * np.outer(u, u)
    return dict(
        a=a,
        b=b,
        theta=theta,
        centre=[(float(x0) - half) / sampling, (float(y0) - half) / sampling],
        ellipticity=(a - b) / (0.5 * (a + b)),
        correction=t / math.sqrt(np.linalg.det(t)),
    )


def _correct_ellipse(peaks: np.ndarray, centre, correction: np.ndarray) -> np.ndarray:
    """Peaks (m, 3) with positions mapped to ``centre + C (q - centre)``; intensities kept."""
    if len(peaks) == 0:
        return peaks
    out = peaks.copy()
    d = peaks[:, :2] - np.asarray(centre, np.float64)
    out[:, :2] = np.asarray(centre, np.float64) + d @ np.asarray(correction).T
    return out


# ----------------------------------------------------------------------------------------------- public API
def py4dstem_strain_map(
    patterns_or_scan,
    *,
    config: Py4DSTEMConfig,
    g1_length_px: float | None = None,
    lattice: str = "hex",
    g1_angle_deg: float | None = None,
    lattice_aspect: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Strain map of a 4D-STEM scan by py4DSTEM disk detection + per-pattern lattice fit (the baseline).

    Args:
        patterns_or_scan: (Rx, Ry, Qx, Qy) array, or a streaming ``Scan`` from
            ``ccstae_jax.data.readers.open_scan`` (``scan_shape``, ``pattern_shape``, ``read(start, stop)`` ->
            (n, H, W) float32 for flat row-major positions), read ``config.chunk_size`` patterns at a time.
        config: Detection and fit parameters (``probe_radius_px`` is required; see :func:`config_from_attrs`).
        g1_length_px: Unstrained first-order |g1| (px); see :func:`g1_length_from_attrs`. ``None``: from the scan's
            ``attrs`` if it has them, else estimated as the scan median first-shell radius (strain then relative
            to that median lattice; recorded as ``g1_length_source = "estimated"``).
        lattice: ``"hex"`` (rotation period 60 deg), ``"square"`` (90 deg) or ``"rect"`` (180 deg); the
            simulator's ``"hexagonal"``/``"rectangular"`` are accepted.
        g1_angle_deg: Direction of an unstrained first-order spot at rotation 0 (deg from +Qx toward +Qy): fixes
            what rotation 0 means. ``None`` = the scan's ``attrs["g1_angle_deg"]`` if present, else
            :func:`default_g1_angle_deg` (30 deg hex / 0 deg square and rect: real-space a1 along +x, as our
            simulator). Strain does not depend on it.
        lattice_aspect: ``b / a`` of a rectangular lattice (see :func:`reference_basis`); ``None`` = the scan's
            ``attrs["lattice_aspect"]``, else 1.
        progress: Show a tqdm progress bar (also honours ``TQDM_DISABLE``).

    Returns:
        dict with (Rx, Ry) arrays ``strain_xx``, ``strain_yy``, ``shear_xy`` (float64, dimensionless),
        ``rotation`` (float64 radians in [0, period)), ``valid`` (bool), ``n_peaks`` (int32, peaks used in the
        fit incl. the central beam), ``n_detected`` (int32; 0 where the vacuum test emptied the pattern),
        ``fit_error`` (float64 px, intensity-weighted mean residual); (Rx, Ry, 2) ``origin``, ``g1``, ``g2``
        (fitted, px, (qx, qy)); and ``parameters`` (JSON string: configuration, resolved values, |g1|, lattice,
        symmetry, the fitted ellipse and the vacuum test when used, method, py4DSTEM version, timings). Invalid
        positions hold NaN. Conventions: see the module docstring (absolute lab-frame strain, x = Qx = rows).

    Raises:
        BaselineUnavailable: py4DSTEM is not installed.
        ValueError / TypeError: bad input (shape, dtype, config, lattice).
    """
    if not isinstance(config, Py4DSTEMConfig):
        raise TypeError(f"config must be a Py4DSTEMConfig; got {type(config).__name__}")
    lattice = canonical_lattice(lattice)
    period = _rotation_period(lattice)
    src = _Source(patterns_or_scan)
    if lattice_aspect is None:
        lattice_aspect = lattice_aspect_from_attrs(src.attrs) if src.attrs is not None else 1.0
    if lattice == "rect" and config.method == "strainmap":
        raise ValueError("method='strainmap' supports hex and square lattices only; use method='perpattern'")
    if g1_length_px is not None and not float(g1_length_px) > 0:
        raise ValueError(f"g1_length_px = {g1_length_px!r}: expected a positive number of detector pixels")
    if g1_angle_deg is None and src.attrs is not None and _attr(src.attrs, "g1_angle_deg") is not None:
        g1_angle_deg = float(_attr(src.attrs, "g1_angle_deg"))
    if g1_angle_deg is None:
        g1_angle_deg = default_g1_angle_deg(lattice)
    p4d = _import_py4dstem()
    if config.method == "strainmap":
        return _strainmap_method(
            p4d, src, config=config, g1_length_px=g1_length_px, lattice=lattice, g1_angle_deg=g1_angle_deg
        )

    t_start = time.perf_counter()
    g1_source = "argument"
    if g1_length_px is None and src.attrs is not None:
        try:
            g1_length_px = g1_length_from_attrs(src.attrs, lattice=lattice)
            g1_source = "file attributes"
        except ValueError:
            g1_length_px = None
    estimate = g1_length_px is None
    # shortest unstrained spacing per unit |g1| (1 for hex and square; min(1, 1 / aspect) for rect)
    unit_spacing = shortest_spacing(reference_basis(1.0, lattice, aspect=lattice_aspect))
    # With |g1| unknown, detection uses a provisional spacing from the probe radius; |g1| is estimated afterwards.
    spacing = unit_spacing * g1_length_px if not estimate else 4.0 * config.probe_radius_px / 0.45
    res = _resolved(config, spacing)
    if estimate and config.min_peak_spacing_px is None:
        res["min_peak_spacing_px"] = 4.0 * float(config.probe_radius_px)
    mask_radii = res["central_beam_mask_px"]
    if mask_radii is not None and not estimate and mask_radii[1] > spacing - config.probe_radius_px - 1.0:
        raise ValueError(
            f"central_beam_mask_px outer radius {mask_radii[1]:g} px would cut the first-order disks "
            f"(shortest spacing {spacing:.3g} px, disk radius {config.probe_radius_px:g} px); pass a smaller "
            "central_beam_mask_px or central_beam='keep'"
        )

    with _limit_blas(config.blas_threads):
        kernel, kinfo = _make_kernel(p4d, config, src.pattern_shape, src, res)
        t_kernel = time.perf_counter()
        peaks: list[np.ndarray] = []
        seeds: list[np.ndarray] = []
        bar = _progress(src.n, progress, "py4DSTEM disk detection")
        try:
            for a in range(0, src.n, config.chunk_size):
                b = min(a + config.chunk_size, src.n)
                chunk = np.asarray(src.read(a, b), dtype=np.float64)
                if chunk.shape != (b - a,) + src.pattern_shape:
                    raise ValueError(
                        f"scan.read({a}, {b}) returned shape {chunk.shape}; expected {(b - a,) + src.pattern_shape}"
                    )
                if config.origin is None:
                    centres = beam_centres(chunk, radius_px=config.probe_radius_px)
                else:
                    centres = np.broadcast_to(np.asarray(config.origin, np.float64), (b - a, 2))
                if mask_radii is not None:
                    chunk = suppress_central_beam(chunk, centres, radii_px=mask_radii)
                seeds.append(centres)
                peaks.extend(_detect(p4d, chunk, kernel, config, res))
                bar.update(b - a)
        finally:
            bar.close()
    seed = np.concatenate(seeds, 0)
    t_detect = time.perf_counter()

    if estimate:
        g1_length_px = _estimate_g1(peaks, seed, config) / unit_spacing
        g1_source = "estimated (scan median first-shell radius; strain relative to it)"
    g_ref = reference_basis(g1_length_px, lattice, g1_angle_deg=g1_angle_deg, aspect=lattice_aspect)
    extra: dict[str, Any] = {}
    if config.vacuum_threshold > 0:
        peaks, threshold, n_vacuum = _drop_vacuum(peaks, seed, config.vacuum_threshold, 0.5 * shortest_spacing(g_ref))
        extra["vacuum"] = dict(spot_strength_threshold=threshold, patterns=n_vacuum)
    if config.ellipse == "fit":
        ell = _fit_ellipse(peaks, seed, shortest_spacing(g_ref))
        peaks = [_correct_ellipse(p, c, ell["correction"]) for p, c in zip(peaks, seed)]
        extra["ellipse"] = {k: (np.asarray(v).tolist() if k == "correction" else v) for k, v in ell.items()}

    n = src.n
    gm = np.full((n, 2, 2), np.nan)
    origin = np.full((n, 2), np.nan)
    err = np.full(n, np.nan)
    n_used = np.zeros(n, np.int32)
    n_det = np.array([len(p) for p in peaks], np.int32)
    for i, p in enumerate(peaks):
        fit = _fit_one(p4d, p, seed[i], g_ref, config, period)
        if fit is None:
            continue
        origin[i] = fit[0], fit[1]
        gm[i], err[i], n_used[i] = fit[2], fit[3], fit[4]
    valid = np.all(np.isfinite(gm.reshape(n, 4)), axis=1)
    strain = {k: np.full(n, np.nan) for k in MAP_KEYS}
    if valid.any():
        s = strain_from_reciprocal_bases(gm[valid], g_ref, period_deg=period)
        for k in MAP_KEYS:
            strain[k][valid] = s[k]
    t_fit = time.perf_counter()

    shape = src.scan_shape
    params = dict(
        method="perpattern",
        config=config.to_dict(),
        resolved=res,
        g1_length_px=float(g1_length_px),
        g1_length_source=g1_source,
        lattice=lattice,
        lattice_aspect=float(lattice_aspect),
        symmetry=lattice_symmetry(lattice),
        rotation_period_deg=period,
        g1_angle_deg=float(g1_angle_deg),
        reference_basis_px=g_ref.tolist(),
        **extra,
        py4dstem_version=str(getattr(p4d["py4DSTEM"], "__version__", "unknown")),
        numpy_version=np.__version__,
        scan_shape=list(shape),
        pattern_shape=list(src.pattern_shape),
        valid_fraction=float(valid.mean()),
        seconds=dict(kernel=t_kernel - t_start, detect=t_detect - t_kernel, fit=t_fit - t_detect),
        ms_per_pattern=dict(detect=1e3 * (t_detect - t_kernel) / n, fit=1e3 * (t_fit - t_detect) / n),
        conventions=CONVENTIONS,
        **kinfo,
    )
    out: dict[str, Any] = {k: strain[k].reshape(shape) for k in MAP_KEYS}
    out.update(
        valid=valid.reshape(shape),
        n_peaks=n_used.reshape(shape),
        n_detected=n_det.reshape(shape),
        fit_error=err.reshape(shape),
        origin=origin.reshape(shape + (2,)),
        g1=gm[:, :, 0].reshape(shape + (2,)),
        g2=gm[:, :, 1].reshape(shape + (2,)),
        parameters=json.dumps(params),
    )
    return out


def _estimate_g1(peaks: list[np.ndarray], seed: np.ndarray, config: Py4DSTEMConfig) -> float:
    """Median over patterns of the distance from the beam centre to the nearest peak beyond 2 disk radii."""
    radii = []
    for p, (x0, y0) in zip(peaks, seed):
        if len(p) == 0:
            continue
        r = np.hypot(p[:, 0] - x0, p[:, 1] - y0)
        r = r[r > 2.0 * config.probe_radius_px]
        if len(r):
            radii.append(r.min())
    if not radii:
        raise ValueError("cannot estimate |g1|: no pattern has a diffracted peak; pass g1_length_px")
    return float(np.median(radii))


def _progress(total: int, enabled: bool, desc: str):
    class _Null:
        def update(self, n):
            pass

        def close(self):
            pass

    if not enabled:
        return _Null()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Null()
    return tqdm(total=total, desc=desc, unit="pattern")


_STRAINMAP_MAX_BYTES = 8 * 2**30


def _strainmap_method(
    p4d, src: _Source, *, config: Py4DSTEMConfig, g1_length_px, lattice, g1_angle_deg: float
) -> dict[str, Any]:
    """py4DSTEM's own ``StrainMap`` workflow: one basis picked on the Bragg vector map for the whole scan.

    Valid only when every grain shares (nearly) one orientation. The basis is chosen explicitly as the shortest
    Bragg-vector-map vector g1 and the shortest one at the lattice angle (60 or 120 deg hex, 90 deg square) from
    it — py4DSTEM's automatic g2 picks a non-primitive vector on hexagonal lattices. If no such pair exists (e.g.
    the map smeared into rings by many orientations) a ``ValueError`` is raised instead of a silently wrong map.
    Strain is the exact polar decomposition against the known lattice (``g1_length_px``) in the picked basis, or,
    when ``g1_length_px`` is None, against the picked Bragg-vector-map basis (relative to the scan mean).
    The central beam is kept (py4DSTEM's origin calibration and Bragg vector map need it), so 'multicorr' carries the
    central-beam ringing bias described at ``Py4DSTEMConfig.central_beam``: 2.5e-4 strain_xx MAE on a noise-free
    unrotated grain whose spots lie on the detector axes (use ``subpixel='poly'`` to avoid it).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    py4DSTEM = p4d["py4DSTEM"]
    angle = _lattice_angle(lattice)
    nbytes = src.n * src.pattern_shape[0] * src.pattern_shape[1] * 4
    if src.in_memory is None and nbytes > _STRAINMAP_MAX_BYTES:
        raise ValueError(
            f"method='strainmap' needs the whole scan in memory ({nbytes / 2**30:.1f} GiB > "
            f"{_STRAINMAP_MAX_BYTES / 2**30:.0f} GiB); use method='perpattern', which streams"
        )
    t0 = time.perf_counter()
    data = src.in_memory
    if data is None:
        data = src.read(0, src.n).reshape(src.scan_shape + src.pattern_shape)
    g_guess = g1_length_px if g1_length_px is not None else 4.0 * config.probe_radius_px / 0.45
    res = _resolved(config, g_guess)
    show = plt.show
    plt.show = lambda *a, **k: None  # StrainMap methods always draw
    try:
        with _limit_blas(config.blas_threads), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dc = py4DSTEM.DataCube(data=np.asarray(data, dtype=np.float32))
            kernel, kinfo = _make_kernel(p4d, config, src.pattern_shape, src, res)
            t1 = time.perf_counter()
            bv = dc.find_Bragg_disks(template=kernel, sigma=config.sigma_cc, **_detection_kwargs(config, res))
            t2 = time.perf_counter()
            if config.origin is not None:
                bv.calibration.set_origin((float(config.origin[0]), float(config.origin[1])))
            else:
                bv.measure_origin()
                bv.fit_origin(fitfunction="plane", plot=False)
            sm = py4DSTEM.StrainMap(braggvectors=bv)
            kw = dict(
                minRelativeIntensity=config.bvm_min_relative_intensity,
                relativeToPeak=1,  # the brightest diffracted spot; 0 is the central beam (~300x brighter)
                minSpacing=res["min_peak_spacing_px"],
                edgeBoundary=1,
                maxNumPeaks=100,
            )
            sm.choose_basis_vectors(**kw)
            plt.close("all")
            d = np.column_stack([sm.g["x"] - sm.origin[0], sm.g["y"] - sm.origin[1]])
            r = np.hypot(d[:, 0], d[:, 1])
            i0 = int(np.argmin(r))
            r1 = np.where(np.arange(len(r)) == i0, np.inf, r)
            if not np.isfinite(r1).any():
                raise ValueError("method='strainmap': the Bragg vector map has no maximum besides the origin")
            i1 = int(np.argmin(r1))
            ang = np.degrees(np.arctan2(d[:, 1], d[:, 0]) - np.arctan2(d[i1, 1], d[i1, 0]))
            ang = (ang + 180.0) % 360.0 - 180.0
            targets = (angle, -angle, 180.0 - angle, angle - 180.0) if lattice == "hex" else (angle, -angle)
            off = np.min([np.abs(ang - t) for t in targets], axis=0)
            same_shell = np.abs(r1 / r1[i1] - 1) < config.shell_tolerance
            ok = (off < 5.0 * config.orientation_tolerance_deg) & np.isfinite(r1) & same_shell
            if not ok.any():
                raise ValueError(
                    "method='strainmap': no primitive basis on the Bragg vector map (no maximum at the lattice angle "
                    f"{angle:g} deg from the shortest vector, of the same length). The scan probably holds several "
                    "orientations; use method='perpattern'"
                )
            i2 = int(np.argmin(np.where(ok, r1, np.inf)))
            sm.choose_basis_vectors(index_origin=i0, index_g1=i1, index_g2=i2, **kw)
            plt.close("all")
            sm.max_peak_spacing = float(config.max_peak_spacing_px)  # set_max_peak_spacing() would draw
            sm.fit_basis_vectors()
            plt.close("all")
    finally:
        plt.show = show
    t3 = time.perf_counter()
    g_bvm = np.column_stack([np.asarray(sm.g1, float), np.asarray(sm.g2, float)])
    if g1_length_px is None:
        g_ref = g_bvm
        g1_source = "estimated (Bragg-vector-map basis; strain relative to the scan mean lattice)"
    else:
        a12 = math.degrees(math.atan2(g_bvm[1, 1], g_bvm[0, 1]) - math.atan2(g_bvm[1, 0], g_bvm[0, 0]))
        a12 = math.radians(angle * round(((a12 + 180.0) % 360.0 - 180.0) / angle))
        # unstrained: g1 along +Qx, g2 of the same length at the ideal angle (same handedness as the picked pair)
        a1 = math.radians(g1_angle_deg)
        g_ref = float(g1_length_px) * np.array(
            [[math.cos(a1), math.cos(a1 + a12)], [math.sin(a1), math.sin(a1 + a12)]]
        )
        g1_source = "argument"
    gm_map = sm.g1g2_map
    sl = {k: np.asarray(gm_map.get_slice(k).data, float) for k in ("g1x", "g1y", "g2x", "g2y", "x0", "y0", "error")}
    valid = np.asarray(gm_map.get_slice("mask").data).astype(bool) & np.asarray(sm.mask, bool)
    gm = np.stack([np.stack([sl["g1x"], sl["g2x"]], -1), np.stack([sl["g1y"], sl["g2y"]], -1)], -2)
    valid &= np.all(np.isfinite(gm.reshape(gm.shape[:2] + (4,))), axis=-1)
    shape = src.scan_shape
    strain = {k: np.full(shape, np.nan) for k in MAP_KEYS}
    if valid.any():
        s = strain_from_reciprocal_bases(gm[valid], g_ref, period_deg=angle)
        for k in MAP_KEYS:
            strain[k][valid] = s[k]
    n_used = np.zeros(shape, np.int32)
    n_det = np.zeros(shape, np.int32)
    for i in range(shape[0]):
        for j in range(shape[1]):
            n_used[i, j] = sm.bragg_vectors_indexed[i, j].data.shape[0]
            n_det[i, j] = len(bv.raw[i, j].qx)
    n_used[~valid] = 0
    t4 = time.perf_counter()
    nan = lambda a: np.where(valid, a, np.nan)  # noqa: E731
    params = dict(
        method="strainmap",
        config=config.to_dict(),
        resolved=res,
        g1_length_px=None if g1_length_px is None else float(g1_length_px),
        g1_length_source=g1_source,
        lattice=lattice,
        rotation_period_deg=angle,
        g1_angle_deg=float(g1_angle_deg),
        reference_basis_px=g_ref.tolist(),
        bvm_basis_px=g_bvm.tolist(),
        py4dstem_version=str(getattr(py4DSTEM, "__version__", "unknown")),
        numpy_version=np.__version__,
        scan_shape=list(shape),
        pattern_shape=list(src.pattern_shape),
        valid_fraction=float(valid.mean()),
        seconds=dict(kernel=t1 - t0, detect=t2 - t1, strainmap=t3 - t2, decompose=t4 - t3),
        ms_per_pattern=dict(detect=1e3 * (t2 - t1) / src.n, fit=1e3 * (t4 - t2) / src.n),
        conventions=CONVENTIONS,
        **kinfo,
    )
    out: dict[str, Any] = dict(strain)
    out.update(
        valid=valid,
        n_peaks=n_used,
        n_detected=n_det,
        fit_error=nan(sl["error"]),
        origin=np.stack([nan(sl["x0"]), nan(sl["y0"])], -1),  # offset from py4DSTEM's calibrated origin
        g1=np.stack([nan(sl["g1x"]), nan(sl["g1y"])], -1),
        g2=np.stack([nan(sl["g2x"]), nan(sl["g2y"])], -1),
        parameters=json.dumps(params),
    )
    return out


def _detection_kwargs(config: "Py4DSTEMConfig", res: Mapping[str, Any]) -> dict[str, Any]:
    """The disk-detection parameters shared by py4DSTEM's functional and DataCube ``find_Bragg_disks``."""
    return dict(
        corrPower=config.corr_power,
        subpixel=config.subpixel,
        upsample_factor=config.upsample_factor,
        minAbsoluteIntensity=config.min_absolute_intensity,
        minRelativeIntensity=config.min_relative_intensity,
        relativeToPeak=res["relative_to_peak"],
        minPeakSpacing=res["min_peak_spacing_px"],
        edgeBoundary=res["edge_boundary_px"],
        maxNumPeaks=config.max_num_peaks,
    )


def write_strain_h5(path, maps: Mapping[str, Any], *, attrs: Mapping[str, Any]) -> str:
    """Write baseline strain maps in the project's strain-map layout (`ccstae_jax.report.files.write_strain_h5`).

    Every array of ``maps`` (``strain_xx`` ... ``rotation`` float32, ``valid``, ``n_peaks``, ``origin`` ...) becomes a
    root dataset, string entries (``parameters``, JSON) and ``attrs`` root attributes; ``method`` defaults to
    ``"py4dstem"`` and ``strain_reference`` to ``"absolute"`` (`ccstae_jax.pipeline.evaluate` then references the
    maps to the labels' region before scoring). Atomic: temporary file, then rename.

    Returns:
        The path written, as a string.
    """
    from ccstae_jax.report.files import write_strain_h5 as write

    return write(path, dict(maps), attrs={"method": "py4dstem", "strain_reference": "absolute", **attrs})


# ----------------------------------------------------------------------------------------------- subprocess entry
def _file_attrs(path: str) -> dict[str, Any]:
    import h5py

    if not h5py.is_hdf5(path):
        return {}
    with h5py.File(path, "r") as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


def main(argv: list[str] | None = None) -> int:
    """``python -m ccstae_jax.baselines.py4dstem DATA --out STRAIN.h5 [...]``; run it with :data:`BASELINE_ENV`."""
    ap = argparse.ArgumentParser(
        prog="python -m ccstae_jax.baselines.py4dstem",
        description="py4DSTEM correlation strain-mapping baseline: DATA (any file open_scan reads) -> strain-map "
        "HDF5 (/strain_xx, /strain_yy, /shear_xy, /rotation [rad], /valid, ...). Absolute real-space lattice "
        "strain, x = Qx = pattern rows; rotation modulo the lattice symmetry. Pixel values refer to the patterns "
        "as read (after crop and binning).",
    )
    ap.add_argument("data")
    ap.add_argument("--out", required=True, help="output strain-map HDF5 (written atomically)")
    ap.add_argument("--key", default=None, help="dataset path inside DATA (default: found automatically)")
    ap.add_argument("--transpose", type=int, nargs=4, default=None, metavar="AX")
    ap.add_argument("--crop", type=int, nargs=4, default=None, metavar=("Q0", "Q1", "Q2", "Q3"))
    ap.add_argument("--binning", type=int, default=1)
    ap.add_argument("--probe-radius", type=float, default=None, help="disk radius, px (default: file attrs)")
    ap.add_argument("--g1-length", type=float, default=None, help="unstrained |g1|, px (default: file attrs)")
    ap.add_argument("--lattice", choices=tuple(LATTICE_ANGLE_DEG) + tuple(LATTICE_ALIASES), default=None,
                    help="default: file attrs, else hex")
    ap.add_argument("--reference-region", type=int, nargs=4, default=None, metavar=("R0", "R1", "C0", "C1"),
                    help="stored in the output for evaluation (default: the data file's)")
    ap.add_argument("--config-json", default=None, help="JSON object of Py4DSTEMConfig fields (overrides)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    _import_py4dstem()  # fail fast, before reading any data
    from ccstae_jax.data.readers import open_scan

    attrs = _file_attrs(a.data)
    binning = int(a.binning)
    overrides = json.loads(a.config_json) if a.config_json else {}
    names = {f.name for f in dataclasses.fields(Py4DSTEMConfig)}
    if set(overrides) - names:
        raise ValueError(f"--config-json: unknown Py4DSTEMConfig keys {sorted(set(overrides) - names)}")
    overrides = _tuple_fields(overrides)
    if a.probe_radius is not None:
        overrides["probe_radius_px"] = a.probe_radius
    geometry = {k: attrs[k] for k in ("phases", "ellipticity", "vacuum") if k in attrs}
    if "disk_radius_px" in attrs or "disk_radius" in attrs:  # file attrs are unbinned detector pixels
        geometry["disk_radius_px"] = float(_attr(attrs, "disk_radius_px", "disk_radius")) / binning
    if "disk_edge_px" in attrs or "disk_edge" in attrs:
        geometry["disk_edge_px"] = float(_attr(attrs, "disk_edge_px", "disk_edge")) / binning
    config = config_from_attrs(geometry, **overrides)
    lattice = canonical_lattice(a.lattice or _lattice_from_attrs(attrs) or "hex")
    g1 = a.g1_length
    g1_source = "argument"
    if g1 is None:
        try:
            g1 = g1_length_from_attrs(attrs, lattice=lattice) / binning
            g1_source = "file attributes"
        except ValueError:
            g1, g1_source = None, None
    g1_angle = _attr(attrs, "g1_angle_deg")
    crop = None if a.crop is None else ((a.crop[0], a.crop[1]), (a.crop[2], a.crop[3]))
    with open_scan(a.data, key=a.key, transpose=a.transpose, crop=crop, binning=binning) as scan:
        maps = py4dstem_strain_map(
            scan,
            config=config,
            g1_length_px=g1,
            lattice=lattice,
            g1_angle_deg=None if g1_angle is None else float(g1_angle),
            lattice_aspect=lattice_aspect_from_attrs(attrs),
            progress=not a.no_progress,
        )
    if g1_source == "file attributes":
        params = json.loads(maps["parameters"])
        params["g1_length_source"] = "file attributes (lattice_constant, q_pixel)"
        maps["parameters"] = json.dumps(params)
    extra: dict[str, Any] = {"source": os.path.abspath(a.data), "method": "py4dstem",
                             "symmetry": lattice_symmetry(lattice)}
    region = a.reference_region if a.reference_region is not None else attrs.get("reference_region")
    if region is not None:
        extra["reference_region"] = np.asarray(region, np.int64)
    for k in ("noise_level", "seed"):
        if k in attrs:
            extra[k] = attrs[k]
    write_strain_h5(a.out, maps, attrs=extra)
    params = json.loads(maps["parameters"])
    print(
        f"py4DSTEM baseline: {a.out} ({params['valid_fraction']:.1%} of positions valid, "
        f"{params['ms_per_pattern']['detect']:.1f} ms/pattern detection)"
    )
    return 0


def _tuple_fields(d: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(d)
    for k in ("trench", "origin", "central_beam_mask_px"):
        if out.get(k) is not None:
            out[k] = tuple(float(x) for x in out[k])
    return out


def run_baseline_subprocess(
    data_path,
    out_path,
    *,
    config: Py4DSTEMConfig | None = None,
    probe_radius_px: float | None = None,
    g1_length_px: float | None = None,
    lattice: str | None = None,
    key: str | None = None,
    transpose=None,
    crop=None,
    binning: int = 1,
    reference_region=None,
    python: str | None = None,
    progress: bool = False,
    timeout: float | None = None,
) -> str:
    """Run the baseline on a data file in a fresh Python process with :data:`BASELINE_ENV`, and wait.

    This is how a JAX process (the CLI, the noise-sweep benchmark) should call the baseline: numpy's BLAS thread
    count can only be fixed before numpy is imported, and py4DSTEM's GPL code stays out of the caller's process.

    Args:
        data_path: Input data file (read with ``ccstae_jax.data.readers.open_scan``).
        out_path: Output strain-map HDF5 (see :func:`write_strain_h5`).
        config: Parameters; ``None`` = defaults with the disk geometry from the file attributes.
        probe_radius_px: Disk radius (px of the patterns as read); overrides ``config`` and the file attributes.
        g1_length_px: Unstrained |g1| (px as read); ``None`` = from the file attributes (divided by ``binning``).
        lattice: ``"hex"``/``"square"``/``"rect"``; ``None`` = from the file attributes, else hex.
        key, transpose, crop, binning: as ``open_scan`` (``crop`` = ``((q0, q1), (q2, q3))``).
        reference_region: (r0, r1, c0, c1) stored in the output for evaluation (default: the data file's).
        python: Interpreter with py4DSTEM installed; default ``$CCSTAE_BASELINE_PYTHON``, else this one.
        progress: Let the child show its progress bar (on this process's stderr).
        timeout: Seconds before the child is killed (``subprocess.TimeoutExpired``).

    Returns:
        ``out_path`` as a string.

    Raises:
        BaselineUnavailable: py4DSTEM is not importable by ``python``.
        RuntimeError: the child failed (its last stderr lines are in the message).
    """
    python = python or os.environ.get("CCSTAE_BASELINE_PYTHON") or sys.executable
    cmd = [python, "-m", "ccstae_jax.baselines.py4dstem", os.fspath(data_path), "--out", os.fspath(out_path)]
    if key is not None:
        cmd += ["--key", str(key)]
    if transpose is not None:
        cmd += ["--transpose", *[str(int(t)) for t in transpose]]
    if crop is not None:
        (q0, q1), (q2, q3) = crop
        cmd += ["--crop", *[str(int(q)) for q in (q0, q1, q2, q3)]]
    if int(binning) != 1:
        cmd += ["--binning", str(int(binning))]
    if probe_radius_px is not None:
        cmd += ["--probe-radius", repr(float(probe_radius_px))]
    if g1_length_px is not None:
        cmd += ["--g1-length", repr(float(g1_length_px))]
    if lattice is not None:
        cmd += ["--lattice", lattice]
    if reference_region is not None:
        cmd += ["--reference-region", *[str(int(r)) for r in reference_region]]
    if config is not None:
        d = config.to_dict()
        if probe_radius_px is not None:
            d.pop("probe_radius_px")
        cmd += ["--config-json", json.dumps(d)]
    if not progress:
        cmd.append("--no-progress")
    env = {**os.environ, **BASELINE_ENV}
    if progress:
        env.pop("TQDM_DISABLE", None)
    pipe = None if progress else subprocess.PIPE
    proc = subprocess.run(cmd, env=env, stdout=pipe, stderr=pipe, text=True, timeout=timeout)
    if proc.returncode != 0:
        if proc.returncode == _EXIT_UNAVAILABLE:
            raise BaselineUnavailable(
                f"{python} cannot import py4DSTEM. Install the optional extra: {INSTALL_HINT}, or point "
                "CCSTAE_BASELINE_PYTHON at an interpreter that has it"
            )
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
        raise CcstaeError(f"py4DSTEM baseline failed (exit {proc.returncode}) on {data_path}:\n{tail}")
    return os.fspath(out_path)


def run_cli(args) -> None:
    """Entry for ``ccstae baseline DATA --out STRAIN.h5``: runs :func:`run_baseline_subprocess` from parsed args.

    Uses ``args.data``, ``args.out`` and, when present, ``key``, ``transpose``, ``crop`` (4 ints), ``binning``,
    ``probe_radius``, ``g1_length``, ``reference_region``, ``quiet``.
    """
    crop = getattr(args, "crop", None)
    run_baseline_subprocess(
        args.data,
        args.out,
        key=getattr(args, "key", None),
        transpose=getattr(args, "transpose", None),
        crop=None if crop is None else ((crop[0], crop[1]), (crop[2], crop[3])),
        binning=getattr(args, "binning", 1) or 1,
        probe_radius_px=getattr(args, "probe_radius", None),
        g1_length_px=getattr(args, "g1_length", None),
        reference_region=getattr(args, "reference_region", None),
        progress=not getattr(args, "quiet", False),
    )
    print(f"py4DSTEM baseline strain maps written to {args.out}")


_EXIT_UNAVAILABLE = 3

if __name__ == "__main__":
    try:
        sys.exit(main())
    except BaselineUnavailable as e:
        print(f"BaselineUnavailable: {e}", file=sys.stderr)
        sys.exit(_EXIT_UNAVAILABLE)
