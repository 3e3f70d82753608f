"""Throughput of `ccstae_jax.ops.warp.affine_warp` (forward and forward+backward), with a baseline beside it.

Usage::

    .venv/bin/python benchmarks/warp.py                 # B=64, 200x200x1, bilinear + bicubic, ~1 min on 2 CPU cores
    .venv/bin/python benchmarks/warp.py --batch 256 --size 128 --repeats 7 --json out.json
    python benchmarks/warp.py --torch                   # also time torch F.affine_grid + F.grid_sample (if installed)

What is timed (per batch of ``B`` images ``(B, S, S, 1)`` float32, random non-identity ``theta``: rotation up to
0.3 rad, scale 0.9-1.1, shear, shift; ``align_corners=False``, ``padding_mode='zeros'``):

* ``fwd``: ``affine_warp(images, theta)``;
* ``fwd+bwd``: value and gradient of ``sum(affine_warp(images, theta) * w)`` with respect to images and theta;
* ``fwd+bwd theta``: the same with the images under ``stop_gradient`` (warping data: only theta needs a gradient).

Baseline in the same run (bilinear only, it has no bicubic): ``jax.scipy.ndimage.map_coordinates(order=1,
mode='constant')`` vmapped over the batch, fed the same pixel coordinates (grid built by `affine_grid`, so the
ratio compares the samplers). Protocol: each function is compiled ahead of time (``jax.jit(f).lower(...).compile()``,
compile seconds printed), warmed up, then ``repeats`` x ``iters`` calls with ``block_until_ready`` after each
repeat; the median over repeats is reported as ms per batch and images/s; ratio = ours / baseline images/s.

``--torch`` adds PyTorch's ``F.grid_sample(x, F.affine_grid(theta, size))`` (NCHW, same data and modes, TF32 off,
on CUDA when available, else the CPU) timed the same way with ``torch.cuda.synchronize()`` closing each repeat;
its "compile" column is the first (warm-up) call.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.ndimage import map_coordinates

from ccstae_jax.ops import warp


def _theta(batch: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ang = rng.uniform(-0.3, 0.3, batch)
    sx, sy = rng.uniform(0.9, 1.1, (2, batch))
    sh = rng.uniform(-0.05, 0.05, batch)
    rot = np.stack([np.stack([np.cos(ang), -np.sin(ang)], -1), np.stack([np.sin(ang), np.cos(ang)], -1)], -2)
    lin = np.stack([np.stack([sx, sh], -1), np.stack([sh, sy], -1)], -2) @ rot
    return np.concatenate([lin, rng.uniform(-0.1, 0.1, (batch, 2, 1))], -1).astype(np.float32)


def _map_coordinates_warp(images: jax.Array, theta: jax.Array) -> jax.Array:
    """Baseline: bilinear, zero padding per tap, via map_coordinates on the same (align_corners=False) grid."""
    _, h, w, _ = images.shape
    grid = warp.affine_grid(theta, (h, w))
    cols = ((grid[..., 0] + 1) * w - 1) / 2
    rows = ((grid[..., 1] + 1) * h - 1) / 2
    one = lambda im, r, c: map_coordinates(im[..., 0], [r, c], order=1, mode="constant")[..., None]  # noqa: E731
    return jax.vmap(one)(images, rows, cols)


def _programs(warp_fn, weights):
    def fwd(images, theta):
        return warp_fn(images, theta)

    def loss(images, theta):
        return jnp.sum(warp_fn(images, theta) * weights)

    def fwd_bwd(images, theta):
        return jax.value_and_grad(loss, argnums=(0, 1))(images, theta)

    def fwd_bwd_theta(images, theta):
        return jax.value_and_grad(lambda th: loss(jax.lax.stop_gradient(images), th))(theta)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd, "fwd+bwd theta": fwd_bwd_theta}


def _time(fn, args, *, warmup: int, repeats: int, iters: int) -> tuple[float, float]:
    """(compile seconds, median seconds per call)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    per_call = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = compiled(*args)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t0) / iters)
    return compile_s, statistics.median(per_call)


