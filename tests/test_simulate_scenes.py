"""Specifications of the simulator's scene options: lattices, projector ellipticity, descan, phases, vacuum.

Geometry shared by most tests: a 128 px detector kept whole (crop 0..128, zero beam at pixel 64) with the
first-order spots about 20 px from the zero beam and 3 px disks, noise-free.
"""
import json
import math

import h5py
import numpy as np
import pytest
from scipy import ndimage

from ccstae_jax.data import simulate as sim
from ccstae_jax.data.readers import load_labels

SMALL = dict(detector_size=128, crop=(0, 128), disk_radius=3.0, k_max=0.9, n_grains=4, seed=1, noise_level=0.0)


def _config(**kw):
    cfg = sim.SimulationConfig(**{**SMALL, **kw})
    # Camera length: first-order spots at 20 px, whatever the lattice.
    return sim.SimulationConfig(**{**SMALL, **kw, "q_pixel": cfg.first_order_length / 20.0})


def _centroids(pattern, predicted, radius):
    """Intensity centroids (row, col) of the disks within ``radius`` px of the predicted centres."""
    rows, cols = np.mgrid[0: pattern.shape[0], 0: pattern.shape[1]]
    out = []
    for cx, cy in predicted:
        wt = pattern * ((rows - cx) ** 2 + (cols - cy) ** 2 <= radius**2)
        out.append([(wt * rows).sum() / wt.sum(), (wt * cols).sum() / wt.sum()])
    return np.asarray(out)


def _visible(points, size, margin):
    return np.all((points > margin) & (points < size - 1 - margin), axis=1)


# ----- lattices ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lattice, basis, n_first", [
    ("hexagonal", [[1.0, 0.0], [-0.5, math.sqrt(3) / 2]], 6),
    ("square", [[1.0, 0.0], [0.0, 1.0]], 4),
    ("rectangular", [[1.0, 0.0], [0.0, 1.3]], 2),
])
def test_disk_centroids_sit_at_deformed_reciprocal_lattice(lattice, basis, n_first):
    cfg = _config(lattice=lattice, lattice_aspect=1.3)
    spots = sim.spot_table(cfg)
    a = cfg.lattice_constant
    # Independent reciprocal lattice: g = hk @ inv(a * basis)^T, in pixels.
    g = spots.hk @ np.linalg.inv(a * np.asarray(basis)).T / cfg.pixel_size
    np.testing.assert_allclose(spots.g_px, g, atol=1e-9)
    norms = np.linalg.norm(g, axis=1)
    assert np.sum(np.isclose(norms, norms.min())) == n_first
    np.testing.assert_allclose(norms.min(), 20.0, rtol=1e-12)
    label = np.array([0.015, -0.01, 0.006, 0.7])
    pattern = np.asarray(sim.pattern_function(cfg)(label), np.float64)
    eps = np.array([[label[0], label[2]], [label[2], label[1]]])
    rot = np.array([[math.cos(label[3]), -math.sin(label[3])], [math.sin(label[3]), math.cos(label[3])]])
    spot_px = g @ np.linalg.inv((np.eye(2) + eps) @ rot) + 64.0  # rows (A^-T g)^T = g^T A^-1, from the zero beam
    inside = _visible(spot_px, 128, 8)
    assert inside.sum() >= 10
    got = _centroids(pattern, spot_px[inside], cfg.disk_radius + 2)
    np.testing.assert_allclose(got, spot_px[inside], atol=0.01)


def test_one_atom_intensities_fall_with_scattering_vector():
    cfg = _config(lattice="square")
    spots = sim.spot_table(cfg)
    norms = np.linalg.norm(spots.g_px, axis=1)
    order = np.argsort(norms)
    assert np.all(np.diff(spots.intensity[order]) <= 1e-15)
    np.testing.assert_allclose(spots.intensity.sum(), 1.0 - cfg.central_frac)


# ----- ellipticity ---------------------------------------------------------------------------------------
def test_ellipticity_moves_spots_by_distortion_matrix():
    e, angle = 0.06, 0.5
    cfg = _config(ellipticity=e, ellipticity_angle=angle)
    d = sim.distortion_matrix(e, angle)
    c, s = math.cos(angle), math.sin(angle)
    np.testing.assert_allclose(d @ [c, s], (1 + e / 2) * np.array([c, s]), atol=1e-12)  # major axis stretched
    np.testing.assert_allclose(d @ [-s, c], (1 - e / 2) * np.array([-s, c]), atol=1e-12)
    label = np.array([0.01, 0.0, -0.005, 0.3])
    spot_px = np.asarray(sim.spot_transform(label), np.float64) @ sim.spot_table(cfg).g_px.T  # undistorted
    spot_px = (d @ spot_px).T + 64.0
    inside = _visible(spot_px, 128, 8)
    got = _centroids(np.asarray(sim.pattern_function(cfg)(label), np.float64), spot_px[inside], 5.0)
    np.testing.assert_allclose(got, spot_px[inside], atol=0.01)


