"""The JAX process of the throughput benchmark: one measurement per process.

Run by ``benchmarks/throughput.py`` as ``python benchmarks/_jax_side.py --spec JSON``; prints one line
``BENCH_RESULT {...json...}`` on stdout. Can be run by hand for one number, e.g.::

    .venv/bin/python benchmarks/_jax_side.py --spec '{"kind": "train", "preset": "fast", "batch": 32,
        "data": "/tmp/pool.npy"}'

Spec keys (all optional except ``data`` for train/infer):

* ``kind``: ``"train"`` (forward + loss + backward + Adam 3e-5, one jitted step, state donated), ``"infer"``
  (the network's full forward pass, `_forward_fn`) or ``"scan"`` (map ``scan_positions``
  patterns through that step; data on device, then end to end from host numpy).
* ``preset`` (``"reference"``/``"fast"``), ``batch`` (global batch), ``interpolate`` (reference: the tutorial's
  800x800 bicubic path: ``interpolate=True, warp_mode="bicubic", up_size=800``), ``dtype`` (``"float32"`` or
  ``"bfloat16"`` compute), ``devices`` (number of devices in the data-parallel mesh; 0 = all),
  ``cpu_devices`` (fake host-platform CPU devices to create: not real parallelism, they share the cores),
  ``platform`` (force a JAX platform, e.g. ``"cpu"``), ``warmup``, ``steps`` (per repeat), ``repeats``,
  ``epoch`` (passed to the loss; the default is past the mask schedule's shrink, the steady state),
  ``ring`` (loss/prior ring radii in pixels), ``scan_positions``, ``scan_time_budget_s`` (if mapping the whole
  scan twice would take longer, fewer positions are mapped and the times are scaled to ``scan_positions``; the
  result says ``scan_truncated``), ``model_overrides`` (extra `ModelConfig` fields).

Timing protocol (jax-notes §6): compile separately (``.lower().compile()``, reported as ``compile_s``), warm up,
then ``repeats`` x ``steps`` calls with ``block_until_ready`` once per repeat; batches are placed on the device(s)
before timing and ``jax.transfer_guard("disallow")`` guards the timed loop against hidden host<->device copies;
patterns/s = global batch x steps / elapsed, the median over repeats is reported. Peak RSS is the process's
``ru_maxrss``.
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

DEFAULTS = dict(kind="train", preset="reference", batch=4, interpolate=True, dtype="float32", devices=1,
                cpu_devices=0, platform=None, warmup=1, steps=2, repeats=3, epoch=10, ring=(50.0, 85.0),
                seed=0, scan_positions=65536, scan_time_budget_s=120.0, data=None, compilation_cache=None,
                model_overrides=None)


def _setup_env(spec: dict) -> None:
    """Environment that must be set before JAX is imported."""
    if spec.get("cpu_devices"):
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={int(spec['cpu_devices'])}"
                                   ).strip()
    if spec.get("platform"):
        os.environ["JAX_PLATFORMS"] = str(spec["platform"])
    os.environ.setdefault("TQDM_DISABLE", "1")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _load_pool(path: str, shape_hw: tuple[int, int] | None = None):
    import numpy as np

    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"_jax_side: pattern file {path!r} not found (spec key 'data', an (N, H, W) .npy)")
    pool = np.load(path).astype(np.float32)
    if pool.ndim != 3:
        raise ValueError(f"_jax_side: {path} must hold patterns (N, H, W), got shape {pool.shape}")
    return pool


def _batches_from_pool(pool, batch: int, count: int):
    """``count`` distinct (batch, H, W) host batches cycling through the pool."""
    import numpy as np

    n = pool.shape[0]
    idx = (np.arange(count * batch) * 7919) % n  # a fixed stride walk: batches differ from each other
    return [pool[idx[i * batch:(i + 1) * batch]] for i in range(count)]


def _device_info(jax) -> dict:
    devs = jax.devices()
    return {"platform": devs[0].platform, "device_kind": devs[0].device_kind, "device_count_visible": len(devs),
            "jax_version": jax.__version__, "python": _platform.python_version(),
            "host_cpus": os.cpu_count()}


def _device_peak_mb(devices) -> float | None:
    peaks = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 - CPU devices may not implement it
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"] / 2**20)
    return max(peaks) if peaks else None


def _cost_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        return None
    flops = cost.get("flops")
    return float(flops) if flops is not None and flops >= 0 else None


def _time_repeats(run_steps, *, warmup: int, steps: int, repeats: int, batch: int) -> dict:
    """Calls ``run_steps(n)`` (which must block at its end); returns per-repeat and median throughput."""
    if warmup:
        run_steps(warmup)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_steps(steps)
        times.append(time.perf_counter() - t0)
    per_s = [batch * steps / t for t in times]
    return {"step_s": statistics.median(times) / steps, "patterns_per_s": statistics.median(per_s),
            "repeat_patterns_per_s": per_s, "warmup_steps": warmup, "steps_per_repeat": steps, "repeats": repeats}


def _build(spec: dict, pool):
    import numpy as np
    from ccstae_jax.train.objective import CCSTAETask, configure

    preset = spec["preset"]
    overrides = {"dtype": spec["dtype"]}
    if preset == "reference":
        if spec["interpolate"]:
            overrides.update(interpolate=True, warp_mode="bicubic", up_size=800)
        else:
            overrides.update(interpolate=False, warp_mode="bilinear")
    overrides.update(spec.get("model_overrides") or {})
    sample = pool[: min(len(pool), 256)]
    model_cfg, loss_cfg = configure(np.asarray(sample), preset=preset, ring=tuple(spec["ring"]),
                                    model_overrides=overrides)
    return CCSTAETask(model_cfg, loss_cfg)


def run(spec: dict) -> dict:
    """Runs one measurement described by ``spec`` (see the module docstring) and returns the result dict."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from ccstae_jax.model.networks import count_params
    from ccstae_jax.train.parallel import make_mesh

    if spec.get("compilation_cache"):
        jax.config.update("jax_compilation_cache_dir", spec["compilation_cache"])

    info = _device_info(jax)
    n_dev = int(spec["devices"]) or len(jax.devices())
    if n_dev > len(jax.devices()):
        raise ValueError(f"_jax_side: asked for {n_dev} devices, only {len(jax.devices())} visible")
    devices = jax.devices()[:n_dev]
    batch = int(spec["batch"])
    if batch % n_dev:
        raise ValueError(f"_jax_side: batch {batch} is not a multiple of the device count {n_dev}")
    mesh = make_mesh(devices)
    repl, dsh = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    pool = _load_pool(spec["data"])
    task = _build(spec, pool)
    out = {"side": "jax", **info, "devices_used": n_dev,
           "devices_are_fake": bool(spec.get("cpu_devices")) and info["platform"] == "cpu" and n_dev > 1,
           "model": task.model_cfg.to_dict()}

    t0 = time.perf_counter()
    params = jax.jit(task.init_params, out_shardings=repl)(jax.random.key(spec["seed"]),
                                                           jnp.asarray(pool[:batch]))
    jax.block_until_ready(params)
    out["init_s"] = time.perf_counter() - t0
    out["params"] = count_params(params)

    kind = spec["kind"]
    if kind == "train":
        out.update(_run_train(spec, task, params, pool, mesh, repl, dsh, batch))
    elif kind == "infer":
        out.update(_run_infer(spec, task, params, pool, mesh, repl, dsh, batch))
    elif kind == "scan":
        out.update(_run_scan(spec, task, params, pool, mesh, repl, dsh, batch))
    else:
        raise ValueError(f"_jax_side: unknown kind {kind!r} (train, infer or scan)")
    out["peak_rss_mb"] = _peak_rss_mb()
    out["device_peak_mb"] = _device_peak_mb(devices)
    return out


