"""Specifications of benchmarks/abtem_scan.py that need no abTEM: geometry, lattice cut, scan assembly, file layout,
pattern cache and the spot-fit physics check (fed our kinematic simulator's patterns in place of multislice ones)."""
import json
import math

import h5py
import numpy as np
import pytest

from _scripts import load_script
from ccstae_jax.data.readers import load_labels, open_scan
from ccstae_jax.data.simulate import SimulationConfig, deformation_matrix, render_patterns, simulate_scan

ab = load_script("abtem_scan", "benchmarks/abtem_scan.py")


@pytest.fixture(scope="module")
def small_polycrystal():
    """An 8 x 8 scan of 3 grains and the simulator's clean per-grain patterns (200 x 200, 3.7 px disks)."""
    config, grains, labels = ab.grain_setup(scan=8, grains=3, seed=1)
    patterns = np.asarray(render_patterns(grains.params, config))
    return config, grains, labels, patterns


def _fake_info(n_positions):
    return dict(slices=3, offsets=np.zeros((n_positions, 2)), abtem_version="none (test)")


def test_default_geometry_matches_the_simulator_benchmark():
    geo = ab.Geometry(probe_mrad=0.7)
    assert geo.cell == pytest.approx(312.5)
    assert geo.g1_px == pytest.approx(38.148, abs=1e-3)
    assert geo.disk_radius == pytest.approx(3.704, abs=1e-3)
    assert ab.Geometry(probe_mrad=3.0).disk_radius == pytest.approx(15.87, abs=1e-2)
    assert ab.electron_wavelength(300e3) == pytest.approx(0.019687, abs=1e-6)


def test_geometry_rejects_a_grid_too_coarse_for_the_crop():
    with pytest.raises(ValueError, match="gpts=768 is too coarse"):
        ab.Geometry(gpts=768)


def test_deformation_is_the_simulators():
    params = np.array([0.013, -0.007, 0.004, 2.1])
    np.testing.assert_allclose(ab.deformation(params), np.asarray(deformation_matrix(params)), atol=1e-6)


def test_binning_is_centred_on_the_zero_beam_and_keeps_intensity():
    fine = np.zeros((2, 64, 64))
    fine[0, 32, 32] = 1.0  # zero beam of an fft-shifted 64 grid
    fine[1, 31:34, 31:34] = 1.0  # the 3 x 3 block around it
    out = ab.bin_centred(fine, oversample=3, detector=20)
    assert out.shape == (2, 20, 20)
    assert out[0, 10, 10] == 1.0 and out[0].sum() == 1.0
    assert out[1, 10, 10] == 9.0 and out[1].sum() == 9.0


def test_lattice_cut_applies_the_deformation_about_the_cell_centre():
    params = np.array([0.02, -0.01, 0.005, 0.4])
    cell = 40.0
    symbols, xyz = ab.ws2_positions(params, cell=cell)
    assert len(symbols) == len(xyz)
    assert np.all((xyz[:, :2] >= 0) & (xyz[:, :2] < cell))
    w = xyz[np.array(symbols) == "W", :2] - cell / 2
    a1 = ab.deformation(params) @ np.array([3.153, 0.0])
    for target in (np.zeros(2), a1, -a1):
        assert np.min(np.linalg.norm(w - target, axis=1)) < 1e-9
    assert sorted(set(np.round(xyz[:, 2], 6))) == pytest.approx([0.785, 2.355, 3.925])
    n_w, n_s = symbols.count("W"), symbols.count("S")
    assert n_w == pytest.approx(cell**2 / (3.153**2 * math.sqrt(3) / 2 * (1 + 0.02) * (1 - 0.01)), rel=0.1)
    assert abs(n_s - 2 * n_w) < 0.1 * n_s


def test_one_pattern_per_grain_gives_the_simulators_scan(small_polycrystal):
    config, grains, _, patterns = small_polycrystal
    expected, _ = simulate_scan(config)  # noise_level None: the raw boundary-mixed patterns
    choice = np.zeros(config.scan_shape, int)
    ours = np.stack([row for _, row in ab.assemble_rows(patterns[:, None], config, grains, choice, noise=None)])
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6 * expected.max())


def test_each_position_uses_its_chosen_probe_pattern(small_polycrystal):
    config, grains, labels, patterns = small_polycrystal
    stack = np.stack([patterns, 2 * patterns], axis=1)  # two "probe positions" per grain
    choice = ab.pattern_choice(config.scan_shape, 2, config.seed)
    assert set(np.unique(choice)) == {0, 1}
    data = np.stack([row for _, row in ab.assemble_rows(stack, config, grains, choice, noise=None)])
    interior = labels["interior"]
    ratio = data.sum(axis=(2, 3)) / patterns[labels["grain_index"]].sum(axis=(2, 3))
    np.testing.assert_allclose(ratio[interior], (1 + choice)[interior], rtol=1e-5)


def test_noise_is_seeded_per_row_and_zero_noise_is_the_scaled_pattern(small_polycrystal):
    config, grains, _, patterns = small_polycrystal
    choice = np.zeros(config.scan_shape, int)

    def rows(noise):
        return np.stack([r for _, r in ab.assemble_rows(patterns[:, None], config, grains, choice, noise=noise)])

    clean = rows(None)
    np.testing.assert_allclose(rows(0.0), clean * config.intensity_scale, rtol=1e-6)
    noisy = rows(0.25)
    np.testing.assert_array_equal(noisy, rows(0.25))
    assert not np.array_equal(noisy, rows(0.5))
    expected = (0.75 * clean.sum(axis=(2, 3)) + 0.25) * config.intensity_scale  # the glow sums to 1
    # 64 patterns of 1e5 Poisson counts: the mean total is within 0.05 % (1 sigma) of its expectation.
    assert noisy.sum(axis=(2, 3)).mean() == pytest.approx(expected.mean(), rel=0.003)


