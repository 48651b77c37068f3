#!/usr/bin/env bash
# The one prepared GPU check: the kernel tests compiled on the GPU, then the figures, in two device commands
# of at most 5 minutes each. A GPU is lent rarely and briefly (15 minutes per session, machine start
# included, at most 10 minutes per command), so this script must not waste it:
#   - a preflight of at most 30 s runs first and stops the script with one line naming what is missing
#     (GPU, C compiler, Python.h, a Triton launch, a torch.compile'd function, the carried wheels, the Python
#     packages the chosen steps import) before any benchmark starts; without a GPU it stops at once;
#   - every step has a time limit, and the command a deadline (DEADLINE_S, 290 s per --part): a step that
#     would not fit is reported as not run instead of overrunning the device call;
#   - every step's exit code is counted (steps.tsv, the summary line, the script's own exit status); each
#     benchmark exits non-zero when the rows it exists for fail, and writes its rows as it goes.
#
#   bash tools/gpu_check.sh --dry-run     the plan: steps, budgets, the two device commands, what to carry
#   bash tools/gpu_check.sh --part 1      device command 1: tests, training throughput, attention vs Flex
#   bash tools/gpu_check.sh --part 2      device command 2: Table 4, training with --compile, elementwise
#   STEPS="tests attention" bash tools/gpu_check.sh    chosen steps (names or numbers), in value order
#   bash tools/gpu_check.sh               both parts in one command (<= 580 s: fits one 600 s device call)
#
# Outputs under $OUT (the device tool's folder; /tmp/gpu_check elsewhere), at most 8 files per command as
# the device tool returns: gpu_check.log (everything printed), steps.tsv, gpu_validation.json (when the
# kernel tests passed: the record that lets `auto` pick the Triton kernels on this GPU, docs/KERNELS.md),
# and each step's CSV / JSON. Scratch (tokenizer, dataset, installed wheels) goes to $GPU_CHECK_WORK.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
SCRIPT="tools/gpu_check.sh"
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-/tmp/gpu_check}"
WORK="${GPU_CHECK_WORK:-/tmp/gpu_check_work}"
WHEELS="${WHEELS:-.device/wheels}"
PREFLIGHT_S=30
SKIP_RC=77   # a step body's "cannot run this here" (a tool lacks a flag): reported, not counted as a failure

# ---- the steps, in the order of their value ------------------------------------------------------------
ORDER=(tests train attention table4 train_compile elementwise sweep attention_equal)
declare -A BUDGET=([tests]=85 [train]=115 [attention]=60 [table4]=100 [train_compile]=120 [elementwise]=40
                   [sweep]=45 [attention_equal]=45)
declare -A PART=([tests]=1 [train]=1 [attention]=1 [table4]=2 [train_compile]=2 [elementwise]=2 [sweep]=extra
                 [attention_equal]=extra)
declare -A ABOUT=(
    [tests]="kernel tests compiled on the GPU (Triton attention, RoPE/GeGLU/RMSNorm, work items, auto; then Flex and the model's backends); writes gpu_validation.json when the Triton ones pass"
    [train]="training tokens/s and MFU, large preset bf16, seq 1024 and 8192, kernels triton and reference (tools/bench_train.py)"
    [attention]="attention vs FlexAttention on packed demo-corpus micro-batches at 8192 and 1024, global and +-64 (tools/bench_kernels.py)"
    [table4]="the paper's Table 4/5, large preset bf16, kernels reference, triton, triton+flex (tools/bench_throughput.py)"
    [train_compile]="training throughput with --compile, kernels triton (tools/bench_train.py --compile)"
    [elementwise]="RoPE / GeGLU / RMSNorm vs eager PyTorch, no inductor baselines (tools/bench_kernels.py)"
    [sweep]="Triton attention launch settings vs the defaults on the packed 8k micro-batch"
    [attention_equal]="attention vs FlexAttention at equal lengths 8192 and 1024")
declare -A OUTPUTS=([tests]="gpu_validation.json" [train]="train.json" [attention]="attention.csv"
                    [table4]="throughput.json" [train_compile]="train_compile.json" [elementwise]="elementwise.csv"
                    [sweep]="sweep.csv" [attention_equal]="attention_equal.csv")

usage() { sed -n '2,/^set -uo/p' "$SCRIPT" | grep '^#' | sed 's/^# \{0,1\}//'; }

