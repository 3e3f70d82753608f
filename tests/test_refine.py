"""Specifications of per-pattern refinement and of symmetric bases."""
import jax.numpy as jnp
import numpy as np

from _patterns import hex_patterns
from ccstae_jax import affine, masks
from ccstae_jax.models import ModelConfig, symmetrize
from ccstae_jax.refine import refine_theta


def test_refinement_recovers_known_strain_against_the_true_base():
    rot = np.full(6, 0.4)
    data, labels = hex_patterns(6, size=96, g=26.0, spot_sigma=1.6, rotations=rot, seed=2)
    base, _ = hex_patterns(1, size=96, g=26.0, spot_sigma=1.6, rotations=rot[:1], max_strain=0.0)
    ring = np.asarray(masks.ring_mask((96, 96), 10, 47), np.float32)
    theta = refine_theta(affine.identity_warp((6,)), jnp.asarray(data), jnp.asarray(np.repeat(base, 6, 0)),
                         jnp.asarray(np.broadcast_to(ring, data.shape)), steps=15)
    got = affine.strain_from_affine(affine.lattice_from_warp(theta, (96, 96)))
    for j, k in enumerate(("strain_xx", "strain_yy", "shear_xy")):
        np.testing.assert_allclose(got[k], labels[:, j], atol=1e-3)


def test_refinement_never_increases_the_error():
    data, _ = hex_patterns(4, size=64, g=18.0, seed=4)
    base, _ = hex_patterns(1, size=64, g=18.0, rotations=[1.0], max_strain=0.0)  # a poor match on purpose
    ring = np.asarray(masks.ring_mask((64, 64), 8, 30), np.float32)
    theta0 = affine.identity_warp((4,))

    def cost(t):
        from ccstae_jax.warp import affine_warp

        moved = np.asarray(affine_warp(jnp.asarray(data)[..., None], t))[..., 0]
        return ((ring * (moved - base)) ** 2).sum((1, 2))

    theta = refine_theta(theta0, jnp.asarray(data), jnp.asarray(np.repeat(base, 4, 0)),
                         jnp.asarray(np.broadcast_to(ring, data.shape)), steps=5)
    assert (cost(theta) <= cost(theta0) + 1e-6).all()


def test_symmetrized_base_is_invariant_under_lattice_rotations():
    cfg = ModelConfig(pattern_shape=(64, 64))
    strained, _ = hex_patterns(1, size=64, g=18.0, spot_sigma=2.0, max_strain=0.05, seed=1)  # not 6-fold symmetric
    base = jnp.asarray(strained)
    sym = symmetrize(base, cfg)
    from ccstae_jax.models import about_center
    from ccstae_jax.warp import affine_warp

    turned = affine_warp(sym[..., None], about_center(affine.warp_matrix(rotation=jnp.array([np.pi / 3])), cfg))
    inner = np.asarray(masks.ring_mask((64, 64), 6, 24))  # the spots, without the (interpolation-sharp) centre
    peak = float(jnp.max(sym[0][inner]))
    np.testing.assert_allclose(np.asarray(turned[0, ..., 0])[inner], np.asarray(sym[0])[inner], atol=0.05 * peak)
    before = affine_warp(base[..., None], about_center(affine.warp_matrix(rotation=jnp.array([np.pi / 3])), cfg))
    assert np.abs(np.asarray(before[0, ..., 0] - base[0])[inner]).max() > 0.2 * peak  # the input was not symmetric
