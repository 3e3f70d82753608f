"""Specifications of strain referencing, detector distortion, validity, per-position errors, the strain-map file and
the error table."""
import dataclasses
import os

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from ccstae_jax.ops import affine
from ccstae_jax.evaluate.metrics import error_table, referenced_labels
from ccstae_jax.mapping.reference import (INVALID_REASONS, lattice_covariance, map_warnings, mixing_uncertainty,
                                          reference_deformation, scatter_scale, referenced_strain, region_mask,
                                          strain_maps, strain_uncertainty)
from ccstae_jax.report.files import read_strain_h5, write_strain_h5


def _labels(shape=(8, 8), seed=0):
    rng = np.random.default_rng(seed)
    lab = {k: rng.uniform(-0.02, 0.02, shape) for k in ("strain_xx", "strain_yy", "shear_xy")}
    lab["rotation"] = rng.uniform(0, 2 * np.pi, shape)
    for k in ("strain_xx", "strain_yy", "shear_xy"):
        lab[k][:2, :2] = 0.0  # unstrained reference corner, one orientation
    lab["rotation"][:2, :2] = 1.0
    return lab


def test_referencing_recovers_strain_despite_sixty_degree_ambiguity_and_base_rotation():
    lab = _labels()
    a = np.asarray(affine.lattice_from_strain(*(lab[k] for k in ("strain_xx", "strain_yy", "shear_xy", "rotation"))))
    # what a model sees: relative to an arbitrarily rotated base, each pattern's angle known only modulo 60 degrees
    rng = np.random.default_rng(1)
    k60 = rng.integers(-3, 3, lab["rotation"].shape)
    m = a @ np.asarray(affine.rotation_matrix(np.pi / 3 * k60)) @ np.asarray(affine.rotation_matrix(-0.7))
    got = referenced_strain(m, region_mask((8, 8), (0, 2, 0, 2)))
    for k in ("strain_xx", "strain_yy", "shear_xy"):
        np.testing.assert_allclose(got[k], lab[k], atol=2e-6)
    want_rot = (lab["rotation"] - 1.0 + np.pi / 6) % (np.pi / 3) - np.pi / 6
    err = (got["rotation"] - want_rot + np.pi / 6) % (np.pi / 3) - np.pi / 6
    assert np.abs(err).max() < 1e-4


def test_region_outside_scan_is_rejected_with_its_bounds():
    with pytest.raises(ValueError, match="outside the 8x8 scan"):
        region_mask((8, 8), (0, 9, 0, 2))


def test_blank_featureless_and_vacuum_patterns_are_marked_invalid_not_garbage():
    n = 16
    preds = {
        "theta": np.broadcast_to(np.eye(2, 3, dtype=np.float32), (n, 2, 3)).copy(),
        "ring_signal": np.ones(n, np.float32),
        "lattice_signal": np.full(n, 0.3, np.float32),
        "lattice_significance": np.full(n, 10.0, np.float32),
        "class_index": np.zeros(n, np.int32),
    }
    preds["ring_signal"][3] = 0.0  # blank
    preds["lattice_signal"][5] = 0.001  # diffuse scattering, as bright as the specimen, without a lattice
    preds["theta"][7] = np.nan
    preds["lattice_significance"][9] = 1.0  # vacuum: the central beam's glow alone, darker ring, no lattice
    preds["ring_signal"][9] = 0.4
    preds["lattice_signal"][11], preds["ring_signal"][11] = 0.1, 0.6  # the flake's edge: the probe partly on vacuum
    preds["lattice_signal"][13] = 0.1  # a grain boundary: weaker harmonic, the same ring intensity -> valid
    maps = strain_maps(preds, (4, 4), (64, 64))
    assert maps["valid"].sum() == 11
    assert maps["invalid_reason"].ravel()[[3, 5, 7, 9, 11, 13]].tolist() == [1, 2, 3, 4, 4, 0]
    assert np.isnan(maps["strain_xx"].ravel()[[3, 5, 7, 9, 11]]).all()
    assert np.isfinite(maps["strain_xx"][maps["valid"]]).all()


