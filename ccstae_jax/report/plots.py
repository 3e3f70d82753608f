"""Figures for strain mapping: strain maps, uncertainty maps, histograms, pattern and mask, learned bases, training
curves, reconstruction error, noise sweep.

Every function draws on a fresh :class:`matplotlib.figure.Figure` (no pyplot, no global backend change, nothing to
close, safe without a display), writes one PNG at a fixed pixel size (``figsize * dpi``, no tight bounding box) and
returns the path as ``str``. matplotlib is imported inside the functions, so importing this module stays cheap.

Conventions (the same as `ccstae_jax.mapping.reference`): maps are ``(Rx, Ry)`` and drawn with scan row ``Rx``
downwards and scan column ``Ry`` to the right. x = detector Qx = pattern rows (axis 2 of the 4D data), y = Qy =
pattern columns (axis 3). ``strain_xx``, ``strain_yy``: real-space lattice strain along x, y (positive = lattice
stretched = spots move inward); ``shear_xy``: tensor shear; ``rotation``: radians counter-clockwise from +Qx toward
+Qy, relative to the reference (modulo the lattice symmetry). Display units, everywhere: strain in percent, rotation
in degrees (files stay dimensionless / radians). NaN (and positions with ``valid == False``) are drawn in grey.

Example::

    from ccstae_jax.report.files import read_strain_h5
    from ccstae_jax.report import plots

    maps, _ = read_strain_h5("run/strain.h5")
    plots.plot_strain_maps(maps, "run/strain_maps.png", labels=labels)
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from ccstae_jax.conventions import QUANTITIES, STRAIN_KEYS
from ccstae_jax.model.geometry import Geometry
from ccstae_jax.ops import affine

DEFAULT_DPI = 120
STRAIN_PERCENT = 100.0  # display unit of strain: percent (strain x 100)
COLOUR_PERCENTILE = 99.5  # automatic colour limits: this percentile of |value|, so a few outliers saturate, not grains
#: Uncertainty maps run from 0 to this many times the median 1-sigma (or the `COLOUR_PERCENTILE`, if lower): the
#: typical error bar sits low on the scale and the far larger ones of grain boundaries saturate, not hide it.
UNCERTAINTY_MEDIANS = 4.0
UNCERTAINTY_PREFIX = "uncertainty_"  # maps[UNCERTAINTY_PREFIX + quantity]: 1-sigma uncertainty maps

_TITLES = {
    "strain_xx": r"strain xx  ($\varepsilon_{xx}$)",
    "strain_yy": r"strain yy  ($\varepsilon_{yy}$)",
    "shear_xy": r"shear xy  ($\varepsilon_{xy}$)",
    "rotation": r"rotation  ($\theta$)",
}
_CONVENTION_LINE = (
    "x = detector Qx (pattern rows), y = Qy (pattern columns); real-space lattice strain (+ = stretched), tensor "
    "shear;\nrotation counter-clockwise from +Qx toward +Qy; all relative to the reference"
)
_METHOD_STYLE = {  # name -> (colour, histogram drawn filled?)
    "labels": ("0.35", True),
    "CC-ST-AE": ("tab:blue", False),
    "py4DSTEM": ("tab:orange", False),
}
_BAD_COLOUR = "0.72"
# metrics.jsonl keys that are bookkeeping, not loss terms
_NOT_LOSS_TERMS = frozenset({
    "kind", "step", "epoch", "steps", "learning_rate", "wall_time", "patterns_per_s", "nonfinite_count",
    "finite_steps", "best_loss", "grad_norm", "finite",
})


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def _figure(width: float, height: float, dpi: int, *, images: bool = False):
    """A Figure with constrained layout; ``images=True`` uses the 'compressed' variant made for grids of
    fixed-aspect images (keeps colour bars and their labels inside the figure for tall or wide scans)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=dpi, layout="compressed" if images else "constrained")


def _save(fig, path: str | os.PathLike, dpi: int) -> str:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise OSError(f"cannot write figure {path}: directory {directory} does not exist")
    fig.savefig(path, dpi=dpi, format="png")
    fig.clear()
    return path


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=_BAD_COLOUR)


def _check_dpi(dpi: int) -> int:
    if not (isinstance(dpi, (int, np.integer)) and 20 <= dpi <= 1200):
        raise ValueError(f"dpi must be an integer in [20, 1200], got {dpi!r}")
    return int(dpi)


def _methods(maps, labels, baseline) -> list[tuple[str, Mapping[str, Any]]]:
    """(name, maps) rows in display order: labels, CC-ST-AE, baseline."""
    rows = [] if labels is None else [("labels", labels)]
    rows.append(("CC-ST-AE", maps))
    if baseline is not None:
        rows.append(("py4DSTEM", baseline))
    return rows


def _prepared(name: str, m: Mapping[str, Any], keys: Sequence[str], shape: tuple[int, ...] | None
              ) -> dict[str, np.ndarray]:
    """float64 copies of ``keys`` of one method's maps, NaN where ``valid`` is False, rotation in degrees."""
    if not isinstance(m, Mapping):
        raise TypeError(f"{name} maps must be a dict of (Rx, Ry) arrays, got {type(m).__name__}")
    missing = [k for k in keys if k not in m]
    if missing:
        raise ValueError(f"{name} maps lack {missing} (have {sorted(m)}); expected {list(keys)}")
    out = {}
    for k in keys:
        a = np.array(m[k], dtype=np.float64)
        if a.ndim != 2:
            raise ValueError(f"{name} map {k!r} must be 2-D (Rx, Ry), got shape {a.shape}")
        if shape is not None and a.shape != shape:
            raise ValueError(f"{name} map {k!r} has shape {a.shape}, expected {shape} like the other maps")
        shape = a.shape
        out[k] = a
    if "valid" in m:
        valid = np.asarray(m["valid"], bool)
        if valid.shape != shape:
            raise ValueError(f"{name} 'valid' has shape {valid.shape}, expected {shape} like the maps")
        for a in out.values():
            a[~valid] = np.nan
    if "rotation" in out:
        out["rotation"] = np.degrees(out["rotation"])
    return out


def _all_prepared(maps, labels, baseline, keys=QUANTITIES) -> list[tuple[str, dict[str, np.ndarray]]]:
    shape = None
    rows = []
    for name, m in _methods(maps, labels, baseline):
        p = _prepared(name, m, keys, shape)
        shape = p[keys[0]].shape
        rows.append((name, p))
    return rows


def _robust_limit(arrays: Sequence[np.ndarray], *, percentile: float = 99.0, fallback: float) -> float:
    vals = np.concatenate([np.abs(a[np.isfinite(a)]).ravel() for a in arrays]) if arrays else np.zeros(0)
    if vals.size == 0:
        return fallback
    lim = float(np.percentile(vals, percentile))
    return lim if np.isfinite(lim) and lim > 0 else fallback


