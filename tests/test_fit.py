"""Specifications of the per-pattern forward-model fit on pixel lists, and of symmetric bases."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _patterns import hex_geometry, hex_patterns
from ccstae_jax.model import masks
from ccstae_jax.ops import affine, warp
from ccstae_jax.mapping import fit
from ccstae_jax.model.networks import ModelConfig, about_center, symmetrize

NAMES = ("strain_xx", "strain_yy", "shear_xy")


def _strain(theta, size):
    got = affine.strain_from_affine(affine.lattice_from_warp(jnp.asarray(theta), (size, size)))
    return np.stack([np.asarray(got[k]) for k in NAMES], -1)


@pytest.mark.parametrize("interpolation", fit.INTERPOLATIONS)
@pytest.mark.parametrize("spot_sigma", [1.2, 3.0])
def test_fit_recovers_known_strain_against_the_true_base(interpolation, spot_sigma):
    size, g = 96, 26.0
    rot = np.full(6, 0.4)
    data, labels = hex_patterns(6, size=size, g=g, spot_sigma=spot_sigma, rotations=rot, seed=2)
    base, _ = hex_patterns(1, size=size, g=g, spot_sigma=spot_sigma, rotations=rot[:1], max_strain=0.0)
    table = fit.prepare_bases(jnp.asarray(base), (size // 2, size // 2), min_radius=g / 2,
                              interpolation=interpolation)
    res = fit.fit_patterns(affine.identity_warp((6,)), jnp.asarray(data), jnp.full((6, 2), size // 2.0),
                           jnp.zeros(6, jnp.int32), table, steps=8)
    # The warped base stretches its spots with the lattice while the data's spots stay round: a model error of a few
    # 1e-4 at 2 % strain, whatever the interpolation.
    err = _strain(res.theta, size) - labels[:, :3]
    assert np.abs(err).max() < 6e-4 and np.abs(err).mean() < 2.5e-4


@pytest.mark.parametrize("spot_sigma", [pytest.param(3.0, marks=pytest.mark.slow), 5.0])
def test_rigid_spots_recover_the_strain_of_wide_disks_better_than_a_stretched_base(spot_sigma):
    """Strain moves disks without stretching them: a model that moves each spot rigidly with its centre fits wide
    spots with less bias than the whole base stretched by the affine warp."""
    size, g = 128, 26.0
    rot = np.full(6, 0.4)
    data, labels = hex_patterns(6, size=size, g=g, spot_sigma=spot_sigma, rotations=rot, seed=2)
    base, _ = hex_patterns(1, size=size, g=g, spot_sigma=spot_sigma, rotations=rot[:1], max_strain=0.0)
    args = (affine.identity_warp((6,)), jnp.asarray(data), jnp.full((6, 2), size // 2.0), jnp.zeros(6, jnp.int32))
    errors = {}
    for rigid in (None, 2 * spot_sigma):
        table = fit.prepare_bases(jnp.asarray(base), (size // 2, size // 2), min_radius=g / 2, rigid_radius=rigid)
        res = fit.fit_patterns(*args, table, steps=8)
        errors[rigid] = np.abs(_strain(res.theta, size) - labels[:, :3]).max()
    assert errors[2 * spot_sigma] < 0.5 * errors[None], errors


def test_spot_centres_are_found_at_the_lattice_points_and_not_at_the_zero_beam():
    size, g = 128, 26.0
    base, _ = hex_patterns(1, size=size, g=g, spot_sigma=2.0, rotations=[0.3], max_strain=0.0)
    found = fit.spot_centres(base - base.min(), (size // 2, size // 2), 4.0)[0]
    angles = np.arange(6) * np.pi / 3 + 0.3
    want = [size // 2 + r * np.array([np.cos(a), np.sin(a)]) for r, off in ((g, 0.0), (np.sqrt(3) * g, np.pi / 6))
            for a in angles + off]
    want = np.array([p for p in want if (p > 3).all() and (p < size - 4).all()])
    dist = np.hypot(*(found[:, None, :] - want[None, :, :]).transpose(2, 0, 1))
    assert len(found) == len(want)
    assert dist.min(1).max() < 0.5  # every centre within half a pixel of a lattice point


def test_spot_centres_are_found_beside_a_central_beam_whose_tails_outshine_them():
    size, g = 128, 26.0
    base, _ = hex_patterns(1, size=size, g=g, spot_sigma=1.0, rotations=[0.3], max_strain=0.0)
    rows, cols = np.mgrid[:size, :size] - size // 2
    base = base + 200.0 * np.exp(-np.hypot(rows, cols) / 3.0)  # brighter than the spots out to ~12 px
    found = fit.spot_centres(base - base.min(), (size // 2, size // 2), 2.0, min_radius=g / 2)[0]
    radii = np.hypot(found[:, 0] - size // 2, found[:, 1] - size // 2)
    assert (np.abs(radii - g) < 0.5).sum() == 6


def _wide_disks(labels):
    """Noise-free simulator patterns of 16-px flat disks 38 px apart (a large condenser aperture), ``(N, 200, 200)``,
    for lattice parameters ``labels`` ``(N, 4)``, the zero beam (row, col) and the first-order spot spacing (px)."""
    from ccstae_jax.data.simulate import SimulationConfig, render_patterns

    config = SimulationConfig(scan_shape=(1, 1), n_grains=1, noise_level=0.0, detector_size=256, disk_radius=16.0)
    return (jnp.asarray(render_patterns(labels, config)), tuple(float(c) for c in config.pattern_centre),
            config.spot_spacing)


def test_rigid_spots_anchor_the_first_order_of_disks_that_nearly_touch():
    """The six first-order disks of 16-px disks 38 px apart must be among the rigid spots, not left to move with the
    warp."""
    base, centre, spacing = _wide_disks([[0.0, 0.0, 0.0, 0.3]])
    h, w = base.shape[-2:]
    table = fit.prepare_bases(base, centre, min_radius=17.5, rigid_radius=16.0)
    x, y = (np.asarray(table.centres[0, 1:, i]) for i in (0, 1))  # index 0: the zero beam; then spots and padding
    radii = np.hypot((x + 1) * w / 2 - 0.5 - centre[1], (y + 1) * h / 2 - 0.5 - centre[0])
    assert (np.abs(radii - spacing) < 1.0).sum() == 6, np.sort(radii[radii < 300])


def test_wide_disk_centres_are_their_rims_centres_beside_a_zero_beam_edge_that_outshines_them():
    """A learned base's zero beam is not exactly round: the residuals at its edge are a hundred times brighter than
    the diffracted disks and fall off over several pixels toward the first order. The first-order centres must still
    be the disks' own (16-px disks 38 px apart, their inner edges 6 px from the zero beam's)."""
    base, centre, spacing = _wide_disks([[0.0, 0.0, 0.0, 0.3]])
    h, w = base.shape[-2:]
    rows, cols = np.mgrid[:h, :w]
    radius = np.hypot(rows - centre[0], cols - centre[1])
    plateau = np.asarray(base[0])[np.abs(radius - spacing) < 1].max()
    lopsided = 1 + 0.5 * np.cos(np.arctan2(rows - centre[0], cols - centre[1]))
    tails = 200 * np.exp(-np.abs(radius - 16.0) / 0.6) + 6 * np.exp(-np.abs(radius - 18.0) / 1.2)
    spots = np.asarray(base[0]) + plateau * tails * lopsided  # as bright as the disks 4 px beyond the edge
    found = fit.spot_centres(spots[None], centre, 16.0, min_radius=17.5)[0]
    offset = found - np.asarray(centre)
    radii, angles = np.hypot(*offset.T), np.arctan2(offset[:, 0], offset[:, 1])
    first = np.abs(radii - spacing) < 3
    assert first.sum() == 6, np.sort(radii)
    np.testing.assert_allclose(radii[first], spacing, atol=0.2)  # no disk pulled toward the zero beam
    turns = np.sort(np.mod(angles[first], np.pi / 3))
    assert turns.max() - turns.min() < 0.2 / spacing  # six centres on one hexagon, each within 0.2 px


def test_rigid_spots_recover_the_strain_of_wide_disks_turned_half_a_radian_from_their_base():
    """A grain turned against the base: each disk moves with its centre and its surroundings turn with the lattice
    (16-px flat disks, noise-free, fit started at the turn with no strain)."""
    rng = np.random.default_rng(0)
    turn = 0.5
    labels = np.concatenate([rng.uniform(-0.015, 0.015, (6, 3)), np.full((6, 1), 0.3 + turn)], 1)
    data, centre, _ = _wide_disks(labels)
    base, _, _ = _wide_disks([[0.0, 0.0, 0.0, 0.3]])
    size = base.shape[-1]
    start = affine.warp_from_lattice(affine.lattice_from_strain(*(jnp.zeros(6),) * 3, jnp.full(6, turn)),
                                     (size, size))
    table = fit.prepare_bases(base, centre, min_radius=17.5, rigid_radius=16.0)
    res = fit.fit_patterns(start, data, jnp.tile(jnp.asarray(centre, jnp.float32), (6, 1)), jnp.zeros(6, jnp.int32),
                           table, steps=10)
    err = _strain(res.theta, size) - labels[:, :3]
    assert np.abs(err).max() < 1e-3 and np.abs(err).mean() < 3e-4, err


def test_rigid_jacobian_is_the_derivative_of_the_model_with_the_turn_held():
    """The rigid model's Jacobian is the base's gradient at the point read, chained through that point's dependence
    on ``phi`` (via its spot's centre, the turn held at its value as the fit assumes), at a strained, turned warp."""
    base, centre, _ = _wide_disks([[0.0, 0.0, 0.0, 0.3]])
    h, w = base.shape[-2:]
    table = fit.prepare_bases(base, centre, min_radius=17.5, rigid_radius=16.0)
    lattice = affine.lattice_from_strain(jnp.float32(0.02), jnp.float32(-0.01), jnp.float32(0.015), jnp.float32(0.4))
    phi = affine.invert(affine.warp_from_lattice(lattice, (h, w))).reshape(6)
    rows, cols = np.nonzero(np.asarray(fit._pulled_mask(table, jnp.int32(0), phi)))
    u = affine.pixel_centre(jnp.asarray(cols, jnp.float32), w)
    v = affine.pixel_centre(jnp.asarray(rows, jnp.float32), h)
    k = jnp.int32(0)
    spot = fit._spot_of(table, k, phi, u, v)
    _, jac = fit._model(table, k, phi, u, v, spot, (h, w), jnp.zeros(u.shape))
    turn = affine.turn_matrix(phi.reshape(2, 3)[:, :2], (h, w))

    def point_read(p):
        pu, pv, _ = fit._preimage(table, p, u, v, *spot, turn=turn)
        return jnp.stack([pu, pv], -1)

    pu, pv = point_read(phi).T
    s = fit._sample_table(table.table, k, ((pv + 1) * h - 1) / 2, ((pu + 1) * w - 1) / 2)
    gradient = jnp.stack([s[:, 2] * (w / 2), s[:, 1] * (h / 2)], -1)  # per normalised unit along x (cols), y (rows)
    want = jnp.einsum("pa,pai->pi", gradient, jax.jacfwd(point_read)(phi))  # (N, 2) x (N, 2, 6)
    chex.assert_shape(jac, (len(rows), 6))
    np.testing.assert_allclose(np.asarray(jac), np.asarray(want), rtol=1e-3, atol=1e-4 * float(jnp.abs(want).max()))


def _two_order_pattern(size, g, sigma, m, faint):
    """Six spots at ``g`` and six ``faint`` times dimmer at ``sqrt(3) g``, all moved by the (row, col) matrix ``m``."""
    rows, cols = np.mgrid[:size, :size] - size // 2
    img = np.zeros((size, size))
    for radius, offset, amp in ((g, 0.0, 1.0), (np.sqrt(3) * g, np.pi / 6, faint)):
        for a in np.arange(6) * np.pi / 3 + 0.2 + offset:
            r, c = m @ (radius * np.array([np.cos(a), np.sin(a)]))
            img += amp * np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * sigma**2))
    return img.astype(np.float32)