def _mixed_scan(n_vacuum: int, vacuum_ring: float):
    """Predictions of 64 positions: specimen (ring 1 +- 1 %, harmonic 0.3), ``n_vacuum`` lattice-free positions with
    ring ``vacuum_ring``, then a position whose probe is 30 % on specimen, one 70 % on specimen and a grain boundary
    whose harmonic cancels (ring kept)."""
    rng = np.random.default_rng(0)
    n = 64
    ring = 1.0 + 0.01 * rng.standard_normal(n)
    harmonic = np.full(n, 0.3)
    significance = np.full(n, 20.0)
    ring[:n_vacuum], harmonic[:n_vacuum], significance[:n_vacuum] = vacuum_ring, 0.005, 1.0
    for i, f in ((n_vacuum, 0.3), (n_vacuum + 1, 0.7)):  # f of the probe on the specimen
        ring[i], harmonic[i], significance[i] = f * 1.0 + (1 - f) * vacuum_ring, f * 0.3, 20.0 * f
    harmonic[n_vacuum + 2], significance[n_vacuum + 2] = 0.03, 4.0  # a grain boundary
    return {"theta": np.broadcast_to(np.eye(2, 3, dtype=np.float32), (n, 2, 3)).copy(),
            "ring_signal": ring.astype(np.float32), "lattice_signal": (harmonic / ring).astype(np.float32),
            "lattice_significance": significance.astype(np.float32), "class_index": np.zeros(n, np.int32)}


def test_positions_mostly_on_vacuum_are_vacuum_even_when_noise_brightens_the_vacuum_ring():
    """At high noise a vacuum pattern's ring is nearly as bright as the specimen's (here 90 %): the scan's own
    vacuum sets the midpoint, so a probe 30 % on the specimen is vacuum, 70 % is valid, a grain boundary is valid."""
    maps = strain_maps(_mixed_scan(8, 0.9), (8, 8), (64, 64))
    assert maps["invalid_reason"].ravel()[:11].tolist() == [4] * 8 + [4, 0, 0]
    assert (maps["invalid_reason"].ravel()[11:] == 0).all()


def test_a_scan_without_vacuum_keeps_its_faint_grain_boundaries_valid_or_lattice_free_not_vacuum():
    preds = _mixed_scan(4, 1.0)  # lattice-free positions exist, but they are as bright as the specimen
    reason = strain_maps(preds, (8, 8), (64, 64))["invalid_reason"].ravel()
    assert reason[:4].tolist() == [2] * 4 and not (reason == 4).any()


def test_strain_file_round_trips_and_writes_atomically(tmp_path):
    maps = {k: np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
            for k in ("strain_xx", "strain_yy", "shear_xy", "rotation", "reconstruction_error")}
    maps["valid"] = np.ones((4, 5), bool)
    path = write_strain_h5(tmp_path / "s.h5", maps, attrs={"reference_region": [0, 2, 0, 2], "method": "test"})
    got, attrs = read_strain_h5(path)
    np.testing.assert_array_equal(got["strain_xx"], maps["strain_xx"])
    assert attrs["method"] == "test" and "Qx" in attrs["conventions"]
    assert os.listdir(tmp_path) == ["s.h5"]
    with pytest.raises(OSError, match="does not exist"):
        write_strain_h5(tmp_path / "missing_dir" / "s.h5", maps, attrs={})


def test_error_table_is_zero_for_perfect_maps_and_excludes_invalid_positions():
    lab = _labels()
    ref = referenced_labels(lab, reference_region=(0, 2, 0, 2))
    pred = {k: ref[k].astype(np.float32) for k in ref}
    pred["valid"] = np.ones((8, 8), bool)
    pred["valid"][7, 7] = False
    pred["strain_xx"][7, 7] = np.nan
    table = error_table(pred, lab, reference_region=(0, 2, 0, 2), interior=np.ones((8, 8), bool))
    assert table["strain_xx"]["mae"] < 1e-6 and table["rotation_deg"]["mae"] < 1e-3
    assert table["strain_xx"]["valid_fraction"] == pytest.approx(63 / 64)


