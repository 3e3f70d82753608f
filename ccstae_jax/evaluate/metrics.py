"""Accuracy of strain maps against simulated labels: MAE, median absolute error and spread, referenced alike.

Labels and predictions are referenced to the same scan region with the same polar decomposition
(`ccstae_jax.mapping.reference.referenced_strain`), so a method is scored on what it can measure: strain and rotation
relative to a reference, rotations modulo the lattice symmetry. Strain errors are dimensionless; rotation errors in
degrees (`format_table` shows strain in %).
"""
from __future__ import annotations

import itertools

import numpy as np

from ccstae_jax.ops import affine
from ccstae_jax.mapping.reference import QUANTITIES, referenced_strain, region_mask

PAPER_REFERENCE_REGION = (30, 60, 10, 40)  # rows 30:60, columns 10:40 of the 256x256 benchmark scan


def referenced_labels(
    labels: dict[str, np.ndarray], *, reference_region=None, symmetry: int = 6
) -> dict[str, np.ndarray]:
    """Labels (strain_xx, strain_yy, shear_xy, rotation in radians; ``(Rx, Ry)``) referenced to a region.

    Builds each label's lattice ``A = (I + eps) R(rotation)`` and references it exactly like predictions. For the
    paper's benchmark (reference grain unstrained) the strains come back unchanged and the rotation becomes relative
    to the region's orientation, modulo ``2 pi / symmetry``.
    """
    missing = [k for k in QUANTITIES if k not in labels]
    if missing:
        raise ValueError(f"labels lack {missing}; expected strain_xx, strain_yy, shear_xy, rotation")
    shapes = {k: np.shape(labels[k]) for k in QUANTITIES}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"label maps differ in shape: {shapes}")
    lat = np.asarray(affine.lattice_from_strain(*(np.asarray(labels[k], np.float32) for k in QUANTITIES)), np.float64)
    shape = lat.shape[:2]
    return referenced_strain(lat, region_mask(shape, reference_region), symmetry=symmetry)


