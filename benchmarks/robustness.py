"""Robustness benchmark: CC-ST-AE with the CLI's defaults on the pattern geometries of real microscopes.

For every case (one simulated scan each: a disk radius, a pattern size, a lattice, a distortion, a heterostructure)
the benchmark

1. simulates the scan with ``ccstae simulate`` and the case's options (the same seed, scan and grain count in every
   case; only the geometry and the noise change),
2. trains and maps it exactly as a user would, with the CLI's defaults and nothing geometry-specific:
   ``ccstae train DATA --out RUN --quiet`` and ``ccstae map RUN DATA --out STRAIN.h5 --quiet`` (each in its own
   process, with this interpreter),
3. scores the map against the labels with ``ccstae evaluate``'s function (`ccstae_jax.pipeline.evaluate`: MAE over
   the valid specimen positions, both sides referenced to the labels' reference region, rotations modulo the
   symmetry the map records),
4. runs the py4DSTEM baseline on the same file (``ccstae baseline``, in the interpreter ``$CCSTAE_BASELINE_PYTHON``
   when set): it is given the truth the simulation records (disk radius, lattice, spot spacing, reference phase,
   that the patterns are elliptical, that there is vacuum) and calibrates the rest itself
   (`ccstae_jax.baselines.py4dstem.config_from_attrs`); its absolute maps are referenced to the same region,
5. computes the Cramér-Rao bound for the grains of that scan (`_common.crb_for_scan`; 0 at 0 % noise, where the
   simulated data are noise-free).

For scans with vacuum or several phases it also reports the fraction of vacuum positions flagged invalid, the mean
(signed) strain error per phase and, when the map has a class map (``/phase`` or ``/class_index``), the
phase-assignment accuracy.

Usage::

    python benchmarks/robustness.py --quick --json OUT.json --markdown OUT.md --figure OUT.png
    python benchmarks/robustness.py --quick --hetero             # also the WS2/WSe2 heterostructure with vacuum
    python benchmarks/robustness.py --cases disk16,ellipticity2pct --json OUT.json
    python benchmarks/robustness.py --full --json OUT.json       # 128x128 scans, every case (a GPU)

Output (under ``--out-dir``, default ``robustness_out``): ``robustness.json``, ``robustness.md`` and
``robustness.png`` (and copies at ``--json``/``--markdown``/``--figure``), and one folder per case with the run, the
strain maps, the captured ``train`` output and ``result.json``. A case whose ``result.json`` was made with the same
settings is reused (``--fresh`` recomputes); the simulated data are deleted after each case unless ``--keep-data``.

JSON layout::

    {"cases": [{"name": "disk16", "noise": 0.25, "id": "disk16_n25",
                "ccstae":   {"strain_xx", "strain_yy", "shear_xy", "rotation_deg", "invalid_frac"} or null,
                "py4dstem": {same keys} or null (baseline not installed / switched off / failed),
                "crb":      {"strain_xx", "strain_yy", "shear_xy", "rotation_deg"} or null,
                "hetero":   {"ccstae": {...}, "py4dstem": {...}} (scans with vacuum or phases only),
                "simulate": [ccstae simulate options], "geometry": {...}, "train_output": "...",
                "errors": {...}, "timings_s": {...}, "notes": [...]}, ...],
     "settings": {...}, "environment": {...}}

MAE: strain dimensionless, rotation in degrees; ``invalid_frac``: fraction of the specimen positions (finite labels)
that the map marks invalid.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py
from _common import QUANTITIES, Clock, calibration_markdown, clean, crb_for_scan, environment, file_attrs  # noqa: E402
from _common import loadavg, mae_row  # noqa: E402
from _common import own_compilation_cache, write_json  # noqa: E402

from ccstae_jax.compilation_cache import chosen_directory  # noqa: E402

RESULT_FILE = "result.json"
METHODS = ("ccstae", "py4dstem")
STRAINS = ("strain_xx", "strain_yy", "shear_xy")


@dataclasses.dataclass(frozen=True)
class Case:
    """One simulated scan: ``simulate`` are the ``ccstae simulate`` options that set its geometry."""

    name: str
    noise: float
    simulate: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        """``NAME_nPCT``, e.g. ``disk16_n25``: the case's folder and ``--cases`` key."""
        return f"{self.name}_n{self.noise * 100:g}".replace(".", "p")


def _disk(r: float) -> str:
    return f"disk{r:g}"