def test_error_table_measures_a_known_offset():
    lab = _labels()
    ref = referenced_labels(lab, reference_region=(0, 2, 0, 2))
    pred = {k: ref[k] + (0.001 if k != "rotation" else np.radians(0.5)) for k in ref}
    table = error_table(pred, lab, reference_region=(0, 2, 0, 2))
    assert table["strain_yy"]["mae"] == pytest.approx(0.001, rel=1e-3)
    assert table["rotation_deg"]["mae"] == pytest.approx(0.5, rel=1e-3)


def test_error_table_calibrates_the_errors_over_grain_interiors_apart():
    """Positions whose probe straddles two grains are scored against one grain's label: their errors exceed the
    fit's sigma there, so the calibration over the interiors is reported on its own."""
    lab = _labels()
    ref = referenced_labels(lab, reference_region=(0, 2, 0, 2))
    rng = np.random.default_rng(3)
    sigma = 1e-3
    pred = {k: ref[k] + sigma * rng.standard_normal((8, 8)) for k in ref}
    interior = np.ones((8, 8), bool)
    interior[4:] = False
    pred["strain_xx"] = np.where(interior, pred["strain_xx"], pred["strain_xx"] + 10 * sigma)  # boundary mixtures
    pred["strain_xx"][:2, :2] = ref["strain_xx"][:2, :2]  # a clean reference region
    for k in ref:
        pred[f"uncertainty_{k}"] = np.full((8, 8), sigma)
    row = error_table(pred, lab, reference_region=(0, 2, 0, 2), interior=interior)["strain_xx"]
    assert row["z_std"] > 3 and 0.6 < row["z_std_interior"] < 1.4


def test_labels_of_another_shape_are_rejected():
    lab = _labels()
    pred = {k: np.zeros((4, 4)) for k in lab}
    with pytest.raises(ValueError, match="label strain_xx has shape"):
        error_table(pred, lab)


def test_an_elliptical_detector_distortion_is_removed_using_the_reference_region():
    """Every pattern stretched alike by the projector (D) looks, for grains turned against the reference, like
    strain; conjugating by the reference's anisotropy recovers the specimen's strain."""
    lab = _labels()
    names = ("strain_xx", "strain_yy", "shear_xy", "rotation")
    a = np.asarray(affine.lattice_from_strain(*(lab[k] for k in names)), np.float64)
    e, angle = 0.02, 0.5
    rot = np.asarray(affine.rotation_matrix(angle), np.float64)
    d = rot @ np.diag([1 + e / 2, 1 - e / 2]) @ rot.T  # detector distortion of the diffraction pattern
    seen = np.linalg.inv(d) @ a  # spots at D A^-T g: the fitted real-space lattice is D^-T A = D^-1 A
    ref = region_mask((8, 8), (0, 2, 0, 2))
    plain = referenced_strain(seen, ref)
    corrected, distortion = referenced_strain(seen, ref, correct_distortion=True, return_distortion=True)
    want = referenced_labels(lab, reference_region=(0, 2, 0, 2))
    assert max(np.abs(plain[k] - want[k]).max() for k in names[:3]) > 5e-3
    for k in names[:3]:
        np.testing.assert_allclose(corrected[k], want[k], atol=2e-6)
    assert distortion.ellipticity == pytest.approx(e, rel=1e-3)
    assert np.cos(2 * (distortion.angle - angle)) == pytest.approx(-1.0, abs=1e-6)  # D^-1's major axis


def test_strain_uncertainty_is_the_first_order_propagation_of_the_lattice_covariance():
    """Checked against finite differences of the referencing itself, position by position (a tiny reference
    covariance isolates the per-position part)."""
    rng = np.random.default_rng(3)
    lab = _labels()
    names = ("strain_xx", "strain_yy", "shear_xy", "rotation")
    lat = np.asarray(affine.lattice_from_strain(*(lab[k] for k in names)), np.float64).reshape(-1, 2, 2)
    ref = region_mask((8, 8), (0, 2, 0, 2)).reshape(-1)
    cov = np.zeros((64, 4, 4))
    for i in range(64):
        m = rng.normal(size=(4, 4)) * 1e-4
        cov[i] = m @ m.T
    cov[ref] *= 1e-6
    sigma = strain_uncertainty(lat, cov, ref)
    h = 1e-4  # central differences; the referencing runs in float32
    for i in (10, 40, 63):
        jac = np.zeros((4, 4))
        for j in range(4):
            up, down = lat.copy(), lat.copy()
            up[i].flat[j] += h
            down[i].flat[j] -= h
            hi, lo = referenced_strain(up, ref), referenced_strain(down, ref)
            jac[:, j] = [(hi[k][i] - lo[k][i]) / (2 * h) for k in names]
        want = np.sqrt(np.diag(jac @ cov[i] @ jac.T))
        np.testing.assert_allclose([sigma[k][i] for k in names], want, rtol=2e-2)


