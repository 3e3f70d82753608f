"""Training engine: arrays-only train state, one jitted data-parallel step, Optax schedules, resumable ``fit``.

The model is reached only through the :class:`Task` protocol (``init_params`` and ``loss``), so this module knows
nothing about CC-ST-AE itself.

* :class:`TrainState` holds arrays only (step, params, optimizer state, PRNG key and a few running sums). The step
  function is built once by :func:`make_train_step`, which closes over the task, the optimizer and the static
  options, so a rebuilt or restored state never triggers a recompilation.
* Data parallel over a 1-D ``'data'`` mesh of all devices (:mod:`ccstae_jax.train.parallel`): the batch is split over
  devices, the state replicated, ``jax.jit`` inserts the gradient all-reduce. Every batch is padded to the same
  shape (padding rows have weight 0), so a run compiles the step exactly once.
* :func:`fit` checkpoints with Orbax (:mod:`ccstae_jax.train.checkpoint`) and resumes automatically from the newest
  checkpoint in its run directory, mid-epoch included; a resumed run ends with the same parameters as an
  uninterrupted one (same seed, same devices), provided ``batches_fn(epoch)`` yields the same batches in the same
  order every time it is called for that epoch.

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
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from ccstae_jax.train.checkpoint import Checkpointer, CheckpointError, abstract_like
from ccstae_jax.train.parallel import (data_sharding, is_main_process, make_mesh, pad_batch_to, replicated_sharding,
                                 shard_batch)

__all__ = [
    "Task",
    "TrainConfig",
    "TrainState",
    "FitResult",
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
    "fit",
    "load_checkpoint",
]

logger = logging.getLogger(__name__)

PyTree = Any

SCHEDULES = ("constant", "cosine", "warmup_cosine", "bold_driver")
OPTIMIZERS = ("adam", "adamw")
NONFINITE_MODES = ("stop", "skip")
COMPUTE_DTYPES = ("float32", "bfloat16")

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"


# ---------------------------------------------------------------------------------------------------------------
# Protocol, config, errors
# ---------------------------------------------------------------------------------------------------------------
class Task(Protocol):
    """What the training engine needs from a model.

    Optional attribute: ``loss_takes_key = True`` makes the step pass a fresh PRNG key (derived from the state's
    key, different every step) to ``loss`` as the keyword argument ``key``.
    """

    def init_params(self, key: jax.Array, images: jax.Array) -> PyTree:
        """Initial parameters. ``images``: (B, H, W) float32 sample batch. Must be traceable (it runs under jit)."""
        ...

    def loss(self, params: PyTree, images: jax.Array, weights: jax.Array,
             epoch: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Scalar loss and a flat dict of scalar metrics.

        Args:
          params: as returned by ``init_params`` (cast to ``compute_dtype`` when mixed precision is on).
          images: (B, H, W) float32 (or ``compute_dtype``).
          weights: (B,) float32; 0 marks padding. The loss must be the weighted mean over samples.
          epoch: int32 scalar, traced (schedules inside the loss depend on it without recompiling).
        """
        ...


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradients became NaN/Inf (``on_nonfinite='stop'``); carries ``step`` and ``epoch``."""

    def __init__(self, message: str, *, step: int, epoch: int):
        super().__init__(message)
        self.step = step
        self.epoch = epoch


class RunConfigMismatchError(ValueError):
    """The run directory was created with a different task (model) config or training config."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters; saved as JSON in the run directory.

    Attributes:
      epochs: number of passes over the data.
      batch_size: global batch size (patterns per step over all devices and processes). Each process is given
        ``batch_size / process_count`` patterns per step, padded to a multiple of its local device count.
      seed: seeds parameter initialisation and the state's PRNG key (data order is the data source's business).
      optimizer: ``'adam'`` or ``'adamw'`` (decoupled weight decay ``weight_decay``).
      learning_rate: peak learning rate.
      b1, b2, eps: Adam parameters (reference: 0.9, 0.999, 1e-8).
      weight_decay: AdamW only.
      schedule: ``'constant'``; ``'cosine'`` (from ``learning_rate`` down to ``min_lr_ratio * learning_rate`` over
        all steps); ``'warmup_cosine'`` (linear 0 -> ``learning_rate`` over ``warmup_steps``, then cosine);
        ``'bold_driver'`` (the reference's per-epoch rule: the learning rate is multiplied by
        ``bold_driver_up`` (1.2) after an epoch whose mean loss is below the best epoch mean so far, by
        ``bold_driver_down`` (0.8) otherwise).
      warmup_steps: for ``'warmup_cosine'``.
      min_lr_ratio: final learning rate of the cosine schedules as a fraction of ``learning_rate``.
      bold_driver_up, bold_driver_down: bold-driver factors.
      grad_clip_norm: clip gradients to this global L2 norm; None = no clipping.
      compute_dtype: ``'float32'`` or ``'bfloat16'`` (mixed precision: params stay float32, the loss is computed
        with params and images cast to bfloat16; for GPU/TPU).
      checkpoint_every_steps: also save every N steps (0 = only at epoch ends and at the end).
      checkpoint_every_epochs: save at the end of every N-th epoch (0 = never; then no "best" checkpoint).
      keep_checkpoints: how many recent checkpoints to keep (plus the best one when ``keep_best``).
      keep_best: keep the checkpoint with the lowest epoch mean loss.
      async_checkpointing: write checkpoint files in a background thread.
      on_nonfinite: ``'stop'`` (raise :class:`NonFiniteLossError`, keep the last good checkpoint) or ``'skip'``
        (drop that batch's update and count it).
      log_every: write a metrics line (and update the progress bar) every N steps; each line is the mean over
        those N steps. This is also how often the host waits for the devices.
    """

    epochs: int = 20
    batch_size: int = 32
    seed: int = 42
    optimizer: str = "adam"
    learning_rate: float = 3e-5
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    bold_driver_up: float = 1.2
    bold_driver_down: float = 0.8
    grad_clip_norm: float | None = None
    compute_dtype: str = "float32"
    checkpoint_every_steps: int = 0
    checkpoint_every_epochs: int = 1
    keep_checkpoints: int = 3
    keep_best: bool = True
    async_checkpointing: bool = True
    on_nonfinite: str = "stop"
    log_every: int = 10

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig: {what}")

        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        need(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.bold_driver_up > 0 and self.bold_driver_down > 0,
             f"bold_driver_up/down must be > 0, got {self.bold_driver_up}/{self.bold_driver_down}")
        need(self.grad_clip_norm is None or self.grad_clip_norm > 0,
             f"grad_clip_norm must be None or > 0, got {self.grad_clip_norm}")
        need(self.compute_dtype in COMPUTE_DTYPES,
             f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        need(self.checkpoint_every_steps >= 0, f"checkpoint_every_steps must be >= 0, got "
                                               f"{self.checkpoint_every_steps}")
        need(self.checkpoint_every_epochs >= 0, f"checkpoint_every_epochs must be >= 0, got "
                                                f"{self.checkpoint_every_epochs}")
        need(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        need(self.on_nonfinite in NONFINITE_MODES,
             f"on_nonfinite must be one of {NONFINITE_MODES}, got {self.on_nonfinite!r}")
        need(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; missing keys take their defaults, unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"TrainConfig.from_dict: unknown key(s) {unknown}; valid keys: {sorted(names)}")
        return cls(**dict(d))


# Fields that may differ between the run that wrote a checkpoint and the run that resumes from it: they change
# bookkeeping, not the optimisation trajectory. `epochs` may also change unless a cosine schedule depends on it.
_RESUME_MUTABLE = {"checkpoint_every_steps", "checkpoint_every_epochs", "keep_checkpoints", "keep_best",
                   "async_checkpointing", "on_nonfinite", "log_every"}


# ---------------------------------------------------------------------------------------------------------------
# Optimizer and schedules
# ---------------------------------------------------------------------------------------------------------------
def make_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate as a function of the optimizer step count (0-based).

    For ``'bold_driver'`` this is the constant starting rate; the per-epoch changes are made by
    :func:`bold_driver_update` / :func:`set_learning_rate` between epochs.

    Args:
      config: uses ``learning_rate``, ``schedule``, ``warmup_steps``, ``min_lr_ratio``, ``epochs``.
      steps_per_epoch: optimizer steps per epoch; the cosine schedules span ``epochs * steps_per_epoch`` steps.

    Returns:
      ``count -> learning rate`` (an optax schedule).
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    lr = float(config.learning_rate)
    total = config.epochs * steps_per_epoch
    if config.schedule in ("constant", "bold_driver"):
        return optax.constant_schedule(lr)
    if config.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, decay_steps=total, alpha=config.min_lr_ratio)
    warmup = min(config.warmup_steps, total)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=warmup, decay_steps=max(total, warmup + 1),
                                              end_value=lr * config.min_lr_ratio)


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """Optax optimizer from the config: [clip by global norm] -> Adam/AdamW, learning rate injected.

    The learning rate lives in the optimizer state (``optax.inject_hyperparams``), so it can be read for logging
    (:func:`get_learning_rate`) and changed between epochs (:func:`set_learning_rate`, bold driver) without
    recompiling the step.
    """
    if config.schedule in ("constant", "bold_driver"):
        lr: float | optax.Schedule = float(config.learning_rate)
    else:
        lr = make_schedule(config, steps_per_epoch)

    def build(learning_rate: Any) -> optax.GradientTransformation:
        parts = []
        if config.grad_clip_norm is not None:
            parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
        if config.optimizer == "adam":
            parts.append(optax.adam(learning_rate, b1=config.b1, b2=config.b2, eps=config.eps))
        else:
            parts.append(optax.adamw(learning_rate, b1=config.b1, b2=config.b2, eps=config.eps,
                                     weight_decay=config.weight_decay))
        return optax.chain(*parts)

    return optax.inject_hyperparams(build)(learning_rate=lr)


def bold_driver_update(learning_rate: float, epoch_loss: float, best_loss: float, *, up: float = 1.2,
                       down: float = 0.8) -> tuple[float, float]:
    """The reference's per-epoch rule ("bold driver").

    Args:
      learning_rate: the rate used during the epoch that just ended.
      epoch_loss: that epoch's mean training loss.
      best_loss: the lowest epoch mean loss before this epoch (``inf`` before the first).

    Returns:
      ``(new_learning_rate, new_best_loss)``: ``lr * up`` if ``epoch_loss < best_loss`` else ``lr * down``
      (a NaN epoch loss counts as not improved); ``min(best_loss, epoch_loss)`` ignoring NaN. Computed in float32.
    """
    lr, cur, best = np.float32(learning_rate), np.float32(epoch_loss), np.float32(best_loss)
    improved = bool(cur < best)
    new_lr = lr * np.float32(up if improved else down)
    return float(new_lr), float(cur if improved else best)


def _hyperparams_state(opt_state: Any) -> Any:
    if hasattr(opt_state, "hyperparams") and "learning_rate" in opt_state.hyperparams:
        return opt_state
    raise ValueError("the optimizer state has no injected learning_rate; build the optimizer with make_optimizer "
                     "(optax.inject_hyperparams outermost)")


def get_learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate stored in an optimizer state from :func:`make_optimizer` (the one used last step)."""
    return _hyperparams_state(opt_state).hyperparams["learning_rate"]


def set_learning_rate(state: "TrainState", learning_rate: float) -> "TrainState":
    """A copy of ``state`` whose optimizer uses ``learning_rate`` from the next step on (same dtype/sharding)."""
    hs = _hyperparams_state(state.opt_state)
    old = hs.hyperparams["learning_rate"]
    new = jax.device_put(np.asarray(learning_rate, dtype=old.dtype), old.sharding)
    return state.replace(opt_state=hs._replace(hyperparams={**hs.hyperparams, "learning_rate": new}))


# ---------------------------------------------------------------------------------------------------------------
# State and step
# ---------------------------------------------------------------------------------------------------------------
@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; arrays only (checkpointable, no static metadata).

    Attributes:
      step: int32 (), number of batches consumed (= updates attempted).
      params: the task's parameters.
      opt_state: the Optax state (learning rate inside, see :func:`get_learning_rate`).
      key: uint32 raw PRNG key data (``jax.random.key_data``), split every step. Stored raw rather than as a
        typed key: typed keys coming out of ``jit`` add a dispatch-cache entry on the third call.
      epoch_sums: dict of float32 () — per loss term (and ``'loss'``), the sum over this epoch's finite steps.
      epoch_count: int32 (), number of finite steps this epoch.
      best_loss: float32 (), lowest epoch mean loss so far (``inf`` before the first epoch ends).
      nonfinite_count: int32 (), batches whose loss or gradients were not finite (their update was dropped).
      first_nonfinite_step: int32 (), 1-based step of the first such batch, -1 if none.
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    key: jax.Array
    epoch_sums: dict[str, jax.Array]
    epoch_count: jax.Array
    best_loss: jax.Array
    nonfinite_count: jax.Array
    first_nonfinite_step: jax.Array


def _create_state_fn(task: Task, tx: optax.GradientTransformation) -> Callable[[jax.Array, jax.Array], TrainState]:
    def create(key: jax.Array, images: jax.Array) -> TrainState:
        init_key, state_key = jax.random.split(key)
        params = task.init_params(init_key, images)
        weights = jnp.ones(images.shape[:1], jnp.float32)
        _, aux = jax.eval_shape(task.loss, params, images, weights, jnp.zeros((), jnp.int32))
        sums = {"loss": jnp.zeros((), jnp.float32), **{k: jnp.zeros((), jnp.float32) for k in _check_aux(aux)}}
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          key=jax.random.key_data(state_key),
                          epoch_sums=sums, epoch_count=jnp.zeros((), jnp.int32),
                          best_loss=jnp.full((), jnp.inf, jnp.float32), nonfinite_count=jnp.zeros((), jnp.int32),
                          first_nonfinite_step=jnp.full((), -1, jnp.int32))
    return create