#: The quick cases: disk radii at 0 and 25 % noise, then one geometry change each at 25 % noise.
QUICK_CASES: tuple[Case, ...] = (
    *(Case(_disk(r), w, ("--disk-radius", f"{r:g}")) for r in (1.5, 3.7, 8.0, 16.0) for w in (0.0, 0.25)),
    Case("pattern128", 0.25, ("--detector", "128", "--crop", "0", "128")),
    Case("pattern256", 0.25, ("--crop", "0", "256")),
    Case("square", 0.25, ("--lattice", "square")),
    Case("ellipticity2pct", 0.25, ("--ellipticity", "0.02")),
    Case("descan5px", 0.25, ("--descan", "5")),
)
#: The heterostructure: WS2 and WSe2 grains (strain relative to WS2), 20 % vacuum around the flake.
HETERO_CASES: tuple[Case, ...] = tuple(
    Case("hetero", w, ("--phases", "WS2,WSe2", "--vacuum", "0.2")) for w in (0.0, 0.25, 0.5)
)
ALL_CASES = QUICK_CASES + HETERO_CASES


@dataclasses.dataclass(frozen=True)
class RobustnessConfig:
    """What one benchmark run does.

    Attributes:
      cases: the cases, in order.
      scan: every scan is ``scan x scan`` positions.
      n_grains: Voronoi grains per scan (grain 0 is the unstrained reference grain).
      seed: simulation seed (the same grains in every case).
      epochs: ``ccstae train --epochs``; ``None`` = the CLI's default.
      baseline: ``"auto"`` (py4DSTEM when its interpreter can import it, else null), ``"off"`` or ``"require"``.
      crb_grains: bound at most this many grains per scan (the most populous); ``None`` = every grain.
      keep_data: keep each case's simulated data file.
      timeout_s: limit on each ``ccstae`` and baseline process (seconds).
    """

    cases: tuple[Case, ...] = QUICK_CASES
    scan: int = 24
    n_grains: int = 10
    seed: int = 0
    epochs: int | None = None
    baseline: str = "auto"
    crb_grains: int | None = None
    keep_data: bool = False
    timeout_s: float = 3600.0

    def __post_init__(self):
        if not self.cases:
            raise ValueError("RobustnessConfig.cases is empty: give at least one case")
        ids = [c.id for c in self.cases]
        if len(set(ids)) != len(ids):
            raise ValueError(f"RobustnessConfig.cases has duplicates: {ids}")
        for name in ("scan", "n_grains"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"RobustnessConfig.{name}={getattr(self, name)!r} must be >= 1")
        if self.epochs is not None and int(self.epochs) < 1:
            raise ValueError(f"RobustnessConfig.epochs={self.epochs!r} must be >= 1 or None (the CLI's default)")
        if self.baseline not in ("auto", "off", "require"):
            raise ValueError(f"RobustnessConfig.baseline={self.baseline!r}: expected 'auto', 'off' or 'require'")
        if self.crb_grains is not None and self.crb_grains < 1:
            raise ValueError(f"RobustnessConfig.crb_grains={self.crb_grains!r} must be >= 1 or None")

    def simulate_args(self, case: Case, out: Path) -> list[str]:
        """The ``ccstae simulate`` arguments of ``case``."""
        return ["simulate", str(out), "--scan", str(self.scan), str(self.scan), "--grains", str(self.n_grains),
                "--noise", repr(float(case.noise)), "--seed", str(self.seed), "--quiet", *case.simulate]

    def case_settings(self, case: Case) -> dict:
        """Everything that determines a case's result (a saved case is reused only if these match)."""
        return {"case": dataclasses.asdict(case), "scan": self.scan, "n_grains": self.n_grains, "seed": self.seed,
                "epochs": self.epochs, "baseline": self.baseline, "crb_grains": self.crb_grains}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["cases"] = [c.id for c in self.cases]
        return d


#: ``--quick``: 24x24 scans, 10 grains, the CLI's default epochs, the 13 quick cases.
QUICK = RobustnessConfig()
#: ``--full``: 128x128 scans with 24 grains and every case, heterostructure included (a GPU for CC-ST-AE).
FULL = RobustnessConfig(cases=ALL_CASES, scan=128, n_grains=24)


