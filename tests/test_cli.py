"""The `ccstae` command line: help texts, the simulate -> train -> map -> evaluate chain, resuming `train`.

The chain runs as real subprocesses (one CPU device each) sharing a JAX compilation cache in the session's temporary
folder, so later subprocesses that compile the same model (here and in tests/test_interruption.py,
tests/test_bad_input.py) skip compilation. `shared_run` builds the chain once per session and is imported by those
files.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ccstae_jax import cli

# The tiny scan every CLI test uses: 8x8 positions, 64-pixel detector -> 50x50 patterns. The loss ring is given
# explicitly (8..22 px holds the first-order spots of these patterns) so every run compiles the same model.
# A narrow encoder (--config) keeps compilation short.
SCAN = ("8", "8")
SIMULATE_ARGS = ["--scan", *SCAN, "--grains", "4", "--noise", "0.25", "--detector", "64", "--seed", "0", "--quiet"]
SMALL_MODEL_TOML = "[model]\nencoder_channels = [4, 8]\nencoder_dense = 16\n"
TRAIN_ARGS = ["--epochs", "5", "--batch-size", "16", "--ring", "8", "22", "--quiet"]
STEPS = 5 * 4  # epochs x ceil(64 / 16)
MAP_ARGS = ["--quiet"]


def ccstae(args, *, cwd, cache_dir, timeout=300, wrapper: str | None = None, wait=True, bars=False):
    """Runs ``python -m ccstae_jax.cli ARGS`` (or ``python -c WRAPPER ARGS``) in a subprocess on the test platform,
    its output to pipes (not a terminal); progress bars are off unless ``bars``.

    Returns the `subprocess.CompletedProcess` (``wait``) or the running `subprocess.Popen`.
    """
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    # Every compiled program is kept, however quick to compile: the many small ones add up over the subprocesses.
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["JAX_PLATFORMS"] = os.environ.get("CCSTAE_TEST_PLATFORM", "cpu")
    env["TQDM_DISABLE"] = "1"
    if bars:
        del env["TQDM_DISABLE"]
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "ccstae_jax.cli"] if wrapper is None else [sys.executable, "-c", wrapper]
    cmd += [str(a) for a in args]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def shared_run(tmp_path_factory) -> dict:
    """Simulates, trains and maps the tiny scan once per session (subprocesses); later calls reuse the files.

    Returns a dict of paths (``root``, ``sim``, ``run``, ``strain``, ``config``, ``cache``), ``train_args`` (the
    options after ``train DATA --out RUN``) and, per step, the subprocess's ``{"returncode", "stdout", "stderr"}``.
    """
    session = _session_dir(tmp_path_factory)
    with _exclusive(session / "ccstae_shared_run.lock"):
        return _build_shared_run(session)


def _session_dir(tmp_path_factory) -> Path:
    """The session's temporary folder, shared by all pytest-xdist workers (each has its own folder below it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Holds an exclusive lock on ``lock_path`` (POSIX). Without ``fcntl`` (Windows) there is no lock: run the tests
    in one process there (``CCSTAE_TEST_WORKERS=1``)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_shared_run(session: Path) -> dict:
    root = session / "ccstae_shared_run"
    record = root / "record.json"
    if record.exists():
        return json.loads(record.read_text())
    if root.exists():
        shutil.rmtree(root)
    root.mkdir()
    paths = {"root": str(root), "sim": str(root / "sim.h5"), "run": str(root / "run"),
             "strain": str(root / "strain.h5"), "config": str(root / "small.toml"),
             "cache": str(session / "jax_cache")}
    Path(paths["config"]).write_text(SMALL_MODEL_TOML)
    paths["train_args"] = [*TRAIN_ARGS, "--config", paths["config"]]
    steps = {
        "simulate": ["simulate", paths["sim"], *SIMULATE_ARGS],
        "train": ["train", paths["sim"], "--out", paths["run"], *paths["train_args"]],
        "map": ["map", paths["run"], paths["sim"], "--out", paths["strain"], *MAP_ARGS],
    }
    out = dict(paths)
    for name, args in steps.items():
        p = ccstae(args, cwd=root, cache_dir=paths["cache"])
        out[name] = {"returncode": p.returncode, "stdout": p.stdout, "stderr": p.stderr}
        if p.returncode != 0:
            break
    record.write_text(json.dumps(out))
    return out