steps_of_part() {
    local part=$1 name out=()
    for name in "${ORDER[@]}"; do [ "${PART[$name]}" = "$part" ] && out+=("$name"); done
    echo "${out[*]}"
}

resolve_steps() {   # names or 1-based numbers of ORDER -> names, in ORDER's order
    local want=" $* " name i out=()
    for i in "${!ORDER[@]}"; do
        name=${ORDER[$i]}
        if [[ $want == *" $name "* || $want == *" $((i + 1)) "* ]]; then out+=("$name"); fi
    done
    for w in $*; do
        if [[ ! " ${ORDER[*]} " == *" $w "* ]] && ! [[ $w =~ ^[0-9]+$ && $w -ge 1 && $w -le ${#ORDER[@]} ]]; then
            echo "error: unknown step '$w'; steps: ${ORDER[*]} (or 1-${#ORDER[@]})" >&2; exit 2
        fi
    done
    echo "${out[*]}"
}

sum_budgets() { local s=0 n; for n in $*; do s=$((s + BUDGET[$n])); done; echo $s; }

dry_run() {
    local p1 p2
    p1=$(steps_of_part 1); p2=$(steps_of_part 2)
    echo "gpu_check.sh plan (nothing is run)"
    printf '\n%-3s %-16s %-6s %7s  %-20s %s\n' "#" step part "limit" output what
    local i name
    for i in "${!ORDER[@]}"; do
        name=${ORDER[$i]}
        printf '%-3s %-16s %-6s %6ss  %-20s %s\n' "$((i + 1))" "$name" "${PART[$name]}" "${BUDGET[$name]}" \
            "${OUTPUTS[$name]}" "${ABOUT[$name]}"
    done
    echo
    echo "Each command: preflight <= ${PREFLIGHT_S} s, then its steps, under a deadline of 290 s (a step that would"
    echo "not fit is reported 'not run (deadline)'); its steps' limits add up to:"
    echo "  --part 1: ${PREFLIGHT_S} + $(sum_budgets $p1) = $((PREFLIGHT_S + $(sum_budgets $p1))) s   ($p1)"
    echo "  --part 2: ${PREFLIGHT_S} + $(sum_budgets $p2) = $((PREFLIGHT_S + $(sum_budgets $p2))) s   ($p2)"
    echo "  extra steps (STEPS=...): sweep, attention_equal"
    echo
    echo "Before the GPU session's device calls, on the developer machine, in the checkout the session was started in"
    echo "(the device tool sends that checkout; this branch must be in it):"
    echo "  mkdir -p .device && cp -r ../shared/wheels .device/wheels     # megatron-core, psutil, rjieba (cp312)"
    echo "  (.device/ is in .gitignore: it travels only when carried; 6.5 MB of the 64 MiB a call may send)"
    echo
    echo "The two device calls (tool 'run'; each at most 5 minutes, 600 s allowed):"
    echo "  run(command=\"bash tools/gpu_check.sh --part 1\", carry=[\".device\"], timeout_s=300)"
    echo "  run(command=\"bash tools/gpu_check.sh --part 2\", carry=[\".device\"], timeout_s=300)"
    echo "  then give_back. Device time: ~1-2 min machine start + 2 x <= 290 s + idle: within the 15 minutes."
    echo
    echo "After: files come back under the tool's files_at folder (gpu_check.log, steps.tsv, the step outputs)."
    echo "  python -m megatron_cmbert.kernels.validation add FILES_AT/gpu_validation.json   # auto may pick Triton"
    echo "  then docs/BENCHMARKS.md 'Measured on <GPU>' from the logs; commit both."
}

# ---- arguments ------------------------------------------------------------------------------------------
DRY=0 PART_ARG="" BODY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --part) PART_ARG="${2:-}"; shift ;;
        --step-body) BODY="${2:-}"; shift ;;   # internal: one step's commands, run under `timeout`
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ -n "$PART_ARG" ] && [ "$PART_ARG" != 1 ] && [ "$PART_ARG" != 2 ]; then
    echo "error: --part takes 1 or 2" >&2; exit 2
