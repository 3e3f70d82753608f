"""py4DSTEM correlation strain mapping, the classical baseline CC-ST-AE is compared against.

py4DSTEM is an optional, GPL-licensed extra (``pip install "ccstae-jax[baseline]"``), imported lazily when a baseline
runs; importing this package needs only numpy. Submodules:

* ``config``: constants, :class:`Py4DSTEMConfig`, :class:`BaselineUnavailable` and pure numpy helpers (lattice
  bases, exact strain of a reciprocal basis, set-up from a data file's attributes, central-beam helpers).
* ``blas``: limits numpy's OpenBLAS threads during disk detection (multithreaded OpenBLAS makes it ~20x slower).
* ``method``: the baseline itself: py4DSTEM disk detection, per-pattern lattice fit (or py4DSTEM's ``StrainMap``),
  ellipse and vacuum handling, :func:`py4dstem_strain_map` and :func:`write_strain_h5`; its docstring describes
  the pipeline, its accuracy and the conventions.
* ``runner``: the ``python -m ccstae_jax.baselines.py4dstem`` entry and :func:`run_baseline_subprocess`, which runs
  it in a fresh process (how the CLI's ``ccstae baseline`` and the benchmarks call it).
"""
from ccstae_jax.baselines.py4dstem.config import (
    BASELINE_ENV,
    INSTALL_HINT,
    VACUUM_THRESHOLD,
    BaselineUnavailable,
    Py4DSTEMConfig,
    beam_centres,
    canonical_lattice,
    config_from_attrs,
    default_g1_angle_deg,
    g1_length_from_attrs,
    lattice_aspect_from_attrs,
    lattice_symmetry,
    phase_mismatch_from_attrs,
    reference_basis,
    shortest_spacing,
    strain_from_reciprocal_bases,
    suppress_central_beam,
)
from ccstae_jax.baselines.py4dstem.method import py4dstem_available, py4dstem_strain_map, write_strain_h5
from ccstae_jax.baselines.py4dstem.runner import run_baseline_subprocess, run_cli

__all__ = [
    "BASELINE_ENV",
    "INSTALL_HINT",
    "BaselineUnavailable",
    "Py4DSTEMConfig",
    "VACUUM_THRESHOLD",
    "beam_centres",
    "canonical_lattice",
    "config_from_attrs",
    "default_g1_angle_deg",
    "g1_length_from_attrs",
    "lattice_aspect_from_attrs",
    "lattice_symmetry",
    "phase_mismatch_from_attrs",
    "py4dstem_available",
    "py4dstem_strain_map",
    "reference_basis",
    "run_baseline_subprocess",
    "run_cli",
    "shortest_spacing",
    "strain_from_reciprocal_bases",
    "suppress_central_beam",
    "write_strain_h5",
]
