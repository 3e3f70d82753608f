"""The PyTorch process of the throughput benchmark: the real Auto4DSTEM 0.2.8 model, one measurement per process.

Run by ``benchmarks/throughput.py`` with the torch interpreter (``--torch-python``) as
``python benchmarks/_torch_side.py --spec JSON``; prints one line ``BENCH_RESULT {...json...}``. Imports only
torch, numpy and auto4dstem (never ``ccstae_jax``), so it runs in a separate virtualenv or on a GPU image.

What is timed (Auto4DSTEM's own code, tutorial settings: 200x200, ``pool_list=[5, 4, 2]``, ``up_list=[2, 4, 5]``,
``conv_size=128``, ``num_base=1``, ``up_size=800``, ``revise_affine=False``, ring mask (50, 85) at the centre):

* ``kind="train"``: one call of ``AcumulatedLoss.__call__(join, [batch], optimizer)`` per step, the package's
  training-epoch function on a one-batch iterator: ``zero_grad``, the joint model's forward, its loss, backward and
  ``Adam(lr=3e-5).step()``. Loss settings are ``TrainClass``'s defaults (reg 1e-6, scale 10, shear 1, penalties
  0.03, weighted reverse MSE with coefficient 5, soft/hard thresholds 1.5/3, ``con_div=15``). With
  ``interpolate=True`` this is the tutorial's stage 2 (dynamic mask loss, a pretrained rotation per pattern fed as
  ``rotate_value``); with ``interpolate=False`` it is stage 1 (fixed-mask weighted MSE, ReLU rotation).
* ``kind="infer"``: ``join(x, rotate_value)`` under ``torch.no_grad()`` and the affine matrices copied to the host,
  as ``TrainClass.predict`` does per batch.

Spec keys: ``kind``, ``batch``, ``interpolate``, ``device`` (``"cpu"``/``"cuda"``; default cuda when available),
``threads`` (CPU threads; default torch's), ``warmup``, ``steps``, ``repeats``, ``data`` (an (N, H, W) .npy),
``torch_site`` (a directory prepended to ``sys.path`` holding ``auto4dstem`` and ``m3util``), ``seed``,
``ring``. On CUDA, ``torch.cuda.synchronize()`` closes every timed span; TF32 settings are torch's defaults and are
reported.
"""
from __future__ import annotations

import argparse
import json
import os
import platform as _platform
import resource
import statistics
import sys
import time