fi
if [ -n "${STEPS:-}" ]; then SELECTED=$(resolve_steps $STEPS) || exit 2
elif [ -n "$PART_ARG" ]; then SELECTED=$(steps_of_part "$PART_ARG")
else SELECTED="$(steps_of_part 1) $(steps_of_part 2)"; fi
if [ -n "$PART_ARG" ] || [ -n "${STEPS:-}" ]; then DEADLINE_S="${DEADLINE_S:-290}"; else DEADLINE_S="${DEADLINE_S:-580}"; fi
[ "$DRY" = 1 ] && { dry_run; exit 0; }

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # no install, so the C++ extension is never built
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TRITON_INTERPRET=0                            # compiled kernels on the GPU (tests default to 1 on CPU)
TOK="$WORK/tok32k"
DATA="$WORK/train_data/demo"

has_flag() { "$PY" "$1" --help 2>/dev/null | grep -qE -- "^ +$2([ ,=]|\$)"; }   # an option, not prose
tokenizer() {   # the 32k tokenizer of Table 4 and the training steps, trained once on the demo corpus
    [ -f "$TOK/tokenizer.json" ] || "$PY" tools/train_tokenizer.py --input examples/data/demo_corpus.jsonl \
        --vocab-size 32000 --pad-vocab --output-dir "$TOK" > "$WORK/tokenizer.log" 2>&1 \
        || { tail -5 "$WORK/tokenizer.log"; return 1; }
}
dataset() {
    [ -f "${DATA}_text_document.idx" ] || "$PY" tools/preprocess_data.py --input examples/data/demo_corpus.jsonl \
        --tokenizer-model "$TOK" --output-prefix "$DATA" --quiet > "$WORK/preprocess.log" 2>&1 \
        || { tail -5 "$WORK/preprocess.log"; return 1; }
}
bench_train() {   # training rows for the kernel settings "$@" (tools/bench_train.py, one process per run)
    local out=$1 extra=$2; shift 2
    local common=(tools/bench_train.py --tokenizer-model "$TOK" --data-path "${DATA}_text_document" --bf16
                  --warmup-steps 5 --timed-steps 10 --timeout 55)
    if has_flag tools/bench_train.py --kernels; then
        "$PY" "${common[@]}" $extra --kernels "$@" --output-json "$OUT_DIR/$out.json" ${TRAIN_ARGS:-}
        return
    fi
    local spec rc=0   # bench_train without --kernels: one run per setting, the kernels passed to pretrain.py
    for spec in "$@"; do
        "$PY" "${common[@]}" $extra --output-json "$OUT_DIR/${out}_${spec//[^a-z]/_}.json" ${TRAIN_ARGS:-} \
            -- --kernels "$spec" || rc=$?
    done
    return $rc
}

# ---- step bodies (run as `bash gpu_check.sh --step-body NAME` under timeout) ---------------------------------
step_body() {
    case "$1" in
    tests)
        # The Triton kernels' tests first: their pass writes the validation record even if the Flex and model
        # tests after them (compiled FlexAttention takes its own compile time) are cut by the step's limit.
        local args=(-p no:cacheprovider -q -rfEs --timeout 60 --durations=5) rc
        "$PY" -c "import xdist" 2>/dev/null && args+=(-n 8)   # Triton compiles dominate: one per process
        "$PY" -m pytest "${args[@]}" tests/test_kernels_attention.py tests/test_kernels_ops.py \
            tests/test_kernels_block_plan.py tests/test_kernels_validation.py 2>&1 | tee "$WORK/tests.out"
        rc=${PIPESTATUS[0]}
        [ "$rc" = 0 ] && "$PY" -m megatron_cmbert.kernels.validation write "$OUT_DIR/gpu_validation.json" \
            --evidence "tools/gpu_check.sh tests: $(tail -1 "$WORK/tests.out" | tr -d '=')"
        "$PY" -m pytest "${args[@]}" tests/test_kernels_flex.py tests/test_model_attention.py
        local rc2=$?
        [ "$rc" = 0 ] && rc=$rc2
        return "$rc" ;;
    train)
        tokenizer && dataset && bench_train train "" triton reference ;;   # Triton's rows first: the step may be cut
    train_compile)
        has_flag tools/bench_train.py --compile || { echo "skipped: tools/bench_train.py has no --compile yet"; return $SKIP_RC; }
        tokenizer && dataset && bench_train train_compile "--compile on" triton ;;
    attention)
        "$PY" tools/bench_kernels.py --ops attention --cases packed --seq-lengths 8192 1024 --impls triton,flex \
            --tokens 65536 --csv "$OUT_DIR/attention.csv" ;;
    attention_equal)
        "$PY" tools/bench_kernels.py --ops attention --cases equal --seq-lengths 8192 1024 --impls triton,flex \
            --tokens 65536 --csv "$OUT_DIR/attention_equal.csv" ;;
    table4)
        tokenizer && "$PY" tools/bench_throughput.py --preset large --tokenizer "$TOK" \
            --input examples/data/demo_corpus.jsonl --kernels reference triton triton,attention=flex \
            --output-json "$OUT_DIR/throughput.json" --no-progress ;;
    elementwise)
        "$PY" tools/bench_kernels.py --ops rope,geglu,rms_norm --no-compile --tokens 65536 \
            --csv "$OUT_DIR/elementwise.csv" ;;
    sweep)
        "$PY" tools/bench_kernels.py --ops none --attention-sweep --tokens 65536 --csv "$OUT_DIR/sweep.csv" ;;
    *) echo "unknown step $1"; return 2 ;;
    esac
}
if [ -n "$BODY" ]; then step_body "$BODY"; exit $?; fi

