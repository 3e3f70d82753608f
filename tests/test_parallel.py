"""Tests for ccstae_jax.train.parallel: mesh, padding, sharding, multi-process start-up."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

import _toy_task as toy
from ccstae_jax.train import parallel

TESTS = Path(__file__).parent
REPO = TESTS.parent


def _batch(n):
    return toy._make_batch(np.arange(n * 4, dtype=np.float32).reshape(n, 2, 2), np.ones(n, np.float32),
                           np.arange(n, dtype=np.int64))


def test_make_mesh_spans_all_devices_on_one_auto_data_axis():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",)
    assert mesh.devices.size == jax.device_count() == 4
    assert tuple(mesh.axis_types) == (AxisType.Auto,)


def test_make_mesh_accepts_a_device_subset():
    mesh = parallel.make_mesh(jax.devices()[:1])
    assert mesh.devices.size == 1


def test_make_mesh_rejects_empty_device_list():
    with pytest.raises(ValueError, match="empty"):
        parallel.make_mesh([])


def test_pad_batch_to_pads_with_zero_weight_and_index_minus_one():
    padded = parallel.pad_batch_to(_batch(5), 4)
    assert padded.images.shape == (8, 2, 2)
    np.testing.assert_array_equal(padded.weights, [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(padded.index[5:], [-1, -1, -1])
    assert not padded.images[5:].any()
    assert type(padded) is type(_batch(1))


def test_pad_batch_to_min_size_reaches_the_fixed_batch_shape():
    assert parallel.pad_batch_to(_batch(3), 4, min_size=12).images.shape[0] == 12


def test_pad_batch_to_returns_the_same_batch_when_already_a_multiple():
    b = _batch(8)
    assert parallel.pad_batch_to(b, 4) is b


def test_pad_batch_to_rejects_fields_of_different_length():
    b = _batch(4)._replace(weights=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="weights has length 3"):
        parallel.pad_batch_to(b, 4)


def test_shard_batch_splits_axis_0_over_the_data_axis():
    mesh = parallel.make_mesh()
    x = np.arange(16, dtype=np.float32).reshape(8, 2)
    (arr,) = parallel.shard_batch((x,), mesh)
    assert arr.sharding.spec == PartitionSpec("data")
    assert len({s.device for s in arr.addressable_shards}) == 4
    np.testing.assert_array_equal(np.asarray(arr), x)


def test_shard_batch_rejects_a_length_not_divisible_by_the_device_count():
    with pytest.raises(ValueError, match="pad_batch_to"):
        parallel.shard_batch(np.zeros((6, 2), np.float32), parallel.make_mesh())


def test_initialize_distributed_is_a_no_op_unless_asked(monkeypatch):
    monkeypatch.delenv("CCSTAE_DISTRIBUTED", raising=False)
    assert parallel.initialize_distributed() is False
    assert parallel.initialize_distributed(False) is False
    assert jax.process_count() == 1


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_loopback_training_matches_one_process(tmp_path):
    """2 processes x 2 CPU devices (gloo) train the toy task; params match a 1-process, 4-device run."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(
        [sys.executable, str(TESTS / "_toy_task.py"), str(tmp_path / "multi"), "--devices", "2",
         "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i),
         "--epochs", "2", "--out", str(tmp_path / "multi.npz")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    single = subprocess.run([sys.executable, str(TESTS / "_toy_task.py"), str(tmp_path / "single"), "--epochs", "2",
                             "--out", str(tmp_path / "single.npz")], env=env, capture_output=True, text=True,
                            timeout=300)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    assert single.returncode == 0, single.stderr[-3000:]
    multi, one = np.load(tmp_path / "multi.npz"), np.load(tmp_path / "single.npz")
    for k in one:
        np.testing.assert_allclose(multi[k], one[k], rtol=0, atol=1e-5)
