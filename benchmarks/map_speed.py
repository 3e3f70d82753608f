"""Speed of the map users run: `ccstae train` + `ccstae map` with defaults, end to end, beside py4DSTEM.

On one simulated scan (quick: 64 x 64 positions at 25 % noise, 200 x 200 patterns; full: 256 x 256), in one run:

* ``ccstae train`` with defaults (wall time and peak RSS of the command);
* ``ccstae map`` with defaults (the base estimate and the fit of every pattern, file reading and writing): the
  command's wall time and peak RSS, and, in a separate process that maps the file twice, the steady-state
  patterns/s of the second map and the compilation time (first map minus second);
* the same with ``--refine-steps 0`` (the encoder alone);
* the py4DSTEM baseline (``ccstae baseline``; ``$CCSTAE_BASELINE_PYTHON`` names an interpreter that has it) on the
  same file: wall time, patterns/s;
* the MAE of each map against the simulation's labels.

    python benchmarks/map_speed.py --quick --json OUT.json --markdown OUT.md
    python benchmarks/map_speed.py --full --json OUT.json        # a GPU

Every command runs in its own process on the JAX default platform (``JAX_PLATFORMS=cpu`` forces the CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import own_compilation_cache  # noqa: E402
from memory import measured  # noqa: E402  (a sibling script)

from ccstae_jax.compilation_cache import ENV_CACHE  # noqa: E402

_TWICE = """
import json, sys, time
from ccstae_jax import pipeline
run, data, out, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
times = []
for _ in range(2):
    t = time.perf_counter()
    pipeline.map_strain(run, data, out, refine_steps=steps, progress=False)
    times.append(time.perf_counter() - t)
import jax
print(json.dumps({"times": times, "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend()}))
"""


def _map_twice(run: Path, data: Path, out: Path, steps: int) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", _TWICE, str(run), str(data), str(out), str(steps)], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"map (twice) failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mae(strain: Path, data: Path) -> dict:
    from ccstae_jax import pipeline

    table = pipeline.evaluate(strain, data)
    return {k: v["mae"] for k, v in table.items()} | {"valid_fraction": table["strain_xx"]["valid_fraction"]}


def run(scan: int, noise: float, work: Path, *, baseline: bool) -> dict:
    data, run_dir = work / "scan.h5", work / "run"
    n = scan * scan
    res: dict = {"scan": [scan, scan], "noise": noise, "positions": n, "host": platform.node(),
                 "cpus": os.cpu_count()}
    rss, wall = measured(["simulate", str(data), "--scan", str(scan), str(scan), "--grains", str(max(4, n // 100)),
                          "--noise", str(noise), "--quiet"])
    res["simulate_s"] = wall
    rss, wall = measured(["train", str(data), "--out", str(run_dir), "--quiet"])
    res["train_s"], res["train_peak_rss_mb"] = wall, rss
    for name, steps in (("map", None), ("encoder_only", 0)):
        out = work / f"{name}.h5"
        args = ["map", str(run_dir), str(data), "--out", str(out), "--quiet"]
        if steps is not None:
            args += ["--refine-steps", str(steps)]
        rss, wall = measured(args)
        twice = _map_twice(run_dir, data, work / f"{name}_twice.h5", 5 if steps is None else steps)
        first, second = twice["times"]
        res[f"{name}_cli_s"], res[f"{name}_peak_rss_mb"] = wall, rss
        res[f"{name}_patterns_per_s"] = n / second
        res[f"{name}_compile_s"] = max(first - second, 0.0)
        res.setdefault("mae", {})[name] = _mae(out, data)
        res["device"] = twice["device"]
        res["backend"] = twice["backend"]
    res["map_peak_rss_mb"] = res.pop("map_peak_rss_mb")
    res["map_compile_s"] = res.pop("map_compile_s")
    res["encoder_only_patterns_per_s"] = res["encoder_only_patterns_per_s"]
    res["train_plus_map_s"] = res["train_s"] + res["map_cli_s"]
    res["py4dstem_patterns_per_s"] = None
    res["map_vs_py4dstem"] = None
    if baseline:
        out = work / "py4dstem.h5"
        rss, wall = measured(["baseline", str(data), "--out", str(out), "--quiet"])
        res["py4dstem_s"], res["py4dstem_peak_rss_mb"] = wall, rss
        res["py4dstem_patterns_per_s"] = n / wall
        res["map_vs_py4dstem"] = res["map_patterns_per_s"] / res["py4dstem_patterns_per_s"]
        res["mae"]["py4dstem"] = _mae(out, data)
    return res


def markdown(res: dict) -> str:
    def mae(name):
        m = res["mae"].get(name)
        if m is None:
            return "–"
        return (f"{1e3 * m['strain_xx']:.2f} / {1e3 * m['strain_yy']:.2f} / {1e3 * m['shear_xy']:.2f}, "
                f"{m['rotation_deg']:.3f}°, {100 * m['valid_fraction']:.1f} % valid")

    p4d = res.get("py4dstem_patterns_per_s")
    rows = [
        ("`ccstae train` (defaults)", f"{res['train_s']:.1f} s", f"{res['train_peak_rss_mb']:.0f}", "–"),
        ("`ccstae map` (defaults)", f"{res['map_patterns_per_s']:.1f} /s (CLI {res['map_cli_s']:.1f} s, "
         f"compile {res['map_compile_s']:.1f} s)", f"{res['map_peak_rss_mb']:.0f}", mae("map")),
        ("`ccstae map --refine-steps 0`", f"{res['encoder_only_patterns_per_s']:.1f} /s (CLI "
         f"{res['encoder_only_cli_s']:.1f} s)", f"{res['encoder_only_peak_rss_mb']:.0f}", mae("encoder_only")),
        ("py4DSTEM baseline", "–" if p4d is None else f"{p4d:.1f} /s ({res['py4dstem_s']:.1f} s)",
         "–" if p4d is None else f"{res['py4dstem_peak_rss_mb']:.0f}", mae("py4dstem")),
    ]
    lines = [f"{res['scan'][0]} x {res['scan'][1]} positions, {100 * res['noise']:.0f} % noise, device "
             f"{res['device']} ({res['backend']}, {res['cpus']} CPUs); train + map {res['train_plus_map_s']:.1f} s"
             + ("" if res["map_vs_py4dstem"] is None else f"; map / py4DSTEM {res['map_vs_py4dstem']:.1f}x"),
             "", "| step | speed | peak RSS (MiB) | MAE strain_xx / yy / shear (1e-3), rotation |",
             "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="64 x 64 positions (default)")
    size.add_argument("--full", action="store_true", help="256 x 256 positions (a GPU)")
    ap.add_argument("--scan", type=int, help="scan size (square), overriding --quick/--full")
    ap.add_argument("--noise", type=float, default=0.25, help="background weight w (default: %(default)s)")
    ap.add_argument("--no-baseline", action="store_true", help="skip py4DSTEM")
    ap.add_argument("--work", help="working directory (default: a temporary one)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--markdown", help="write the table here")
    a = ap.parse_args(argv)
    scan = a.scan or (256 if a.full else 64)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        # the commands' compilation cache starts empty in the work folder, so every run times its compilations
        with own_compilation_cache(work / "xla-cache"):
            res = run(scan, a.noise, work, baseline=not a.no_baseline)
            res["compilation_cache"] = os.environ[ENV_CACHE]
    table = markdown(res)
    print(table)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    if a.markdown:
        Path(a.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
