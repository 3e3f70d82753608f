"""Per-pattern refinement of the encoder's affine against the learned base (Gauss-Newton / Levenberg-Marquardt).

The trained CC-ST-AE gives, for every pattern, a base (the learned dictionary entry) and a warp ``theta`` that
pulls the pattern onto it. The encoder's regression is amortised over the whole scan; this optional step polishes
each pattern's ``theta`` by minimising the same masked forward reconstruction error the network was trained on,

``E(theta) = sum_p mask(p) * (x(theta p) - base(p))^2``,

over the six entries of ``theta``, starting from the encoder's estimate. It uses nothing but the learned base and the
pattern itself (no labels), so the method stays unsupervised; it is what `ccstae map --refine-steps N` runs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ccstae_jax import warp


def _gradients(image: jax.Array) -> jax.Array:
    """``(H, W)`` → ``(H, W, 3)``: the image and its central-difference derivatives along columns (u) and rows (v)."""
    gu = jnp.gradient(image, axis=1)
    gv = jnp.gradient(image, axis=0)
    return jnp.stack([image, gu, gv], -1)


def refine_theta(
    theta: jax.Array, images: jax.Array, bases: jax.Array, masks: jax.Array, *, steps: int = 8, damping: float = 1e-3
) -> jax.Array:
    """Levenberg-Marquardt refinement of warps, one independent 6-parameter problem per pattern.

    The Jacobian of the warped pattern with respect to ``theta`` is the chain rule through the sampling grid,
    ``d x(theta p) / d theta_{ij} = grad_i x(theta p) * p_j`` (``p = (u, v, 1)``), with the image gradient warped
    alongside the image (one 3-channel warp per iteration).

    Args:
      theta: ``(B, 2, 3)`` initial warps (normalised frame, pull: ``x(theta p) ~ base(p)``).
      images: ``(B, H, W)`` patterns, scaled as the model scales them.
      bases: ``(B, H, W)`` the base of each pattern.
      masks: ``(B, H, W)`` base-frame masks (the spots compared).
      steps: iterations (static).
      damping: Levenberg-Marquardt damping, relative to the mean diagonal of ``J^T J``.

    Returns:
      ``(B, 2, 3)`` refined warps. A step that does not lower the error is rejected (the warp never gets worse).
    """
    h, w = images.shape[-2:]
    # normalised output coordinates (align_corners=False); d(pixel)/d(normalised) = (W/2, H/2)
    u = (2 * jnp.arange(w, dtype=jnp.float32) + 1) / w - 1
    v = (2 * jnp.arange(h, dtype=jnp.float32) + 1) / h - 1
    uu, vv = jnp.broadcast_to(u[None, :], (h, w)), jnp.broadcast_to(v[:, None], (h, w))
    ones = jnp.ones((h, w), jnp.float32)

    def one(theta0, image, base, mask):
        stack = _gradients(image)

        def sample(t, channels):
            return warp.affine_warp(channels[None], t[None])[0]

        def cost(t):
            r = mask * (sample(t, image[..., None])[..., 0] - base)
            return jnp.sum(r * r)

        def body(_, carry):
            t, lam, c = carry
            s = sample(t, stack)
            r = mask * (s[..., 0] - base)
            gu, gv = s[..., 1] * (w / 2) * mask, s[..., 2] * (h / 2) * mask  # per normalised unit
            jac = jnp.stack([gu * uu, gu * vv, gu * ones, gv * uu, gv * vv, gv * ones], -1).reshape(-1, 6)
            jtj = jnp.einsum("pi,pj->ij", jac, jac, precision=jax.lax.Precision.HIGHEST)
            jtr = jnp.einsum("pi,p->i", jac, r.reshape(-1), precision=jax.lax.Precision.HIGHEST)
            scale = jnp.mean(jnp.diag(jtj)) + 1e-30
            step = jnp.linalg.solve(jtj + lam * scale * jnp.eye(6, dtype=jtj.dtype), jtr)
            trial = t - step.reshape(2, 3)
            c_trial = cost(trial)
            better = c_trial < c
            return (jnp.where(better, trial, t), jnp.where(better, lam * 0.5, lam * 4.0),
                    jnp.where(better, c_trial, c))

        t, _, _ = jax.lax.fori_loop(0, steps, body, (theta0, jnp.asarray(damping, jnp.float32), cost(theta0)))
        return t

    return jax.vmap(one)(theta.astype(jnp.float32), images.astype(jnp.float32), bases.astype(jnp.float32),
                         masks.astype(jnp.float32))
