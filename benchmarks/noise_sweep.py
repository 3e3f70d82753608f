"""Noise-sweep benchmark: strain MAE against ground truth vs background noise (the paper's Figure 3 table).

For every noise level ``w`` (fraction of the electrons moved into the Auto4DSTEM Lorentzian background glow, then
Poisson counts; `ccstae_jax.data.noise`) the sweep

1. simulates a polycrystalline WS2 scan (`ccstae_jax.data.simulate`; the same seed, so the same grains and geometry
   at every level, only the noise changes),
2. trains CC-ST-AE on it (``fast`` preset) and maps strain twice: with the default per-pattern Levenberg-Marquardt
   refinement (``refine_steps``; the headline "CC-ST-AE" numbers) and with the encoder's output as is
   (``refine_steps=0``; "CC-ST-AE encoder only"),
3. runs the py4DSTEM correlation baseline on the same file (`ccstae_jax.baselines.py4dstem`, in a separate Python
   given by ``$CCSTAE_BASELINE_PYTHON``) when it is installed,
4. evaluates every map against the labels (`ccstae_jax.pipeline.evaluate`; MAE over all scan positions, strain
   dimensionless, rotation in degrees, rotations modulo 60 deg, both sides referenced to the same region; the
   py4DSTEM maps, absolute because the baseline is given the unstrained lattice, are referenced to that region too,
   and also scored as they are: ``py4dstem_absolute``),
5. computes the Cramér-Rao bound (`ccstae_jax.evaluate.crb`) for the grains of that very scan: the MAE that an unbiased
   per-pattern estimator at the bound would reach, ``sqrt(2/pi) * sigma_CRB`` averaged over all scan positions
   (each position counted with the bound of its dominant grain). At 0 % the Auto4DSTEM data are noise-free, so the
   bound there is 0.

Usage::

    python benchmarks/noise_sweep.py --quick --json OUT.json             # 4 levels, 24x24 scan, < 15 min (2 CPUs)
    python benchmarks/noise_sweep.py --full --json OUT.json              # 13 levels, 256x256 scan (a GPU; hours)
    python benchmarks/noise_sweep.py --quick --levels 0 50% 70 --epochs 4 --out-dir sweep_out

Output (under ``--out-dir``, default ``noise_sweep_out``): ``noise_sweep.md`` (the table), ``noise_sweep.png``
(`ccstae_jax.report.plots.plot_noise_sweep`), ``noise_sweep.json`` (and a copy at ``--json``), and one folder per level
with the run, the strain maps and ``result.json``. A level whose ``result.json`` was made with the same settings is
reused, so an interrupted sweep continues where it stopped (``--fresh`` recomputes everything). The simulated data
(10.5 GB per level for the full setting) are deleted after each level unless ``--keep-data``.

JSON layout::

    {"levels": [w, ...],                                  # noise weights in [0, 1]
     "ccstae":              {"strain_xx": [...], "strain_yy": [...], "shear_xy": [...], "rotation_deg": [...]},
     "ccstae_encoder_only": {same keys},
     "py4dstem":            {same keys} or null (baseline not installed / switched off),  # referenced like ours
     "py4dstem_absolute":   {same keys} or null,          # py4DSTEM against the known lattice, not referenced
     "crb":                 {same keys},                  # expected MAE at the Cramér-Rao bound
     "settings": {...}, "timings_s": [{part: seconds}, ...], "environment": {...}, "tables": {...}}

Every list holds one value per level: MAE over all scan positions (strain dimensionless, rotation in degrees);
``null`` where a method produced no valid position. ``tables`` holds the full error tables (median, interior MAE).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py
from _common import QUANTITIES, Clock, calibration_markdown, crb_for_scan  # noqa: E402
from _common import clean as _clean  # noqa: E402
from _common import environment as _environment  # noqa: E402
from _common import file_attrs as _file_attrs  # noqa: E402
from _common import loadavg as _loadavg  # noqa: E402
from _common import mae_row as _row  # noqa: E402
from _common import write_json as _write_json  # noqa: E402

from ccstae_jax.mapping.fit import INTERPOLATIONS
from ccstae_jax.mapping.predict import MapConfig

METHODS = ("ccstae", "ccstae_encoder_only", "py4dstem", "py4dstem_absolute")
#: The paper's 13 background-noise levels (0-70 %).
PAPER_LEVELS = (0.0, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40, 0.45, 0.50, 0.60, 0.70)
RESULT_FILE = "result.json"


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """What one sweep runs. Lengths in pixels; noise levels as fractions ``w`` in [0, 1].

    Attributes:
      levels: background-noise weights ``w`` (0.25 = "25 %").
      scan: the scan is ``scan x scan`` probe positions.
      n_grains: Voronoi grains of the simulated polycrystal (grain 0 is the unstrained reference grain).
      detector_size: full detector ``N``; patterns are the centred crop (200 x 200 for ``N = 256``).
      disk_radius: diffraction-disk radius in detector pixels; ``None`` = ``max(2, 3.7 * N / 256)``.
      seed: simulation and training seed (the same grains at every level).
      epochs, batch_size: CC-ST-AE training (``fast`` preset; other training settings are the preset's).
      refine_steps: Levenberg-Marquardt steps per pattern of the headline CC-ST-AE map (the encoder-only map
        uses 0).
      interpolation: the headline map's ``interpolation`` (`ccstae_jax.pipeline.map_strain`).
      map_batch: largest inference batch (the batch is then evened out so the last one carries little padding).
      baseline: ``"auto"`` (run py4DSTEM when it can be imported by the baseline interpreter, else ``null``),
        ``"off"`` or ``"require"`` (fail if it cannot run).
      baseline_subpixel: py4DSTEM sub-pixel refinement (``"multicorr"`` or ``"poly"``, ~10x faster).
      crb_grains: compute the bound for at most this many grains of the scan (the most populous ones, weighted by
        their positions); ``None`` = every grain present.
      keep_data: keep each level's simulated data file.
    """

    levels: tuple[float, ...] = (0.0, 0.25, 0.50, 0.70)
    scan: int = 24
    n_grains: int = 10
    detector_size: int = 256
    disk_radius: float | None = None
    seed: int = 0
    epochs: int = 8
    batch_size: int = 16
    refine_steps: int = MapConfig.steps
    interpolation: str = MapConfig.interpolation
    map_batch: int = 256
    baseline: str = "auto"
    baseline_subpixel: str = "multicorr"
    crb_grains: int | None = None
    keep_data: bool = False

    def __post_init__(self):
        from ccstae_jax.data.noise import parse_noise_level

        levels = tuple(parse_noise_level(w) for w in self.levels)
        if not levels:
            raise ValueError("SweepConfig.levels is empty: give at least one noise level")
        if len(set(levels)) != len(levels):
            raise ValueError(f"SweepConfig.levels has duplicates: {levels}")
        object.__setattr__(self, "levels", levels)
        for name in ("scan", "n_grains", "epochs", "batch_size", "map_batch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SweepConfig.{name}={getattr(self, name)!r} must be >= 1")
        if self.refine_steps < 0:
            raise ValueError(f"SweepConfig.refine_steps={self.refine_steps!r} must be >= 0")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"SweepConfig.interpolation={self.interpolation!r}: expected one of {INTERPOLATIONS}")
        if self.baseline not in ("auto", "off", "require"):
            raise ValueError(f"SweepConfig.baseline={self.baseline!r}: expected 'auto', 'off' or 'require'")
        if self.baseline_subpixel not in ("multicorr", "poly", "pixel"):
            raise ValueError(f"SweepConfig.baseline_subpixel={self.baseline_subpixel!r}: expected multicorr/poly/pixel")
        if self.crb_grains is not None and self.crb_grains < 1:
            raise ValueError(f"SweepConfig.crb_grains={self.crb_grains!r} must be >= 1 or None")

    @property
    def resolved_disk_radius(self) -> float:
        return float(self.disk_radius) if self.disk_radius is not None else max(2.0, 3.7 * self.detector_size / 256)

    def simulation(self, w: float):
        """The `SimulationConfig` of level ``w`` (identical geometry and grains at every level)."""
        from ccstae_jax.data.simulate import SimulationConfig

        return SimulationConfig(scan_shape=(self.scan, self.scan), n_grains=self.n_grains, noise_level=w,
                                seed=self.seed, detector_size=self.detector_size,
                                disk_radius=self.resolved_disk_radius)

    def level_settings(self, w: float) -> dict:
        """Everything that determines the result of level ``w`` (a saved level is reused only if these match)."""
        d = dataclasses.asdict(self)
        d.pop("levels")
        d.pop("keep_data")
        d["level"] = w
        d["disk_radius"] = self.resolved_disk_radius
        return d

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["levels"] = list(self.levels)
        d["disk_radius"] = self.resolved_disk_radius
        return d


#: ``--quick``: 4 levels on a 24 x 24 scan with 200 x 200 patterns; < 15 min on a 2-core CPU, baseline included.
QUICK = SweepConfig()
#: ``--full``: the paper's 13 levels on a 256 x 256 scan with 24 grains (a GPU for CC-ST-AE; hours).
FULL = SweepConfig(levels=PAPER_LEVELS, scan=256, n_grains=24, epochs=20, map_batch=256)


# ------------------------------------------------------------------------------------------------ one level
def level_dir_name(w: float) -> str:
    """Folder name of level ``w``: ``noise_25pct`` for 0.25."""
    return f"noise_{w * 100:g}pct".replace(".", "p")


def _even_batch(n: int, cap: int) -> int:
    """The smallest batch that covers ``n`` items in as many batches of at most ``cap`` as needed."""
    nb = -(-n // cap)
    return -(-n // nb)


def run_level(cfg: SweepConfig, w: float, level_dir: Path, *, baseline_ok: bool = True, progress: bool = False,
              log: Callable[[str], None] = print) -> dict:
    """Simulate, train, map (refined and encoder-only), baseline, evaluate and bound one noise level.

    Args:
      cfg: the sweep's settings.
      w: background-noise weight in [0, 1].
      level_dir: folder of this level (created; holds ``data.h5``, ``run/``, the strain maps, ``result.json``).
      baseline_ok: False skips py4DSTEM (an earlier level found it unavailable).
      progress: tqdm bars for the long steps.
      log: where one line per finished part goes.

    Returns:
      The level's result: ``{"level", "settings", "errors": {method: error table or None}, "mae": {method: row or
      None}, "crb": row, "timings_s", "baseline_note"}``; also written to ``level_dir/result.json``.
    """
    from ccstae_jax import pipeline
    from ccstae_jax.data.simulate import simulate_to_hdf5

    level_dir.mkdir(parents=True, exist_ok=True)
    settings = cfg.level_settings(w)
    saved = level_dir / "settings.json"
    if saved.exists() and json.loads(saved.read_text()) != settings:
        # a different sweep used this folder: start the level afresh (runs resume only with identical settings)
        for p in level_dir.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    _write_json(saved, settings)
    sim = cfg.simulation(w)
    data = level_dir / "data.h5"
    clock = Clock(log, f"[{w * 100:g} %]")
    n = cfg.scan * cfg.scan

    with clock.part("simulate"):
        if not data.exists():
            simulate_to_hdf5(data, sim, progress=progress)
    with clock.part("train"):
        pipeline.train(data, level_dir / "run", preset="fast", progress=progress,
                       train_overrides=dict(epochs=cfg.epochs, seed=cfg.seed, batch_size=cfg.batch_size))
    batch = _even_batch(n, cfg.map_batch)
    with clock.part(f"map_refine{cfg.refine_steps}"):
        pipeline.map_strain(level_dir / "run", data, level_dir / "strain.h5", refine_steps=cfg.refine_steps,
                            interpolation=cfg.interpolation, batch_size=batch, progress=progress)
    with clock.part("map_encoder_only"):
        pipeline.map_strain(level_dir / "run", data, level_dir / "strain_encoder_only.h5", refine_steps=0,
                            batch_size=batch, progress=progress)

    errors: dict[str, Any] = {}
    baseline_note = None
    if cfg.baseline != "off" and baseline_ok:
        from ccstae_jax.baselines import py4dstem

        with clock.part("py4dstem"):
            try:
                bconf = py4dstem.config_from_attrs(_file_attrs(data), subpixel=cfg.baseline_subpixel)
                py4dstem.run_baseline_subprocess(data, level_dir / "strain_py4dstem.h5", config=bconf,
                                                 progress=progress)
            except py4dstem.BaselineUnavailable as e:
                if cfg.baseline == "require":
                    raise
                baseline_note = f"unavailable: {e}"
            except RuntimeError as e:  # the baseline failed on this file: record it, keep the sweep going
                if cfg.baseline == "require":
                    raise
                baseline_note = f"failed: {e}"
        if baseline_note:
            log(f"{clock.prefix} py4DSTEM baseline {baseline_note.splitlines()[0]}")
    elif cfg.baseline == "off":
        baseline_note = "off"
    else:
        baseline_note = "unavailable (found at an earlier level)"

    with clock.part("evaluate"):
        errors["ccstae"] = pipeline.evaluate(level_dir / "strain.h5", data)
        errors["ccstae_encoder_only"] = pipeline.evaluate(level_dir / "strain_encoder_only.h5", data)
        b = level_dir / "strain_py4dstem.h5"
        ran = baseline_note is None and b.exists()
        errors["py4dstem"] = pipeline.evaluate(b, data) if ran else None  # referenced to the region, like ours
        errors["py4dstem_absolute"] = pipeline.evaluate(b, data, reference_predictions=False) if ran else None
    with clock.part("crb"):
        crb = crb_for_scan(data, sim, w, max_grains=cfg.crb_grains)
    baseline_params = None
    if errors["py4dstem"] is not None:
        baseline_params = _file_attrs(level_dir / "strain_py4dstem.h5").get("parameters")
    if not cfg.keep_data:
        data.unlink()
    result = {
        "level": w,
        "settings": settings,
        "errors": errors,
        "mae": {m: (None if errors[m] is None else _row(errors[m])) for m in METHODS},
        "crb": crb,
        "timings_s": clock.times,
        "baseline_note": baseline_note,
        "baseline_parameters": json.loads(baseline_params) if isinstance(baseline_params, str) else None,
    }
    _write_json(level_dir / RESULT_FILE, _clean(result))
    return result


# ------------------------------------------------------------------------------------------------ the sweep
def run_sweep(cfg: SweepConfig, out_dir: str | os.PathLike, *, progress: bool = False, fresh: bool = False,
              log: Callable[[str], None] = print) -> dict:
    """Runs every level of ``cfg`` (reusing finished levels with identical settings) and assembles the results.

    Args:
      cfg: the sweep's settings.
      out_dir: output folder (created); one subfolder per level.
      progress: tqdm bars for the long steps.
      fresh: ignore (and overwrite) finished levels.
      log: where progress lines go.

    Returns:
      The results dict (see the module docstring for its layout); not yet written anywhere.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load0 = _loadavg()
    per_level, reused = [], []
    baseline_ok = True
    for w in cfg.levels:
        ldir = out / level_dir_name(w)
        res_path = ldir / RESULT_FILE
        res = None
        if not fresh and res_path.exists():
            old = json.loads(res_path.read_text())
            if old.get("settings") == cfg.level_settings(w):
                res = old
                reused.append(w)
                log(f"[{w * 100:g} %] reusing {res_path}")
        if res is None:
            if fresh and ldir.exists():
                shutil.rmtree(ldir)
            res = run_level(cfg, w, ldir, baseline_ok=baseline_ok, progress=progress, log=log)
        if str(res.get("baseline_note") or "").startswith("unavailable"):
            baseline_ok = False
        per_level.append(_clean(res))
    wall = time.perf_counter() - t0

    def series(method):
        rows = [r["mae"][method] for r in per_level]
        if all(row is None for row in rows):
            return None
        return {k: [None if row is None else row[k] for row in rows] for k in QUANTITIES}

    results = {
        "levels": list(cfg.levels),
        "ccstae": series("ccstae"),
        "ccstae_encoder_only": series("ccstae_encoder_only"),
        "py4dstem": series("py4dstem"),
        "py4dstem_absolute": series("py4dstem_absolute"),
        "crb": {k: [r["crb"][k] for r in per_level] for k in QUANTITIES},
        "settings": {
            **cfg.to_dict(),
            "preset": "fast",
            "pattern_shape": list(cfg.simulation(0.0).pattern_shape),
            "reference_region": list(cfg.simulation(0.0).reference_bounds),
            "mae_over": "all scan positions",
            "units": "strain dimensionless; rotation degrees (modulo 60 deg)",
            "ccstae": f"fast preset, {cfg.epochs} epochs, map with {cfg.refine_steps} Levenberg-Marquardt "
                      "steps per pattern of the forward-model fit (ccstae_jax.mapping.fit, "
                      f"{cfg.interpolation} interpolation) against the bases re-estimated from aligned patterns",
            "py4dstem": "absolute py4DSTEM maps referenced to the same region as CC-ST-AE and the labels",
            "py4dstem_absolute": "py4DSTEM's absolute strain (it is given the unstrained lattice), not referenced",
            "ccstae_encoder_only": "the same trained run, map with refine_steps=0",
            "crb": "sqrt(2/pi) * Cramer-Rao bound on the per-pattern std, averaged over positions by dominant grain "
                   "(0 at w=0: the Auto4DSTEM 0 % data are noise-free)",
            "py4dstem_parameters": next((r.get("baseline_parameters") for r in per_level
                                         if r.get("baseline_parameters")), None),
            "baseline_notes": [r.get("baseline_note") for r in per_level],
            "reused_levels": reused,
        },
        "timings_s": [r["timings_s"] for r in per_level],
        "environment": _environment(wall, load0),
        "tables": {m: [r["errors"][m] for r in per_level] for m in METHODS},
    }
    return _clean(results)