def error_table(
    pred: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    *,
    reference_region=None,
    symmetry: int = 6,
    interior: np.ndarray | None = None,
    reference_labels: bool = True,
    reference_predictions: bool = False,
) -> dict[str, dict[str, float]]:
    """Errors of predicted maps against labels, per quantity.

    Args:
      pred: ``strain_xx``, ``strain_yy``, ``shear_xy``, ``rotation`` (radians) maps ``(Rx, Ry)``, already referenced
        (as written by `ccstae map`) unless ``reference_predictions``; NaN marks invalid positions. Optional
        ``valid``.
      labels: the same keys (radians for rotation), raw; referenced here to ``reference_region`` unless
        ``reference_labels`` is False.
      interior: optional boolean ``(Rx, Ry)`` grain-interior mask.
      reference_predictions: reference the predictions to ``reference_region`` too, exactly like the labels (for
        absolute maps, e.g. the py4DSTEM baseline's), so both are scored relative to the same region.

    Returns:
      ``{quantity: {"mae", "median_abs", "mae_interior", "std_interior", "valid_fraction"}}`` with strain errors
      dimensionless and rotation errors in degrees (key ``rotation_deg``). MAE is over all valid positions; invalid
      positions are counted in ``valid_fraction``, never as zero error. When ``pred`` holds per-position 1-sigma
      errors (``uncertainty_<quantity>``, as `ccstae map` writes), each row also has ``sigma_median`` (same units)
      and the calibration of the errors against them: ``z_std`` (standard deviation of error / sigma; 1 when
      calibrated) and ``z_within_2`` (share of positions with ``|error| <= 2 sigma``; 0.95 for Gaussian errors),
      with ``interior`` also ``z_std_interior`` (the same over grain interiors, where no probe straddles a boundary).
      Labels with a ``vacuum`` mask leave its positions out of the errors (``valid_fraction`` counts only the
      specimen) and add a ``"vacuum"`` row: the share of vacuum positions the map flags invalid. Labels with a
      ``phase`` map (0, 1, ...; -1 in vacuum) add a ``"phases"`` row: per phase, the MAE and the mean (signed) error
      of each strain component, and, when ``pred`` has a ``phase`` map, the share of specimen positions whose
      phase the map assigns right (best one-to-one matching of its bases to the phases).
    """
    scan_shape = np.shape(pred["strain_xx"])
    for k in QUANTITIES:
        if np.shape(labels[k]) != scan_shape:
            raise ValueError(f"label {k} has shape {np.shape(labels[k])} but the strain map is {scan_shape}")
    ref_lab = referenced_labels(labels, reference_region=reference_region, symmetry=symmetry) if reference_labels \
        else {k: np.asarray(labels[k], np.float64) for k in QUANTITIES}
    period = 2 * np.pi / symmetry
    valid = np.ones(scan_shape, bool) if "valid" not in pred else np.asarray(pred["valid"], bool)
    if reference_predictions:
        pred = _referenced_predictions(pred, valid, reference_region, symmetry)
    if interior is not None and np.shape(interior) != scan_shape:
        raise ValueError(f"interior mask has shape {np.shape(interior)} but the strain map is {scan_shape}")
    vacuum = np.asarray(labels["vacuum"], bool) if "vacuum" in labels else np.zeros(scan_shape, bool)
    specimen = ~vacuum
    table = {}
    for k in QUANTITIES:
        p = np.asarray(pred[k], np.float64)
        diff = p - ref_lab[k]
        if k == "rotation":
            diff = np.degrees(affine.wrap_angle(diff, period))
        ok = valid & np.isfinite(diff) & specimen
        row = {
            "mae": float(np.mean(np.abs(diff[ok]))) if ok.any() else float("nan"),
            "median_abs": float(np.median(np.abs(diff[ok]))) if ok.any() else float("nan"),
            "valid_fraction": float(ok.sum() / max(specimen.sum(), 1)),
        }
        sigma_key = f"uncertainty_{k}"
        if sigma_key in pred:
            sigma = np.asarray(pred[sigma_key], np.float64)
            sigma = np.degrees(sigma) if k == "rotation" else sigma
            sel = ok & np.isfinite(sigma) & (sigma > 0)
            z = diff[sel] / sigma[sel]
            row["sigma_median"] = float(np.median(sigma[sel])) if sel.any() else float("nan")
            row["z_std"] = float(np.std(z)) if sel.any() else float("nan")
            row["z_within_2"] = float(np.mean(np.abs(z) <= 2)) if sel.any() else float("nan")
        if interior is not None:
            sel = ok & np.asarray(interior, bool)
            row["mae_interior"] = float(np.mean(np.abs(diff[sel]))) if sel.any() else float("nan")
            row["std_interior"] = float(np.std(diff[sel])) if sel.any() else float("nan")
            if sigma_key in pred:  # where the label is one grain's, not a mixture's under the probe
                inner = sel & np.isfinite(sigma) & (sigma > 0)
                row["z_std_interior"] = float(np.std(diff[inner] / sigma[inner])) if inner.any() else float("nan")
        table["rotation_deg" if k == "rotation" else k] = row
    if vacuum.any():
        table["vacuum"] = {"flagged_fraction": float(np.mean(~valid[vacuum])), "positions": int(vacuum.sum())}
    if "phase" in labels and len({int(v) for v in np.unique(labels["phase"]) if v >= 0}) > 1:
        table["phases"] = _phase_errors(pred, ref_lab, np.asarray(labels["phase"]), valid & specimen)
    return table


