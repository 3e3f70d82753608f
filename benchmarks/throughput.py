"""Like-for-like throughput benchmark: ccstae-jax against the PyTorch Auto4DSTEM 0.2.8, plus the fast preset.

Usage::

    python benchmarks/throughput.py --quick --json OUT.json       # 2-core CPU, < 15 min (a time budget)
    python benchmarks/throughput.py --json OUT.json               # full CPU matrix (hours on 2 cores)
    python3 benchmarks/throughput.py --gpu --torch-site build/torchsite --json OUT.json   # H100/H200

Every measurement runs in its own process (``_jax_side.py`` with this interpreter, ``_torch_side.py`` with the
torch interpreter), in the order JAX, torch, JAX, torch (A B A B) for each compared configuration; each process
warms up, reports compile time separately and the median patterns/s of its repeats; the table shows the median over
processes. Ratios are ours / PyTorch's. See benchmarks/README.md for the recipe and how to read the output.

Headline keys of the JSON (CPU: train batch 4, inference batch 16; GPU: train batch 16, inference batch 256; all on
the tutorial's 800x800 bicubic path, float32): ``reference_train_ratio``, ``reference_infer_ratio``,
``fast_train_patterns_per_s``, ``fast_train_ratio`` (fast training patterns/s over PyTorch's reference training
patterns/s), ``torch_train_patterns_per_s``, ``torch_infer_patterns_per_s``, ``device``. Without a usable torch
interpreter the torch processes are skipped and every ``torch_*``/ratio key is null.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MARKER = "BENCH_RESULT "

#: CPU headline configurations (the §12 anchor: train batch 4, inference batch 16, 800 bicubic path).
CPU_HEADLINE = {"train": 4, "infer": 16, "fast_train": 32}
#: GPU headline configurations (the authors' notebook predicted with batch 256).
GPU_HEADLINE = {"train": 16, "infer": 256, "fast_train": 512}

NOTES = [
    "ratio = JAX patterns/s / PyTorch patterns/s (medians over processes of per-process medians)",
    "train = forward + loss + backward + Adam(3e-5) step; infer = the jitted network forward pass vs "
    "auto4dstem join() under no_grad with the affine matrices copied to the host",
    "PyTorch train step = auto4dstem AcumulatedLoss.__call__ on a one-batch iterator (its real loss)",
    "JAX compile time is reported separately (the first, cold compile) and excluded from patterns/s",
]
FAKE_DEVICE_NOTE = ("CPU device counts > 1 are fake host-platform devices (--xla_force_host_platform_device_count): "
                    "they share the same cores, so they measure sharding overhead, not parallel speed-up")
NOTES.append(FAKE_DEVICE_NOTE)


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One process to run. ``key`` groups the processes whose medians form one table row."""

    side: str  # "jax" or "torch"
    spec: dict
    round: int = 0
    required: bool = False  # never skipped for the time budget (it may still time out)

    @property
    def key(self) -> tuple:
        s = self.spec
        if self.side == "torch":
            return ("torch", s["kind"], bool(s["interpolate"]), int(s["batch"]))
        return ("jax", s.get("preset", "reference"), s["kind"], bool(s.get("interpolate", False)), int(s["batch"]),
                s.get("dtype", "float32"), int(s.get("devices", 1)), bool(s.get("cpu_devices")))


# --------------------------------------------------------------------------------------------------------- plans
def _jax(kind, batch, *, preset="reference", interpolate=True, dtype="float32", **kw) -> dict:
    return dict(kind=kind, preset=preset, batch=batch, interpolate=interpolate if preset == "reference" else False,
                dtype=dtype, **kw)


def _torch(kind, batch, *, interpolate=True, **kw) -> dict:
    return dict(kind=kind, batch=batch, interpolate=interpolate, **kw)


def _pairs(configs, rounds, *, required_first=True, round_=0):
    """A B A B: for each round, for each ``(kind, batch, interpolate, timing)``: JAX then torch."""
    out = []
    for r in range(rounds):
        for kind, batch, interp, timing in configs:
            req = required_first and r == 0
            out.append(Measurement("jax", _jax(kind, batch, interpolate=interp, **timing), round_ + r, req))
            out.append(Measurement("torch", _torch(kind, batch, interpolate=interp, **timing), round_ + r, req))
    return out


