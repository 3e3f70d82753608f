"""Figures for strain mapping: strain maps, histograms, pattern and mask, learned bases, training curves, noise sweep.

Every function draws on a fresh :class:`matplotlib.figure.Figure` (no pyplot, no global backend change, nothing to
close, safe without a display), writes one PNG at a fixed pixel size (``figsize * dpi``, no tight bounding box) and
returns the path as ``str``. matplotlib is imported inside the functions, so importing this module stays cheap.

Conventions (the same as `ccstae_jax.strain`): maps are ``(Rx, Ry)`` and drawn with scan row ``Rx`` downwards and
scan column ``Ry`` to the right. x = detector Qx = pattern rows (axis 2 of the 4D data), y = Qy = pattern columns
(axis 3). ``strain_xx``, ``strain_yy``: real-space lattice strain along x, y (positive = lattice stretched = spots move
inward); ``shear_xy``: tensor shear; ``rotation``: radians counter-clockwise from +Qx toward +Qy, relative to the
reference (modulo the lattice symmetry). Strains are drawn in percent, rotation in degrees. NaN (and positions with
``valid == False``) are drawn in grey.

Example::

    from ccstae_jax.strain import read_strain_h5
    from ccstae_jax import plots

    maps, _ = read_strain_h5("run/strain.h5")
    plots.plot_strain_maps(maps, "run/strain_maps.png", labels=labels)
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

STRAIN_KEYS = ("strain_xx", "strain_yy", "shear_xy")
QUANTITIES = STRAIN_KEYS + ("rotation",)
DEFAULT_DPI = 120

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
    strain_limit: float | None = None,
) -> tuple[float, float]:
    """Symmetric colour limits shared by all methods in `plot_strain_maps`.

    Args:
      maps, labels, baseline: strain-map dicts (see `plot_strain_maps`).
      strain_limit: fixed strain limit (dimensionless, e.g. ``0.02`` for 2 %); None = robust automatic.

    Returns:
      ``(strain_lim, rotation_lim_deg)``: the strain panels span ``[-strain_lim, strain_lim]`` (dimensionless), the
      rotation panels ``[-rotation_lim_deg, rotation_lim_deg]`` (degrees). Automatic limits are the 99th percentile
      of ``|value|`` over every finite position of every method shown (all three strain components pooled).
    """
    rows = _all_prepared(maps, labels, baseline)
    if strain_limit is None:
        s_lim = _robust_limit([p[k] for _, p in rows for k in STRAIN_KEYS], fallback=1e-3)
    else:
        s_lim = float(strain_limit)
        if not (np.isfinite(s_lim) and s_lim > 0):
            raise ValueError(f"strain_limit must be a positive finite number (dimensionless), got {strain_limit!r}")
    r_lim = _robust_limit([p["rotation"] for _, p in rows], fallback=1.0)
    return s_lim, r_lim


def _scan_axes(ax, *, xlabel: bool, ylabel: str | None) -> None:
    ax.set_xlabel("scan column Ry" if xlabel else "")
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    ax.tick_params(labelsize=8)


# ---------------------------------------------------------------------------------------------------------------
# strain maps and histograms
# ---------------------------------------------------------------------------------------------------------------
def _strain_maps_figure(maps, *, labels=None, baseline=None, title=None, strain_limit=None, dpi=DEFAULT_DPI):
    from matplotlib.colors import Normalize

    rows = _all_prepared(maps, labels, baseline)
    s_lim, r_lim = color_limits(maps, labels=labels, baseline=baseline, strain_limit=strain_limit)
    rx, ry = rows[0][1]["strain_xx"].shape
    aspect = min(max(rx / ry, 0.4), 2.5)
    panel = 2.9
    fig = _figure(4 * panel + 0.6, len(rows) * panel * aspect + 1.9, dpi, images=True)
    axes = fig.subplots(len(rows), 4, squeeze=False, sharex=True, sharey=True)
    s_norm = Normalize(-100 * s_lim, 100 * s_lim)
    r_norm = Normalize(-r_lim, r_lim)
    cmap = _cmap("RdBu_r")
    ims = {}
    for i, (name, p) in enumerate(rows):
        for j, k in enumerate(QUANTITIES):
            ax = axes[i, j]
            data = p[k] if k == "rotation" else 100 * p[k]
            ims[k] = ax.imshow(data, cmap=cmap, norm=r_norm if k == "rotation" else s_norm,
                               interpolation="nearest", origin="upper")
            if i == 0:
                ax.set_title(_TITLES[k], fontsize=11)
            _scan_axes(ax, xlabel=i == len(rows) - 1, ylabel="scan row Rx" if j == 0 else None)
            if j == 0:
                ax.annotate(name, xy=(0, 0.5), xycoords=ax.yaxis.label, xytext=(-4, 0), textcoords="offset points",
                            ha="right", va="center", rotation=90, fontsize=12, fontweight="bold")
    cb = fig.colorbar(ims["strain_xx"], ax=axes[:, :3], location="bottom", shrink=0.5, aspect=40, extend="both")
    cb.set_label("strain (%), one scale for all strain panels")
    cb = fig.colorbar(ims["rotation"], ax=axes[:, 3], location="bottom", shrink=0.9, aspect=24, extend="both")
    cb.set_label("rotation (deg)")
    head = (title + "\n") if title else ""
    fig.suptitle(f"{head}{_CONVENTION_LINE}; grey = no value", fontsize=10)
    return fig


def plot_strain_maps(
    maps: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    labels: Mapping[str, Any] | None = None,
    baseline: Mapping[str, Any] | None = None,
    title: str | None = None,
    strain_limit: float | None = None,
    dpi: int = DEFAULT_DPI,
) -> str:
    """Maps of strain_xx, strain_yy, shear_xy and rotation; one row per method (labels, CC-ST-AE, baseline).

    Args:
      maps: CC-ST-AE maps as from `ccstae_jax.strain.read_strain_h5`: ``strain_xx``, ``strain_yy``, ``shear_xy``
        (dimensionless) and ``rotation`` (radians), each ``(Rx, Ry)``; NaN where invalid; optional bool ``valid``.
      path: output PNG.
      labels: ground truth, same keys and shape, referenced like ``maps``; drawn as the first row.
      baseline: py4DSTEM maps, same keys and shape; drawn as the last row.
      title: first line of the figure title (the second states the conventions).
      strain_limit: colour limit of the strain panels, dimensionless (``0.02`` = 2 %); None = 99th percentile of
        ``|strain|`` over all panels. See `color_limits`.
      dpi: resolution of the PNG.

    Returns:
      ``path`` as str. Strain panels share one symmetric diverging scale (RdBu_r, red = positive, in %); rotation
      panels share their own (degrees); NaN is grey.
    """
    dpi = _check_dpi(dpi)
    return _save(_strain_maps_figure(maps, labels=labels, baseline=baseline, title=title,
                                     strain_limit=strain_limit, dpi=dpi), path, dpi)


def _histograms_figure(maps, *, labels=None, baseline=None, bins=100, dpi=DEFAULT_DPI):
    if not (isinstance(bins, (int, np.integer)) and bins >= 2):
        raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
    rows = _all_prepared(maps, labels, baseline)
    fig = _figure(15.0, 4.3, dpi)
    axes = fig.subplots(1, 4)
    finite = {k: [p[k][np.isfinite(p[k])] for _, p in rows] for k in QUANTITIES}
    s_lim = 1.1 * _robust_limit([100 * d for k in STRAIN_KEYS for d in finite[k]], percentile=99.5, fallback=0.1)
    r_lim = 1.1 * _robust_limit(finite["rotation"], percentile=99.5, fallback=1.0)
    for ax, k in zip(axes, QUANTITIES):
        scale, lim = (1.0, r_lim) if k == "rotation" else (100.0, s_lim)
        data = [(name, scale * d) for (name, _), d in zip(rows, finite[k])]
        edges = np.linspace(-lim, lim, int(bins) + 1)
        off = []
        for name, d in data:
            colour, filled = _METHOD_STYLE[name]
            outside = int(np.sum(np.abs(d) > lim))
            if outside:
                off.append(f"{name} {outside}")
            label = f"{name} (n = {d.size} valid)"
            if filled:
                ax.hist(d, bins=edges, color=colour, alpha=0.35, label=label)
            else:
                ax.hist(d, bins=edges, histtype="step", color=colour, linewidth=1.4, label=label)
        if off:
            ax.text(0.02, 0.98, "off-scale: " + ", ".join(off), transform=ax.transAxes, ha="left", va="top",
                    fontsize=7, color="0.3")
        ax.set_xlim(-lim, lim)
        ax.axvline(0.0, color="0.5", linewidth=0.6, linestyle=":")
        ax.set_title(_TITLES[k], fontsize=11)
        ax.set_xlabel("rotation (deg)" if k == "rotation" else "strain (%)")
        ax.tick_params(labelsize=8)
    axes[0].set_ylabel("positions per bin")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=len(names), fontsize=9, frameon=False)
    fig.suptitle(_CONVENTION_LINE, fontsize=9)
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
        ``|value|``, one range for the three strain panels); values beyond it are counted in the panel as
        off-scale. NaN / invalid positions are skipped.
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


def _pattern_figure(pattern, mask, *, title=None, log=True, dpi=DEFAULT_DPI):
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
    shown = [(pattern, "pattern" + (" with mask outline" if mask is not None else ""))]
    if mask is not None:
        shown.append((np.where(mask > 0, pattern * mask, np.nan), "pattern x mask (what the loss sees)"))
    for ax, (img, name) in zip(axes, shown):
        im = ax.imshow(np.clip(img, norm.vmin, None) if log else img, cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("Qy (pattern column, px)")
        ax.tick_params(labelsize=8)
    axes[0].set_ylabel("Qx (pattern row, px)")
    if mask is not None and mask.min() < 0.5 <= mask.max():
        axes[0].contour(mask, levels=[0.5], colors="cyan", linewidths=0.8)
    cb = fig.colorbar(im, ax=list(axes), location="right", shrink=0.85)
    cb.set_label("intensity" + (" (log scale)" if log else ""))
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
    log: bool = True,
    dpi: int = DEFAULT_DPI,
) -> str:
    """A diffraction pattern with the loss mask outlined (cyan), beside the masked pattern.

    Args:
      pattern: ``(H, W)`` = ``(Qx, Qy)`` intensities (drawn with Qx downwards, Qy to the right).
      mask: ``(H, W)`` bool or float in [0, 1] (outline at 0.5), or None for the pattern alone.
      path: output PNG.
      title: figure title.
      log: logarithmic colour scale (from the 1st percentile of positive values, at most 5 decades); values
        <= 0 are drawn at the bottom of the scale.
      dpi: resolution of the PNG.

    Returns:
      ``path`` as str.
    """
    dpi = _check_dpi(dpi)
    return _save(_pattern_figure(pattern, mask, title=title, log=log, dpi=dpi), path, dpi)


def _bases_figure(bases, *, dpi=DEFAULT_DPI):
    from matplotlib.colors import Normalize

    bases = np.asarray(bases, np.float64)
    if bases.ndim == 2:
        bases = bases[None]
    if bases.ndim != 3 or bases.shape[0] == 0:
        raise ValueError(f"bases must be (num_bases, H, W) (or one (H, W) base), got shape {bases.shape}")
    n = bases.shape[0]
    ncol = min(n, 4)
    nrow = math.ceil(n / ncol)
    fig = _figure(3.4 * ncol + 0.4, 3.3 * nrow + 0.5, dpi)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for idx, ax in enumerate(axes.ravel()):
        if idx >= n:
            ax.set_axis_off()
            continue
        b = bases[idx]
        finite = b[np.isfinite(b)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if lo < 0 < hi and -lo > 0.02 * hi:  # signed base: diverging scale centred on zero
            m = max(-lo, hi)
            im = ax.imshow(b, cmap=_cmap("RdBu_r"), norm=Normalize(-m, m), interpolation="nearest")
        else:
            im = ax.imshow(b, cmap=_cmap("magma"), norm=Normalize(lo, hi if hi > lo else lo + 1.0),
                           interpolation="nearest")
        ax.set_title(f"base {idx}", fontsize=10)
        ax.tick_params(labelsize=7)
        if idx % ncol == 0:
            ax.set_ylabel("Qx (row, px)", fontsize=9)
        if idx // ncol == nrow - 1 or idx + ncol >= n:
            ax.set_xlabel("Qy (column, px)", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8).ax.tick_params(labelsize=8)
    fig.suptitle(f"learned base pattern{'s' if n > 1 else ''} ({n})", fontsize=11)
    return fig


def plot_bases(bases: np.ndarray, path: str | os.PathLike, *, dpi: int = DEFAULT_DPI) -> str:
    """The learned base pattern(s), each with its own colour scale (diverging around zero when signed).

    Args:
      bases: ``(num_bases, H, W)`` (or ``(H, W)``), axes ``(Qx, Qy)``.
      path: output PNG.
      dpi: resolution of the PNG.

    Returns:
      ``path`` as str.
    """
    dpi = _check_dpi(dpi)
    return _save(_bases_figure(bases, dpi=dpi), path, dpi)


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


def _training_figure(metrics_path, *, dpi=DEFAULT_DPI):
    step_recs, epoch_recs = read_metrics(metrics_path)
    if not step_recs and not epoch_recs:
        raise ValueError(f"metrics file {os.fspath(metrics_path)} holds no records with a 'step'")
    main = step_recs or epoch_recs
    terms = _loss_terms(main)
    extra = [k for k in ("learning_rate", "grad_norm") if _positive(*_series(main, k))[0].size]
    fig = _figure(6.4 + 4.2 * len(extra), 4.4, dpi)
    axes = fig.subplots(1, 1 + len(extra), squeeze=False)[0]
    ax = axes[0]
    skipped = []
    for k in terms:
        x, y = _positive(*_series(main, k))
        if x.size == 0:
            skipped.append(k)
            continue
        ax.plot(x, y, label=k, linewidth=2.0 if k == "loss" else 1.2, color="black" if k == "loss" else None,
                marker="." if x.size < 30 else None)
    if step_recs and epoch_recs:
        x, y = _positive(*_series(epoch_recs, "loss"))
        if x.size:
            ax.plot(x, y, linestyle="none", marker="o", markersize=4, markerfacecolor="white",
                    markeredgecolor="black", label="loss (epoch mean)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss / term (log scale)")
    ax.set_title("loss terms" + (f" (none > 0: {', '.join(skipped)})" if skipped else ""), fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    ax.grid(True, which="both", alpha=0.25)
    for ax, k in zip(axes[1:], extra):
        x, y = _positive(*_series(main, k))
        ax.plot(x, y, color="tab:green" if k == "learning_rate" else "tab:purple",
                drawstyle="steps-post" if k == "learning_rate" else "default")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(k.replace("_", " ") + " (log scale)")
        ax.set_title(k.replace("_", " "), fontsize=10)
        ax.grid(True, which="both", alpha=0.25)
    fig.suptitle(f"training curves: {os.path.basename(os.fspath(metrics_path))}", fontsize=11)
    return fig


def plot_training_curves(metrics_path: str | os.PathLike, path: str | os.PathLike, *, dpi: int = DEFAULT_DPI) -> str:
    """Loss and each loss term against step (log y), and the learning rate (and gradient norm) when logged.

    Args:
      metrics_path: ``metrics.jsonl`` of a run (see `read_metrics`). Step records are drawn as lines and epoch means
        of ``loss`` as open circles; with only epoch records those are drawn. Every numeric key that is not
        bookkeeping (step, epoch, learning_rate, wall_time, ...) is taken as a loss term; values <= 0 or NaN are
        left out of the log plot.
      path: output PNG.
      dpi: resolution of the PNG.

    Returns:
      ``path`` as str.
    """
    dpi = _check_dpi(dpi)
    return _save(_training_figure(metrics_path, dpi=dpi), path, dpi)


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
    hi = float(np.percentile(finite, 99.0)) if finite.size else 1.0
    lo = float(finite.min()) if finite.size else 0.0
    im = axes[0].imshow(err, cmap=_cmap("viridis"), norm=Normalize(lo, hi if hi > lo else lo + 1.0),
                        interpolation="nearest")
    below[0].set_axis_off()
    cax = below[0].inset_axes((0.1, 0.72, 0.8, 0.28))
    cb = fig.colorbar(im, cax=cax, orientation="horizontal", extend="max")
    cb.set_label("forward masked MSE per pattern (scale to 99th percentile)")
    cb.ax.tick_params(labelsize=8)
    axes[0].set_title("reconstruction error (confidence)", fontsize=10)

    from ccstae_jax.strain import INVALID_REASONS  # noqa: PLC0415 (keeps the module import cheap)

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


def plot_error_map(maps: Mapping[str, Any], path: str | os.PathLike, *, dpi: int = DEFAULT_DPI) -> str:
    """Per-position reconstruction error (a confidence map) beside the map of valid positions.

    Args:
      maps: needs ``reconstruction_error`` ``(Rx, Ry)``; uses ``valid`` and ``invalid_reason`` (codes of
        `ccstae_jax.strain.INVALID_REASONS`) when present, else validity = finite ``strain_xx``.
      path: output PNG.
      dpi: resolution of the PNG.

    Returns:
      ``path`` as str. The error scale runs from the minimum to the 99th percentile (NaN grey).
    """
    dpi = _check_dpi(dpi)
    return _save(_error_figure(maps, dpi=dpi), path, dpi)


# ---------------------------------------------------------------------------------------------------------------
# noise sweep
# ---------------------------------------------------------------------------------------------------------------
_SWEEP_PANELS = (("strain_xx", 1e3, "MAE (x1e-3)"), ("strain_yy", 1e3, "MAE (x1e-3)"),
                 ("shear_xy", 1e3, "MAE (x1e-3)"), ("rotation_deg", 1.0, "MAE (deg)"))
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
    """MAE of strain_xx, strain_yy, shear_xy (x1e-3) and rotation (deg) against background noise, per method.

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
    dpi: int = DEFAULT_DPI,
) -> list[str]:
    """Writes every figure its inputs allow into ``out_dir`` (created if missing); returns the paths written.

    Files: ``strain_maps.png`` and ``strain_histograms.png`` (always), ``error_map.png`` (when ``maps`` holds
    ``reconstruction_error``), ``pattern_mask.png`` (when ``pattern`` is given; ``mask`` optional),
    ``bases.png`` (when ``bases`` is given), ``training_curves.png`` (when ``metrics_path`` is given).
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    j = os.path.join
    paths = [plot_strain_maps(maps, j(out_dir, "strain_maps.png"), labels=labels, baseline=baseline, dpi=dpi),
             plot_histograms(maps, j(out_dir, "strain_histograms.png"), labels=labels, baseline=baseline, dpi=dpi)]
    if "reconstruction_error" in maps:
        paths.append(plot_error_map(maps, j(out_dir, "error_map.png"), dpi=dpi))
    if pattern is not None:
        paths.append(plot_pattern_and_mask(pattern, mask, j(out_dir, "pattern_mask.png"), dpi=dpi))
    elif mask is not None:
        raise ValueError("a mask was given without a pattern to draw it on")
    if bases is not None:
        paths.append(plot_bases(bases, j(out_dir, "bases.png"), dpi=dpi))
    if metrics_path is not None:
        paths.append(plot_training_curves(metrics_path, j(out_dir, "training_curves.png"), dpi=dpi))
    return paths
