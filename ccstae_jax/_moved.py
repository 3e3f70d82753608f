"""Module paths of earlier versions, before the package had one folder per stage, kept importable.

``import ccstae_jax.models`` or ``from ccstae_jax.train import fit`` still work: a name read through an old path is
found where it lives now and warns with a ``DeprecationWarning`` naming the new path. Nothing in the package uses
these paths.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

#: Old module -> the modules its names live in now (searched in order).
MOVED_MODULES: dict[str, tuple[str, ...]] = {
    "ccstae_jax.affine": ("ccstae_jax.ops.affine",),
    "ccstae_jax.conv": ("ccstae_jax.ops.conv",),
    "ccstae_jax.sparsity": ("ccstae_jax.ops.sparsity",),
    "ccstae_jax.geometry": ("ccstae_jax.model.geometry",),
    "ccstae_jax.masks": ("ccstae_jax.model.masks",),
    "ccstae_jax.models": ("ccstae_jax.model.networks",),
    "ccstae_jax.losses": ("ccstae_jax.train.losses",),
    "ccstae_jax.objective": ("ccstae_jax.train.objective",),
    "ccstae_jax.checkpoint": ("ccstae_jax.train.checkpoint",),
    "ccstae_jax.parallel": ("ccstae_jax.train.parallel",),
    "ccstae_jax.crb": ("ccstae_jax.evaluate.crb",),
    "ccstae_jax.plots": ("ccstae_jax.report.plots",),
    "ccstae_jax.export": ("ccstae_jax.report.export",),
    "ccstae_jax.frames": ("ccstae_jax.report.frames",),
    "ccstae_jax.strain": ("ccstae_jax.mapping.reference", "ccstae_jax.report.files", "ccstae_jax.mapping.bases"),
}


def _resolve(old: str, name: str, targets: tuple[str, ...]):
    for target in targets:
        module = importlib.import_module(target)
        if hasattr(module, name):
            warnings.warn(f"{old}.{name} moved to {target}.{name}", DeprecationWarning, stacklevel=3)
            return getattr(module, name)
    raise AttributeError(f"module {old!r} has no attribute {name!r} (its names moved to {', '.join(targets)})")


def moved_names(package: str, names: dict[str, str]):
    """A module ``__getattr__`` for a package that replaced a module of the same name: ``names`` maps each name of
    the old module to the module that holds it now."""

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return _resolve(package, name, (names[name],))

    return __getattr__


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        old, targets = module.__name__, MOVED_MODULES[module.__name__]
        module.__doc__ = f"Deprecated path: the names of {old} are in {', '.join(targets)}."
        module.__getattr__ = lambda name: _resolve(old, name, targets)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the old module paths (and nothing else)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED_MODULES:
            return importlib.util.spec_from_loader(fullname, _Loader())
        return None


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())  # before editable-install finders that may map old paths
