"""Training: the task (model + loss), its jitted data-parallel step and the resumable loop.

``losses`` (pure loss terms), ``objective`` (`CCSTAETask`: model, loss and mask schedule, sized from the data),
``loop`` (train state, optimizer, `fit`, `load_checkpoint`), ``checkpoint`` (Orbax), ``parallel`` (device mesh,
batch sharding, multi-host start-up).

This package replaced the module ``ccstae_jax.train``; its names still resolve here, with a ``DeprecationWarning``.
"""
from ccstae_jax._moved import moved_names

_LOOP = "ccstae_jax.train.loop"
__getattr__ = moved_names(__name__, {name: _LOOP for name in (
    "Task", "TrainConfig", "TrainState", "FitResult", "NonFiniteLossError", "RunConfigMismatchError", "make_schedule",
    "make_optimizer", "bold_driver_update", "get_learning_rate", "set_learning_rate", "init_train_state",
    "abstract_train_state", "make_train_step", "fit", "load_checkpoint", "compilation_count", "SCHEDULES",
    "OPTIMIZERS", "NONFINITE_MODES", "COMPUTE_DTYPES", "CONFIG_FILE", "METRICS_FILE", "CHECKPOINT_DIR")})
