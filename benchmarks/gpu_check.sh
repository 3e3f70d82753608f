#!/usr/bin/env bash
# The one prepared accelerator check: GPU tests, the speed of the map users run (65,536 patterns, train + map with
# defaults) and where its time goes (128 x 128 scan), throughput of both presets and the quick noise sweep, all output under $OUT (default ./gpu_out). Run on
# the GPU machine from the repo root:
#   bash benchmarks/gpu_check.sh            # GPU (H100/H200 class)
#   bash benchmarks/gpu_check.sh --cpu      # the same steps at CPU sizes (what runs where no GPU is lent)
# Optional: a directory with auto4dstem + m3util (pure Python) for the PyTorch side: TORCH_SITE=.whl/a4d
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{ date; nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"; } \
  2>&1 | tee "$OUT/device.txt"
TESTS="tests/test_warp.py tests/test_models.py tests/test_fit.py tests/test_mapping.py tests/test_losses.py
       tests/test_train.py tests/test_conv.py tests/test_geometry.py"
if [ "${1:-}" = "--cpu" ]; then
  "$PY" -m pytest -q -m "not slow" tests/test_warp.py tests/test_fit.py tests/test_geometry.py 2>&1 | tail -3 \
    | tee "$OUT/tests.txt"
  "$PY" benchmarks/map_speed.py --scan 16 --no-baseline --json "$OUT/map_speed.json" --markdown "$OUT/map_speed.md" \
    2>&1 | tail -30 | tee "$OUT/map_speed.txt"
  "$PY" benchmarks/throughput.py --smoke --no-torch --json "$OUT/throughput.json" 2>&1 | tail -30 | tee "$OUT/throughput.txt"
else
  # shellcheck disable=SC2086
  CCSTAE_TEST_PLATFORM=cuda "$PY" -m pytest -q -m "not slow" -x $TESTS 2>&1 | tail -5 | tee "$OUT/tests.txt"
  "$PY" benchmarks/map_speed.py --full --no-baseline --json "$OUT/map_speed.json" --markdown "$OUT/map_speed.md" \
    2>&1 | tail -40 | tee "$OUT/map_speed.txt"
  "$PY" benchmarks/map_profile.py --scan 128 --json "$OUT/map_profile.json" --markdown "$OUT/map_profile.md" \
    2>&1 | tail -20 | tee "$OUT/map_profile.txt"
  "$PY" benchmarks/noise_sweep.py --quick --baseline off --json "$OUT/noise_sweep.json" --out-dir "$OUT/sweep" \
    2>&1 | tail -30 | tee "$OUT/noise_sweep.txt"
  "$PY" benchmarks/throughput.py --gpu --json "$OUT/throughput.json" --markdown "$OUT/throughput.md" \
    ${TORCH_SITE:+--torch-site "$TORCH_SITE"} 2>&1 | tail -60 | tee "$OUT/throughput.txt"
fi
