"""Binds the model, the losses and the mask schedule into the training task, and sizes them from the data.

`CCSTAETask` implements the protocol the training engine (`ccstae_jax.train.step`) expects:
``init_params(key, images)`` and ``loss(params, images, weights, epoch) -> (loss, metrics)``.
`configure` sizes them from a sample of the scan: its geometry (`ccstae_jax.model.geometry`) and intensity scale.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ccstae_jax.model import masks

from ccstae_jax.ops import affine, warp
from ccstae_jax.model.geometry import Geometry, measure_geometry
from ccstae_jax.train.losses import LossConfig, ccstae_loss
from ccstae_jax.model.networks import CCSTAE, ModelConfig, about_center, harmonic_rotation, harmonic_weights


def configure(
    sample_images: np.ndarray,
    *,
    preset: str = "fast",
    geometry: Geometry | None = None,
    ring: tuple[float, float] | str = "auto",
    symmetry: int | None = None,
    model_overrides: dict | None = None,
    loss_overrides: dict | None = None,
) -> tuple[ModelConfig, LossConfig]:
    """Model and loss configs sized from a sample of patterns.

    Args:
      sample_images: ``(N, H, W)`` patterns (a few hundred spread over the scan is plenty).
      preset: ``"fast"`` or ``"reference"``.
      geometry: the patterns' geometry; None = measured from ``sample_images`` (`ccstae_jax.model.geometry`).
      ring: ``(inner, outer)`` pixel radii of the loss/prior ring, overriding the measured one, or ``"auto"``.
      symmetry: the lattice's rotational order, overriding the measured one.

    The intensity scale makes the 99.9th percentile of in-ring pixels of the mean pattern equal to 1.
    """
    sample_images = np.asarray(sample_images, np.float32)
    if sample_images.ndim != 3:
        raise ValueError(f"configure: expected sample patterns (N, H, W), got shape {sample_images.shape}")
    h, w = sample_images.shape[1:]
    if geometry is None:
        geometry = measure_geometry(sample_images, symmetry=symmetry, ring=None if ring == "auto" else
                                    tuple(float(v) for v in ring))
    inner, outer = geometry.ring
    mean = sample_images.mean(0)
    ring_px = masks.static_ring_mask((h, w), inner, outer, center=geometry.center)
    level = float(np.percentile(mean[ring_px], 99.9)) if ring_px.any() else 0.0
    if not np.isfinite(level) or level <= 0:
        raise ValueError("configure: the patterns carry no intensity inside the ring; check the ring radii and the "
                         "data")
    overrides = dict(geometry=geometry, intensity_scale=1.0 / level)
    overrides.update(model_overrides or {})
    model_cfg = ModelConfig.preset_config(preset, **overrides)
    loss_cfg = LossConfig(**(loss_overrides or {}))
    return model_cfg, loss_cfg


@dataclasses.dataclass(frozen=True)
class CCSTAETask:
    """The training task: a CC-ST-AE with its loss. Static (hashable); parameters live outside."""

    model_cfg: ModelConfig
    loss_cfg: LossConfig

    @property
    def geometry(self) -> Geometry:
        return self.model_cfg.geometry

    @property
    def model(self) -> CCSTAE:
        return CCSTAE(self.model_cfg)

    def config_dict(self) -> dict:
        return {"model": self.model_cfg.to_dict(), "loss": self.loss_cfg.to_dict()}

    def init_params(self, key: jax.Array, images: jax.Array):
        """Random encoder; bases initialised to the canonical-orientation mean of ``images`` (fast preset)."""
        images = jnp.asarray(images, jnp.float32)
        params = self.model.init(key, images)["params"]
        if self.model_cfg.preset == "fast":
            mean = canonical_mean(images, self.model_cfg)
            params = dict(params)
            params["bases"] = jnp.broadcast_to(mean, params["bases"].shape).astype(jnp.float32)
        return params

    def base_masks(self, bases: jax.Array, epoch: jax.Array) -> jax.Array:
        """Base-frame loss masks for this epoch (ring, then ring ∩ spot disks).

        Args:
          bases: ``(num_bases, H, W)`` the dictionary at the pattern resolution.
          epoch: the epoch (may be traced).

        Returns:
          ``(num_bases, H, W)``, or ``(num_bases, up_size, up_size)`` on the up-sampled (interpolate) path, where,
          as in the reference, the masks are built at the pattern resolution, bicubic up-sampled and thresholded at
          0.5 (16x less work than building them on the up-sampled bases).
        """
        cfg, lc, geo = self.model_cfg, self.loss_cfg, self.geometry
        h, w = bases.shape[-2:]
        ring = masks.ring_mask((h, w), *geo.ring, center=cfg.center_px)
        ringf = jnp.broadcast_to(ring.astype(jnp.float32), bases.shape)
        if lc.use_spot_mask:
            start_r, end_r = geo.spot_radius
            sched = masks.MaskSchedule(lc.shrink_start, lc.shrink_epochs, start_r, end_r)
            radius = sched.spot_radius(epoch)
            spots = jax.vmap(lambda b: masks.spot_mask(b, ring, radius, threshold=lc.spot_threshold,
                                                       max_radius=int(np.ceil(start_r))))(bases)
            out = jnp.where(jnp.asarray(epoch) >= lc.shrink_start, spots, ringf)
        else:
            out = ringf
        if cfg.interpolate:
            out = (_up(out, cfg) > 0.5).astype(jnp.float32)
        return out

    def forward(self, params, images: jax.Array, epoch: jax.Array):
        """Model output, per-sample base-frame masks ``(B, h, w)``."""
        out = self.model.apply({"params": params}, images)
        return out, self.sample_masks(out, epoch)

    def sample_masks(self, out: dict, epoch: jax.Array) -> jax.Array:
        """Each pattern's base-frame mask ``(B, h, w)``: the mask of the base its class picks (no gradient flows
        through the choice)."""
        mb = self.base_masks(out["bases"], epoch)
        return jnp.einsum("bk,khw->bhw", jax.lax.stop_gradient(out["classes"]), mb)

    def loss_points(self) -> np.ndarray:
        """Pixels ``(N, 2)`` at which the training loss is evaluated: the loss ring widened by a margin that covers
        the largest scale change, so both the base-frame ring and its image in every data frame are inside. On the
        up-sampled (interpolate) path the pixels are those of the ``up_size`` grid (the ring scaled with it): the
        loss equals the whole-image loss of the reference, which is zero outside the ring, at about half the cost."""
        cfg = self.model_cfg
        inner, outer = self.geometry.ring
        h, w = cfg.pattern_shape
        f = cfg.up_size / h if cfg.interpolate else 1.0
        margin = 2.0 + outer * 1.5 * cfg.scale_limit + self.geometry.drift
        cr, cc = cfg.center_px
        cr, cc = cr * f + (f - 1) / 2, cc * f + (f - 1) / 2
        n_r, n_c = round(h * f), round(w * f)
        sel = masks.static_ring_mask((n_r, n_c), (inner - margin) * f, (outer + margin) * f,
                                     center=(cr, cc))
        return np.argwhere(sel).astype(np.int32)

    def loss(self, params, images, weights, epoch):
        points = self.loss_points()
        out = self.model.apply({"params": params}, images, points)
        loss, terms, _ = ccstae_loss(out, self.sample_masks(out, epoch), weights, self.loss_cfg, points=points)
        return loss, terms


def _up(bases: jax.Array, cfg: ModelConfig) -> jax.Array:
    return warp.resize_bicubic(bases[..., None], (cfg.up_size, cfg.up_size))[..., 0]


def canonical_mean(images: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Mean of the (scaled) patterns turned to the canonical orientation by the rotation prior, ``(H, W)``."""
    x = jnp.asarray(images, jnp.float32) * cfg.intensity_scale
    if cfg.rotation_mode == "prior":
        rot = harmonic_rotation(x, jnp.asarray(harmonic_weights(cfg)), cfg.symmetry)
    else:
        rot = jnp.zeros(x.shape[:1], jnp.float32)
    theta = about_center(affine.warp_matrix(rotation=rot), cfg)
    return warp.affine_warp(x[..., None], theta)[..., 0].mean(0)
