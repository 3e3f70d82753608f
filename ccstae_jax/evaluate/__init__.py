"""Scoring strain maps: ``metrics`` (errors against labels, referenced alike) and ``crb`` (Cramér-Rao bounds of a
single pattern under the noise model).

This package replaced the module ``ccstae_jax.evaluate``; its names still resolve here, with a
``DeprecationWarning``.
"""
from ccstae_jax._moved import moved_names

__getattr__ = moved_names(__name__, {name: "ccstae_jax.evaluate.metrics" for name in (
    "PAPER_REFERENCE_REGION", "referenced_labels", "error_table", "format_table")})
