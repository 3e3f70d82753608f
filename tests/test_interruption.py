"""Interrupting `ccstae map` and `ccstae train` loses no work and leaves no half-written output; blank patterns and
pure background give invalid positions, never NaN strains at valid ones.

Every command runs in a subprocess (one CPU device) built on the session's shared tiny run
(`test_cli.checked_shared_run`), whose JAX compilation cache makes these subprocesses skip compilation.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import h5py
import jax
import numpy as np
import pytest

import _toy_task as toy
from test_cli import STEPS, ccstae, checked_shared_run

# Runs `ccstae ARGS` and SIGKILLs itself right after the 3rd dataset of a temporary output file is created: a
# deterministic "killed while writing the strain map".
KILL_WHILE_WRITING = r"""
import os, signal, sys
import h5py
from ccstae_jax import cli

_create = h5py.Group.create_dataset
_made = [0]

def create_then_die(self, *args, **kwargs):
    out = _create(self, *args, **kwargs)
    if ".tmp" in self.file.filename:
        _made[0] += 1
        if _made[0] == 3:
            self.file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    return out

h5py.Group.create_dataset = create_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return checked_shared_run(tmp_path_factory)


def _maps(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        out = {}
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def _assert_same_maps(a, b):
    ma, mb = _maps(a), _maps(b)
    assert sorted(ma) == sorted(mb)
    for k in ma:
        np.testing.assert_array_equal(ma[k], mb[k], err_msg=k)


def _tmp_files(out: Path) -> list[Path]:
    return sorted(out.parent.glob(out.name + ".tmp*"))


def _finished_steps(run: Path) -> list[int]:
    ckpt = run / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def _params(run) -> list[np.ndarray]:
    from ccstae_jax.pipeline import load_run
    from ccstae_jax.train.loop import load_checkpoint

    task, _, _ = load_run(run)
    h, w = task.model_cfg.pattern_shape
    state = load_checkpoint(run, task, np.zeros((2, h, w), np.float32))
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


# ---------------------------------------------------------------------------------------------------------------
# map
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def map_killed_while_writing(chain, tmp_path_factory):
    """`ccstae map` SIGKILLed halfway through writing its output, then the same command run again."""
    root = tmp_path_factory.mktemp("map_kill")
    out = root / "strain.h5"
    args = ["map", chain["run"], chain["sim"], "--out", out, "--quiet"]
    killed = ccstae(args, cwd=root, cache_dir=chain["cache"], wrapper=KILL_WHILE_WRITING)
    after_kill = {"exists": out.exists(), "tmp": [p.name for p in _tmp_files(out)]}
    t0 = time.monotonic()
    rerun = ccstae(args, cwd=root, cache_dir=chain["cache"])
    return {"out": out, "killed": killed, "after_kill": after_kill, "rerun": rerun, "seconds": time.monotonic() - t0}


def test_map_killed_while_writing_leaves_no_file_under_the_final_name(map_killed_while_writing):
    r = map_killed_while_writing
    assert r["killed"].returncode == -signal.SIGKILL, r["killed"].stderr[-2000:]
    assert r["after_kill"]["tmp"], "the kill did not happen while the temporary output was being written"
    assert not r["after_kill"]["exists"]


def test_map_rerun_after_a_kill_writes_the_uninterrupted_result_and_removes_the_stale_tmp(map_killed_while_writing,
                                                                                          chain):
    r = map_killed_while_writing
    assert r["rerun"].returncode == 0, r["rerun"].stderr[-2000:]
    assert _tmp_files(r["out"]) == []
    _assert_same_maps(r["out"], chain["strain"])


@pytest.mark.slow  # the kill while writing (default run) covers the atomic output; this adds a kill mid-inference
def test_map_killed_late_in_its_run_leaves_no_output(chain, map_killed_while_writing, tmp_path):
    out = tmp_path / "strain.h5"
    proc = ccstae(["map", chain["run"], chain["sim"], "--out", out, "--quiet"], cwd=tmp_path,
                  cache_dir=chain["cache"], wait=False)
    time.sleep(0.75 * map_killed_while_writing["seconds"])  # past start-up, around inference
    still_running = proc.poll() is None
    proc.kill()
    proc.communicate(timeout=60)
    assert still_running, "map finished before it could be killed"
    assert not out.exists()


def test_map_marks_blank_patterns_invalid_and_keeps_valid_positions_finite(chain, tmp_path):
    data = tmp_path / "with_blanks.h5"
    shutil.copy(chain["sim"], data)
    blank = [(0, 1), (3, 3), (5, 6), (7, 0)]  # (0, 1) lies in the file's reference region (0:2, 0:2)
    with h5py.File(data, "r+") as f:
        for r, c in blank:
            f["data"][r, c] = 0.0
    out = tmp_path / "strain.h5"
    p = ccstae(["map", chain["run"], data, "--out", out, "--quiet"], cwd=tmp_path, cache_dir=chain["cache"])
    assert p.returncode == 0, p.stderr[-2000:]
    m = _maps(out)
    # every blank pattern is invalid; the lattice patterns (faint on this 50x50 detector) nearly all stay valid
    assert m["valid"].sum() >= 0.9 * (64 - len(blank)), m["invalid_reason"]
    mask = np.zeros((8, 8), bool)
    mask[tuple(np.array(blank).T)] = True
    assert not m["valid"][mask].any()
    assert (m["invalid_reason"][mask] == 1).all()
    for q in ("strain_xx", "strain_yy", "shear_xy", "rotation"):
        assert np.isnan(m[q][mask]).all(), q
        assert np.isfinite(m[q][m["valid"]]).all(), q


# ---------------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------------
def _train_until_checkpoint(chain, run: Path, *, sig, min_checkpoints: int = 1):
    """Starts `ccstae train` (a checkpoint every step), sends ``sig`` once ``min_checkpoints`` are on disk."""
    args = ["train", chain["sim"], "--out", run, *chain["train_args"], "--checkpoint-every", "1"]
    proc = ccstae(args, cwd=run.parent, cache_dir=chain["cache"], wait=False)
    deadline = time.monotonic() + 300
    while len(_finished_steps(run)) < min_checkpoints and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    running = proc.poll() is None
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert running, f"training ended before the signal (rc {proc.returncode}):\n{stderr[-2000:]}"
    return args, proc.returncode, stdout, stderr


@pytest.fixture(scope="module")
def train_interrupted_by_sigint(chain, tmp_path_factory):
    run = tmp_path_factory.mktemp("sigint") / "run"
    args, rc, stdout, stderr = _train_until_checkpoint(chain, run, sig=signal.SIGINT)
    steps_after_interrupt = _finished_steps(run)
    rerun = ccstae(args, cwd=run.parent, cache_dir=chain["cache"])
    return {"run": run, "rc": rc, "stderr": stderr, "steps": steps_after_interrupt, "rerun": rerun}


def test_train_sigint_exits_130_saying_how_to_resume_with_a_checkpoint_saved(train_interrupted_by_sigint):
    r = train_interrupted_by_sigint
    assert r["rc"] == 130, r["stderr"][-2000:]
    assert "rerun the same command to resume" in r["stderr"]
    m = re.search(r"interrupted after step (\d+)", r["stderr"])
    assert m, r["stderr"][-2000:]
    step = int(m.group(1))
    assert 1 <= step < STEPS
    assert r["steps"][-1] == step  # the interrupted step is checkpointed


def test_train_rerun_after_sigint_resumes_from_the_saved_step(train_interrupted_by_sigint):
    r = train_interrupted_by_sigint
    assert r["rerun"].returncode == 0, r["rerun"].stderr[-2000:]
    assert f"resumed from step {r['steps'][-1]}" in r["rerun"].stdout
    assert f"step {STEPS}," in r["rerun"].stdout


def test_train_resumed_after_sigint_ends_with_the_uninterrupted_parameters(train_interrupted_by_sigint, chain):
    assert train_interrupted_by_sigint["rerun"].returncode == 0
    for a, b in zip(_params(train_interrupted_by_sigint["run"]), _params(chain["run"]), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("batch", [1, 2], ids=["first batch", "last batch, at the epoch boundary"])
def test_ctrl_c_message_names_the_epoch_and_batch_of_the_saved_step(tmp_path, capsys, batch):
    """Ctrl-C while batch ``batch`` of epoch 2 trains: the message names that step's epoch and batch (1-based)."""
    from ccstae_jax.train.config import TrainConfig
    from ccstae_jax.train.loop import fit

    images = toy.make_images(24)
    cfg = TrainConfig(epochs=4, batch_size=12, seed=0, learning_rate=1e-2, async_checkpointing=False)
    spe = toy.num_batches(24, cfg.batch_size)  # 2

    def batches_fn(epoch):
        for i, b in enumerate(toy.batches(images, cfg.batch_size, seed=cfg.seed, epoch=epoch)):
            if (epoch, i) == (1, batch - 1):
                os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: the loop saves after this batch and stops
            yield b

    with pytest.raises(KeyboardInterrupt):
        fit(toy.ToyTask(), batches_fn, cfg, tmp_path / "run", steps_per_epoch=spe, sample_images=images[:4],
            progress=False)
    step = spe + batch
    assert f"interrupted after step {step} (epoch 2 of 4, batch {batch} of {spe})" in capsys.readouterr().err
    assert _finished_steps(tmp_path / "run")[-1] == step


@pytest.mark.slow
def test_train_sigkilled_mid_run_resumes_to_the_uninterrupted_parameters(chain, tmp_path):
    run = tmp_path / "run"
    args, rc, _, _ = _train_until_checkpoint(chain, run, sig=signal.SIGKILL, min_checkpoints=3)
    assert rc == -signal.SIGKILL
    rerun = ccstae(args, cwd=tmp_path, cache_dir=chain["cache"])
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resumed from step" in rerun.stdout
    for a, b in zip(_params(run), _params(chain["run"]), strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Pure background and blank patterns, trained end to end
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pure_background_map(chain, tmp_path_factory):
    """A w = 1.0 scan (pure background glow, no lattice) with 3 blank patterns, trained on and mapped."""
    root = tmp_path_factory.mktemp("pure_background")
    data = root / "w1.h5"
    p = ccstae(["simulate", data, "--scan", "8", "8", "--grains", "4", "--noise", "1.0", "--detector", "64",
                "--seed", "1", "--quiet"], cwd=root, cache_dir=chain["cache"])
    assert p.returncode == 0, p.stderr[-2000:]
    blank = [(2, 2), (4, 5), (7, 7)]
    with h5py.File(data, "r+") as f:
        for r, c in blank:
            f["data"][r, c] = 0.0
    run, out = root / "run", root / "strain.h5"
    p = ccstae(["train", data, "--out", run, *chain["train_args"]], cwd=root, cache_dir=chain["cache"])
    assert p.returncode == 2 and "no diffraction spots found" in p.stderr, p.stderr[-2000:]
    assert not (run / "model.json").exists()
    # The user insists (a ring given by hand): training runs, and the map must still refuse every position.
    p = ccstae(["train", data, "--out", run, "--ring", "8", "20", "--symmetry", "6", *chain["train_args"]], cwd=root,
               cache_dir=chain["cache"])
    assert p.returncode == 0, p.stderr[-2000:]
    p = ccstae(["map", run, data, "--out", out, "--quiet"], cwd=root, cache_dir=chain["cache"])
    assert p.returncode == 0, p.stderr[-2000:]
    mask = np.zeros((8, 8), bool)
    mask[tuple(np.array(blank).T)] = True
    return _maps(out), mask


@pytest.mark.slow
def test_pure_background_scan_with_blank_patterns_gives_no_nan_at_valid_positions(pure_background_map):
    m, blank = pure_background_map
    assert not m["valid"][blank].any()
    assert (m["invalid_reason"][blank] == 1).all()
    for q in ("strain_xx", "strain_yy", "shear_xy", "rotation"):
        assert np.isfinite(m[q][m["valid"]]).all(), q
        assert np.isnan(m[q][~m["valid"]]).all(), q


@pytest.mark.slow
def test_pure_background_positions_are_marked_as_having_no_lattice_signal(pure_background_map):
    m, blank = pure_background_map
    assert not m["valid"].any()
    assert (m["invalid_reason"][~blank] == 2).all()