# ---- preflight -------------------------------------------------------------------------------------------
mkdir -p "$OUT_DIR" "$WORK"
LOG="$OUT_DIR/gpu_check.log"
TSV="$OUT_DIR/steps.tsv"
START=$SECONDS
say() { echo "$*" | tee -a "$LOG"; }
NOTES=""
note() { echo "$*" >> "$LOG"; NOTES+="$*"$'\n'; }   # preflight progress: printed once it has passed
fail_preflight() { say "preflight: $*"; printf 'preflight\t1\t%s\t%s\n' $((SECONDS - START)) "$PREFLIGHT_S" >> "$TSV"; exit 1; }
left() { echo $(( PREFLIGHT_S - (SECONDS - START) )); }
printf 'step\trc\tseconds\tlimit\n' > "$TSV"
HEADER="== gpu_check.sh $(date -u +%FT%TZ): steps: $SELECTED (deadline ${DEADLINE_S} s)"
echo "$HEADER" >> "$LOG"   # on stdout once the preflight passed: a failing preflight prints one line

command -v nvidia-smi >/dev/null || fail_preflight "nvidia-smi: not found (no NVIDIA driver: this machine has no GPU to check)"
smi=$(timeout 10 nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.sm --format=csv,noheader 2>&1) \
    || fail_preflight "nvidia-smi: $(echo "$smi" | head -1)"
[ -n "$smi" ] || fail_preflight "nvidia-smi: lists no GPU"
note "gpu: $smi"
command -v "$PY" >/dev/null || fail_preflight "$PY: not found (set PYTHON=...)"