@pytest.mark.slow
def test_rigid_spots_too_faint_to_be_found_move_with_the_warp_not_with_a_distant_centre(monkeypatch):
    size, g, sigma = 128, 24.0, 2.5
    lin = np.diag([1.02, 0.985])  # (row, col) spot scaling
    base = _two_order_pattern(size, g, sigma, np.eye(2), faint=0.1)
    data = _two_order_pattern(size, g, sigma, lin, faint=0.1)[None]
    centre = (2 * (size // 2) + 1) / size - 1
    xy = np.diag(lin.diagonal()[::-1])  # the pull warp in (x, y) = (column, row)
    want = np.concatenate([xy, (centre - xy @ [centre, centre])[:, None]], 1)
    errors = {}
    for reach in ("default", np.inf):
        if reach == np.inf:
            monkeypatch.setattr(fit, "RIGID_REACH", reach)
        table = fit.prepare_bases(jnp.asarray(base)[None], (size // 2, size // 2), min_radius=g / 2,
                                  rigid_radius=2 * sigma)
        assert len(fit.spot_centres(np.asarray(base)[None] - base.min(), (size // 2, size // 2), 2 * sigma,
                                    min_radius=g / 2)[0]) == 6  # the faint spots are not found
        res = fit.fit_patterns(affine.identity_warp((1,)), jnp.asarray(data), jnp.full((1, 2), size // 2.0),
                               jnp.zeros(1, jnp.int32), table, steps=8)
        errors[reach] = np.abs(np.asarray(res.theta)[0, :, :2] - want[:, :2]).max()
    assert errors["default"] < 0.7 * errors[np.inf], errors


def test_rigid_spots_on_a_base_without_spots_are_refused_with_what_to_do():
    size = 64
    rows, cols = np.mgrid[:size, :size] - size // 2
    blank = np.exp(-np.hypot(rows, cols) / 4.0)[None].astype(np.float32)  # the central beam alone
    with pytest.raises(ValueError, match="rigid spots: base 0 shows 0 diffracted spots.*without --rigid-spots"):
        fit.prepare_bases(jnp.asarray(blank), (size // 2, size // 2), min_radius=9.0, rigid_radius=2.0)


def _lattice_to_the_corners(labels, size, margin=0, g=12.0, sigma=1.2):
    """Patterns ``(N, size + 2 margin, ...)`` of a hexagonal lattice of equal spots out past the frame's corners,
    centred on pixel ``size // 2 + margin``; ``labels`` ``(N, 4)`` strain_xx, strain_yy, shear_xy, rotation."""
    n = size + 2 * margin
    rows, cols = np.mgrid[:n, :n].astype(np.float64) - (size // 2 + margin)
    i, j = np.mgrid[-12:13, -12:13].reshape(2, -1)
    points = g * np.stack([i + 0.5 * j, np.sqrt(3) / 2 * j], -1)
    points = points[(np.hypot(*points.T) > 0) & (np.hypot(*points.T) < size)]
    out = np.zeros((len(labels), n, n), np.float32)
    for k, (exx, eyy, exy, rot) in enumerate(labels):
        a = np.array([[1 + exx, exy], [exy, 1 + eyy]]) @ np.array([[np.cos(rot), -np.sin(rot)],
                                                                    [np.sin(rot), np.cos(rot)]])
        for r, c in points @ np.linalg.inv(a):
            out[k] += np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * sigma**2)).astype(np.float32)
    return out


def test_a_base_with_a_margin_fits_the_corners_of_a_pattern_turned_against_it():
    """A pattern turned half a radian against its base keeps its corners, and the orders there, in the fit when the
    base frame extends past the pattern's: more pixels, more information about the strain, and the strain as
    right as without."""
    size, margin, turn = 64, 16, 0.5
    rng = np.random.default_rng(3)
    labels = np.concatenate([rng.uniform(-0.01, 0.01, (4, 3)), np.full((4, 1), turn)], 1)
    data = jnp.asarray(_lattice_to_the_corners(labels, size))
    start = affine.warp_from_lattice(affine.lattice_from_strain(*(jnp.zeros(4),) * 3, jnp.full(4, turn)),
                                     (size, size))
    args = (start, data, jnp.full((4, 2), size // 2, jnp.float32), jnp.zeros(4, jnp.int32))
    fits = {}
    for m in (0, margin):
        base = _lattice_to_the_corners(np.zeros((1, 4)), size, m)
        table = fit.prepare_bases(jnp.asarray(base), (size // 2, size // 2), min_radius=8.0, margin=m)
        assert table.pattern_shape == (size, size)
        fits[m] = fit.fit_patterns(*args, table, steps=8)
        err = _strain(fits[m].theta, size) - labels[:, :3]
        assert np.abs(err).max() < 5e-4, (m, err)
    assert (np.asarray(fits[margin].dof) > 1.15 * np.asarray(fits[0].dof)).all()
    sd = {m: np.sqrt(np.linalg.inv(np.asarray(r.fisher, np.float64))[:, [0, 4], [0, 4]]) for m, r in fits.items()}
    assert (sd[margin] < 0.9 * sd[0]).all(), sd


def test_patterns_of_another_size_than_the_bases_were_made_for_are_refused():
    base = _lattice_to_the_corners(np.zeros((1, 4)), 32, 4)
    table = fit.prepare_bases(jnp.asarray(base), (16, 16), margin=4)
    with pytest.raises(ValueError, match="40x40 px against bases made for 32x32 px"):
        fit.fit_patterns(affine.identity_warp((1,)), jnp.asarray(base), jnp.full((1, 2), 20.0),
                         jnp.zeros(1, jnp.int32), table)


def test_fit_never_ends_with_a_higher_weighted_misfit_than_its_start():
    data, _ = hex_patterns(4, size=64, g=18.0, seed=4)
    base, _ = hex_patterns(1, size=64, g=18.0, rotations=[1.0], max_strain=0.0)  # a poor match on purpose
    table = fit.prepare_bases(jnp.asarray(base), (32, 32), min_radius=9.0)
    args = (affine.identity_warp((4,)), jnp.asarray(data), jnp.full((4, 2), 32.0), jnp.zeros(4, jnp.int32), table)
    start = fit.fit_patterns(*args, steps=0)
    end = fit.fit_patterns(*args, steps=5)
    assert (np.asarray(end.chi2) <= np.asarray(start.chi2) * (1 + 1e-6)).all()


def test_fit_stays_within_its_trust_region_about_the_start():
    data, _ = hex_patterns(4, size=64, g=18.0, seed=4)
    base, _ = hex_patterns(1, size=64, g=18.0, rotations=[1.0], max_strain=0.0)  # a poor match on purpose
    table = fit.prepare_bases(jnp.asarray(base), (32, 32), min_radius=9.0)
    start = affine.identity_warp((4,))
    args = (start, jnp.asarray(data), jnp.full((4, 2), 32.0), jnp.zeros(4, jnp.int32), table)
    free = fit.fit_patterns(*args, steps=5)
    bounded = fit.fit_patterns(*args, steps=5, max_change=0.002)
    phi = lambda t: np.asarray(affine.invert(t)).reshape(4, 6)  # noqa: E731
    assert np.abs(phi(free.theta) - phi(start)).max() > 0.002  # unbounded, the fit moves further
    assert np.abs(phi(bounded.theta) - phi(start)).max() <= 0.002 + 1e-6


def test_reselecting_the_pixels_mid_fit_makes_the_result_independent_of_a_start_a_pixel_off():
    size, g = 96, 26.0
    rot = np.full(6, 0.4)
    data, _ = hex_patterns(6, size=size, g=g, spot_sigma=1.2, rotations=rot, seed=2)
    base, _ = hex_patterns(1, size=size, g=g, spot_sigma=1.2, rotations=rot[:1], max_strain=0.0)
    table = fit.prepare_bases(jnp.asarray(base), (size // 2, size // 2), min_radius=g / 2)
    centred = np.array(affine.identity_warp((6,)))
    off = centred.copy()
    off[:, :, 2] += np.array([1.5, -1.5]) * 2 / size  # 1.5 pixels off along both axes
    args = (jnp.asarray(data), jnp.full((6, 2), size // 2.0), jnp.zeros(6, jnp.int32), table)

    def spread(reselect):
        a, b = (fit.fit_patterns(jnp.asarray(t), *args, steps=6, reselect=reselect).theta for t in (centred, off))
        return np.abs(_strain(a, size) - _strain(b, size)).max()

    assert spread(0) > 1e-4  # the pixels chosen about the start leave their mark on the result
    assert spread(2) < 0.5 * spread(0) and spread(2) < 1e-4


def test_a_strided_information_mask_keeps_every_stride_th_row_and_column_of_the_full_one():
    size = 64
    spots, _ = hex_patterns(1, size=size, g=18.0, max_strain=0.0)
    background = np.full_like(spots, 0.1)
    full = fit.information_mask(spots, background, center=(32, 32), min_radius=9.0, grow=3)
    sparse = fit.information_mask(spots, background, center=(32, 32), min_radius=9.0, grow=3, stride=2)
    lattice = np.zeros((size, size), bool)
    lattice[::2, ::2] = True
    np.testing.assert_array_equal(sparse, full & lattice[None])
    assert sparse.sum() > 0


def test_fitted_pixels_are_the_spot_edges_not_the_centre_nor_flat_disk_interiors():
    size = 128
    rr, cc = np.mgrid[:size, :size] - size // 2
    r_disk, g = 9.0, 40.0
    spots = np.zeros((size, size))
    for a in np.arange(6) * np.pi / 3:
        d = np.hypot(rr - g * np.cos(a), cc - g * np.sin(a))
        spots += 1.0 / (1.0 + np.exp((d - r_disk) / 0.4))  # flat-topped disks with sharp edges
    central = 50.0 / (1.0 + np.exp((np.hypot(rr, cc) - r_disk) / 0.4))
    sel = fit.information_mask(spots[None], central[None], center=(size // 2, size // 2), min_radius=r_disk + 3)[0]
    d0 = np.hypot(rr - g, cc)
    assert sel[np.abs(d0 - r_disk) < 0.5].mean() > 0.9  # the edge of the disk at angle 0
    assert not sel[d0 < r_disk - 3].any()  # its flat interior
    assert not sel[np.hypot(rr, cc) < r_disk + 3].any()  # the central disk


def test_tabulated_interpolant_matches_the_warp_and_its_derivatives():
    rng = np.random.default_rng(0)
    noise = np.fft.fft2(rng.normal(size=(24, 24)))
    k = np.fft.fftfreq(24)
    smooth = np.exp(-2 * (np.pi * 1.5) ** 2 * (k[:, None] ** 2 + k[None, :] ** 2))  # blurred like a 1.5 px spot
    img = np.real(np.fft.ifft2(noise * smooth))[None].astype(np.float32)
    table = fit.interpolation_table(jnp.asarray(img))
    pts = rng.uniform(2, 21, size=(50, 2)).astype(np.float32)  # (row, col)
    got = np.asarray(fit._sample_table(table, jnp.int32(0), jnp.asarray(pts[:, 0]), jnp.asarray(pts[:, 1])))

    def value(p):
        grid = jnp.stack([(2 * p[1] + 1) / 24 - 1, (2 * p[0] + 1) / 24 - 1])[None, None, None]
        return warp.grid_sample(jnp.asarray(img)[..., None], grid, mode="cubic")[0, 0, 0, 0]

    want = np.asarray(jax.vmap(value)(jnp.asarray(pts)))
    grads = np.asarray(jax.vmap(jax.grad(value))(jnp.asarray(pts)))
    scale = np.abs(img).max()
    np.testing.assert_allclose(got[:, 0], want, atol=0.01 * scale)  # bilinear on a 4x finer table
    np.testing.assert_allclose(got[:, 1], grads[:, 0], atol=0.05 * scale)
    np.testing.assert_allclose(got[:, 2], grads[:, 1], atol=0.05 * scale)


def test_pixel_lists_are_the_same_on_the_host_and_on_the_device():
    rng = np.random.default_rng(1)
    mask = rng.uniform(size=(3, 20, 20)) > 0.7
    host_idx, host_n = fit._compact_host(mask, 150)
    for i in range(3):
        dev_idx, dev_n = fit._compact(jnp.asarray(mask[i]), 150, False)
        assert host_n[i] == mask[i].sum() == int(dev_n)
        np.testing.assert_array_equal(host_idx[i, : host_n[i]], np.asarray(dev_idx)[: host_n[i]])


def test_fit_error_shrinks_as_one_over_the_square_root_of_the_dose():
    """The covariance from the fit (inverse Fisher information times the reduced chi-square) falls as 1/sqrt(dose)
    and matches the scatter of the fitted strain over noise realisations."""
    size, g = 96, 26.0
    clean, _ = hex_patterns(1, size=size, g=g, spot_sigma=1.8, rotations=[0.3], max_strain=0.0)
    table = fit.prepare_bases(jnp.asarray(clean), (size // 2, size // 2), min_radius=g / 2)
    rng = np.random.default_rng(5)
    sigmas, spreads = [], []
    for dose in (200.0, 3200.0):
        x = rng.poisson(np.repeat(clean, 40, 0) * dose).astype(np.float32) / dose
        res = fit.fit_patterns(affine.identity_warp((40,)), jnp.asarray(x), jnp.full((40, 2), size // 2.0),
                               jnp.zeros(40, jnp.int32), table, steps=6)
        from ccstae_jax.mapping.reference import lattice_covariance, warp_covariance

        cov = lattice_covariance(np.asarray(res.theta), warp_covariance(res.fisher, res.chi2, res.dof), (size, size))
        sigmas.append(np.sqrt(np.median(cov[:, 0, 0])))
        lat = np.asarray(affine.lattice_from_warp(res.theta, (size, size)))
        spreads.append(lat[:, 0, 0].std())
    assert sigmas[0] / sigmas[1] == pytest.approx(4.0, rel=0.15)
    for s, spread in zip(sigmas, spreads):
        assert s == pytest.approx(spread, rel=0.35)


def test_symmetrized_base_is_invariant_under_lattice_rotations():
    cfg = ModelConfig(geometry=hex_geometry(64, 18.0))
    strained, _ = hex_patterns(1, size=64, g=18.0, spot_sigma=2.0, max_strain=0.05, seed=1)  # not 6-fold symmetric
    base = jnp.asarray(strained)
    sym = symmetrize(base, cfg)
    turn = about_center(affine.warp_matrix(rotation=jnp.array([np.pi / 3])), cfg)
    turned = warp.affine_warp(sym[..., None], turn)
    inner = np.asarray(masks.ring_mask((64, 64), 6, 24))  # the spots, without the (interpolation-sharp) centre
    peak = float(jnp.max(sym[0][inner]))
    np.testing.assert_allclose(np.asarray(turned[0, ..., 0])[inner], np.asarray(sym[0])[inner], atol=0.05 * peak)
    before = warp.affine_warp(base[..., None], turn)
    assert np.abs(np.asarray(before[0, ..., 0] - base[0])[inner]).max() > 0.2 * peak  # the input was not symmetric


def test_cubic_symmetrisation_keeps_a_sharp_disk_edge_sharper_than_bilinear():
    """Six 5-px disks on a hexagon: each rotation of a bilinear symmetrisation smooths their edges by its sub-pixel
    offsets; Keys' cubic keeps them as sharp as they were."""
    cfg = ModelConfig(geometry=hex_geometry(64, 18.0))
    rows, cols = np.mgrid[:64, :64] - 32.0
    angles = 0.1 + np.arange(6) * np.pi / 3
    disks = sum(jax.nn.sigmoid(-4.0 * (np.hypot(rows - 18 * np.sin(a), cols - 18 * np.cos(a)) - 5.0)) for a in angles)
    near = np.hypot(rows - 18 * np.sin(angles[0]), cols - 18 * np.cos(angles[0])) < 9

    def edge_pixels(image):  # pixels on the first disk's edge, between 10 % and 90 % of its plateau
        return int(np.sum((image[near] > 0.1) & (image[near] < 0.9)))

    widths = {mode: edge_pixels(np.asarray(symmetrize(jnp.asarray(disks)[None], cfg, mode=mode))[0])
              for mode in ("bilinear", "cubic")}
    assert widths["cubic"] <= 1.1 * edge_pixels(np.asarray(disks)) < widths["bilinear"], widths


def test_spot_amplitudes_measure_how_bright_each_radial_band_of_spots_is_against_the_base():
    size, g = 96, 22.0

    def pattern(amps, strain=0.0):  # unrotated, the lattice expanded by ``strain``
        return hex_patterns(1, size=size, g=g / (1 + strain), max_strain=0.0, rotations=[0.0], shell_amps=amps)[0]

    base = pattern((1.0, 0.5))
    table = fit.prepare_bases(jnp.asarray(base), (size // 2, size // 2), min_radius=g / 2)
    chex.assert_shape(table.band_edges, (1, fit.N_BANDS - 1))
    data = np.concatenate([pattern((1.5, 0.75), strain=0.01), pattern((1.0, 1.0), strain=-0.01)])
    res = fit.fit_patterns(affine.identity_warp((2,)), jnp.asarray(data), jnp.full((2, 2), size // 2.0),
                           jnp.zeros(2, jnp.int32), table, steps=6)
    amp = np.asarray(res.spot_amplitude)
    chex.assert_shape(amp, (2, fit.N_BANDS))
    np.testing.assert_allclose(amp[0], 1.5, rtol=0.05)  # every order 1.5x brighter
    inner, outer = amp[1, 0], amp[1, -1]  # the outer shell alone 2x brighter
    assert inner == pytest.approx(1.0, rel=0.05) and outer == pytest.approx(2.0, rel=0.1)


def _glowing(amps, strain, size=96, g=22.0):
    """A hex pattern (spot shells as bright as ``amps``, lattice expanded by ``strain``) on a diffuse glow that falls
    across the first-order spots, as the central beam's tails do."""
    rows, cols = np.mgrid[:size, :size].astype(np.float64) - size // 2
    glow = 3.0 / (1 + (rows**2 + cols**2) / 10.0**2)
    spots = hex_patterns(1, size=size, g=g / (1 + strain), max_strain=0.0, rotations=[0.2], shell_amps=amps,
                         spot_sigma=1.8)[0][0]
    return (spots + glow).astype(np.float32)


def _fit_glowing(data, scale_spots):
    size, g = 96, 22.0
    base = jnp.asarray(_glowing((1.0, 0.5), 0.0))[None]
    table = fit.prepare_bases(base, (size // 2, size // 2), min_radius=g / 2, scale_spots=scale_spots)
    n = len(data)
    return fit.fit_patterns(affine.identity_warp((n,)), jnp.asarray(data), jnp.full((n, 2), size // 2.0),
                            jnp.zeros(n, jnp.int32), table, steps=8)


def test_spots_brighter_or_dimmer_than_the_base_leave_the_strain_unbiased_when_their_scale_is_fitted():
    """On a sloping background the inner and outer edges of a spot weigh differently, so a pattern whose spots are
    1.6x brighter (or 0.6x dimmer) than its base's reads as a lattice shrunk (or stretched) unless the fit can
    scale the spots."""
    data = np.stack([_glowing((1.6, 0.8), 0.01), _glowing((0.6, 0.3), 0.01)])
    fixed = _strain(_fit_glowing(data, False).theta, 96)[:, :2] - 0.01
    free = _strain(_fit_glowing(data, True).theta, 96)[:, :2] - 0.01
    assert np.abs(fixed).min() > 3e-3  # both patterns, both axes: biased without the scale
    assert np.abs(free).max() < 5e-4


def test_a_lattice_mismatch_of_up_to_8_percent_is_recovered_as_strain_from_an_unstrained_start():
    """A second phase's larger (or smaller) lattice against a one-phase base: the fit, started at the identity as a
    bounded encoder might leave it, reaches the mismatch (pixel lists chosen again mid-fit, as a map fits)."""
    size, g = 96, 22.0
    mismatch = np.array([0.08, 0.04, -0.04, -0.08])
    base = hex_patterns(1, size=size, g=g, max_strain=0.0, rotations=[0.3])[0]
    data = np.concatenate([hex_patterns(1, size=size, g=g / (1 + m), max_strain=0.0, rotations=[0.3])[0]
                           for m in mismatch])
    table = fit.prepare_bases(jnp.asarray(base), (size // 2, size // 2), min_radius=g / 2)
    res = fit.fit_patterns(affine.identity_warp((4,)), jnp.asarray(data), jnp.full((4, 2), size / 2),
                           jnp.zeros(4, jnp.int32), table, steps=5, reselect=2)
    got = _strain(res.theta, size)
    np.testing.assert_allclose(got[:, 0], mismatch, atol=1.5e-3)
    np.testing.assert_allclose(got[:, 1], mismatch, atol=1.5e-3)
    np.testing.assert_allclose(got[:, 2], 0.0, atol=5e-4)


def test_fit_of_noisy_wide_disks_is_unbiased_and_scatters_as_its_error_bars_say():
    """Poisson draws (25 % glow) of one strained, turned pattern of 16-px disks, fitted with rigid spots against the
    exact expected pattern of the unstrained lattice from a start 0.03 rad and 1 % strain off: the mean is within a
    quarter of the scatter of the truth, and the scatter is the fit's own 1-sigma within 25 %."""
    from ccstae_jax.data.noise import DEFAULT_SCALE, add_background_noise, lorentzian_background
    from ccstae_jax.data.simulate import SimulationConfig, render_patterns
    from ccstae_jax.mapping.reference import warp_covariance

    w, n, cfg = 0.25, 96, SimulationConfig(disk_radius=16.0)
    clean = np.asarray(render_patterns(np.array([[0.0, 0.0, 0.0, 0.0], [0.015, -0.012, 0.01, 0.2]]), cfg))
    expected = DEFAULT_SCALE * (1 - w) * clean + DEFAULT_SCALE * w * lorentzian_background(clean.shape[-2:], width=0.01)[None]
    centre, zero_beam = (100.0, 100.0), jnp.full((n, 2), 100.0)
    table = fit.prepare_bases(jnp.asarray(expected[:1]), centre, min_radius=20.0, rigid_radius=16.0)
    truth = affine.identity_warp((1,))
    for _ in range(5):  # noise-free fit of the strained pattern, each within the trust region of the last
        truth = fit.fit_patterns(truth, jnp.asarray(expected[1:]), zero_beam[:1], jnp.zeros(1, jnp.int32), table,
                                 steps=20).theta
    phi_true = np.asarray(affine.invert(truth)).reshape(6)
    c, s = np.cos(0.03), np.sin(0.03)
    phi_start = phi_true.reshape(2, 3).copy()
    phi_start[:, :2] = np.array([[c, -s], [s, c]]) @ phi_start[:, :2] @ np.diag([1.01, 0.99])
    start = jnp.broadcast_to(affine.invert(jnp.asarray(phi_start[None], jnp.float32)), (n, 2, 3))
    draws = add_background_noise(jnp.broadcast_to(jnp.asarray(clean[1]), (n,) + clean.shape[-2:]), w,
                                 key=jax.random.key(3))
    res = fit.fit_patterns(start, draws, zero_beam, jnp.zeros(n, jnp.int32), table, steps=5, reselect=2)
    err = np.asarray(affine.invert(res.theta)).reshape(n, 6) - phi_true
    sigma = np.sqrt(np.median(np.diagonal(warp_covariance(res.fisher, res.chi2, res.dof), axis1=1, axis2=2), 0))
    spread = err.std(0)
    chex.assert_trees_all_equal(np.abs(err.mean(0)) < 0.25 * spread, np.ones(6, bool))
    np.testing.assert_allclose(spread, sigma, rtol=0.25)


def _pairs_of(images):
    """Neighbouring pairs 0-1, 2-3, ... of ``images`` compared over the whole frame."""
    n = len(images) // 2 * 2
    return np.stack([np.arange(0, n, 2), np.arange(1, n, 2)], -1)


def test_neighbour_noise_measures_the_shot_noise_of_poisson_data():
    """Half the squared difference of two Poisson draws of one pattern has the mean as its variance: the line
    fitted through the levels has slope 1 / dose and no offset."""
    clean, _ = hex_patterns(1, size=64, g=18.0, spot_sigma=1.5, rotations=[0.2], max_strain=0.0)
    dose = 400.0
    x = np.random.default_rng(0).poisson(np.repeat(clean + 0.05, 64, 0) * dose).astype(np.float32) / dose
    levels = fit.neighbour_noise(x, _pairs_of(x), np.ones((64, 64), bool), top=float(clean.max() + 0.05))
    chex.assert_shape(levels, (32, fit.N_LEVELS, 3))
    alpha, beta = fit._variance_line(*fit._robust_levels(levels))
    assert alpha == pytest.approx(1.0 / dose, rel=0.1)
    assert beta < 0.05 * alpha * clean.max()


def test_neighbour_noise_of_identical_patterns_is_zero():
    clean, _ = hex_patterns(1, size=64, g=18.0, spot_sigma=1.5, rotations=[0.2], max_strain=0.0)
    levels = fit.neighbour_noise(np.repeat(clean, 4, 0), _pairs_of(np.repeat(clean, 4, 0)), np.ones((64, 64), bool),
                                 top=float(clean.max()))
    assert np.all(levels[..., 0] == 0) and levels[..., 2].sum() == 2 * 64 * 64


def _levels(square_of_mean, n_items=50, top=1.0):
    """Per-item level sums whose mean square at mean ``m`` is ``square_of_mean(m)``, 100 pixels per level."""
    mean = (np.arange(fit.N_LEVELS) + 0.5) / fit.N_LEVELS * top
    one = np.stack([100 * square_of_mean(mean), 100 * mean, np.full(fit.N_LEVELS, 100.0)], -1)
    return np.repeat(one[None], n_items, 0), np.full(n_items, top)


def test_noise_weight_is_zero_for_noise_free_data_and_one_for_shot_noise_on_a_perfect_base():
    shot = lambda m: 0.01 * m
    fitted, top = _levels(shot)
    pairs, _ = _levels(shot)
    assert fit.noise_weight(fitted, top, pairs) == pytest.approx(1.0, abs=1e-6)
    misfit, top = _levels(lambda m: 1e-4 + 0 * m)
    silent, _ = _levels(lambda m: 0 * m)
    assert fit.noise_weight(misfit, top, silent) == 0.0


def test_noise_weight_blends_shot_noise_with_the_misfit_beyond_it():
    """Residuals exceeding the neighbours' shot noise by a constant ``e``: ``a = alpha top / (alpha top + e)``."""
    fitted, top = _levels(lambda m: 0.01 * m + 0.005, top=2.0)
    pairs, _ = _levels(lambda m: 0.01 * m, top=2.0)
    assert fit.noise_weight(fitted, top, pairs) == pytest.approx(0.02 / (0.02 + 0.005), rel=1e-3)


def test_noise_weight_ignores_pairs_across_a_grain_boundary_and_badly_fitted_patterns():
    fitted, top = _levels(lambda m: 0.01 * m)
    pairs, _ = _levels(lambda m: 0.01 * m)
    fitted[:5, :, 0] *= 50.0  # a few patterns the base does not describe
    pairs[:5, :, 0] *= 50.0  # a few pairs whose lattices differ
    assert fit.noise_weight(fitted, top, pairs) == pytest.approx(1.0, abs=1e-6)


def test_noise_weight_from_fits_is_near_one_on_noisy_patterns_and_near_zero_on_clean_ones_with_a_misfit():
    """Measured end to end: Poisson draws fitted against their true base give a weight near 1; noise-free patterns
    fitted against a base a little too sharp (a misfit, no noise) give one near 0."""
    size, g = 96, 26.0
    clean, _ = hex_patterns(1, size=size, g=g, spot_sigma=1.8, rotations=[0.3], max_strain=0.0)
    sharp, _ = hex_patterns(1, size=size, g=g, spot_sigma=1.6, rotations=[0.3], max_strain=0.0)
    centre = (size // 2, size // 2)
    region = masks.pixel_radii((size, size), centre) >= g / 2
    args = lambda n: (jnp.full((n, 2), size // 2.0), jnp.zeros(n, jnp.int32))
    noisy = np.random.default_rng(1).poisson(np.repeat(clean + 0.02, 32, 0) * 300.0).astype(np.float32) / 300.0
    table = fit.prepare_bases(jnp.asarray(clean + 0.02), centre, min_radius=g / 2)
    res = fit.fit_patterns(affine.identity_warp((32,)), jnp.asarray(noisy), *args(32), table, steps=4)
    pairs = fit.neighbour_noise(noisy, _pairs_of(noisy), region, float(np.median(res.top)))
    assert fit.noise_weight(res.residual_levels, res.top, pairs) > 0.9
    quiet = np.repeat(clean, 8, 0)
    table = fit.prepare_bases(jnp.asarray(sharp), centre, min_radius=g / 2)
    res = fit.fit_patterns(affine.identity_warp((8,)), jnp.asarray(quiet), *args(8), table, steps=4)
    pairs = fit.neighbour_noise(quiet, _pairs_of(quiet), region, float(np.median(res.top)))
    assert fit.noise_weight(res.residual_levels, res.top, pairs) < 0.05


def test_a_noise_weight_outside_zero_to_one_is_refused_by_name():
    clean, _ = hex_patterns(1, size=64, g=18.0, spot_sigma=1.5, rotations=[0.2], max_strain=0.0)
    with pytest.raises(ValueError, match=r"noise_weight = 1\.5: expected a share in \[0, 1\]"):
        fit.prepare_bases(jnp.asarray(clean), (32, 32), noise_weight=1.5)


def _neighbour_warps(n, sd, rng):
    """``n`` warps of positions along one scan row: identity plus independent errors of ``sd`` in the linear part."""
    theta = np.tile(np.asarray(affine.identity_warp(()), np.float64), (n, 1, 1))
    theta[:, :, :2] += rng.normal(0.0, sd, (n, 2, 2))
    return theta


def test_scatter_ratio_is_how_much_less_neighbouring_warps_differ_under_the_second_fit():
    rng = np.random.default_rng(0)
    a, b = _neighbour_warps(400, 2e-3, rng), _neighbour_warps(400, 1e-3, rng)
    pairs = np.stack([np.arange(399), np.arange(1, 400)], -1)
    assert fit.scatter_ratio(a, b, pairs) == pytest.approx(0.5, rel=0.1)
    assert fit.scatter_ratio(b, a, pairs) == pytest.approx(2.0, rel=0.1)


def test_scatter_ratio_leaves_out_pairs_across_a_grain_boundary():
    rng = np.random.default_rng(1)
    a, b = _neighbour_warps(400, 2e-3, rng), _neighbour_warps(400, 1e-3, rng)
    pairs = np.stack([np.arange(399), np.arange(1, 400)], -1)
    clean = fit.scatter_ratio(a, b, pairs)
    a[200:, 0, 0] += 0.05  # a second grain, 5 % strained, from position 200 on ...
    b[200:, 0, 0] += 0.08  # ... fitted differently by the second fit
    assert fit.scatter_ratio(a, b, pairs) == pytest.approx(clean, rel=0.02)


def test_scatter_ratio_is_one_without_a_usable_pair():
    a = _neighbour_warps(4, 1e-3, np.random.default_rng(2))
    assert fit.scatter_ratio(a, a * 2, np.zeros((0, 2), int)) == 1.0
    b = a.copy()
    b[1] = np.nan  # a failed fit
    assert fit.scatter_ratio(a, b, [[0, 1], [1, 2]]) == 1.0


def test_a_floor_outside_zero_to_one_is_refused_by_name():
    clean, _ = hex_patterns(1, size=64, g=18.0, spot_sigma=1.5, rotations=[0.2], max_strain=0.0)
    with pytest.raises(ValueError, match=r"floor = 0\.0: expected a fraction"):
        fit.prepare_bases(jnp.asarray(clean), (32, 32), floor=0.0)
