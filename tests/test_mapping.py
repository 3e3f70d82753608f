"""Specifications of the map of a scan: lattice signals, base re-estimation, and calibrated per-position errors."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _patterns import hex_geometry, hex_patterns
from ccstae_jax.ops import affine, warp
from ccstae_jax.data.simulate import SimulationConfig, pattern_function, simulate_scan
from ccstae_jax.model.geometry import measure_geometry
from ccstae_jax.model.masks import static_ring_mask
from ccstae_jax.mapping import bases, fit
from ccstae_jax.mapping.predict import (COARSE_STEPS, MapConfig, coarse_steps_for, corner_margin, lattice_signals,
                                        margin_for, rigid_spots_for, scale_spots_for, subset_rows)
from ccstae_jax.mapping.reference import (lattice_covariance, referenced_strain, region_mask, strain_uncertainty,
                                          warp_covariance)
from ccstae_jax.model.networks import symmetrize
from ccstae_jax.train.objective import CCSTAETask, configure


def _fast_task(x, geometry=None, **model_overrides):
    geometry = hex_geometry(x.shape[-1], 18.0) if geometry is None else geometry
    mcfg, lcfg = configure(x, preset="fast", geometry=geometry, model_overrides=model_overrides or None)
    task = CCSTAETask(mcfg, lcfg)
    return task, task.init_params(jax.random.key(0), x)


def test_lattice_significance_separates_a_lattice_from_pure_background():
    """A lattice pattern stands out of the noise of the orders no lattice has; Poisson background alone does not."""
    lattice, _ = hex_patterns(4, size=64, g=18.0, seed=3)
    rng = np.random.default_rng(0)
    r = np.hypot(*np.mgrid[:64, :64] - 32)
    glow = 200.0 / (1 + (r / 3) ** 2)
    background = rng.poisson(np.broadcast_to(glow, (4, 64, 64))).astype(np.float32)
    noisy_lattice = rng.poisson(lattice * 50 + glow).astype(np.float32)
    task, _ = _fast_task(lattice)
    centre = jnp.full((4, 2), 32.0)
    sig_lattice = np.asarray(lattice_signals(task, jnp.asarray(noisy_lattice), centre)["lattice_significance"])
    sig_background = np.asarray(lattice_signals(task, jnp.asarray(background), centre)["lattice_significance"])
    assert (sig_lattice > 4).all(), sig_lattice
    assert (sig_background < 4).all(), sig_background


def test_reestimated_base_is_the_symmetrised_mean_of_the_aligned_patterns_without_padding():
    x, _ = hex_patterns(3, size=64, g=18.0, seed=5)
    task, params = _fast_task(x)
    sums, coverage, counts = bases.make_accumulator(task)(jnp.asarray(x), affine.identity_warp((3,)),
                                                          jnp.zeros(3, jnp.int32), jnp.array([1.0, 1.0, 0.0]), None)
    np.testing.assert_array_equal(np.asarray(counts), [2.0])  # the third pattern is padding
    got = bases.reestimate(task, params, sums, coverage, counts)
    scale = task.model_cfg.intensity_scale
    want = np.asarray(symmetrize(jnp.asarray(x[:2].mean(0) * scale)[None], task.model_cfg, mode="cubic"))
    seen = np.asarray(symmetrize(jnp.ones((1, 64, 64)), task.model_cfg, mode="cubic")) >= bases.MIN_SUPPORT
    np.testing.assert_array_equal(np.asarray(got.support), seen)
    inner = static_ring_mask((64, 64), -1, 20)[None]  # well inside the frame every rotation covers it fully
    np.testing.assert_allclose(np.asarray(got.bases)[inner], want[inner], rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_reestimated_base_averages_each_pixel_over_the_patterns_that_saw_it():
    """A pattern pulled from outside the detector adds nothing to a base pixel: the mean is not diluted by padding,
    and pixels no pattern saw often enough are marked unsupported."""
    task, params = _fast_task(hex_patterns(2, size=64, g=18.0, seed=5)[0], symmetrize_bases=False)
    x = np.full((2, 64, 64), 2.0, np.float32)
    shift = np.asarray(affine.identity_warp((2,))).copy()
    shift[1, 0, 2] = 1.0  # the second pattern is pulled half a frame to the side: the right half sees nothing
    sums, coverage, counts = bases.make_accumulator(task)(jnp.asarray(x), jnp.asarray(shift),
                                                          jnp.zeros(2, jnp.int32), jnp.ones(2), None)
    got = bases.reestimate(task, params, sums, coverage, counts, min_support=0.75)
    want = 2.0 * task.model_cfg.intensity_scale
    np.testing.assert_allclose(np.asarray(got.bases)[0][np.asarray(got.support)[0]], want, rtol=1e-4)
    assert np.asarray(got.support)[0, :, :31].all() and not np.asarray(got.support)[0, :, 33:].any()


def _turn_about_centre(angle, size):
    """``(1, 2, 3)`` pull warp turning a ``size`` x ``size`` frame by ``angle`` about its centre pixel."""
    c = (2 * (size // 2) + 1) / size - 1
    lin = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return np.concatenate([lin, (c - lin @ [c, c])[:, None]], 1)[None].astype(np.float32)


def test_a_base_frame_with_a_margin_receives_the_corners_of_a_turned_pattern():
    """Pulled onto a base frame that extends the pattern's by `corner_margin`, a pattern turned by its warp lands
    whole (the base pixels it covers add up to the pattern's area) and the pattern frame receives what it receives
    without the margin; without it the turned corners are lost."""
    size = 64
    x, _ = hex_patterns(1, size=size, g=18.0, seed=5)
    task, _ = _fast_task(x, symmetrize_bases=False)
    margin = corner_margin((size, size), (size // 2, size // 2))
    args = (jnp.asarray(x), jnp.asarray(_turn_about_centre(0.5, size)), jnp.zeros(1, jnp.int32), jnp.ones(1), None)
    sums0, cover0, _ = bases.make_accumulator(task)(*args)
    sums, cover, _ = bases.make_accumulator(task, margin=margin)(*args)
    chex.assert_shape(sums, (1, size + 2 * margin, size + 2 * margin))
    inner = (slice(None), slice(margin, margin + size), slice(margin, margin + size))
    np.testing.assert_allclose(np.asarray(sums)[inner], np.asarray(sums0), rtol=1e-5, atol=1e-6)
    assert abs(float(cover.sum()) - size * size) < 0.01 * size * size, float(cover.sum())
    assert float(cover0.sum()) < 0.85 * size * size, float(cover0.sum())


@pytest.mark.parametrize("shape, center", [((64, 64), (32, 32)), ((200, 200), (100.0, 100.0)),
                                           ((128, 96), (70.0, 40.0))])
def test_corner_margin_holds_every_pixel_of_the_pattern_turned_any_way_and_strained(shape, center):
    """The margin is enough (every pixel turned and stretched by 3 % stays in the base frame) and not much more."""
    h, w = shape
    rows, cols = np.mgrid[:h, :w]

    def holds(margin):
        for angle in np.linspace(0, 2 * np.pi, 73):
            c, s = np.cos(angle), np.sin(angle)
            dr, dc = (rows - center[0]) * 1.03, (cols - center[1]) * 1.03
            r, q = center[0] + c * dr - s * dc, center[1] + s * dr + c * dc
            if r.min() < -margin or r.max() > h - 1 + margin or q.min() < -margin or q.max() > w - 1 + margin:
                return False
        return True

    margin = corner_margin(shape, center)
    assert holds(margin) and not holds(margin - 4), margin


def test_the_margin_of_a_map_is_the_corners_own_unless_set_and_none_without_a_base_update():
    x, _ = hex_patterns(1, size=64, g=18.0, seed=5)
    cfg = _fast_task(x)[0].model_cfg
    assert margin_for(MapConfig(), cfg) == corner_margin((64, 64), cfg.center_px) > 0
    assert margin_for(MapConfig(margin=5), cfg) == 5
    assert margin_for(MapConfig(base_update=False), cfg) == 0 and margin_for(MapConfig(steps=0), cfg) == 0


@pytest.mark.parametrize("margin", [-1, 2.5, True])
def test_a_margin_that_is_not_a_count_of_pixels_is_refused(margin):
    with pytest.raises(ValueError, match="margin"):
        MapConfig(margin=margin)


def test_a_rigid_pull_puts_strained_wide_disks_back_on_the_base_unstretched():
    """With rigid spots each disk is pulled back by the shift of its centre: the aligned pattern equals the base,
    where the affine pull leaves every disk stretched by the strain."""
    size, g, sigma = 128, 26.0, 4.0
    rows, cols = np.mgrid[:size, :size] - size // 2

    def pattern(m):
        img = np.zeros((size, size))
        for a in np.arange(6) * np.pi / 3 + 0.2:
            r, c = m @ (g * np.array([np.cos(a), np.sin(a)]))
            img += np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * sigma**2))
        return img.astype(np.float32)

    base, strained = pattern(np.eye(2)), pattern(np.diag([1.03, 0.98]))
    table = fit.prepare_bases(jnp.asarray(base)[None], (size // 2, size // 2), min_radius=g / 2,
                              rigid_radius=2 * sigma)
    centre = (2 * (size // 2) + 1) / size - 1
    lin = np.diag([0.98, 1.03])  # (x, y) = (column, row)
    theta = np.concatenate([lin, (centre - lin @ [centre, centre])[:, None]], 1)[None].astype(np.float32)
    grid = bases.rigid_grid(jnp.asarray(theta), table.centres, table.owner)
    rigid = np.asarray(warp.grid_sample(jnp.asarray(strained)[None, ..., None], grid, mode="cubic"))[0, ..., 0]
    stretched = np.asarray(warp.affine_warp(jnp.asarray(strained)[None, ..., None], jnp.asarray(theta),
                                            mode="cubic"))[0, ..., 0]
    ring = static_ring_mask((size, size), g - 2 * sigma, g + 2 * sigma)
    err_rigid, err_stretched = np.abs(rigid - base)[ring].max(), np.abs(stretched - base)[ring].max()
    assert err_rigid < 0.25 * err_stretched, (err_rigid, err_stretched)


def test_a_rigid_pull_moves_pixels_owned_by_no_spot_with_the_affine_warp_and_turns_a_spot_with_the_lattice():
    h = w = 16
    centres = jnp.asarray([[[0.0, 0.0], [0.5, 0.5]]], jnp.float32)
    owner = np.ones((1, h, w), np.int32)
    owner[0, :4, :4] = -1  # out of every spot's reach
    theta = jnp.asarray([[[1.02, 0.01, 0.03], [-0.01, 0.97, -0.02]]], jnp.float32)
    grid = np.asarray(bases.rigid_grid(theta, centres, jnp.asarray(owner)))
    x = (2 * np.arange(w) + 1) / w - 1
    xy = np.stack(np.broadcast_arrays(x[None, :], x[:, None]), -1)
    affine_grid = xy @ np.asarray(theta[0, :, :2]).T + np.asarray(theta[0, :, 2])
    np.testing.assert_allclose(grid[0, :4, :4], affine_grid[:4, :4], atol=1e-6)
    lin = np.asarray(theta[0, :, :2], np.float64)
    moved_centre = lin @ [0.5, 0.5] + np.asarray(theta[0, :, 2])
    angle = np.arctan2(lin[1, 0] - lin[0, 1], lin[0, 0] + lin[1, 1])  # square pattern: the same on the pixel grid
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    want = moved_centre + (xy[8:, 8:] - 0.5) @ turn.T  # spot 1: moved with its centre, turned with the lattice
    np.testing.assert_allclose(grid[0, 8:, 8:], want, atol=1e-6)


def test_a_class_without_patterns_keeps_its_learned_base():
    x, _ = hex_patterns(2, size=64, g=18.0, seed=5)
    task, params = _fast_task(x, num_bases=2)
    learned = np.asarray(task.model.apply({"params": params}, method=lambda m: m.dictionary()))
    sums = np.stack([np.full((64, 64), 3.0, np.float32), np.zeros((64, 64), np.float32)])
    coverage = np.stack([np.ones((64, 64), np.float32), np.zeros((64, 64), np.float32)])
    got = bases.reestimate(task, params, jnp.asarray(sums), jnp.asarray(coverage), jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(np.asarray(got.bases)[1], learned[1])
    assert np.asarray(got.support)[1].all()
    assert not np.allclose(np.asarray(got.bases)[0], learned[0])


def test_subset_rows_spread_over_the_scan_and_respect_the_budget():
    rows = subset_rows((64, 64), 2048)
    assert len(rows) == 32 and rows[0] == 0 and rows[-1] == 63
    assert len(subset_rows((10, 500), 100)) == 1


def test_per_position_errors_are_calibrated_on_simulated_noisy_patterns():
    """Fitting simulated 25 %-noise patterns against their grain's true, unstrained pattern: the errors against the
    labels, divided by the map's own 1-sigma, scatter with a standard deviation near 1."""
    cfg = SimulationConfig(scan_shape=(16, 16), detector_size=128, crop=(0, 128), n_grains=2, noise_level=0.25,
                           boundary_sigma=0.0, max_strain=0.01, seed=7, reference_region=(0, 8, 0, 16))
    data, labels = simulate_scan(cfg)
    x = data.reshape(-1, 128, 128)
    geometry = measure_geometry(x)
    scale = 1.0 / x.mean()
    truth = np.asarray(pattern_function(cfg)(jnp.zeros(4))) * cfg.intensity_scale * scale
    table = fit.prepare_bases(jnp.asarray(truth)[None], geometry.center, min_radius=geometry.fit_min_radius)
    # start each pattern at its grain's warp, slightly off (the encoder's job)
    lat = np.asarray(affine.lattice_from_strain(*(labels[k] for k in ("strain_xx", "strain_yy", "shear_xy",
                                                                        "rotation"))), np.float64).reshape(-1, 2, 2)
    theta0 = np.asarray(affine.warp_from_lattice(jnp.asarray(lat * 1.002, jnp.float32), (128, 128)))
    res = fit.fit_patterns(jnp.asarray(theta0), jnp.asarray(x * scale), jnp.full((len(x), 2), 64.0),
                           jnp.zeros(len(x), jnp.int32), table, steps=6)
    got_lat = np.asarray(affine.lattice_from_warp(res.theta, (128, 128)), np.float64)
    cov = lattice_covariance(np.asarray(res.theta), warp_covariance(res.fisher, res.chi2, res.dof), (128, 128))
    ref = region_mask(cfg.scan_shape, cfg.reference_region).reshape(-1)
    got = referenced_strain(got_lat, ref)
    want = referenced_strain(lat, ref)
    sigma = strain_uncertainty(got_lat, cov, ref)
    for k in ("strain_xx", "strain_yy", "shear_xy"):
        z = (got[k] - want[k]) / sigma[k]
        assert 0.7 < np.std(z) < 1.3, (k, np.std(z))
        assert np.mean(np.abs(z) <= 2) > 0.88, k


def _tiny_scan(tmp_path, seed: int):
    """A simulated 4 x 8 scan of 64 x 64 patterns at 25 % noise, two grains."""
    from ccstae_jax.data.simulate import simulate_to_hdf5

    cfg = SimulationConfig(scan_shape=(4, 8), detector_size=64, crop=(0, 64), n_grains=2, noise_level=0.25,
                           seed=seed)
    return simulate_to_hdf5(tmp_path / "s.h5", cfg, progress=False)


def _task_of(scan):
    x = scan.read(0, scan.n_positions)
    return _fast_task(x, geometry=measure_geometry(x))


def test_a_map_split_over_four_devices_equals_the_one_device_map(tmp_path):
    """The map's steps are data-parallel: the same warps from a 4-device mesh as from one device."""
    from ccstae_jax.data.readers import open_scan
    from ccstae_jax.mapping.predict import MapConfig, map_scan
    from ccstae_jax.train.parallel import make_mesh

    with open_scan(_tiny_scan(tmp_path, seed=1)) as scan:
        task, params = _task_of(scan)
        config = MapConfig(steps=2, batch_size=8, subset=16, base_rounds=1, coarse_steps=1)
        one = map_scan(task, params, scan, config, mesh=None)
        four = map_scan(task, params, scan, config, mesh=make_mesh())
    np.testing.assert_allclose(four["theta"], one["theta"], atol=1e-4)
    np.testing.assert_array_equal(four["class_index"], one["class_index"])


def test_the_fit_compiles_for_the_learned_and_for_the_reestimated_bases_and_not_again_for_a_second_map(tmp_path):
    """The re-estimated dictionaries of the base-estimate rounds and of the final pass are arguments of one compiled
    fit (the learned one of another, with longer pixel lists), and a second map of a scan with the same run reuses
    both."""
    from ccstae_jax.data.readers import open_scan
    from ccstae_jax.mapping.predict import MapConfig, make_fit_fn, map_scan

    with open_scan(_tiny_scan(tmp_path, seed=2)) as scan:
        task, params = _task_of(scan)
        config = MapConfig(steps=2, batch_size=8, subset=16, base_rounds=3, coarse_steps=1)
        fit_fn = make_fit_fn(task, config.steps, coarse_steps=config.coarse_steps, reselect=config.reselect,
                             mesh=None)
        before = fit_fn._cache_size()
        first = map_scan(task, params, scan, config, mesh=None)
        assert fit_fn._cache_size() - before == 2
        second = map_scan(task, params, scan, config, mesh=None)
        assert fit_fn._cache_size() - before == 2
    np.testing.assert_array_equal(second["theta"], first["theta"])
    # the subset was also fitted at the lower floor (the same compiled fit), which is kept only where it helps
    assert np.isfinite(first["floor_ratio"])
    assert first["fit_floor"] == (fit.LOW_FLOOR if first["floor_ratio"] <= fit.FLOOR_GAIN else fit.DEFAULT_FLOOR)
    # and against the smoothed spots, kept on the same terms
    assert np.isfinite(first["blur_ratio"])
    assert first["fit_blur"] == (fit.BASE_BLUR if first["blur_ratio"] <= fit.FLOOR_GAIN else 0.0)


def test_a_map_with_a_set_floor_fits_with_it_and_compares_none(tmp_path):
    from ccstae_jax.data.readers import open_scan
    from ccstae_jax.mapping.predict import map_scan

    with open_scan(_tiny_scan(tmp_path, seed=2)) as scan:
        task, params = _task_of(scan)
        out = map_scan(task, params, scan, MapConfig(steps=2, batch_size=8, subset=16, base_rounds=1, floor=0.2),
                       mesh=None)
    assert out["fit_floor"] == np.float64(0.2) and np.isnan(out["floor_ratio"])


def test_a_map_with_a_set_blur_fits_the_smoothed_spots_and_compares_none(tmp_path):
    from ccstae_jax.data.readers import open_scan
    from ccstae_jax.mapping.predict import map_scan

    with open_scan(_tiny_scan(tmp_path, seed=2)) as scan:
        task, params = _task_of(scan)
        config = MapConfig(steps=2, batch_size=8, subset=16, base_rounds=1, floor=0.3)
        sharp = map_scan(task, params, scan, dataclasses.replace(config, blur=0.0), mesh=None)
        smooth = map_scan(task, params, scan, dataclasses.replace(config, blur=1.5), mesh=None)
    assert sharp["fit_blur"] == 0.0 and np.isnan(sharp["blur_ratio"])
    assert smooth["fit_blur"] == 1.5 and np.isnan(smooth["blur_ratio"])
    # the same start and bases; only the smoothing of the fitted spots differs
    assert np.max(np.abs(smooth["theta"] - sharp["theta"])) > 1e-5


@pytest.mark.parametrize("blur", [-0.5, float("nan")])
def test_a_negative_or_undefined_blur_is_refused_by_the_map_config(blur):
    with pytest.raises(ValueError, match=r"blur = .*: expected None or a width >= 0 in pixels"):
        MapConfig(blur=blur)


def test_a_floor_outside_zero_to_one_is_refused_by_the_map_config():
    with pytest.raises(ValueError, match=r"floor = 1\.5: expected None or a fraction in \(0, 1\]"):
        MapConfig(floor=1.5)


def test_bases_of_two_phases_are_registered_by_their_lattice_mismatch():
    """A second base with a 4 % larger lattice (spots 4 % closer in) is registered onto base 0 by that strain."""
    from ccstae_jax.mapping.predict import register_bases

    first = hex_patterns(1, size=64, g=18.0, max_strain=0.0, rotations=[0.0])[0][0]
    second = hex_patterns(1, size=64, g=18.0 / 1.04, max_strain=0.0, rotations=[0.0])[0][0]
    stack = jnp.asarray(np.stack([first, second]))
    table = fit.prepare_bases(stack[:1], (32, 32), min_radius=9.0)
    theta = register_bases(stack, table, (32.0, 32.0))
    np.testing.assert_array_equal(theta[0], np.asarray(affine.identity_warp(())))
    lat = np.asarray(affine.lattice_from_warp(jnp.asarray(theta[1]), (64, 64)))
    np.testing.assert_allclose(np.diag(lat), [1.04, 1.04], atol=4e-3)


def _wide_and_narrow():
    """Geometries of 16-px (wide) and 3.7-px disks at a 38-px spot spacing."""
    from ccstae_jax.model.geometry import Geometry

    wide = Geometry(pattern_shape=(200, 200), center=(100.0, 100.0), disk_radius=16.0, spot_spacing=38.0,
                    symmetry=6, ring=(18.0, 85.0))
    return wide, dataclasses.replace(wide, disk_radius=3.7)


def test_rigid_spots_are_chosen_for_wide_disks_unless_set_and_never_without_a_fit():
    wide, narrow = _wide_and_narrow()
    assert rigid_spots_for(MapConfig(), wide) and not rigid_spots_for(MapConfig(), narrow)
    assert not rigid_spots_for(MapConfig(rigid_spots=False), wide)
    assert rigid_spots_for(MapConfig(rigid_spots=True), narrow)
    assert not rigid_spots_for(MapConfig(steps=0), wide)


def test_the_coarse_fit_runs_for_stretched_spots_and_not_for_rigid_ones_unless_set():
    wide, narrow = _wide_and_narrow()
    assert coarse_steps_for(MapConfig(), narrow) == COARSE_STEPS > 0
    assert coarse_steps_for(MapConfig(), wide) == 0
    assert coarse_steps_for(MapConfig(rigid_spots=False), wide) == COARSE_STEPS
    assert coarse_steps_for(MapConfig(coarse_steps=2), wide) == 2
    assert coarse_steps_for(MapConfig(coarse_steps=0), narrow) == 0


def test_the_spots_scale_is_fitted_only_when_asked_and_never_with_rigid_spots_or_without_a_fit():
    wide, narrow = _wide_and_narrow()
    assert scale_spots_for(MapConfig(scale_spots=True), narrow) and not scale_spots_for(MapConfig(), narrow)
    assert not scale_spots_for(MapConfig(scale_spots=True), wide)
    assert scale_spots_for(MapConfig(scale_spots=True, rigid_spots=False), wide)
    assert not scale_spots_for(MapConfig(scale_spots=True, steps=0), narrow)


def test_a_spots_scale_that_is_not_a_boolean_is_refused_by_the_map_config():
    with pytest.raises(ValueError, match=r"scale_spots = 'yes': expected True or False"):
        MapConfig(scale_spots="yes")
