"""Specifications of the CC-ST-AE model: presets, shapes, the rotation prior, and that it can learn."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _patterns import hex_geometry, hex_patterns
from ccstae_jax.ops import affine
from ccstae_jax.model.networks import CCSTAE, ModelConfig, count_params, harmonic_rotation, harmonic_weights
from ccstae_jax.train.objective import CCSTAETask, canonical_mean, configure


def test_reference_preset_has_auto4dstem_parameter_count():
    cfg = ModelConfig.preset_config("reference")
    shapes = jax.eval_shape(lambda: CCSTAE(cfg).init(jax.random.key(0), jnp.zeros((1, 200, 200))))
    assert count_params(shapes["params"]) == 4_471_621  # Auto4DSTEM 0.2.8, num_base=1


@pytest.mark.slow  # compiles the full reference network (~15 s); its parameter count is checked in the default run
def test_reference_preset_forward_shapes_on_small_patterns():
    cfg = ModelConfig.preset_config("reference", geometry=hex_geometry(40, 10.0), pool_list=(2, 2, 2), conv_size=8,
                                    num_bases=2)
    model = CCSTAE(cfg)
    x = jax.random.uniform(jax.random.key(1), (3, 40, 40))
    params = model.init(jax.random.key(0), x)["params"]
    out = model.apply({"params": params}, x)
    chex.assert_shape(out["theta"], (3, 2, 3))
    chex.assert_shape([out["warped_input"], out["base"], out["reconstruction"]], (3, 40, 40))
    chex.assert_shape(out["bases"], (2, 40, 40))
    np.testing.assert_allclose(np.asarray(out["classes"]).sum(-1), 1.0)


def test_fast_preset_outputs_and_identity_at_init():
    x, _ = hex_patterns(4, size=64, g=18.0, rotations=np.zeros(4), max_strain=0.0)
    cfg, _ = configure(x, preset="fast")
    model = CCSTAE(cfg)
    params = model.init(jax.random.key(0), x)["params"]
    out = jax.jit(model.apply)({"params": params}, x)
    chex.assert_shape(out["theta"], (4, 2, 3))
    chex.assert_tree_all_finite(out)
    # zero-initialised affine head: only the prior rotation, no strain
    s = affine.strain_from_affine(affine.lattice_from_warp(out["theta"], (64, 64)))
    np.testing.assert_allclose(s["strain_xx"], 0, atol=1e-6)
    np.testing.assert_allclose(s["shear_xy"], 0, atol=1e-6)


def test_rotation_prior_recovers_lattice_orientation_modulo_sixty_degrees():
    rots = np.linspace(0, 2 * np.pi, 13)[:-1] + 0.05
    x, _ = hex_patterns(12, size=64, g=18.0, rotations=rots, max_strain=0.0)
    cfg, _ = configure(x, preset="fast", ring=(10.0, 30.0))
    est = np.asarray(harmonic_rotation(jnp.asarray(x), jnp.asarray(harmonic_weights(cfg)), 6))
    # warp frame angle (from +column toward +row) = 90 deg - physics angle, modulo 60 deg
    want = np.pi / 2 - rots
    err = np.angle(np.exp(6j * (est - want))) / 6
    assert np.abs(err).max() < np.radians(0.5)


def test_canonical_mean_aligns_rotated_patterns():
    x, _ = hex_patterns(16, size=64, g=18.0, max_strain=0.0, seed=3)
    cfg, _ = configure(x, preset="fast")
    aligned = np.asarray(canonical_mean(jnp.asarray(x), cfg))
    raw = x.mean(0) * cfg.intensity_scale
    # aligned spots stay sharp: the brightest in-ring pixel is far above the rotational average
    r = np.hypot(*np.mgrid[:64, :64] - 32)
    ring = (r > 12) & (r < 25)
    assert aligned[ring].max() > 3 * raw[ring].max()


def test_bfloat16_compute_keeps_float32_params_and_warps():
    x, _ = hex_patterns(2, size=64, g=18.0)
    cfg, _ = configure(x, preset="fast", model_overrides=dict(dtype="bfloat16"))
    model = CCSTAE(cfg)
    params = model.init(jax.random.key(0), x)["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    out = model.apply({"params": params}, x)
    assert out["theta"].dtype == jnp.float32 and out["warped_input"].dtype == jnp.float32


def test_invalid_config_is_rejected_with_the_field_name():
    with pytest.raises(ValueError, match="preset"):
        ModelConfig.preset_config("slow")
    with pytest.raises(ValueError, match="num_bases"):
        ModelConfig(num_bases=0)
    with pytest.raises(ValueError, match="measured from the data"):
        ModelConfig.from_dict({"pattern_shape": [64, 64]})


def test_model_config_round_trips_with_its_geometry():
    cfg = ModelConfig(geometry=hex_geometry(64, 18.0, symmetry=4), num_bases=2)
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.symmetry == 4 and again.pattern_shape == (64, 64)


def test_the_encoder_recentres_a_descanned_pattern():
    """A pattern whose zero beam sits 3 px off the centre gets the same warp, up to that shift, as the centred one."""
    x, _ = hex_patterns(1, size=64, g=18.0, rotations=[0.3], max_strain=0.0)
    shifted = np.roll(x, (3, -2), axis=(1, 2))
    cfg, _ = configure(np.concatenate([x, x]), preset="fast", geometry=hex_geometry(64, 18.0))
    model = CCSTAE(cfg)
    params = model.init(jax.random.key(0), x)["params"]
    enc = model.apply({"params": params}, jnp.asarray(np.concatenate([x, shifted])), method=lambda m, v: m.encode(v))
    np.testing.assert_allclose(np.asarray(enc["zero_beam"][1] - enc["zero_beam"][0]), [3.0, -2.0], atol=0.05)
    theta = np.asarray(enc["theta"])
    np.testing.assert_allclose(theta[1, :, :2], theta[0, :, :2], atol=1e-4)
    np.testing.assert_allclose(theta[1, :, 2] - theta[0, :, 2], [-2.0 * 2 / 64, 3.0 * 2 / 64], atol=2e-3)


def test_tiny_model_overfits_a_tiny_batch():
    """Loss on a fixed batch of 8 patterns drops by 10x within a few hundred steps (under a minute on CPU)."""
    x, _ = hex_patterns(8, size=48, g=13.0, spot_sigma=1.2, seed=5)
    # free (non-symmetrised) bases: the test is about the optimiser reaching a near-exact reconstruction
    cfg, lcfg = configure(x, preset="fast", model_overrides=dict(encoder_channels=(8, 16, 16), encoder_dense=32,
                                                               symmetrize_bases=False))
    task = CCSTAETask(cfg, lcfg)
    params = task.init_params(jax.random.key(0), x)
    # start from bases far from the data so there is something to learn
    params["bases"] = jnp.zeros_like(params["bases"])
    tx = optax.adam(3e-3)
    opt = tx.init(params)
    w = jnp.ones(8)

    @jax.jit
    def step(params, opt):
        (loss, _), g = jax.value_and_grad(task.loss, has_aux=True)(params, x, w, jnp.int32(0))
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    first = None
    for _ in range(400):
        params, opt, loss = step(params, opt)
        first = float(loss) if first is None else first
    assert float(loss) < first / 10, (first, float(loss))
