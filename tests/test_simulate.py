"""Specifications of ccstae_jax.data.simulate: geometry, frame, labels, determinism and the HDF5 layout."""
import math
import os

import h5py
import jax
import numpy as np
import pytest
from scipy.linalg import polar

from ccstae_jax.data import simulate as sim

# Unit-test scale: 8 x 8 scan, 64 px detector (cropped to 50 px), 3 grains.
# batch_rows=3 (3 + 3 + 2 rows, the last batch padded) and w=0.2 are shared to reuse one compilation.
TINY = dict(scan_shape=(8, 8), detector_size=64, n_grains=3, disk_radius=2.0, seed=3, batch_rows=3, noise_level=0.2)


def _tiny(**kw):
    return sim.SimulationConfig(**{**TINY, **kw})


@pytest.fixture(scope="module")
def full_pattern_fn():
    cfg = sim.SimulationConfig()  # benchmark geometry: 256 px detector -> 200 px crop
    return cfg, jax.jit(sim.pattern_function(cfg))


def _disk_centroids(pattern, predicted, radius):
    """Intensity centroids (qx, qy) of the disks around predicted centres, pattern-centre relative."""
    h, w = pattern.shape
    rows, cols = np.mgrid[0:h, 0:w]
    out = []
    for cx, cy in predicted:
        win = (rows - cx) ** 2 + (cols - cy) ** 2 <= (radius + 3.0) ** 2
        wt = pattern * win
        out.append([(wt * rows).sum() / wt.sum(), (wt * cols).sum() / wt.sum()])
    return np.asarray(out)


def test_spot_centroids_recover_grain_labels(full_pattern_fn):
    cfg, fn = full_pattern_fn
    spots = sim.spot_table(cfg)
    centre = np.asarray(cfg.pattern_centre, float)
    h = cfg.pattern_shape[0]
    rng = np.random.default_rng(11)
    for _ in range(5):
        label = np.concatenate([rng.uniform(-0.02, 0.02, 3), rng.uniform(0, 2 * np.pi, 1)])
        pattern = np.asarray(fn(label), np.float64)
        # Window placement only: where the label says each disk is (the centroid is measured).
        exx, eyy, exy, th = label
        rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        m_true = np.linalg.inv(np.eye(2) + np.array([[exx, exy], [exy, eyy]])) @ rot
        pred = spots.g_px @ m_true.T + centre
        margin = cfg.disk_radius + 5
        inside = np.all((pred > margin) & (pred < h - 1 - margin), axis=1)
        assert inside.sum() >= 18
        q = _disk_centroids(pattern, pred[inside], cfg.disk_radius) - centre
        mt, *_ = np.linalg.lstsq(spots.g_px[inside], q, rcond=None)  # q = g @ M^T
        a = np.linalg.inv(mt.T).T  # real-space deformation A = M^-T
        u, p = polar(a, side="left")  # A = P U
        got = [p[0, 0] - 1, p[1, 1] - 1, p[0, 1]]
        np.testing.assert_allclose(got, label[:3], atol=1e-4)
        rot_got = math.atan2(u[1, 0], u[0, 0]) % (2 * np.pi)
        assert abs((rot_got - th + np.pi) % (2 * np.pi) - np.pi) < 1e-4


def test_positive_strain_xx_moves_spots_inward_along_qx(full_pattern_fn):
    cfg, fn = full_pattern_fn
    centre = cfg.pattern_centre[0]
    col = cfg.pattern_centre[1]

    def spot_row(exx):
        pattern = np.asarray(fn(np.array([exx, 0.0, 0.0, 0.0])))
        # The lattice has a1 along x, so the (1,0)-type spots at theta = 0 lie along +-Qx
        # ({110}-type at 66 px on the qx axis); take the centroid of the line profile near it.
        line = pattern[:, col]
        window = np.arange(centre + 56, centre + 76)
        return (line[window] * window).sum() / line[window].sum() - centre

    assert spot_row(0.02) < spot_row(0.0) < spot_row(-0.02)


def test_deformation_matrix_is_left_polar_product():
    p = np.array([0.01, -0.015, 0.005, 0.4])
    eps = np.array([[p[0], p[2]], [p[2], p[1]]])
    rot = np.array([[np.cos(p[3]), -np.sin(p[3])], [np.sin(p[3]), np.cos(p[3])]])
    np.testing.assert_allclose(sim.deformation_matrix(p), (np.eye(2) + eps) @ rot, atol=1e-6)
    np.testing.assert_allclose(
        sim.spot_transform(p), np.linalg.inv((np.eye(2) + eps) @ rot).T, atol=1e-6
    )