def test_ellipticity_makes_disks_ellipses_and_keeps_the_total():
    e, angle = 0.08, 1.1
    cfg = _config(ellipticity=e, ellipticity_angle=angle, disk_radius=10.0, disk_edge=1.0, central_frac=1.0)
    pattern = np.asarray(sim.pattern_function(cfg)(np.zeros(4)), np.float64)  # central disk only
    np.testing.assert_allclose(pattern.sum(), 1.0, rtol=1e-4)
    rows, cols = np.mgrid[0:128, 0:128] - 64.0
    cov = np.cov(np.stack([rows.ravel(), cols.ravel()]), aweights=pattern.ravel())
    evals, evecs = np.linalg.eigh(cov)
    np.testing.assert_allclose(math.sqrt(evals[1] / evals[0]), (1 + e / 2) / (1 - e / 2), rtol=2e-3)
    major = evecs[:, 1]
    assert abs(abs(major @ [math.cos(angle), math.sin(angle)]) - 1) < 1e-4


def test_ellipticity_leaves_labels_unchanged():
    plain = sim.grain_labels(_config(scan_shape=(8, 8)))
    stretched = sim.grain_labels(_config(scan_shape=(8, 8), ellipticity=0.03, ellipticity_angle=0.2))
    for name in ("strain_xx", "strain_yy", "shear_xy", "rotation", "grain_index"):
        np.testing.assert_array_equal(plain[name], stretched[name])


# ----- lattice orientation --------------------------------------------------------------------------------
def test_lattice_angle_turns_the_pattern_as_a_grain_turned_by_it_would_be():
    turned = np.asarray(sim.pattern_function(_config(lattice_angle=0.3))(np.zeros(4)))
    grain = np.asarray(sim.pattern_function(_config())(np.array([0.0, 0.0, 0.0, 0.3])))
    np.testing.assert_allclose(turned, grain, atol=1e-6 * grain.max())
    axis_aligned = np.asarray(sim.pattern_function(_config())(np.zeros(4)))
    rows, cols = np.mgrid[:128, :128] - 64.0
    spots = np.hypot(rows, cols) > 10  # beyond the central disk
    assert np.abs(turned - axis_aligned)[spots].max() > 0.5 * axis_aligned[spots].max()  # the lattice did turn


def test_lattice_angle_leaves_labels_relative_to_the_reference_lattice():
    plain = sim.grain_labels(_config(scan_shape=(8, 8)))
    turned = sim.grain_labels(_config(scan_shape=(8, 8), lattice_angle=0.3))
    for name in ("strain_xx", "strain_yy", "shear_xy", "rotation", "grain_index"):
        np.testing.assert_array_equal(plain[name], turned[name])


# ----- descan --------------------------------------------------------------------------------------------
J = (3.0, 1.0, -2.0, 4.0)


def test_descan_shifts_central_disk_by_j_at_the_corners():
    cfg = _config(scan_shape=(8, 8), descan=J)
    data, labels = sim.simulate_scan(cfg)
    jm = np.asarray(J).reshape(2, 2)
    for r, c in ((0, 0), (0, 7), (7, 0), (7, 7)):
        want = 64.0 + jm @ [r / 7 - 0.5, c / 7 - 0.5]
        got = _centroids(data[r, c].astype(np.float64), [want], cfg.disk_radius + 2)[0]
        np.testing.assert_allclose(got, want, atol=0.01)
        np.testing.assert_allclose(labels["zero_beam"][r, c], want, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "accelerator"])
def test_descan_glow_of_the_noise_follows_the_zero_beam(backend, monkeypatch):
    if backend == "accelerator":  # the jax.random noise path that GPUs and TPUs take, run here on the CPU
        monkeypatch.setattr(sim.jax, "default_backend", lambda: "gpu")
    # w = 1 with many counts: the data are the Lorentzian glow alone, peaked on the zero beam.
    cfg = _config(scan_shape=(5, 5), descan=(4.0, 0.0, 0.0, -6.0), noise_level=1.0, counts=1e9, batch_rows=2)
    data, _ = sim.simulate_scan(cfg)
    assert np.unravel_index(np.argmax(data[0, 0]), (128, 128)) == (62, 67)
    assert np.unravel_index(np.argmax(data[4, 4]), (128, 128)) == (66, 61)


