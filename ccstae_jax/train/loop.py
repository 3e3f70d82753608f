"""The resumable training loop: ``fit`` and ``load_checkpoint``.

:func:`fit` builds (or reuses) the optimizer and the jitted step (:mod:`ccstae_jax.train.config`,
:mod:`ccstae_jax.train.step`), feeds it batches, writes the run directory's files (:mod:`ccstae_jax.train.rundir`)
and checkpoints with Orbax (:mod:`ccstae_jax.train.checkpoint`). It resumes automatically from the newest checkpoint
in its run directory, mid-epoch included; a resumed run ends with the same parameters as an uninterrupted one (same
seed, same devices), provided ``batches_fn(epoch)`` yields the same batches in the same order every time it is
called for that epoch. Every batch is padded to the same shape (padding rows have weight 0), so a run compiles the
step exactly once. The first Ctrl-C saves a checkpoint after the current step and stops.

Step numbering: ``state.step`` counts the batches consumed so far (skipped non-finite ones included). Step ``n``
(1-based) is the ``n``-th update; it belongs to epoch ``(n - 1) // steps_per_epoch`` (0-based). Checkpoints and the
metrics file use the same numbers.

Example (``scan`` a :class:`ccstae_jax.data.readers` scan; ``batch_size`` in the config is the global batch, the
reader is given each process's share)::

    cfg = TrainConfig(epochs=20, batch_size=32, learning_rate=3e-5, schedule="bold_driver")
    per_process, n_proc = cfg.batch_size // jax.process_count(), jax.process_count()
    result = fit(task,
                 lambda epoch: scan.batches(per_process, shuffle=True, seed=cfg.seed, epoch=epoch,
                                            process_index=jax.process_index(), process_count=n_proc),
                 cfg, "runs/a", steps_per_epoch=scan.num_batches(per_process, process_count=n_proc),
                 sample_images=scan.read(0, 8), task_config=model_config.to_dict())
    params = result.params

The names that lived here before the split into ``config``, ``step`` and ``rundir`` (``TrainConfig``,
``TrainState``, ``make_train_step``, ...) are still importable from this module.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm.auto import tqdm

from ccstae_jax.train.checkpoint import Checkpointer, CheckpointError
from ccstae_jax.train.config import (TrainConfig, bold_driver_update, get_learning_rate, make_optimizer,
                                     set_learning_rate)
from ccstae_jax.train.parallel import is_main_process, make_mesh, pad_batch_to, replicated_sharding, shard_batch
from ccstae_jax.train.rundir import CHECKPOINT_DIR, CONFIG_FILE, METRICS_FILE, _check_run_config, _MetricsLog
from ccstae_jax.train.step import (NonFiniteLossError, PyTree, Task, TrainState, _check_images, _create_state_fn,
                                   abstract_train_state, compilation_count, make_train_step)
# Defined here before the split into config, step and rundir: still importable from this module.
from ccstae_jax.train.config import (COMPUTE_DTYPES, NONFINITE_MODES, OPTIMIZERS, SCHEDULES,  # noqa: F401
                                     make_schedule)
from ccstae_jax.train.rundir import RunConfigMismatchError  # noqa: F401
from ccstae_jax.train.step import init_train_state  # noqa: F401

__all__ = [
    "FitResult",
    "fit",
    "load_checkpoint",
    # re-exported from config, step and rundir, as before the split
    "Task",
    "TrainConfig",
    "TrainState",
    "NonFiniteLossError",
    "RunConfigMismatchError",
    "make_schedule",
    "make_optimizer",
    "bold_driver_update",
    "get_learning_rate",
    "set_learning_rate",
    "init_train_state",
    "abstract_train_state",
    "make_train_step",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------------------------------
class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
      state: the final :class:`TrainState` (replicated on the mesh).
      history: one dict per finished epoch (this run and, when resumed, the earlier ones): ``epoch`` (0-based),
        ``step``, ``loss`` and each loss term (epoch means over finite steps), ``learning_rate`` (used during the
        epoch), ``best_loss``, ``nonfinite_count`` (cumulative), ``wall_time`` (unix seconds),
        ``patterns_per_s``.
      resumed_from_step: the checkpoint step this run started from, None for a fresh run.
      compilations: number of compilations of the train step during this call: 1, or 0 when an identical
        earlier ``fit`` in this process had compiled it already (-1 if JAX does not say).
      best_step: step of the checkpoint with the lowest epoch mean loss, None if none.
    """

    state: TrainState
    history: list[dict[str, Any]]
    resumed_from_step: int | None
    compilations: int
    best_step: int | None

    @property
    def params(self) -> PyTree:
        return self.state.params