def color_limits(
    maps: Mapping[str, Any], *, labels: Mapping[str, Any] | None = None, baseline: Mapping[str, Any] | None = None,
    strain_limit: float | None = None, rotation_limit: float | None = None, symmetry: int | None = 6,
) -> tuple[float, float]:
    """Symmetric colour limits shared by all methods in `plot_strain_maps`.

    Args:
      maps, labels, baseline: strain-map dicts (see `plot_strain_maps`).
      strain_limit: fixed strain limit (dimensionless, e.g. ``0.02`` for 2 %); None = robust automatic.
      rotation_limit: fixed rotation limit in degrees; None = half the symmetry period (``180 / symmetry``: the
        cyclic rotation scale spans exactly one period), or the robust automatic limit when ``symmetry`` is None.
      symmetry: the lattice's rotational symmetry (6 for hexagonal): rotations are defined modulo
        ``360 / symmetry`` degrees. None = not periodic.

    Returns:
      ``(strain_lim, rotation_lim_deg)``: the strain panels span ``[-strain_lim, strain_lim]`` (dimensionless), the
      rotation panels ``[-rotation_lim_deg, rotation_lim_deg]`` (degrees). Automatic limits are the 99.5th
      percentile (`COLOUR_PERCENTILE`) of ``|value|`` over every finite position of every method shown (all three
      strain components pooled), so only the most extreme 0.5 % of positions saturate.
    """
    rows = _all_prepared(maps, labels, baseline)
    if strain_limit is None:
        s_lim = _robust_limit([p[k] for _, p in rows for k in STRAIN_KEYS], percentile=COLOUR_PERCENTILE,
                              fallback=1e-3)
    else:
        s_lim = float(strain_limit)
        if not (np.isfinite(s_lim) and s_lim > 0):
            raise ValueError(f"strain_limit must be a positive finite number (dimensionless), got {strain_limit!r}")
    if rotation_limit is not None:
        r_lim = float(rotation_limit)
        if not (np.isfinite(r_lim) and r_lim > 0):
            raise ValueError(f"rotation_limit must be a positive finite number of degrees, got {rotation_limit!r}")
    elif symmetry is not None:
        r_lim = 180.0 / _check_symmetry(symmetry)
    else:
        r_lim = _robust_limit([p["rotation"] for _, p in rows], percentile=COLOUR_PERCENTILE, fallback=1.0)
    return s_lim, r_lim


def _check_symmetry(symmetry) -> int:
    if not (isinstance(symmetry, (int, np.integer)) and not isinstance(symmetry, bool) and symmetry >= 1):
        raise ValueError(f"symmetry must be a positive integer (6 for hexagonal lattices) or None, got {symmetry!r}")
    return int(symmetry)


def _check_region(region, shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    if region is None:
        return None
    try:
        r0, r1, c0, c1 = (int(v) for v in region)
    except (TypeError, ValueError):
        raise ValueError(f"reference_region must be 4 integers (r0, r1, c0, c1), got {region!r}") from None
    if not (0 <= r0 < r1 <= shape[0] and 0 <= c0 < c1 <= shape[1]):
        raise ValueError(f"reference_region {(r0, r1, c0, c1)} is outside the {shape[0]}x{shape[1]} scan; expected "
                         f"0 <= r0 < r1 <= {shape[0]} and 0 <= c0 < c1 <= {shape[1]}")
    return r0, r1, c0, c1


def _region_text(region) -> str:
    if region is None:
        return "reference: the whole scan"
    r0, r1, c0, c1 = region
    return f"black box = reference region, rows {r0}:{r1}, columns {c0}:{c1}"


def _draw_region(ax, region) -> None:
    """Outlines scan rows r0:r1, columns c0:c1 (pixel edges; imshow puts pixel centres at integers)."""
    if region is None:
        return
    from matplotlib.patches import Rectangle

    r0, r1, c0, c1 = region
    ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False, edgecolor="black", linewidth=1.4))


def _scan_axes(ax, *, xlabel: bool, ylabel: str | None) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("scan column Ry" if xlabel else "")
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # scan positions are whole numbers
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=8)


# ---------------------------------------------------------------------------------------------------------------
# strain maps and histograms
# ---------------------------------------------------------------------------------------------------------------
def _strain_maps_figure(maps, *, labels=None, baseline=None, title=None, strain_limit=None, rotation_limit=None,
                        symmetry=6, reference_region=None, dpi=DEFAULT_DPI):
    from matplotlib.colors import Normalize

    rows = _all_prepared(maps, labels, baseline)
    s_lim, r_lim = color_limits(maps, labels=labels, baseline=baseline, strain_limit=strain_limit,
                                rotation_limit=rotation_limit, symmetry=symmetry)
    rx, ry = rows[0][1]["strain_xx"].shape
    region = _check_region(reference_region, (rx, ry))
    cyclic = symmetry is not None and rotation_limit is None
    period = 360.0 / _check_symmetry(symmetry) if symmetry is not None else None
    aspect = min(max(rx / ry, 0.4), 2.5)
    panel = 2.9
    fig = _figure(4 * panel + 0.6, len(rows) * panel * aspect + 1.9, dpi, images=True)
    axes = fig.subplots(len(rows), 4, squeeze=False, sharex=True, sharey=True)
    s_norm = Normalize(-STRAIN_PERCENT * s_lim, STRAIN_PERCENT * s_lim)
    r_norm = Normalize(-r_lim, r_lim)
    s_cmap = _cmap("RdBu_r")
    r_cmap = _cmap("twilight_shifted") if cyclic else s_cmap
    ims = {}
    for i, (name, p) in enumerate(rows):
        for j, k in enumerate(QUANTITIES):
            ax = axes[i, j]
            if k == "rotation":
                data = affine.wrap_angle(p[k], period) if period is not None else p[k]
            else:
                data = STRAIN_PERCENT * p[k]
            ims[k] = ax.imshow(data, cmap=r_cmap if k == "rotation" else s_cmap,
                               norm=r_norm if k == "rotation" else s_norm, interpolation="nearest", origin="upper")
            _draw_region(ax, region)
            if i == 0:
                ax.set_title(_TITLES[k], fontsize=11)
            _scan_axes(ax, xlabel=i == len(rows) - 1, ylabel="scan row Rx" if j == 0 else None)
            if j == 0:
                ax.annotate(name, xy=(0, 0.5), xycoords=ax.yaxis.label, xytext=(-4, 0), textcoords="offset points",
                            ha="right", va="center", rotation=90, fontsize=12, fontweight="bold")
    cb = fig.colorbar(ims["strain_xx"], ax=axes[:, :3], location="bottom", shrink=0.5, aspect=40, extend="both")
    cb.set_label(f"strain (%), one scale for all strain panels (±{STRAIN_PERCENT * s_lim:.3g} %)")
    cb = fig.colorbar(ims["rotation"], ax=axes[:, 3], location="bottom", shrink=0.9, aspect=24,
                      extend="neither" if cyclic else "both")
    cb.set_label(f"rotation (deg), cyclic: ±{r_lim:g} deg meet\n({period:g} deg lattice period)" if cyclic
                 else "rotation (deg)")
    head = (title + "\n") if title else ""
    fig.suptitle(f"{head}{_CONVENTION_LINE};\n{_region_text(region)}; grey = no value", fontsize=10)
    return fig


def plot_strain_maps(
    maps: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    labels: Mapping[str, Any] | None = None,
    baseline: Mapping[str, Any] | None = None,
    title: str | None = None,
    strain_limit: float | None = None,
    rotation_limit: float | None = None,
    symmetry: int | None = 6,
    reference_region: Sequence[int] | None = None,
    dpi: int = DEFAULT_DPI,
) -> str:
    """Maps of strain_xx, strain_yy, shear_xy and rotation; one row per method (labels, CC-ST-AE, baseline).

    Args:
      maps: CC-ST-AE maps as from `ccstae_jax.report.files.read_strain_h5`: ``strain_xx``, ``strain_yy``, ``shear_xy``
        (dimensionless) and ``rotation`` (radians), each ``(Rx, Ry)``; NaN where invalid; optional bool ``valid``.
      path: output PNG.
      labels: ground truth, same keys and shape, referenced like ``maps``; drawn as the first row.
      baseline: py4DSTEM maps, same keys and shape; drawn as the last row.
      title: first line of the figure title (e.g. the data file and the run); the next lines state the conventions
        and the reference.
      strain_limit: colour limit of the strain panels, dimensionless (``0.02`` = 2 %); None = 99.5th percentile of
        ``|strain|`` over all panels. See `color_limits`.
      rotation_limit: colour limit of the rotation panels in degrees (then a diverging, non-cyclic scale); None =
        one full symmetry period on a cyclic scale (see `color_limits`).
      symmetry: rotational symmetry of the lattice (6: rotations modulo 60 deg, drawn wrapped into [-30, 30) deg
        on the cyclic ``twilight_shifted`` map, where -30 and +30 deg get the same colour); None = not periodic.
      reference_region: ``(r0, r1, c0, c1)``, scan rows r0:r1 and columns c0:c1 (0-based, end excluded) the maps
        are referenced to; outlined in black on every panel. None = whole-scan reference (nothing drawn).
      dpi: resolution of the PNG.

    Returns:
      ``path`` as str. Strain panels share one symmetric diverging scale (RdBu_r, red = positive, in %); rotation
      panels share their own (degrees); NaN is grey.
    """
    dpi = _check_dpi(dpi)
    return _save(_strain_maps_figure(maps, labels=labels, baseline=baseline, title=title,
                                     strain_limit=strain_limit, rotation_limit=rotation_limit, symmetry=symmetry,
                                     reference_region=reference_region, dpi=dpi), path, dpi)


