"""Specifications of the figures: files, sizes, shared colour scales, NaN handling, metrics parsing, input errors."""
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from ccstae_jax.report import plots

DPI = 50  # small PNGs keep the tests fast; sizes below are figsize (inches) * DPI


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])  # (width, height)


def _maps(shape=(16, 16), seed=0, noise=0.0):
    """Four grains with strains in +-2 % and rotations in +-20 deg, plus optional noise."""
    rng = np.random.default_rng(seed)
    grain = (np.arange(shape[0])[:, None] >= shape[0] // 2) * 2 + (np.arange(shape[1])[None, :] >= shape[1] // 2)
    vals = np.random.default_rng(1).uniform(-0.02, 0.02, (4, 3))
    m = {k: (vals[grain, i] + noise * rng.normal(size=shape)).astype(np.float32)
         for i, k in enumerate(plots.STRAIN_KEYS)}
    m["rotation"] = (np.radians([0.0, 10.0, -20.0, 5.0])[grain] + noise * rng.normal(size=shape)).astype(np.float32)
    return m


def _predicted(shape=(16, 16)):
    m = _maps(shape, noise=2e-3)
    valid = np.ones(shape, bool)
    valid[3:5, 3:5] = False
    for k in plots.QUANTITIES:
        m[k][~valid] = np.nan
    m["valid"] = valid
    m["invalid_reason"] = np.where(valid, 0, 2).astype(np.uint8)
    m["reconstruction_error"] = np.random.default_rng(2).lognormal(-7, 0.3, shape).astype(np.float32)
    return m


def _strain_images(fig):
    """(strain images, rotation images) of a strain-maps figure: the 4 map columns, row by row."""
    images = [ax.images[0] for ax in fig.axes if ax.images]
    return [im for i, im in enumerate(images) if i % 4 < 3], images[3::4]


def _metrics_file(path, *, n_steps=20):
    """A metrics.jsonl like train._MetricsLog writes: step lines, epoch lines, and a line cut short by a kill."""
    with open(path, "w") as f:
        for s in range(1, n_steps + 1):
            loss = float(np.exp(-s / 5) + 0.01)
            f.write(json.dumps({"kind": "step", "step": s, "epoch": (s - 1) // 5, "loss": loss, "forward": loss / 2,
                                "cycle": loss / 3, "penalty": 0.0, "l1": 1e-3, "grad_norm": 0.5,
                                "learning_rate": 1e-3 * 0.5 ** ((s - 1) // 5), "steps": 1, "nonfinite_count": 0,
                                "patterns_per_s": 100.0, "wall_time": 1.7e9 + s}) + "\n")
            if s % 5 == 0:
                f.write(json.dumps({"kind": "epoch", "epoch": s // 5 - 1, "step": s, "loss": loss,
                                    "learning_rate": 1e-3, "best_loss": loss, "wall_time": 1.7e9 + s}) + "\n")
        f.write('{"kind": "step", "step": 21, "loss": 0.')
    return path


# ------------------------------------------------------------------------------------------------------------------
def test_strain_maps_png_has_one_row_per_method_at_figure_size(tmp_path):
    path = plots.plot_strain_maps(_predicted(), tmp_path / "maps.png", labels=_maps(), baseline=_maps(noise=5e-3),
                                  title="test", dpi=DPI)
    assert path == str(tmp_path / "maps.png")
    assert os.path.getsize(path) > 1000
    # 4 panels of 2.9 in + 0.6 in wide; 3 rows of 2.9 in + 1.9 in for colour bars and title
    assert _png_size(path) == (610, 530)


def test_strain_maps_without_labels_or_baseline_has_a_single_row(tmp_path):
    fig = plots._strain_maps_figure(_predicted(), dpi=DPI)
    strain, rotation = _strain_images(fig)
    assert (len(strain), len(rotation)) == (3, 1)
    path = plots.plot_strain_maps(_predicted(), tmp_path / "maps.png", dpi=DPI)
    assert _png_size(path) == (610, round((2.9 + 1.9) * DPI))


def test_strain_panels_share_one_symmetric_scale_and_rotation_has_its_own():
    pred, labels, base = _predicted(), _maps(), _maps(noise=5e-3)
    strain, rotation = _strain_images(plots._strain_maps_figure(pred, labels=labels, baseline=base))
    assert len(strain) == 9 and len(rotation) == 3
    lims = {(im.norm.vmin, im.norm.vmax) for im in strain}
    assert len(lims) == 1
    vmin, vmax = lims.pop()
    assert vmin == -vmax and vmax > 0
    everything = np.concatenate([np.abs(m[k][np.isfinite(m[k])]) for m in (pred, labels, base)
                                 for k in plots.STRAIN_KEYS])
    np.testing.assert_allclose(vmax, 100 * np.percentile(everything, 99.5), rtol=1e-6)  # percent
    rlims = {(im.norm.vmin, im.norm.vmax) for im in rotation}
    assert rlims == {(-30.0, 30.0)}  # degrees: one 60-degree period of the hexagonal lattice


def test_rotation_is_drawn_wrapped_on_a_cyclic_colour_map_over_one_symmetry_period():
    pred = _predicted()
    pred["rotation"][0, 0] = np.radians(35.0)  # the same orientation as -25 deg modulo 60
    _, rotation = _strain_images(plots._strain_maps_figure(pred))
    assert rotation[0].cmap.name.startswith("twilight")
    assert rotation[0].get_array()[0, 0] == pytest.approx(-25.0)
    _, square = _strain_images(plots._strain_maps_figure(pred, symmetry=4))
    assert (square[0].norm.vmin, square[0].norm.vmax) == (-45.0, 45.0)


def test_a_fixed_rotation_limit_or_no_symmetry_gives_a_diverging_scale():
    _, fixed = _strain_images(plots._strain_maps_figure(_predicted(), rotation_limit=5.0))
    assert (fixed[0].norm.vmin, fixed[0].norm.vmax) == (-5.0, 5.0) and fixed[0].cmap.name.startswith("RdBu")
    _, free = _strain_images(plots._strain_maps_figure(_predicted(), symmetry=None))
    assert 15 < free[0].norm.vmax < 25  # 99.5th percentile of rotations up to 20 deg


def test_the_most_strained_grain_is_not_saturated_by_the_automatic_strain_scale():
    pred = _maps((40, 40))  # four equal grains: the largest |strain| covers a quarter of the positions
    strain, _ = _strain_images(plots._strain_maps_figure(pred))
    top = 100 * max(np.abs(pred[k]).max() for k in plots.STRAIN_KEYS)
    assert strain[0].norm.vmax == pytest.approx(top)


def test_reference_region_is_outlined_on_every_panel_and_named_with_the_title():
    fig = plots._strain_maps_figure(_predicted(), labels=_maps(), reference_region=(2, 6, 8, 12),
                                    title="data sim.h5, run run1")
    boxes = [p for ax in fig.axes if ax.images for p in ax.patches]
    assert len(boxes) == 8  # 2 rows x 4 panels
    assert {(b.get_x(), b.get_y(), b.get_width(), b.get_height()) for b in boxes} == {(7.5, 1.5, 4, 4)}
    text = fig._suptitle.get_text()
    assert "data sim.h5, run run1" in text and "rows 2:6, columns 8:12" in text
    assert "whole scan" in plots._strain_maps_figure(_predicted())._suptitle.get_text()
    with pytest.raises(ValueError, match=r"reference_region \(2, 20, 0, 4\) is outside the 16x16 scan"):
        plots._strain_maps_figure(_predicted(), reference_region=(2, 20, 0, 4))


def test_strain_limit_fixes_the_strain_scale_in_percent():
    strain, _ = _strain_images(plots._strain_maps_figure(_predicted(), strain_limit=0.005))
    assert all((im.norm.vmin, im.norm.vmax) == (-0.5, 0.5) for im in strain)


def test_nan_and_invalid_positions_are_masked_and_drawn_grey(tmp_path):
    pred = _predicted()
    pred["strain_xx"][0, 0] = 0.01
    pred["valid"][0, 0] = False  # a finite value at an invalid position is hidden too
    pred["shear_xy"][:] = np.nan  # a whole map without values still renders
    strain, _ = _strain_images(plots._strain_maps_figure(pred))
    shown = np.ma.masked_invalid(strain[0].get_array())
    assert shown.mask[0, 0] and shown.mask[3, 3] and not shown.mask[10, 10]
    assert strain[0].cmap.get_bad()[:3] == pytest.approx((0.72, 0.72, 0.72))
    assert plots.plot_strain_maps(pred, tmp_path / "nan.png", dpi=DPI)
    assert plots.plot_histograms(pred, tmp_path / "nan_hist.png", dpi=DPI)


def test_histograms_png_at_figure_size(tmp_path):
    path = plots.plot_histograms(_predicted(), tmp_path / "hist.png", labels=_maps(), baseline=_maps(noise=5e-3),
                                 bins=20, dpi=DPI)
    assert os.path.getsize(path) > 1000
    assert _png_size(path) == (750, round(4.3 * DPI))


def test_pattern_and_mask_png_and_mask_shape_is_checked(tmp_path):
    yy, xx = np.mgrid[:32, :32] - 16
    pattern = np.exp(-(yy**2 + xx**2) / 20.0) + 1e-3
    mask = np.hypot(yy, xx) > 4
    path = plots.plot_pattern_and_mask(pattern, mask, tmp_path / "pattern.png", title="sample", dpi=DPI)
    assert _png_size(path) == (round(9.6 * DPI), round(4.8 * DPI))
    assert _png_size(plots.plot_pattern_and_mask(pattern, None, tmp_path / "p1.png", log=False, dpi=DPI)) == (
        round(5.0 * DPI), round(4.8 * DPI))
    with pytest.raises(ValueError, match=r"mask has shape \(16, 16\), expected the pattern's \(32, 32\)"):
        plots.plot_pattern_and_mask(pattern, mask[:16, :16], tmp_path / "bad.png")


def test_bases_png_lays_out_a_grid(tmp_path):
    bases = np.random.default_rng(0).normal(size=(5, 24, 24))
    path = plots.plot_bases(bases, tmp_path / "bases.png", dpi=DPI)
    assert _png_size(path) == (round((4 * 3.4 + 0.4) * DPI), round((2 * 3.3 + 0.5) * DPI))  # 4 columns, 2 rows
    with pytest.raises(ValueError, match=r"bases must be \(num_bases, H, W\)"):
        plots.plot_bases(np.zeros((2, 3, 4, 5)), tmp_path / "bad.png")


def test_read_metrics_splits_steps_and_epochs_and_skips_a_cut_line(tmp_path):
    steps, epochs = plots.read_metrics(_metrics_file(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in steps] == list(range(1, 21))
    assert [r["step"] for r in epochs] == [5, 10, 15, 20]


def test_training_curves_plot_every_loss_term_and_the_learning_rate(tmp_path):
    metrics = _metrics_file(tmp_path / "metrics.jsonl")
    fig = plots._training_figure(metrics)
    loss_ax, lr_ax, grad_ax = fig.axes
    drawn = {line.get_label() for line in loss_ax.get_lines()}
    assert {"loss", "forward", "cycle", "l1", "loss (epoch mean)"} <= drawn
    assert not drawn & {"learning_rate", "wall_time", "step", "epoch", "patterns_per_s", "grad_norm"}
    assert loss_ax.get_yscale() == "log" and lr_ax.get_ylabel().startswith("learning rate")
    assert "penalty" in loss_ax.get_title()  # all zero: named as not drawn on the log axis
    assert loss_ax.get_xlabel().startswith("epoch")  # 5 steps per epoch, read from the epoch lines
    np.testing.assert_allclose(loss_ax.get_lines()[0].get_xdata(), np.arange(1, 21) / 5)
    path = plots.plot_training_curves(metrics, tmp_path / "curves.png", dpi=DPI)
    assert _png_size(path) == (round((6.4 + 2 * 4.2) * DPI), round(5.0 * DPI))


def test_training_curves_weight_the_terms_and_mark_the_mask_schedule_from_the_runs_model_json(tmp_path):
    metrics = _metrics_file(tmp_path / "metrics.jsonl")
    loss = {"cycle_weight": 2.0, "l1_coef": 1e-4, "use_spot_mask": True, "shrink_start": 1, "shrink_epochs": 2}
    geometry = {"pattern_shape": [64, 64], "center": [32.0, 32.0], "disk_radius": 3.5, "spot_spacing": 20.0,
                "ring": [15.0, 30.0]}
    (tmp_path / "model.json").write_text(json.dumps({"model": {"geometry": geometry}, "loss": loss}))
    fig = plots._training_figure(metrics)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    steps, _ = plots.read_metrics(metrics)
    np.testing.assert_allclose(lines["cycle x 2"].get_ydata(), [2.0 * r["cycle"] for r in steps])
    np.testing.assert_allclose(lines["l1 x 0.0001"].get_ydata(), [1e-4 * r["l1"] for r in steps])
    np.testing.assert_allclose(lines["forward"].get_ydata(), [r["forward"] for r in steps])
    marker = lines["mask: ring -> spot disks (after epoch 1)"]
    assert tuple(marker.get_xdata()) == (1.0, 1.0)
    span = [p for p in ax.patches if "shrink" in p.get_label()]
    assert len(span) == 1 and "9.0 -> 6.0 px" in span[0].get_label()
    title = fig._suptitle.get_text()
    assert "loss = forward + cycle_weight x cycle + penalty + l1_coef x l1" in title
    assert "not divergence" in title


def test_training_curves_from_epoch_lines_only(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps({"kind": "epoch", "epoch": e, "step": 10 * e, "loss": 1.0 / (e + 1)}) + "\n"
                         for e in range(1, 4)))
    fig = plots._training_figure(p)
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["loss"]


def test_training_curves_reject_a_file_without_records(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("not json\n")
    with pytest.raises(ValueError, match="holds no records"):
        plots.plot_training_curves(p, tmp_path / "c.png")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        plots.plot_training_curves(tmp_path / "missing.jsonl", tmp_path / "c.png")


def test_error_map_png_at_figure_size(tmp_path):
    path = plots.plot_error_map(_predicted(), tmp_path / "error.png", dpi=DPI)
    assert _png_size(path) == (500, round((4.6 + 1.5) * DPI))
    with pytest.raises(ValueError, match="lack 'reconstruction_error'"):
        plots.plot_error_map(_maps(), tmp_path / "bad.png")


def test_error_map_says_high_is_worse_and_scales_from_zero_to_the_995th_percentile():
    m = _predicted()
    fig = plots._error_figure(m)
    image = fig.axes[0].images[0]
    err = m["reconstruction_error"]
    assert image.norm.vmin == 0.0
    assert image.norm.vmax == pytest.approx(np.percentile(err, 99.5))
    assert "high = worse" in fig.axes[0].get_title()
    assert "dimensionless" in image.colorbar.ax.get_xlabel()


def test_uncertainty_maps_keep_the_typical_error_visible_beside_a_few_huge_ones():
    shape = (20, 20)
    unc = {k: np.full(shape, 1e-3) for k in plots.QUANTITIES}
    for k in plots.QUANTITIES:
        unc[k][:, 10] = 5e-2  # a grain boundary: errors 50x the typical one
    images = [ax.images[0] for ax in plots._uncertainty_figure(unc).axes if ax.images]
    assert images[0].norm.vmax == pytest.approx(plots.UNCERTAINTY_MEDIANS * 100 * 1e-3)
    assert images[3].norm.vmax == pytest.approx(plots.UNCERTAINTY_MEDIANS * np.degrees(1e-3))


def test_uncertainty_maps_draw_strain_in_percent_and_rotation_in_degrees(tmp_path):
    shape = (12, 10)
    rng = np.random.default_rng(0)
    unc = {k: rng.uniform(1e-4, 2e-3, shape) for k in plots.STRAIN_KEYS}
    unc["rotation"] = rng.uniform(1e-4, 1e-3, shape)  # radians
    unc["strain_xx"][0, 0] = np.nan
    valid = np.ones(shape, bool)
    valid[5, 5] = False
    fig = plots._uncertainty_figure(unc, valid=valid, reference_region=(0, 4, 0, 4))
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 4
    np.testing.assert_allclose(np.ma.filled(images[1].get_array(), np.nan)[1], 100 * unc["strain_yy"][1])
    np.testing.assert_allclose(np.ma.filled(images[3].get_array(), np.nan)[1], np.degrees(unc["rotation"][1]))
    shown = np.ma.masked_invalid(images[0].get_array())
    assert shown.mask[0, 0] and shown.mask[5, 5] and not shown.mask[1, 1]
    assert all(im.norm.vmin == 0 for im in images)
    assert len({(im.norm.vmin, im.norm.vmax) for im in images[:3]}) == 1  # one scale for the strains
    bars = " | ".join(ax.get_xlabel() for ax in fig.axes)
    assert "strain (%)" in bars and "rotation (deg)" in bars
    path = plots.save_uncertainty_maps(tmp_path / "unc.png", unc, valid=valid, dpi=DPI)
    assert _png_size(path) == (610, round((2.9 * 1.2 + 1.9) * DPI))
    unc["shear_xy"] = -unc["shear_xy"]
    with pytest.raises(ValueError, match="'shear_xy' holds negative values"):
        plots.save_uncertainty_maps(tmp_path / "bad.png", unc)


def test_histograms_cut_tall_label_bars_to_the_estimates_and_explain_off_scale_values():
    pred, labels = _predicted(), _maps()
    pred["strain_xx"][0, 1] = 0.5  # far beyond the others: off-scale
    fig = plots._histograms_figure(pred, labels=labels, bins=20)
    ax = fig.axes[0]
    est = [p for p in ax.patches if p.get_label().startswith("CC-ST-AE")][0]
    assert ax.get_ylim()[1] == pytest.approx(1.12 * 1.3 * est.get_data()[0].max())
    lab = [p for p in ax.patches if p.get_label().startswith("labels")][0]
    assert lab.get_data()[0].max() <= 1.3 * est.get_data()[0].max()
    written = [t.get_text() for t in ax.texts]
    assert "64" in written  # a label grain of 64 positions, cut and counted on top
    lim = ax.get_xlim()[1]
    beyond = int(np.sum(np.abs(100 * pred["strain_xx"][np.isfinite(pred["strain_xx"])]) > lim))
    assert beyond >= 1
    assert f"off-scale (|value| > {lim:.3g} %, not drawn):\nCC-ST-AE {beyond}" in written


def test_bases_use_a_log_scale_and_name_how_many_patterns_each_holds(tmp_path):
    yy, xx = np.mgrid[:24, :24] - 12
    base = 1e3 * np.exp(-(yy**2 + xx**2) / 4.0) + np.exp(-((yy - 8) ** 2 + xx**2) / 2.0) + 1e-3
    fig = plots._bases_figure(np.stack([base, base]), counts=[30, 10])
    image = fig.axes[0].images[0]
    assert type(image.norm).__name__ == "LogNorm"
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles == ["base 0: 30 patterns (75 %)", "base 1: 10 patterns (25 %)"]
    m = _predicted()
    m["class_index"] = np.zeros((16, 16), np.int32)
    m["class_index"][:, :4] = 1
    assert plots._base_counts(m, 2).tolist() == [16 * 12 - 2, 16 * 4 - 2]  # invalid [3:5, 3:5] not counted


def test_pattern_figure_names_the_mask_and_the_grey_in_a_legend():
    pattern = np.random.default_rng(0).uniform(1, 2, (16, 16))
    mask = np.zeros((16, 16), bool)
    mask[4:12, 4:12] = True
    fig = plots._pattern_figure(pattern, mask, title="scan position (3, 4)", mask_label="loss mask at epoch 5")
    names = [t.get_text() for t in fig.legends[0].get_texts()]
    assert names[0] == "loss mask at epoch 5 (outline)" and names[1].startswith("grey: outside the mask")
    assert fig._suptitle.get_text() == "scan position (3, 4)"


def test_noise_sweep_without_py4dstem_draws_ccstae_and_the_bound(tmp_path):
    levels = [0.0, 0.1, 0.25, 0.5]
    results = {"levels": levels,
               "ccstae": {k: [1e-3 * (1 + w) for w in levels] for k in plots.STRAIN_KEYS}
               | {"rotation_deg": [0.1, 0.2, None, 0.4]},
               "py4dstem": None,
               "crb": {k: [2e-4] * 4 for k in plots.STRAIN_KEYS}}
    fig = plots._noise_sweep_figure(results)
    assert len(fig.axes) == 4
    xs = fig.axes[0].get_lines()[0].get_xdata()
    np.testing.assert_allclose(xs, [0, 10, 25, 50])  # noise in percent
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), [0.1, 0.11, 0.125, 0.15])  # MAE in %
    assert fig.axes[0].get_ylabel() == "MAE (%)" and fig.axes[3].get_ylabel() == "MAE (deg)"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["CC-ST-AE", "Cramér-Rao bound"]
    path = plots.plot_noise_sweep(results, tmp_path / "sweep.png", dpi=DPI)
    assert _png_size(path) == (round((4 * 3.8 + 0.4) * DPI), round(4.0 * DPI))


def test_noise_sweep_rejects_lists_of_the_wrong_length(tmp_path):
    results = {"levels": [0.0, 0.1], "ccstae": {"strain_xx": [1e-3]}, "py4dstem": None, "crb": None}
    with pytest.raises(ValueError, match=r"results\['ccstae'\]\['strain_xx'\] has 1 values, expected 2"):
        plots.plot_noise_sweep(results, tmp_path / "s.png")


def test_save_all_figures_writes_what_its_inputs_allow(tmp_path):
    out = tmp_path / "figs"
    paths = plots.save_all_figures(out, maps=_predicted(), labels=_maps(), pattern=np.ones((16, 16)),
                                   mask=np.ones((16, 16), bool), metrics_path=_metrics_file(tmp_path / "m.jsonl"),
                                   dpi=30)
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["error_map.png", "pattern_mask.png", "strain_histograms.png", "strain_maps.png",
                     "training_curves.png"]
    m = _predicted()
    m.update({f"uncertainty_{k}": np.full((16, 16), 1e-3) for k in plots.QUANTITIES})
    paths = plots.save_all_figures(tmp_path / "unc", maps=m, dpi=30)
    assert "uncertainty_maps.png" in [os.path.basename(p) for p in paths]
    assert all(os.path.getsize(p) > 0 for p in paths)
    assert sorted(os.listdir(out)) == names


def test_missing_quantity_or_mismatched_shape_is_named(tmp_path):
    labels = _maps()
    del labels["shear_xy"]
    with pytest.raises(ValueError, match=r"labels maps lack \['shear_xy'\]"):
        plots.plot_strain_maps(_predicted(), tmp_path / "a.png", labels=labels)
    with pytest.raises(ValueError, match=r"py4DSTEM map 'strain_xx' has shape \(8, 8\), expected \(16, 16\)"):
        plots.plot_histograms(_predicted(), tmp_path / "b.png", baseline=_maps((8, 8)))
    with pytest.raises(OSError, match="does not exist"):
        plots.plot_strain_maps(_predicted(), tmp_path / "no_such_dir" / "c.png")


def test_importing_the_module_does_not_import_matplotlib():
    code = "import sys, ccstae_jax.report.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_phase_map_legend_names_each_phase_with_its_count_and_lattice_size():
    maps = {k: np.zeros((6, 6), np.float32) for k in ("strain_xx", "strain_yy")}
    phase = np.zeros((6, 6), np.int8)
    phase[:, 3:] = 1
    phase[0, 0] = -1
    for k in maps:
        maps[k][:, 3:] = 0.04  # a 4 % larger lattice
    maps.update(phase=phase, invalid_reason=np.where(phase < 0, 4, 0).astype(np.uint8))
    fig = plots._phase_figure(maps, dpi=DPI)
    texts = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert texts[:3] == ["phase 0 (reference): 17 positions, lattice +0.0 %", "phase 1: 18 positions, lattice +4.0 %",
                         "vacuum (no specimen): 1"]
