"""Tests for ccstae_jax.train: config, schedules, the data-parallel step, fit/resume, NaN handling, signals."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _toy_task as toy
from ccstae_jax.train import loop as train
from ccstae_jax.train.checkpoint import Checkpointer
from ccstae_jax.train.config import (TrainConfig, bold_driver_update, get_learning_rate, make_optimizer, make_schedule,
                                     set_learning_rate)
from ccstae_jax.train.loop import fit
from ccstae_jax.train.parallel import make_mesh, pad_batch_to, replicated_sharding, shard_batch
from ccstae_jax.train.rundir import RunConfigMismatchError, _check_run_config
from ccstae_jax.train.step import NonFiniteLossError, compilation_count, init_train_state, make_train_step

TESTS = Path(__file__).parent
REPO = TESTS.parent
TASK = toy.ToyTask()
IMAGES = toy.make_images(toy.N_IMAGES)
SPE = toy.num_batches(toy.N_IMAGES, toy.SCRIPT_CONFIG["batch_size"])


def _cfg(**kw):
    return TrainConfig(**{**toy.SCRIPT_CONFIG, **kw})


def _fit(cfg, run_dir, *, nan_at=frozenset(), fail_at=None, task_config=None, **kw):
    def batches_fn(epoch):
        for b, batch in enumerate(toy.batches(IMAGES, cfg.batch_size, seed=cfg.seed, epoch=epoch, nan_at=nan_at)):
            if fail_at == (epoch, b):
                raise RuntimeError("simulated crash")
            yield batch
    return fit(TASK, batches_fn, cfg, run_dir, steps_per_epoch=toy.num_batches(len(IMAGES), cfg.batch_size),
               sample_images=IMAGES[:4], task_config=TASK.to_dict() if task_config is None else task_config,
               progress=False, **kw)


def _params_np(params):
    return {k: np.asarray(v) for k, v in jax.device_get(params).items()}


def _assert_bitwise_equal(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), f"{k} differs (max |diff| {np.abs(a[k] - b[k]).max()})"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the script configuration (same devices and seed as the subprocess runs)."""
    run_dir = tmp_path_factory.mktemp("reference")
    result = _fit(_cfg(), run_dir)
    return result, _params_np(result.params), run_dir


# ---------------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------------
def test_train_config_round_trips_through_a_dict():
    cfg = TrainConfig(epochs=3, schedule="warmup_cosine", warmup_steps=5, grad_clip_norm=1.0)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_train_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lr'\]"):
        TrainConfig.from_dict({"lr": 1e-3})


@pytest.mark.parametrize("field,value", [("schedule", "step"), ("optimizer", "sgd"), ("on_nonfinite", "ignore"),
                                         ("learning_rate", 0.0), ("batch_size", 0), ("compute_dtype", "float16")])