def test_per_position_rendering_at_a_vanishing_shift_equals_per_grain_rendering():
    base = dict(scan_shape=(8, 8), n_grains=3, noise_level=None, boundary_sigma=1.0, vacuum=0.3,
                phases=("WS2", "WSe2"), ellipticity=0.02)
    per_grain, _ = sim.simulate_scan(_config(**base))
    per_position, _ = sim.simulate_scan(_config(**base, descan=(1e-30, 0.0, 0.0, 1e-30)))
    np.testing.assert_allclose(per_position, per_grain, rtol=1e-6, atol=1e-6 * per_grain.max())


@pytest.mark.parametrize("ellipticity", [0.0, 0.1])
def test_windowed_renderer_equals_full_renderer_even_at_the_pattern_edges(ellipticity):
    cfg = _config(ellipticity=ellipticity, ellipticity_angle=0.7, crop=(5, 120), k_max=1.6)
    const = sim._render_constants(cfg)
    window = sim._window_size(cfg.disk_radius, cfg.disk_edge, const["distortion"])
    assert window < 115
    params = np.array([0.01, -0.02, 0.004, 0.3], np.float32)
    for shift in ([0.0, 0.0], [37.3, -51.8], [-80.0, 90.0]):  # disks cut by, or far beyond, the pattern edges
        shift = np.asarray(shift, np.float32)
        full = np.asarray(sim._render_one(params, shift, **const))
        windowed = np.asarray(sim._render_one_windowed(params, shift, window=window, **const))
        np.testing.assert_array_equal(windowed == 0, full == 0)
        np.testing.assert_allclose(windowed, full, rtol=2e-5, atol=1e-7 * full.max())


def test_per_position_row_batches_equal_one_shot():
    scene = dict(scan_shape=(7, 6), descan=J, vacuum=0.3, phases="WS2,MoS2", noise_level=0.25,
                 reference_region=(0, 2, 0, 2))
    batched, _ = sim.simulate_scan(_config(**scene, batch_rows=3))  # 3 + 3 + 1 rows
    one_shot, _ = sim.simulate_scan(_config(**scene, batch_rows=7))
    np.testing.assert_array_equal(batched, one_shot)


def test_zero_beam_label_is_the_pattern_centre_without_descan():
    labels = sim.grain_labels(sim.SimulationConfig(scan_shape=(4, 6), detector_size=64))
    assert labels["zero_beam"].shape == (4, 6, 2) and labels["zero_beam"].dtype == np.float32
    assert np.all(labels["zero_beam"] == 25.0)


# ----- phases --------------------------------------------------------------------------------------------
def test_unstrained_wse2_grain_is_labelled_by_the_lattice_constant_ratio():
    cfg = _config(scan_shape=(12, 12), phases="WS2,WSe2", phase_fractions=(0.0, 1.0), max_strain=0.0,
                  reference_region=(0, 3, 0, 3))
    assert cfg.phases == (("WS2", 3.153), ("WSe2", 3.282))
    grains = sim.make_grains(cfg)
    assert grains.phase[0] == 0 and np.all(grains.phase[1:] == 1)
    data, labels = sim.simulate_scan(cfg)
    wse2 = labels["phase"] == 1
    assert wse2.any() and np.all(labels["phase"][~wse2] == 0)
    ratio = np.float32(3.282 / 3.153 - 1)
    np.testing.assert_allclose(labels["strain_xx"][wse2], ratio, rtol=1e-6)
    np.testing.assert_allclose(labels["strain_yy"][wse2], ratio, rtol=1e-6)
    assert np.all(labels["shear_xy"][wse2] == 0) and np.all(labels["strain_xx"][~wse2] == 0)
    # The label is what the pattern shows: WSe2 spots sit at A^-T g_WS2 with A = (I + label) R.
    r, c = np.argwhere(wse2 & labels["interior"])[0]
    lab = np.array([labels[k][r, c] for k in ("strain_xx", "strain_yy", "shear_xy", "rotation")], np.float64)
    ref = sim.spot_table(cfg)
    spot_px = ref.g_px @ np.asarray(sim.spot_transform(lab), np.float64).T + 64.0
    inside = _visible(spot_px, 128, 8)
    got = _centroids(data[r, c].astype(np.float64), spot_px[inside], cfg.disk_radius + 2)
    np.testing.assert_allclose(got, spot_px[inside], atol=0.01)