def plan_quick(rounds: int = 2) -> list[Measurement]:
    """2-core CPU, < 15 minutes: the headline pairs (A B A B), the fast preset, then cheap scaling extras."""
    slow = dict(warmup=1, steps=1, repeats=2)
    fast = dict(warmup=1, steps=3, repeats=3)
    plan = []
    for r in range(rounds):
        plan += _pairs([("train", CPU_HEADLINE["train"], True, slow), ("infer", CPU_HEADLINE["infer"], True, slow)],
                       1, required_first=(r == 0), round_=r)
        plan.append(Measurement("jax", _jax("train", CPU_HEADLINE["fast_train"], preset="fast", **fast), r, r == 0))
    plan += [
        Measurement("jax", _jax("train", 128, preset="fast", **fast), rounds),
        Measurement("jax", _jax("infer", 128, preset="fast", **fast), rounds),
        Measurement("jax", _jax("train", 32, preset="fast", devices=2, cpu_devices=2, **fast), rounds),
        Measurement("jax", _jax("train", CPU_HEADLINE["train"], interpolate=False, **slow), rounds),
        Measurement("torch", _torch("train", CPU_HEADLINE["train"], interpolate=False, **slow), rounds),
    ]
    return plan


def plan_full(rounds: int = 2) -> list[Measurement]:
    """The whole CPU matrix: both paths x batch 4/16 x train/infer (A B A B), fast preset batch and device scaling."""
    slow = dict(warmup=1, steps=1, repeats=3)
    fast = dict(warmup=2, steps=4, repeats=5)
    configs = [(kind, b, interp, slow) for interp in (True, False) for kind in ("train", "infer") for b in (4, 16)]
    plan = _pairs(configs, rounds)
    for r in range(rounds):
        for b in (32, 128):
            plan.append(Measurement("jax", _jax("train", b, preset="fast", **fast), r, r == 0))
        for b in (128, 512):
            plan.append(Measurement("jax", _jax("infer", b, preset="fast", **fast), r, r == 0))
    for n in (2, 4):
        plan.append(Measurement("jax", _jax("train", 128, preset="fast", devices=n, cpu_devices=n, **fast), rounds))
    return plan


def plan_gpu(rounds: int = 2) -> list[Measurement]:
    """H100/H200: both presets x float32/bfloat16, train and inference at larger batches, the 65,536-pattern scan."""
    ref = dict(warmup=2, steps=3, repeats=3)
    fast = dict(warmup=3, steps=10, repeats=5)
    tr, inf, ftr = GPU_HEADLINE["train"], GPU_HEADLINE["infer"], GPU_HEADLINE["fast_train"]
    plan = _pairs([("train", tr, True, ref), ("infer", inf, True, ref)], 1)
    plan += [
        Measurement("jax", _jax("train", ftr, preset="fast", **fast), 0, True),
        Measurement("jax", _jax("infer", 4096, preset="fast", **fast), 0, True),
        Measurement("jax", _jax("scan", 4096, preset="fast"), 0, True),
        Measurement("jax", _jax("train", tr, dtype="bfloat16", **ref), 0),
        Measurement("jax", _jax("infer", inf, dtype="bfloat16", **ref), 0),
        Measurement("jax", _jax("train", ftr, preset="fast", dtype="bfloat16", **fast), 0),
        Measurement("jax", _jax("infer", 4096, preset="fast", dtype="bfloat16", **fast), 0),
        Measurement("jax", _jax("scan", 4096, preset="fast", dtype="bfloat16"), 0),
        Measurement("jax", _jax("scan", inf, dtype="bfloat16"), 0),
    ]
    for r in range(1, rounds):
        plan += _pairs([("train", tr, True, ref), ("infer", inf, True, ref)], 1, required_first=False, round_=r)
    plan += _pairs([("train", tr, False, ref), ("infer", inf, False, ref)], 1, required_first=False, round_=rounds)
    plan += [
        Measurement("jax", _jax("train", 32, **ref), rounds),
        Measurement("torch", _torch("train", 32, **ref), rounds),
        Measurement("jax", _jax("train", 2048, preset="fast", **fast), rounds),
        Measurement("jax", _jax("infer", 8192, preset="fast", **fast), rounds),
    ]
    return plan


