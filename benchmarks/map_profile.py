"""Where the time of `ccstae map` goes: each stage of the map timed on its own, compile time excluded.

On a trained run and its scan (or a fresh quick one: 64 x 64 positions at 25 % noise, trained with defaults), with
the map's default settings (`ccstae_jax.mapping.predict.MapConfig`):

* ``read``: reading every pattern from the file, in the map's row batches;
* ``encode``: the network's encoder on every pattern (`make_encode_fn`), i.e. ``ccstae map --refine-steps 0``;
* ``coarse fit``: the encoder plus the coarse fit against blurred bases (the fine fit with 0 iterations, so its
  Fisher information is included);
* ``fine fit``: the whole per-pattern step of the final pass (encoder, coarse fit, fine fit, Fisher information);
* ``bases``: the base estimate from the subset (all its rounds: fitting and accumulating the aligned patterns), run
  once to compile and then timed;
* ``strain maps``: referencing, polar decomposition, errors and validity on the host;
* ``write``: the strain file.

Each jitted stage runs once to compile, then is timed over the whole scan (``block_until_ready``). The shares of
the per-pattern stages are of ``read + fine fit + bases + strain maps + write``, what a map costs after compilation.

    python benchmarks/map_profile.py --json OUT.json                       # quick scan, made here
    python benchmarks/map_profile.py --run RUN --data SCAN.h5 --json OUT.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from ccstae_jax import pipeline
from ccstae_jax.mapping import predict
from ccstae_jax.mapping.reference import strain_maps
from ccstae_jax.report.files import write_strain_h5
from ccstae_jax.train.loop import load_checkpoint


def _ccstae(*args: str) -> None:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    subprocess.run([sys.executable, "-m", "ccstae_jax.cli", *args, "--quiet"], check=True, env=env)


def _over_scan(scan, batch: int, fn) -> float:
    """Seconds to run ``fn(images)`` over every row batch of the scan (the results waited for)."""
    t = time.perf_counter()
    out = None
    for images, _ in predict._row_batches(scan, np.arange(scan.scan_shape[0]), batch):
        out = fn(images)
    jax.block_until_ready(out)
    return time.perf_counter() - t


def profile(run_dir: Path, data_path: Path, out_dir: Path) -> dict:
    task, data, _ = pipeline.load_run(run_dir)
    config = predict.MapConfig()
    res: dict = {"run": str(run_dir), "data": str(data_path), "device": jax.devices()[0].device_kind,
                 "backend": jax.default_backend(), "cpus": os.cpu_count(), "stages_s": {}}
    stages = res["stages_s"]
    with data.open(data_path) as scan:
        n = scan.n_positions
        res["positions"] = n
        batch = predict._batch(config, None)
        state = load_checkpoint(run_dir, task, np.repeat(scan.read(0, 1), 2, 0))
        params = jax.device_put(state.params, jax.devices()[0])
        stages["read"] = _over_scan(scan, batch, lambda x: x)

        encode = predict.make_encode_fn(task)
        first = next(predict._row_batches(scan, np.arange(1), batch))[0]
        jax.block_until_ready(encode(params, first))
        stages["encode"] = _over_scan(scan, batch, lambda x: encode(params, x))

        fit = predict._fit_fn(task, config, None)
        coarse_steps = predict.coarse_steps_for(config, task.model_cfg.geometry)
        coarse_fit = predict.make_fit_fn(task, 0, coarse_steps=coarse_steps)
        no_start = predict._no_start(batch)
        predict.estimate_bases(task, params, scan, config)  # compiles the base estimate
        t = time.perf_counter()
        est = predict.estimate_bases(task, params, scan, config)
        stages["bases"] = time.perf_counter() - t

        tables = est.tables  # the final fit's tables (its bases, noise weight and floor)
        jax.block_until_ready(coarse_fit(params, *tables, first, no_start))
        stages["coarse fit"] = _over_scan(scan, batch, lambda x: coarse_fit(params, *tables, x, no_start))
        jax.block_until_ready(fit(params, *tables, first, no_start))
        stages["fine fit"] = _over_scan(scan, batch, lambda x: fit(params, *tables, x, no_start))

        preds = predict.map_scan(task, params, scan, config, mesh=None)
        strain_maps(preds, scan.scan_shape, scan.pattern_shape, symmetry=task.model_cfg.symmetry)  # compiles
        t = time.perf_counter()
        maps = strain_maps(preds, scan.scan_shape, scan.pattern_shape, symmetry=task.model_cfg.symmetry)
        stages["strain maps"] = time.perf_counter() - t
        for key in ("distortion", "phase_split", "error_scale"):  # not maps (`ccstae_jax.pipeline.map_strain` too)
            maps.pop(key)
        t = time.perf_counter()
        write_strain_h5(out_dir / "profile_strain.h5", maps, attrs={"method": "profile"})
        stages["write"] = time.perf_counter() - t
    total = sum(stages[k] for k in ("read", "fine fit", "bases", "strain maps", "write"))
    res["total_s"] = total
    res["patterns_per_s"] = n / total
    res["share"] = {k: stages[k] / total for k in stages}
    return res


def markdown(res: dict) -> str:
    n = res["positions"]
    lines = [f"{n} patterns on {res['device']} ({res['backend']}, {res['cpus']} CPUs); after compilation "
             f"{res['total_s']:.1f} s, {res['patterns_per_s']:.0f} patterns/s", "",
             "| stage | s | patterns/s | share of the map |", "|---|---|---|---|"]
    for k, v in res["stages_s"].items():
        lines.append(f"| {k} | {v:.2f} | {n / v:.0f} | {100 * res['share'][k]:.0f} % |")
    lines.append("")
    lines.append("`coarse fit` and `encode` are contained in `fine fit`; `bases` reads and fits only the subset.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="a trained run (default: train one on a fresh quick scan)")
    ap.add_argument("--data", help="its scan")
    ap.add_argument("--scan", type=int, default=64, help="positions per side of the fresh scan (default: 64)")
    ap.add_argument("--work", help="working directory (default: a temporary one)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--markdown", help="write the table here")
    a = ap.parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="map_profile_"))
    work.mkdir(parents=True, exist_ok=True)
    if a.run is None:
        data, run = work / "scan.h5", work / "run"
        if not data.exists():
            _ccstae("simulate", str(data), "--scan", str(a.scan), str(a.scan), "--grains",
                    str(max(4, a.scan * a.scan // 100)), "--noise", "0.25")
        if not (run / "model.json").exists():
            _ccstae("train", str(data), "--out", str(run))
    else:
        data, run = Path(a.data), Path(a.run)
    res = profile(run, data, work)
    md = markdown(res)
    print(md)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    if a.markdown:
        Path(a.markdown).write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
