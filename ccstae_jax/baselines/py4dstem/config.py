"""Constants, configuration and pure numpy helpers of the py4DSTEM baseline.

Everything here needs only numpy (``scipy.ndimage`` for :func:`beam_centres`): the constants (install hint, the
environment of a baseline process, lattice angles and rotation periods, map names, conventions), the
:class:`BaselineUnavailable` error, :class:`Py4DSTEMConfig` and the helpers that set it up from our simulated file's
attributes (:func:`config_from_attrs` and the ``*_from_attrs`` functions), the unstrained reciprocal basis
(:func:`reference_basis`), the exact strain of a measured basis (:func:`strain_from_reciprocal_bases`) and the
central-beam helpers (:func:`beam_centres`, :func:`suppress_central_beam`). What the scan geometry does to the fit is
described in `ccstae_jax.baselines.py4dstem.method`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ccstae_jax import conventions
from ccstae_jax.errors import CcstaeError

INSTALL_HINT = 'pip install "ccstae-jax[baseline]"  (the extra installs py4dstem-lite==0.14.16, GPL-3)'

#: Environment for a process that runs the baseline: one BLAS thread (see `ccstae_jax.baselines.py4dstem.blas`),
#: no GUI, no bars.
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


def _tuple_fields(d: Mapping[str, Any]) -> dict[str, Any]:
    """``d`` with the tuple-valued :class:`Py4DSTEMConfig` fields (JSON lists) as tuples of floats."""
    out = dict(d)
    for k in ("trench", "origin", "central_beam_mask_px"):
        if out.get(k) is not None:
            out[k] = tuple(float(x) for x in out[k])
    return out