def test_the_reference_region_adds_its_own_uncertainty_to_every_position():
    lab = _labels()
    names = ("strain_xx", "strain_yy", "shear_xy", "rotation")
    lat = np.asarray(affine.lattice_from_strain(*(lab[k] for k in names)), np.float64).reshape(-1, 2, 2)
    ref = region_mask((8, 8), (0, 2, 0, 2)).reshape(-1)
    cov = np.broadcast_to(np.eye(4) * 1e-8, (64, 4, 4)).copy()
    sigma = strain_uncertainty(lat, cov, ref)
    alone = np.sqrt(1 / ref.sum())  # the weighted mean of 4 equal reference positions, relative to one position
    assert (sigma["reference_strain_xx"] > 0).all()
    np.testing.assert_allclose(sigma["reference_strain_xx"][ref], alone * np.sqrt(1e-8), rtol=0.05)
    assert (sigma["strain_xx"] > sigma["reference_strain_xx"]).all()


def _noisy_region(rng, k, sigma, draws):
    """``draws`` reference regions of ``k`` positions: a strained, turned lattice plus Gaussian noise of ``sigma`` on
    each entry, ``(draws, k, 2, 2)``, the true deformation, and the per-position covariance ``(k, 4, 4)``."""
    truth = np.asarray(affine.lattice_from_strain(0.004, -0.002, 0.001, 0.3), np.float64)
    lat = truth + sigma * rng.normal(size=(draws, k, 2, 2))
    return lat, truth, np.broadcast_to(np.eye(4) * sigma**2, (k, 4, 4))


def test_the_reference_is_the_error_weighted_mean_with_the_variance_it_reports():
    """Over many noise draws the reference scatters as its covariance says, with 2/pi the variance of the median."""
    rng = np.random.default_rng(0)
    lat, truth, cov = _noisy_region(rng, 16, 1e-3, 400)
    sel = np.ones(16, bool)
    refs = [reference_deformation(x, sel, lattice_cov=cov) for x in lat]
    assert all(r.method == "weighted mean" for r in refs)
    err = np.stack([r.matrix - truth for r in refs]).reshape(-1, 4)
    reported = np.mean([np.diag(r.covariance) for r in refs], 0)
    np.testing.assert_allclose(err.var(0), reported, rtol=0.2)
    np.testing.assert_allclose(reported, 1e-6 / 16, rtol=0.15)
    median_err = (np.median(lat, axis=1) - truth).reshape(-1, 4)
    assert 1.3 < median_err.var(0).mean() / err.var(0).mean() < 1.9  # pi / 2 for Gaussian noise


def test_a_reference_position_from_another_grain_is_left_out_of_the_mean():
    rng = np.random.default_rng(1)
    lat, truth, cov = _noisy_region(rng, 16, 1e-3, 1)
    lat = lat[0]
    lat[5] = truth * 1.02  # a neighbouring grain, 2 % larger
    ref = reference_deformation(lat, np.ones(16, bool), lattice_cov=cov)
    assert ref.method == "weighted mean" and not ref.used[5] and ref.used.sum() == 15
    np.testing.assert_allclose(ref.matrix, np.delete(lat, 5, 0).mean(0), atol=1e-9)