def _uncertainty_figure(uncertainty, *, valid=None, title=None, reference_region=None, dpi=DEFAULT_DPI):
    from matplotlib.colors import Normalize

    if not isinstance(uncertainty, Mapping):
        raise TypeError(f"uncertainty must be a dict of (Rx, Ry) arrays, got {type(uncertainty).__name__}")
    m = dict(uncertainty)
    if valid is not None:
        m["valid"] = valid
    p = _prepared("uncertainty", m, QUANTITIES, None)
    for k, a in p.items():
        if np.any(a[np.isfinite(a)] < 0):
            raise ValueError(f"uncertainty map {k!r} holds negative values; expected 1-sigma uncertainties >= 0")
    rx, ry = p["strain_xx"].shape
    region = _check_region(reference_region, (rx, ry))
    aspect = min(max(rx / ry, 0.4), 2.5)
    panel = 2.9
    fig = _figure(4 * panel + 0.6, panel * aspect + 1.9, dpi, images=True)
    axes = fig.subplots(1, 4, squeeze=False, sharex=True, sharey=True)[0]
    def upper(arrays, fallback):
        typical = _robust_limit(arrays, percentile=50.0, fallback=fallback)
        top = _robust_limit(arrays, percentile=COLOUR_PERCENTILE, fallback=fallback)
        return min(top, UNCERTAINTY_MEDIANS * typical)

    s_hi = STRAIN_PERCENT * upper([p[k] for k in STRAIN_KEYS], 1e-3)
    r_hi = upper([p["rotation"]], 0.1)
    cmap = _cmap("viridis")
    ims = {}
    for j, k in enumerate(QUANTITIES):
        ax = axes[j]
        data, hi = (p[k], r_hi) if k == "rotation" else (STRAIN_PERCENT * p[k], s_hi)
        ims[k] = ax.imshow(data, cmap=cmap, norm=Normalize(0.0, hi), interpolation="nearest", origin="upper")
        _draw_region(ax, region)
        ax.set_title(_TITLES[k], fontsize=11)
        _scan_axes(ax, xlabel=True, ylabel="scan row Rx" if j == 0 else None)
    cb = fig.colorbar(ims["strain_xx"], ax=axes[:3], location="bottom", shrink=0.5, aspect=40, extend="max")
    cb.set_label("1-sigma uncertainty of strain (%), one scale for all strain panels")
    cb = fig.colorbar(ims["rotation"], ax=axes[3], location="bottom", shrink=0.9, aspect=24, extend="max")
    cb.set_label("1-sigma uncertainty of rotation (deg)")
    head = (title + "\n") if title else ""
    fig.suptitle(f"{head}1-sigma uncertainty per position (0 to {UNCERTAINTY_MEDIANS:g}x the median or the "
                 f"{COLOUR_PERCENTILE:g}th percentile, the lower; {_region_text(region)}; grey = no value)",
                 fontsize=10)
    return fig


def save_uncertainty_maps(
    path: str | os.PathLike,
    uncertainty: Mapping[str, Any],
    *,
    valid: np.ndarray | None = None,
    title: str | None = None,
    reference_region: Sequence[int] | None = None,
    dpi: int = DEFAULT_DPI,
) -> str:
    """Maps of the 1-sigma uncertainty of strain_xx, strain_yy, shear_xy and rotation, laid out like the strain maps.

    Args:
      path: output PNG.
      uncertainty: ``strain_xx``, ``strain_yy``, ``shear_xy`` (dimensionless) and ``rotation`` (radians): ``(Rx,
        Ry)`` 1-sigma uncertainties (>= 0), NaN where invalid.
      valid: optional bool ``(Rx, Ry)``; positions where it is False are drawn grey.
      title: first line of the figure title.
      reference_region: ``(r0, r1, c0, c1)`` (0-based, end excluded), outlined in black; None draws nothing.
      dpi: resolution of the PNG.

    Returns:
      ``path`` as str. Strains are drawn in %, rotation in degrees, each on a sequential scale (viridis) from 0 to
      `UNCERTAINTY_MEDIANS` times the median or the 99.5th percentile, whichever is lower (a grain boundary's far
      larger errors saturate); the three strain panels share one scale.
    """
    dpi = _check_dpi(dpi)
    return _save(_uncertainty_figure(uncertainty, valid=valid, title=title, reference_region=reference_region,
                                     dpi=dpi), path, dpi)


def _histograms_figure(maps, *, labels=None, baseline=None, bins=100, dpi=DEFAULT_DPI):
    if not (isinstance(bins, (int, np.integer)) and bins >= 2):
        raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
    rows = _all_prepared(maps, labels, baseline)
    fig = _figure(15.0, 4.3, dpi)
    axes = fig.subplots(1, 4)
    finite = {k: [p[k][np.isfinite(p[k])] for _, p in rows] for k in QUANTITIES}
    s_lim = 1.1 * _robust_limit([STRAIN_PERCENT * d for k in STRAIN_KEYS for d in finite[k]],
                                percentile=COLOUR_PERCENTILE, fallback=0.1)
    r_lim = 1.1 * _robust_limit(finite["rotation"], percentile=COLOUR_PERCENTILE, fallback=1.0)
    any_cut = False
    for ax, k in zip(axes, QUANTITIES):
        scale, lim, unit = (1.0, r_lim, "deg") if k == "rotation" else (STRAIN_PERCENT, s_lim, "%")
        edges = np.linspace(-lim, lim, int(bins) + 1)
        counts = {name: np.histogram(scale * d, bins=edges)[0] for (name, _), d in zip(rows, finite[k])}
        estimated = [c.max() for name, c in counts.items() if name != "labels" and c.size]
        # The labels are a few constant grains: their bars would dwarf the estimates. The axis is scaled to the
        # estimates and taller label bars are cut, their counts written on top.
        top = 1.3 * max(estimated) if estimated and max(estimated) > 0 else None
        off = []
        for (name, _), d in zip(rows, finite[k]):
            colour, filled = _METHOD_STYLE[name]
            c = counts[name]
            outside = int(np.sum(np.abs(scale * d) > lim))
            if outside:
                off.append(f"{name} {outside}")
            label = f"{name} (n = {d.size} valid)"
            if filled:
                shown = c if top is None else np.minimum(c, top)
                ax.stairs(shown, edges, fill=True, color=colour, alpha=0.35, label=label)
                if top is not None:
                    for i in np.nonzero(c > top)[0]:
                        any_cut = True
                        ax.text(0.5 * (edges[i] + edges[i + 1]), top, str(int(c[i])), ha="center", va="bottom",
                                fontsize=6, color="0.25", rotation=90)
            else:
                ax.stairs(c, edges, color=colour, linewidth=1.4, label=label)
        if off:
            ax.text(0.02, 0.98, f"off-scale (|value| > {lim:.3g} {unit}, not drawn):\n" + ", ".join(off),
                    transform=ax.transAxes, ha="left", va="top", fontsize=7, color="0.3")
        ax.set_xlim(-lim, lim)
        if top is not None:
            ax.set_ylim(0, 1.12 * top)
        ax.axvline(0.0, color="0.5", linewidth=0.6, linestyle=":")
        ax.set_title(_TITLES[k], fontsize=11)
        ax.set_xlabel("rotation (deg)" if k == "rotation" else "strain (%)")
        ax.tick_params(labelsize=8)
    axes[0].set_ylabel("positions per bin")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=len(names), fontsize=9, frameon=False)
    note = ("x range: ±1.1 x the 99.5th percentile of |value| (one range for the three strain panels)"
            + ("; label bars taller than the axis are cut, their counts written on top" if any_cut else ""))
    fig.suptitle(f"{_CONVENTION_LINE}\n{note}", fontsize=9)
    return fig