def _check_aux(aux: Any) -> dict[str, Any]:
    if not isinstance(aux, Mapping):
        raise TypeError(f"task.loss must return (loss, dict of scalar metrics); the second item is {type(aux)}")
    for k, v in aux.items():
        if not isinstance(k, str) or k == "loss":
            raise ValueError(f"task.loss metric names must be strings other than 'loss', got {k!r}")
        if np.shape(v) != ():
            raise ValueError(f"task.loss metric {k!r} must be a scalar, got shape {np.shape(v)}")
    return dict(aux)


def init_train_state(task: Task, tx: optax.GradientTransformation, sample_images: Any, *, key: jax.Array,
                     mesh: Mesh) -> TrainState:
    """A fresh state, created directly as replicated arrays on ``mesh``.

    Args:
      task: the model (see :class:`Task`).
      tx: the optimizer (e.g. :func:`make_optimizer`).
      sample_images: (B, H, W) float32 batch used to infer shapes in ``init_params``.
      key: PRNG key (``jax.random.key(seed)``); split into the init key and the state's key.
      mesh: the data-parallel mesh.
    """
    images = jnp.asarray(np.asarray(sample_images, np.float32))
    _check_images(images, "sample_images")
    create = jax.jit(_create_state_fn(task, tx), out_shardings=replicated_sharding(mesh))
    return create(key, images)