def plan_smoke() -> list[Measurement]:
    """Seconds-long harness check: tiny fast-preset JAX runs (and one torch run if available)."""
    t = dict(warmup=1, steps=1, repeats=2)
    return [Measurement("jax", _jax("train", 4, preset="fast", **t), 0, True),
            Measurement("jax", _jax("infer", 4, preset="fast", **t), 0, True)]


# ------------------------------------------------------------------------------------------------------ running
def find_torch_python(explicit: str | None, torch_site: str | None) -> tuple[str | None, str]:
    """The first interpreter that imports torch and auto4dstem: ``explicit``, $CCSTAE_TORCH_PYTHON, this one,
    ``../venv-torch-bench/bin/python`` beside the repo, ``.venv-torch/bin/python`` inside it. Returns (path, why)."""
    cands = [explicit, os.environ.get("CCSTAE_TORCH_PYTHON"), sys.executable,
             str(ROOT.parent / "venv-torch-bench" / "bin" / "python"), str(ROOT / ".venv-torch" / "bin" / "python")]
    tried = []
    probe = ("import sys; site = sys.argv[1]\n"
             "if site: sys.path.insert(0, site)\n"
             "import torch, auto4dstem.nn.CC_ST_AE, auto4dstem.nn.Loss_Function; print(torch.__version__)")
    for c in [c for c in cands if c]:
        if c in tried or not (os.path.exists(c) or c == sys.executable):
            continue
        tried.append(c)
        try:
            p = subprocess.run([c, "-c", probe, torch_site or ""], capture_output=True, text=True, timeout=180,
                               env={**os.environ, "TQDM_DISABLE": "1"})
        except (OSError, subprocess.TimeoutExpired) as e:
            tried[-1] += f" ({type(e).__name__})"
            continue
        if p.returncode == 0:
            return c, f"torch {p.stdout.strip().splitlines()[-1]} + auto4dstem via {c}"
        if explicit and c == explicit:
            last = (p.stderr.strip().splitlines() or ["?"])[-1]
            return None, f"--torch-python {c} cannot import torch + auto4dstem: {last}"
    return None, "no interpreter with torch + auto4dstem found (tried: " + ", ".join(tried) + ")"


