"""Peak memory of `ccstae simulate` and `ccstae map` does not grow with the scan size, in every file format.

Simulates a small and a large scan of the same pattern size, trains a tiny run on the small one (not measured), maps
both with it, and prints the peak resident set size (VmHWM, from ``os.wait4``) of each command, each in its own
subprocess, and the large/small ratio per command (target: <= 1.3). ``--formats`` also converts each simulated scan
(streamed, as uint16 counts) to Merlin ``.mib`` and ARINA-style ``.h5`` (Bitshuffle-LZ4, needs the ``io`` extra)
with the writers of ``tests/_detector_files.py`` and maps those.

    python benchmarks/memory.py                     # 32x32 vs 96x96 scans, 64-pixel detector (50x50 patterns)
    python benchmarks/memory.py --formats h5 mib arina    # the same for .mib and ARINA files (io extra)
    python benchmarks/memory.py --small 16 --large 48 --refine-steps 0   # quicker

Exit status 1 when a ratio exceeds ``--target``. Runs on the JAX default platform (``JAX_PLATFORMS=cpu`` to force
the CPU); the persistent compilation cache is disabled so every command pays the same compilation.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def convert(h5_path: Path, fmt: str) -> Path:
    """Streams the simulated scan in ``h5_path`` (row by row, counts x 4 as uint16) into a ``.mib`` or ARINA file."""
    import h5py
    import numpy as np

    sys.path.insert(0, str(ROOT / "tests"))
    from _detector_files import write_arina, write_mib

    with h5py.File(h5_path, "r") as f:
        data = f["data"]

        def rows(r0, r1):
            return np.round(data[r0:r1] * 4).astype(np.uint16)

        if fmt == "mib":
            return write_mib(h5_path.with_suffix(".mib"), rows=rows, shape=data.shape)
        return write_arina(h5_path.with_name(h5_path.stem + "_master.h5"), rows=rows, shape=data.shape)


def measured(args: list[str]) -> tuple[float, float]:
    """Runs ``python -m ccstae_jax.cli ARGS``; returns (peak RSS in MiB, wall seconds). Raises on failure."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["TQDM_DISABLE"] = "1"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ccstae_jax.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    stderr_lines = []
    for line in proc.stderr:  # read while it runs, so a full pipe never blocks the child
        stderr_lines.append(line)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"ccstae {' '.join(args)} failed ({proc.returncode}):\n{''.join(stderr_lines)[-3000:]}")
    return usage.ru_maxrss / 1024.0, wall  # Linux: ru_maxrss in KiB


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", type=int, default=32, help="small scan side (positions)")
    p.add_argument("--large", type=int, default=96, help="large scan side (positions)")
    p.add_argument("--detector", type=int, default=64, help="simulated detector size (patterns are 200/256 of it)")
    p.add_argument("--ring", type=float, nargs=2, default=None,
                   help="loss ring radii in pixels (default: 8 22 scaled by detector / 64)")
    p.add_argument("--batch-size", type=int, default=256, help="map batch size")
    p.add_argument("--refine-steps", type=int, default=10, help="map refinement iterations")
    p.add_argument("--target", type=float, default=1.3, help="largest acceptable large/small peak-RSS ratio")
    p.add_argument("--formats", nargs="+", default=["h5"], choices=["h5", "mib", "arina"],
                   help="input formats mapped (mib and arina are converted from the simulated .h5)")
    p.add_argument("--workdir", help="keep the files here (default: a temporary folder, deleted)")
    args = p.parse_args(argv)
    ring = args.ring or [8 * args.detector / 64, 22 * args.detector / 64]

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        sims = {}
        for n in (args.small, args.large):
            sims[n] = work / f"scan{n}.h5"
            rss, wall = measured(["simulate", str(sims[n]), "--scan", str(n), str(n), "--grains", "8", "--noise",
                                  "0.25", "--detector", str(args.detector), "--quiet"])
            rows.append(("simulate", n, rss, wall))
        run = work / "run"
        measured(["train", str(sims[args.small]), "--out", str(run), "--epochs", "1", "--batch-size", "32",
                  "--ring", *map(str, ring), "--quiet"])
        for fmt in args.formats:
            for n in (args.small, args.large):
                data = sims[n] if fmt == "h5" else convert(sims[n], fmt)
                rss, wall = measured(["map", str(run), str(data), "--out", str(work / f"strain{n}_{fmt}.h5"),
                                      "--batch-size", str(args.batch_size), "--refine-steps", str(args.refine_steps),
                                      "--quiet"])
                rows.append((f"map {fmt}", n, rss, wall))

    pattern = round(args.detector * 200 / 256)
    print(f"peak RSS (VmHWM) per command; patterns {pattern}x{pattern}, map batch {args.batch_size}, "
          f"refine steps {args.refine_steps}")
    print(f"{'command':<12}{'scan':>10}{'peak RSS MiB':>15}{'wall s':>9}")
    for cmd, n, rss, wall in rows:
        print(f"{cmd:<12}{f'{n}x{n}':>10}{rss:>15.1f}{wall:>9.1f}")
    ok = True
    for cmd in ("simulate", *(f"map {fmt}" for fmt in args.formats)):
        small = next(r[2] for r in rows if r[0] == cmd and r[1] == args.small)
        large = next(r[2] for r in rows if r[0] == cmd and r[1] == args.large)
        ratio = large / small
        ok &= ratio <= args.target
        print(f"{cmd}: {args.large}x{args.large} / {args.small}x{args.small} peak RSS = {ratio:.3f} "
              f"(target <= {args.target}) {'OK' if ratio <= args.target else 'TOO HIGH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