def test_train_config_rejects_invalid_values(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


# ---------------------------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------------------------
def test_constant_schedule_is_constant():
    sched = make_schedule(TrainConfig(learning_rate=0.1, schedule="constant", epochs=2), 5)
    assert [float(sched(s)) for s in (0, 5, 9)] == pytest.approx([0.1, 0.1, 0.1])


def test_cosine_schedule_values():
    sched = make_schedule(TrainConfig(learning_rate=0.1, schedule="cosine", epochs=2, min_lr_ratio=0.1), 5)
    # lr(s) = 0.1 * (0.1 + 0.9 * (1 + cos(pi s / 10)) / 2)
    assert float(sched(0)) == pytest.approx(0.1)
    assert float(sched(5)) == pytest.approx(0.1 * (0.1 + 0.9 * 0.5))
    assert float(sched(10)) == pytest.approx(0.01)


def test_warmup_cosine_schedule_values():
    sched = make_schedule(TrainConfig(learning_rate=0.1, schedule="warmup_cosine", warmup_steps=4, epochs=2), 7)
    assert float(sched(0)) == pytest.approx(0.0)
    assert float(sched(2)) == pytest.approx(0.05)
    assert float(sched(4)) == pytest.approx(0.1)
    assert float(sched(9)) == pytest.approx(0.05, rel=1e-5)  # half way through the 10 decay steps
    assert float(sched(14)) == pytest.approx(0.0, abs=1e-8)


def test_optimizer_applies_the_schedule_step_by_step():
    cfg = TrainConfig(learning_rate=0.1, schedule="warmup_cosine", warmup_steps=4, epochs=2)
    tx, sched = make_optimizer(cfg, 7), make_schedule(cfg, 7)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    for s in range(3):
        _, state = tx.update({"w": jnp.ones(3)}, state, params)
        assert float(get_learning_rate(state)) == pytest.approx(float(sched(s)))


def test_bold_driver_multiplies_by_1_2_when_the_epoch_loss_improves():
    lr, best = bold_driver_update(1e-3, 0.5, 0.6)
    assert lr == pytest.approx(1.2e-3) and best == pytest.approx(0.5)


def test_bold_driver_multiplies_by_0_8_otherwise():
    lr, best = bold_driver_update(1e-3, 0.7, 0.6)
    assert lr == pytest.approx(0.8e-3) and best == pytest.approx(0.6)
    lr, best = bold_driver_update(1e-3, float("nan"), 0.6)
    assert lr == pytest.approx(0.8e-3) and best == pytest.approx(0.6)


def test_bold_driver_in_fit_follows_the_epoch_losses(reference):
    result, _, _ = reference
    lr, best = _cfg().learning_rate, float("inf")
    for rec in result.history:
        assert rec["learning_rate"] == pytest.approx(lr, rel=1e-6)
        lr, best = bold_driver_update(lr, rec["loss"], best)
        assert rec["best_loss"] == pytest.approx(best)
    assert len(result.history) == 3
    assert float(get_learning_rate(result.state.opt_state)) == pytest.approx(lr, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# the train step
# ---------------------------------------------------------------------------------------------------------------
class _Setup:
    """A mesh, an optimizer, a compiled step (skip mode) and a host copy of the initial state, shared by tests."""

    def __init__(self, mesh):
        self.mesh = mesh
        self.tx = make_optimizer(TrainConfig(learning_rate=0.05, schedule="bold_driver"), 10)
        self.host_state = jax.device_get(init_train_state(TASK, self.tx, IMAGES[:4], key=jax.random.key(0),
                                                          mesh=mesh))
        self.step = make_train_step(TASK, self.tx, mesh, on_nonfinite="skip")

    def fresh_state(self):
        return jax.device_put(self.host_state, replicated_sharding(self.mesh))

    def epoch(self, e):
        return jax.device_put(np.int32(e), replicated_sharding(self.mesh))

    def run(self, batches, state=None):
        state = self.fresh_state() if state is None else state
        losses = []
        for batch in batches:
            batch = pad_batch_to(batch, self.mesh.devices.size)
            images, weights = shard_batch((batch.images, batch.weights), self.mesh)
            state, metrics = self.step(state, images, weights, self.epoch(1))
            losses.append(float(metrics["loss"]))
        return state, losses


@pytest.fixture(scope="module")
def setup4():
    return _Setup(make_mesh())


@pytest.fixture(scope="module")
def setup1():
    return _Setup(make_mesh(jax.devices()[:1]))


def test_four_devices_match_one_device_after_three_steps(setup4, setup1):
    batches = list(toy.batches(IMAGES, 8, seed=0, epoch=0))[:3]
    s4, l4 = setup4.run(batches)
    s1, l1 = setup1.run(batches)
    np.testing.assert_allclose(l4, l1, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(s4.params), jax.tree.leaves(s1.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_train_step_compiles_once_across_steps_epochs_and_learning_rate_changes(setup4):
    state = setup4.fresh_state()
    for i, batch in enumerate(toy.batches(IMAGES, 8, seed=0, epoch=0)):
        images, weights = shard_batch((batch.images, batch.weights), setup4.mesh)
        state, _ = setup4.step(state, images, weights, setup4.epoch(i // 2))
        if i == 2:
            state = set_learning_rate(state, 0.01)
    setup4.run(list(toy.batches(IMAGES, 8, seed=0, epoch=1))[:1])  # a rebuilt state
    assert compilation_count(setup4.step) == 1


def test_a_batch_not_divisible_by_the_device_count_is_padded_and_gives_the_same_step(setup4, setup1):
    batch = next(toy.batches(IMAGES, 5, seed=0, epoch=0))
    assert pad_batch_to(batch, 4).images.shape[0] == 8
    s4, l4 = setup4.run([batch])  # padded to 8 rows, 3 of weight 0
    s1, l1 = setup1.run([batch])  # 5 rows
    assert l4[0] == pytest.approx(l1[0], rel=1e-6)
    for a, b in zip(jax.tree.leaves(s4.params), jax.tree.leaves(s1.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_set_learning_rate_changes_the_next_update(setup4):
    state = set_learning_rate(setup4.fresh_state(), 0.0)
    before = _params_np(state.params)
    batch = next(toy.batches(IMAGES, 8, seed=0, epoch=0))
    images, weights = shard_batch((batch.images, batch.weights), setup4.mesh)
    state, metrics = setup4.step(state, images, weights, setup4.epoch(0))
    assert float(metrics["learning_rate"]) == 0.0
    _assert_bitwise_equal(_params_np(state.params), before)


def test_a_nonfinite_batch_leaves_params_unchanged_and_is_counted(setup4):
    state = setup4.fresh_state()
    before = _params_np(state.params)
    batch = next(toy.batches(IMAGES, 8, seed=0, epoch=0, nan_at=frozenset({(0, 0)})))
    images, weights = shard_batch((batch.images, batch.weights), setup4.mesh)
    state, metrics = setup4.step(state, images, weights, setup4.epoch(0))
    assert not bool(metrics["finite"])
    assert int(state.nonfinite_count) == 1 and int(state.first_nonfinite_step) == 1
    _assert_bitwise_equal(_params_np(state.params), before)


def test_bfloat16_compute_keeps_float32_params():
    mesh = make_mesh()
    tx = make_optimizer(TrainConfig(learning_rate=0.05), 10)
    state = init_train_state(TASK, tx, IMAGES[:4], key=jax.random.key(0), mesh=mesh)
    batch = next(toy.batches(IMAGES, 8, seed=0, epoch=0))
    images, weights = shard_batch((batch.images, batch.weights), mesh)
    state, metrics = make_train_step(TASK, tx, mesh, compute_dtype="bfloat16")(
        state, images, weights, jax.device_put(np.int32(0), replicated_sharding(mesh)))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
    assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))


def test_task_returning_a_non_scalar_loss_is_rejected():
    class BadTask(toy.ToyTask):
        def loss(self, params, images, weights, epoch):
            loss, aux = super().loss(params, images, weights, epoch)
            return jnp.stack([loss, loss]), aux

    mesh = make_mesh()
    tx = make_optimizer(TrainConfig(), 10)
    state = init_train_state(BadTask(), tx, IMAGES[:4], key=jax.random.key(0), mesh=mesh)
    images, weights = shard_batch((IMAGES[:4], np.ones(4, np.float32)), mesh)
    with pytest.raises(ValueError, match="scalar loss"):
        make_train_step(BadTask(), tx, mesh)(state, images, weights, jnp.int32(0))


# ---------------------------------------------------------------------------------------------------------------
# fit: files, compilation, resume
# ---------------------------------------------------------------------------------------------------------------
def test_fit_compiles_the_step_once_and_trains(reference):
    result, _, _ = reference
    assert result.compilations == 1
    assert int(result.state.step) == 3 * SPE
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_fit_writes_the_config_and_a_metrics_file(reference):
    _, _, run_dir = reference
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["task_config"] == TASK.to_dict()
    assert TrainConfig.from_dict(saved["train_config"]) == _cfg()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 3 * SPE + 1))
    for key in ("epoch", "loss", "mse", "reg", "learning_rate", "grad_norm", "wall_time", "patterns_per_s"):
        assert key in steps[-1]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [0, 1, 2]


def test_fit_keeps_the_last_checkpoints_and_the_best(reference):
    result, _, run_dir = reference
    with Checkpointer(run_dir / "checkpoints") as ck:
        steps = ck.all_steps()
        assert steps[-2:] == [10, 12]
        assert result.best_step in steps
        assert ck.metric(result.best_step) == pytest.approx(min(r["loss"] for r in result.history))


def test_load_checkpoint_restores_onto_one_device(reference):
    result, params, run_dir = reference
    state = train.load_checkpoint(run_dir, TASK, IMAGES[:4], mesh=make_mesh(jax.devices()[:1]))
    _assert_bitwise_equal(_params_np(state.params), params)
    best = train.load_checkpoint(run_dir, TASK, IMAGES[:4], which="best")
    assert int(best.step) == result.best_step


def test_crash_mid_epoch_then_rerun_ends_with_the_same_params(tmp_path, reference):
    _, params, _ = reference
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(_cfg(), tmp_path, fail_at=(1, 3))  # after the step-6 checkpoint, before step 8
    result = _fit(_cfg(), tmp_path)
    assert result.resumed_from_step == 6
    assert result.compilations in (0, 1)  # 0: the reference run compiled the identical step already
    _assert_bitwise_equal(_params_np(result.params), params)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, 3 * SPE + 1))


def test_resume_with_a_different_task_config_is_refused(reference):
    _, _, run_dir = reference
    with pytest.raises(RunConfigMismatchError, match=r"task_config.latent: saved 4, now 8"):
        _fit(_cfg(), run_dir, task_config={**TASK.to_dict(), "latent": 8})


def test_resume_with_a_different_seed_is_refused(reference):
    _, _, run_dir = reference
    with pytest.raises(RunConfigMismatchError, match=r"train_config.seed: saved 3, now 4"):
        _fit(_cfg(seed=4), run_dir)


def test_resume_with_more_epochs_or_other_bookkeeping_is_allowed(reference, tmp_path):
    _, _, run_dir = reference
    shutil.copy(run_dir / "config.json", tmp_path / "config.json")
    _check_run_config(tmp_path, _cfg(epochs=5, log_every=7, keep_checkpoints=1), TASK.to_dict(), SPE,
                            has_checkpoint=True)
    with pytest.raises(RunConfigMismatchError, match="steps_per_epoch: saved 4, now 5"):
        _check_run_config(tmp_path, _cfg(), TASK.to_dict(), 5, has_checkpoint=True)


# ---------------------------------------------------------------------------------------------------------------
# non-finite losses
# ---------------------------------------------------------------------------------------------------------------
def test_nan_loss_stops_with_an_error_and_keeps_the_last_checkpoint(tmp_path):
    cfg = _cfg(log_every=100, async_checkpointing=False)  # the NaN is found only when step 8 is about to be saved
    with pytest.raises(NonFiniteLossError, match=r"step 7 \(epoch 2 of 3, batch 3 of 4.*step 6") as err:
        _fit(cfg, tmp_path, nan_at=frozenset({(1, 2)}))
    assert (err.value.step, err.value.epoch) == (7, 1)
    with Checkpointer(tmp_path / "checkpoints") as ck:
        assert ck.latest_step() == 6
    state = train.load_checkpoint(tmp_path, TASK, IMAGES[:4])
    assert all(np.all(np.isfinite(v)) for v in _params_np(state.params).values())


def test_skip_mode_drops_nonfinite_batches_and_finishes(tmp_path):
    result = _fit(_cfg(on_nonfinite="skip"), tmp_path, nan_at=frozenset({(1, 2), (2, 0)}))
    assert int(result.state.step) == 3 * SPE
    assert int(result.state.nonfinite_count) == 2
    assert all(np.all(np.isfinite(v)) for v in _params_np(result.params).values())
    assert result.history[1]["finite_steps"] == SPE - 1


# ---------------------------------------------------------------------------------------------------------------
# kills and signals (separate processes)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def script(tmp_path_factory):
    """Command line and environment to run tests/_toy_task.py in a fresh process (4 CPU devices); the runs share
    a persistent compilation cache so that only the first one compiles."""
    cache = tmp_path_factory.mktemp("jax_cache")
    env = {**os.environ, "PYTHONPATH": str(REPO), "CCSTAE_TEST_JAX_CACHE": str(cache)}

    def make(run_dir, *args):
        return [sys.executable, str(TESTS / "_toy_task.py"), str(run_dir), *args], env
    return make


def _finished_steps(run_dir):
    ckdir = Path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit()) if ckdir.exists() else []


def _wait_for(predicate, proc, timeout=120.0):
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early (rc {proc.returncode}): {proc.communicate()[0][-3000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def _resume_here(run_dir, expected_from, params):
    """Rerun (in this process: same 4 devices, same compiled code) and compare with the uninterrupted run."""
    result = _fit(_cfg(), run_dir)
    assert result.resumed_from_step == expected_from
    assert int(result.state.step) == 3 * SPE
    _assert_bitwise_equal(_params_np(result.params), params)


def test_resume_after_sigkill_ends_with_the_same_params(tmp_path, reference, script):
    _, params, _ = reference
    run_dir = tmp_path / "run"
    cmd, env = script(run_dir, "--sleep", "0.25")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: bool(_finished_steps(run_dir)), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = _finished_steps(run_dir)[-1]
    assert killed_at < 3 * SPE
    _resume_here(run_dir, killed_at, params)


def test_kill_during_a_checkpoint_save_leaves_the_run_resumable(tmp_path, reference, script):
    _, params, _ = reference
    run_dir = tmp_path / "run"
    cmd, env = script(run_dir, "--kill-in-save", "4")  # killed while writing the step-4 checkpoint
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert _finished_steps(run_dir) == [2]
    assert any(p.name.startswith("4.") and "tmp" in p.name for p in (run_dir / "checkpoints").iterdir())
    _resume_here(run_dir, 2, params)


def test_sigint_saves_a_checkpoint_and_says_how_to_resume(tmp_path, reference, script):
    _, params, _ = reference
    run_dir, ready = tmp_path / "run", tmp_path / "ready"
    cmd, env = script(run_dir, "--sleep", "0.15", "--ready-file", str(ready))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(ready.exists, proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "To resume, run the same command again" in err
    interrupted_at = int(re.search(r"Training interrupted after step (\d+)", err).group(1))
    assert interrupted_at < 3 * SPE
    assert _finished_steps(run_dir)[-1] == interrupted_at
    _resume_here(run_dir, interrupted_at, params)


def test_progress_bar_is_off_when_tqdm_disable_is_set(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert train._progress_enabled(True) is False
    assert train._progress_enabled(False) is False
