#!/usr/bin/env bash
# One prepared GPU check for the Triton kernels (issue 5), at most 8 minutes on one H100 (each step has its
# own time limit, so a slow step cannot starve the next one):
#   1. the kernel tests, compiled on the GPU (no interpreter), 4 processes      <= 180 s
#   2. the attention benchmark (bf16, 64k tokens; 8k cases first)               <= 150 s
#   3. the RoPE / GeGLU / RMSNorm benchmark (bf16, 64k tokens)                  <=  90 s
#   4. the attention launch-settings sweep at S=8192 (which defaults to keep)   <=  60 s
#   5. the paper's Table 4/5 protocol: the large preset (random weights; speed does not depend on them), bf16,
#      <=8,192 chars at batch 8 and <=512 at batch 32, 10 timed runs, on the bundled demo corpus with a 32k
#      tokenizer trained on it first; one row per attention backend                <= 150 s
# Run from the repo root on the device machine:   bash tools/gpu_check.sh
# Outputs go under $OUT when set: device.txt, tests.log, bench_*.log, bench_*.csv (rows are written as they
# are timed, to *.csv.partial until a step completes), sweep.log, sweep.csv.
# Needs torch, triton, pytest and pytest-timeout (the device image has all four); not megatron-core.
# Every launch was compiled for sm_90a beforehand on a CPU machine (python tools/compile_kernels.py), so a
# failure here is about numbers or speed, not about the kernels compiling.
set -uo pipefail
OUT_DIR="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # no install, so the C++ extension is never built
export PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0                            # compiled kernels on the GPU (tests default to 1 on CPU)
PY="${PYTHON:-python3}"
TEST_ARGS=(-v -p no:cacheprovider --timeout 150 -x -rs)   # -v: the log names each test that passed
# The GPU tests are bound by Triton compiling their ~90 specialisations, about 1.5 s each on one core
# (`python tools/compile_kernels.py --full` compiles 87 launches in ~136 s on the CPU machine), so they run
# in 4 processes when pytest-xdist is there (the device image has it).
if "$PY" -c "import xdist" 2>/dev/null; then TEST_ARGS+=(-n 4); fi

echo "== device"; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 \
    | tee "$OUT_DIR/device.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    | tee -a "$OUT_DIR/device.txt"

echo "== 1. kernel tests on the GPU"
timeout 180 "$PY" -m pytest "${TEST_ARGS[@]}" tests/test_kernels_attention.py tests/test_kernels_ops.py \
    tests/test_model_attention.py 2>&1 | tee "$OUT_DIR/tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== 2. attention benchmark (bf16, 64k tokens)"
timeout 150 "$PY" tools/bench_kernels.py --tokens 65536 --ops attention --csv "$OUT_DIR/bench_attention.csv" 2>&1 \
    | tee "$OUT_DIR/bench_attention.log"
attention_rc=${PIPESTATUS[0]}

echo "== 3. RoPE / GeGLU / RMSNorm benchmark (bf16, 64k tokens)"
timeout 90 "$PY" tools/bench_kernels.py --tokens 65536 --ops rope,geglu,rms_norm \
    --csv "$OUT_DIR/bench_elementwise.csv" 2>&1 | tee "$OUT_DIR/bench_elementwise.log"
elementwise_rc=${PIPESTATUS[0]}

echo "== 4. attention launch-settings sweep (S=8192)"
timeout 60 "$PY" tools/bench_kernels.py --tokens 65536 --ops none --attention-sweep --csv "$OUT_DIR/sweep.csv" \
    2>&1 | grep -E "sweep|device" | tee "$OUT_DIR/sweep.log"
sweep_rc=${PIPESTATUS[0]}

echo "== 5. Table 4/5 protocol (large preset, bf16)"
TPUT_TOK="$OUT_DIR/tok32k"
timeout 150 bash -c "\"$PY\" tools/train_tokenizer.py --input examples/data/demo_corpus.jsonl --vocab-size 32000 \
    --pad-vocab --output-dir '$TPUT_TOK' > '$OUT_DIR/throughput_tokenizer.log' 2>&1 && \
  \"$PY\" tools/bench_throughput.py --preset large --tokenizer '$TPUT_TOK' --input examples/data/demo_corpus.jsonl \
    --attention-backend flex triton --output-json '$OUT_DIR/throughput.json' --no-progress" 2>&1 \
    | tee "$OUT_DIR/throughput.log"
throughput_rc=${PIPESTATUS[0]}

echo "== done: tests rc=$tests_rc, attention rc=$attention_rc, elementwise rc=$elementwise_rc, sweep rc=$sweep_rc," \
    "throughput rc=$throughput_rc" \
    "(logs in $OUT_DIR; 124 = the step ran out of time)"
exit $(( tests_rc != 0 || attention_rc != 0 || elementwise_rc != 0 ))