def checked_shared_run(tmp_path_factory) -> dict:
    """`shared_run`, failing fast (with the step's stderr) when one of its commands did not succeed."""
    c = shared_run(tmp_path_factory)
    for step in ("simulate", "train", "map"):
        assert c[step]["returncode"] == 0, f"shared `ccstae {step}` failed:\n{c[step]['stderr'][-3000:]}"
    return c


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return shared_run(tmp_path_factory)


# ---------------------------------------------------------------------------------------------------------------
# Help
# ---------------------------------------------------------------------------------------------------------------
COMMANDS = ["simulate", "train", "map", "evaluate", "baseline", "demo"]


@pytest.mark.parametrize("command", [None] + COMMANDS)
def test_help_exits_0_and_states_the_conventions(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"] if command is None else [command, "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines, also after hyphens
    text = re.sub(r"(\w)- (\w)", r"\1-\2", text)
    assert "(Rx, Ry, Qx, Qy)" in text
    assert "x = detector Qx = axis 2 (pattern rows)" in text
    assert "radians" in text and "counter-clockwise" in text
    assert "positive = lattice stretched" in text


def test_help_of_map_and_train_names_the_units_of_the_radii_and_regions(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    train_help = " ".join(capsys.readouterr().out.split())
    assert "radii in detector pixels" in train_help
    assert "--allow-negative" in train_help
    with pytest.raises(SystemExit):
        cli.main(["map", "--help"])
    map_help = " ".join(capsys.readouterr().out.split())
    assert "reference scan rows R0:R1 and columns C0:C1" in map_help


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _option_help(help_text: str) -> dict[str, str]:
    """Each argument's help, parsed from argparse's output: ``{"--epochs": "passes over ... (default: ...)", ...}``.

    An entry starts with a line indented by two spaces: the invocation (``--crop Q0 Q1 Q2 Q3``), then, after two
    or more spaces or on the next lines, the help. Keys are the first option string or the positional's name.
    """
    entries: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        if re.match(r"^  \S", line):
            invocation, *text = re.split(r" {2,}", line[2:], maxsplit=1)
            current = invocation.split()[0].rstrip(",")
            if current == "-h":
                current = "--help"
            entries[current] = " ".join(text)
        elif current is not None and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


def _help(command) -> dict[str, str]:
    return _option_help(_subparsers()[command].format_help())


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_every_value_option_states_its_default(command):
    parser = _subparsers()[command]
    helps = _help(command)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        assert name in helps, f"{command} {name}: not in the help"
        text = " ".join(helps[name].split())
        assert len(text) > 10, f"{command} {name}: no help text ({text!r})"
        if action.option_strings and not action.required and action.nargs != 0:  # options taking a value
            assert "default" in text, f"{command} {name}: help states no default: {text!r}"
            if action.default is not None:
                shown = cli._fmt(action.default)
                assert f"default: {shown}" in text, f"{command} {name}: default {shown!r} not shown: {text!r}"


def test_help_shows_the_defaults_the_code_applies():
    from ccstae_jax import pipeline
    from ccstae_jax.evaluate.metrics import PAPER_REFERENCE_REGION
    from ccstae_jax.model.networks import ModelConfig
    from ccstae_jax.train.config import TrainConfig

    train = _help("train")
    for preset, values in pipeline.PRESET_TRAINING.items():
        epochs = values["epochs"]
        if epochs is None:  # sized to the scan by pipeline.default_epochs
            epochs = f"enough to show about {pipeline.TRAINING_PATTERNS} patterns"
            assert pipeline.default_epochs(1) == 20 and pipeline.default_epochs(10**6) == 3
            assert "3 to 20" in train["--epochs"]
        assert f"{preset}: {epochs}" in train["--epochs"]
        assert f"{preset}: {values['batch_size']}" in train["--batch-size"]
        assert f"{preset}: {values['learning_rate']:g}" in train["--lr"]
        assert f"{preset}: {values['schedule']}" in train["--schedule"]
    assert f"default: {TrainConfig().seed})" in train["--seed"]
    assert f"default: {TrainConfig().on_nonfinite})" in train["--on-nonfinite"]
    assert f"default: {TrainConfig().checkpoint_every_steps}," in train["--checkpoint-every"]
    assert f"default: {ModelConfig().dtype})" in train["--dtype"]
    assert f"default: {inspect.signature(pipeline.train).parameters['preset'].default})" in train["--preset"]
    mapping = _help("map")
    sig = inspect.signature(pipeline.map_strain).parameters
    for option, param in (("--refine-steps", "refine_steps"), ("--batch-size", "batch_size"),
                          ("--interpolation", "interpolation"), ("--checkpoint", "which")):
        assert f"default: {sig[param].default})" in mapping[option], option
    demo = _help("demo")
    sig = inspect.signature(pipeline.demo).parameters
    for option, param in (("--scan", "scan"), ("--noise", "noise"), ("--epochs", "epochs"), ("--out", "out_dir")):
        assert f"default: {sig[param].default})" in demo[option], option
    region = " ".join(str(v) for v in PAPER_REFERENCE_REGION)
    assert f"the paper's: {region})" in _help("evaluate")["--reference-region"]


def test_help_explains_regions_and_map_options_that_default_to_the_runs():
    mapping = _help("map")
    for command in ("map", "evaluate", "simulate", "baseline"):
        assert "0-based, R1 and C1 excluded" in _help(command)["--reference-region"], command
    for option in ("--key", "--transpose", "--crop", "--binning"):
        assert "the run's" in mapping[option], option
    assert "as the run was trained" in mapping["--allow-negative"]
    negative = _help("train")["--allow-negative"]
    assert negative.count("negative values") == 1  # said once, not repeated
    assert "default:" in negative


def test_unknown_option_exits_2_with_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "x.h5", "--out", "r", "--no-such-option"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# simulate: scene options (in process)
# ---------------------------------------------------------------------------------------------------------------
def test_simulate_scene_options_reach_the_file(tmp_path, capsys):
    import h5py

    out = tmp_path / "scene.h5"
    argv = ["simulate", str(out), "--scan", "8", "8", "--grains", "3", "--detector", "128", "--crop", "0", "128",
            "--spot-spacing", "20", "--disk-radius", "4", "--lattice", "square", "--phases", "WS2,WSe2",
            "--phase-fractions", "1,3", "--vacuum", "0.2", "--ellipticity", "0.02", "--ellipticity-angle", "0.3",
            "--descan", "2", "--noise", "0.25", "--quiet"]
    assert cli.main(argv) == 0
    assert "square lattice, first-order spots at 20.0 px" in capsys.readouterr().out
    with h5py.File(out, "r") as f:
        a = f.attrs
        assert f["data"].shape == (8, 8, 128, 128)
        assert a["lattice_symmetry"] == 4 and a["disk_radius"] == 4.0 and tuple(a["crop"]) == (0, 128)
        assert a["spot_spacing"] == pytest.approx(20.0) and a["q_pixel"] == pytest.approx(1 / 3.153 / 20)
        assert tuple(a["descan"]) == (2.0, 0.0, 0.0, 2.0)
        assert a["ellipticity"] == 0.02 and a["ellipticity_angle"] == 0.3 and a["vacuum"] == 0.2
        assert json.loads(a["phases"]) == [["WS2", 3.153], ["WSe2", 3.282]]
        assert json.loads(a["config"])["phase_fractions"] == [1.0, 3.0]
        assert f["labels/vacuum"][()].mean() == pytest.approx(0.2, abs=0.05)


@pytest.mark.parametrize("option, message", [
    (["--descan", "1", "2"], "--descan takes 1 number (J = PX I) or 4 (J row-major), got 2"),
    (["--phases", "WS2,WTe2"], "unknown phase 'WTe2'"),
    (["--vacuum", "0.95"], "vacuum=0.95 must be in [0, 0.9]"),
    (["--ellipticity", "-0.1"], "ellipticity=-0.1 must be in [0, 0.5)"),
    (["--spot-spacing", "0"], "--spot-spacing 0.0 must be > 0"),
    (["--phases", "WS2,WSe2", "--phase-fractions", "1,x"], "--phase-fractions '1,x': expected comma-separated"),
])
def test_bad_simulate_scene_option_is_one_line_error(option, message, tmp_path, capsys):
    out = tmp_path / "bad.h5"
    assert cli.main(["simulate", str(out), "--scan", "4", "4", "--detector", "64", "--quiet", *option]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# The chain
# ---------------------------------------------------------------------------------------------------------------
def test_simulate_train_map_chain_exits_0_and_writes_its_files(chain):
    for step in ("simulate", "train", "map"):
        assert chain[step]["returncode"] == 0, f"ccstae {step} failed:\n{chain[step]['stderr'][-3000:]}"
    assert Path(chain["sim"]).is_file()
    run = Path(chain["run"])
    assert (run / "model.json").is_file() and (run / "config.json").is_file()
    assert (run / "checkpoints" / str(STEPS)).is_dir()
    assert f"step {STEPS}" in chain["train"]["stdout"]
    assert "64 positions" in chain["map"]["stdout"]
    import h5py

    with h5py.File(chain["strain"], "r") as f:
        for key in ("strain_xx", "strain_yy", "shear_xy", "rotation", "valid", "invalid_reason"):
            assert f[key].shape == (8, 8), key
        assert "conventions" in f.attrs
        assert f.attrs["interpolation"] == "cubic" and f.attrs["strain_reference"] == "relative"
        assert 0.0 <= f.attrs["noise_weight"] <= 1.0
        assert f.attrs["fit_floor"] in (0.1, 0.3) and np.isfinite(f.attrs["floor_ratio"])
        assert f.attrs["fit_blur"] in (0.0, 0.7) and np.isfinite(f.attrs["blur_ratio"])
        assert not f.attrs["scale_spots"]


@pytest.mark.slow
# spot scaling applies to spots that stretch with the base only; this scan's disks count as wide (rigid by default)
@pytest.mark.parametrize("flags, attr", [(["--rigid-spots"], "rigid_spots"),
                                         (["--scale-spots", "--no-rigid-spots"], "scale_spots")])
def test_map_with_a_fit_model_option_records_it_and_writes_finite_valid_strain(chain, tmp_path, flags, attr):
    assert chain["train"]["returncode"] == 0
    out = tmp_path / "strain.h5"
    assert cli.main(["map", chain["run"], chain["sim"], "--out", str(out), *flags, "--quiet"]) == 0
    import h5py

    with h5py.File(out, "r") as f:
        assert f.attrs[attr]
        valid = f["valid"][()]
        assert valid.mean() > 0.9 and np.isfinite(f["strain_xx"][()][valid]).all()


def test_train_without_a_terminal_says_what_it_read_and_logs_one_line_per_epoch(chain, tmp_path):
    assert chain["train"]["returncode"] == 0
    run = tmp_path / "run"
    args = [a for a in chain["train_args"] if a != "--quiet"]
    p = ccstae(["train", chain["sim"], "--out", run, *args], cwd=tmp_path, cache_dir=chain["cache"], bars=True)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert lines[0] == f"data {chain['sim']}, key /data: 8 x 8 scan positions, 50 x 50 px patterns " \
                       "(stored (8, 8, 50, 50) float32)"
    geometry = json.loads((run / "model.json").read_text())["model"]["geometry"]
    assert lines[1] == (f"geometry: zero beam at ({geometry['center'][0]:.1f}, {geometry['center'][1]:.1f}) px"
                        + (f", drifting <= {geometry['drift']:.1f} px over the scan" if geometry["drift"] >= 0.5
                           else "") + f"; disk radius {geometry['disk_radius']:.1f} px; first-order spots at "
                        f"{geometry['spot_spacing']:.1f} px; 6-fold (hexagonal) lattice; loss ring "
                        f"{geometry['ring'][0]:.0f}-{geometry['ring'][1]:.0f} px; spot mask radius "
                        f"{geometry['disk_radius'] + 2.5:.1f} px")
    assert lines[2].startswith("dictionary: 1 base (a lattice mismatch between phases reads as strain")
    epochs = [re.fullmatch(r"epoch (\d+)/5 \(step (\d+)\): loss (\S+), (\d+\.\d) s", line) for line in lines]
    epochs = [m for m in epochs if m]
    assert [(int(m[1]), int(m[2])) for m in epochs] == [(e, 4 * e) for e in range(1, 6)]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m[3] for m in epochs] == [f"{r['loss']:.6g}" for r in logged if r["kind"] == "epoch"]
    assert "it/s" not in p.stderr and "step/s" not in p.stderr  # no progress bar in a log file


@pytest.mark.slow
def test_map_prints_each_passs_final_progress_line_once(chain, tmp_path):
    assert chain["train"]["returncode"] == 0
    p = ccstae(["map", chain["run"], chain["sim"], "--out", tmp_path / "s.h5"], cwd=tmp_path,
               cache_dir=chain["cache"], bars=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.startswith(f"data {chain['sim']}, key /data: 8 x 8 scan positions")
    assert "64 positions, " in p.stdout and "%)" in p.stdout
    shown = [line.strip() for line in re.split(r"[\r\n]+", p.stderr) if "100%" in line]
    assert [line.split(":")[0] for line in shown] == ["map (bases)", "map"], shown


def test_evaluate_prints_strain_in_percent_and_valid_as_a_percentage(chain, capsys):
    assert chain["map"]["returncode"] == 0
    assert cli.main(["evaluate", chain["strain"], "--labels", chain["sim"]]) == 0
    out = capsys.readouterr().out
    assert "strain in %, rotation in degrees" in out
    assert "| strain_xx (%) |" in out and "| rotation (deg) |" in out
    assert "| std(z) interior |" in out  # the simulation's labels mark the grain interiors
    assert re.search(r"\| \d+\.\d % \| \d+\.\d\d \|$", out.splitlines()[-1])  # |z| <= 2 in %, then std(z)


def test_evaluate_of_the_chain_prints_an_error_table(chain, capsys):
    assert chain["map"]["returncode"] == 0
    assert cli.main(["evaluate", chain["strain"], "--labels", chain["sim"], "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert set(table) == {"strain_xx", "strain_yy", "shear_xy", "rotation_deg"}
    for quantity, row in table.items():
        assert np.isfinite(row["mae"]), quantity
        assert row["valid_fraction"] > 0.5, quantity


def test_train_twice_on_the_same_out_resumes_instead_of_starting_over(chain, tmp_path, capsys):
    assert chain["train"]["returncode"] == 0
    run = tmp_path / "run"
    shutil.copytree(chain["run"], run)
    metrics_before = (run / "metrics.jsonl").read_text()
    argv = ["train", chain["sim"], "--out", str(run), *chain["train_args"]]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"resumed from step {STEPS}" in out
    assert f"step {STEPS}," in out  # nothing retrained: the run was complete
    assert max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == STEPS
    assert (run / "metrics.jsonl").read_text() == metrics_before


def test_a_bug_keeps_its_traceback_while_bad_input_is_one_line(monkeypatch, tmp_path, capsys):
    from ccstae_jax import pipeline

    def broken(*args, **kwargs):
        raise KeyError("internal lookup")

    monkeypatch.setattr(pipeline, "evaluate", broken)
    with pytest.raises(KeyError, match="internal lookup"):
        cli.main(["evaluate", str(tmp_path / "a.h5"), "--labels", str(tmp_path / "b.h5")])

    def bad_input(*args, **kwargs):
        raise ValueError("labels file b.h5 has no key 'strain_xx'")

    monkeypatch.setattr(pipeline, "evaluate", bad_input)
    assert cli.main(["evaluate", str(tmp_path / "a.h5"), "--labels", str(tmp_path / "b.h5")]) == 2
    assert "error: labels file b.h5 has no key 'strain_xx'" in capsys.readouterr().err
