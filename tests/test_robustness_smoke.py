"""Specifications of benchmarks/robustness.py: its results JSON, scoring of heterostructure maps, table and cases.

One tiny case (8x8 scan, 64 px detector, WS2/WSe2 with vacuum, one epoch) runs end to end once per module through
the real ``ccstae simulate/train/map`` commands (~40 s on 2 CPUs); py4DSTEM runs when ``$CCSTAE_BASELINE_PYTHON``
(or this interpreter) has it, else its entry is null. The other tests are pure functions or synthetic files.
"""
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from _scripts import load_script

rb = load_script("robustness", "benchmarks/robustness.py")

TINY_CASE = rb.Case("tinyhetero", 0.25, ("--detector", "64", "--disk-radius", "2", "--phases", "WS2,WSe2",
                                         "--vacuum", "0.2"))
TINY = rb.RobustnessConfig(cases=(TINY_CASE,), scan=8, n_grains=3, epochs=1)
MAE_KEYS = {"strain_xx", "strain_yy", "shear_xy", "rotation_deg"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("robustness")
    results = rb.run_benchmark(TINY, out, log=lambda s: None)
    paths = rb.write_outputs(results, out, json_path=out / "copy.json", markdown_path=out / "copy.md",
                             figure_path=out / "copy.png")
    return results, out, paths


def _finite(x):
    return x is not None and math.isfinite(x)


def test_results_json_has_the_documented_case_keys(bench):
    results, _, paths = bench
    on_disk = json.loads(Path(paths["json_copy"]).read_text())
    assert on_disk == results
    (case,) = on_disk["cases"]
    assert {"name", "noise", "ccstae", "py4dstem", "crb"} <= set(case)
    assert case["name"] == "tinyhetero" and case["noise"] == 0.25
    assert set(case["ccstae"]) == MAE_KEYS | {"invalid_frac"}
    assert case["py4dstem"] is None or set(case["py4dstem"]) == MAE_KEYS | {"invalid_frac"}
    assert set(case["crb"]) == MAE_KEYS


def test_every_reported_number_is_finite(bench):
    (case,) = bench[0]["cases"]
    for method in ("ccstae", "crb") + (("py4dstem",) if case["py4dstem"] is not None else ()):
        for key, value in case[method].items():
            assert _finite(value), (method, key, value)
    assert all(case["crb"][k] > 0 for k in MAE_KEYS)  # 25 % noise: a non-zero bound
    assert 0.0 <= case["ccstae"]["invalid_frac"] <= 1.0


def test_a_missing_baseline_is_null_with_a_note(bench):
    (case,) = bench[0]["cases"]
    if case["py4dstem"] is None:
        assert any("py4DSTEM" in n for n in case["notes"])
    else:
        assert case["geometry"]["py4dstem"]["vacuum"]["patterns"] >= 0  # the vacuum test ran on this file
        assert case["hetero"]["py4dstem"]["phase_mean_error"].keys() == {"WS2", "WSe2"}


def test_heterostructure_case_reports_vacuum_flags_and_per_phase_errors(bench):
    (case,) = bench[0]["cases"]
    het = case["hetero"]["ccstae"]
    assert 0.0 <= het["vacuum_flagged"] <= 1.0
    assert set(het["phase_mean_error"]) == {"WS2", "WSe2"}
    for errors in het["phase_mean_error"].values():
        assert errors is None or all(_finite(v) for v in errors.values())


def test_case_records_its_commands_geometry_and_train_output(bench):
    (case,) = bench[0]["cases"]
    assert case["simulate"][:2] == ["ccstae", "simulate"] and "--phases" in case["simulate"]
    assert case["commands"]["train"][:2] == ["ccstae", "train"]
    assert case["geometry"]["simulated"]["disk_radius"] == 2.0
    assert case["geometry"]["pattern_shape"] == [50, 50]
    assert "trained" in case["train_output"]
    assert case["timings_s"]["train"] > 0


def test_markdown_figure_and_copies_are_written(bench):
    results, out, paths = bench
    md = Path(paths["markdown_copy"]).read_text()
    assert md == Path(paths["markdown"]).read_text()
    rows = [line for line in md.splitlines() if line.startswith("| tinyhetero | 25% | ")]
    ran = results["cases"][0]["py4dstem"] is not None
    assert len(rows) == 2 + ran  # the MAE row, the heterostructure row of CC-ST-AE and of py4DSTEM when it ran
    assert Path(paths["figure_copy"]).stat().st_size > 10_000


def test_simulated_data_are_deleted_and_a_finished_case_is_reused(bench):
    results, out, _ = bench
    assert not (out / TINY_CASE.id / "data.h5").exists()
    again = rb.run_benchmark(TINY, out, log=lambda s: None)
    assert again["settings"]["reused_cases"] == [TINY_CASE.id]
    assert again["cases"][0]["ccstae"] == results["cases"][0]["ccstae"]


# ---------------------------------------------------------------------------------------------- pure / synthetic
def test_quick_and_hetero_cases_match_the_issues():
    quick = {(c.name, c.noise) for c in rb.QUICK.cases}
    for r in ("1.5", "3.7", "8", "16"):
        assert {(f"disk{r}", 0.0), (f"disk{r}", 0.25)} <= quick
    assert {"pattern128", "pattern256", "square", "ellipticity2pct", "descan5px"} <= {n for n, _ in quick}
    assert [c.noise for c in rb.HETERO_CASES] == [0.0, 0.25, 0.5]
    assert rb.QUICK.scan == 24 and rb.QUICK.epochs is None  # the CLI's default epochs
    assert set(rb.FULL.cases) == set(rb.ALL_CASES) and rb.FULL.scan > rb.QUICK.scan


def test_every_case_is_a_valid_ccstae_simulate_command():
    from ccstae_jax.cli import build_parser

    parser = build_parser()
    for case in rb.ALL_CASES:
        args = parser.parse_args(rb.QUICK.simulate_args(case, Path("x.h5")))
        assert args.noise == case.noise and list(args.scan) == [24, 24]
        if case.name == "pattern128":
            assert args.detector == 128 and list(args.detector_crop) == [0, 128]
        if case.name == "descan5px":
            assert args.descan == [5.0]


def test_cases_are_selected_by_name_or_id_and_unknown_ones_refused():
    picked = rb.select_cases(rb.ALL_CASES, "disk16,hetero_n50")
    assert [c.id for c in picked] == ["disk16_n0", "disk16_n25", "hetero_n50"]
    with pytest.raises(ValueError, match=r"unknown \['disk99'\]"):
        rb.select_cases(rb.ALL_CASES, "disk99")


def test_cli_reports_an_unknown_case_without_a_traceback(capsys):
    assert rb.main(["--cases", "nope", "--out-dir", "unused"]) == 2
    assert "error: --cases: unknown ['nope']" in capsys.readouterr().err


def test_phase_accuracy_maps_each_class_to_its_majority_phase():
    phase = np.array([0, 0, 0, 1, 1, 1])
    classes = np.array([1, 1, 0, 0, 0, 0])  # class 1 -> phase 0 (2 of 2), class 0 -> phase 1 (3 of 4)
    acc, n = rb._phase_accuracy(classes, phase, np.ones(6, bool))
    assert acc == pytest.approx(5 / 6) and n == 2


def _synthetic_files(tmp_path, *, absolute):
    """A 4x4 'simulation' (reference region rows 0:2, cols 0:2 of WS2; WSe2 at column 2; vacuum at column 3) and a
    map that is the labels plus +1e-3 strain_xx on WSe2, invalid on half the vacuum."""
    from ccstae_jax.report.files import write_strain_h5

    shape = (4, 4)
    phase = np.zeros(shape, np.int8)
    phase[:, 2] = 1
    phase[:, 3] = -1
    vacuum = phase < 0
    labels = {k: np.zeros(shape, np.float32) for k in ("strain_xx", "strain_yy", "shear_xy", "rotation")}
    labels["strain_xx"][phase == 1] = 0.041
    labels["strain_yy"][phase == 1] = 0.041
    for k in labels:
        labels[k][vacuum] = np.nan
    data = tmp_path / "data.h5"
    with h5py.File(data, "w") as f:
        for k, v in {**labels, "phase": phase, "vacuum": vacuum}.items():
            f[f"labels/{k}"] = v
        f.attrs["reference_region"] = np.array([0, 2, 0, 2])
        f.attrs["phases"] = json.dumps([["WS2", 3.153], ["WSe2", 3.282]])
    maps = {k: np.nan_to_num(v).astype(np.float64) for k, v in labels.items()}
    maps["strain_xx"][phase == 1] += 1e-3
    valid = ~vacuum
    valid[:2, 3] = True  # half the vacuum positions are not flagged
    maps["valid"] = valid
    strain = tmp_path / "strain.h5"
    attrs = {"reference_region": [0, 2, 0, 2], "symmetry": 6}
    if absolute:
        attrs["strain_reference"] = "absolute"
    write_strain_h5(strain, {**maps, "class_index": np.where(phase == 1, 3, 7).astype(np.int32)}, attrs=attrs)
    return data, strain


@pytest.mark.parametrize("absolute", [False, True])
def test_score_map_reports_invalid_specimen_vacuum_flags_and_signed_phase_errors(tmp_path, absolute):
    data, strain = _synthetic_files(tmp_path, absolute=absolute)
    scored = rb.score_map(strain, data)
    assert scored["mae"]["invalid_frac"] == 0.0
    het = scored["hetero"]
    assert het["vacuum_flagged"] == pytest.approx(0.5)
    assert het["phase_mean_error"]["WS2"]["strain_xx"] == pytest.approx(0.0, abs=1e-6)
    assert het["phase_mean_error"]["WSe2"]["strain_xx"] == pytest.approx(1e-3, abs=1e-6)
    assert het["phase_mean_error"]["WSe2"]["strain_yy"] == pytest.approx(0.0, abs=1e-6)
    assert het["phase_accuracy"] == 1.0 and het["n_classes"] == 2  # class 3 = WSe2, class 7 = WS2


def test_markdown_bolds_the_lower_of_py4dstem_and_ccstae():
    row = {"strain_xx": 1e-3, "strain_yy": 3e-3, "shear_xy": 1e-3, "rotation_deg": 0.5, "invalid_frac": 0.0}
    other = {"strain_xx": 2e-3, "strain_yy": 2e-3, "shear_xy": None, "rotation_deg": 0.1, "invalid_frac": 0.25}
    crb = {"strain_xx": 5e-4, "strain_yy": 5e-4, "shear_xy": 4e-4, "rotation_deg": 0.01}
    md = rb.format_markdown({"cases": [{"name": "disk8", "noise": 0.25, "ccstae": row, "py4dstem": other,
                                        "crb": crb, "notes": []}]})
    cells = next(line for line in md.splitlines() if line.startswith("| disk8 |")).split(" | ")
    # columns: case, noise, then per quantity py4DSTEM, CC-ST-AE, CRB, then invalid py4DSTEM, invalid CC-ST-AE
    assert cells[2:5] == ["2.00", "**1.00**", "0.50"]
    assert cells[5:8] == ["**2.00**", "3.00", "0.50"]
    assert cells[8:10] == ["n/a", "1.00"]
    assert cells[11:13] == ["**0.100**", "0.500"]
    assert cells[14:16] == ["25.0%", "0.0% |"]


def test_crb_leaves_vacuum_positions_out(tmp_path):
    from ccstae_jax.evaluate.crb import gaussian_mae, strain_crb
    from ccstae_jax.data.simulate import SimulationConfig

    cfg = SimulationConfig(detector_size=64, disk_radius=2.0)
    params = np.array([[0.0, 0.0, 0.0, 0.0], [0.01, -0.015, 0.005, 0.4]])
    index = np.array([[0, 0, -1], [1, -1, -1]], np.int32)  # grain 0: 2 positions, grain 1: 1, vacuum: 3
    path = tmp_path / "fake.h5"
    with h5py.File(path, "w") as f:
        f["grains/params"] = params
        f["labels/grain_index"] = index
    got = rb.crb_for_scan(path, cfg, 0.3)
    mae = gaussian_mae(strain_crb(cfg, w=0.3, params=params).sigma)
    np.testing.assert_allclose(got["strain_xx"], (2 * mae[0, 0] + mae[1, 0]) / 3, rtol=1e-9)
    with h5py.File(path, "a") as f:
        f["labels/grain_index"][...] = -1
    assert rb.crb_for_scan(path, cfg, 0.3) == dict.fromkeys(MAE_KEYS)



def test_markdown_reports_the_calibration_of_the_errors_of_noisy_cases():
    row = {"mae": 1e-3, "sigma_median": 1.2e-3, "z_std": 1.05, "z_within_2": 0.94}
    table = {q: dict(row) for q in ("strain_xx", "strain_yy", "shear_xy", "rotation_deg")}
    crb = {"strain_xx": 8e-4, "strain_yy": 8e-4, "shear_xy": 6e-4, "rotation_deg": 0.02}
    mae = {"strain_xx": 1e-3, "strain_yy": 1e-3, "shear_xy": 1e-3, "rotation_deg": 0.05, "invalid_frac": 0.0}
    cases = [{"name": "disk8", "noise": n, "ccstae": mae, "py4dstem": None, "crb": crb, "notes": [],
              "errors": {"ccstae": table, "py4dstem": None}} for n in (0.0, 0.25)]
    md = rb.format_markdown({"cases": cases})
    rows = [line for line in md.splitlines() if line.startswith("| disk8 ") and not line.startswith("| disk8 |")]
    # beside each median sigma, the bound on sigma: the CRB row (an expected MAE) over sqrt(2 / pi)
    assert rows == ["| disk8 25% | 1.20 | 1.00 | 1.05 | 94% | 1.20 | 1.00 | 1.05 | 94% | 1.20 | 0.75 | 1.05 | 94% "
                    "| 0.001 | 0.025 | 1.05 | 94% |"]  # the noise-free case has no row
