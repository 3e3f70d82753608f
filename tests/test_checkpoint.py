"""Tests for ccstae_jax.train.checkpoint: the Orbax wrapper."""
import gc
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccstae_jax.train.checkpoint import CheckpointError, Checkpointer, abstract_like
from ccstae_jax.train.parallel import make_mesh, replicated_sharding


@pytest.fixture
def orbax_error_leftovers():
    """After a failed Orbax restore, unfinished read coroutines are garbage-collected with 'exception ignored'
    messages; collect them here, silently, instead of in whichever test runs next."""
    yield
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook


def _state(mesh, scale=1.0):
    tree = {"w": jnp.arange(12.0).reshape(3, 4) * scale, "step": jnp.asarray(7, jnp.int32),
            "key": jax.random.key_data(jax.random.key(1))}
    return jax.device_put(tree, replicated_sharding(mesh))


def _equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_save_restore_round_trip(tmp_path):
    mesh = make_mesh()
    state = _state(mesh)
    with Checkpointer(tmp_path, async_save=False) as ck:
        ck.save(3, state, meta={"epoch": 1})
        restored, meta = ck.restore(abstract_like(state, replicated_sharding(mesh)))
    assert _equal(restored, state)
    assert meta == {"epoch": 1}


@pytest.mark.parametrize("n_save,n_restore", [(4, 1), (1, 4)])
def test_restore_onto_a_different_device_count(tmp_path, n_save, n_restore):
    save_mesh, restore_mesh = make_mesh(jax.devices()[:n_save]), make_mesh(jax.devices()[:n_restore])
    state = _state(save_mesh)
    with Checkpointer(tmp_path, async_save=False) as ck:
        ck.save(1, state)
    with Checkpointer(tmp_path) as ck:
        restored, _ = ck.restore(abstract_like(state, replicated_sharding(restore_mesh)))
    assert _equal(restored, state)
    assert restored["w"].sharding.mesh.devices.size == n_restore


def test_keeps_the_last_k_and_the_best(tmp_path):
    mesh = make_mesh()
    with Checkpointer(tmp_path, keep_last=2, async_save=False) as ck:
        for step, metric in [(1, 0.5), (2, 0.1), (3, None), (4, 0.9), (5, 0.7)]:
            ck.save(step, _state(mesh, step), metric=metric)
        assert ck.all_steps() == [2, 4, 5]
        assert ck.best_step() == 2
        assert ck.metric(2) == pytest.approx(0.1)


def test_best_step_is_none_without_metrics(tmp_path):
    with Checkpointer(tmp_path, async_save=False) as ck:
        ck.save(1, _state(make_mesh()))
        assert ck.best_step() is None


def test_async_save_is_complete_after_wait(tmp_path):
    mesh = make_mesh()
    state = _state(mesh)
    ck = Checkpointer(tmp_path, async_save=True)
    ck.save(1, state)
    ck.wait()
    assert ck.latest_step() == 1
    restored, _ = ck.restore(abstract_like(state, replicated_sharding(mesh)))
    ck.close()
    assert _equal(restored, state)


def test_saving_an_old_step_is_refused(tmp_path):
    with Checkpointer(tmp_path, async_save=False) as ck:
        ck.save(5, _state(make_mesh()))
        with pytest.raises(CheckpointError, match="step 5 already exists"):
            ck.save(5, _state(make_mesh()))


def test_restore_without_checkpoint_raises(tmp_path):
    mesh = make_mesh()
    with Checkpointer(tmp_path) as ck:
        with pytest.raises(CheckpointError, match="no finished checkpoint"):
            ck.restore(abstract_like(_state(mesh), replicated_sharding(mesh)))


def test_unfinished_temporary_directory_is_ignored(tmp_path):
    mesh = make_mesh()
    with Checkpointer(tmp_path, async_save=False) as ck:
        ck.save(2, _state(mesh))
    (tmp_path / "4.orbax-checkpoint-tmp-1234567").mkdir()  # what a kill during a save leaves behind
    with Checkpointer(tmp_path) as ck:
        assert ck.latest_step() == 2
        restored, _ = ck.restore(abstract_like(_state(mesh), replicated_sharding(mesh)))
    assert _equal(restored, _state(mesh))


@pytest.mark.parametrize("which", ["metadata", "array_data"])
def test_corrupt_checkpoint_gives_a_clear_error(tmp_path, orbax_error_leftovers, which):
    mesh = make_mesh()
    with Checkpointer(tmp_path, async_save=False) as ck:
        ck.save(2, _state(mesh))
    files = [f for f in (tmp_path / "2" / "state").rglob("*") if f.is_file()]
    if which == "array_data":
        files = [f for f in files if f.parent.name == "d"]  # the OCDBT data files
    assert files
    for f in files:
        f.write_bytes(b"garbage")
    with Checkpointer(tmp_path) as ck:
        with pytest.raises(CheckpointError, match=r"(?s)checkpoint .*2.*corrupt"):
            ck.restore(abstract_like(_state(mesh), replicated_sharding(mesh)))


def test_restore_into_a_different_structure_gives_a_clear_error(tmp_path, orbax_error_leftovers):
    mesh = make_mesh()
    with Checkpointer(tmp_path, async_save=False) as ck:
        ck.save(1, _state(mesh))
        other = {"w": jnp.zeros((5, 5)), "step": jnp.asarray(0, jnp.int32), "key": jnp.zeros(2, jnp.uint32)}
        with pytest.raises(CheckpointError, match=r"(?s)different model.*w: saved \(3, 4\) float32, expected \(5, 5\)"):
            ck.restore(abstract_like(other, replicated_sharding(mesh)))


def test_keep_last_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        Checkpointer(tmp_path, keep_last=0)