# ------------------------------------------------------------------------------------------------ table
def _cell(v, scale: float, digits: int, bold: bool = False) -> str:
    if v is None:
        return "n/a"
    s = f"{v * scale:.{digits}f}"
    return f"**{s}**" if bold else s


def format_markdown(results: dict) -> str:
    """The paper's Figure 3 layout: one row per noise level, per quantity py4DSTEM | CC-ST-AE | encoder only | CRB |
    py4DSTEM absolute.

    Strain MAE in units of 1e-3 (dimensionless strain), rotation MAE in degrees. The lower of py4DSTEM and CC-ST-AE
    (both referenced to the same region) is bold.
    """
    titles = {"strain_xx": "Strain X", "strain_yy": "Strain Y", "shear_xy": "Shear", "rotation_deg": "Rotation"}
    cols = [("py4dstem", "py4DSTEM"), ("ccstae", "CC-ST-AE"), ("ccstae_encoder_only", "encoder only"),
            ("crb", "CRB"), ("py4dstem_absolute", "py4DSTEM absolute")]
    head = ["BKG noise"]
    for q in QUANTITIES:
        unit = "deg" if q == "rotation_deg" else "x1e-3"
        head += [f"{titles[q]} {name} ({unit})" for _, name in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, w in enumerate(results["levels"]):
        cells = [f"{w * 100:g}%"]
        for q in QUANTITIES:
            scale, digits = (1.0, 3) if q == "rotation_deg" else (1e3, 2)
            vals = {m: (results[m][q][i] if results.get(m) else None) for m, _ in cols}
            pair = [vals["py4dstem"], vals["ccstae"]]
            best = min((v for v in pair if v is not None), default=None) if None not in pair else None
            for m, _ in cols:
                cells.append(_cell(vals[m], scale, digits, bold=(m in ("py4dstem", "ccstae") and best is not None
                                                                 and vals[m] == best)))
        lines.append("| " + " | ".join(cells) + " |")
    tables = (results.get("tables") or {}).get("ccstae") or []
    crb_rows = [{q: (results.get("crb") or {}).get(q, [None] * len(results["levels"]))[i] for q in QUANTITIES}
                for i in range(len(results["levels"]))]
    calibration = calibration_markdown([(f"{w * 100:g}%", t, c)
                                        for w, t, c in zip(results["levels"], tables, crb_rows)])
    if calibration:
        lines += ["", "Calibration of CC-ST-AE's per-position 1-sigma errors (`/uncertainty/*`) against the labels:",
                  ""] + calibration
    s = results.get("settings", {})
    env = results.get("environment", {})
    notes_b = {str(n).splitlines()[0] for n in s.get("baseline_notes", []) if n}
    notes = [
        "",
        f"MAE against the labels over all {s.get('scan', '?')}x{s.get('scan', '?')} scan positions "
        f"({s.get('n_grains', '?')} grains, {'x'.join(str(p) for p in s.get('pattern_shape', []))} patterns, "
        f"seed {s.get('seed', '?')}); strain x1e-3, rotation in degrees (modulo 60 deg).",
        f"CC-ST-AE: {s.get('ccstae', '')}; encoder only: the same run mapped without refinement.",
        "py4DSTEM: correlation disk detection + per-pattern lattice fit "
        f"({s.get('baseline_subpixel', '?')} sub-pixel); "
        + ("n/a = not run (" + "; ".join(sorted(notes_b)) + ")." if notes_b else "ran at every level.")
        + " Its maps are absolute (it is given the unstrained lattice): \"py4DSTEM\" references them to the same "
          "region as CC-ST-AE and the labels (the comparison of the issue), \"py4DSTEM absolute\" scores them as "
          "they are (no reference noise).",
        "CRB: expected MAE of an unbiased per-pattern estimator at the Cramer-Rao bound (Poisson noise model); "
        "0 at 0 % because those data are noise-free.",
    ]
    if env:
        notes.append(f"Wall time {env.get('wall_s', '?')} s on {env.get('cpu_count', '?')} CPUs "
                     f"({env.get('device', '?')}, load average at start {env.get('loadavg_start')}); "
                     f"command: `{env.get('command', '')}`.")
    return "\n".join(lines + notes) + "\n"


# ------------------------------------------------------------------------------------------------ CLI
def _parse_levels(items: Sequence[str]) -> tuple[float, ...]:
    from ccstae_jax.data.noise import parse_noise_level

    out = []
    for item in items:
        for part in str(item).replace(",", " ").split():
            out.append(parse_noise_level(part))
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python benchmarks/noise_sweep.py",
        description="Noise-sweep benchmark: MAE of strain x, strain y, shear (x1e-3) and rotation (deg) against the "
        "labels of simulated WS2 scans at several background-noise levels, CC-ST-AE vs py4DSTEM, with the "
        "Cramer-Rao bound. Strain is the real-space lattice strain, x = detector Qx (pattern rows), tensor shear.",
    )
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="4 levels, 24x24 scan, 6 epochs (< 15 min on 2 CPUs)")
    mode.add_argument("--full", action="store_true", help="the paper's 13 levels, 256x256 scan, 20 epochs (GPU)")
    ap.add_argument("--levels", nargs="+", default=None,
                    help="noise levels: '25%%' or 25 = 25 %%, 0.25 = 25 %% (space or comma separated)")
    ap.add_argument("--scan", type=int, default=None, help="scan size (positions per side)")
    ap.add_argument("--grains", type=int, default=None, help="number of grains")
    ap.add_argument("--detector", type=int, default=None, help="detector size N (patterns: centred crop, 200 of 256)")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--refine-steps", type=int, default=None, help="LM refinement steps of the headline map")
    ap.add_argument("--interpolation", choices=("cubic", "bilinear"), default=None,
                    help="interpolation of the headline map's fit (default cubic)")
    ap.add_argument("--baseline", choices=("auto", "off", "require"), default=None,
                    help="py4DSTEM baseline (interpreter: $CCSTAE_BASELINE_PYTHON, else this one)")
    ap.add_argument("--baseline-subpixel", choices=("multicorr", "poly", "pixel"), default=None)
    ap.add_argument("--crb-grains", type=int, default=None, help="bound at most this many grains (most populous)")
    ap.add_argument("--keep-data", action="store_true", help="keep the simulated data files")
    ap.add_argument("--fresh", action="store_true", help="recompute levels that already have a result")
    ap.add_argument("--out-dir", default="noise_sweep_out")
    ap.add_argument("--json", default=None, metavar="OUT.json", help="also write the results JSON here")
    ap.add_argument("--progress", action="store_true", help="progress bars for the long steps")
    return ap


