"""Training configuration and the optimizer built from it: `TrainConfig`, learning-rate schedules, Optax optimizer.

The learning rate lives in the optimizer state (``optax.inject_hyperparams``), so the step reports it and the
bold-driver rule (`bold_driver_update`) changes it between epochs (`set_learning_rate`) without recompiling the step.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping

import jax
import numpy as np
import optax

if TYPE_CHECKING:
    from ccstae_jax.train.step import TrainState

__all__ = [
    "TrainConfig",
    "make_schedule",
    "make_optimizer",
    "bold_driver_update",
    "get_learning_rate",
    "set_learning_rate",
    "SCHEDULES",
    "OPTIMIZERS",
    "NONFINITE_MODES",
    "COMPUTE_DTYPES",
]

SCHEDULES = ("constant", "cosine", "warmup_cosine", "bold_driver")
OPTIMIZERS = ("adam", "adamw")
NONFINITE_MODES = ("stop", "skip")
COMPUTE_DTYPES = ("float32", "bfloat16")


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
