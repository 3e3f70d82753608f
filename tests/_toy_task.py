"""A tiny Task (linear autoencoder on 8x8 images) and data source for the training-engine tests.

Also a script: ``python tests/_toy_task.py RUN_DIR [options]`` trains the toy task with ``fit`` on 4 fake CPU
devices (used by the kill/resume and SIGINT tests, which need a separate process).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
from typing import Iterator, NamedTuple

import numpy as np

try:  # the project's batch type, once ccstae_jax.data.readers exists
    from ccstae_jax.data.readers import Batch  # type: ignore[attr-defined]
except Exception:  # noqa: BLE001 - any import problem: use the local equivalent
    class Batch(NamedTuple):  # type: ignore[no-redef]
        images: np.ndarray   # (B, H, W) float32
        weights: np.ndarray  # (B,) float32, 0 = padding
        index: np.ndarray    # (B,) int64, -1 = padding


@dataclasses.dataclass(frozen=True)
class ToyTask:
    """Linear autoencoder x -> x @ enc @ dec + bias on flattened (H, W) images, weighted MSE + epoch-dependent L2."""

    latent: int = 4
    reg: float = 1e-3

    def init_params(self, key, images):
        import jax
        import jax.numpy as jnp
        d = images.shape[1] * images.shape[2]
        k1, k2 = jax.random.split(key)
        return {"enc": 0.3 * jax.random.normal(k1, (d, self.latent), jnp.float32),
                "dec": 0.3 * jax.random.normal(k2, (self.latent, d), jnp.float32),
                "bias": jnp.zeros((d,), jnp.float32)}

    def loss(self, params, images, weights, epoch):
        import jax.numpy as jnp
        x = images.reshape(images.shape[0], -1)
        xh = (x @ params["enc"]) @ params["dec"] + params["bias"]
        per_sample = jnp.mean((xh - x) ** 2, axis=1)
        mse = jnp.sum(weights * per_sample) / jnp.maximum(jnp.sum(weights), 1e-12)
        reg = self.reg * (epoch + 1).astype(jnp.float32) * jnp.mean(params["enc"] ** 2)
        return mse + reg, {"mse": mse, "reg": reg}

    def to_dict(self):
        return dataclasses.asdict(self)


def make_images(n: int = 40, size: int = 8, *, seed: int = 0) -> np.ndarray:
    """(n, size, size) float32: Gaussian spots at random positions plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    centres = rng.uniform(2, size - 2, size=(n, 2)).astype(np.float32)
    spots = np.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / 2.0)
    return (spots + 0.05 * rng.standard_normal((n, size, size))).astype(np.float32)


def batches(images: np.ndarray, batch_size: int, *, seed: int, epoch: int, pad: bool = True,
            nan_at: frozenset[tuple[int, int]] = frozenset(), sleep: float = 0.0) -> Iterator[Batch]:
    """Shuffled batches whose order depends only on (seed, epoch); the last one padded to ``batch_size``.

    ``nan_at``: (epoch, batch number) pairs whose first image is set to NaN.
    """
    n = images.shape[0]
    order = np.random.default_rng([seed, epoch]).permutation(n)
    for b, start in enumerate(range(0, n, batch_size)):
        idx = order[start:start + batch_size]
        imgs, w = images[idx].copy(), np.ones(len(idx), np.float32)
        if (epoch, b) in nan_at:
            imgs[0] = np.nan
        if pad and len(idx) < batch_size:
            extra = batch_size - len(idx)
            imgs = np.concatenate([imgs, np.zeros((extra,) + imgs.shape[1:], np.float32)])
            w = np.concatenate([w, np.zeros(extra, np.float32)])
            idx = np.concatenate([idx, -np.ones(extra, np.int64)])
        if sleep:
            time.sleep(sleep)
        yield _make_batch(imgs, w, idx.astype(np.int64))


def _make_batch(images: np.ndarray, weights: np.ndarray, index: np.ndarray) -> Batch:
    return Batch(images=images, weights=weights, index=index)


def num_batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


# ---------------------------------------------------------------------------------------------------------------
# script mode (subprocess tests)
# ---------------------------------------------------------------------------------------------------------------
SCRIPT_CONFIG = dict(epochs=3, batch_size=12, seed=3, learning_rate=3e-2, schedule="bold_driver",
                     checkpoint_every_steps=2, keep_checkpoints=2, log_every=1)
N_IMAGES = 40


def _patch_kill_in_save(step: int) -> None:
    """SIGKILL this process while checkpoint ``step`` is being saved: after its arrays are written, before the
    step directory is committed (renamed from its temporary name)."""
    from orbax.checkpoint._src.path import atomicity

    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self):
        final = getattr(self, "_final_path", None)
        if final is not None and final.name == "state" and final.parent.name.startswith(f"{step}.orbax-"):
            os.kill(os.getpid(), signal.SIGKILL)
        return await original(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds per batch (to be killed mid-run)")
    p.add_argument("--kill-in-save", type=int, default=0, help="SIGKILL while saving the checkpoint of this step")
    p.add_argument("--out", default="", help="write the final params here (.npz)")
    p.add_argument("--ready-file", default="", help="touch this file once training has started")
    p.add_argument("--coordinator", default="", help="host:port; with --num-processes/--process-id: multi-process")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--epochs", type=int, default=SCRIPT_CONFIG["epochs"])
    args = p.parse_args(argv)

    import jax
    jax.config.update("jax_num_cpu_devices", args.devices)
    jax.config.update("jax_platforms", "cpu")
    cache = os.environ.get("CCSTAE_TEST_JAX_CACHE")
    if cache:  # the test runs start this script several times: compile once
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    from ccstae_jax.train.parallel import initialize_distributed
    from ccstae_jax.train.config import TrainConfig
    from ccstae_jax.train.loop import fit

    if args.coordinator:
        initialize_distributed(True, cpu_collectives="gloo", coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id,
                               initialization_timeout=60)

    if args.kill_in_save:
        _patch_kill_in_save(args.kill_in_save)
    images = make_images(N_IMAGES)
    cfg = TrainConfig(**{**SCRIPT_CONFIG, "epochs": args.epochs})
    task = ToyTask()
    n_proc, pid = args.num_processes, args.process_id
    local = cfg.batch_size // n_proc

    def batches_fn(epoch):
        if args.ready_file:
            open(args.ready_file, "w").close()
        for b in batches(images, cfg.batch_size, seed=cfg.seed, epoch=epoch, sleep=args.sleep):
            part = slice(pid * local, (pid + 1) * local)  # this process's share of the global batch
            yield b._replace(images=b.images[part], weights=b.weights[part], index=b.index[part])

    try:
        result = fit(task, batches_fn, cfg, args.run_dir, steps_per_epoch=num_batches(N_IMAGES, cfg.batch_size),
                     sample_images=images[:4], task_config=task.to_dict(), progress=False)
    except KeyboardInterrupt:
        return 130
    if args.out and pid == 0:
        flat = {"/".join(str(k) for k in path): np.asarray(v)
                for path, v in jax.tree_util.tree_flatten_with_path(jax.device_get(result.params))[0]}
        np.savez(args.out, **flat)
    print(f"done step={int(result.state.step)} resumed_from={result.resumed_from_step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