def test_reciprocal_lattice_is_hexagonal_ws2():
    g, _ = sim.reciprocal_lattice(lattice_constant=3.153, k_max=1.4)
    assert len(g) == 54
    norms = np.linalg.norm(g, axis=1)
    first = g[np.isclose(norms, norms.min())]
    assert len(first) == 6
    np.testing.assert_allclose(norms.min(), 2 / (math.sqrt(3) * 3.153), rtol=1e-12)
    angles = np.sort(np.degrees(np.arctan2(first[:, 1], first[:, 0])) % 360)
    np.testing.assert_allclose(np.diff(angles), 60.0, atol=1e-9)


def test_kinematic_intensities_are_sixfold_symmetric():
    g, hk = sim.reciprocal_lattice()
    inten = sim.kinematic_intensities(g, hk)
    rot60 = np.array([[0.5, -math.sqrt(3) / 2], [math.sqrt(3) / 2, 0.5]])
    g_rot = g @ rot60.T
    match = np.argmin(np.linalg.norm(g_rot[:, None] - g[None], axis=-1), axis=1)
    np.testing.assert_allclose(inten[match], inten, rtol=1e-10)
    np.testing.assert_allclose(inten.sum(), 1.0)


def test_pattern_sums_to_one_when_every_disk_is_on_the_detector():
    cfg = sim.SimulationConfig(detector_size=128, crop=(0, 128), k_max=0.8, q_pixel=0.0192)
    pattern = np.asarray(sim.pattern_function(cfg)(np.zeros(4)), np.float64)
    np.testing.assert_allclose(pattern.sum(), 1.0, atol=2e-3)


def test_central_beam_sits_at_pattern_centre_and_holds_central_frac():
    cfg = sim.SimulationConfig(detector_size=64, disk_radius=2.0, central_frac=0.9)
    pattern = np.asarray(sim.pattern_function(cfg)(np.array([0.01, 0.0, 0.0, 0.3])))
    assert cfg.pattern_shape == (50, 50) and cfg.pattern_centre == (25, 25)
    assert np.unravel_index(np.argmax(pattern), pattern.shape) == (25, 25)
    c = 25
    np.testing.assert_allclose(pattern[c - 5: c + 6, c - 5: c + 6].sum(), 0.9, atol=0.01)


def test_default_geometry_matches_the_benchmark():
    cfg = sim.SimulationConfig()
    assert cfg.crop_bounds == (28, 228)
    assert cfg.pattern_shape == (200, 200)
    assert cfg.pattern_centre == (100, 100)
    assert cfg.reference_bounds == (30, 60, 10, 40)
    assert math.isclose(cfg.pixel_size, 0.0096)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="noise level"):
        sim.SimulationConfig(noise_level=1.5)
    with pytest.raises(ValueError, match="crop"):
        sim.SimulationConfig(detector_size=64, crop=(28, 228))
    with pytest.raises(ValueError, match="reference_region"):
        sim.SimulationConfig(scan_shape=(8, 8), reference_region=(0, 9, 0, 2))
    assert sim.SimulationConfig(noise_level="25%").noise_level == 0.25


def test_same_seed_gives_identical_data_and_other_seed_differs(tmp_path):
    paths = [
        sim.simulate_to_hdf5(tmp_path / f"{name}.h5", _tiny(seed=seed), progress=False)
        for name, seed in (("a", 5), ("b", 5), ("c", 6))
    ]
    blobs = []
    for p in paths:
        with h5py.File(p, "r") as f:
            blobs.append(f["data"][...].tobytes())
    assert blobs[0] == blobs[1]
    assert blobs[0] != blobs[2]


def test_hdf5_round_trips_layout_attrs_and_labels(tmp_path):
    cfg = _tiny()
    path = sim.simulate_to_hdf5(tmp_path / "sim.h5", cfg, progress=False)
    data, labels = sim.simulate_scan(cfg)
    with h5py.File(path, "r") as f:
        assert f["data"].shape == (8, 8, 50, 50) and f["data"].dtype == np.float32
        assert f["data"].chunks == (1, 8, 50, 50)
        np.testing.assert_array_equal(f["data"][...], data)
        for name in ("strain_xx", "strain_yy", "shear_xy", "rotation"):
            assert f["labels"][name].dtype == np.float32 and f["labels"][name].shape == (8, 8)
            np.testing.assert_array_equal(f["labels"][name][...], labels[name])
        assert f["labels/grain_index"].dtype == np.int32
        assert f["labels/interior"].dtype == bool
        assert f["grains/params"].shape == (3, 4)
        a = f.attrs
        assert a["format"] == "ccstae-sim-1"
        assert tuple(a["reference_region"]) == cfg.reference_bounds
        assert a["noise_level"] == pytest.approx(0.2)
        assert a["seed"] == cfg.seed and a["lattice_symmetry"] == 6
        assert a["detector_size"] == 64 and tuple(a["crop"]) == (7, 57)
        assert a["q_pixel"] == pytest.approx(cfg.pixel_size)
        assert "A = (I + eps) R(theta)" in a["conventions"]
        assert sim.SimulationConfig(**{k: tuple(v) if isinstance(v, list) else v
                                       for k, v in __import__("json").loads(a["config"]).items()}) == cfg
    assert [p.name for p in tmp_path.iterdir()] == ["sim.h5"]  # no temporary left behind


