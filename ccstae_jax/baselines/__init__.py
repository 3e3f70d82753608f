"""Classical baselines that CC-ST-AE is compared against (optional extras, imported lazily).

``ccstae_jax.baselines.py4dstem``: py4DSTEM correlation strain mapping (submodules ``config``, ``blas``, ``method``,
``runner``; its public names are re-exported here). Importing this package needs only numpy; py4DSTEM itself
(``pip install "ccstae-jax[baseline]"``) is imported when a baseline runs. Names are resolved on first use (PEP 562),
so importing ``ccstae_jax.baselines`` does not import the baseline.
"""

_PY4DSTEM_NAMES = (
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
)

__all__ = list(_PY4DSTEM_NAMES)


def __getattr__(name):
    if name in _PY4DSTEM_NAMES:
        from ccstae_jax.baselines import py4dstem

        return getattr(py4dstem, name)
    raise AttributeError(f"module 'ccstae_jax.baselines' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_PY4DSTEM_NAMES))
