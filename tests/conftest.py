"""Test configuration: four fake CPU devices for the multi-device tests.

Tests run on the CPU unless CCSTAE_TEST_PLATFORM names another JAX platform (e.g. `cuda`).
"""
import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TQDM_DISABLE", "1")
# the commands run by the tests never write to the user's compilation cache (tests/test_cli.py shares its own)
os.environ.setdefault("CCSTAE_COMPILATION_CACHE", "off")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
_platform = os.environ.get("CCSTAE_TEST_PLATFORM", "cpu")
jax.config.update("jax_platforms", "cuda" if _platform == "gpu" else _platform)

import pytest  # noqa: E402

# The numeric core (JAX + NumPy leaves) runs under JAX's strict dtype promotion: a silent float64/weak-type
# promotion there is a bug.
_STRICT_PROMOTION_MODULES = {"test_warp", "test_affine", "test_conv", "test_sparsity"}


@pytest.fixture(autouse=True)
def _strict_dtype_promotion_in_the_numeric_core(request):
    if request.module.__name__.rsplit(".", 1)[-1] in _STRICT_PROMOTION_MODULES:
        with jax.numpy_dtype_promotion("strict"):
            yield
    else:
        yield
