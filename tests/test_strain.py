"""Specifications of strain referencing, validity, the strain-map file and the error table."""
import os

import numpy as np
import pytest

from ccstae_jax import affine
from ccstae_jax.masks import static_ring_mask
from ccstae_jax.evaluate import error_table, referenced_labels
from ccstae_jax.strain import read_strain_h5, referenced_strain, region_mask, strain_maps, write_strain_h5


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


def test_blank_and_featureless_patterns_are_marked_invalid_not_garbage():
    n = 16
    preds = {
        "theta": np.broadcast_to(np.eye(2, 3, dtype=np.float32), (n, 2, 3)).copy(),
        "error": np.zeros(n, np.float32),
        "ring_signal": np.ones(n, np.float32),
        "lattice_signal": np.full(n, 0.3, np.float32),
        "class_index": np.zeros(n, np.int32),
    }
    preds["ring_signal"][3] = 0.0  # blank
    preds["lattice_signal"][5] = 0.001  # pure background: no six-fold signal
    preds["theta"][7] = np.nan
    maps = strain_maps(preds, (4, 4), (64, 64))
    assert maps["valid"].sum() == 13
    assert maps["invalid_reason"].ravel()[[3, 5, 7]].tolist() == [1, 2, 3]
    assert np.isnan(maps["strain_xx"].ravel()[[3, 5, 7]]).all()
    assert np.isfinite(maps["strain_xx"][maps["valid"]]).all()


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


def test_labels_of_another_shape_are_rejected():
    lab = _labels()
    pred = {k: np.zeros((4, 4)) for k in lab}
    with pytest.raises(ValueError, match="label strain_xx has shape"):
        error_table(pred, lab)


def test_harmonic_significance_separates_lattice_from_pure_background():
    """A lattice pattern is significant against the odd-harmonic noise; Poisson background alone is not."""
    import jax

    from _patterns import hex_patterns
    from ccstae_jax.objective import CCSTAETask, configure
    from ccstae_jax.strain import make_predict_fn

    lattice, _ = hex_patterns(4, size=64, g=18.0, seed=3)
    rng = np.random.default_rng(0)
    r = np.hypot(*np.mgrid[:64, :64] - 32)
    glow = 200.0 / (1 + (r / 3) ** 2)
    background = rng.poisson(np.broadcast_to(glow, (4, 64, 64))).astype(np.float32)
    noisy_lattice = rng.poisson(lattice * 50 + glow).astype(np.float32)
    mcfg, lcfg = configure(lattice, preset="fast")
    task = CCSTAETask(mcfg, lcfg)
    params = task.init_params(jax.random.key(0), lattice)
    predict = make_predict_fn(task)
    sig_lattice = np.asarray(predict(params, noisy_lattice)["lattice_significance"])
    sig_background = np.asarray(predict(params, background)["lattice_significance"])
    assert (sig_lattice > 4).all(), sig_lattice
    assert (sig_background < 4).all(), sig_background


def _fast_task(x, **model_overrides):
    import jax

    from ccstae_jax.objective import CCSTAETask, configure

    mcfg, lcfg = configure(x, preset="fast", model_overrides=model_overrides or None)
    task = CCSTAETask(mcfg, lcfg)
    return task, task.init_params(jax.random.key(0), x)