def test_a_reference_region_of_two_grains_in_equal_shares_falls_back_to_the_median():
    rng = np.random.default_rng(2)
    lat, truth, cov = _noisy_region(rng, 16, 1e-4, 1)
    lat = lat[0]
    lat[8:] *= 1.02
    ref = reference_deformation(lat, np.ones(16, bool), lattice_cov=cov)
    assert ref.method == "median"


def test_without_error_bars_every_reference_position_weighs_the_same():
    rng = np.random.default_rng(3)
    lat, _, _ = _noisy_region(rng, 16, 1e-3, 1)
    ref = reference_deformation(lat[0], np.ones(16, bool))
    assert ref.method == "weighted mean"
    np.testing.assert_allclose(ref.matrix, lat[0][ref.used].mean(0), atol=1e-12)


def test_a_reference_whose_error_bars_are_all_zero_is_the_median():
    rng = np.random.default_rng(4)
    lat, _, _ = _noisy_region(rng, 8, 1e-3, 1)
    ref = reference_deformation(lat[0], np.ones(8, bool), lattice_cov=np.zeros((8, 4, 4)))
    assert ref.method == "median"
    np.testing.assert_allclose(ref.covariance, 0.0)


def test_lattice_covariance_maps_the_warp_covariance_through_the_lattice():
    theta = np.asarray(affine.warp_from_lattice(jnp.asarray(np.eye(2) * 1.01), (64, 64)))[None]
    cov_phi = np.eye(6)[None] * 1e-8
    got = lattice_covariance(theta, cov_phi, (64, 64))
    phi0 = np.asarray(affine.invert(jnp.asarray(theta[0]))).reshape(6)

    def lat(p):
        return np.asarray(affine.lattice_from_warp(affine.invert(jnp.asarray(p.reshape(2, 3))), (64, 64))).reshape(4)

    jac = np.stack([(lat(phi0 + 1e-3 * np.eye(6)[j]) - lat(phi0 - 1e-3 * np.eye(6)[j])) / 2e-3 for j in range(6)], 1)
    np.testing.assert_allclose(got[0], jac @ jac.T * 1e-8, rtol=1e-2, atol=1e-12)


def test_error_table_references_absolute_predictions_like_the_labels():
    """An absolute map (e.g. py4DSTEM's) measured against an unstrained lattice constant 1e-3 off (every lattice
    scaled alike): scored as it is that is an error; referenced to the region like the labels it cancels."""
    lab = _labels()
    names = ("strain_xx", "strain_yy", "shear_xy", "rotation")
    lattice = 1.001 * np.asarray(affine.lattice_from_strain(*(lab[k] for k in names)))
    pred = {k: np.asarray(v, np.float64) for k, v in affine.strain_from_affine(lattice).items()}
    as_is = error_table(pred, lab, reference_region=(0, 2, 0, 2))
    relative = error_table(pred, lab, reference_region=(0, 2, 0, 2), reference_predictions=True)
    assert as_is["strain_yy"]["mae"] > 3e-4
    assert max(relative[k]["mae"] for k in ("strain_xx", "strain_yy", "shear_xy")) < 2e-6


def test_strain_files_say_whether_they_are_absolute():
    from ccstae_jax.pipeline import _is_absolute

    assert _is_absolute({"strain_reference": "absolute"})
    assert not _is_absolute({"strain_reference": "relative", "method": "py4dstem"})
    assert _is_absolute({"method": "py4dstem"})  # baseline files written before the attribute
    assert not _is_absolute({"method": "ccstae-jax fast"})


def _map_with(strain, sigma, valid=None):
    rng = np.random.default_rng(0)
    shape = (16, 16)
    valid = np.ones(shape, bool) if valid is None else valid
    maps = {"valid": valid}
    for k in ("strain_xx", "strain_yy"):
        maps[k] = strain(rng, shape)
        maps[f"uncertainty_{k}"] = np.full(shape, sigma)
    return maps


def test_a_map_whose_spread_matches_its_noise_raises_no_warning():
    assert map_warnings(_map_with(lambda rng, s: 1e-3 * rng.standard_normal(s), 1e-3)) == []


def test_a_map_that_ignores_its_patterns_is_flagged_as_collapsed():
    flags = map_warnings(_map_with(lambda rng, s: 1e-5 * rng.standard_normal(s), 1e-3))
    assert len(flags) == 1 and flags[0].startswith("strain collapsed")


