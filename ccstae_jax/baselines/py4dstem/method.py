"""py4DSTEM correlation strain mapping: the classical baseline CC-ST-AE is compared against.

py4DSTEM is an optional, GPL-licensed extra (``pip install "ccstae-jax[baseline]"``, i.e. ``py4dstem-lite==0.14.16``,
which works with numpy 2). It is imported lazily inside the functions that need it; importing this module needs only
numpy (and h5py for :func:`write_strain_h5`). Slow disk detection with multithreaded OpenBLAS: see
`ccstae_jax.baselines.py4dstem.blas`. Without py4DSTEM, :func:`py4dstem_strain_map` raises
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
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from ccstae_jax.baselines.py4dstem.blas import limit_blas
from ccstae_jax.baselines.py4dstem.config import (
    CONVENTIONS,
    INSTALL_HINT,
    MAP_KEYS,
    BaselineUnavailable,
    Py4DSTEMConfig,
    _attr,
    _lattice_angle,
    _rotation_period,
    beam_centres,
    canonical_lattice,
    default_g1_angle_deg,
    g1_length_from_attrs,
    lattice_aspect_from_attrs,
    lattice_symmetry,
    reference_basis,
    shortest_spacing,
    strain_from_reciprocal_bases,
    suppress_central_beam,
)


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

    with limit_blas(config.blas_threads):
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
        with limit_blas(config.blas_threads), warnings.catch_warnings():
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
