"""Specifications of the straight-through K-sparse layer."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccstae_jax.ops.sparsity import k_sparse, top_k_mask

Z = jnp.array([0.3, -1.0, 2.0, 0.5, 1.5])


def test_forward_is_one_hot_of_top_k():
    np.testing.assert_array_equal(k_sparse(Z, 1), [0, 0, 1, 0, 0])
    np.testing.assert_array_equal(k_sparse(Z, 2), [0, 0, 1, 0, 1])


def test_gradient_is_identity_onto_scores():
    w = jnp.arange(1.0, 6.0)
    g = jax.grad(lambda z: jnp.sum(w * k_sparse(z, 2)))(Z)
    np.testing.assert_allclose(g, w)


def test_gradient_through_softmax_equals_plain_softmax_gradient():
    # Reference: k_out = onehot(p) + p - sg(p) with p = softmax(logits): backward equals the softmax's.
    logits = jnp.array([[0.1, 0.7, -0.3], [1.0, 0.2, 0.0]])
    w = jnp.array([[1.0, -2.0, 0.5], [0.3, 0.1, -1.0]])
    g_st = jax.grad(lambda l: jnp.sum(w * k_sparse(jax.nn.softmax(l), 1)))(logits)
    g_soft = jax.grad(lambda l: jnp.sum(w * jax.nn.softmax(l)))(logits)
    np.testing.assert_allclose(g_st, g_soft, rtol=1e-6)


def test_ties_keep_exactly_k_entries_lowest_index_first():
    tied = jnp.array([1.0, 3.0, 3.0, 3.0, 0.0])
    np.testing.assert_array_equal(top_k_mask(tied, 2), [0, 1, 1, 0, 0])
    assert float(k_sparse(tied, 1).sum()) == 1.0


def test_batched_under_jit_and_vmap():
    x = jax.random.normal(jax.random.key(0), (16, 8))
    out = jax.jit(k_sparse, static_argnums=1)(x, 3)
    chex.assert_trees_all_close(out, jax.vmap(lambda r: k_sparse(r, 3))(x))
    np.testing.assert_array_equal(np.asarray(out).sum(-1), 3)


def test_invalid_k_is_rejected():
    with pytest.raises(ValueError, match="k must be in"):
        top_k_mask(Z, 6)