def select_cases(cases: Sequence[Case], keys: str | Sequence[str]) -> tuple[Case, ...]:
    """The cases named by ``keys`` (comma-separated or a list): a case id (``disk16_n25``) or a name (``disk16``,
    every noise level of it), in the order of ``cases``.

    Raises:
      ValueError: a key that matches no case (the known names are listed).
    """
    if isinstance(keys, str):
        keys = [k for k in keys.split(",") if k.strip()]
    keys = [k.strip() for k in keys]
    unknown = [k for k in keys if not any(k in (c.id, c.name) for c in cases)]
    if unknown:
        names = sorted({c.name for c in cases}) + [c.id for c in cases]
        raise ValueError(f"--cases: unknown {unknown}; known names and ids: {', '.join(names)}")
    return tuple(c for c in cases if c.id in keys or c.name in keys)


# ------------------------------------------------------------------------------------------------ one case
def run_ccstae(args: Sequence[str], *, timeout: float) -> subprocess.CompletedProcess:
    """Runs ``ccstae ARGS`` (``python -m ccstae_jax.cli`` with this interpreter), capturing its output."""
    env = {**os.environ, "MPLBACKEND": "Agg", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "ccstae_jax.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join((text or "").strip().splitlines()[-lines:])


def _run_geometry(run_dir: Path) -> dict | None:
    """What the trained run records about the pattern geometry: its ``geometry`` entry if it writes one, else the
    ring radii, spot mask, symmetry and base count of its model and loss configuration."""
    path = run_dir / "model.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    if isinstance(saved.get("geometry"), dict):
        return saved["geometry"]
    model, loss = saved.get("model", {}), saved.get("loss", {})
    keys_m = ("symmetry", "num_bases", "prior_radii", "pattern_shape")
    keys_l = ("ring_inner", "ring_outer", "spot_radius_start", "spot_radius_end")
    out = {k: model[k] for k in keys_m if k in model}
    out.update({k: loss[k] for k in keys_l if k in loss})
    return out or None


def score_map(strain_path, data_path) -> dict:
    """Scores a strain map against the labels of a simulated file.

    Returns:
      ``{"errors": error table of ccstae evaluate, "mae": {quantity: MAE, "invalid_frac"}, "hetero": {...} or
      None}``. ``invalid_frac`` is the fraction of specimen positions (finite labels) the map marks invalid.
      ``hetero`` (only for scans with vacuum or several phases): ``vacuum_flagged`` (fraction of vacuum positions
      invalid; None without vacuum), ``phase_mean_error`` ({phase name: {strain: mean signed error over its valid
      positions}}, errors referenced like the MAE), ``phase_accuracy`` (None without a class map: ``/phase``,
      ``/class_index`` or ``/affine/class_index``) and ``n_classes``.
    """
    from ccstae_jax import pipeline
    from ccstae_jax.data.readers import load_labels
    from ccstae_jax.report.files import read_strain_h5

    table = pipeline.evaluate(strain_path, data_path)
    maps, attrs = read_strain_h5(strain_path)
    labels = load_labels(data_path, shape=np.shape(maps["strain_xx"]))
    specimen = np.all([np.isfinite(labels[k]) for k in ("strain_xx", "strain_yy", "shear_xy", "rotation")], axis=0)
    valid = _valid(maps)
    row: dict[str, Any] = mae_row(table)
    row["invalid_frac"] = float(np.mean(~valid[specimen])) if specimen.any() else None
    data_attrs = file_attrs(data_path)
    phases = json.loads(data_attrs.get("phases", "[]") or "[]")
    has_vacuum = "vacuum" in labels and bool(np.any(labels["vacuum"]))
    hetero = None
    if has_vacuum or len(phases) > 1:
        hetero = _hetero_scores(maps, attrs, labels, data_attrs, phases, valid, specimen, _class_map(strain_path))
    flags = json.loads(attrs.get("quality_warnings", "[]") or "[]")
    return {"errors": table, "mae": row, "hetero": hetero, "flags": flags}


def _valid(maps) -> np.ndarray:
    ok = np.all([np.isfinite(np.asarray(maps[k], np.float64)) for k in ("strain_xx", "strain_yy", "shear_xy")], 0)
    if "valid" in maps:
        ok &= np.asarray(maps["valid"], bool)
    return ok


def _class_map(strain_path) -> np.ndarray | None:
    """The map's phase/class assignment: ``/phase``, else ``/class_index``, else ``/affine/class_index``."""
    import h5py

    with h5py.File(strain_path, "r") as f:
        for key in ("phase", "class_index", "affine/class_index"):
            if isinstance(f.get(key), h5py.Dataset):
                return np.asarray(f[key][()])
    return None


def _hetero_scores(maps, attrs, labels, data_attrs, phases, valid, specimen, classes) -> dict:
    from ccstae_jax import pipeline
    from ccstae_jax.evaluate.metrics import _referenced_predictions, referenced_labels

    vacuum = np.asarray(labels["vacuum"], bool) if "vacuum" in labels else ~specimen
    out: dict[str, Any] = {
        "vacuum_flagged": float(np.mean(~valid[vacuum])) if vacuum.any() else None,
    }
    # signed errors referenced exactly as ccstae evaluate does (same region and symmetry)
    region = pipeline._region_from_attrs(attrs) or tuple(int(v) for v in data_attrs["reference_region"])
    symmetry = int(attrs.get("symmetry", 6))
    ref_lab = referenced_labels(labels, reference_region=region, symmetry=symmetry)
    pred = maps
    if pipeline._is_absolute(attrs):
        pred = _referenced_predictions(maps, valid, region, symmetry)
    phase = np.asarray(labels["phase"]) if "phase" in labels else np.zeros(specimen.shape, int)
    per_phase = {}
    for p, entry in enumerate(phases or [["phase 0"]]):
        sel = specimen & valid & (phase == p)
        per_phase[str(entry[0])] = (
            {k: float(np.mean(np.asarray(pred[k], np.float64)[sel] - ref_lab[k][sel])) for k in STRAINS}
            if sel.any() else None)
    out["phase_mean_error"] = per_phase
    out["phase_accuracy"], out["n_classes"] = None, None
    if classes is not None and "phase" in labels:
        if classes.ndim == 3 and classes.shape[-1] > 1:  # per-class weights: the strongest class
            classes = np.argmax(classes, axis=-1)
        elif classes.ndim == 3:
            classes = classes[..., 0]
        if classes.shape == specimen.shape:
            out["phase_accuracy"], out["n_classes"] = _phase_accuracy(classes, phase, specimen & valid)
    return out


def _phase_accuracy(classes: np.ndarray, phase: np.ndarray, sel: np.ndarray) -> tuple[float | None, int]:
    """Fraction of selected positions whose class, mapped to the phase it most often covers, is their phase."""
    c, p = np.asarray(classes)[sel].astype(int), np.asarray(phase)[sel].astype(int)
    if c.size == 0:
        return None, 0
    mapping = {k: np.bincount(p[c == k]).argmax() for k in np.unique(c)}
    return float(np.mean(np.array([mapping[k] for k in c]) == p)), int(len(mapping))


def run_case(cfg: RobustnessConfig, case: Case, case_dir: Path, *, baseline_ok: bool = True,
             log: Callable[[str], None] = print) -> dict:
    """Simulates, trains, maps, baselines, scores and bounds one case; writes and returns its ``result.json``.

    A failing ``ccstae`` step or baseline is recorded in ``notes`` (its method's scores are null) and does not stop
    the benchmark; ``errors`` holds each method's full error table (median, interior MAE, valid fraction).
    """
    from ccstae_jax.baselines import py4dstem
    from ccstae_jax.data.simulate import SimulationConfig

    case_dir.mkdir(parents=True, exist_ok=True)
    settings = cfg.case_settings(case)
    saved = case_dir / "settings.json"
    if saved.exists() and json.loads(saved.read_text()) != settings:
        for p in case_dir.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    write_json(saved, settings)
    data, run, strain, base = (case_dir / n for n in ("data.h5", "run", "strain.h5", "strain_py4dstem.h5"))
    clock = Clock(log, f"[{case.id}]")
    notes: list[str] = []
    errors: dict[str, Any] = {}
    scores: dict[str, Any] = {}

    with clock.part("simulate"):
        if not data.exists():
            proc = run_ccstae(cfg.simulate_args(case, data), timeout=cfg.timeout_s)
            if proc.returncode != 0:
                raise RuntimeError(f"ccstae {' '.join(cfg.simulate_args(case, data))} failed:\n{_tail(proc.stderr)}")
    attrs = file_attrs(data)
    sim = SimulationConfig(**json.loads(attrs["config"]))

    train_args = ["train", str(data), "--out", str(run), "--quiet"]
    if cfg.epochs is not None:
        train_args += ["--epochs", str(int(cfg.epochs))]
    map_args = ["map", str(run), str(data), "--out", str(strain), "--quiet"]
    with clock.part("train"):
        proc = run_ccstae(train_args, timeout=cfg.timeout_s)
    train_output = _tail(proc.stdout + proc.stderr, 60)
    (case_dir / "train_output.txt").write_text(proc.stdout + proc.stderr)
    ok = proc.returncode == 0
    if ok:
        with clock.part("map"):
            proc = run_ccstae(map_args, timeout=cfg.timeout_s)
        ok = proc.returncode == 0
    if ok:
        scores["ccstae"] = score_map(strain, data)
    else:
        notes.append(f"ccstae failed: {_tail(proc.stderr, 3)}")
        scores["ccstae"] = None

    if cfg.baseline == "off":
        notes.append("py4DSTEM baseline off")
    elif not baseline_ok:
        notes.append("py4DSTEM baseline unavailable (found at an earlier case)")
    else:
        with clock.part("py4dstem"):
            try:
                py4dstem.run_baseline_subprocess(data, base, timeout=cfg.timeout_s)
                scores["py4dstem"] = score_map(base, data)
            except py4dstem.BaselineUnavailable as e:
                if cfg.baseline == "require":
                    raise
                notes.append(f"py4DSTEM baseline unavailable: {e}")
            except (RuntimeError, ValueError) as e:  # failed on this file: record it, keep going
                if cfg.baseline == "require":
                    raise
                notes.append(f"py4DSTEM baseline failed: {e}")
    with clock.part("crb"):
        crb = crb_for_scan(data, sim, float(case.noise), max_grains=cfg.crb_grains)
    baseline_params = json.loads(file_attrs(base)["parameters"]) if scores.get("py4dstem") else None
    for m in METHODS:
        s = scores.get(m)
        errors[m] = None if s is None else s["errors"]
    hetero = {m: scores[m]["hetero"] for m in METHODS if scores.get(m) and scores[m]["hetero"] is not None}
    if not cfg.keep_data:
        data.unlink()
    result = {
        "name": case.name,
        "noise": float(case.noise),
        "id": case.id,
        "ccstae": None if scores.get("ccstae") is None else scores["ccstae"]["mae"],
        "py4dstem": None if scores.get("py4dstem") is None else scores["py4dstem"]["mae"],
        "crb": crb,
        **({"hetero": hetero} if hetero else {}),
        "simulate": ["ccstae", *cfg.simulate_args(case, Path("DATA.h5"))],
        "commands": {"train": ["ccstae", *train_args], "map": ["ccstae", *map_args]},
        "geometry": {
            "simulated": {k: attrs.get(k) for k in ("lattice", "lattice_aspect", "spot_spacing", "disk_radius",
                                                    "ellipticity", "descan", "phases", "vacuum", "q_pixel",
                                                    "pattern_centre", "lattice_symmetry")},
            "pattern_shape": list(sim.pattern_shape),
            "ccstae_run": _run_geometry(run),
            "py4dstem": None if baseline_params is None else {
                k: baseline_params.get(k) for k in ("g1_length_px", "lattice", "symmetry", "resolved", "ellipse",
                                                    "vacuum")},
        },
        "train_output": train_output,
        "errors": errors,
        "flags": {m: scores[m].get("flags", []) for m in METHODS if scores.get(m)},
        "settings": settings,
        "timings_s": clock.times,
        "notes": notes,
    }
    result = clean(result)
    write_json(case_dir / RESULT_FILE, result)
    return result


# ------------------------------------------------------------------------------------------------ the benchmark
def run_benchmark(cfg: RobustnessConfig, out_dir, *, fresh: bool = False,
                  log: Callable[[str], None] = print) -> dict:
    """Runs every case of ``cfg`` (reusing finished cases with identical settings); returns the results dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load0 = loadavg()
    results, reused = [], []
    baseline_ok = True
    for case in cfg.cases:
        cdir = out / case.id
        res = None
        path = cdir / RESULT_FILE
        if not fresh and path.exists():
            old = json.loads(path.read_text())
            if old.get("settings") == clean(cfg.case_settings(case)):
                res = old
                reused.append(case.id)
                log(f"[{case.id}] reusing {path}")
        if res is None:
            if fresh and cdir.exists():
                shutil.rmtree(cdir)
            res = run_case(cfg, case, cdir, baseline_ok=baseline_ok, log=log)
        if any("baseline unavailable" in n for n in res.get("notes", [])):
            baseline_ok = False
        results.append(res)
    wall = time.perf_counter() - t0
    return clean({
        "cases": results,
        "settings": {
            **cfg.to_dict(),
            "reused_cases": reused,
            "mae_over": "valid specimen positions (ccstae evaluate: both sides referenced to the labels' region)",
            "units": "strain dimensionless; rotation degrees (modulo the symmetry the map records)",
            "invalid_frac": "fraction of specimen positions (finite labels) the map marks invalid",
            "ccstae": "ccstae train + ccstae map with the CLI's defaults (nothing geometry-specific)",
            "py4dstem": "ccstae baseline: py4DSTEM disk detection + per-pattern lattice fit, set up from the file's "
                        "geometry (ccstae_jax.baselines.py4dstem.config_from_attrs); absolute maps referenced to "
                        "the same region",
            "crb": "sqrt(2/pi) * Cramer-Rao bound on the per-pattern std, averaged over the specimen positions by "
                   "dominant grain (pattern centre known); 0 at 0 % noise (noise-free data)",
        },
        "environment": environment(wall, load0),
    })


# ------------------------------------------------------------------------------------------------ table, figure
def _cell(v, scale: float, digits: int, bold: bool = False) -> str:
    if v is None:
        return "n/a"
    s = f"{v * scale:.{digits}f}"
    return f"**{s}**" if bold else s


def format_markdown(results: dict) -> str:
    """One row per case: per quantity py4DSTEM | CC-ST-AE | CRB (strain x1e-3, rotation deg; the lower of the two
    methods bold), then the invalid fraction of each method; a second table for heterostructure cases."""
    titles = {"strain_xx": "Strain X", "strain_yy": "Strain Y", "shear_xy": "Shear", "rotation_deg": "Rotation"}
    cols = (("py4dstem", "py4DSTEM"), ("ccstae", "CC-ST-AE"), ("crb", "CRB"))
    head = ["case", "noise"]
    for q in QUANTITIES:
        unit = "deg" if q == "rotation_deg" else "x1e-3"
        head += [f"{titles[q]} {name} ({unit})" for _, name in cols]
    head += ["invalid py4DSTEM", "invalid CC-ST-AE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in results["cases"]:
        cells = [c["name"], f"{c['noise'] * 100:g}%"]
        for q in QUANTITIES:
            scale, digits = (1.0, 3) if q == "rotation_deg" else (1e3, 2)
            vals = {m: (c[m] or {}).get(q) for m, _ in cols}
            pair = [vals["py4dstem"], vals["ccstae"]]
            best = min(pair) if None not in pair else None
            for m, _ in cols:
                cells.append(_cell(vals[m], scale, digits, bold=m != "crb" and best is not None and vals[m] == best))
        for m in ("py4dstem", "ccstae"):
            v = (c[m] or {}).get("invalid_frac")
            cells.append("n/a" if v is None else f"{v * 100:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    het = [c for c in results["cases"] if c.get("hetero")]
    if het:
        lines += ["", "| case | noise | method | vacuum flagged | mean error per phase (x1e-3: xx / yy / shear) | "
                  "phase accuracy |", "|---|---|---|---|---|---|"]
        for c in het:
            for m, name in (("py4dstem", "py4DSTEM"), ("ccstae", "CC-ST-AE")):
                h = c["hetero"].get(m)
                if h is None:
                    continue
                vf = "n/a" if h.get("vacuum_flagged") is None else f"{h['vacuum_flagged'] * 100:.1f}%"
                per = "; ".join(f"{p}: " + ("n/a" if e is None else " / ".join(f"{e[k] * 1e3:+.2f}" for k in STRAINS))
                                for p, e in (h.get("phase_mean_error") or {}).items())
                n = h.get("n_classes")
                acc = "n/a" if h.get("phase_accuracy") is None else \
                    f"{h['phase_accuracy'] * 100:.1f}% ({n} class{'' if n == 1 else 'es'})"
                lines.append(f"| {c['name']} | {c['noise'] * 100:g}% | {name} | {vf} | {per} | {acc} |")
    calibration = calibration_markdown([(f"{c['name']} {c['noise'] * 100:g}%", (c.get("errors") or {}).get("ccstae"),
                                         c.get("crb")) for c in results["cases"] if c["noise"] > 0])
    if calibration:
        lines += ["", "Calibration of CC-ST-AE's per-position 1-sigma errors (`/uncertainty/*`) against the labels "
                  "(noisy cases):", ""] + calibration
    s = results.get("settings", {})
    env = results.get("environment", {})
    notes = [f"{c['name']} {c['noise'] * 100:g}%: {n.splitlines()[0]}" for c in results["cases"]
             for n in c.get("notes", [])]
    notes += [f"{c['name']} {c['noise'] * 100:g}%: {m} map flagged ({f.split(':')[0]})" for c in results["cases"]
              for m, fl in c.get("flags", {}).items() for f in fl]
    lines += [
        "",
        f"MAE against the labels over the valid specimen positions of each {s.get('scan', '?')}x{s.get('scan', '?')} "
        f"scan ({s.get('n_grains', '?')} grains, seed {s.get('seed', '?')}); strain x1e-3, rotation in degrees; "
        "invalid = fraction of specimen positions marked invalid.",
        f"CC-ST-AE: {s.get('ccstae', '')}" + (f", --epochs {s['epochs']}" if s.get("epochs") else "") + ".",
        f"py4DSTEM: {s.get('py4dstem', '')}.",
        f"CRB: {s.get('crb', '')}.",
    ]
    if notes:
        lines.append("Notes: " + "; ".join(notes) + ".")
    if env:
        lines.append(f"Wall time {env.get('wall_s', '?')} s on {env.get('cpu_count', '?')} CPUs "
                     f"({env.get('device', '?')}, load average at start {env.get('loadavg_start')}); "
                     f"command: `{env.get('command', '')}`.")
        cache = env.get("compilation_cache")
        if cache:
            state = "empty" if cache["entries_at_start"] == 0 else f"{cache['entries_at_start']} entries"
            lines.append(f"The commands shared one compilation cache ({state} at the start).")
    return "\n".join(lines) + "\n"


def plot_robustness(results: dict, path) -> str:
    """MAE per case: strain (mean of strain_xx, strain_yy, shear_xy; log scale) and rotation, CC-ST-AE, py4DSTEM and
    the CRB side by side; a method without a result (failed, not run) is an x at the top. Returns the path written."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cases = results["cases"]
    labels = [f"{c['name']}\n{c['noise'] * 100:g}%" for c in cases]
    x = np.arange(len(cases))

    def series(method, quantity):
        out = []
        for c in cases:
            row = c.get(method) or {}
            if quantity == "strain":
                v = [row.get(k) for k in STRAINS]
                out.append(np.mean(v) if all(u is not None for u in v) else np.nan)
            else:
                out.append(np.nan if row.get(quantity) is None else row[quantity])
        return np.asarray(out, np.float64)

    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.65 * len(cases) + 2), 7.5), sharex=True)
    style = {"ccstae": ("CC-ST-AE", "o", "C0"), "py4dstem": ("py4DSTEM", "s", "C1"), "crb": ("CRB", "_", "k")}
    for ax, (quantity, scale, ylabel) in zip(axes, (("strain", 1e3, "strain MAE (x1e-3)"),
                                                   ("rotation_deg", 1.0, "rotation MAE (deg)"))):
        for k, (method, (name, marker, colour)) in enumerate(style.items()):
            y = series(method, quantity) * scale
            if method == "crb":
                y = np.where(y > 0, y, np.nan)  # no bound to draw on noise-free data
                ax.scatter(x, y, marker=marker, s=400, color=colour, label=name, zorder=3, linewidths=2)
            else:
                ax.scatter(x + (k - 0.5) * 0.18, y, marker=marker, s=45, color=colour, label=name, zorder=4)
        ax.set_yscale("log")
        top = ax.get_ylim()[1]
        labelled = False
        for k, method in enumerate(("ccstae", "py4dstem")):
            missing = np.array([c.get(method) is None for c in cases])
            if missing.any():
                ax.scatter(x[missing] + (k - 0.5) * 0.18, np.full(missing.sum(), top), marker="x", s=45,
                           color=style[method][2], clip_on=False, zorder=4,
                           label=None if labelled else "no result (failed or not run)")
                labelled = True
        ax.set_ylim(top=top)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", axis="y", alpha=0.3)
        for b in x[:-1]:
            ax.axvline(b + 0.5, color="0.9", lw=0.8, zorder=0)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper right", bbox_to_anchor=(0.99, 0.96), ncol=4, fontsize=9, frameon=False)
    fig.suptitle("MAE per case (CRB: expected MAE at the Cramér-Rao bound)", x=0.02, ha="left", fontsize=11)
    axes[1].set_xticks(x, labels, fontsize=8)
    axes[1].set_xlim(-0.6, len(cases) - 0.4)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write_outputs(results: dict, out_dir, *, json_path=None, markdown_path=None, figure_path=None) -> dict[str, str]:
    """Writes ``robustness.json``, ``robustness.md`` and ``robustness.png`` under ``out_dir`` (and the copies asked
    for); returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, allow_nan=False) + "\n"
    md = format_markdown(results)
    paths = {"json": out / "robustness.json", "markdown": out / "robustness.md", "figure": out / "robustness.png"}
    paths["json"].write_text(text)
    paths["markdown"].write_text(md)
    plot_robustness(results, paths["figure"])
    for key, extra in (("json", json_path), ("markdown", markdown_path), ("figure", figure_path)):
        if extra:
            Path(extra).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(paths[key], extra)
            paths[f"{key}_copy"] = Path(extra)
    return {k: str(v) for k, v in paths.items()}


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python benchmarks/robustness.py",
        description="Robustness benchmark: CC-ST-AE (ccstae train + map with the CLI's defaults) on simulated scans "
        "of many pattern geometries (disk radius, pattern size, lattice, ellipticity, descan, heterostructure with "
        "vacuum), beside the py4DSTEM baseline and the Cramer-Rao bound. MAE of strain x, strain y, shear (x1e-3) "
        "and rotation (deg) against the labels.",
    )
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="24x24 scans, the 13 quick cases (the default)")
    mode.add_argument("--full", action="store_true", help="128x128 scans, 24 grains, every case (a GPU)")
    ap.add_argument("--hetero", action="store_true", help="add the WS2/WSe2 heterostructure with 20%% vacuum at "
                    "0/25/50%% noise")
    ap.add_argument("--cases", default=None, metavar="NAME,...",
                    help="run only these cases: names (every noise level) or ids such as disk16_n25")
    ap.add_argument("--scan", type=int, default=None, help="scan size (positions per side)")
    ap.add_argument("--grains", type=int, default=None, help="grains per scan")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None, help="ccstae train --epochs (default: the CLI's)")
    ap.add_argument("--baseline", choices=("auto", "off", "require"), default=None,
                    help="py4DSTEM baseline (interpreter: $CCSTAE_BASELINE_PYTHON, else this one)")
    ap.add_argument("--crb-grains", type=int, default=None, help="bound at most this many grains (most populous)")
    ap.add_argument("--keep-data", action="store_true", help="keep the simulated data files")
    ap.add_argument("--fresh", action="store_true", help="recompute cases that already have a result")
    ap.add_argument("--out-dir", default="robustness_out")
    ap.add_argument("--json", default=None, metavar="OUT.json", help="also write the results JSON here")
    ap.add_argument("--markdown", default=None, metavar="OUT.md", help="also write the table here")
    ap.add_argument("--figure", default=None, metavar="OUT.png", help="also write the figure here")
    return ap


def config_from_args(a: argparse.Namespace) -> RobustnessConfig:
    base = FULL if a.full else QUICK
    cases = base.cases
    if a.hetero and not a.full:
        cases = cases + HETERO_CASES
    if a.cases:
        cases = select_cases(ALL_CASES, a.cases)
    over: dict[str, Any] = {"cases": cases}
    for field, value in (("scan", a.scan), ("n_grains", a.grains), ("seed", a.seed), ("epochs", a.epochs),
                         ("baseline", a.baseline), ("crb_grains", a.crb_grains)):
        if value is not None:
            over[field] = value
    if a.keep_data:
        over["keep_data"] = True
    return dataclasses.replace(base, **over)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("TQDM_DISABLE", "1")
    # the commands share one compilation cache, empty in a new output folder (the timings include every compilation)
    with own_compilation_cache(Path(a.out_dir).resolve() / "xla-cache"):
        return _run(a)


def _run(a) -> int:
    try:
        cfg = config_from_args(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    log(f"robustness: {len(cfg.cases)} cases ({', '.join(c.id for c in cfg.cases)}), scan {cfg.scan}x{cfg.scan}, "
        f"{cfg.n_grains} grains -> {a.out_dir}")
    cache = chosen_directory()  # None: switched off, or JAX's own JAX_COMPILATION_CACHE_DIR
    cached_before = sum(1 for _ in cache.iterdir()) if cache is not None and cache.is_dir() else 0
    results = run_benchmark(cfg, a.out_dir, fresh=a.fresh, log=log)
    if cache is not None:
        results["environment"]["compilation_cache"] = {"path": str(cache), "entries_at_start": cached_before}
    paths = write_outputs(results, a.out_dir, json_path=a.json, markdown_path=a.markdown, figure_path=a.figure)
    print(format_markdown(results))
    log("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
