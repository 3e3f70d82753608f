"""ccstae-jax: cycle-consistent spatial-transforming autoencoder (CC-ST-AE) strain mapping for 4D-STEM.

The public API is flat and loaded lazily, so ``import ccstae_jax.warp`` (the differentiable affine warp) pulls in
only JAX and NumPy — never Flax, Optax or Orbax.

One folder per stage of the pipeline: ``data`` (readers, checks, simulator, noise) → ``model`` (geometry, masks,
networks) → ``train`` (losses, task, loop, checkpoints, devices) → ``mapping`` (per-pattern fit, bases, referencing)
→ ``evaluate`` (errors, bounds) → ``report`` (files, frames, exports, figures); ``ops`` holds the numeric leaves
they share, ``conventions`` the frames and names every file uses, ``errors`` the errors a user can act on and
``atomic`` the all-or-nothing file writes. ``pipeline`` (the jobs) and ``cli`` drive it.
"""
from __future__ import annotations

import importlib

from ccstae_jax import _moved

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # warp (leaf module: jax + numpy only)
    "affine_grid": "ops.warp", "grid_sample": "ops.warp", "affine_warp": "ops.warp", "resize_bicubic": "ops.warp",
    "upsample_bilinear_align_corners": "ops.warp",
    # affine algebra and strain
    "warp_matrix": "ops.affine", "compose": "ops.affine", "invert": "ops.affine", "normalized_to_pixel": "ops.affine",
    "pixel_to_normalized": "ops.affine", "lattice_from_warp": "ops.affine", "warp_from_lattice": "ops.affine",
    "lattice_from_strain": "ops.affine", "strain_from_affine": "ops.affine", "polar_left": "ops.affine",
    # sparsity, masks
    "k_sparse": "ops.sparsity", "top_k_mask": "ops.sparsity",
    "ring_mask": "model.masks", "MaskSchedule": "model.masks",
    "Geometry": "model.geometry", "measure_geometry": "model.geometry", "zero_beam": "model.geometry",
    # model, losses, task
    "ModelConfig": "model.networks", "CCSTAE": "model.networks", "harmonic_rotation": "model.networks",
    "count_params": "model.networks",
    "LossConfig": "train.losses", "ccstae_loss": "train.losses", "masked_mse": "train.losses",
    "CCSTAETask": "train.objective", "configure": "train.objective",
    # training
    "TrainConfig": "train.config", "TrainState": "train.step", "fit": "train.loop", "load_checkpoint": "train.loop",
    "NonFiniteLossError": "train.step", "RunConfigMismatchError": "train.rundir",
    "conv_general_dilated": "ops.conv",
    "make_mesh": "train.parallel", "shard_batch": "train.parallel", "initialize_distributed": "train.parallel",
    # data
    "SimulationConfig": "data.simulate", "simulate_scan": "data.simulate", "simulate_to_hdf5": "data.simulate",
    "add_background_noise": "data.noise", "NOISE_LEVELS": "data.noise",
    "open_scan": "data.readers", "load_labels": "data.readers", "DataError": "data.readers", "Batch": "data.readers",
    # strain maps and evaluation
    "MapConfig": "mapping.predict", "map_scan": "mapping.predict", "fit_patterns": "mapping.fit",
    "prepare_bases": "mapping.fit", "UpdatedBases": "mapping.bases", "referenced_strain": "mapping.reference",
    "strain_maps": "mapping.reference", "strain_uncertainty": "mapping.reference",
    "map_warnings": "mapping.reference", "reference_deformation": "mapping.reference",
    "write_strain_h5": "report.files", "read_strain_h5": "report.files", "error_table": "evaluate.metrics",
    "strain_crb": "evaluate.crb",
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


_moved.install()  # the module paths of earlier versions (`ccstae_jax._moved`)