def plot_histograms(
    maps: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    labels: Mapping[str, Any] | None = None,
    baseline: Mapping[str, Any] | None = None,
    bins: int = 100,
    dpi: int = DEFAULT_DPI,
) -> str:
    """Overlaid histograms of strain_xx, strain_yy, shear_xy (%) and rotation (deg) per method.

    Args:
      maps, labels, baseline: as in `plot_strain_maps` (labels drawn filled grey, CC-ST-AE blue, py4DSTEM orange).
      path: output PNG.
      bins: bins per panel, shared by all methods over a symmetric range (1.1 x the 99.5th percentile of
        ``|value|``, one range for the three strain panels); values beyond it are not drawn and are counted in the
        panel as "off-scale". The y axis is scaled to the estimates; label bars taller than it are cut and their
        counts written on top. NaN / invalid positions are skipped.
      dpi: resolution of the PNG.

    Returns:
      ``path`` as str.
    """
    dpi = _check_dpi(dpi)
    return _save(_histograms_figure(maps, labels=labels, baseline=baseline, bins=bins, dpi=dpi), path, dpi)


# ---------------------------------------------------------------------------------------------------------------
# pattern, mask, bases
# ---------------------------------------------------------------------------------------------------------------
def _image_norm(img: np.ndarray, log: bool):
    from matplotlib.colors import LogNorm, Normalize

    finite = img[np.isfinite(img)]
    if finite.size == 0:
        return Normalize(0.0, 1.0)
    hi = float(finite.max())
    pos = finite[finite > 0]
    if log and pos.size:
        lo = max(float(np.percentile(pos, 1.0)), hi * 1e-5)
        return LogNorm(lo, hi) if hi > lo else Normalize(lo, lo + 1.0)
    lo = float(finite.min())
    return Normalize(lo, hi if hi > lo else lo + 1.0)