def test_written_file_has_our_layout_and_opens_with_our_readers(small_polycrystal, tmp_path):
    config, grains, labels, patterns = small_polycrystal
    geo = ab.Geometry(probe_mrad=0.7, positions=2)
    stack = np.stack([patterns, patterns], axis=1)
    path = ab.write_scan(tmp_path / "scan.h5", stack, config=config, grains=grains, labels=labels, geometry=geo,
                         noise=0.25, info=_fake_info(2), central_frac=0.98)
    with open_scan(path) as scan:
        assert scan.scan_shape == (8, 8) and scan.pattern_shape == (200, 200)
        np.testing.assert_array_equal(scan.read(0, 8), np.concatenate(
            [row for _, row in ab.assemble_rows(stack, config, grains, ab.pattern_choice((8, 8), 2, config.seed),
                                                noise=0.25)])[:8])
    loaded = load_labels(path, shape=(8, 8))
    for name in ("strain_xx", "strain_yy", "shear_xy", "rotation", "grain_index", "interior"):
        np.testing.assert_array_equal(loaded[name], labels[name])
    with h5py.File(path, "r") as f:
        assert f["data"].dtype == np.float32 and f["data"].chunks == (1, 8, 200, 200)
        assert f.attrs["format"] == "ccstae-abtem-1"
        assert tuple(f.attrs["reference_region"]) == config.reference_bounds
        assert tuple(f.attrs["pattern_centre"]) == (100, 100)
        assert f.attrs["noise_level"] == 0.25 and f.attrs["lattice_symmetry"] == 6
        assert f.attrs["disk_radius"] == pytest.approx(geo.disk_radius)
        assert "0.7 mrad" in f.attrs["source"] and "300 kV" in f.attrs["source"]
        assert json.loads(f.attrs["config"])["positions"] == 2
        np.testing.assert_array_equal(f["grains/params"][...], grains.params)
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize(
    "probe_mrad, radius, edge, central, tol",
    [
        # Small disks, by centroid: a 1 px soft edge keeps the centroid of point-sampled disks exact.
        (0.7, 3.7, 1.0, 0.95, 3e-5),
        # Large disks, by their edges: a weaker central beam keeps its soft edge out of the first-order rays.
        (3.0, 15.87, 0.5, 0.3, 2e-4),
    ],
)
def test_physics_check_recovers_the_grains_of_kinematic_patterns(probe_mrad, radius, edge, central, tol):
    # Our simulator's patterns stand in for multislice ones: the labels must come back through the spot fits.
    from ccstae_jax.data.simulate import make_grains

    config = SimulationConfig(scan_shape=(8, 8), n_grains=6, seed=3, disk_radius=radius, disk_edge=edge,
                              central_frac=central)
    params = make_grains(config).params
    patterns = np.asarray(render_patterns(params, config))[:, None]
    res = ab.physics_check(patterns, params, ab.Geometry(probe_mrad=probe_mrad))
    assert np.abs(params[1:, :3]).max() > 0.01  # the grains are strained and rotated
    for name, err in res["max_abs_error"].items():
        assert err < tol, (name, err)
    assert res["g1_px_measured"] == pytest.approx(38.148, abs=0.01)
    assert res["radius_px"] == pytest.approx(radius, abs=0.2)
    assert res["off_disk_fraction"] < 1e-2  # soft edges put about 1e-3 beyond radius + 3


def test_disk_centre_names_its_methods():
    with pytest.raises(ValueError, match="method='fit': expected 'centroid' or 'edge'"):
        ab.disk_centre(np.ones((20, 20)), (10, 10), 3.0, method="fit")


def test_strain_from_spots_inverts_the_spot_transform():
    geo = ab.Geometry()
    g = ab.first_order_g(geo)
    params = np.array([-0.015, 0.012, -0.008, math.radians(217.0)])
    spots = g @ np.linalg.inv(ab.deformation(params))  # rows: (A^-T g)^T
    spots = spots[np.argsort(np.arctan2(spots[:, 1], spots[:, 0]))]
    est, rms = ab.strain_from_spots(spots, g)
    np.testing.assert_allclose(est[:3], params[:3], atol=1e-12)
    assert abs(ab.wrap60(est[3] - params[3])) < 1e-12 and rms < 1e-9


def test_cache_is_reused_only_for_the_same_settings(tmp_path, monkeypatch):
    calls = []

    def fake(params, geometry, *, seed, log=print):
        calls.append(geometry)
        shape = (len(params), geometry.positions, geometry.detector, geometry.detector)
        return np.full(shape, len(calls), np.float32), dict(_fake_info(geometry.positions), seconds=0.0)

    monkeypatch.setattr(ab, "multislice_patterns", fake)
    params = np.zeros((2, 4))
    cache = tmp_path / "c.npz"
    first, _ = ab.load_or_compute(cache, ab.Geometry(positions=1), params, seed=0, log=lambda s: None)
    again, info = ab.load_or_compute(cache, ab.Geometry(positions=1), params, seed=0, log=lambda s: None)
    assert len(calls) == 1 and np.array_equal(first, again) and info["slices"] == 3
    ab.load_or_compute(cache, ab.Geometry(positions=1, probe_mrad=0.7), params, seed=0, log=lambda s: None)
    ab.load_or_compute(cache, ab.Geometry(positions=1, probe_mrad=0.7), params, seed=1, log=lambda s: None)
    assert len(calls) == 3
