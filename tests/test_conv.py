"""`ccstae_jax.ops.conv`: a drop-in convolution whose kernel gradient is a matmul; values and gradients equal
`lax`'s."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccstae_jax.ops import conv

_DN = ("NHWC", "HWIO", "NHWC")


def _lax(x, w, padding, strides=(1, 1)):
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DN)


@pytest.mark.parametrize(
    "x_shape, w_shape, padding",
    [((2, 9, 7, 3), (3, 3, 3, 5), ((1, 1), (1, 1))), ((1, 6, 8, 2), (3, 2, 2, 4), ((0, 2), (1, 0)))],
)
def test_value_and_gradients_match_lax(x_shape, w_shape, padding):
    x = jax.random.normal(jax.random.key(0), x_shape)
    w = jax.random.normal(jax.random.key(1), w_shape)
    ours = jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(conv.conv2d_nhwc(x, w, padding))), (0, 1))(x, w)
    ref = jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(_lax(x, w, padding))), (0, 1))(x, w)
    chex.assert_trees_all_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_dispatcher_matches_lax_for_strided_convolutions():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    pads = ((1, 1), (1, 1))
    out = conv.conv_general_dilated(x, w, (2, 2), pads, dimension_numbers=_DN)
    chex.assert_trees_all_close(out, _lax(x, w, pads, (2, 2)), rtol=1e-6, atol=1e-6)


def test_flax_conv_with_dispatcher_keeps_parameters_and_gradients():
    x = jax.random.normal(jax.random.key(0), (2, 10, 10, 4))
    ours = nn.Conv(6, (3, 3), padding=1, conv_general_dilated=conv.conv_general_dilated)
    ref = nn.Conv(6, (3, 3), padding=1)
    params = ref.init(jax.random.key(1), x)
    chex.assert_trees_all_equal_shapes(ours.init(jax.random.key(1), x), params)
    g_ours = jax.grad(lambda p: jnp.sum(ours.apply(p, x) ** 2))(params)
    g_ref = jax.grad(lambda p: jnp.sum(ref.apply(p, x) ** 2))(params)
    chex.assert_trees_all_close(g_ours, g_ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(ours.apply(params, x), ref.apply(params, x))
