"""The public API: flat, lazy, and the warp importable without Flax."""
import inspect
import subprocess
import sys

import pytest

import ccstae_jax


def test_warp_module_imports_without_flax_optax_or_orbax():
    code = ("import sys, ccstae_jax.ops.warp, ccstae_jax.ops.affine; "
            "bad = [m for m in ('flax', 'optax', 'orbax') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("name", sorted(ccstae_jax._EXPORTS))
def test_every_exported_name_is_the_object_its_module_defines(name):
    import importlib

    module = importlib.import_module(f"ccstae_jax.{ccstae_jax._EXPORTS[name]}")
    assert getattr(ccstae_jax, name) is getattr(module, name)
    assert name in dir(ccstae_jax)


def test_optional_arguments_of_warp_functions_are_keyword_only():
    from ccstae_jax.ops import warp

    for fn in (warp.affine_grid, warp.grid_sample, warp.affine_warp):
        params = list(inspect.signature(fn).parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        assert all(p.default is inspect.Parameter.empty for p in positional), fn.__name__


def test_readme_warp_example_runs():
    """The 5-line example in README.md ("Using the warp alone") runs as written."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"<!-- warp-example -->\s*```python\n(.*?)```", readme, re.S)
    assert block, "README.md lacks the warp example block"
    namespace = {}
    exec(block.group(1), namespace)
    assert namespace["out"].shape == (8, 64, 64, 1)
