#!/usr/bin/env bash
# One prepared GPU check for the Triton kernels and the model's speed. Each step has its own time limit, so a
# slow step cannot starve the next one:
#   1. the kernel tests, compiled on the GPU (no interpreter), 4 processes      <= 180 s
#   2. the attention benchmark (bf16, 64k tokens; 8k cases first)               <= 150 s
#   3. the RoPE / GeGLU / RMSNorm benchmark (bf16, 64k tokens)                  <=  90 s
#   4. the attention launch-settings sweep at S=8192 (which defaults to keep)   <=  60 s
#   5. the paper's Table 4/5 protocol: the large preset (random weights; speed does not depend on them), bf16,
#      <=8,192 chars at batch 8 and <=512 at batch 32, 10 timed runs, on the bundled demo corpus with a 32k
#      tokenizer trained on it first; one row per attention backend             <= 150 s
#   6. training throughput of tools/pretrain.py (tools/bench_train.py): large preset, bf16, 32k tokens per
#      step, tokens/s and MFU at 1,024 and 8,192 (10 warm-up + 20 timed steps each) on the demo corpus
#      indexed with step 5's tokenizer (trained here if step 5 did not run)     <= 330 s
#      Needs megatron-core, psutil and rjieba: the cp312 wheels carried in .device/wheels are installed
#      first (pip --no-deps) when megatron-core is missing. TRAIN_ARGS adds bench_train.py flags
#      (TRAIN_ARGS=--smoke: the plumbing on a CPU machine in a minute).
# Run from the repo root on the device machine:   bash tools/gpu_check.sh
# One device command may run 600 s at most, so run it as two:   STEPS="1 2 3 4" bash tools/gpu_check.sh
# then   STEPS="5 6" bash tools/gpu_check.sh   (same $OUT for both).
# Outputs go under $OUT when set: device.txt, tests.log, bench_*.log, bench_*.csv (rows are written as they
# are timed, to *.csv.partial until a step completes), sweep.log, sweep.csv, throughput.*, train.*.
# Needs torch, triton, pytest and pytest-timeout (the device image has all four).
# Every launch was compiled for sm_90a beforehand on a CPU machine (python tools/compile_kernels.py), so a
# failure here is about numbers or speed, not about the kernels compiling.
set -uo pipefail
OUT_DIR="${OUT:-/tmp/gpu_check}"
STEPS="${STEPS:-1 2 3 4 5 6}"
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
want() { [[ " $STEPS " == *" $1 "* ]]; }
tests_rc=- attention_rc=- elementwise_rc=- sweep_rc=- throughput_rc=- train_rc=-
TPUT_TOK="$OUT_DIR/tok32k"
tokenizer() {   # the 32k tokenizer of steps 5 and 6, trained once on the demo corpus
    [ -f "$TPUT_TOK/tokenizer.json" ] || "$PY" tools/train_tokenizer.py --input examples/data/demo_corpus.jsonl \
        --vocab-size 32000 --pad-vocab --output-dir "$TPUT_TOK" > "$OUT_DIR/throughput_tokenizer.log" 2>&1
}

echo "== device (steps $STEPS)"; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem \
    --format=csv 2>&1 | tee -a "$OUT_DIR/device.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
                                      torch.cuda.get_device_name())" | tee -a "$OUT_DIR/device.txt"

if want 1; then
    echo "== 1. kernel tests on the GPU"
    timeout 180 "$PY" -m pytest "${TEST_ARGS[@]}" tests/test_kernels_attention.py tests/test_kernels_ops.py \
        tests/test_model_attention.py 2>&1 | tee "$OUT_DIR/tests.log"
    tests_rc=${PIPESTATUS[0]}
fi

if want 2; then
    echo "== 2. attention benchmark (bf16, 64k tokens)"
    timeout 150 "$PY" tools/bench_kernels.py --tokens 65536 --ops attention --csv "$OUT_DIR/bench_attention.csv" \
        2>&1 | tee "$OUT_DIR/bench_attention.log"
    attention_rc=${PIPESTATUS[0]}
fi

if want 3; then
    echo "== 3. RoPE / GeGLU / RMSNorm benchmark (bf16, 64k tokens)"
    timeout 90 "$PY" tools/bench_kernels.py --tokens 65536 --ops rope,geglu,rms_norm \
        --csv "$OUT_DIR/bench_elementwise.csv" 2>&1 | tee "$OUT_DIR/bench_elementwise.log"
    elementwise_rc=${PIPESTATUS[0]}
fi

if want 4; then
    echo "== 4. attention launch-settings sweep (S=8192)"
    timeout 60 "$PY" tools/bench_kernels.py --tokens 65536 --ops none --attention-sweep --csv "$OUT_DIR/sweep.csv" \
        2>&1 | grep -E "sweep|device" | tee "$OUT_DIR/sweep.log"
    sweep_rc=${PIPESTATUS[0]}
fi

if want 5; then
    echo "== 5. Table 4/5 protocol (large preset, bf16)"
    export -f tokenizer; export PY TPUT_TOK OUT_DIR
    timeout 150 bash -c "tokenizer && \"$PY\" tools/bench_throughput.py --preset large --tokenizer '$TPUT_TOK' \
        --input examples/data/demo_corpus.jsonl --attention-backend flex triton \
        --output-json '$OUT_DIR/throughput.json' --no-progress" 2>&1 | tee "$OUT_DIR/throughput.log"
    throughput_rc=${PIPESTATUS[0]}
fi

if want 6; then
    echo "== 6. training throughput (large preset, bf16, seq 1024 and 8192)"
    if ! "$PY" -c "import megatron.core" 2>/dev/null && compgen -G ".device/wheels/*.whl" >/dev/null; then
        "$PY" -m pip install --no-deps -q .device/wheels/*.whl 2>&1 | tail -2
    fi
    export -f tokenizer; export PY TPUT_TOK OUT_DIR
    timeout 330 bash -c "tokenizer && \"$PY\" tools/preprocess_data.py --input examples/data/demo_corpus.jsonl \
        --tokenizer-model '$TPUT_TOK' --output-prefix '$OUT_DIR/train_data/demo' --quiet \
        > '$OUT_DIR/train_preprocess.log' 2>&1 && \"$PY\" tools/bench_train.py --tokenizer-model '$TPUT_TOK' \
        --data-path '$OUT_DIR/train_data/demo_text_document' --bf16 --timeout 140 \
        --output-json '$OUT_DIR/train.json' ${TRAIN_ARGS:-}" 2>&1 | tee "$OUT_DIR/train.log"
    train_rc=${PIPESTATUS[0]}
fi

echo "== done (steps $STEPS): tests rc=$tests_rc, attention rc=$attention_rc, elementwise rc=$elementwise_rc," \
    "sweep rc=$sweep_rc, throughput rc=$throughput_rc, training rc=$train_rc" \
    "(logs in $OUT_DIR; 124 = the step ran out of time; - = not run)"
failed=0
for rc in "$tests_rc" "$attention_rc" "$elementwise_rc" "$throughput_rc" "$train_rc"; do
    [ "$rc" = - ] || [ "$rc" = 0 ] || failed=1
done
exit $failed
