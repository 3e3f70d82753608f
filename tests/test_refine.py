"""Specifications of per-pattern refinement and of symmetric bases."""
import jax.numpy as jnp
import pytest
import numpy as np

from _patterns import hex_patterns
from ccstae_jax import affine, masks
from ccstae_jax.models import ModelConfig, symmetrize
from ccstae_jax.refine import refine_theta


@pytest.mark.parametrize("method", ["pull", "forward"])
def test_refinement_recovers_known_strain_against_the_true_base(method):
    from ccstae_jax.refine import refine_theta_forward

    refine = refine_theta if method == "pull" else refine_theta_forward
    rot = np.full(6, 0.4)
    data, labels = hex_patterns(6, size=96, g=26.0, spot_sigma=1.6, rotations=rot, seed=2)
    base, _ = hex_patterns(1, size=96, g=26.0, spot_sigma=1.6, rotations=rot[:1], max_strain=0.0)
    ring = np.asarray(masks.ring_mask((96, 96), 10, 47), np.float32)
    theta = refine(affine.identity_warp((6,)), jnp.asarray(data), jnp.asarray(np.repeat(base, 6, 0)),
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


# ------------------------------------------------------------------------------------------- forward refinement
def _glow(size, amp=10.0, width=8.0):
    r = np.hypot(*(np.mgrid[:size, :size] - size // 2))
    return (amp / (1 + (r / width) ** 2)).astype(np.float32)


def _strain_of(theta, size):
    got = affine.strain_from_affine(affine.lattice_from_warp(theta, (size, size)))
    return np.stack([np.asarray(got[k]) for k in ("strain_xx", "strain_yy", "shear_xy")], -1)


def _noisy_case(n, *, size=80, counts=20.0, seed=0):
    """Strained spot patterns on a fixed central glow, Poisson counts (``counts`` per unit intensity); the base is the
    unstrained pattern split into glow and spots; the start is the identity warp (error = the strain itself)."""
    rot = np.full(n, 0.3)
    spots, labels = hex_patterns(n, size=size, g=18.0, spot_sigma=1.5, rotations=rot, seed=seed)
    base, _ = hex_patterns(1, size=size, g=18.0, spot_sigma=1.5, rotations=rot[:1], max_strain=0.0)
    glow = _glow(size)
    data = np.random.default_rng(seed).poisson(counts * (spots + glow)).astype(np.float32) / counts
    ring = np.asarray(masks.ring_mask((size, size), 10, 36), np.float32)
    return {"data": jnp.asarray(data), "spots": jnp.asarray(np.repeat(base, n, 0)), "glow": jnp.asarray(glow),
            "mask": jnp.asarray(np.broadcast_to(ring, data.shape)), "start": affine.identity_warp((n,)),
            "labels": labels[:, :3], "size": size}


def test_forward_refinement_lowers_the_strain_error_of_a_noisy_start():
    from ccstae_jax.refine import refine_theta_forward

    c = _noisy_case(16, seed=1)
    theta = refine_theta_forward(c["start"], c["data"], c["spots"], c["mask"], background=c["glow"], steps=10)
    err0 = np.abs(_strain_of(c["start"], c["size"]) - c["labels"]).mean()
    err = np.abs(_strain_of(theta, c["size"]) - c["labels"]).mean()
    assert err < 0.5 * err0, (err, err0)


@pytest.mark.parametrize("interpolation", ["bilinear", "cubic"])
def test_forward_refinement_with_a_fixed_background_is_unbiased(interpolation):
    """Errors do not scale with the true strain (no shrinkage toward the base) and average out."""
    from ccstae_jax.refine import refine_theta_forward

    c = _noisy_case(24, seed=3, counts=300.0)
    theta = refine_theta_forward(c["start"], c["data"], c["spots"], c["mask"], background=c["glow"], steps=10,
                                 interpolation=interpolation)
    err = _strain_of(theta, c["size"]) - c["labels"]
    slope = (err * c["labels"]).sum() / (c["labels"] ** 2).sum()  # -0.65 when the glow is warped (next test)
    assert abs(slope) < 0.05, slope
    assert np.abs(err.mean(0)).max() < 3 * err.std() / np.sqrt(len(err)) + 2e-4, err.mean(0)


def test_warping_the_background_with_the_spots_shrinks_the_strain():
    """The reason the background is held fixed: a glow moved with the lattice pulls estimates toward the base."""
    from ccstae_jax.refine import refine_theta_forward

    c = _noisy_case(24, seed=3, counts=300.0)
    whole = c["spots"] + c["glow"]
    theta = refine_theta_forward(c["start"], c["data"], whole, c["mask"], steps=10)
    err = _strain_of(theta, c["size"]) - c["labels"]
    assert (err * c["labels"]).sum() / (c["labels"] ** 2).sum() < -0.2


def test_unweighted_forward_refinement_never_increases_its_cost():
    from ccstae_jax.refine import refine_theta_forward
    from ccstae_jax.warp import affine_warp

    data, _ = hex_patterns(4, size=64, g=18.0, seed=4)
    base, _ = hex_patterns(1, size=64, g=18.0, rotations=[1.0], max_strain=0.0)  # a poor match on purpose
    ring = np.asarray(masks.ring_mask((64, 64), 8, 30), np.float32)
    bases = jnp.asarray(np.repeat(base, 4, 0))
    theta0 = affine.identity_warp((4,))

    def cost(t):
        model = np.asarray(affine_warp(bases[..., None], affine.invert(t)))[..., 0]
        return ((ring * (model - data)) ** 2).sum((1, 2))  # the mask pushed by the identity start is the ring

    theta = refine_theta_forward(theta0, jnp.asarray(data), bases, jnp.asarray(np.broadcast_to(ring, data.shape)),
                                 steps=5, weighting="none")
    assert (cost(theta) <= cost(theta0) + 1e-6).all()


def test_radial_background_ignores_the_spots():
    from ccstae_jax.refine import radial_background

    img, _ = hex_patterns(1, size=80, g=22.0, spot_sigma=1.5, max_strain=0.0, rotations=[0.3])
    glow = _glow(80)
    got = np.asarray(radial_background(jnp.asarray(img + glow), (40.0, 40.0)))[0]
    r = np.hypot(*(np.mgrid[:80, :80] - 40))
    sel = (r > 6) & (r < 38)  # outside the central beam, whose profile is the spots' own
    np.testing.assert_allclose(got[sel], glow[sel], atol=0.02 * glow.max())


def test_cubic_forward_fit_of_noise_free_patterns_is_more_accurate_than_bilinear():
    """The model warp's interpolation error is the accuracy floor of the fit on noise-free data."""
    from ccstae_jax.refine import refine_theta_forward

    c = _noisy_case(24, seed=3, counts=1e6)
    err = {}
    for interpolation in ("bilinear", "cubic"):
        theta = refine_theta_forward(c["start"], c["data"], c["spots"], c["mask"], background=c["glow"], steps=10,
                                     interpolation=interpolation)
        err[interpolation] = np.abs(_strain_of(theta, c["size"]) - c["labels"]).mean()
    assert err["cubic"] < 0.8 * err["bilinear"], err


def test_unknown_weighting_is_rejected():
    from ccstae_jax.refine import refine_theta_forward

    x = jnp.zeros((1, 8, 8))
    with pytest.raises(ValueError, match="weighting must be"):
        refine_theta_forward(affine.identity_warp((1,)), x, x, x, weighting="gauss")


def test_unknown_interpolation_is_rejected():
    from ccstae_jax.refine import refine_theta_forward

    x = jnp.zeros((1, 8, 8))
    with pytest.raises(ValueError, match="interpolation must be"):
        refine_theta_forward(affine.identity_warp((1,)), x, x, x, interpolation="bicubic")
