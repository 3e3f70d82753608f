"""Loads a script that is not part of the package (examples/, benchmarks/) as a module, for tests."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str, rel: str):
    """Imports ``ROOT / rel`` under the module name ``name``."""
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