def _phase_errors(pred, ref_lab, phase, ok) -> dict:
    """Per-phase strain errors and the phase-assignment accuracy (see `error_table`)."""
    out: dict = {"per_phase": {}}
    for p in sorted(int(v) for v in np.unique(phase) if v >= 0):
        row = {}
        for k in QUANTITIES[:3]:
            d = np.asarray(pred[k], np.float64) - ref_lab[k]
            sel = ok & (phase == p) & np.isfinite(d)
            row[k] = {"mae": float(np.mean(np.abs(d[sel]))) if sel.any() else float("nan"),
                      "mean": float(np.mean(d[sel])) if sel.any() else float("nan"), "positions": int(sel.sum())}
        out["per_phase"][str(p)] = row
    if "phase" in pred:
        got = np.asarray(pred["phase"])
        sel = ok & (phase >= 0) & (got >= 0)
        if sel.any():
            labels_ = sorted(set(phase[sel].tolist()))
            found = sorted(set(got[sel].tolist()))
            best = 0.0
            for perm in itertools.permutations(labels_, min(len(labels_), len(found))):
                mapping = dict(zip(found, perm))
                best = max(best, float(np.mean([mapping.get(g, -2) == t for g, t in zip(got[sel], phase[sel])])))
            out["assignment_accuracy"] = best
    return out


def _referenced_predictions(pred, valid, reference_region, symmetry):
    """Absolute prediction maps referenced to a region like `referenced_labels` (invalid positions stay NaN and are
    kept out of the reference)."""
    ok = valid & np.all([np.isfinite(np.asarray(pred[k], np.float64)) for k in QUANTITIES], axis=0)
    filled = {k: np.where(ok, np.asarray(pred[k], np.float64), 0.0) for k in QUANTITIES}
    lat = np.asarray(affine.lattice_from_strain(*(filled[k].astype(np.float32) for k in QUANTITIES)), np.float64)
    out = referenced_strain(lat, region_mask(ok.shape, reference_region), symmetry=symmetry, valid=ok)
    return {k: np.where(ok, v, np.nan) for k, v in out.items()}


def format_table(table: dict[str, dict[str, float]]) -> str:
    """A short markdown table of `error_table` output: strain errors in %, rotation errors in degrees, the share of
    valid positions in %; with per-position errors, their median and calibration (``std(z)``, ``|z| <= 2``)."""
    rows = {k: v for k, v in table.items() if k not in ("vacuum", "phases")}
    calibrated = all("z_std" in row for row in rows.values())
    inner = calibrated and all("z_std_interior" in row for row in rows.values())
    head = ["quantity", "MAE", "median abs", "MAE interior", "std interior", "valid"]
    if calibrated:
        head += ["median 1-sigma", "std(z)", "|z| <= 2"] + (["std(z) interior"] if inner else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, row in rows.items():
        name, scale, digits = ("rotation (deg)", 1.0, 3) if k == "rotation_deg" else (f"{k} (%)", 100.0, 4)
        cells = [f"{row.get(m, float('nan')) * scale:.{digits}f}" for m in ("mae", "median_abs", "mae_interior",
                                                                             "std_interior")]
        cells.append(f"{100 * row['valid_fraction']:.1f} %")
        if calibrated:
            cells += [f"{row['sigma_median'] * scale:.{digits}f}", f"{row['z_std']:.2f}",
                      f"{100 * row['z_within_2']:.1f} %"] + ([f"{row['z_std_interior']:.2f}"] if inner else [])
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "vacuum" in table:
        v = table["vacuum"]
        lines.append(f"\nvacuum: {100 * v['flagged_fraction']:.1f} % of {v['positions']} positions flagged invalid")
    if "phases" in table:
        ph = table["phases"]
        for p, row in ph["per_phase"].items():
            cells = ", ".join(f"{k} MAE {100 * r['mae']:.4f} % (mean {100 * r['mean']:+.4f} %)" for k, r in row.items())
            lines.append(f"phase {p}: {cells}")
        if "assignment_accuracy" in ph:
            lines.append(f"phase assignment: {100 * ph['assignment_accuracy']:.1f} % of specimen positions right")
    return "\n".join(lines)
