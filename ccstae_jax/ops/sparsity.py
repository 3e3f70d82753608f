"""K-sparse layer with a straight-through gradient (Makhzani & Frey, as used by Auto4DSTEM)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def top_k_mask(scores: ArrayLike, k: int = 1) -> jax.Array:
    """One-hot mask of the ``k`` largest entries along the last axis, ``(..., n)`` → ``(..., n)``.

    Ties are broken towards the lower index (``jax.lax.top_k``), so exactly ``k`` entries are set even when scores tie.
    """
    scores = jnp.asarray(scores)
    n = scores.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"top_k_mask: k must be in [1, {n}] for {n} classes, got k={k}")
    _, idx = jax.lax.top_k(scores, k)
    return jax.nn.one_hot(idx, n, dtype=scores.dtype).sum(-2)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def k_sparse(scores: ArrayLike, k: int = 1) -> jax.Array:
    """Straight-through top-k: forward = one-hot of the top ``k`` scores, backward = identity onto ``scores``.

    The reference's semantics, ``onehot(top_k(p)) + p - stop_gradient(p)`` (Auto4DSTEM applies it to the softmax of
    the class logits), written as a custom JVP so the forward value is exactly one-hot (no ``p - p`` round-off) and
    forward- and reverse-mode differentiation both pass the tangent through. Shape ``(..., n)`` → ``(..., n)``;
    ``k`` must be a static int.
    """
    return top_k_mask(scores, k)


@k_sparse.defjvp
def _k_sparse_jvp(k, primals, tangents):
    (scores,), (dscores,) = primals, tangents
    return top_k_mask(scores, k), dscores