def test_general_phase_label_is_scaled_strain():
    cfg = sim.SimulationConfig(phases=("MoS2", "X:3.5"))
    own = np.array([[0.0, 0.0, 0.0, 0.0], [0.01, -0.02, 0.005, 1.0]])
    label = sim.own_to_label(own, np.array([0, 1]), cfg)
    r = 3.5 / 3.160
    np.testing.assert_allclose(label[1], [r * 1.01 - 1, r * 0.98 - 1, r * 0.005, 1.0], rtol=1e-12)
    np.testing.assert_array_equal(label[0], own[0])


def test_phase_intensities_follow_their_atoms():
    cfg = _config(phases="WS2,MoSe2")
    ws2, mose2 = sim.spot_table(cfg, phase=0), sim.spot_table(cfg, phase=1)
    np.testing.assert_allclose(ws2.intensity, sim.spot_table(_config()).intensity)
    g, hk = sim.reciprocal_lattice(lattice_constant=3.288, k_max=cfg.k_max)
    want = sim.kinematic_intensities(g, hk, z_metal=42.0, z_chalcogen=34.0) * (1 - cfg.central_frac)
    np.testing.assert_allclose(mose2.intensity, want)


# ----- vacuum --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.9])
def test_vacuum_fraction_and_flake_shape(fraction):
    cfg = _config(scan_shape=(24, 24), vacuum=fraction, reference_region=(2, 5, 2, 5), n_grains=6)
    labels = sim.grain_labels(cfg)
    vac = labels["vacuum"]
    assert abs(vac.mean() - fraction) < 0.03
    assert not vac[2:5, 2:5].any()  # the reference region stays in the specimen
    assert ndimage.label(~vac)[1] == 1  # one flake
    for name in ("strain_xx", "strain_yy", "shear_xy", "rotation"):
        assert np.all(np.isnan(labels[name][vac])) and np.all(np.isfinite(labels[name][~vac]))
    assert np.all(labels["grain_index"][vac] == -1) and np.all(labels["phase"][vac] == -1)
    assert not labels["interior"][vac].any()


def test_vacuum_patterns_hold_only_the_central_disk():
    cfg = _config(scan_shape=(16, 16), vacuum=0.5, reference_region=(0, 3, 0, 3))
    data, labels = sim.simulate_scan(cfg)
    pure = ndimage.binary_erosion(labels["vacuum"], np.ones((9, 9)), border_value=1)  # no specimen within 4
    assert pure.sum() >= 5
    rho = np.hypot(*(np.mgrid[0:128, 0:128] - 64.0))
    area = math.pi * 3.0**2 + math.pi**3 * 0.5**2 / 12
    disk = 0.5 * (1 - np.tanh((rho - 3.0) / 0.5)) / area * cfg.intensity_scale  # the whole probe in (000)
    for p in data[pure]:
        np.testing.assert_allclose(p, disk, rtol=1e-4, atol=1e-6 * disk.max())
    # Specimen patterns keep the same total, spread over the spots.
    np.testing.assert_allclose(data[~labels["vacuum"]].sum((1, 2)), cfg.intensity_scale, rtol=0.01)


def test_noisy_vacuum_pattern_is_the_noise_model_of_the_central_disk():
    w = 0.3
    cfg = _config(scan_shape=(16, 16), vacuum=0.5, reference_region=(0, 3, 0, 3), noise_level=w)
    data, labels = sim.simulate_scan(cfg)
    pure = ndimage.binary_erosion(labels["vacuum"], np.ones((9, 9)), border_value=1)
    rho = np.hypot(*(np.mgrid[0:128, 0:128] - 64.0))
    ring = (rho > 12) & (rho < 28)  # where the first-order spots of the specimen are
    from ccstae_jax.data.noise import lorentzian_background

    glow_ring = w * lorentzian_background((128, 128))[ring].sum() * cfg.intensity_scale
    vac_ring = data[pure][:, ring].sum(1)
    np.testing.assert_allclose(vac_ring.mean(), glow_ring, rtol=0.05)
    specimen_ring = data[~labels["vacuum"]][:, ring].sum(1)  # the first-order spots add to the glow
    assert specimen_ring.mean() - vac_ring.mean() > 5 * vac_ring.std()
    np.testing.assert_allclose(data[pure].sum((1, 2)), cfg.intensity_scale, rtol=0.02)


