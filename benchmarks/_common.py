"""Pieces shared by the accuracy benchmarks (`noise_sweep.py`, `robustness.py`): the Cramér-Rao bound of a simulated
scan, timing, JSON helpers and the environment record.

Imported by those scripts from their own folder (``benchmarks/`` is not a package).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

#: The error-table quantities every benchmark reports (strain dimensionless, rotation in degrees).
QUANTITIES = ("strain_xx", "strain_yy", "shear_xy", "rotation_deg")


def mae_row(table: dict) -> dict[str, float | None]:
    """``{quantity: MAE}`` (None for NaN) from an error table of `ccstae_jax.evaluate.metrics.error_table`."""
    out = {}
    for k in QUANTITIES:
        v = table[k]["mae"]
        out[k] = None if v is None or not math.isfinite(v) else float(v)
    return out


def calibration_markdown(rows: list[tuple[str, dict | None, dict | None]]) -> list[str]:
    """Markdown table of how well a map's 1-sigma errors describe its actual errors.

    ``rows``: ``(label, error table of ccstae_jax.evaluate.metrics.error_table or None, CRB row or None)``, the CRB
    row as `crb_for_scan` gives it (an expected MAE). Per quantity: the median 1-sigma (strain x1e-3, rotation deg),
    the Cramer-Rao bound on the 1-sigma beside it (the CRB row over ``sqrt(2 / pi)``, so the two compare like with
    like), the standard deviation of error / sigma (1 when calibrated) and the share of positions with
    ``|error| <= 2 sigma`` (95 % for Gaussian errors).
    """
    head = ["case"]
    for q in QUANTITIES:
        unit = "deg" if q == "rotation_deg" else "x1e-3"
        head += [f"{q} median sigma ({unit})", "CRB sigma", "std(z)", "|z|<=2"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, table, crb in rows:
        if not table or "sigma_median" not in table.get("strain_xx", {}):
            continue
        cells = [label]
        for q in QUANTITIES:
            scale, fmt = (1.0, "{:.3f}") if q == "rotation_deg" else (1e3, "{:.2f}")
            row = table[q]
            c = (crb or {}).get(q)
            cells += [fmt.format(row["sigma_median"] * scale),
                      "n/a" if c is None else fmt.format(c * scale / math.sqrt(2 / math.pi)),
                      f"{row['z_std']:.2f}", f"{row['z_within_2'] * 100:.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines if len(lines) > 2 else []


def crb_for_scan(data_path, sim_cfg, w: float, *, max_grains: int | None = None) -> dict[str, float | None]:
    """Expected MAE at the Cramér-Rao bound over the specimen positions of a simulated scan.

    Each grain's bound comes from `ccstae_jax.evaluate.crb.strain_crb` at its own (strain, rotation) parameters, read
    from ``/grains/params`` of the data file; each position counts with its dominant grain (``/labels/grain_index``);
    vacuum positions (grain index -1) are left out. Grains of another phase are rendered as the reference phase
    with their parameters (which are relative to it), so their spots sit where they should, with the reference
    phase's intensities.

    Returns:
      ``{"strain_xx", "strain_yy", "shear_xy": dimensionless, "rotation_deg": degrees}`` = ``sqrt(2/pi)`` times the
      position-weighted bound on the standard deviation; None everywhere if the scan holds no specimen.
    """
    import h5py

    from ccstae_jax.evaluate.crb import gaussian_mae, strain_crb

    with h5py.File(data_path, "r") as f:
        if "grains/params" not in f or "labels/grain_index" not in f:
            raise ValueError(f"{data_path}: no /grains/params or /labels/grain_index (not a ccstae simulation file)")
        params = np.asarray(f["grains/params"][()], np.float64)
        index = np.asarray(f["labels/grain_index"][()]).ravel()
    index = index[index >= 0]
    if index.size == 0:
        return dict.fromkeys(QUANTITIES)
    grains, counts = np.unique(index, return_counts=True)
    if max_grains is not None and len(grains) > max_grains:
        top = np.argsort(-counts, kind="stable")[:max_grains]
        grains, counts = grains[top], counts[top]
    res = strain_crb(sim_cfg, w=w, params=params[grains, :4])
    mae = gaussian_mae(res.sigma)  # (grains, 4)
    weighted = (counts[:, None] * mae).sum(0) / counts.sum()
    out = dict(zip(("strain_xx", "strain_yy", "shear_xy"), (float(v) for v in weighted[:3])))
    out["rotation_deg"] = math.degrees(float(weighted[3]))
    return out


class Clock:
    """Times named parts: ``with clock.part("train"): ...`` stores the seconds in ``clock.times`` and logs them."""

    def __init__(self, log: Callable[[str], None], prefix: str):
        self.times: dict[str, float] = {}
        self.log, self.prefix = log, prefix

    def part(self, name: str):
        clock = self

        class _Part:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                dt = time.perf_counter() - self.t0
                clock.times[name] = round(dt, 2)
                if exc[0] is None:
                    clock.log(f"{clock.prefix} {name}: {dt:.1f} s")

        return _Part()


@contextlib.contextmanager
def own_compilation_cache(directory: Path):
    """Points the ``ccstae`` commands run inside at ``directory`` as their compilation cache, unless
    ``CCSTAE_COMPILATION_CACHE`` is already set (then left as it is); restores the environment after."""
    from ccstae_jax.compilation_cache import ENV_CACHE

    own = ENV_CACHE not in os.environ
    if own:
        os.environ[ENV_CACHE] = str(directory)
    try:
        yield
    finally:
        if own:
            os.environ.pop(ENV_CACHE, None)


def write_json(path: Path, obj) -> None:
    """Writes JSON atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False))
    os.replace(tmp, path)


def file_attrs(path) -> dict:
    """Root attributes of an HDF5 file, byte strings decoded."""
    import h5py

    with h5py.File(path, "r") as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


def clean(obj):
    """JSON-safe copy: NaN/inf -> None, numpy scalars/arrays -> Python."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return clean(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def loadavg():
    """The 1/5/15-minute load averages (None where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(wall: float, load0) -> dict:
    """Wall and CPU time of this process and its children, load, platform and JAX device."""
    import jax

    ru_self = resource.getrusage(resource.RUSAGE_SELF)
    ru_kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    dev = jax.devices()[0]
    return {
        "wall_s": round(wall, 1),
        "cpu_s_self": round(ru_self.ru_utime + ru_self.ru_stime, 1),
        "cpu_s_children": round(ru_kids.ru_utime + ru_kids.ru_stime, 1),
        "loadavg_start": load0,
        "loadavg_end": loadavg(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "baseline_python": os.environ.get("CCSTAE_BASELINE_PYTHON"),
    }