def config_from_args(a: argparse.Namespace) -> SweepConfig:
    base = FULL if a.full else QUICK
    over = {}
    for field, value in (("levels", _parse_levels(a.levels) if a.levels else None), ("scan", a.scan),
                         ("n_grains", a.grains), ("detector_size", a.detector), ("epochs", a.epochs),
                         ("batch_size", a.batch_size), ("seed", a.seed), ("refine_steps", a.refine_steps),
                         ("interpolation", a.interpolation),
                         ("baseline", a.baseline), ("baseline_subpixel", a.baseline_subpixel),
                         ("crb_grains", a.crb_grains)):
        if value is not None:
            over[field] = value
    if a.keep_data:
        over["keep_data"] = True
    return dataclasses.replace(base, **over)


def write_outputs(results: dict, out_dir, *, json_path=None) -> dict[str, str]:
    """Writes ``noise_sweep.md``, ``noise_sweep.json`` and ``noise_sweep.png`` (and ``json_path``); returns paths."""
    from ccstae_jax.report import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "noise_sweep.md", "json": out / "noise_sweep.json", "plot": out / "noise_sweep.png"}
    paths["markdown"].write_text(format_markdown(results))
    text = json.dumps(results, indent=2, allow_nan=False)
    paths["json"].write_text(text + "\n")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text + "\n")
        paths["json_copy"] = Path(json_path)
    plots.plot_noise_sweep(results, paths["plot"])
    return {k: str(v) for k, v in paths.items()}


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    if not a.progress:
        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        cfg = config_from_args(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    log(f"noise sweep: levels {[f'{w * 100:g}%' for w in cfg.levels]}, scan {cfg.scan}x{cfg.scan}, "
        f"{cfg.n_grains} grains, detector {cfg.detector_size}, {cfg.epochs} epochs -> {a.out_dir}")
    results = run_sweep(cfg, a.out_dir, progress=a.progress, fresh=a.fresh, log=log)
    paths = write_outputs(results, a.out_dir, json_path=a.json)
    print(format_markdown(results))
    log("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
