"""Test configuration: four fake CPU devices for the multi-device tests.

Tests run on the CPU unless CCSTAE_TEST_PLATFORM names another JAX platform (e.g. `cuda`).
"""
import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TQDM_DISABLE", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
_platform = os.environ.get("CCSTAE_TEST_PLATFORM", "cpu")
jax.config.update("jax_platforms", "cuda" if _platform == "gpu" else _platform)