def run_process(argv: list[str], timeout: float, env: dict | None = None) -> dict:
    """Runs one measurement process and returns its parsed result (``ok: False`` with the reason on failure)."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                           env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as e:
        tail = e.stderr or ""
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "stderr_tail": tail[-2000:],
                "process_wall_s": time.perf_counter() - t0}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(MARKER):
            res = json.loads(line[len(MARKER):])
            if not res.get("ok"):
                res["stderr_tail"] = p.stderr[-2000:]
            res["process_wall_s_outer"] = time.perf_counter() - t0
            return res
    return {"ok": False, "error": f"exit code {p.returncode}, no result line", "stderr_tail": p.stderr[-2000:],
            "process_wall_s": time.perf_counter() - t0}


@dataclasses.dataclass
class Runner:
    jax_python: str
    torch_python: str | None
    torch_site: str | None
    data: str
    budget_s: float | None
    process_timeout_s: float
    jax_env: dict
    log: Callable[[str], None] = print
    start: float = dataclasses.field(default_factory=time.perf_counter)
    on_result: Callable[[list[dict], list[dict]], None] | None = None  # called after every process (partial JSON)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def estimate(self, m: Measurement, done: list[dict]) -> float:
        """Expected wall time of ``m``: the slowest earlier process of the same configuration, else the slowest
        of the same side/preset/kind scaled up by the batch ratio, else 60 s."""
        same = [r["process_wall_s_outer"] for r in done
                if r.get("_key") == list(m.key) and "process_wall_s_outer" in r]
        if same:
            return max(same)
        batch = int(m.spec["batch"])
        similar = [r["process_wall_s_outer"] * max(1.0, batch / int(r["spec"]["batch"])) for r in done
                   if "process_wall_s_outer" in r and r.get("side") == m.side
                   and r.get("spec", {}).get("kind") == m.spec["kind"]
                   and r.get("spec", {}).get("preset", "reference") == m.spec.get("preset", "reference")]
        return max(similar) if similar else 60.0

    @staticmethod
    def partner(plan: list[Measurement], i: int) -> int | None:
        """Index of the torch measurement paired with JAX measurement ``i`` (the next one, same step/path/batch)."""
        m = plan[i]
        if m.side != "jax" or m.spec.get("preset") != "reference" or i + 1 >= len(plan):
            return None
        t = plan[i + 1]
        same = (t.side == "torch" and t.round == m.round and t.spec["kind"] == m.spec["kind"]
                and t.spec["batch"] == m.spec["batch"] and bool(t.spec["interpolate"]) == bool(m.spec["interpolate"]))
        return i + 1 if same else None

    def run(self, plan: list[Measurement]) -> tuple[list[dict], list[dict]]:
        """Runs the plan in order. A JAX/torch pair is skipped or run as a whole, so rounds stay balanced."""
        results, skipped = [], []
        decided: dict[int, bool] = {}  # plan index -> run (True) / skip (False), fixed when its pair was decided
        for i, m in enumerate(plan):
            label = _label(m)
            if m.side == "torch" and self.torch_python is None:
                skipped.append({"measurement": label, "reason": "no torch interpreter"})
                continue
            remaining = None if self.budget_s is None else self.budget_s - self.elapsed()
            if i not in decided:
                j = self.partner(plan, i) if self.torch_python is not None else None
                group = [i] if j is None else [i, j]
                est = sum(self.estimate(plan[k], results) for k in group)
                go = remaining is None or m.required or est <= remaining
                for k in group:
                    decided[k] = go
                if not go:
                    why = f"time budget: ~{est:.0f} s needed{' for the pair' if j else ''}, {remaining:.0f} s left"
                    for k in group:
                        skipped.append({"measurement": _label(plan[k]), "reason": why})
                        self.log(f"[{self.elapsed():6.0f} s] skip  {_label(plan[k])} (budget)")
            if not decided[i]:
                continue
            timeout = self.process_timeout_s if remaining is None else max(min(self.process_timeout_s,
                                                                                 remaining - 5), 30.0)
            spec = {**m.spec, "data": self.data}
            if m.spec["kind"] == "scan" and remaining is not None:
                spec["scan_time_budget_s"] = max(10.0, min(spec.get("scan_time_budget_s", 120.0), remaining - 60))
            if m.side == "jax":
                argv = [self.jax_python, str(HERE / "_jax_side.py"), "--spec", json.dumps(spec)]
                env = self.jax_env
            else:
                spec["torch_site"] = self.torch_site
                argv = [self.torch_python, str(HERE / "_torch_side.py"), "--spec", json.dumps(spec)]
                env = {"TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
            self.log(f"[{self.elapsed():6.0f} s] run   {label} (round {m.round}, timeout {timeout:.0f} s)")
            res = run_process(argv, timeout, env)
            res.setdefault("side", m.side)
            res.setdefault("spec", spec)
            res["_key"] = list(m.key)
            res["round"] = m.round
            res["order"] = i
            results.append(res)
            if self.on_result is not None:
                self.on_result(results, skipped)
            if res.get("ok"):
                self.log(f"           -> {res.get('patterns_per_s', float('nan')):.3f} patterns/s, compile "
                         f"{res.get('compile_s', 0):.1f} s, peak RSS {res.get('peak_rss_mb', 0):.0f} MB, "
                         f"process {res.get('process_wall_s_outer', 0):.0f} s")
            else:
                self.log(f"           -> FAILED: {res.get('error')}\n{res.get('stderr_tail', '')[-800:]}")
        return results, skipped


def _label(m: Measurement) -> str:
    s = m.spec
    if m.side == "torch":
        return f"torch auto4dstem {s['kind']} b{s['batch']} {'interp800' if s['interpolate'] else 'no-interp'}"
    dev = f" {s.get('devices', 1)}dev" + (" (fake)" if s.get("cpu_devices") else "") if s.get("devices", 1) != 1 else ""
    interp = (" interp800" if s.get("interpolate") else " no-interp") if s.get("preset") == "reference" else ""
    return f"jax {s.get('preset')} {s['kind']} b{s['batch']}{interp} {s.get('dtype', 'float32')}{dev}"


# ----------------------------------------------------------------------------------------------------- summary
def _median(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def summarize(results: list[dict]) -> list[dict]:
    """One row per JAX configuration (with its matching torch row, if any) and one per unmatched torch row."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if r.get("ok") and r.get("_key"):
            groups.setdefault(tuple(r["_key"]), []).append(r)
    torch_rows = {k[1:]: v for k, v in groups.items() if k[0] == "torch"}
    rows, used = [], set()
    for k, rs in groups.items():
        if k[0] != "jax":
            continue
        _, preset, kind, interp, batch, dtype, devices, fake = k
        row = {"preset": preset, "kind": kind, "interpolate": interp, "batch": batch, "dtype": dtype,
               "devices": devices, "devices_are_fake": fake, "device_kind": rs[0].get("device_kind"),
               "jax_patterns_per_s": _median(r.get("patterns_per_s") for r in rs),
               "jax_processes": len(rs),
               "jax_process_medians": [r.get("patterns_per_s") for r in rs],
               # the first (cold) compile: with a persistent compilation cache later processes hit the cache
               "jax_compile_s": max((r.get("compile_s") or 0.0) for r in rs),
               "jax_step_s": _median(r.get("step_s") for r in rs),
               "jax_peak_rss_mb": max(r.get("peak_rss_mb") or 0 for r in rs),
               "jax_device_peak_mb": _median(r.get("device_peak_mb") for r in rs),
               "jax_gflops_per_s": _median(r.get("achieved_gflops") for r in rs)}
        if kind == "scan":
            row.update(scan_positions=rs[0].get("scan_positions"),
                       scan_on_device_s=_median(r.get("scan_on_device_s") for r in rs),
                       scan_from_host_s=_median(r.get("scan_from_host_s") for r in rs),
                       scan_truncated=any(r.get("scan_truncated") for r in rs))
        tkey = (kind, interp, batch)
        trs = torch_rows.get(tkey) if preset == "reference" and devices == 1 else None
        if trs:
            used.add(tkey)
            t = _median(r.get("patterns_per_s") for r in trs)
            row.update(torch_patterns_per_s=t, torch_processes=len(trs),
                       torch_process_medians=[r.get("patterns_per_s") for r in trs],
                       torch_peak_rss_mb=max(r.get("peak_rss_mb") or 0 for r in trs),
                       torch_device_peak_mb=_median(r.get("device_peak_mb") for r in trs),
                       torch_device_kind=trs[0].get("device_kind"),
                       ratio=(row["jax_patterns_per_s"] / t) if t and row["jax_patterns_per_s"] else None)
        rows.append(row)
    for tkey, trs in torch_rows.items():
        if tkey in used:
            continue
        kind, interp, batch = tkey
        rows.append({"preset": "reference", "kind": kind, "interpolate": interp, "batch": batch, "dtype": "float32",
                     "devices": 1, "torch_patterns_per_s": _median(r.get("patterns_per_s") for r in trs),
                     "torch_processes": len(trs), "torch_peak_rss_mb": max(r.get("peak_rss_mb") or 0 for r in trs),
                     "torch_device_kind": trs[0].get("device_kind")})
    order = {"reference": 0, "fast": 1}
    rows.sort(key=lambda r: (order.get(r["preset"], 2), r["kind"], not r["interpolate"], r["dtype"],
                             r.get("devices", 1), r["batch"]))
    return rows


