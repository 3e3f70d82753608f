"""Specifications of ccstae_jax.ops.affine: warp matrices, composition, inversion, frames and strain extraction."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import polar

from ccstae_jax.ops import affine


def _random_strains(rng, n, max_strain=0.02):
    exx, eyy, exy = rng.uniform(-max_strain, max_strain, (3, n))
    rot = rng.uniform(0, 2 * np.pi, n)
    return exx, eyy, exy, rot


def test_warp_matrix_matches_reference_parameterisation():
    # auto4dstem.md section 2: o=[.3,-.2,.5,.1,...] -> sx 1.01457, sy 0.99013, theta 0.5, sh 0.009967
    sx, sy, th, sh = 1.01457, 0.99013, 0.5, 0.009967
    t = (0.0296, -0.0570)
    got = np.asarray(affine.warp_matrix(sx, sy, sh, th, t))
    theta1 = np.array([[sx, sh, 0], [sh, sy, 0], [0, 0, 1]])
    theta2 = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    theta3 = np.array([[1, 0, t[0]], [0, 1, t[1]], [0, 0, 1]])
    np.testing.assert_allclose(got, (theta1 @ theta2 @ theta3)[:2], atol=1e-6)


def test_compose_equals_homogeneous_product():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 5, 2, 3)).astype(np.float32)
    want = (np.asarray(affine.to_homogeneous(a)) @ np.asarray(affine.to_homogeneous(b)))[..., :2, :]
    np.testing.assert_allclose(affine.compose(a, b), want, rtol=1e-5, atol=1e-5)


def test_invert_is_closed_form_inverse():
    rng = np.random.default_rng(1)
    t = (np.eye(2, 3) + 0.2 * rng.normal(size=(7, 2, 3))).astype(np.float32)
    ident = affine.compose(affine.invert(t), t)
    np.testing.assert_allclose(ident, np.broadcast_to(np.eye(2, 3), ident.shape), atol=1e-5)


def test_pixel_and_normalized_frames_round_trip():
    rng = np.random.default_rng(2)
    t = (np.eye(2, 3) + 0.1 * rng.normal(size=(4, 2, 3))).astype(np.float32)
    for align in (False, True):
        px = affine.normalized_to_pixel(t, (30, 50), align_corners=align)
        np.testing.assert_allclose(affine.pixel_to_normalized(px, (30, 50), align_corners=align), t, atol=1e-5)


def test_normalized_to_pixel_maps_pixel_centres_like_affine_grid():
    # align_corners=False: normalised u = (2j + 1)/W - 1 for column j; the pixel warp must send output pixel (j, i)
    # to the input pixel coordinate that grid_sample would unnormalise.
    h, w = 30, 50
    t = np.array([[1.05, 0.1, 0.2], [-0.05, 0.9, -0.1]], np.float32)
    tp = np.asarray(affine.normalized_to_pixel(t, (h, w)))
    j, i = 7.0, 11.0
    u, v = (2 * j + 1) / w - 1, (2 * i + 1) / h - 1
    gu, gv = t[0, 0] * u + t[0, 1] * v + t[0, 2], t[1, 0] * u + t[1, 1] * v + t[1, 2]
    want = (((gu + 1) * w - 1) / 2, ((gv + 1) * h - 1) / 2)
    np.testing.assert_allclose(tp @ np.array([j, i, 1.0]), want, rtol=1e-5)


def test_lattice_strain_round_trip_recovers_labels():
    rng = np.random.default_rng(3)
    exx, eyy, exy, rot = _random_strains(rng, 64)
    m = affine.lattice_from_strain(exx, eyy, exy, rot)
    got = affine.strain_from_affine(m)
    np.testing.assert_allclose(got["strain_xx"], exx, atol=1e-6)
    np.testing.assert_allclose(got["strain_yy"], eyy, atol=1e-6)
    np.testing.assert_allclose(got["shear_xy"], exy, atol=1e-6)
    np.testing.assert_allclose(np.angle(np.exp(1j * (np.asarray(got["rotation"]) - rot))), 0, atol=1e-6)


def test_known_deformation_of_spot_positions_is_recovered():
    """A lattice deformation applied to spot positions, fitted back from the spots, is recovered to 1e-6."""
    jax.config.update("jax_enable_x64", True)
    try:
        rng = np.random.default_rng(4)
        g = 38.0 * np.array([[np.cos(a), np.sin(a)] for a in np.arange(6) * np.pi / 3])  # hex spots (qx, qy) px
        for exx, eyy, exy, rot in zip(*_random_strains(rng, 10)):
            a = np.array([[1 + exx, exy], [exy, 1 + eyy]]) @ np.array(
                [[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]])
            spots = g @ np.linalg.inv(a)  # rows: (A^{-T} g)^T
            s, *_ = np.linalg.lstsq(g, spots, rcond=None)  # spots = g @ s  =>  S = s.T
            m = np.linalg.inv(s.T).T  # M = S^{-T}
            got = {k: float(v) for k, v in affine.strain_from_affine(jnp.asarray(m)).items()}
            assert abs(got["strain_xx"] - exx) < 1e-6
            assert abs(got["strain_yy"] - eyy) < 1e-6
            assert abs(got["shear_xy"] - exy) < 1e-6
            assert abs(np.angle(np.exp(1j * (got["rotation"] - rot)))) < 1e-6
    finally:
        jax.config.update("jax_enable_x64", False)


def test_warp_and_lattice_frames_are_inverse():
    rng = np.random.default_rng(5)
    m = np.asarray(affine.lattice_from_strain(*_random_strains(rng, 8)))
    for shape in [(200, 200), (120, 160)]:
        theta = affine.warp_from_lattice(m, shape)
        np.testing.assert_allclose(affine.lattice_from_warp(theta, shape), m, atol=1e-5)


def test_warp_that_undoes_spot_stretch_along_rows_gives_compressive_lattice_strain():
    # Data spots pushed outward by 1% along Qx (rows) = lattice compressed along x: strain_xx ~ -0.0099.
    s = np.diag([1.01, 1.0])
    theta = affine.warp_from_lattice(np.linalg.inv(s).T, (200, 200))
    # The warp's linear part acts on (column, row): the row (v) axis carries the 1.01.
    np.testing.assert_allclose(np.asarray(theta)[:, :2], [[1.0, 0.0], [0.0, 1.01]], atol=1e-6)
    got = affine.strain_from_affine(affine.lattice_from_warp(theta, (200, 200)))
    np.testing.assert_allclose(got["strain_xx"], 1 / 1.01 - 1, atol=1e-6)
    np.testing.assert_allclose(got["strain_yy"], 0, atol=1e-6)


def test_strain_relative_to_reference_matches_scipy_polar():
    rng = np.random.default_rng(6)
    m = np.asarray(affine.lattice_from_strain(*_random_strains(rng, 16)))
    m_ref = np.asarray(affine.lattice_from_strain(0.004, -0.002, 0.001, 0.3))
    got = affine.strain_from_affine(m, m_ref)
    for i in range(16):
        u, p = polar(m[i] @ np.linalg.inv(m_ref), side="left")  # scipy: T = p @ u
        np.testing.assert_allclose(got["strain_xx"][i], p[0, 0] - 1, atol=2e-6)
        np.testing.assert_allclose(got["strain_yy"][i], p[1, 1] - 1, atol=2e-6)
        np.testing.assert_allclose(got["shear_xy"][i], p[0, 1], atol=2e-6)
        np.testing.assert_allclose(got["rotation"][i], np.arctan2(u[1, 0], u[0, 0]), atol=2e-6)


def test_strain_from_affine_jits_and_vmaps():
    rng = np.random.default_rng(7)
    m = np.asarray(affine.lattice_from_strain(*_random_strains(rng, 6)))
    plain = affine.strain_from_affine(m)
    jitted = jax.jit(affine.strain_from_affine)(m)
    vmapped = jax.vmap(affine.strain_from_affine)(m)
    chex.assert_trees_all_close(plain, jitted, atol=1e-6)
    chex.assert_trees_all_close(plain, vmapped, atol=1e-6)


@pytest.mark.parametrize("period", [np.pi / 3, np.pi / 2])
def test_wrap_angle_range(period):
    a = np.linspace(-10, 10, 101)
    w = np.asarray(affine.wrap_angle(a, period))
    assert (w >= -period / 2 - 1e-6).all() and (w < period / 2 + 1e-6).all()
    np.testing.assert_allclose(np.round((a - w) / period), (a - w) / period, atol=1e-4)


def test_pixel_centres_span_the_normalised_frame_symmetrically():
    n = 8
    centres = affine.pixel_centre(np.arange(n), n)
    np.testing.assert_allclose(centres, -centres[::-1])
    np.testing.assert_allclose(np.diff(centres), 2 / n)
    assert centres[0] == -1 + 1 / n
    # a warp that shifts by one normalised pixel pitch moves pixel centres onto their neighbours
    shift = np.asarray(affine.normalized_to_pixel(jnp.array([[1.0, 0.0, 2 / n], [0.0, 1.0, 0.0]]), (n, n)))
    np.testing.assert_allclose(shift[:, 2], [1.0, 0.0], atol=1e-6)


def test_turn_offsets_turns_by_the_rotation_part_measured_on_the_pixel_grid():
    """On a 40x80 pattern: a pixel-grid rotation by 0.3 rad, stretched by 2 %, turns normalised offsets as that
    rotation turns the same offsets in pixels."""
    h, w = 40, 80
    angle = 0.3
    rot_px = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    scale = np.diag([w / 2, h / 2])  # normalised (u, v) -> pixels (col, row)
    linear = np.linalg.inv(scale) @ (rot_px @ np.diag([1.02, 0.99])) @ scale
    du, dv = np.array([0.1, -0.2, 0.05]), np.array([0.3, 0.1, -0.4])
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    got = np.stack([np.asarray(a) for a in affine.turn_offsets(f32(linear), f32(du), f32(dv), (h, w))], -1)
    px = np.stack([du * w / 2, dv * h / 2], -1) @ rot_px.T
    np.testing.assert_allclose(got, px / [w / 2, h / 2], atol=1e-5)
