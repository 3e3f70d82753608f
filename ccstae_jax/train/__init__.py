"""Training: the task (model + loss), its jitted data-parallel step and the resumable loop.

``losses`` (pure loss terms), ``objective`` (`CCSTAETask`: model, loss and mask schedule, sized from the data),
``config`` (`TrainConfig`, schedules, optimizer), ``step`` (train state, the jitted step), ``rundir`` (the run
directory's config and metrics files), ``loop`` (`fit`, `load_checkpoint`), ``checkpoint`` (Orbax), ``parallel``
(device mesh, batch sharding, multi-host start-up).

This package replaced the module ``ccstae_jax.train``; its names still resolve here, with a ``DeprecationWarning``.
"""
from ccstae_jax._moved import moved_names

_CONFIG = "ccstae_jax.train.config"
_STEP = "ccstae_jax.train.step"
_RUNDIR = "ccstae_jax.train.rundir"
_LOOP = "ccstae_jax.train.loop"
__getattr__ = moved_names(__name__, {
    **{name: _CONFIG for name in ("TrainConfig", "make_schedule", "make_optimizer", "bold_driver_update",
                                  "get_learning_rate", "set_learning_rate", "SCHEDULES", "OPTIMIZERS",
                                  "NONFINITE_MODES", "COMPUTE_DTYPES")},
    **{name: _STEP for name in ("Task", "TrainState", "NonFiniteLossError", "init_train_state",
                                "abstract_train_state", "make_train_step", "compilation_count")},
    **{name: _RUNDIR for name in ("RunConfigMismatchError", "CONFIG_FILE", "METRICS_FILE", "CHECKPOINT_DIR")},
    **{name: _LOOP for name in ("FitResult", "fit", "load_checkpoint")},
})