def _find(rows, **kw):
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def headline(rows: list[dict], headline_cfg: dict) -> dict:
    """The required JSON keys (null where a side did not run)."""
    tr = _find(rows, preset="reference", kind="train", interpolate=True, batch=headline_cfg["train"],
               dtype="float32", devices=1) or {}
    inf = _find(rows, preset="reference", kind="infer", interpolate=True, batch=headline_cfg["infer"],
                dtype="float32", devices=1) or {}
    ftr = _find(rows, preset="fast", kind="train", batch=headline_cfg["fast_train"], dtype="float32",
                devices=1) or {}
    t_train = tr.get("torch_patterns_per_s")
    f_train = ftr.get("jax_patterns_per_s")
    return {
        "reference_train_ratio": tr.get("ratio"),
        "reference_infer_ratio": inf.get("ratio"),
        "reference_train_patterns_per_s": tr.get("jax_patterns_per_s"),
        "reference_infer_patterns_per_s": inf.get("jax_patterns_per_s"),
        "fast_train_patterns_per_s": f_train,
        "fast_train_ratio": (f_train / t_train) if f_train and t_train else None,
        "torch_train_patterns_per_s": t_train,
        "torch_infer_patterns_per_s": inf.get("torch_patterns_per_s"),
        "headline_config": {
            "reference_train": f"reference preset, 800x800 bicubic path, batch {headline_cfg['train']}, float32",
            "reference_infer": f"reference preset, 800x800 bicubic path, batch {headline_cfg['infer']}, float32",
            "fast_train": f"fast preset, batch {headline_cfg['fast_train']}, float32",
            "torch": "auto4dstem 0.2.8 Joint model + AcumulatedLoss (TrainClass defaults) + Adam 3e-5",
        },
    }


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        a = abs(v)
        return f"{v:,.0f}" if a >= 1000 else f"{v:.1f}" if a >= 100 else f"{v:.2f}" if a >= 1 else f"{v:.3g}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    head = ("| preset | step | 800 bicubic | batch | dtype | devices | JAX patterns/s | PyTorch patterns/s | ratio | "
            "JAX compile s | peak RSS MB JAX / torch | device peak MB JAX / torch | processes JAX / torch |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        dev = str(r.get("devices", 1)) + (" (fake)" if r.get("devices_are_fake") else "")
        interp = ("yes" if r["interpolate"] else "no") if r["preset"] == "reference" else "–"
        kind = r["kind"]
        if kind == "scan":
            kind = (f"scan {r.get('scan_positions')} (on device {_fmt(r.get('scan_on_device_s'))} s, "
                    f"from host {_fmt(r.get('scan_from_host_s'))} s)")
        lines.append(
            f"| {r['preset']} | {kind} | {interp} | {r['batch']} | {r['dtype']} | {dev} | "
            f"{_fmt(r.get('jax_patterns_per_s'))} | {_fmt(r.get('torch_patterns_per_s'))} | "
            f"{_fmt(r.get('ratio'))}{'x' if r.get('ratio') else ''} | {_fmt(r.get('jax_compile_s'))} | "
            f"{_fmt(r.get('jax_peak_rss_mb'))} / {_fmt(r.get('torch_peak_rss_mb'))} | "
            f"{_fmt(r.get('jax_device_peak_mb'))} / {_fmt(r.get('torch_device_peak_mb'))} | "
            f"{r.get('jax_processes', 0)} / {r.get('torch_processes', 0)} |")
    return "\n".join(lines)