def _torch_rows(images: np.ndarray, theta: np.ndarray, weights: np.ndarray, modes, *, warmup, repeats, iters):
    import torch
    import torch.nn.functional as F

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    x = torch.tensor(images.transpose(0, 3, 1, 2).copy(), device=dev)
    th = torch.tensor(theta, device=dev)
    w = torch.tensor(weights.transpose(0, 3, 1, 2).copy(), device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def program(mode, kind):
        def run():
            xi = x.detach().requires_grad_(kind == "fwd+bwd")
            ti = th.detach().requires_grad_(kind != "fwd")
            with torch.set_grad_enabled(kind != "fwd"):
                out = F.grid_sample(xi, F.affine_grid(ti, list(xi.shape), align_corners=False), mode=mode,
                                    padding_mode="zeros", align_corners=False)
                if kind != "fwd":
                    (out * w).sum().backward()
            return out
        return run

    rows = []
    for mode in modes:
        for kind in ("fwd", "fwd+bwd", "fwd+bwd theta"):
            run = program(mode, kind)
            t0 = time.perf_counter()
            run()
            sync()
            first = time.perf_counter() - t0
            for _ in range(warmup):
                run()
            sync()
            per_call = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(iters):
                    run()
                sync()
                per_call.append((time.perf_counter() - t0) / iters)
            rows.append((f"torch {torch.__version__} {mode}", mode, kind, first, statistics.median(per_call), name))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=200, help="square image size S (images are S x S x 1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=1, help="calls per timed repeat")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--modes", default="bilinear,bicubic")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--torch", action="store_true", help="also time PyTorch's affine_grid + grid_sample")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    device = jax.devices()[0]
    images = jax.device_put(rng.normal(size=(args.batch, args.size, args.size, 1)).astype(np.float32), device)
    theta = jax.device_put(_theta(args.batch, 1), device)
    weights = jax.device_put(rng.normal(size=images.shape).astype(np.float32), device)
    print(f"jax {jax.__version__}, device {device.device_kind} ({device.platform}) x{jax.device_count()}, "
          f"batch {args.batch} x {args.size}x{args.size}x1 float32, median of {args.repeats} x {args.iters} calls")

    candidates = [(f"affine_warp {m}", m, lambda im, th, m=m: warp.affine_warp(im, th, mode=m))
                  for m in args.modes.split(",")]
    if "bilinear" in args.modes.split(","):
        candidates.append(("map_coordinates", "bilinear", _map_coordinates_warp))

    results = []
    for name, mode, warp_fn in candidates:
        for kind, fn in _programs(warp_fn, weights).items():
            compile_s, sec = _time(fn, (images, theta), warmup=args.warmup, repeats=args.repeats, iters=args.iters)
            row = dict(impl=name, mode=mode, kind=kind, compile_s=compile_s, ms=sec * 1e3,
                       images_per_s=args.batch / sec, device=device.device_kind, batch=args.batch, size=args.size)
            results.append(row)
            print(f"{name:22s} {kind:14s} compile {compile_s:6.2f} s   {sec * 1e3:9.2f} ms/batch   "
                  f"{args.batch / sec:10.1f} images/s", flush=True)

    if args.torch:
        for name, mode, kind, first, sec, dev_name in _torch_rows(
            np.asarray(images), np.asarray(theta), np.asarray(weights), args.modes.split(","),
            warmup=args.warmup, repeats=args.repeats, iters=args.iters,
        ):
            results.append(dict(impl=name, mode=mode, kind=kind, compile_s=first, ms=sec * 1e3,
                                images_per_s=args.batch / sec, device=dev_name, batch=args.batch, size=args.size))
            print(f"{name:22s} {kind:14s} first   {first:6.2f} s   {sec * 1e3:9.2f} ms/batch   "
                  f"{args.batch / sec:10.1f} images/s   ({dev_name})", flush=True)
        ours = {(r["mode"], r["kind"]): r for r in results if r["impl"].startswith("affine_warp")}
        for r in results:
            if r["impl"].startswith("torch") and (r["mode"], r["kind"]) in ours:
                ratio = ours[(r["mode"], r["kind"])]["images_per_s"] / r["images_per_s"]
                ours[(r["mode"], r["kind"])]["ratio_vs_torch"] = ratio
                print(f"ratio affine_warp / torch, {r['mode']:8s} {r['kind']:14s}: {ratio:.2f}x")

    base = {r["kind"]: r for r in results if r["impl"] == "map_coordinates"}
    for r in results:
        if r["mode"] == "bilinear" and r["impl"].startswith("affine_warp") and r["kind"] in base:
            r["ratio_vs_map_coordinates"] = r["images_per_s"] / base[r["kind"]]["images_per_s"]
            print(f"ratio affine_warp bilinear / map_coordinates, {r['kind']:14s}: "
                  f"{r['ratio_vs_map_coordinates']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(jax=jax.__version__, device=device.device_kind, results=results), f, indent=1)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
