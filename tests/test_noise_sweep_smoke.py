"""Specifications of benchmarks/noise_sweep.py: the sweep's results JSON, table, resumption and CRB weighting.

One tiny sweep (8x8 scan, 64 px detector, one level, one epoch, no baseline) is run once per module (~30 s on 2
CPUs); the other tests are pure functions.
"""
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from _scripts import load_script

ns = load_script("noise_sweep", "benchmarks/noise_sweep.py")

TINY = ns.SweepConfig(levels=(0.25,), scan=8, n_grains=3, detector_size=64, epochs=1, refine_steps=2,
                      baseline="off", crb_grains=2)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    results = ns.run_sweep(TINY, out, log=lambda s: None)
    paths = ns.write_outputs(results, out, json_path=out / "copy.json")
    return results, out, paths


def _finite(x):
    return x is not None and math.isfinite(x)


def test_results_json_has_the_documented_keys(sweep):
    results, _, paths = sweep
    on_disk = json.loads(Path(paths["json_copy"]).read_text())
    assert on_disk == results
    for key in ("levels", "ccstae", "ccstae_encoder_only", "py4dstem", "crb", "settings"):
        assert key in on_disk
    assert on_disk["levels"] == [0.25]


def test_every_method_has_one_finite_mae_per_level_per_quantity(sweep):
    results, _, _ = sweep
    for method in ("ccstae", "ccstae_encoder_only", "crb"):
        assert set(results[method]) == {"strain_xx", "strain_yy", "shear_xy", "rotation_deg"}
        for q, vals in results[method].items():
            assert len(vals) == 1, (method, q)
            assert _finite(vals[0]), (method, q, vals)


def test_crb_is_positive_for_noisy_data(sweep):
    results, _, _ = sweep
    assert all(results["crb"][q][0] > 0 for q in results["crb"])


def test_py4dstem_is_null_when_the_baseline_is_off(sweep):
    results, _, _ = sweep
    assert results["py4dstem"] is None
    assert results["settings"]["baseline_notes"] == ["off"]


def test_markdown_table_and_plot_are_written(sweep):
    results, _, paths = sweep
    md = Path(paths["markdown"]).read_text()
    rows = [line for line in md.splitlines() if line.startswith("| 25%")]
    assert len(rows) == 2  # the MAE table, then the calibration of the 1-sigma errors
    assert rows[0].count("|") == 22  # level + 4 quantities x (py4DSTEM, CC-ST-AE, encoder only, CRB, absolute)
    assert rows[1].count("|") == 18  # level + 4 quantities x (median sigma, CRB sigma, std(z), |z| <= 2)
    sigma = results["tables"]["ccstae"][0]["strain_xx"]["sigma_median"]
    assert f"| 25% | {sigma * 1e3:.2f} |" in rows[1]
    assert Path(paths["plot"]).stat().st_size > 10_000


def test_simulated_data_are_deleted_unless_kept(sweep):
    _, out, _ = sweep
    level = out / ns.level_dir_name(0.25)
    assert not (level / "data.h5").exists()
    assert (level / "strain.h5").exists() and (level / "strain_encoder_only.h5").exists()


def test_a_finished_level_is_reused_with_identical_settings(sweep):
    results, out, _ = sweep
    again = ns.run_sweep(TINY, out, log=lambda s: None)
    assert again["settings"]["reused_levels"] == [0.25]
    assert again["ccstae"] == results["ccstae"]


# ---------------------------------------------------------------------------------------------- pure functions
def test_markdown_bolds_the_lower_of_py4dstem_and_ccstae():
    q = {"strain_xx": [1e-3], "strain_yy": [3e-3], "shear_xy": [1e-3], "rotation_deg": [0.5]}
    p = {"strain_xx": [2e-3], "strain_yy": [2e-3], "shear_xy": [None], "rotation_deg": [0.1]}
    md = ns.format_markdown({"levels": [0.5], "ccstae": q, "ccstae_encoder_only": q, "py4dstem": p, "crb": q,
                             "py4dstem_absolute": q})
    row = next(line for line in md.splitlines() if line.startswith("| 50%")).split(" | ")
    # columns: level, then per quantity py4DSTEM, CC-ST-AE, encoder only, CRB, py4DSTEM absolute (never bold)
    assert row[1:3] == ["2.00", "**1.00**"] and row[5] == "1.00"
    assert row[6:8] == ["**2.00**", "3.00"] and row[10] == "3.00"
    assert row[11:13] == ["n/a", "1.00"]
    assert row[16:18] == ["**0.100**", "0.500"]