def _pattern_figure(pattern, mask, *, title=None, mask_label="loss mask", log=True, dpi=DEFAULT_DPI):
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    pattern = np.asarray(pattern, np.float64)
    if pattern.ndim != 2:
        raise ValueError(f"pattern must be 2-D (H, W) = (Qx, Qy), got shape {pattern.shape}")
    if mask is not None:
        mask = np.asarray(mask, np.float64)
        if mask.shape != pattern.shape:
            raise ValueError(f"mask has shape {mask.shape}, expected the pattern's {pattern.shape}")
    ncol = 1 if mask is None else 2
    fig = _figure(4.6 * ncol + 0.4, 4.8, dpi)
    axes = fig.subplots(1, ncol, squeeze=False, sharex=True, sharey=True)[0]
    norm = _image_norm(pattern, log)
    cmap = _cmap("magma")
    shown = [(pattern, "pattern" + (", mask outlined (cyan)" if mask is not None else ""))]
    if mask is not None:
        shown.append((np.where(mask > 0, pattern * mask, np.nan), "pattern x mask (what the loss sees)"))
    for ax, (img, name) in zip(axes, shown):
        im = ax.imshow(np.clip(img, norm.vmin, None) if log else img, cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("Qy (pattern column, px)")
        ax.tick_params(labelsize=8)
    axes[0].set_ylabel("Qx (pattern row, px)")
    if mask is not None:
        if mask.min() < 0.5 <= mask.max():
            axes[0].contour(mask, levels=[0.5], colors="cyan", linewidths=0.8)
        handles = [Line2D([], [], color="cyan", linewidth=1.2, label=f"{mask_label} (outline)"),
                   Patch(facecolor=_BAD_COLOUR, edgecolor="0.3", label="grey: outside the mask, not in the loss")]
        fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    cb = fig.colorbar(im, ax=list(axes), location="right", shrink=0.85)
    cb.set_label("intensity (counts)" + (" (log scale)" if log else ""))
    cb.ax.tick_params(labelsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_pattern_and_mask(
    pattern: np.ndarray,
    mask: np.ndarray | None,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    mask_label: str = "loss mask",
    log: bool = True,
    dpi: int = DEFAULT_DPI,
) -> str:
    """A diffraction pattern with the loss mask outlined (cyan), beside the masked pattern (outside grey).

    Args:
      pattern: ``(H, W)`` = ``(Qx, Qy)`` intensities (drawn with Qx downwards, Qy to the right).
      mask: ``(H, W)`` bool or float in [0, 1] (outline at 0.5), or None for the pattern alone.
      path: output PNG.
      title: figure title (e.g. which scan position the pattern is from).
      mask_label: what the mask is, for the legend (e.g. "training loss mask at epoch 15").
      log: logarithmic colour scale (from the 1st percentile of positive values, at most 5 decades); values
        <= 0 are drawn at the bottom of the scale.
      dpi: resolution of the PNG.

    Returns:
      ``path`` as str.
    """
    dpi = _check_dpi(dpi)
    return _save(_pattern_figure(pattern, mask, title=title, mask_label=mask_label, log=log, dpi=dpi), path, dpi)


def _bases_figure(bases, *, counts=None, log=True, dpi=DEFAULT_DPI):
    from matplotlib.colors import Normalize

    bases = np.asarray(bases, np.float64)
    if bases.ndim == 2:
        bases = bases[None]
    if bases.ndim != 3 or bases.shape[0] == 0:
        raise ValueError(f"bases must be (num_bases, H, W) (or one (H, W) base), got shape {bases.shape}")
    n = bases.shape[0]
    if counts is not None:
        counts = np.asarray(counts)
        if counts.shape != (n,):
            raise ValueError(f"counts must hold one number per base ({n}), got shape {counts.shape}")
    ncol = min(n, 4)
    nrow = math.ceil(n / ncol)
    fig = _figure(3.4 * ncol + 0.4, 3.3 * nrow + 0.5, dpi)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    total = int(counts.sum()) if counts is not None else 0
    for idx, ax in enumerate(axes.ravel()):
        if idx >= n:
            ax.set_axis_off()
            continue
        b = bases[idx]
        finite = b[np.isfinite(b)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if lo < 0 < hi and -lo > 0.02 * hi:  # signed base: diverging scale centred on zero, clipped
            m = float(np.percentile(np.abs(finite), COLOUR_PERCENTILE)) or max(-lo, hi)
            im = ax.imshow(b, cmap=_cmap("RdBu_r"), norm=Normalize(-m, m), interpolation="nearest")
        else:  # log scale: the first-order spots are orders of magnitude below the central beam
            norm = _image_norm(b, log)
            im = ax.imshow(np.clip(b, norm.vmin, None) if log else b, cmap=_cmap("magma"), norm=norm,
                           interpolation="nearest")
        name = f"base {idx}"
        if counts is not None:
            share = f" ({100 * counts[idx] / total:.0f} %)" if total else ""
            name += f": {int(counts[idx])} pattern{'s' if counts[idx] != 1 else ''}{share}"
        ax.set_title(name, fontsize=10)
        ax.tick_params(labelsize=7)
        if idx % ncol == 0:
            ax.set_ylabel("Qx (row, px)", fontsize=9)
        if idx // ncol == nrow - 1 or idx + ncol >= n:
            ax.set_xlabel("Qy (column, px)", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8).ax.tick_params(labelsize=8)
    what = f"{n} learned base pattern{'s' if n > 1 else ''}" + (" (log colour scale)" if log else "")
    if counts is not None:
        what += "\nN patterns: valid scan positions matched to it"
    fig.suptitle(what, fontsize=10)
    return fig


def plot_bases(bases: np.ndarray, path: str | os.PathLike, *, counts: Sequence[int] | None = None,
               log: bool = True, dpi: int = DEFAULT_DPI) -> str:
    """The learned base pattern(s), each with its own colour scale.

    Args:
      bases: ``(num_bases, H, W)`` (or ``(H, W)``), axes ``(Qx, Qy)``.
      path: output PNG.
      counts: optional ``(num_bases,)`` number of scan positions matched to each base (shown in the panel titles).
      log: logarithmic colour scale for non-negative bases (else a linear one), so the diffraction spots show
        beside the much brighter central beam; signed bases get a diverging scale clipped at the 99.5th percentile
        of ``|value|``.
      dpi: resolution of the PNG.

    Returns:
      ``path`` as str.
    """
    dpi = _check_dpi(dpi)
    return _save(_bases_figure(bases, counts=counts, log=log, dpi=dpi), path, dpi)


# ---------------------------------------------------------------------------------------------------------------
# training curves
# ---------------------------------------------------------------------------------------------------------------
def read_metrics(metrics_path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Reads a training run's ``metrics.jsonl``: ``(step_records, epoch_records)``, each sorted by step.

    Lines with ``"kind": "epoch"`` are epoch summaries; every other object holding a ``step`` is a step record.
    Unreadable lines (e.g. one cut short by a kill) are skipped; for a repeated step the last line wins.
    """
    metrics_path = os.fspath(metrics_path)
    if not os.path.isfile(metrics_path):
        raise FileNotFoundError(f"metrics file {metrics_path} does not exist")
    steps: dict[int, dict] = {}
    epochs: dict[int, dict] = {}
    with open(metrics_path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
                continue
            (epochs if rec.get("kind") == "epoch" else steps)[int(rec["step"])] = rec
    return [steps[s] for s in sorted(steps)], [epochs[s] for s in sorted(epochs)]


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            x.append(float(r["step"]))
            y.append(float(v))
    return np.asarray(x), np.asarray(y)


def _positive(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ok = np.isfinite(y) & (y > 0)
    return x[ok], y[ok]


def _loss_terms(records: list[dict]) -> list[str]:
    keys: list[str] = []
    for r in records:
        for k, v in r.items():
            if k not in _NOT_LOSS_TERMS and k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.append(k)
    return (["loss"] if "loss" in keys else []) + [k for k in keys if k != "loss"]


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _run_files(metrics_path: str) -> tuple[dict, int | None]:
    """The run's loss configuration (``model.json`` ``"loss"``) and steps per epoch (``config.json``) when they lie
    beside ``metrics.jsonl``; ``({}, None)`` otherwise."""
    folder = os.path.dirname(os.path.abspath(metrics_path))
    loss = _read_json(os.path.join(folder, "model.json")).get("loss")
    spe = _read_json(os.path.join(folder, "config.json")).get("steps_per_epoch")
    return (loss if isinstance(loss, dict) else {}), (int(spe) if isinstance(spe, int) and spe > 0 else None)


def _steps_per_epoch(epoch_recs: list[dict]) -> int | None:
    """Steps per epoch from an epoch record of a run that started at step 0 (epoch ``e`` ends at ``(e + 1) * spe``)."""
    for r in epoch_recs:
        e, step = r.get("epoch"), r.get("step")
        if isinstance(e, int) and isinstance(step, int) and step > 0 and step % (e + 1) == 0:
            return step // (e + 1)
    return None


# The weight of each CC-ST-AE loss term in the total (`ccstae_jax.train.losses.ccstae_loss`): LossConfig field or 1.
_TERM_WEIGHTS = {"forward": None, "cycle": "cycle_weight", "penalty": None, "l1": "l1_coef"}


def _training_figure(metrics_path, *, loss_config=None, dpi=DEFAULT_DPI):
    step_recs, epoch_recs = read_metrics(metrics_path)
    if not step_recs and not epoch_recs:
        raise ValueError(f"metrics file {os.fspath(metrics_path)} holds no records with a 'step'")
    run_loss, spe = _run_files(os.fspath(metrics_path))
    loss_cfg = dict(loss_config) if loss_config is not None else run_loss
    spe = spe or _steps_per_epoch(epoch_recs)
    per = float(spe) if spe else 1.0  # x = step / per: epochs when known, else steps
    xlabel = "epoch (step / steps per epoch)" if spe else "step"
    main = step_recs or epoch_recs
    terms = _loss_terms(main)
    weighted = bool(loss_cfg) and any(t in _TERM_WEIGHTS for t in terms)
    extra = [k for k in ("learning_rate", "grad_norm") if _positive(*_series(main, k))[0].size]
    fig = _figure(6.4 + 4.2 * len(extra), 5.0, dpi)
    axes = fig.subplots(1, 1 + len(extra), squeeze=False)[0]
    ax = axes[0]
    skipped = []
    for k in terms:
        x, y = _positive(*_series(main, k))
        weight, label = 1.0, k
        if weighted and _TERM_WEIGHTS.get(k):
            weight = float(loss_cfg.get(_TERM_WEIGHTS[k], 1.0))
            label = f"{k} x {weight:g}"
            x, y = _positive(x, weight * y)
        if x.size == 0:
            skipped.append(k)
            continue
        ax.plot(x / per, y, label=label, linewidth=2.0 if k == "loss" else 1.2,
                color="black" if k == "loss" else None, marker="." if x.size < 30 else None)
    if step_recs and epoch_recs:
        x, y = _positive(*_series(epoch_recs, "loss"))
        if x.size:
            ax.plot(x / per, y, linestyle="none", marker="o", markersize=4, markerfacecolor="white",
                    markeredgecolor="black", label="loss (epoch mean)")
    shrink = None
    if spe and loss_cfg.get("use_spot_mask", True) and "shrink_start" in loss_cfg:
        start, length = float(loss_cfg["shrink_start"]), float(loss_cfg.get("shrink_epochs", 0))
        shrink = (start, start + length)
        ax.axvline(start, color="tab:red", linestyle="--", linewidth=1.0,
                   label=f"mask: ring -> spot disks (after epoch {start:g})")
        if length > 0:
            ax.axvspan(start, start + length, color="tab:red", alpha=0.07,
                       label=f"spot disks shrink ({_spot_radii(metrics_path)})")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("weighted loss term (log scale)" if weighted else "loss / term (log scale)")
    ax.set_title(("weighted terms, sum = loss" if weighted else "loss terms")
                 + (f" (none > 0: {', '.join(skipped)})" if skipped else ""), fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    ax.grid(True, which="both", alpha=0.25)
    for ax, k in zip(axes[1:], extra):
        x, y = _positive(*_series(main, k))
        ax.plot(x / per, y, color="tab:green" if k == "learning_rate" else "tab:purple",
                drawstyle="steps-post" if k == "learning_rate" else "default")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(k.replace("_", " ") + " (log scale)")
        ax.set_title(k.replace("_", " "), fontsize=10)
        ax.grid(True, which="both", alpha=0.25)
    name = os.path.basename(os.path.dirname(os.path.abspath(os.fspath(metrics_path))))
    title = f"training curves of run {name}"
    if weighted:
        title += (": loss = forward + cycle_weight x cycle + penalty + l1_coef x l1 (each MSE a mean over the mask)")
    if shrink is not None:
        title += ("\nthe loss steps up where the mask shrinks from the ring to the spot disks (red): the dark, "
                  "easily fitted background leaves the mean, so the rise is not divergence")
    fig.suptitle(title, fontsize=10)
    return fig


def plot_training_curves(metrics_path: str | os.PathLike, path: str | os.PathLike, *,
                         loss_config: Mapping[str, Any] | None = None, dpi: int = DEFAULT_DPI) -> str:
    """The loss and its weighted terms against epoch (log y), the learning rate and gradient norm when logged, and
    the mask schedule.

    Args:
      metrics_path: ``metrics.jsonl`` of a run (see `read_metrics`). Step records are drawn as lines and epoch means
        of ``loss`` as open circles; with only epoch records those are drawn. Every numeric key that is not
        bookkeeping (step, epoch, learning_rate, wall_time, ...) is taken as a loss term; values <= 0 or NaN are
        left out of the log plot. The run's ``model.json`` and ``config.json`` beside it, when present, give the
        loss weights, the mask schedule and the steps per epoch.
      path: output PNG.
      loss_config: the run's `ccstae_jax.train.losses.LossConfig` as a dict (``cycle_weight``, ``l1_coef``,
        ``shrink_start``, ``shrink_epochs``, ...); None = ``model.json``'s ``"loss"`` beside ``metrics_path``.
        With it the terms are drawn weighted as they enter the loss (``cycle x cycle_weight``, ``l1 x l1_coef``;
        their sum is the loss), and the epoch where the mask changes from the ring to the spot disks
        (``shrink_start``) and the epochs over which the disks shrink (``shrink_epochs``) are marked.
      dpi: resolution of the PNG.

    Returns:
      ``path`` as str. The x axis is in epochs (step / steps per epoch) when the steps per epoch are known (from
      ``config.json`` or the epoch records), else in steps.
    """
    dpi = _check_dpi(dpi)
    return _save(_training_figure(metrics_path, loss_config=loss_config, dpi=dpi), path, dpi)


# ---------------------------------------------------------------------------------------------------------------
# detector frame and image frame
# ---------------------------------------------------------------------------------------------------------------
def _frames_figure(maps, scan_rotation, *, strain_limit=None, dpi=DEFAULT_DPI):
    from matplotlib.colors import Normalize

    from ccstae_jax.report.frames import image_frame_maps

    turned = {k.split("/", 1)[1]: v for k, v in image_frame_maps(maps, scan_rotation).items()}
    if "valid" in maps:
        turned["valid"] = maps["valid"]
    det = _prepared("detector frame", maps, QUANTITIES, None)
    img = _prepared("image frame", turned, QUANTITIES, det["strain_xx"].shape)
    rows = [("detector frame", det), (f"image frame ({float(scan_rotation):g} deg)", img)]
    s_lim = float(strain_limit) if strain_limit is not None else \
        _robust_limit([p[k] for _, p in rows for k in STRAIN_KEYS], fallback=1e-3)
    r_lim = _robust_limit([det["rotation"]], fallback=1.0)
    rx, ry = det["strain_xx"].shape
    aspect = min(max(rx / ry, 0.4), 2.5)
    panel = 2.9
    fig = _figure(4 * panel + 0.6, 2 * panel * aspect + 1.9, dpi, images=True)
    axes = fig.subplots(2, 4, squeeze=False, sharex=True, sharey=True)
    s_norm, r_norm, cmap = Normalize(-100 * s_lim, 100 * s_lim), Normalize(-r_lim, r_lim), _cmap("RdBu_r")
    ims = {}
    for i, (name, p) in enumerate(rows):
        for j, k in enumerate(QUANTITIES):
            ax = axes[i, j]
            ims[k] = ax.imshow(p[k] if k == "rotation" else 100 * p[k], cmap=cmap,
                               norm=r_norm if k == "rotation" else s_norm, interpolation="nearest", origin="upper")
            if i == 0:
                ax.set_title(_TITLES[k], fontsize=11)
            _scan_axes(ax, xlabel=i == 1, ylabel="scan row Rx" if j == 0 else None)
            if j == 0:
                ax.annotate(name, xy=(0, 0.5), xycoords=ax.yaxis.label, xytext=(-4, 0), textcoords="offset points",
                            ha="right", va="center", rotation=90, fontsize=11, fontweight="bold")
    cb = fig.colorbar(ims["strain_xx"], ax=axes[:, :3], location="bottom", shrink=0.5, aspect=40, extend="both")
    cb.set_label("strain (%), one scale for all strain panels")
    cb = fig.colorbar(ims["rotation"], ax=axes[:, 3], location="bottom", shrink=0.9, aspect=24, extend="both")
    cb.set_label("rotation (deg), the same in both frames")
    fig.suptitle("The same strain map in two frames. Detector: x = Qx (pattern rows), y = Qy (pattern columns).\n"
                 f"Image: x = scan rows Rx, y = scan columns Ry; detector +Qx points {float(scan_rotation):g} deg "
                 "counter-clockwise from +Rx; grey = no value", fontsize=10)
    return fig


def plot_strain_frames(
    maps: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    scan_rotation: float,
    strain_limit: float | None = None,
    dpi: int = DEFAULT_DPI,
) -> str:
    """One strain map drawn in the detector frame (top row) and turned into the image frame (bottom row).

    Args:
      maps: detector-frame maps as in `plot_strain_maps` (``strain_xx``, ``strain_yy``, ``shear_xy``,
        ``rotation`` (radians), optional ``valid``).
      path: output PNG.
      scan_rotation: degrees, counter-clockwise from the scan's row axis to the image direction of detector +Qx
        (`ccstae_jax.report.frames`).
      strain_limit: colour limit of the strain panels (dimensionless); None = 99th percentile over both rows.
      dpi: resolution of the PNG.

    Returns:
      ``path`` as str.
    """
    dpi = _check_dpi(dpi)
    return _save(_frames_figure(maps, scan_rotation, strain_limit=strain_limit, dpi=dpi), path, dpi)


# ---------------------------------------------------------------------------------------------------------------
# reconstruction error and validity
# ---------------------------------------------------------------------------------------------------------------
def _error_figure(maps, *, dpi=DEFAULT_DPI):
    from matplotlib.colors import BoundaryNorm, ListedColormap, Normalize
    from matplotlib.patches import Patch

    if "reconstruction_error" not in maps:
        raise ValueError(f"maps lack 'reconstruction_error' (have {sorted(maps)})")
    err = np.array(maps["reconstruction_error"], np.float64)
    if err.ndim != 2:
        raise ValueError(f"'reconstruction_error' must be 2-D (Rx, Ry), got shape {err.shape}")
    if "valid" in maps:
        valid = np.asarray(maps["valid"], bool)
    elif "strain_xx" in maps:
        valid = np.isfinite(np.asarray(maps["strain_xx"], np.float64))
    else:
        valid = np.isfinite(err)
    if valid.shape != err.shape:
        raise ValueError(f"'valid' has shape {valid.shape}, expected {err.shape} like 'reconstruction_error'")
    reason = np.asarray(maps["invalid_reason"]) if "invalid_reason" in maps else None
    if reason is not None and reason.shape != err.shape:
        raise ValueError(f"'invalid_reason' has shape {reason.shape}, expected {err.shape}")
    rx, ry = err.shape
    aspect = min(max(rx / ry, 0.4), 2.5)
    fig = _figure(10.0, 4.6 * aspect + 1.5, dpi, images=True)
    grid = fig.subplots(2, 2, height_ratios=[4.6 * aspect, 0.7])
    axes, below = grid[0], grid[1]
    finite = err[np.isfinite(err)]
    hi = float(np.percentile(finite, COLOUR_PERCENTILE)) if finite.size else 1.0
    # From zero, so the colours show how large the differences between positions are, not just their order.
    im = axes[0].imshow(err, cmap=_cmap("viridis"), norm=Normalize(0.0, hi if hi > 0 else 1.0),
                        interpolation="nearest")
    below[0].set_axis_off()
    cax = below[0].inset_axes((0.1, 0.72, 0.8, 0.28))
    cb = fig.colorbar(im, cax=cax, orientation="horizontal", extend="max")
    cb.set_label("reduced chi-square of the pattern's fit, relative to its median over the scan\n"
                 f"(1 = a typical fit; dimensionless); scale 0 to the {COLOUR_PERCENTILE:g}th percentile", fontsize=8)
    cb.ax.tick_params(labelsize=8)
    axes[0].set_title("reconstruction error per position (high = worse fit)", fontsize=10)

    from ccstae_jax.mapping.reference import INVALID_REASONS  # noqa: PLC0415 (keeps the module import cheap)

    if reason is None:
        codes, names = np.where(valid, 0, 1), ["valid", "invalid"]
    else:
        present = sorted(set(np.unique(reason).tolist()) | {0})
        codes = np.searchsorted(present, reason)
        names = [INVALID_REASONS.get(int(c), f"reason {c}") for c in present]
    palette = ["#e8e8e8", "#d62728", "#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#17becf"]
    n = len(names)
    cmap = ListedColormap([palette[i % len(palette)] for i in range(n)])
    im = axes[1].imshow(codes, cmap=cmap, norm=BoundaryNorm(np.arange(n + 1) - 0.5, n), interpolation="nearest")
    handles = [Patch(facecolor=cmap(i), edgecolor="0.3", label=nm) for i, nm in enumerate(names)]
    below[1].set_axis_off()
    below[1].legend(handles=handles, loc="upper center", ncol=min(n, 2), fontsize=8, frameon=False)
    frac = float(valid.mean()) if valid.size else 0.0
    axes[1].set_title(f"valid positions: {int(valid.sum())} of {valid.size} ({100 * frac:.1f} %)", fontsize=10)
    for i, ax in enumerate(axes):
        _scan_axes(ax, xlabel=True, ylabel="scan row Rx" if i == 0 else None)
    return fig


def _spot_radii(metrics_path) -> str:
    """``"a -> b px"``: the spot-mask radii of the run beside ``metrics_path`` (from its model geometry)."""
    geometry = _read_json(os.path.join(os.path.dirname(os.fspath(metrics_path)), "model.json")).get(
        "model", {}).get("geometry")
    if not geometry:
        return "? px"
    start, end = Geometry.from_dict(geometry).spot_radius
    return f"{start:.1f} -> {end:.1f} px"


def _phase_dilation(maps: Mapping[str, Any], phase: int) -> float:
    """Median lattice dilation (mean of strain_xx and strain_yy, relative to the reference) of one phase's valid
    positions; NaN when it has none or the maps lack strain."""
    if "strain_xx" not in maps or "strain_yy" not in maps:
        return float("nan")
    sel = (np.asarray(maps["phase"]) == phase)
    dil = 0.5 * (np.asarray(maps["strain_xx"], np.float64) + np.asarray(maps["strain_yy"], np.float64))[sel]
    dil = dil[np.isfinite(dil)]
    return float(np.median(dil)) if dil.size else float("nan")


def _phase_figure(maps, *, title=None, dpi=DEFAULT_DPI):
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    phase = np.asarray(maps["phase"], np.int64)
    reason = np.asarray(maps["invalid_reason"]) if "invalid_reason" in maps else np.where(phase >= 0, 0, 2)
    n_phase = int(phase.max()) + 1 if (phase >= 0).any() else 0
    codes = np.where(phase >= 0, phase, np.where(reason == 4, n_phase, n_phase + 1))
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    colours = [palette[i % len(palette)] for i in range(n_phase)] + ["#202020", "#c8c8c8"]
    names = [f"phase {i}{' (reference)' if i == 0 else ''}: {int((phase == i).sum())} positions" + (
             f", lattice {100 * d:+.1f} %" if np.isfinite(d := _phase_dilation(maps, i)) else "")
             for i in range(n_phase)]
    names += [f"vacuum (no specimen): {int((codes == n_phase).sum())}",
              f"other invalid: {int((codes == n_phase + 1).sum())}"]
    cmap = ListedColormap(colours)
    rx, ry = phase.shape
    aspect = min(max(rx / ry, 0.4), 2.5)
    fig = _figure(6.0, 4.6 * aspect + 1.4, dpi, images=True)
    ax, below = fig.subplots(2, 1, height_ratios=[4.6 * aspect, 1.0])
    ax.imshow(codes, cmap=cmap, norm=BoundaryNorm(np.arange(len(colours) + 1) - 0.5, len(colours)),
              interpolation="nearest")
    _scan_axes(ax, xlabel=True, ylabel="scan row Rx")
    ax.set_title(title or "phase map: positions grouped by lattice spacing and order intensities",
                 fontsize=10)
    below.set_axis_off()
    handles = [Patch(facecolor=c, edgecolor="0.3", label=nm) for c, nm in zip(colours, names)]
    below.legend(handles=handles, loc="upper center", ncol=2, fontsize=8, frameon=False)
    return fig


def plot_phase_map(maps: Mapping[str, Any], path: str | os.PathLike, *, title: str | None = None,
                   dpi: int = DEFAULT_DPI) -> str:
    """Each valid position's phase (``maps["phase"]``: one colour per phase of a heterostructure, phase 0 the
    reference region's), vacuum (invalid reason 4) in black and other invalid positions in grey, with the count of
    each."""
    if "phase" not in maps:
        raise ValueError(f"maps lack 'phase' (have {sorted(maps)})")
    return _save(_phase_figure(maps, title=title, dpi=_check_dpi(dpi)), path, dpi)


def plot_error_map(maps: Mapping[str, Any], path: str | os.PathLike, *, dpi: int = DEFAULT_DPI) -> str:
    """Per-position reconstruction error (high = the base fits the pattern worse) beside the map of valid positions.

    Args:
      maps: needs ``reconstruction_error`` ``(Rx, Ry)``: the fit's reduced chi-square at each position over its
        median (1 = a typical fit, larger = the base explains the pattern worse), dimensionless; uses ``valid`` and
        ``invalid_reason`` (codes of `ccstae_jax.mapping.reference.INVALID_REASONS`) when present, else validity =
        finite ``strain_xx``.
      path: output PNG.
      dpi: resolution of the PNG.

    Returns:
      ``path`` as str. The error scale runs from 0 to the 99.5th percentile (NaN grey).
    """
    dpi = _check_dpi(dpi)
    return _save(_error_figure(maps, dpi=dpi), path, dpi)


# ---------------------------------------------------------------------------------------------------------------
# noise sweep
# ---------------------------------------------------------------------------------------------------------------
_SWEEP_PANELS = (("strain_xx", STRAIN_PERCENT, "MAE (%)"), ("strain_yy", STRAIN_PERCENT, "MAE (%)"),
                 ("shear_xy", STRAIN_PERCENT, "MAE (%)"), ("rotation_deg", 1.0, "MAE (deg)"))
_SWEEP_METHODS = (("ccstae", "CC-ST-AE", "tab:blue", "-", "o"), ("py4dstem", "py4DSTEM", "tab:orange", "--", "s"),
                  ("crb", "Cramér-Rao bound", "0.4", ":", None))


def _sweep_values(results, method: str, key: str, n: int) -> np.ndarray | None:
    block = results.get(method)
    if block is None or key not in block or block[key] is None:
        return None
    vals = block[key]
    if len(vals) != n:
        raise ValueError(f"noise sweep results[{method!r}][{key!r}] has {len(vals)} values, expected {n} (one per "
                         f"level)")
    return np.array([np.nan if v is None else float(v) for v in vals], np.float64)


def _noise_sweep_figure(results, *, dpi=DEFAULT_DPI):
    if not isinstance(results, Mapping) or "levels" not in results or "ccstae" not in results:
        raise ValueError("noise sweep results must be a dict with 'levels' and 'ccstae' (and optional 'py4dstem', "
                         f"'crb'); got {sorted(results) if isinstance(results, Mapping) else type(results).__name__}")
    levels = np.asarray(results["levels"], np.float64)
    if levels.ndim != 1 or levels.size == 0:
        raise ValueError(f"noise sweep 'levels' must be a non-empty list, got {results['levels']!r}")
    pct = levels * 100.0 if np.nanmax(levels) <= 1.0 else levels
    panels = [p for p in _SWEEP_PANELS if any(_sweep_values(results, m[0], p[0], levels.size) is not None
                                              for m in _SWEEP_METHODS)]
    if not panels:
        raise ValueError("noise sweep results hold none of strain_xx, strain_yy, shear_xy, rotation_deg")
    fig = _figure(3.8 * len(panels) + 0.4, 4.0, dpi)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    strain_axes = [ax for ax, p in zip(axes, panels) if p[0] != "rotation_deg"]
    for ax in strain_axes[1:]:
        ax.sharey(strain_axes[0])
    for ax, (key, scale, ylabel) in zip(axes, panels):
        for method, name, colour, ls, marker in _SWEEP_METHODS:
            v = _sweep_values(results, method, key, levels.size)
            if v is not None:
                ax.plot(pct, scale * v, color=colour, linestyle=ls, marker=marker, markersize=4, label=name)
        ax.set_title(_TITLES.get(key, _TITLES["rotation"]), fontsize=11)
        ax.set_xlabel("background noise (%)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.25)
        ax.tick_params(labelsize=8)
    for ax in axes:  # after all panels are drawn, so the shared strain axis covers every curve
        top = max((np.nanmax(line.get_ydata()) for ax2 in ([*strain_axes] if ax in strain_axes else [ax])
                   for line in ax2.get_lines() if np.isfinite(line.get_ydata()).any()), default=1.0)
        ax.set_ylim(0, 1.08 * top if top > 0 else 1.0)
    handles: dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=len(handles), frameon=False)
    fig.suptitle("mean absolute error against labels vs background noise (all positions)", fontsize=11)
    return fig


def plot_noise_sweep(results: Mapping[str, Any], path: str | os.PathLike, *, dpi: int = DEFAULT_DPI) -> str:
    """MAE of strain_xx, strain_yy, shear_xy (%) and rotation (deg) against background noise, per method.

    Args:
      results: the noise-sweep JSON: ``{"levels": [w, ...], "ccstae": {"strain_xx": [...], "strain_yy": [...],
        "shear_xy": [...], "rotation_deg": [...]}, "py4dstem": {same} or None, "crb": {"strain_xx": [...], ...} or
        None}``. Levels are noise weights ``w`` in [0, 1] (drawn as %; levels above 1 are taken as percent
        already); strain MAEs are dimensionless, rotation in degrees; ``None`` entries leave gaps. A quantity no
        method reports gets no panel.
      path: output PNG.
      dpi: resolution of the PNG.

    Returns:
      ``path`` as str.
    """
    dpi = _check_dpi(dpi)
    return _save(_noise_sweep_figure(results, dpi=dpi), path, dpi)


# ---------------------------------------------------------------------------------------------------------------
# everything
# ---------------------------------------------------------------------------------------------------------------
def _base_counts(maps: Mapping[str, Any], n_bases: int) -> np.ndarray | None:
    """Valid positions matched to each base, from ``maps["class_index"]`` (None when the maps lack it)."""
    if "class_index" not in maps:
        return None
    idx = np.asarray(maps["class_index"]).astype(np.int64)
    valid = np.asarray(maps["valid"], bool) if "valid" in maps else np.ones(idx.shape, bool)
    idx = idx[valid & (idx >= 0) & (idx < n_bases)]
    return np.bincount(idx, minlength=n_bases)


def save_all_figures(
    out_dir: str | os.PathLike,
    *,
    maps: Mapping[str, Any],
    labels: Mapping[str, Any] | None = None,
    baseline: Mapping[str, Any] | None = None,
    pattern: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    bases: np.ndarray | None = None,
    metrics_path: str | os.PathLike | None = None,
    title: str | None = None,
    reference_region: Sequence[int] | None = None,
    symmetry: int | None = 6,
    pattern_title: str | None = None,
    mask_label: str = "loss mask",
    dpi: int = DEFAULT_DPI,
) -> list[str]:
    """Writes every figure its inputs allow into ``out_dir`` (created if missing); returns the paths written.

    Files: ``strain_maps.png`` and ``strain_histograms.png`` (always), ``uncertainty_maps.png`` (when ``maps``
    holds ``uncertainty_strain_xx``, ``uncertainty_strain_yy``, ``uncertainty_shear_xy`` and
    ``uncertainty_rotation``), ``error_map.png`` (when ``maps`` holds ``reconstruction_error``),
    ``phase_map.png`` (when ``maps`` holds a ``phase`` map with several bases or vacuum),
    ``pattern_mask.png`` (when ``pattern`` is given; ``mask`` optional), ``bases.png`` (when ``bases`` is given;
    with the number of valid positions per base when ``maps`` holds ``class_index``), ``training_curves.png`` (when
    ``metrics_path`` is given).

    ``title`` (e.g. the data file and run) heads the map figures, ``reference_region`` ``(r0, r1, c0, c1)`` is
    outlined on them, ``symmetry`` sets the cyclic rotation scale (see `plot_strain_maps`); ``pattern_title`` and
    ``mask_label`` describe the pattern figure (which scan position, which mask).
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    j = os.path.join
    paths = [plot_strain_maps(maps, j(out_dir, "strain_maps.png"), labels=labels, baseline=baseline, title=title,
                              symmetry=symmetry, reference_region=reference_region, dpi=dpi),
             plot_histograms(maps, j(out_dir, "strain_histograms.png"), labels=labels, baseline=baseline, dpi=dpi)]
    unc_keys = {UNCERTAINTY_PREFIX + k: k for k in QUANTITIES}
    if all(k in maps for k in unc_keys):
        paths.append(save_uncertainty_maps(j(out_dir, "uncertainty_maps.png"),
                                           {q: maps[k] for k, q in unc_keys.items()}, valid=maps.get("valid"),
                                           title=title, reference_region=reference_region, dpi=dpi))
    if "reconstruction_error" in maps:
        paths.append(plot_error_map(maps, j(out_dir, "error_map.png"), dpi=dpi))
    if "phase" in maps and (np.max(maps["phase"]) > 0 or np.any(np.asarray(maps.get("invalid_reason", 0)) == 4)):
        paths.append(plot_phase_map(maps, j(out_dir, "phase_map.png"), dpi=dpi))
    if pattern is not None:
        paths.append(plot_pattern_and_mask(pattern, mask, j(out_dir, "pattern_mask.png"), title=pattern_title,
                                           mask_label=mask_label, dpi=dpi))
    elif mask is not None:
        raise ValueError("a mask was given without a pattern to draw it on")
    if bases is not None:
        n_bases = np.shape(bases)[0] if np.ndim(bases) == 3 else 1
        paths.append(plot_bases(bases, j(out_dir, "bases.png"), counts=_base_counts(maps, n_bases), dpi=dpi))
    if metrics_path is not None:
        paths.append(plot_training_curves(metrics_path, j(out_dir, "training_curves.png"), dpi=dpi))
    return paths