def _progress_enabled(progress: bool) -> bool:
    if not progress or not is_main_process():
        return False
    if os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    return sys.stderr.isatty()


def fit(task: Task, batches_fn: Callable[[int], Iterable[Any]], config: TrainConfig, run_dir: str | os.PathLike,
        *, steps_per_epoch: int, sample_images: Any, task_config: Mapping[str, Any] | None = None,
        progress: bool = True, mesh: Mesh | None = None) -> FitResult:
    """Train ``task`` for ``config.epochs`` epochs, checkpointing into ``run_dir`` and resuming from it.

    Args:
      task: the model (see :class:`Task`).
      batches_fn: ``epoch -> iterable of batches`` (NamedTuples with ``images`` (b, H, W) float32, ``weights``
        (b,) float32, ``index`` (b,) int, numpy; e.g. ``Scan.batches``). Must yield exactly ``steps_per_epoch``
        batches with ``b <= batch_size / process_count``, in an order that depends only on ``epoch`` (and fixed
        seeds): on resume the first batches of the interrupted epoch are drawn again and skipped. Short batches
        are padded (weight 0), so every step has the same shape.
      config: training hyper-parameters.
      run_dir: run directory: ``config.json`` (train + task config), ``metrics.jsonl``, ``checkpoints/``.
      steps_per_epoch: batches per epoch (for schedules and for locating the resume point).
      sample_images: (B, H, W) float32 patterns for ``task.init_params`` (shapes only matter on resume).
      task_config: the model config as a JSON-serialisable dict; resuming with a different one is refused.
      progress: report progress on process 0: a tqdm bar per epoch on a terminal (unless ``TQDM_DISABLE`` is set),
        else one line per epoch on stdout (``epoch 3/20 (step 60): loss 0.0123, 4.1 s``) for batch-job logs.
      mesh: data-parallel mesh; default all devices (:func:`ccstae_jax.train.parallel.make_mesh`).

    Returns:
      :class:`FitResult`.

    Raises:
      NonFiniteLossError: ``on_nonfinite='stop'`` and a loss/gradient became NaN or Inf (the checkpoints saved
        before are kept; no checkpoint is written after the bad step).
      RunConfigMismatchError: ``run_dir`` holds a run with another task config, training config or
        ``steps_per_epoch``.
      CheckpointError: the newest checkpoint cannot be read.
      KeyboardInterrupt: after Ctrl-C, once the checkpoint of the current step is saved.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"fit: steps_per_epoch must be >= 1, got {steps_per_epoch}")
    _check_images(sample_images, "fit: sample_images")
    mesh = make_mesh() if mesh is None else mesh
    run_dir = Path(run_dir).absolute()
    main = is_main_process()
    n_proc = jax.process_count()
    n_local = len(mesh.local_devices)
    if config.batch_size % n_proc:
        raise ValueError(f"fit: batch_size {config.batch_size} is not divisible by the process count {n_proc}")
    local_batch = -(-(config.batch_size // n_proc) // n_local) * n_local
    block_every_step = n_proc > 1 and jax.default_backend() == "cpu"  # multi-process CPU collectives can hang

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(run_dir / CHECKPOINT_DIR, keep_last=config.keep_checkpoints, keep_best=config.keep_best,
                        async_save=config.async_checkpointing)
    try:
        latest = ckpt.latest_step()
        _check_run_config(run_dir, config, task_config, steps_per_epoch, has_checkpoint=latest is not None)
        engine = _engine(task, config, steps_per_epoch, mesh)
        compiled_before = compilation_count(engine.step)
        if latest is None:
            images = jnp.asarray(np.asarray(sample_images, np.float32))
            state = engine.create(jax.random.key(config.seed), images)
            start_step = 0
        else:
            abstract = abstract_train_state(task, engine.tx, sample_images, mesh=mesh)
            try:
                state, _ = ckpt.restore(abstract, latest)
            except CheckpointError as e:
                raise CheckpointError(f"{e}\n(run directory: {run_dir})") from e
            start_step = int(state.step)
            if start_step != latest:
                raise CheckpointError(f"checkpoint {ckpt.directory / str(latest)} holds step {start_step}; "
                                      "the checkpoint directory is inconsistent")
            if main:
                logger.info("resuming %s from step %d (epoch %d)", run_dir, start_step, start_step // steps_per_epoch)
        step_fn = engine.step
        log = _MetricsLog(run_dir / METRICS_FILE, keep_until_step=start_step, enabled=main)
        loop = _Loop(config=config, ckpt=ckpt, log=log, run_dir=run_dir, steps_per_epoch=steps_per_epoch,
                     step_fn=step_fn, mesh=mesh, local_batch=local_batch, n_local=n_local, n_proc=n_proc,
                     block_every_step=block_every_step, show_progress=_progress_enabled(progress), state=state,
                     step=start_step, log_epochs=bool(progress) and main)
        with _SigintGuard() as sigint:
            loop.sigint = sigint
            loop.run(batches_fn)
        ckpt.wait()
        return FitResult(state=loop.state, history=list(log.epochs),
                         resumed_from_step=latest,
                         compilations=compilation_count(step_fn) - compiled_before if compiled_before >= 0 else -1,
                         best_step=ckpt.best_step())
    finally:
        ckpt.close()


class _Engine(NamedTuple):
    tx: optax.GradientTransformation
    create: Callable[[jax.Array, jax.Array], TrainState]  # jitted, replicated output
    step: Callable[..., tuple[TrainState, dict[str, jax.Array]]]


_ENGINES: "OrderedDict[Any, _Engine]" = OrderedDict()
_ENGINES_MAX = 4
# Fields that do not change the compiled functions (see _engine).
_BOOKKEEPING = ("checkpoint_every_steps", "checkpoint_every_epochs", "keep_checkpoints", "keep_best",
                "async_checkpointing", "log_every")


def _engine(task: Task, config: TrainConfig, steps_per_epoch: int, mesh: Mesh) -> _Engine:
    """Optimizer, jitted init and jitted step for a run.

    Reused from an earlier ``fit`` in this process when the task, the math-relevant config, ``steps_per_epoch``
    and the mesh are equal (and hashable), so that resuming or extending a run in a notebook does not recompile.
    Unhashable tasks are built afresh every time.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in _BOOKKEEPING}
    key: Any = (task, dataclasses.replace(config, **defaults), int(steps_per_epoch), mesh)
    try:
        hash(key)
    except TypeError:
        key = None
    if key is not None and key in _ENGINES:
        _ENGINES.move_to_end(key)
        return _ENGINES[key]
    tx = make_optimizer(config, steps_per_epoch)
    engine = _Engine(tx=tx, create=jax.jit(_create_state_fn(task, tx), out_shardings=replicated_sharding(mesh)),
                     step=make_train_step(task, tx, mesh, on_nonfinite=config.on_nonfinite,
                                          compute_dtype=config.compute_dtype))
    if key is not None:
        _ENGINES[key] = engine
        while len(_ENGINES) > _ENGINES_MAX:
            _ENGINES.popitem(last=False)
    return engine


