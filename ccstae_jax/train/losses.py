"""CC-ST-AE losses as pure functions of arrays.

The total loss (per batch, padding excluded through per-sample ``weights``):

``L = MSE_mask(warped_input, base) + cycle_weight * MSE_mask'(reconstruction, input)
      + l1_coef * mean|bases| + affine_penalty``

* the forward term compares the input pulled onto the base frame with the base, over the base-frame mask;
* the cycle term compares the base pushed back into the data frame with the input, over the base-frame mask warped
  by the inverse affine of each sample (so both terms look at the same diffraction spots);
* ``affine_penalty`` keeps scale and shear in range: ``scale_coef * [relu(|s_x - 1| - p_s) + relu(|s_y - 1| - p_s)]
  + shear_coef * relu(|shear| - p_sh)``, as in Auto4DSTEM.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ccstae_jax.ops import affine, warp


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss weights and the mask schedule (epochs; the radii come from the geometry, `ccstae_jax.model.geometry`).

    Attributes:
      cycle_weight, l1_coef: weights of the cycle term and of the L1 norm of the bases.
      scale_coef, scale_penalty, shear_coef, shear_penalty: the range penalty (module docstring).
      use_spot_mask: shrink the loss ring to disks around the spots of the current base (`ccstae_jax.model.masks`).
      shrink_start, shrink_epochs: the ring is used alone before epoch ``shrink_start``; then the spot disks shrink
        from the geometry's ``spot_radius[0]`` to ``spot_radius[1]`` over ``shrink_epochs`` epochs. Fractional
        epochs are allowed: short trainings scale the schedule down (`ccstae_jax.train.objective.CCSTAETask`).
      spot_threshold: fraction of the brightest in-ring base pixel that counts as a spot.
    """

    cycle_weight: float = 1.0
    l1_coef: float = 1e-4
    scale_coef: float = 10.0
    scale_penalty: float = 0.03
    shear_coef: float = 1.0
    shear_penalty: float = 0.03
    use_spot_mask: bool = True
    shrink_start: float = 1.0
    shrink_epochs: float = 3.0
    spot_threshold: float = 0.25

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LossConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        moved = sorted(set(d) & {"ring_inner", "ring_outer", "spot_radius_start", "spot_radius_end"})
        if moved:
            raise ValueError(f"LossConfig: {moved} are derived from the measured geometry now; written by an older "
                             "ccstae-jax? retrain, or set the ring with --ring")
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"LossConfig: unknown keys {sorted(unknown)}")
        return cls(**d)


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum(w * v) / max(sum(w), tiny)`` over the batch axis; ``(B,)``, ``(B,)`` → scalar."""
    return jnp.sum(weights * values) / jnp.maximum(jnp.sum(weights), 1e-12)


def masked_mse(a: jax.Array, b: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-sample mean squared error over the mask: ``(B, ...)`` x3 (mask broadcastable) → ``(B,)``.

    Works on images ``(B, H, W)`` and on pixel lists ``(B, N)`` alike (sums over all but the batch axis).
    """
    mask = jnp.broadcast_to(mask, a.shape).astype(a.dtype)
    axes = tuple(range(1, a.ndim))
    return jnp.sum(mask * (a - b) ** 2, axis=axes) / jnp.maximum(jnp.sum(mask, axis=axes), 1.0)


def affine_penalty(scale_x, scale_y, shear, cfg: LossConfig) -> jax.Array:
    """Per-sample range penalty on scale and shear, ``(B,)``."""
    return cfg.scale_coef * (
        jax.nn.relu(jnp.abs(scale_x - 1) - cfg.scale_penalty) + jax.nn.relu(jnp.abs(scale_y - 1) - cfg.scale_penalty)
    ) + cfg.shear_coef * jax.nn.relu(jnp.abs(shear) - cfg.shear_penalty)


def data_frame_mask(base_mask: jax.Array, theta: jax.Array) -> jax.Array:
    """Base-frame masks ``(B, H, W)`` (or ``(H, W)``) carried into each sample's data frame by ``theta^{-1}``.

    Bilinear warp then threshold at 0.5, as the reference does; ``(B, H, W)`` float32 in {0, 1}.
    """
    b = theta.shape[0]
    base_mask = jnp.broadcast_to(base_mask.astype(jnp.float32), (b,) + base_mask.shape[-2:])
    moved = warp.affine_warp(base_mask[..., None], affine.invert(theta))[..., 0]
    return jax.lax.stop_gradient((moved > 0.5).astype(jnp.float32))


def ccstae_loss(
    out: dict[str, jax.Array], base_mask: jax.Array, weights: jax.Array, cfg: LossConfig, *,
    points: np.ndarray | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
    """Total CC-ST-AE loss.

    Args:
      out: the model's output dict (`ccstae_jax.model.networks.CCSTAE`), full images or, with ``points``, pixel lists.
      base_mask: ``(B, H, W)`` or ``(H, W)`` base-frame mask in {0, 1} (at the size of ``out["bases"]``).
      weights: ``(B,)`` 1 for real patterns, 0 for padding.
      points: ``(N, 2)`` pixel ``(row, col)`` positions at which ``out`` was evaluated (None = full images).

    Returns:
      ``(loss, metrics, per_sample_error)``: scalar loss, dict of scalar terms, and ``(B,)`` forward masked MSE (the
      per-pattern reconstruction error used as a confidence map).
    """
    base_mask = jax.lax.stop_gradient(base_mask)
    b = out["theta"].shape[0]
    if points is None:
        forward = masked_mse(out["warped_input"], out["base"], base_mask)
        mask_d = data_frame_mask(base_mask, out["theta"])
    else:
        from ccstae_jax.model.networks import sample_at_points

        full = jnp.broadcast_to(base_mask.astype(jnp.float32), (b,) + base_mask.shape[-2:])
        forward = masked_mse(out["warped_input"], out["base"], full[:, points[:, 0], points[:, 1]])
        moved = sample_at_points(full, affine.invert(out["theta"]), points)
        mask_d = jax.lax.stop_gradient((moved > 0.5).astype(jnp.float32))
    cycle = masked_mse(out["reconstruction"], out["inputs"], mask_d)
    penalty = affine_penalty(out["scale_x"], out["scale_y"], out["shear"], cfg)
    l1 = jnp.mean(jnp.abs(out["bases"]))
    terms = {
        "forward": weighted_mean(forward, weights),
        "cycle": weighted_mean(cycle, weights),
        "penalty": weighted_mean(penalty, weights),
        "l1": l1,
    }
    loss = terms["forward"] + cfg.cycle_weight * terms["cycle"] + terms["penalty"] + cfg.l1_coef * l1
    return loss, terms, forward