def test_reference_grain_has_zero_labels_under_reference_region():
    cfg = sim.SimulationConfig(scan_shape=(32, 32), detector_size=64, n_grains=8, disk_radius=2.0)
    labels = sim.grain_labels(cfg)
    r0, r1, c0, c1 = cfg.reference_bounds
    for name in ("strain_xx", "strain_yy", "shear_xy", "rotation"):
        assert np.all(labels[name][r0:r1, c0:c1] == 0.0)
    assert np.all(labels["grain_index"][r0:r1, c0:c1] == 0)


def test_reference_region_data_are_pure_reference_pattern():
    cfg = sim.SimulationConfig(scan_shape=(16, 16), detector_size=64, n_grains=6, disk_radius=2.0)
    data, _ = sim.simulate_scan(cfg)
    ref = np.asarray(sim.pattern_function(cfg)(np.zeros(4))) * cfg.intensity_scale
    r0, r1, c0, c1 = cfg.reference_bounds
    block = data[r0:r1, c0:c1]
    np.testing.assert_allclose(block, np.broadcast_to(ref, block.shape), rtol=1e-5, atol=1e-6 * ref.max())


def test_row_batches_equal_one_shot_in_memory(tmp_path):
    cfg_batched = _tiny()  # 3 + 3 + 2 rows (last batch padded)
    path = sim.simulate_to_hdf5(tmp_path / "b.h5", cfg_batched, progress=False)
    one_shot, _ = sim.simulate_scan(_tiny(batch_rows=8))
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["data"][...], one_shot)


def test_labels_are_dominant_grain_parameters():
    cfg = _tiny(scan_shape=(16, 16), n_grains=5)
    grains = sim.make_grains(cfg)
    labels = sim.grain_labels(cfg, grains=grains)
    gi = labels["grain_index"]
    np.testing.assert_array_equal(labels["strain_yy"], grains.params[gi, 1].astype(np.float32))
    np.testing.assert_array_equal(labels["rotation"], grains.params[gi, 3].astype(np.float32))
    assert np.mean(gi == grains.gmap) > 0.9  # the dominant grain is the Voronoi grain almost everywhere


def test_interior_excludes_pixels_near_boundaries():
    cfg = _tiny(scan_shape=(24, 24), n_grains=4)
    labels = sim.grain_labels(cfg)
    gi, interior = labels["grain_index"], labels["interior"]
    boundary = np.zeros_like(interior)
    boundary[:-1] |= gi[:-1] != gi[1:]
    boundary[1:] |= gi[:-1] != gi[1:]
    assert not np.any(interior & boundary)
    assert interior.any()


def test_raw_mode_stores_unscaled_patterns():
    data, _ = sim.simulate_scan(_tiny(noise_level=None))  # raw: no noise, no scale
    sums = data.sum(axis=(2, 3))
    assert np.all((sums > 0.9) & (sums <= 1.0 + 1e-4))


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    def broken(self):
        yield 0, 1, np.zeros((1, 8, 50, 50), np.float32)
        raise RuntimeError("disk full")

    monkeypatch.setattr(sim._Generator, "batches", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        sim.simulate_to_hdf5(tmp_path / "x.h5", _tiny(), progress=False)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_file_mode_follows_the_umask_like_a_normal_file(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = sim.simulate_to_hdf5(tmp_path / "x.h5", _tiny(scan_shape=(3, 3)), progress=False)
        plain = tmp_path / "plain"
        plain.write_bytes(b"")  # created by open(): 0o666 & ~umask
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask == os.stat(plain).st_mode & 0o777


def test_renderer_uses_no_matmul():
    # Default-precision f32 dots run as TF32/bf16 on GPUs and TPUs (about 1e-3 relative: 1e-4 strain
    # errors); spot positions must be computed elementwise to keep 1e-5 accuracy on every platform.
    cfg = _tiny()
    jaxpr = str(jax.make_jaxpr(sim.pattern_function(cfg, translation=True))(np.zeros(6, np.float32)))
    assert "dot_general" not in jaxpr