# ----- file, defaults, bad values ------------------------------------------------------------------------
def test_hdf5_records_the_scene(tmp_path):
    cfg = _config(scan_shape=(8, 8), lattice="square", phases="WS2,WSe2:3.3", vacuum=0.2, ellipticity=0.02,
                  ellipticity_angle=0.4, descan=2.0, reference_region=(0, 2, 0, 2), lattice_angle=0.25)
    path = sim.simulate_to_hdf5(tmp_path / "s.h5", cfg, progress=False)
    with h5py.File(path, "r") as f:
        a = f.attrs
        assert a["lattice_symmetry"] == 4 and a["lattice"] == "square"
        assert a["ellipticity"] == 0.02 and a["ellipticity_angle"] == 0.4
        assert tuple(a["descan"]) == (2.0, 0.0, 0.0, 2.0) and a["vacuum"] == 0.2
        assert json.loads(a["phases"]) == [["WS2", 3.153], ["WSe2", 3.3]]
        assert a["spot_spacing"] == pytest.approx(20.0)
        assert f["labels/zero_beam"].shape == (8, 8, 2) and f["labels/phase"].dtype == np.int8
        assert f["labels/vacuum"].dtype == bool and f["grains/phase"].shape == (4,)
        config = {k: tuple(map(tuple, v)) if k == "phases" else tuple(v) if isinstance(v, list) else v
                  for k, v in json.loads(a["config"]).items()}
        assert sim.SimulationConfig(**config) == cfg
    labels = load_labels(path, shape=(8, 8))  # the (Rx, Ry, 2) zero_beam passes the scan-shape check
    assert labels["zero_beam"].shape == (8, 8, 2)
    for lattice, symmetry in (("hexagonal", 6), ("rectangular", 2)):
        p = sim.simulate_to_hdf5(tmp_path / f"{lattice}.h5", _config(scan_shape=(2, 2), lattice=lattice),
                                 progress=False)
        with h5py.File(p, "r") as f:
            assert f.attrs["lattice_symmetry"] == symmetry


def test_default_configuration_string_omits_the_scene_options():
    text = sim.SimulationConfig().to_json()
    assert not {"lattice", "ellipticity", "descan", "phases", "vacuum"} & set(json.loads(text))
    assert "vacuum" in json.loads(sim.SimulationConfig(vacuum=0.1).to_json())


def test_whole_256_px_pattern_and_a_small_128_px_detector():
    big = sim.SimulationConfig(scan_shape=(2, 2), detector_size=256, crop=(0, 256), n_grains=1)
    data, _ = sim.simulate_scan(big)
    assert data.shape == (2, 2, 256, 256) and big.pattern_centre == (128, 128)
    assert np.unravel_index(np.argmax(data[0, 0]), (256, 256)) == (128, 128)
    small = _config(scan_shape=(2, 2), n_grains=1, k_max=1.4)  # 128 px detector, first order at 20 px
    data, _ = sim.simulate_scan(small)
    spots = sim.spot_table(small).g_px
    first = spots[np.isclose(np.linalg.norm(spots, axis=1), 20.0)]
    assert len(first) == 6
    pattern = data[0, 0]
    rot30 = np.array([[math.cos(math.pi / 6), -math.sin(math.pi / 6)], [math.sin(math.pi / 6), math.cos(math.pi / 6)]])
    between = np.rint(first @ rot30.T + 64).astype(int)  # same radius, between two spots
    for (qx, qy), (bx, by) in zip(np.rint(first + 64).astype(int), between):
        assert pattern[qx, qy] > 100 * pattern[bx, by]


@pytest.mark.parametrize("kw, message", [
    (dict(ellipticity=-0.01), "ellipticity=-0.01 must be in"),
    (dict(ellipticity=0.5), "ellipticity=0.5 must be in"),
    (dict(phases="WS2,WTe2"), "unknown phase 'WTe2'"),
    (dict(phases="WS2,WSe2:abc"), "lattice constant 'abc'"),
    (dict(vacuum=-0.1), r"vacuum=-0.1 must be in \[0, 0.9\]"),
    (dict(vacuum=0.95), r"vacuum=0.95 must be in \[0, 0.9\]"),
    (dict(lattice="hex"), "lattice='hex': expected one of hexagonal, square, rectangular"),
    (dict(lattice="rectangular", lattice_aspect=1.03), "at least 5 % away from 1"),
    (dict(descan=(1.0, 2.0, 3.0)), "descan="),
    (dict(phase_fractions=(1.0, 1.0)), "phase_fractions given without phases"),
    (dict(phases="WS2,WSe2", phase_fractions=(1.0,)), "expected 2 non-negative numbers"),
    (dict(phases="WSe2", lattice_constant=3.0), "conflicts with the reference phase"),
])
def test_bad_scene_options_raise_one_line_errors(kw, message):
    with pytest.raises(ValueError, match=message) as err:
        sim.SimulationConfig(**kw)
    assert "\n" not in str(err.value)
