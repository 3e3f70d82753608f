"""The train state and the jitted data-parallel train step.

The model is reached only through the :class:`Task` protocol (``init_params`` and ``loss``), so this module knows
nothing about CC-ST-AE itself. :class:`TrainState` holds arrays only (step, params, optimizer state, PRNG key and a
few running sums). The step function is built once by :func:`make_train_step`, which closes over the task, the
optimizer and the static options, so a rebuilt or restored state never triggers a recompilation. The batch is split
over the devices of a 1-D ``'data'`` mesh (:mod:`ccstae_jax.train.parallel`), the state replicated; ``jax.jit``
inserts the gradient all-reduce. A NaN/Inf loss or gradient drops that step's update and is recorded in the state.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from ccstae_jax.train.checkpoint import abstract_like
from ccstae_jax.train.config import COMPUTE_DTYPES, NONFINITE_MODES, get_learning_rate
from ccstae_jax.train.parallel import data_sharding, replicated_sharding

__all__ = [
    "Task",
    "NonFiniteLossError",
    "TrainState",
    "init_train_state",
    "abstract_train_state",
    "make_train_step",
    "compilation_count",
]

PyTree = Any


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
