"""Bad input to the `ccstae` command line: a non-zero exit, one line naming the file / key / option with what was
found and what was expected, no output written, input files untouched.

Each case runs `ccstae_jax.cli.main` in-process; every refusal here happens before any model is compiled. `map` cases
use the session's tiny trained run (`test_cli.checked_shared_run`).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from ccstae_jax import cli
from ccstae_jax.data.readers import open_scan
from ccstae_jax.pipeline import check_values
from test_cli import TRAIN_ARGS, ccstae, checked_shared_run


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return checked_shared_run(tmp_path_factory)


@pytest.fixture(scope="module")
def good(chain) -> np.ndarray:
    """The shared scan, (8, 8, 50, 50) float32."""
    with h5py.File(chain["sim"], "r") as f:
        return f["data"][()]


def _digest(*paths) -> dict[str, str]:
    """sha256 of every file at or under ``paths``."""
    out = {}
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else []
        for q in files:
            out[str(q)] = hashlib.sha256(q.read_bytes()).hexdigest()
    return out


def _refused(argv, capsys, *needles, inputs=(), outputs=()):
    """Runs the CLI and checks the refusal: exit 2, one stderr line with every needle, inputs unchanged, no outputs.

    ``outputs``: paths that must not exist afterwards (nor any ``<path>.tmp*`` beside them).
    """
    before = _digest(*inputs)
    rc = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc == cli.EXIT_BAD_INPUT, captured
    assert len(lines) == 1, captured.err
    msg = lines[0]
    assert msg.startswith(f"ccstae {argv[0]}: error: "), msg
    for needle in needles:
        assert str(needle) in msg, f"{needle!r} not in: {msg}"
    assert _digest(*inputs) == before, "an input file changed"
    for out in map(Path, outputs):
        assert not out.exists(), f"{out} was written"
        if out.parent.exists():
            assert not list(out.parent.glob(out.name + ".tmp*")), f"a temporary {out}.tmp* was left"
    return msg


def _h5(path: Path, arr, key="data") -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset(key, data=arr)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Bad data files, refused by both `train` and `map`
# ---------------------------------------------------------------------------------------------------------------
def _with(good, fn):
    arr = good.copy()
    fn(arr)
    return arr


def _nan(a):
    a[2, 3, 10, 11] = np.nan
    a[5, 5, 0, 0] = np.inf


def _negative(a):
    a[1, 2, 3, 4] = -5.0
    a[6, 6, 6, 6] = -1.0


def _bytes(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


def _truncated(path: Path, src: str) -> Path:
    data = Path(src).read_bytes()
    return _bytes(path, data[: len(data) // 2])


# name -> (make(tmp_path, good, sim_path) -> (data path, extra argv), needles(data path) -> substrings)
BAD_DATA = {
    "missing_file": (lambda d, g, s: (d / "nope.h5", []), lambda p: [p, "file not found"]),
    "directory": (lambda d, g, s: (_folder(d / "adir"), []),
                  lambda p: [p, "is a directory, expected a 4D-STEM data file"]),
    "empty_file": (lambda d, g, s: (_bytes(d / "empty.h5", b""), []),
                   lambda p: [p, "file is empty (0 bytes)"]),
    "truncated_hdf5": (lambda d, g, s: (_truncated(d / "cut.h5", s), []),
                       lambda p: [p, "cannot open as HDF5", "truncated"]),
    "not_hdf5": (lambda d, g, s: (_bytes(d / "junk.h5", b"junk" * 100), []),
                 lambda p: [p, "not an HDF5 file"]),
    "missing_key": (lambda d, g, s: (_h5(d / "k.h5", g, key="foo/bar"), ["--key", "data"]),
                    lambda p: [p, "no dataset at key 'data'", "4-D datasets present: foo/bar (8, 8, 50, 50)"]),
    "key_is_a_group": (lambda d, g, s: (_h5(d / "g.h5", g, key="grp/data"), ["--key", "grp"]),
                       lambda p: [p, "key 'grp' is a group, not a dataset", "grp/data (8, 8, 50, 50)"]),
    "2d_array": (lambda d, g, s: (_h5(d / "a2.h5", g[0, 0]), []),
                 lambda p: [p, "no 4-D dataset found", "data (50, 50)", "expected (Rx, Ry, Qx, Qy)"]),
    "3d_array": (lambda d, g, s: (_h5(d / "a3.h5", g[0]), ["--key", "data"]),
                 lambda p: [p, "'/data'", "3 dimensions (shape (8, 50, 50)), expected 4 (Rx, Ry, Qx, Qy)"]),
    "5d_array": (lambda d, g, s: (_h5(d / "a5.h5", g[None]), []),
                 lambda p: [p, "no 4-D dataset found", "data (1, 8, 8, 50, 50)"]),
    "bool_dtype": (lambda d, g, s: (_h5(d / "b.h5", g > 0), []),
                   lambda p: [p, "'/data'", "dtype bool", "expected real integer or float intensities"]),
    "complex_dtype": (lambda d, g, s: (_h5(d / "c.h5", g.astype(np.complex64)), []),
                      lambda p: [p, "dtype complex64 is complex", "expected real integer or float"]),
    "string_dtype": (lambda d, g, s: (_h5(d / "s.h5", np.full((2, 2, 4, 4), b"ab")), []),
                     lambda p: [p, "dtype |S2 is non-numeric", "expected real integer or float"]),
    "nan_and_inf": (lambda d, g, s: (_h5(d / "nan.h5", _with(g, _nan)), []),
                    lambda p: [p, "'/data'", "2 non-finite value(s) (NaN/Inf) in 2 of 64 patterns",
                               "first at scan position (2, 3) pixel (10, 11)", "expected finite"]),
    "all_zero": (lambda d, g, s: (_h5(d / "zero.h5", np.zeros_like(g)), []),
                 lambda p: [p, "all 64 patterns are blank", "expected diffraction intensities"]),
    "negative_counts": (lambda d, g, s: (_h5(d / "neg.h5", _with(g, _negative)), []),
                        lambda p: [p, "2 negative value(s) (minimum -5, maximum", "in 2 of 64 patterns",
                                   "first at scan position (1, 2) pixel (3, 4)", "expected non-negative counts",
                                   "--allow-negative"]),
    "zero_positions": (lambda d, g, s: (_h5(d / "empty_scan.h5", np.zeros((0, 8, 50, 50), np.float32)), []),
                       lambda p: [p, "empty scan (0 positions; shape (0, 8, 50, 50)"]),
    "crop_outside": (lambda d, g, s: (Path(s), ["--crop", "0", "80", "0", "80"]),
                     lambda p: [p, "crop=((0, 80), (0, 80)) outside the pattern of shape (50, 50)",
                                "expected 0 <= q0 < q1 <= 50"]),
}


@pytest.mark.parametrize("command", ["train", "map"])
@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_refused_in_one_line_writing_nothing(case, command, chain, good, tmp_path, capsys):
    make, needles = BAD_DATA[case]
    data, extra = make(tmp_path, good, chain["sim"])
    if command == "train":
        out = tmp_path / "run"
        argv = ["train", data, "--out", out, *TRAIN_ARGS, *extra]
        inputs = [data]
    else:
        out = tmp_path / "strain.h5"
        argv = ["map", chain["run"], data, "--out", out, "--quiet", *extra]
        inputs = [data, chain["run"]]
    _refused(argv, capsys, *needles(data), inputs=inputs, outputs=[out])


def test_integer_counts_are_accepted(chain, good, tmp_path):
    data = _h5(tmp_path / "counts.h5", np.round(good).astype(np.uint16))
    out = tmp_path / "strain.h5"
    p = ccstae(["map", chain["run"], data, "--out", out, "--quiet", "--refine-steps", "0"], cwd=tmp_path,
               cache_dir=chain["cache"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert out.is_file()


def test_negative_values_are_accepted_with_allow_negative(good, tmp_path):
    data = _h5(tmp_path / "neg.h5", _with(good, _negative))
    with open_scan(data, check_finite=False) as scan:
        report = check_values(scan, allow_negative=True)
    assert report["n_negative"] == 2


def test_negative_round_off_is_accepted(good, tmp_path):
    data = _h5(tmp_path / "round_off.h5", _with(good, lambda a: a.__setitem__((0, 0, 0, 0), -1e-9 * a.max())))
    with open_scan(data, check_finite=False) as scan:
        report = check_values(scan)
    assert report["n_negative"] == 1


def test_some_blank_patterns_are_accepted(good, tmp_path):
    data = _h5(tmp_path / "blanks.h5", _with(good, lambda a: a.__setitem__((slice(0, 3), 4), 0.0)))
    with open_scan(data, check_finite=False) as scan:
        report = check_values(scan)
    assert report == {"n_positions": 64, "n_blank": 3, "n_negative": 0}


# ---------------------------------------------------------------------------------------------------------------
# Bad options and run directories
# ---------------------------------------------------------------------------------------------------------------
def test_map_reference_region_outside_the_scan_is_refused(chain, tmp_path, capsys):
    out = tmp_path / "strain.h5"
    _refused(["map", chain["run"], chain["sim"], "--out", out, "--quiet", "--reference-region", "0", "20", "0", "2"],
             capsys, "--reference-region (0, 20, 0, 2)", "outside the 8x8 scan", "need 0 <= r0 < r1 <= 8",
             inputs=[chain["sim"], chain["run"]], outputs=[out])


def test_simulate_reference_region_outside_the_scan_is_refused(tmp_path, capsys):
    out = tmp_path / "sim.h5"
    _refused(["simulate", out, "--scan", "4", "4", "--detector", "64", "--quiet", "--reference-region", "0", "9", "0",
              "2"], capsys, "reference_region=(0, 9, 0, 2)", "0 <= r0 < r1 <= 4", outputs=[out])


def test_ring_larger_than_the_pattern_is_refused(chain, tmp_path, capsys):
    out = tmp_path / "run"
    _refused(["train", chain["sim"], "--out", out, "--epochs", "1", "--ring", "10", "500", "--quiet"], capsys,
             "--ring 10 500", chain["sim"], "50x50 patterns", "expected 0 <= inner < outer <= 25 pixels",
             inputs=[chain["sim"]], outputs=[out])


def test_train_with_another_preset_into_an_existing_run_is_refused(chain, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(chain["run"], run)
    _refused(["train", chain["sim"], "--out", run, *chain["train_args"], "--preset", "reference"], capsys,
             run, "holds a 'fast' run, not 'reference'", "another --out", inputs=[chain["sim"], run])


def test_train_with_another_ring_into_an_existing_run_is_refused(chain, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(chain["run"], run)
    argv = ["train", chain["sim"], "--out", run, *chain["train_args"]]
    argv[argv.index("--ring") + 1: argv.index("--ring") + 3] = ["6", "20"]
    _refused(argv, capsys, run, "--ring 6 20 (the run uses 8 22)", "another --out", inputs=[chain["sim"], run])


def test_train_with_another_model_config_into_an_existing_run_is_refused(chain, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(chain["run"], run)
    other = tmp_path / "other.toml"
    other.write_text("[model]\nencoder_channels = [8, 8]\nencoder_dense = 16\n")
    argv = ["train", chain["sim"], "--out", run, *TRAIN_ARGS, "--config", other]
    _refused(argv, capsys, run, "[model] encoder_channels = [8, 8] (the run uses [4, 8])", inputs=[chain["sim"], run])


def _corrupt_latest_checkpoint(run: Path) -> None:
    latest = max((p for p in (run / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    for f in (q for q in latest.rglob("*") if q.is_file() and q.stat().st_size > 0):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_map_with_a_corrupt_checkpoint_is_refused(chain, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(chain["run"], run)
    _corrupt_latest_checkpoint(run)
    out = tmp_path / "strain.h5"
    _refused(["map", run, chain["sim"], "--out", out, "--quiet"], capsys, run / "checkpoints",
             inputs=[chain["sim"], run], outputs=[out])


def test_train_resuming_a_corrupt_checkpoint_is_refused(chain, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(chain["run"], run)
    _corrupt_latest_checkpoint(run)
    _refused(["train", chain["sim"], "--out", run, *chain["train_args"]], capsys, run / "checkpoints",
             inputs=[chain["sim"], run])


def test_map_with_a_directory_that_is_not_a_run_is_refused(chain, tmp_path, capsys):
    out = tmp_path / "strain.h5"
    _refused(["map", tmp_path, chain["sim"], "--out", out, "--quiet"], capsys, tmp_path / "model.json",
             "is not a ccstae run directory", inputs=[chain["sim"]], outputs=[out])


def test_map_of_patterns_of_another_size_is_refused(chain, good, tmp_path, capsys):
    data = _h5(tmp_path / "small.h5", good[:, :, :40, :40])
    out = tmp_path / "strain.h5"
    _refused(["map", chain["run"], data, "--out", out, "--quiet"], capsys, data, "patterns are (40, 40)",
             "trained on (50, 50)", inputs=[data, chain["run"]], outputs=[out])


def test_evaluate_with_labels_of_another_scan_shape_is_refused(chain, tmp_path, capsys):
    from ccstae_jax.report.files import write_strain_h5

    strain = tmp_path / "strain_4x4.h5"
    maps = {q: np.zeros((4, 4), np.float32) for q in ("strain_xx", "strain_yy", "shear_xy", "rotation")}
    write_strain_h5(strain, {**maps, "valid": np.ones((4, 4), bool)}, attrs={"symmetry": 6})
    _refused(["evaluate", strain, "--labels", chain["sim"]], capsys, chain["sim"], "key '/labels': label",
             "has shape (8, 8), expected the scan shape (4, 4)", inputs=[strain, chain["sim"]])


@pytest.mark.parametrize("noise", ["1.5", "-0.1"])
def test_simulate_noise_outside_0_1_is_refused(noise, tmp_path, capsys):
    out = tmp_path / "sim.h5"
    _refused(["simulate", out, "--scan", "4", "4", "--detector", "64", "--noise", noise, "--quiet"], capsys,
             f"noise level {noise} gives w={float(noise)}", "outside [0, 1]", outputs=[out])


def test_map_into_a_missing_directory_is_refused(chain, tmp_path, capsys):
    out = tmp_path / "no_such_dir" / "strain.h5"
    _refused(["map", chain["run"], chain["sim"], "--out", out, "--quiet"], capsys, out,
             f"directory {out.parent} does not exist", inputs=[chain["sim"], chain["run"]], outputs=[out])


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write into read-only folders")
def test_map_into_a_read_only_directory_is_refused(chain, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    out = ro / "strain.h5"
    try:
        _refused(["map", chain["run"], chain["sim"], "--out", out, "--quiet"], capsys, out, "is not writable",
                 inputs=[chain["sim"], chain["run"]], outputs=[out])
    finally:
        ro.chmod(0o755)


def test_map_onto_a_directory_is_refused(chain, tmp_path, capsys):
    _refused(["map", chain["run"], chain["sim"], "--out", tmp_path, "--quiet"], capsys, tmp_path,
             "it is a directory, expected an .h5 file name", inputs=[chain["sim"], chain["run"]])


def test_map_onto_its_own_input_data_is_refused(chain, good, tmp_path, capsys):
    data = tmp_path / "data.h5"
    shutil.copy(chain["sim"], data)
    _refused(["map", chain["run"], data, "--out", data, "--quiet"], capsys, "is the input data file",
             inputs=[data, chain["run"]])


def test_train_into_an_existing_file_is_refused(chain, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("not a run")
    _refused(["train", chain["sim"], "--out", out, *TRAIN_ARGS], capsys, out,
             "is an existing file, expected a run directory", inputs=[chain["sim"], out])


def test_map_batch_size_0_is_refused(chain, tmp_path, capsys):
    out = tmp_path / "strain.h5"
    _refused(["map", chain["run"], chain["sim"], "--out", out, "--batch-size", "0", "--quiet"], capsys,
             "--batch-size 0: expected a positive integer", inputs=[chain["run"]], outputs=[out])


def test_train_config_file_missing_is_refused(chain, tmp_path, capsys):
    out = tmp_path / "run"
    _refused(["train", chain["sim"], "--out", out, *TRAIN_ARGS, "--config", tmp_path / "nope.toml"], capsys,
             f"config file {tmp_path / 'nope.toml'} does not exist", outputs=[out])


def test_multi_line_errors_are_printed_on_one_line(chain, tmp_path, capsys):
    # the training engine's refusal to resume with other settings spans several lines
    run = tmp_path / "run"
    shutil.copytree(chain["run"], run)
    argv = ["train", chain["sim"], "--out", run, *chain["train_args"]]
    argv[argv.index("--epochs") + 1] = "7"
    _refused(argv, capsys, "train_config.epochs: saved 5, now 7", inputs=[chain["sim"], run])


def test_a_refusal_in_a_real_process_prints_exactly_one_line(chain, tmp_path):
    # in-process runs cannot see what libraries print or log to stderr themselves (Orbax logs a corrupt checkpoint)
    run = tmp_path / "run"
    shutil.copytree(chain["run"], run)
    _corrupt_latest_checkpoint(run)
    p = ccstae(["map", run, chain["sim"], "--out", tmp_path / "strain.h5", "--quiet"], cwd=tmp_path,
               cache_dir=chain["cache"])
    assert p.returncode == cli.EXIT_BAD_INPUT
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ccstae map: error: "), p.stderr