def test_reestimated_base_is_the_symmetrised_mean_of_the_aligned_patterns_without_padding():
    import jax.numpy as jnp

    from _patterns import hex_patterns
    from ccstae_jax.models import symmetrize
    from ccstae_jax.strain import make_base_accumulator, reestimate_bases

    x, _ = hex_patterns(3, size=64, g=18.0, seed=5)
    task, params = _fast_task(x)
    sums, coverage, counts = make_base_accumulator(task)(jnp.asarray(x), affine.identity_warp((3,)),
                                                         jnp.zeros(3, jnp.int32), jnp.array([1.0, 1.0, 0.0]))
    np.testing.assert_array_equal(np.asarray(counts), [2.0])  # the third pattern is padding
    got = reestimate_bases(task, params, sums, coverage, counts)
    scale = task.model_cfg.intensity_scale
    want = np.asarray(symmetrize(jnp.asarray(x[:2].mean(0) * scale)[None], task.model_cfg))
    seen = np.asarray(symmetrize(jnp.ones((1, 64, 64)), task.model_cfg)) >= 0.25
    np.testing.assert_array_equal(np.asarray(got.support), seen)
    inner = static_ring_mask((64, 64), -1, 20)[None]  # well inside the frame every rotation covers it fully
    np.testing.assert_allclose(np.asarray(got.bases)[inner], want[inner], rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_reestimated_base_averages_each_pixel_over_the_patterns_that_saw_it():
    """A pattern pulled from outside the detector adds nothing to a base pixel: the mean is not diluted by padding,
    and pixels no pattern saw often enough are marked unsupported."""
    import jax.numpy as jnp

    from ccstae_jax.strain import make_base_accumulator, reestimate_bases

    from _patterns import hex_patterns

    task, params = _fast_task(hex_patterns(2, size=64, g=18.0, seed=5)[0], symmetrize_bases=False)
    x = np.full((2, 64, 64), 2.0, np.float32)
    shift = np.asarray(affine.identity_warp((2,))).copy()
    shift[1, 0, 2] = 1.0  # the second pattern is pulled half a frame to the side: the right half sees nothing
    sums, coverage, counts = make_base_accumulator(task)(jnp.asarray(x), jnp.asarray(shift), jnp.zeros(2, jnp.int32),
                                                         jnp.ones(2))
    got = reestimate_bases(task, params, sums, coverage, counts, min_support=0.75)
    want = 2.0 * task.model_cfg.intensity_scale
    np.testing.assert_allclose(np.asarray(got.bases)[0][np.asarray(got.support)[0]], want, rtol=1e-5)
    assert np.asarray(got.support)[0, :, :31].all() and not np.asarray(got.support)[0, :, 33:].any()


def test_a_class_without_patterns_keeps_its_learned_base():
    import jax.numpy as jnp

    from _patterns import hex_patterns
    from ccstae_jax.strain import reestimate_bases

    x, _ = hex_patterns(2, size=64, g=18.0, seed=5)
    task, params = _fast_task(x, num_bases=2)
    learned = np.asarray(task.model.apply({"params": params}, method=lambda m: m.dictionary()))
    sums = np.stack([np.full((64, 64), 3.0, np.float32), np.zeros((64, 64), np.float32)])
    coverage = np.stack([np.ones((64, 64), np.float32), np.zeros((64, 64), np.float32)])
    got = reestimate_bases(task, params, jnp.asarray(sums), jnp.asarray(coverage), jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(np.asarray(got.bases)[1], learned[1])
    assert np.asarray(got.support)[1].all()
    assert not np.allclose(np.asarray(got.bases)[0], learned[0])


def test_second_pass_against_the_true_base_recovers_the_strain_from_a_perturbed_start():
    """The updated-base pass refines from the given warps against the given bases (not the learned ones)."""
    import jax.numpy as jnp

    from _patterns import hex_patterns
    from ccstae_jax.strain import make_predict_fn

    x, labels = hex_patterns(4, size=64, g=18.0, seed=2, max_strain=0.015, rotations=[0.0] * 4)
    truth, _ = hex_patterns(1, size=64, g=18.0, max_strain=0.0, rotations=[0.0])
    task, params = _fast_task(x)
    scale = task.model_cfg.intensity_scale
    predict = make_predict_fn(task, refine_steps=15, base_update=True)
    start = jnp.asarray(np.broadcast_to(np.asarray(affine.identity_warp((1,)))[0], (4, 2, 3)))
    support = jnp.ones((1, 64, 64), bool)
    theta = np.asarray(predict(params, x, jnp.asarray(truth * scale), support, start)["theta"])
    got = affine.strain_from_affine(affine.lattice_from_warp(jnp.asarray(theta), (64, 64)))
    for i, k in enumerate(("strain_xx", "strain_yy", "shear_xy")):
        np.testing.assert_allclose(np.asarray(got[k]), labels[:, i], atol=5e-4)


def test_update_annulus_reaches_the_corners_but_not_the_centre_or_the_edge():
    from ccstae_jax.strain import update_annulus

    from _patterns import hex_patterns

    task, _ = _fast_task(hex_patterns(2, size=64, g=18.0, seed=5)[0])
    keep = update_annulus(task)
    assert keep[3, 3] and keep[-4, -4] and keep[3, -4]  # corners, 2 px inside the frame
    assert not keep[:2].any() and not keep[:, -2:].any()
    cr, cc = task.model_cfg.center_px
    assert not keep[int(cr), int(cc)]


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
