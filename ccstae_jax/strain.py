"""Deprecated: the strain-map code moved to `ccstae_jax.mapping` (prediction, fit, referencing) and
`ccstae_jax.report.files` (the HDF5 layout). Importing a name from here still works and warns once."""
from __future__ import annotations

import importlib
import warnings

_MOVED = {
    "QUANTITIES": "ccstae_jax.mapping.reference", "INVALID_REASONS": "ccstae_jax.mapping.reference",
    "region_mask": "ccstae_jax.mapping.reference", "referenced_strain": "ccstae_jax.mapping.reference",
    "strain_maps": "ccstae_jax.mapping.reference", "CONVENTIONS": "ccstae_jax.report.files",
    "write_strain_h5": "ccstae_jax.report.files", "read_strain_h5": "ccstae_jax.report.files",
    "UpdatedBases": "ccstae_jax.mapping.bases",
}


def __getattr__(name: str):
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"ccstae_jax.strain has no attribute {name!r}; the mapping code is in "
                             "ccstae_jax.mapping (predict, fit, bases, reference) and ccstae_jax.report.files")
    warnings.warn(f"ccstae_jax.strain.{name} moved to {module}.{name}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(module), name)