def test_a_map_noisier_than_half_a_percent_is_flagged_as_imprecise():
    flags = map_warnings(_map_with(lambda rng, s: 2e-2 * rng.standard_normal(s), 2e-2))
    assert len(flags) == 1 and "median 1-sigma strain 2.00 %" in flags[0]


def test_a_mostly_invalid_map_is_flagged():
    valid = np.zeros((16, 16), bool)
    valid[:4] = True
    flags = map_warnings(_map_with(lambda rng, s: 1e-3 * rng.standard_normal(s), 1e-3, valid))
    assert flags == ["only 25 % of the positions are valid (see /invalid_reason)"]
    assert map_warnings({"valid": np.zeros((4, 4), bool)})[0].startswith("no valid position")


def test_wide_disks_are_flagged_naming_the_rigid_spots_for_a_stretched_base():
    from ccstae_jax.model.geometry import Geometry

    maps = _map_with(lambda rng, s: 1e-3 * rng.standard_normal(s), 1e-3)
    wide = Geometry(pattern_shape=(200, 200), center=(100.0, 100.0), disk_radius=16.0, spot_spacing=36.0,
                    symmetry=6, ring=(18.0, 85.0))
    flags = map_warnings(maps, geometry=wide)
    assert len(flags) == 1 and flags[0].startswith("wide disks (radius 16.0 px, 44 % of the spot spacing")
    assert "--no-rigid-spots" in flags[0]
    (rigid,) = map_warnings(maps, geometry=wide, rigid_spots=True)
    assert rigid.startswith("wide disks (radius 16.0 px, 44 % of the spot spacing") and "rigid spots" in rigid
    assert map_warnings(maps, geometry=dataclasses.replace(wide, disk_radius=8.0)) == []


def test_mixing_uncertainty_covers_a_position_between_two_grains_with_its_distance_to_the_nearer():
    values = np.zeros((6, 7))
    values[:, 3] = 0.3  # the probe straddles the boundary: a mixture, nearer the left grain
    values[:, 4:] = 1.0
    sigma = np.full(values.shape, 0.01)
    got = mixing_uncertainty(values, sigma)
    np.testing.assert_allclose(got[:, 3], 0.3)
    np.testing.assert_array_equal(np.delete(got, 3, axis=1), 0.0)  # both grains, boundary columns included


def test_mixing_uncertainty_covers_a_value_beyond_all_its_neighbours_with_its_distance_to_the_nearest():
    values = np.zeros((5, 5))
    values[:, 3:] = 0.5  # two grains
    values[2, 2] = 2.0  # a fit that settled beyond both of them
    sigma = np.full(values.shape, 0.01)
    got = mixing_uncertainty(values, sigma)
    assert got[2, 2] == pytest.approx(1.5)
    values[[1, 1, 1, 2, 3], [1, 2, 3, 1, 1]] = np.nan  # fewer than three valid neighbours left: nothing to judge by
    values[2, 3] = np.nan  # two neighbours remain, (3, 2) and (3, 3)
    assert mixing_uncertainty(values, sigma)[2, 2] == 0.0


def test_mixing_uncertainty_is_rare_and_small_in_a_noisy_uniform_grain():
    rng = np.random.default_rng(3)
    sigma = np.full((64, 64), 1e-3)
    got = mixing_uncertainty(rng.normal(0.0, 1e-3, sigma.shape), sigma)
    assert np.mean(got > 0) < 0.02
    assert got.max() < 5e-3


def test_mixing_uncertainty_wraps_angles_and_skips_invalid_neighbours():
    period = np.pi / 3
    values = np.full((3, 3), period / 2 - 0.001)
    values[0, :] = -period / 2 + 0.001  # the same orientation, across the wrap
    values[2, :] = np.nan  # invalid: not a neighbour
    got = mixing_uncertainty(values, np.full((3, 3), 1e-4), period=period)
    np.testing.assert_array_equal(got[:2], 0.0)


