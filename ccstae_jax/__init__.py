"""ccstae-jax: cycle-consistent spatial-transforming autoencoder (CC-ST-AE) strain mapping for 4D-STEM.

The public API is flat and loaded lazily, so ``import ccstae_jax.warp`` (the differentiable affine warp) pulls in
only JAX and NumPy — never Flax, Optax or Orbax.

Pipeline, one module per step: ``data`` (simulator, readers) → ``geometry``/``models`` (convolutions: ``conv``)/
``losses``/``objective`` → ``train`` → ``mapping`` → ``evaluate`` → ``report``/``plots``; ``cli`` and ``pipeline``
drive it.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # warp (leaf module: jax + numpy only)
    "affine_grid": "warp", "grid_sample": "warp", "affine_warp": "warp", "resize_bicubic": "warp",
    "upsample_bilinear_align_corners": "warp",
    # affine algebra and strain
    "warp_matrix": "affine", "compose": "affine", "invert": "affine", "normalized_to_pixel": "affine",
    "pixel_to_normalized": "affine", "lattice_from_warp": "affine", "warp_from_lattice": "affine",
    "lattice_from_strain": "affine", "strain_from_affine": "affine", "polar_left": "affine",
    # sparsity, masks
    "k_sparse": "sparsity", "top_k_mask": "sparsity",
    "ring_mask": "masks", "MaskSchedule": "masks",
    "Geometry": "geometry", "measure_geometry": "geometry", "zero_beam": "geometry",
    # model, losses, task
    "ModelConfig": "models", "CCSTAE": "models", "harmonic_rotation": "models", "count_params": "models",
    "LossConfig": "losses", "ccstae_loss": "losses", "masked_mse": "losses",
    "CCSTAETask": "objective", "configure": "objective",
    # training
    "TrainConfig": "train", "TrainState": "train", "fit": "train", "load_checkpoint": "train",
    "NonFiniteLossError": "train", "RunConfigMismatchError": "train",
    "conv_general_dilated": "conv",
    "make_mesh": "parallel", "shard_batch": "parallel", "initialize_distributed": "parallel",
    # data
    "SimulationConfig": "data.simulate", "simulate_scan": "data.simulate", "simulate_to_hdf5": "data.simulate",
    "add_background_noise": "data.noise", "NOISE_LEVELS": "data.noise",
    "open_scan": "data.readers", "load_labels": "data.readers", "DataError": "data.readers", "Batch": "data.readers",
    # strain maps and evaluation
    "MapConfig": "mapping.predict", "map_scan": "mapping.predict", "fit_patterns": "mapping.fit",
    "prepare_bases": "mapping.fit", "UpdatedBases": "mapping.bases", "referenced_strain": "mapping.reference",
    "strain_maps": "mapping.reference", "strain_uncertainty": "mapping.reference",
    "write_strain_h5": "report.files", "read_strain_h5": "report.files", "error_table": "evaluate", "strain_crb": "crb",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


# Names of earlier versions, replaced by a different algorithm: what to use instead.
_REPLACED = {
    "refine_theta": "fit_patterns", "refine_theta_forward": "fit_patterns", "radial_background": "prepare_bases",
    "predict_scan": "map_scan", "reestimate_bases": "map_scan (MapConfig.base_update)",
    "auto_ring_radii": "measure_geometry", "disk_mask": "ring_mask",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        if name in _REPLACED:
            raise AttributeError(f"ccstae_jax.{name} was replaced; use ccstae_jax.{_REPLACED[name]}")
        raise AttributeError(f"module 'ccstae_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ccstae_jax.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