def describe_device(results: list[dict]) -> str:
    """``cpu: <model>, N cores`` or the accelerator's name (from the JAX processes)."""
    jr = [r for r in results if r.get("side") == "jax" and r.get("ok")]
    if jr and jr[0].get("platform") not in (None, "cpu"):
        return f"{jr[0]['platform']}: {jr[0].get('device_kind')} x{jr[0].get('device_count_visible')}"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model}, {os.cpu_count()} cores"


# --------------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="CPU quick plan within a time budget (default 840 s)")
    mode.add_argument("--gpu", action="store_true", help="accelerator plan (H100/H200 class)")
    mode.add_argument("--smoke", action="store_true", help="seconds-long harness check (fast preset, tiny batches)")
    ap.add_argument("--json", metavar="OUT", help="write the results here (JSON)")
    ap.add_argument("--markdown", metavar="OUT", help="also write the table here")
    ap.add_argument("--torch-python", help="interpreter with torch + auto4dstem (default: searched, see README)")
    ap.add_argument("--torch-site", help="directory prepended to the torch process's sys.path, holding auto4dstem "
                                         "and m3util (pure Python), e.g. on a GPU image without them")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch side")
    ap.add_argument("--data", help="(N, 200, 200) float32 .npy pattern pool (default: simulated, 128 patterns)")
    ap.add_argument("--rounds", type=int, default=2, help="A B rounds of the compared configurations (default 2)")
    ap.add_argument("--budget-s", type=float, help="wall-time budget; later measurements are skipped to fit "
                                                   "(default: 840 quick, 480 gpu, none otherwise)")
    ap.add_argument("--process-timeout-s", type=float, default=1800.0, help="per-process limit (default 1800)")
    ap.add_argument("--jax-platform", help="force the JAX platform of the JAX processes (e.g. cpu)")
    ap.add_argument("--compilation-cache", help="JAX persistent compilation cache dir for the JAX processes "
                                                "(default: a fresh temp dir in --gpu mode, off otherwise)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        mode, plan, hl, budget = "quick", plan_quick(args.rounds), CPU_HEADLINE, 840.0
    elif args.gpu:
        mode, plan, hl, budget = "gpu", plan_gpu(args.rounds), GPU_HEADLINE, 480.0
    elif args.smoke:
        mode, plan, hl, budget = "smoke", plan_smoke(), {"train": 4, "infer": 4, "fast_train": 4}, None
    else:
        mode, plan, hl, budget = "full", plan_full(args.rounds), CPU_HEADLINE, None
    budget = args.budget_s if args.budget_s is not None else budget
    if args.dry_run:
        for m in plan:
            print(f"round {m.round} {'required' if m.required else '        '} {_label(m)}  {json.dumps(m.spec)}")
        return 0

    t_start = time.perf_counter()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if args.no_torch:
        torch_python, torch_why = None, "--no-torch"
    else:
        torch_python, torch_why = find_torch_python(args.torch_python, args.torch_site)
    log(f"torch side: {torch_why}")

    tmp = tempfile.TemporaryDirectory(prefix="ccstae-bench-")
    data, data_info = args.data, {"source": args.data}
    if data is None:
        data = os.path.join(tmp.name, "pool.npy")
        log("simulating the pattern pool (128 patterns, 200x200, noise 0.25) ...")
        res = run_process([sys.executable, str(HERE / "_jax_side.py"), "--simulate", data], 900,
                          {"JAX_PLATFORMS": "cpu"})
        if not res.get("ok"):
            log(f"simulation failed: {res.get('error')}\n{res.get('stderr_tail', '')}")
            return 2
        data_info = {"source": "ccstae_jax.data.simulate_scan (8x16 scan, 6 grains, noise 0.25, seed 0)",
                     **{k: res[k] for k in ("shape", "simulate_s")}}
    jax_env = {}
    if args.jax_platform:
        jax_env["JAX_PLATFORMS"] = args.jax_platform
    cache = args.compilation_cache or (os.path.join(tmp.name, "jax-cache") if mode == "gpu" else None)
    if cache:
        plan = [dataclasses.replace(m, spec={**m.spec, "compilation_cache": cache}) if m.side == "jax" else m
                for m in plan]

    meta = {
        "mode": mode,
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "started_utc": started,
        "budget_s": budget,
        "torch_available": torch_python is not None,
        "torch_side": torch_why,
        "data": data_info,
        "compilation_cache": cache,
    }

    def assemble(results, skipped, *, partial):
        rows = summarize(results)
        out = {**headline(rows, hl), "device": describe_device(results),
               "torch_device": next((r.get("device_kind") for r in results
                                     if r.get("side") == "torch" and r.get("ok")), None),
               **meta, "wall_s": time.perf_counter() - t_start, "partial": partial, "notes": NOTES,
               "summary": rows, "skipped": skipped, "results": results}
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            tmp_json = Path(str(args.json) + ".tmp")
            tmp_json.write_text(json.dumps(out, indent=1, default=float))
            os.replace(tmp_json, args.json)
        return out, rows

    runner = Runner(sys.executable, torch_python, args.torch_site, data, budget, args.process_timeout_s, jax_env,
                    log=log, start=t_start, on_result=lambda res, sk: assemble(res, sk, partial=True))
    results, skipped = runner.run(plan)
    out, rows = assemble(results, skipped, partial=False)
    table = markdown_table(rows)
    print(f"\n## Throughput ({out['device']}; mode {mode}; {out['wall_s']:.0f} s)\n")
    print(table)
    print(f"\nreference_train_ratio={_fmt(out['reference_train_ratio'])}  "
          f"reference_infer_ratio={_fmt(out['reference_infer_ratio'])}  "
          f"fast_train_patterns_per_s={_fmt(out['fast_train_patterns_per_s'])}  "
          f"fast_train_ratio={_fmt(out['fast_train_ratio'])}  "
          f"torch_train_patterns_per_s={_fmt(out['torch_train_patterns_per_s'])}")
    if any(r.get("devices_are_fake") for r in rows):
        print(f"\nNote: {FAKE_DEVICE_NOTE}.")
    if skipped:
        print("\nSkipped: " + "; ".join(f"{s['measurement']} ({s['reason']})" for s in skipped))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    tmp.cleanup()
    failed = [r for r in results if not r.get("ok")]
    return 1 if failed and not any(r.get("ok") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