MARKER = "BENCH_RESULT "
DEFAULTS = dict(kind="train", batch=4, interpolate=True, device=None, threads=None, warmup=1, steps=2, repeats=3,
                data=None, torch_site=None, seed=0, ring=(50.0, 85.0))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def ring_mask(shape, inner: float, outer: float):
    """Boolean ring ``inner < r <= outer`` about the pattern centre ``(H // 2, W // 2)`` (Auto4DSTEM's mask_ring)."""
    import numpy as np

    h, w = shape
    r = np.hypot(*np.mgrid[:h, :w] - np.array([h // 2, w // 2])[:, None, None])
    return (r > inner) & (r <= outer)


def run(spec: dict) -> dict:
    if spec.get("torch_site"):
        site = os.path.abspath(spec["torch_site"])
        if not os.path.isdir(os.path.join(site, "auto4dstem")):
            raise FileNotFoundError(f"_torch_side: --torch-site {site} holds no auto4dstem package")
        sys.path.insert(0, site)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import numpy as np
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    from auto4dstem.nn.CC_ST_AE import make_model_fn
    from auto4dstem.nn.Loss_Function import AcumulatedLoss
    import auto4dstem

    dev_name = spec["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev_name)
    torch.manual_seed(spec["seed"])
    out = {"side": "torch", "torch_version": torch.__version__, "python": _platform.python_version(),
           "auto4dstem_file": auto4dstem.__file__, "platform": device.type, "threads": torch.get_num_threads(),
           "host_cpus": os.cpu_count()}
    if device.type == "cuda":
        out["device_kind"] = torch.cuda.get_device_name(0)
        out["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
        out["tf32_cudnn"] = bool(torch.backends.cudnn.allow_tf32)
    else:
        out["device_kind"] = _platform.processor() or _platform.machine()

    if not spec.get("data") or not os.path.exists(spec["data"]):
        raise FileNotFoundError(f"_torch_side: pattern file {spec.get('data')!r} not found (spec key 'data')")
    pool = np.load(spec["data"]).astype(np.float32)
    if pool.ndim != 3 or pool.shape[1:] != (200, 200):
        raise ValueError(f"_torch_side: {spec['data']} must hold (N, 200, 200) patterns, got {pool.shape}")
    batch, interp = int(spec["batch"]), bool(spec["interpolate"])
    mask = torch.tensor(ring_mask(pool.shape[1:], *spec["ring"]))

    t0 = time.perf_counter()
    encoder, decoder, join, optimizer = make_model_fn(
        device, learning_rate=3e-5, en_original_step_size=[200, 200], de_original_step_size=[5, 5],
        pool_list=[5, 4, 2], up_list=[2, 4, 5], conv_size=128, num_base=1, up_size=800, fixed_mask=[mask],
        interpolate=interp, revise_affine=False)
    loss_fn = AcumulatedLoss(
        device, reg_coef=1e-6, scale_coef=10, shear_coef=1, norm_order=1, scale_penalty=0.03, shear_penalty=0.03,
        mask_list=[mask], weighted_mse=True, reverse_mse=True, weight_coef=5, interpolate=interp, batch_para=1,
        cycle_consistent=True, dynamic_mask_region=interp, soft_threshold=1.5, hard_threshold=3, con_div=15)
    out["build_s"] = time.perf_counter() - t0
    out["params"] = int(sum(p.numel() for p in join.parameters()))
    out["model"] = {"interpolate": interp, "up_size": 800, "conv_size": 128, "pool_list": [5, 4, 2],
                    "num_base": 1, "revise_affine": False, "dynamic_mask_region": interp,
                    "loss": "AcumulatedLoss (TrainClass defaults)"}

    rng = np.random.default_rng(spec["seed"])
    idx = (np.arange(4 * batch) * 7919) % len(pool)
    xs = [torch.from_numpy(np.ascontiguousarray(pool[idx[i * batch:(i + 1) * batch]])).to(device)
          for i in range(4)]
    # Stage 2 feeds a pretrained rotation (radians, modulo pi/3) per pattern; stage 1 feeds none.
    ys = [torch.from_numpy(rng.uniform(0, np.pi / 3, (batch, 1)).astype(np.float32)).to(device) if interp else None
          for _ in range(4)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    state = {"i": 0, "loss": None, "theta": None}

    if spec["kind"] == "train":
        def run_steps(n):
            for _ in range(n):
                k = state["i"] % 4
                item = [xs[k], ys[k]] if interp else xs[k]
                state["loss"] = loss_fn(join, [item], optimizer)["train_loss"]
                state["i"] += 1
            sync()
    elif spec["kind"] == "infer":
        join.eval()

        def run_steps(n):
            with torch.no_grad():
                for _ in range(n):
                    k = state["i"] % 4
                    res = join(xs[k], ys[k])
                    # predict() keeps scale_shear (theta_1) and rotation (theta_2) on the host
                    state["theta"] = (res[4].cpu().numpy(), res[5].cpu().numpy())
                    state["i"] += 1
            sync()
    else:
        raise ValueError(f"_torch_side: unknown kind {spec['kind']!r} (train or infer)")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if spec["warmup"]:
        t0 = time.perf_counter()
        run_steps(spec["warmup"])
        out["first_steps_s"] = time.perf_counter() - t0
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        run_steps(spec["steps"])
        times.append(time.perf_counter() - t0)
    per_s = [batch * spec["steps"] / t for t in times]
    out.update(step_s=statistics.median(times) / spec["steps"], patterns_per_s=statistics.median(per_s),
               repeat_patterns_per_s=per_s, warmup_steps=spec["warmup"], steps_per_repeat=spec["steps"],
               repeats=spec["repeats"], compile_s=0.0)
    if state["loss"] is not None:
        out["final_loss"] = float(state["loss"])
        out["loss_finite"] = bool(np.isfinite(out["final_loss"]))
    if state["theta"] is not None:
        out["outputs_finite"] = bool(all(np.isfinite(t).all() for t in state["theta"]))
    out["peak_rss_mb"] = _peak_rss_mb()
    out["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", required=True, help="JSON measurement spec (see the module docstring)")
    args = ap.parse_args(argv)
    spec = {**DEFAULTS, **json.loads(args.spec)}
    t0 = time.perf_counter()
    try:
        result = run(spec)
        result["ok"] = True
    except Exception as e:  # noqa: BLE001 - reported to the parent
        import traceback

        traceback.print_exc()
        result = {"side": "torch", "ok": False, "error": f"{type(e).__name__}: {e}", "peak_rss_mb": _peak_rss_mb()}
    result["spec"] = spec
    result["process_wall_s"] = time.perf_counter() - t0
    print(MARKER + json.dumps(result, default=float), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
