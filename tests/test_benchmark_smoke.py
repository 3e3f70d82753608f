"""Smoke tests of the throughput benchmark's JAX side and summary (benchmarks/); no torch needed."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from _patterns import hex_patterns

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


jax_side = _load("_jax_side")
throughput = _load("throughput")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    images, _ = hex_patterns(8, size=40, g=12.0)
    path = tmp_path_factory.mktemp("bench") / "pool.npy"
    np.save(path, images)
    return str(path)


def _spec(pool, **kw):
    return {**jax_side.DEFAULTS, "preset": "fast", "batch": 4, "ring": (6.0, 18.0), "warmup": 1, "steps": 1,
            "repeats": 2, "data": pool, **kw}


def test_jax_train_measurement_reports_throughput_compile_time_and_memory(pool):
    res = jax_side.run(_spec(pool, kind="train"))
    assert res["patterns_per_s"] > 0 and len(res["repeat_patterns_per_s"]) == 2
    assert res["compile_s"] > 0 and res["peak_rss_mb"] > 0
    assert res["loss_finite"]


def test_jax_scan_maps_every_position_with_batches_larger_than_the_pool_on_two_devices(pool):
    res = jax_side.run(_spec(pool, kind="scan", batch=16, devices=2, scan_positions=40))
    assert res["devices_used"] == 2 and res["scan_batches"] == 3 and not res["scan_truncated"]
    assert res["scan_on_device_s"] > 0 and res["scan_from_host_s"] > 0 and res["outputs_finite"]


def test_jax_side_rejects_a_missing_pattern_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="pattern file"):
        jax_side.run(_spec(str(tmp_path / "absent.npy"), kind="train"))


def _fake(side, kind, batch, pps, *, preset="reference", interp=True):
    m = throughput.Measurement(side, throughput._jax(kind, batch, preset=preset, interpolate=interp)
                               if side == "jax" else throughput._torch(kind, batch, interpolate=interp))
    return {"ok": True, "side": side, "spec": m.spec, "_key": list(m.key), "patterns_per_s": pps,
            "compile_s": 1.0, "peak_rss_mb": 100.0}


def test_headline_keys_are_null_for_torch_when_torch_did_not_run():
    rows = throughput.summarize([_fake("jax", "train", 4, 1.0), _fake("jax", "train", 32, 50.0, preset="fast")])
    out = throughput.headline(rows, throughput.CPU_HEADLINE)
    assert out["fast_train_patterns_per_s"] == 50.0
    for key in ("reference_train_ratio", "reference_infer_ratio", "fast_train_ratio", "torch_train_patterns_per_s"):
        assert out[key] is None
    json.dumps(out)


def test_ratios_are_ours_over_pytorch_medians_across_processes():
    results = [_fake("jax", "train", 4, 2.0), _fake("torch", "train", 4, 1.0), _fake("jax", "train", 4, 4.0),
               _fake("torch", "train", 4, 3.0), _fake("jax", "infer", 16, 6.0), _fake("torch", "infer", 16, 2.0),
               _fake("jax", "train", 32, 100.0, preset="fast")]
    rows = throughput.summarize(results)
    out = throughput.headline(rows, throughput.CPU_HEADLINE)
    assert out["reference_train_ratio"] == pytest.approx(3.0 / 2.0)
    assert out["reference_infer_ratio"] == pytest.approx(3.0)
    assert out["fast_train_ratio"] == pytest.approx(100.0 / 2.0)
    assert "| reference | train | yes | 4 |" in throughput.markdown_table(rows)


def test_quick_plan_alternates_jax_and_torch_and_marks_fake_devices():
    plan = throughput.plan_quick()
    sides = [m.side for m in plan if m.spec.get("preset", "reference") == "reference"][:4]
    assert sides == ["jax", "torch", "jax", "torch"]
    fake = [m for m in plan if m.spec.get("cpu_devices")]
    assert fake and "(fake)" in throughput._label(fake[0])


def _runner(monkeypatch, budget):
    calls = []

    def fake_run_process(argv, timeout, env=None):
        calls.append(Path(argv[1]).name)
        return {"ok": True, "patterns_per_s": 1.0, "process_wall_s_outer": 1.0}

    monkeypatch.setattr(throughput, "run_process", fake_run_process)
    runner = throughput.Runner("python", "torch-python", None, "pool.npy", budget, 100.0, {}, log=lambda s: None)
    return runner, calls


@pytest.mark.parametrize("budget, expected", [(100.0, []), (1000.0, ["_jax_side.py", "_torch_side.py"])])
def test_a_jax_torch_pair_is_skipped_or_run_as_a_whole_under_the_time_budget(monkeypatch, budget, expected):
    runner, calls = _runner(monkeypatch, budget)
    plan = [throughput.Measurement("jax", throughput._jax("train", 4), round=1),
            throughput.Measurement("torch", throughput._torch("train", 4), round=1)]
    results, skipped = runner.run(plan)  # no history: each side is estimated at 60 s
    assert calls == expected
    assert len(skipped) == 2 - len(expected)
