"""py4DSTEM correlation strain mapping, the classical baseline (see `ccstae_jax.baselines.py4dstem.method`)."""
from ccstae_jax.baselines.py4dstem.method import *  # noqa: F401,F403
from ccstae_jax.baselines.py4dstem.method import __all__  # noqa: F401
