#!/usr/bin/env bash
# One prepared GPU check for the Triton kernels (issue 5): kernel tests compiled on the GPU (no interpreter),
# then the benchmark on the model's shapes, table last. Run from the repo root on the device machine:
#     bash tools/gpu_check.sh          # outputs also under $OUT when set
# Expected wall time on one H100: ~1 min Triton compiles + ~2 min tests + ~3 min benchmark (< 8 min).
# Needs torch, triton, pytest and pytest-timeout (the device image has all four); not megatron-core.
set -uo pipefail
OUT_DIR="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # no install, so the C++ extension is never built
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET                                # compiled kernels on the GPU
PY="${PYTHON:-python3}"

GPU_ARGS=(--tokens 65536)
TEST_ARGS=(-q -p no:cacheprovider --timeout 300 -x -rs)

echo "== device"; nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$OUT_DIR/device.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    | tee -a "$OUT_DIR/device.txt"

echo "== kernel tests on the GPU"
timeout 240 "$PY" -m pytest "${TEST_ARGS[@]}" tests/test_kernels_attention.py tests/test_kernels_ops.py \
    tests/test_model_attention.py 2>&1 | tee "$OUT_DIR/tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== benchmark (bf16, ${GPU_ARGS[*]})"
timeout 300 "$PY" tools/bench_kernels.py "${GPU_ARGS[@]}" --csv "$OUT_DIR/bench_kernels.csv" 2>&1 \
    | tee "$OUT_DIR/bench.log"
bench_rc=${PIPESTATUS[0]}

echo "== done: tests rc=$tests_rc, bench rc=$bench_rc (logs in $OUT_DIR)"
exit $(( tests_rc != 0 || bench_rc != 0 ))