needs=(torch triton numpy megatron_cmbert)
[[ " $SELECTED " == *" tests "* ]] && needs+=(pytest pytest_timeout)
[[ " $SELECTED " == *train* || " $SELECTED " == *table4* ]] && needs+=(tokenizers tqdm)
[[ " $SELECTED " == *train* ]] && needs+=(megatron.core psutil rjieba)
[[ " $SELECTED " == *table4* ]] && needs+=(transformers)   # Table 4 wraps our tokenizer as a fast HF one
if compgen -G "$WHEELS/*.whl" >/dev/null; then   # into a folder of our own: no system-wide pip
    pip_log=$(timeout "$(left)" "$PY" -m pip install -q --no-deps --no-index --no-compile --no-cache-dir \
        --disable-pip-version-check --upgrade --target "$WORK/site" "$WHEELS"/*.whl 2>&1) \
        || fail_preflight "wheels: pip install --target $WORK/site failed: $(echo "$pip_log" | grep -v '^ *$' | tail -1)"
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
    note "wheels: installed $(ls "$WHEELS"/*.whl | wc -l) from $WHEELS into $WORK/site"
fi
cat > "$WORK/preflight.py" <<'EOF'
"""One line per failure; checks in order, the first failure ends it. argv: modules the chosen steps import."""
import importlib, os, sys, sysconfig, shutil
progress = os.environ["PREFLIGHT_PROGRESS"]

def check(name):
    open(progress, "w").write(name)

def fail(name, reason):
    print(f"preflight: {name}: {reason}".replace("\n", " ")[:400])
    sys.exit(1)

check("torch CUDA")
import torch
if not torch.cuda.is_available():
    fail("torch CUDA", f"torch {torch.__version__} sees no CUDA device")
check("python packages")
for module in sys.argv[1:]:
    try:
        importlib.import_module(module)
    except Exception as error:
        hint = " (carry the wheels: see tools/gpu_check.sh --dry-run)" if module in ("megatron.core", "psutil", "rjieba") else ""
        fail(f"import {module}", f"{type(error).__name__}: {error}{hint}")
import triton
check("C compiler")
cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
if not cc:
    fail("C compiler", "none of $CC, cc, gcc, clang found (Triton builds its launcher on this machine)")
header = os.path.join(sysconfig.get_paths()["include"], "Python.h")
if not os.path.isfile(header):
    fail("Python.h", f"{header} missing (Triton's launcher build needs the Python headers)")
check("Triton launch")
import triton.language as tl

@triton.jit
def _add_one(X, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs, mask=offs < n) + 1, mask=offs < n)

try:
    x = torch.zeros(100, device="cuda")
    _add_one[(1,)](x, 100, BLOCK=128)
    torch.cuda.synchronize()
    assert torch.equal(x, torch.ones_like(x)), "wrong result"
except Exception as error:
    fail("Triton launch", f"{type(error).__name__}: {error}")
check("torch.compile on CUDA")
try:
    y = torch.compile(lambda t: torch.sin(t) * 2 + 1)(torch.zeros(64, device="cuda"))
    torch.cuda.synchronize()
    assert torch.allclose(y, torch.ones_like(y)), "wrong result"
except Exception as error:
    fail("torch.compile on CUDA", f"{type(error).__name__}: {error}")
print(f"preflight ok: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}), "
      f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, cc {cc}")
EOF
export PREFLIGHT_PROGRESS="$WORK/preflight.progress"
: > "$PREFLIGHT_PROGRESS"
budget=$(left)
(( budget > 0 )) || fail_preflight "out of time before the Python checks (${PREFLIGHT_S} s limit)"
report=$(timeout -k 5 "$budget" "$PY" "$WORK/preflight.py" "${needs[@]}" 2>"$WORK/preflight.err"); rc=$?
if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then fail_preflight "$(cat "$PREFLIGHT_PROGRESS"): timed out (the preflight has ${PREFLIGHT_S} s)"; fi
if [ $rc -ne 0 ]; then
    [ -n "$report" ] || report="preflight: $(cat "$PREFLIGHT_PROGRESS"): $(grep -v '^ *$' "$WORK/preflight.err" | tail -1)"
    fail_preflight "${report#preflight: }"
fi
echo "$HEADER"
printf '%s' "$NOTES"
say "$report ($((SECONDS - START)) s)"
printf 'preflight\t0\t%s\t%s\n' $((SECONDS - START)) "$PREFLIGHT_S" >> "$TSV"

# ---- the steps -------------------------------------------------------------------------------------------
declare -A RC
run_step() {
    local name=$1 left limit t0 rc
    left=$(( DEADLINE_S - (SECONDS - START) - 5 ))
    limit=$(( BUDGET[$name] < left ? BUDGET[$name] : left ))
    if (( limit < 20 )); then
        say "== $name: not run (deadline: ${left} s left of this command's ${DEADLINE_S} s)"
        RC[$name]=deadline; printf '%s\tdeadline\t0\t%s\n' "$name" "${BUDGET[$name]}" >> "$TSV"; return
    fi
    say "== $name (limit ${limit} s): ${ABOUT[$name]}"
    t0=$SECONDS
    timeout -k 10 "$limit" bash "$SCRIPT" --step-body "$name" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    [ "$rc" = "$SKIP_RC" ] && rc=skip
    RC[$name]=$rc
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - t0)) "$limit" >> "$TSV"
    say "== $name: rc=$rc in $((SECONDS - t0)) s$( [ "$rc" = 124 ] && echo ' (ran out of time: its rows so far are kept)')"
}
for name in $SELECTED; do run_step "$name"; done

failed=0 summary=""
for name in $SELECTED; do
    summary+=" $name=${RC[$name]}"
    case "${RC[$name]}" in 0|skip) ;; *) failed=1 ;; esac
done
say "== done in $((SECONDS - START)) s:$summary (124 = out of time, skip = the tool lacks the flag; outputs in $OUT_DIR)"
exit $failed