# ---------------------------------------------------------------------------------------------------------------
# SIGINT
# ---------------------------------------------------------------------------------------------------------------
class _SigintGuard:
    """First Ctrl-C sets a flag (the loop saves and stops after the current step); a second one aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        print("\nInterrupt received: finishing the current step and saving a checkpoint "
              "(press Ctrl-C again to stop without saving).", file=sys.stderr, flush=True)

    def __enter__(self) -> "_SigintGuard":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)


# ---------------------------------------------------------------------------------------------------------------
# The host-side loop
# ---------------------------------------------------------------------------------------------------------------
class _Loop:
    """The host side of fit: feeds batches, logs, checkpoints, handles epoch ends, Ctrl-C and NaNs."""

    def __init__(self, *, config: TrainConfig, ckpt: Checkpointer, log: _MetricsLog, run_dir: Path,
                 steps_per_epoch: int, step_fn: Callable[..., Any], mesh: Mesh, local_batch: int, n_local: int,
                 n_proc: int, block_every_step: bool, show_progress: bool, state: TrainState, step: int,
                 log_epochs: bool = False):
        self.config, self.ckpt, self.log, self.run_dir = config, ckpt, log, run_dir
        self.spe, self.step_fn, self.mesh = steps_per_epoch, step_fn, mesh
        self.local_batch, self.n_local, self.n_proc = local_batch, n_local, n_proc
        self.block_every_step, self.show_progress = block_every_step, show_progress
        self.state, self.step = state, step
        self.last_saved = ckpt.latest_step()
        self.sigint: _SigintGuard | None = None
        self.pending: list[tuple[int, dict[str, jax.Array], np.ndarray]] = []  # (step, metrics, pattern indices)
        self.window_t0 = time.perf_counter()
        self.window_patterns = 0
        self.epoch_t0 = self.window_t0
        self.epoch_patterns = 0
        self.first_step_done = False
        self.bar: Any = None
        self.log_epochs = log_epochs and not show_progress  # one line per epoch on stdout where no bar is drawn
        self.epoch_wall_t0 = self.window_t0

    # -- main loop ----------------------------------------------------------------------------------------------
    def run(self, batches_fn: Callable[[int], Iterable[Any]]) -> None:
        cfg, spe = self.config, self.spe
        start_epoch = self.step // spe
        for epoch in range(start_epoch, cfg.epochs):
            skip = self.step - epoch * spe
            epoch_arr = jax.device_put(np.asarray(epoch, np.int32), replicated_sharding(self.mesh))
            self.epoch_t0, self.epoch_patterns = time.perf_counter(), 0
            self.epoch_wall_t0 = self.epoch_t0
            self._open_bar(epoch, skip)
            try:
                self._train_epoch(batches_fn(epoch), epoch, epoch_arr, skip)
                self._end_epoch(epoch)
                self._after_step(epoch, epoch_end=True)
            finally:
                if self.bar is not None:
                    self.bar.close()
                    self.bar = None
        self._flush()
        if self.last_saved != self.step:
            self._save(metric=None)

    def _train_epoch(self, batches: Iterable[Any], epoch: int, epoch_arr: jax.Array, skip: int) -> None:
        """Train on ``batches`` (one epoch's), skipping the first ``skip`` (consumed before a resume)."""
        spe = self.spe
        n_seen = 0
        batches = iter(batches)
        for i, batch in enumerate(batches):
            n_seen = i + 1
            if i < skip:
                continue
            self._train_one(batch, epoch_arr, epoch)
            if self.step % spe == 0:  # last batch of the epoch: close the epoch before any save
                break
            self._after_step(epoch, epoch_end=False)
        if n_seen != spe or next(batches, None) is not None:
            more = "more" if n_seen == spe else str(n_seen)
            raise ValueError(f"batches_fn({epoch}) yielded {more} batches, but steps_per_epoch={spe}; "
                             "they must agree (resuming relies on it)")

    def _open_bar(self, epoch: int, skip: int) -> None:
        if not self.show_progress:
            return
        self.bar = tqdm(total=self.spe, initial=skip, desc=f"epoch {epoch + 1}/{self.config.epochs}",
                        unit="step", dynamic_ncols=True, leave=True)

    def _check_batch(self, batch: Any, epoch: int) -> None:
        for name in ("images", "weights", "index"):
            if not hasattr(batch, name):
                raise TypeError(f"batches_fn must yield batches with fields images, weights, index; got {type(batch)}")
        n = int(np.shape(batch.images)[0])
        if n > self.local_batch:
            raise ValueError(
                f"batches_fn({epoch}) yielded a batch of {n} patterns, more than batch_size / process_count = "
                f"{self.config.batch_size // self.n_proc} (padded to {self.local_batch} for {self.n_local} devices)")
        if np.ndim(batch.images) != 3:
            raise ValueError(f"batch.images must have shape (B, H, W), got {np.shape(batch.images)}")

    def _train_one(self, batch: Any, epoch_arr: jax.Array, epoch: int) -> None:
        self._check_batch(batch, epoch)
        batch = pad_batch_to(batch, self.n_local, min_size=self.local_batch)
        weights = np.asarray(batch.weights, np.float32)
        images, weights_dev = shard_batch((np.asarray(batch.images, np.float32), weights), self.mesh)
        self.state, metrics = self.step_fn(self.state, images, weights_dev, epoch_arr)
        self.step += 1
        if self.block_every_step:
            jax.block_until_ready(self.state.step)
        real = int(np.count_nonzero(weights)) * self.n_proc
        self.pending.append((self.step, metrics, np.asarray(batch.index)))
        if not self.first_step_done:  # the first step includes compilation: keep it out of the throughput
            jax.block_until_ready(metrics)
            compile_s = time.perf_counter() - self.window_t0
            if is_main_process():
                logger.info("first step (compilation included): %.2f s", compile_s)
            self.first_step_done = True
            self.window_t0 = self.epoch_t0 = time.perf_counter()
        else:
            self.window_patterns += real
            self.epoch_patterns += real
        if self.bar is not None:
            self.bar.update(1)

    def _after_step(self, epoch: int, *, epoch_end: bool) -> None:
        cfg = self.config
        if self.step % cfg.log_every == 0:
            self._flush()
        save_now = cfg.checkpoint_every_steps and self.step % cfg.checkpoint_every_steps == 0
        if epoch_end:
            save_now = save_now or (cfg.checkpoint_every_epochs and (epoch + 1) % cfg.checkpoint_every_epochs == 0)
        interrupted = self.sigint is not None and self.sigint.requested
        if (save_now or interrupted) and self.last_saved != self.step:
            self._flush()  # never save a state that has seen a non-finite step in 'stop' mode
            self._save(metric=self._last_epoch_loss if epoch_end else None)
        if interrupted:
            self._stop_interrupted()

    def _stop_interrupted(self) -> None:
        """After Ctrl-C, once the checkpoint of the current step is written: say how to resume, then stop."""
        self.ckpt.wait()
        if is_main_process():
            epoch_no, batch_no = divmod(self.step - 1, self.spe)  # (0-based) of step n, the n-th update
            print(f"\nTraining interrupted after step {self.step} (epoch {epoch_no + 1} of "
                  f"{self.config.epochs}, batch {batch_no + 1} of {self.spe}). Checkpoint saved in "
                  f"{self.ckpt.directory}.\nTo resume, run the same command again with the same run directory "
                  f"(e.g. `ccstae train ... --out {self.run_dir}`): training continues from step "
                  f"{self.step}.", file=sys.stderr, flush=True)
        raise KeyboardInterrupt(f"training interrupted; checkpoint at step {self.step} in {self.run_dir}")

    # -- synchronisation points ---------------------------------------------------------------------------------
    def _flush(self) -> None:
        """Wait for the devices, check for non-finite steps, write the metrics line and update the progress bar."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        host = jax.device_get([m for _, m, _ in pending])
        bad_step = int(self.state.first_nonfinite_step)
        nonfinite = int(self.state.nonfinite_count)
        if self.config.on_nonfinite == "stop" and bad_step >= 0:
            self._raise_nonfinite(bad_step, pending, host)
        now = time.perf_counter()
        elapsed = max(now - self.window_t0, 1e-9)
        rate = self.window_patterns / elapsed if self.window_patterns else float("nan")
        self.window_t0, self.window_patterns = now, 0
        finite = [h for h in host if bool(h["finite"])]
        rec: dict[str, Any] = {"kind": "step", "step": self.step, "epoch": (self.step - 1) // self.spe}
        keys = [k for k in host[0] if k != "finite"]
        for k in keys:
            vals = [float(h[k]) for h in (finite if k not in ("learning_rate",) else host)]
            rec[k] = float(np.mean(vals)) if vals else float("nan")
        rec["learning_rate"] = float(host[-1]["learning_rate"])
        rec.update(steps=len(host), nonfinite_count=nonfinite, patterns_per_s=rate, wall_time=time.time())
        if nonfinite and self.config.on_nonfinite == "skip" and len(finite) < len(host) and is_main_process():
            logger.warning("skipped %d batch(es) with non-finite loss/gradients up to step %d (total %d)",
                           len(host) - len(finite), self.step, nonfinite)
        self.log.write(rec)
        if self.bar is not None:
            self.bar.set_postfix({"loss": f"{rec['loss']:.4g}", "patterns/s": f"{rate:.1f}"}, refresh=False)

    def _raise_nonfinite(self, bad_step: int, pending: list[Any], host: list[Any]) -> None:
        self.ckpt.wait()
        epoch, batch_no = (bad_step - 1) // self.spe, (bad_step - 1) % self.spe + 1
        where = ""
        for (s, _, index), h in zip(pending, host):
            if s == bad_step:
                idx = index[index >= 0]
                shown = ", ".join(str(int(i)) for i in idx[:16]) + (", ..." if idx.size > 16 else "")
                where = f"; loss={float(h['loss'])}, grad_norm={float(h['grad_norm'])}, pattern indices [{shown}]"
        last = self.ckpt.latest_step()
        kept = (f"The last good checkpoint (step {last}) in {self.ckpt.directory} is kept unchanged."
                if last is not None else "No checkpoint had been saved yet.")
        raise NonFiniteLossError(
            f"non-finite loss or gradients at step {bad_step} (epoch {epoch + 1} of {self.config.epochs}, batch "
            f"{batch_no} of {self.spe}{where}). Training stopped. {kept} Try a lower learning rate, gradient "
            f"clipping (grad_clip_norm), check the data, or set on_nonfinite='skip' to drop such batches.",
            step=bad_step, epoch=epoch)

    def _end_epoch(self, epoch: int) -> None:
        self._flush()
        st = self.state
        sums, count, best = jax.device_get((st.epoch_sums, st.epoch_count, st.best_loss))
        count = int(count)
        means = {k: (float(v) / count if count else float("nan")) for k, v in sums.items()}
        lr_used = float(jax.device_get(get_learning_rate(st.opt_state)))
        mean = np.float32(float(sums["loss"]) / count) if count else np.float32(np.nan)
        new_lr, new_best = bold_driver_update(lr_used, float(mean), float(best), up=self.config.bold_driver_up,
                                              down=self.config.bold_driver_down)
        if self.config.schedule == "bold_driver":
            st = set_learning_rate(st, new_lr)
        repl = replicated_sharding(self.mesh)
        zeros = {k: jax.device_put(np.zeros((), np.float32), repl) for k in sums}
        st = st.replace(epoch_sums=zeros, epoch_count=jax.device_put(np.zeros((), np.int32), repl),
                        best_loss=jax.device_put(np.asarray(new_best, np.float32), repl))
        self.state = st
        self._last_epoch_loss = float(mean) if count else None
        elapsed = max(time.perf_counter() - self.epoch_t0, 1e-9)
        rec = {"kind": "epoch", "epoch": epoch, "step": self.step, **means, "learning_rate": lr_used,
               "best_loss": new_best, "finite_steps": count, "nonfinite_count": int(st.nonfinite_count),
               "patterns_per_s": self.epoch_patterns / elapsed if self.epoch_patterns else float("nan"),
               "wall_time": time.time()}
        self.log.write(rec)
        if is_main_process():
            logger.info("epoch %d/%d: loss %.6g, lr %.3g", epoch + 1, self.config.epochs, means["loss"], lr_used)
        if self.log_epochs:
            print(f"epoch {epoch + 1}/{self.config.epochs} (step {self.step}): loss {means['loss']:.6g}, "
                  f"{time.perf_counter() - self.epoch_wall_t0:.1f} s", flush=True)

    def _save(self, metric: float | None) -> None:
        meta = {"step": self.step, "epoch": self.step // self.spe, "steps_per_epoch": self.spe}
        self.ckpt.save(self.step, self.state, meta=meta,
                       metric=metric if (metric is not None and math.isfinite(metric)) else None)
        self.last_saved = self.step

    _last_epoch_loss: float | None = None


# ---------------------------------------------------------------------------------------------------------------
# Loading a trained run
# ---------------------------------------------------------------------------------------------------------------
def load_checkpoint(run_dir: str | os.PathLike, task: Task, sample_images: Any, *, which: str | int = "latest",
                    mesh: Mesh | None = None) -> TrainState:
    """Restore a :class:`TrainState` from a run directory written by :func:`fit`.

    Args:
      run_dir: the run directory (reads ``config.json`` for the optimizer settings).
      task: the same model as in training.
      sample_images: (B, H, W) float32, shapes only.
      which: ``'latest'``, ``'best'`` (lowest epoch mean loss) or a step number.
      mesh: where to place the state (default all devices); any device count works.

    Returns:
      The state; ``state.params`` are the trained parameters.
    """
    run_dir = Path(run_dir).absolute()
    path = run_dir / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a run directory written by fit()")
    saved = json.loads(path.read_text())
    config = TrainConfig.from_dict(saved["train_config"])
    mesh = make_mesh() if mesh is None else mesh
    tx = make_optimizer(config, int(saved["steps_per_epoch"]))
    abstract = abstract_train_state(task, tx, sample_images, mesh=mesh)
    with Checkpointer(run_dir / CHECKPOINT_DIR, keep_last=config.keep_checkpoints, keep_best=config.keep_best,
                      async_save=False) as ckpt:
        if which == "latest":
            step = ckpt.latest_step()
        elif which == "best":
            step = ckpt.best_step()
        elif isinstance(which, int):
            step = which
        else:
            raise ValueError(f"which must be 'latest', 'best' or a step number, got {which!r}")
        if step is None:
            raise CheckpointError(f"no {which} checkpoint in {ckpt.directory}")
        if step not in ckpt.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {ckpt.directory}; have {ckpt.all_steps()}")
        state, _ = ckpt.restore(abstract, step)
    return state