def _two_phase_scan(mismatch: float):
    """Predictions of a 12x12 scan whose right half has a lattice ``1 + mismatch`` times larger, with brighter
    outer orders when ``mismatch`` is not 0 (fit noise on both)."""
    rng = np.random.default_rng(5)
    n = 144
    scale = np.where(np.arange(n) % 12 >= 6, 1.0 / (1.0 + mismatch), 1.0)  # spots move in on a larger lattice
    theta = np.zeros((n, 2, 3), np.float32)
    theta[:, 0, 0] = theta[:, 1, 1] = scale * (1 + 5e-4 * rng.standard_normal(n))
    amp = 1.0 + 0.05 * rng.standard_normal((n, 4))
    amp[scale < 1, 2:] *= 1.3
    return {"theta": theta, "ring_signal": np.ones(n, np.float32), "lattice_signal": np.full(n, 0.3, np.float32),
            "lattice_significance": np.full(n, 10.0, np.float32), "class_index": np.zeros(n, np.int32),
            "spot_amplitude": amp.astype(np.float32)}


def test_a_one_base_map_tells_two_phases_apart_with_the_reference_regions_as_phase_0():
    maps = strain_maps(_two_phase_scan(0.04), (12, 12), (64, 64), reference_region=(0, 4, 8, 12))
    assert maps["phase_split"].n_phases == 2
    np.testing.assert_array_equal(maps["phase"][:, 6:], 0)  # the reference region's half
    np.testing.assert_array_equal(maps["phase"][:, :6], 1)
    chex.assert_shape(maps["spot_amplitude"], (12, 12, 4))


def test_a_one_phase_map_is_all_phase_0():
    maps = strain_maps(_two_phase_scan(0.0), (12, 12), (64, 64))
    assert maps["phase_split"].n_phases == 1
    np.testing.assert_array_equal(maps["phase"], 0)


