#!/usr/bin/env bash
# The one prepared accelerator check: GPU tests, throughput (both presets, float32 and bfloat16, the 65,536-pattern
# map) and a short noise sweep, all output under $OUT (default ./gpu_out). Run on the GPU machine from the repo root:
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
if [ "${1:-}" = "--cpu" ]; then
  "$PY" -m pytest -q -m "not slow" tests/test_warp.py tests/test_models.py tests/test_refine.py tests/test_conv.py 2>&1 | tail -3 | tee "$OUT/tests.txt"
  "$PY" benchmarks/throughput.py --smoke --no-torch --json "$OUT/throughput.json" 2>&1 | tail -30 | tee "$OUT/throughput.txt"
else
  CCSTAE_TEST_PLATFORM=cuda "$PY" -m pytest -q -m "not slow" -x tests/test_warp.py tests/test_models.py \
    tests/test_refine.py tests/test_losses.py tests/test_train.py tests/test_conv.py tests/test_strain.py 2>&1 | tail -5 | tee "$OUT/tests.txt"
  "$PY" benchmarks/throughput.py --gpu --json "$OUT/throughput.json" --markdown "$OUT/throughput.md" \
    ${TORCH_SITE:+--torch-site "$TORCH_SITE"} 2>&1 | tail -60 | tee "$OUT/throughput.txt"
  "$PY" benchmarks/noise_sweep.py --quick --json "$OUT/noise_sweep.json" --out-dir "$OUT/sweep" 2>&1 | tail -30 \
    | tee "$OUT/noise_sweep.txt"
fi