def abstract_train_state(task: Task, tx: optax.GradientTransformation, sample_images: Any, *,
                         mesh: Mesh) -> TrainState:
    """Shapes, dtypes and (replicated) shardings of the state on ``mesh``: the restore target for checkpoints."""
    images = jax.ShapeDtypeStruct(np.shape(sample_images), jnp.float32)
    abstract = jax.eval_shape(_create_state_fn(task, tx), jax.random.key(0), images)
    return abstract_like(abstract, replicated_sharding(mesh))


def _check_images(images: Any, what: str) -> None:
    if np.ndim(images) != 3:
        raise ValueError(f"{what} must have shape (B, H, W), got {np.shape(images)}")


def _tree_where(cond: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.where(cond, a, b), new, old)


def _all_finite(tree: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(task: Task, tx: optax.GradientTransformation, mesh: Mesh, *, on_nonfinite: str = "stop",
                    compute_dtype: str = "float32") -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """Build the jitted data-parallel train step.

    ``step(state, images, weights, epoch) -> (state, metrics)`` with

    * ``state``: :class:`TrainState`, replicated on ``mesh``; **donated** (do not use it after the call);
    * ``images``: (B, H, W) float32, ``weights``: (B,) float32 (0 = padding), both sharded over ``'data'``
      (B a multiple of the device count; see :func:`ccstae_jax.train.parallel.shard_batch`);
    * ``epoch``: int32 scalar (0-based), passed to ``task.loss``;
    * ``metrics``: float32 scalars ``loss``, each task metric, ``grad_norm``, ``learning_rate`` and bool
      ``finite``.

    If the loss or any gradient is NaN/Inf the update is dropped (params and optimizer state unchanged) and
    ``nonfinite_count``/``first_nonfinite_step`` record it. With ``on_nonfinite='stop'`` the state is frozen from
    then on, so the caller can check the state at its next synchronisation point and stop without ever holding
    NaN parameters; with ``'skip'`` training continues with the next batch. No host synchronisation happens here.

    Args:
      task: the model (see :class:`Task`).
      tx: the optimizer.
      mesh: 1-D data-parallel mesh (:func:`ccstae_jax.train.parallel.make_mesh`).
      on_nonfinite: ``'stop'`` or ``'skip'``.
      compute_dtype: ``'float32'``, or ``'bfloat16'`` to evaluate the loss with params and images cast to bfloat16
        (float32 params and gradients).

    Returns:
      The jitted step (one ``jax.jit``, compiled on first call; fixed shapes mean no recompilation).
    """
    if on_nonfinite not in NONFINITE_MODES:
        raise ValueError(f"on_nonfinite must be one of {NONFINITE_MODES}, got {on_nonfinite!r}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype!r}")
    cdtype = jnp.dtype(compute_dtype)
    takes_key = bool(getattr(task, "loss_takes_key", False))

    def cast(tree: PyTree) -> PyTree:
        if cdtype == jnp.float32:
            return tree
        return jax.tree.map(lambda x: x.astype(cdtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def train_step(state: TrainState, images: jax.Array, weights: jax.Array,
                   epoch: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        key, step_key = jax.random.split(jax.random.wrap_key_data(state.key))

        def loss_fn(params: PyTree) -> tuple[jax.Array, dict[str, jax.Array]]:
            kwargs = {"key": step_key} if takes_key else {}
            loss, aux = task.loss(cast(params), cast(images), weights, epoch, **kwargs)
            if jnp.shape(loss) != ():
                raise ValueError(f"task.loss must return a scalar loss, got shape {jnp.shape(loss)}")
            aux = {k: jnp.asarray(v, jnp.float32) for k, v in _check_aux(aux).items()}
            return loss.astype(jnp.float32), aux

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        finite = jnp.isfinite(loss) & _all_finite(grads)
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        apply = finite if on_nonfinite == "skip" else finite & (state.first_nonfinite_step < 0)
        step = state.step + 1
        terms = {"loss": loss, **aux}
        sums = {k: state.epoch_sums[k] + jnp.where(finite, terms[k], 0.0) for k in state.epoch_sums}
        new_state = state.replace(
            step=step,
            params=_tree_where(apply, new_params, state.params),
            opt_state=_tree_where(apply, new_opt_state, state.opt_state),
            key=jax.random.key_data(key),
            epoch_sums=sums,
            epoch_count=state.epoch_count + finite.astype(jnp.int32),
            nonfinite_count=state.nonfinite_count + (~finite).astype(jnp.int32),
            first_nonfinite_step=jnp.where((state.first_nonfinite_step < 0) & ~finite, step,
                                           state.first_nonfinite_step),
        )
        metrics = {**terms, "grad_norm": optax.tree.norm(grads).astype(jnp.float32),
                   "learning_rate": jnp.asarray(get_learning_rate(new_opt_state), jnp.float32), "finite": finite}
        return new_state, metrics

    repl, dsh = replicated_sharding(mesh), data_sharding(mesh)
    return jax.jit(train_step, in_shardings=(repl, dsh, dsh, repl), out_shardings=(repl, repl), donate_argnums=0)


def compilation_count(step_fn: Any) -> int:
    """How many times a jitted function has been compiled (its cache size); -1 if JAX does not expose it."""
    size = getattr(step_fn, "_cache_size", None)
    return int(size()) if callable(size) else -1


# ---------------------------------------------------------------------------------------------------------------
# Run directory: config file, metrics file
# ---------------------------------------------------------------------------------------------------------------
def _json_normalise(x: Any) -> Any:
    return json.loads(json.dumps(x, sort_keys=True))


def _diff(saved: Any, current: Any, prefix: str) -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for k in sorted(set(saved) | set(current)):
            name = f"{prefix}.{k}" if prefix else str(k)
            if k not in saved:
                out.append(f"{name}: not in the saved config, now {current[k]!r}")
            elif k not in current:
                out.append(f"{name}: saved {saved[k]!r}, missing now")
            else:
                out.extend(_diff(saved[k], current[k], name))
        return out
    return [] if saved == current else [f"{prefix}: saved {saved!r}, now {current!r}"]


def write_json_atomic(path: Path, obj: Any) -> None:
    """Writes ``obj`` as JSON to a temporary name beside ``path``, then renames it (never a half-written file)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _check_run_config(run_dir: Path, config: TrainConfig, task_config: Mapping[str, Any] | None,
                      steps_per_epoch: int, has_checkpoint: bool) -> None:
    """Refuse to resume a run directory written for another model/optimisation; write config.json for new runs."""
    path = run_dir / CONFIG_FILE
    current = {"train_config": _json_normalise(config.to_dict()),
               "task_config": _json_normalise(dict(task_config)) if task_config is not None else None,
               "steps_per_epoch": int(steps_per_epoch)}
    if has_checkpoint:
        if not path.exists():
            raise RunConfigMismatchError(
                f"{run_dir} holds checkpoints but no {CONFIG_FILE}: it was not written by ccstae_jax.train.loop.fit "
                "(or the file was deleted); use a new run directory")
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RunConfigMismatchError(f"cannot read {path}: {e}") from e
        problems = _diff(saved.get("task_config"), current["task_config"], "task_config")
        if saved.get("steps_per_epoch") != current["steps_per_epoch"]:
            problems.append(f"steps_per_epoch: saved {saved.get('steps_per_epoch')!r}, now {steps_per_epoch!r}")
        saved_train = dict(saved.get("train_config") or {})
        mutable = set(_RESUME_MUTABLE)
        if config.schedule in ("constant", "bold_driver"):
            mutable.add("epochs")
        for line in _diff(saved_train, current["train_config"], "train_config"):
            field = line.split(":", 1)[0].split(".", 1)[1].split(".")[0]
            if field not in mutable:
                problems.append(line)
        if problems:
            raise RunConfigMismatchError(
                f"cannot resume the run in {run_dir}: it was started with a different configuration:\n  "
                + "\n  ".join(problems)
                + "\nUse the original settings to resume, or a new run directory to start afresh.")
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, current)


class _MetricsLog:
    """The run's ``metrics.jsonl``: one JSON object per line, appended.

    ``{"kind": "step", "step", "epoch", "loss", <each loss term>, "grad_norm", "learning_rate", "steps" (how many
    steps the line averages), "nonfinite_count", "patterns_per_s", "wall_time" (unix s)}`` every ``log_every``
    steps, and ``{"kind": "epoch", ...}`` (see :class:`FitResult`) at each epoch end. On resume, lines for steps
    after the restored checkpoint are dropped, so the file always describes one consistent trajectory.
    """

    def __init__(self, path: Path, *, keep_until_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        self.epochs: list[dict[str, Any]] = []
        if not enabled:
            return
        lines: list[str] = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if int(rec.get("step", 0)) <= keep_until_step:
                    lines.append(line)
                    if rec.get("kind") == "epoch":
                        self.epochs.append(rec)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        os.replace(tmp, path)

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record; NaN/Inf become null (strict JSON)."""
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        if record.get("kind") == "epoch":
            self.epochs.append(record)
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")


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
            n_seen = 0
            try:
                batches = iter(batches_fn(epoch))
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
                self._end_epoch(epoch)
                self._after_step(epoch, epoch_end=True)
            finally:
                if self.bar is not None:
                    self.bar.close()
                    self.bar = None
        self._flush()
        if self.last_saved != self.step:
            self._save(metric=None)

    def _open_bar(self, epoch: int, skip: int) -> None:
        if not self.show_progress:
            return
        from tqdm.auto import tqdm
        self.bar = tqdm(total=self.spe, initial=skip, desc=f"epoch {epoch + 1}/{self.config.epochs}",
                        unit="step", dynamic_ncols=True, leave=True)

    def _train_one(self, batch: Any, epoch_arr: jax.Array, epoch: int) -> None:
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
            self.ckpt.wait()
            if is_main_process():
                epoch_no, batch_no = divmod(self.step - 1, self.spe)  # (0-based) of step n, the n-th update
                print(f"\nTraining interrupted after step {self.step} (epoch {epoch_no + 1} of "
                      f"{cfg.epochs}, batch {batch_no + 1} of {self.spe}). Checkpoint saved in "
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