def _grain_maps(noise, sigma, *, step=0.0, shape=(24, 24), seed=0):
    """Four quantities on a scan of two grains (left and right halves, ``step`` apart) with Gaussian noise of
    standard deviation ``noise`` and claimed 1-sigma errors ``sigma``."""
    rng = np.random.default_rng(seed)
    values, sigmas = {}, {}
    for q in ("strain_xx", "strain_yy", "shear_xy", "rotation"):
        truth = np.where(np.arange(shape[1])[None, :] < shape[1] // 2, 0.0, step) * np.ones(shape)
        values[q] = truth + noise * rng.standard_normal(shape)
        sigmas[q] = np.full(shape, sigma)
    return values, sigmas


def test_error_bars_are_widened_to_the_scatter_between_neighbours():
    values, sigmas = _grain_maps(1.3e-3, 1e-3)
    assert scatter_scale(values, sigmas) == pytest.approx(1.3, rel=0.05)


def test_error_bars_wider_than_the_scatter_are_left_as_they_are():
    values, sigmas = _grain_maps(0.7e-3, 1e-3)
    assert scatter_scale(values, sigmas) == 1.0


def test_a_grain_boundary_does_not_widen_the_error_bars():
    values, sigmas = _grain_maps(1.3e-3, 1e-3, step=20e-3)
    assert scatter_scale(values, sigmas) == pytest.approx(1.3, rel=0.05)


def test_invalid_positions_and_too_few_neighbours_leave_the_error_bars_alone():
    values, sigmas = _grain_maps(3e-3, 1e-3, shape=(4, 4))
    assert scatter_scale(values, sigmas) == 1.0  # 4 quantities x 24 pairs, fewer than MIN_SCATTER_PAIRS
    values, sigmas = _grain_maps(3e-3, 1e-3)
    values = {q: np.where(np.arange(24)[:, None] % 2 == 0, v, np.nan) for q, v in values.items()}
    assert scatter_scale(values, sigmas) == pytest.approx(3.0, rel=0.05)  # only the rows' own pairs count


def test_rotations_are_compared_across_the_symmetry_period():
    period = np.pi / 3
    values, sigmas = _grain_maps(1e-3, 1e-3)
    rotation = values.pop("rotation") + period / 2  # scatters across +-period/2
    wrapped = {"rotation": (rotation + period / 2) % period - period / 2}
    sigma = {"rotation": sigmas["rotation"]}
    unwrapped = scatter_scale({"rotation": rotation}, sigma)
    assert scatter_scale(wrapped, sigma, periods={"rotation": period}) == pytest.approx(unwrapped, rel=1e-9)
    assert scatter_scale(wrapped, sigma) > 100 * unwrapped


def test_strain_maps_widen_every_error_bar_by_the_same_factor(monkeypatch):
    from ccstae_jax.mapping import reference

    rng = np.random.default_rng(1)
    n = 64
    phi = np.eye(2, 3)[None] + np.concatenate([1e-3 * rng.standard_normal((n, 2, 2)), np.zeros((n, 2, 1))], -1)
    preds = {**_mixed_scan(0, 0.0), "theta": np.asarray(affine.invert(jnp.asarray(phi, jnp.float32))),
             "fisher": np.broadcast_to(1e6 * np.eye(6), (n, 6, 6)).copy(), "chi2": np.full(n, 100.0),
             "dof": np.full(n, 100.0)}
    base = strain_maps(preds, (8, 8), (64, 64))
    monkeypatch.setattr(reference, "scatter_scale", lambda *a, **k: 1.5)
    wide = strain_maps(preds, (8, 8), (64, 64))
    assert base["error_scale"] >= 1.0 and wide["error_scale"] == 1.5
    for q in ("strain_xx", "strain_yy", "shear_xy", "rotation"):
        np.testing.assert_allclose(wide[f"uncertainty_{q}"], 1.5 / base["error_scale"] * base[f"uncertainty_{q}"],
                                   rtol=1e-5)


def _outlier_scan(fisher_factors=(), strain_jumps=()):
    """A uniform 8x8 scan with small scatter; ``fisher_factors``: (position, factor) scaling its Fisher matrix,
    ``strain_jumps``: (position, strain_xx added)."""
    rng = np.random.default_rng(2)
    n = 64
    phi = np.eye(2, 3)[None] + np.concatenate([1e-3 * rng.standard_normal((n, 2, 2)), np.zeros((n, 2, 1))], -1)
    fisher = np.broadcast_to(1e6 * np.eye(6), (n, 6, 6)).copy()
    for i, f in fisher_factors:
        fisher[i] *= f
    for i, jump in strain_jumps:
        phi[i, 0, 0] += jump
    return {**_mixed_scan(0, 0.0), "theta": np.asarray(affine.invert(jnp.asarray(phi, jnp.float32))),
            "fisher": fisher, "chi2": np.full(n, 100.0), "dof": np.full(n, 100.0)}


def test_a_position_whose_fit_pins_nothing_down_is_invalid_not_a_strain_value():
    """A fit whose 1-sigma strain is several per cent is marked invalid (reason 6) instead of having its value read
    as strain; a position merely noisier than the rest (4.5x) stays."""
    maps = strain_maps(_outlier_scan(fisher_factors=[(37, 1e-5), (12, 0.05)]), (8, 8), (64, 64))
    reason = maps["invalid_reason"].reshape(-1)
    assert reason[37] == 6 and not maps["valid"].reshape(-1)[37]
    assert np.isnan(maps["strain_xx"].reshape(-1)[37]) and np.isnan(maps["uncertainty_strain_xx"].reshape(-1)[37])
    assert reason[12] == 0 and (np.delete(reason, 37) == 0).all()
    assert INVALID_REASONS[6].startswith("outlier")


def test_a_confident_value_beyond_all_its_neighbours_by_whole_per_cent_is_invalid():
    """A fit that matched the wrong spots (a grain boundary) can be confident and wrong: 5 % of strain where every
    neighbour reads ~0. Its distance to the neighbours makes its error bar (`mixing_uncertainty`), and it is
    invalid; a 0.3 % step, which a real strain feature can make, is kept."""
    maps = strain_maps(_outlier_scan(strain_jumps=[(27, 0.05), (45, 0.003)]), (8, 8), (64, 64))
    reason = maps["invalid_reason"].reshape(-1)
    assert reason[27] == 6
    assert reason[45] == 0 and (np.delete(reason, 27) == 0).all()