def _run_train(spec, task, params, pool, mesh, repl, dsh, batch) -> dict:
    import jax
    import numpy as np
    import optax

    tx = optax.adam(3e-5)

    def step(params, opt_state, images, weights, epoch):
        (loss, _), grads = jax.value_and_grad(task.loss, has_aux=True)(params, images, weights, epoch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = jax.jit(tx.init, out_shardings=repl)(params)
    host = _batches_from_pool(pool, batch, 4)
    images = [jax.device_put(b, dsh) for b in host]
    weights = jax.device_put(np.ones((batch,), np.float32), dsh)
    epoch = jax.device_put(np.int32(spec["epoch"]), repl)

    jitted = jax.jit(step, in_shardings=(repl, repl, dsh, dsh, repl), out_shardings=(repl, repl, repl),
                     donate_argnums=(0, 1))
    t0 = time.perf_counter()
    lowered = jitted.lower(params, opt_state, images[0], weights, epoch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()

    state = {"params": params, "opt": opt_state, "loss": None, "i": 0}

    def run_steps(n):
        with jax.transfer_guard("disallow"):
            for _ in range(n):
                state["params"], state["opt"], state["loss"] = compiled(
                    state["params"], state["opt"], images[state["i"] % len(images)], weights, epoch)
                state["i"] += 1
            jax.block_until_ready((state["params"], state["loss"]))

    res = _time_repeats(run_steps, warmup=spec["warmup"], steps=spec["steps"], repeats=spec["repeats"],
                        batch=batch)
    loss = float(state["loss"])
    flops = _cost_flops(compiled)
    return {**res, "lower_s": t1 - t0, "compile_s": t2 - t1, "flops_per_step": flops,
            "achieved_gflops": flops / res["step_s"] / 1e9 if flops else None,
            "final_loss": loss, "loss_finite": bool(np.isfinite(loss)),
            "optimizer": "optax.adam(3e-5)", "epoch_arg": int(spec["epoch"])}


def _forward_fn(task, mesh):
    """The network's full forward pass (encoder, dictionary, both warps: what a PyTorch ``model(x)`` computes),
    jitted with the batch sharded over ``mesh``; returns the model's output dict."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    def forward(params, images):
        return task.model.apply({"params": params}, images)

    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(forward, in_shardings=(repl, data))


def _run_infer(spec, task, params, pool, mesh, repl, dsh, batch) -> dict:
    import jax
    import numpy as np

    predict = _forward_fn(task, mesh)
    host = _batches_from_pool(pool, batch, 4)
    images = [jax.device_put(b, dsh) for b in host]
    t0 = time.perf_counter()
    lowered = predict.lower(params, images[0])
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    state = {"out": None, "i": 0}

    def run_steps(n):
        with jax.transfer_guard("disallow"):
            for _ in range(n):
                state["out"] = compiled(params, images[state["i"] % len(images)])
                state["i"] += 1
            jax.block_until_ready(state["out"])

    res = _time_repeats(run_steps, warmup=spec["warmup"], steps=spec["steps"], repeats=spec["repeats"],
                        batch=batch)
    theta = np.asarray(state["out"]["theta"])
    flops = _cost_flops(compiled)
    return {**res, "lower_s": t1 - t0, "compile_s": t2 - t1, "flops_per_step": flops,
            "achieved_gflops": flops / res["step_s"] / 1e9 if flops else None,
            "outputs_finite": bool(np.isfinite(theta).all())}


def _run_scan(spec, task, params, pool, mesh, repl, dsh, batch) -> dict:
    """Maps ``scan_positions`` patterns: (a) batches already on device, (b) end to end from host numpy."""
    import collections
    import concurrent.futures

    import jax
    import jax.numpy as jnp
    import numpy as np

    n_pos = int(spec["scan_positions"])
    n_batches = -(-n_pos // batch)
    predict = _forward_fn(task, mesh)
    pool_dev = jax.device_put(pool, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    probe = jax.device_put(_batches_from_pool(pool, batch, 1)[0], dsh)
    t0 = time.perf_counter()
    compiled = predict.lower(params, probe).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(params, probe))  # warm-up
    t0 = time.perf_counter()
    for _ in range(3):
        jax.block_until_ready(compiled(params, probe))
    t_batch = (time.perf_counter() - t0) / 3
    requested = n_pos
    # Both passes (on device, from host) must fit the time budget: otherwise map fewer positions and extrapolate.
    budget = float(spec.get("scan_time_budget_s") or 0)
    if budget and 2.5 * n_batches * t_batch > budget:
        n_batches = max(1, int(budget / (2.5 * t_batch)))
        n_pos = n_batches * batch

    # (a) the whole scan resident on device, as fixed-size batches (the last one padded).
    take = jax.jit(lambda p, i: p[(i * 7919) % p.shape[0]], out_shardings=dsh)
    dev_batches = [take(pool_dev, jnp.arange(k * batch, (k + 1) * batch)) for k in range(n_batches)]
    jax.block_until_ready(dev_batches)
    t0 = time.perf_counter()
    with jax.transfer_guard("disallow"):
        outs = [compiled(params, b) for b in dev_batches]
        jax.block_until_ready(outs)
    t_dev_compute = time.perf_counter() - t0
    host_out = jax.device_get([o["theta"] for o in outs])
    t_dev = time.perf_counter() - t0
    del dev_batches, outs, host_out

    # (b) end to end from a host numpy scan: prefetch thread puts batch k+1..k+2 on device while k computes.
    host_scan = np.empty((n_batches * batch,) + pool.shape[1:], np.float32)
    for k in range(0, n_batches * batch, len(pool)):
        host_scan[k:k + len(pool)] = pool[: min(len(pool), n_batches * batch - k)]
    t0 = time.perf_counter()
    results = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as ex:
        def put(k):
            return jax.block_until_ready(jax.device_put(host_scan[k * batch:(k + 1) * batch], dsh))

        queue = collections.deque(ex.submit(put, k) for k in range(min(2, n_batches)))
        for k in range(n_batches):
            images = queue.popleft().result()
            if k + 2 < n_batches:
                queue.append(ex.submit(put, k + 2))
            results.append(compiled(params, images))
            if len(results) > 2:  # bring finished results home as we go (what `ccstae map` does)
                results[-3] = jax.device_get(results[-3])
        results = jax.device_get(results)
    t_host = time.perf_counter() - t0
    scale = requested / n_pos
    return {"scan_positions": requested, "scan_positions_mapped": n_pos, "scan_truncated": n_pos < requested,
            "scan_batches": n_batches, "compile_s": compile_s, "batch_s": t_batch,
            "scan_on_device_compute_s": t_dev_compute * scale, "scan_on_device_s": t_dev * scale,
            "scan_from_host_s": t_host * scale, "patterns_per_s": n_pos / t_dev,
            "scan_from_host_patterns_per_s": n_pos / t_host,
            "outputs_finite": bool(np.isfinite(results[0]["theta"]).all())}


def simulate_pool(path: str, *, rows: int = 8, cols: int = 16, noise: float = 0.25, seed: int = 0) -> dict:
    """Writes ``rows * cols`` simulated 200x200 polycrystal patterns ``(N, 200, 200)`` float32 to ``path`` (.npy).

    Uses `ccstae_jax.data.simulate_scan` (WS2, 6 grains, Auto4DSTEM noise at background weight ``noise``).
    """
    import numpy as np

    from ccstae_jax.data import SimulationConfig, simulate_scan

    t0 = time.perf_counter()
    cfg = SimulationConfig(scan_shape=(rows, cols), n_grains=6, noise_level=noise, seed=seed)
    data, _ = simulate_scan(cfg)
    data = data.reshape((-1,) + data.shape[2:]).astype(np.float32)
    np.save(path, data)
    return {"path": path, "shape": list(data.shape), "noise_level": noise, "seed": seed,
            "simulate_s": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", help="JSON measurement spec (see the module docstring)")
    ap.add_argument("--simulate", metavar="NPY", help="instead: write a simulated (N, 200, 200) pattern pool")
    ap.add_argument("--simulate-shape", default="8,16", help="scan rows,cols of the simulated pool (N = rows*cols)")
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if args.simulate:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        rows, cols = (int(v) for v in args.simulate_shape.split(","))
        print(MARKER + json.dumps({"ok": True, **simulate_pool(args.simulate, rows=rows, cols=cols)}), flush=True)
        return 0
    if not args.spec:
        ap.error("one of --spec or --simulate is required")
    spec = {**DEFAULTS, **json.loads(args.spec)}
    _setup_env(spec)
    t0 = time.perf_counter()
    try:
        result = run(spec)
        result["ok"] = True
    except Exception as e:  # noqa: BLE001 - reported to the parent, which decides
        import traceback

        traceback.print_exc()
        result = {"side": "jax", "ok": False, "error": f"{type(e).__name__}: {e}", "peak_rss_mb": _peak_rss_mb()}
    result["spec"] = spec
    result["process_wall_s"] = time.perf_counter() - t0
    print(MARKER + json.dumps(result, default=float), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