def test_levels_parse_percentages_and_fractions():
    assert ns._parse_levels(["0", "25%", "50,0.7"]) == (0.0, 0.25, 0.5, 0.7)


def test_even_batch_minimises_padding():
    assert ns._even_batch(576, 256) == 192
    assert ns._even_batch(64, 256) == 64
    assert ns._even_batch(65536, 256) == 256


def test_level_folder_names_are_distinct():
    names = [ns.level_dir_name(w) for w in ns.PAPER_LEVELS + (0.125,)]
    assert len(set(names)) == len(names)
    assert ns.level_dir_name(0.25) == "noise_25pct"


def test_bad_settings_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="levels"):
        ns.SweepConfig(levels=(0.25, 0.25))
    with pytest.raises(ValueError, match="baseline"):
        ns.SweepConfig(baseline="maybe")
    with pytest.raises(ValueError):
        ns.SweepConfig(levels=(1.5,))


def test_cli_reports_a_bad_level_without_a_traceback(capsys):
    assert ns.main(["--levels", "150%", "--out-dir", "unused"]) == 2
    assert "error:" in capsys.readouterr().err


def test_crb_for_scan_weights_each_grain_by_its_positions(tmp_path):
    from ccstae_jax.evaluate.crb import gaussian_mae, strain_crb
    from ccstae_jax.data.simulate import SimulationConfig

    cfg = SimulationConfig(detector_size=64, disk_radius=2.0)
    params = np.array([[0.0, 0.0, 0.0, 0.0], [0.01, -0.015, 0.005, 0.4], [-0.02, 0.003, 0.012, 2.2]])
    index = np.array([[0, 0, 0], [1, 2, 2]], np.int32)  # grain 0: 3 positions, 1: 1, 2: 2
    path = tmp_path / "fake.h5"
    with h5py.File(path, "w") as f:
        f["grains/params"] = params
        f["labels/grain_index"] = index
    got = ns.crb_for_scan(path, cfg, 0.3)
    mae = gaussian_mae(strain_crb(cfg, w=0.3, params=params).sigma)
    want = (3 * mae[0] + mae[1] + 2 * mae[2]) / 6
    np.testing.assert_allclose([got[k] for k in ("strain_xx", "strain_yy", "shear_xy")], want[:3], rtol=1e-9)
    np.testing.assert_allclose(got["rotation_deg"], np.degrees(want[3]), rtol=1e-9)
    top2 = ns.crb_for_scan(path, cfg, 0.3, max_grains=2)  # grains 0 and 2 only
    np.testing.assert_allclose(top2["strain_xx"], (3 * mae[0, 0] + 2 * mae[2, 0]) / 5, rtol=1e-9)


def test_calibration_table_sets_the_median_sigma_beside_the_bound_on_sigma_not_on_the_mae():
    common = load_script("_common", "benchmarks/_common.py")
    row = {"sigma_median": 1.5e-3, "z_std": 1.0, "z_within_2": 0.95}
    table = {q: dict(row, sigma_median=0.06 if q == "rotation_deg" else 1.5e-3) for q in common.QUANTITIES}
    crb_mae = {q: math.sqrt(2 / math.pi) * (0.04 if q == "rotation_deg" else 1e-3) for q in common.QUANTITIES}
    cells = common.calibration_markdown([("25%", table, crb_mae)])[2].split("|")[1:-1]
    assert [c.strip() for c in cells[1:5]] == ["1.50", "1.00", "1.00", "95%"]
    assert [c.strip() for c in cells[13:15]] == ["0.060", "0.040"]
