"""Specifications of the CC-ST-AE loss terms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccstae_jax.ops import affine
from ccstae_jax.train.losses import LossConfig, affine_penalty, ccstae_loss, data_frame_mask, masked_mse, weighted_mean


def test_masked_mse_counts_only_masked_pixels():
    a = jnp.zeros((2, 4, 4))
    b = jnp.ones((2, 4, 4)).at[:, 0, 0].set(10.0)
    mask = jnp.zeros((4, 4)).at[1:, :].set(1.0)
    np.testing.assert_allclose(masked_mse(a, b, mask), [1.0, 1.0])


def test_weighted_mean_ignores_padding():
    np.testing.assert_allclose(weighted_mean(jnp.array([1.0, 3.0, 100.0]), jnp.array([1.0, 1.0, 0.0])), 2.0)


def test_affine_penalty_is_zero_inside_range_and_linear_outside():
    cfg = LossConfig()
    np.testing.assert_allclose(affine_penalty(jnp.array([1.02]), jnp.array([0.98]), jnp.array([0.01]), cfg), [0.0])
    got = affine_penalty(jnp.array([1.05]), jnp.array([1.0]), jnp.array([0.05]), cfg)
    np.testing.assert_allclose(got, [10 * 0.02 + 1 * 0.02], rtol=1e-5)


def test_data_frame_mask_follows_the_inverse_affine():
    mask = jnp.zeros((32, 32)).at[10:14, 20:24].set(1.0)
    ident = affine.identity_warp((1,))
    np.testing.assert_array_equal(data_frame_mask(mask, ident)[0], mask)
    # theta pulls the data onto the base from 4 px further along the columns (1 normalised unit = 16 px here), so a
    # base feature sits 4 px to the right in the data frame.
    shifted = data_frame_mask(mask, affine.warp_matrix(translation=jnp.array([[4 / 16, 0.0]])))
    np.testing.assert_array_equal(np.asarray(shifted[0]), np.roll(np.asarray(mask), 4, axis=1))


def test_perfect_reconstruction_has_zero_data_terms():
    img = jax.random.uniform(jax.random.key(0), (2, 16, 16))
    out = {
        "theta": affine.identity_warp((2,)), "warped_input": img, "base": img, "bases": img[:1],
        "reconstruction": img, "inputs": img, "scale_x": jnp.ones(2), "scale_y": jnp.ones(2), "shear": jnp.zeros(2),
    }
    loss, terms, per_sample = ccstae_loss(out, jnp.ones((16, 16)), jnp.ones(2), LossConfig(l1_coef=0.0))
    assert float(loss) == 0.0 and float(terms["cycle"]) == 0.0
    np.testing.assert_array_equal(per_sample, 0.0)


@pytest.mark.parametrize("preset, overrides", [
    ("fast", {}),
    pytest.param("reference", {"interpolate": True, "warp_mode": "bicubic", "up_size": 128},  # the up-sampled path
                 marks=pytest.mark.slow),
])
def test_loss_on_ring_pixels_equals_loss_on_full_images(preset, overrides):
    """Training evaluates the warps only on the (widened) ring; the loss value is the same as on whole images."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from _patterns import hex_patterns
    from ccstae_jax.train.objective import CCSTAETask, configure

    x, _ = hex_patterns(4, size=64, g=18.0, seed=7)
    if preset == "reference":
        overrides = dict(overrides, conv_size=8, pool_list=(4, 2, 2), reduced_size=16)
    mcfg, lcfg = configure(x, preset=preset, model_overrides=overrides)
    task = CCSTAETask(mcfg, lcfg)
    params = task.init_params(jax.random.key(0), x)
    bias = [0.3, -0.2, 0.1, 0.2, 0.05, -0.05, 0.0] if mcfg.translation else [0.3, -0.2, 0.1, 0.2, 0.0]
    params["affine_dense"]["bias"] = jnp.array(bias)  # a non-trivial affine
    w = jnp.ones(4)
    for epoch in (0, 10):  # ring mask, then spot mask
        out, masks_b = task.forward(params, x, jnp.int32(epoch))
        full, _, _ = ccstae_loss(out, masks_b, w, lcfg)
        points, _ = task.loss(params, x, w, jnp.int32(epoch))
        np.testing.assert_allclose(points, full, rtol=1e-5)
