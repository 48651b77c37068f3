#!/usr/bin/env bash
# The GPU image's Python stack on a CPU machine (a developer's check before a GPU session; CI does not run it):
# Python 3.12, torch 2.11.0, triton 3.6.0, the carried cp312 wheels installed as tools/gpu_check.sh installs
# them, then the Triton interpreter tests, the sm_90a compile check with Triton 3.6, the gpu_check.sh tests and
# the smoke benchmarks (kernels, training throughput, Table 4) in that environment.
#
#   bash tools/gpu_image_env.sh [VENV_DIR]      # default /tmp/cmbert-gpu-image; reuses an existing one
#   PYTHON312=/path/to/python3.12 bash tools/gpu_image_env.sh
#
# Versions and why (the image's versions and the carried wheels: docs/BENCHMARKS.md, "The GPU image and the
# carried wheels"; pyenv's 3.12 here may be another 3.12.x):
#   - torch 2.11.0: PyPI has it for cp312 x86_64 only as the CUDA 13 build (the +cpu build is on another index,
#     not reachable from here), which pulls ~3.5 GB of nvidia-* wheels. It imports and runs on a machine without
#     a GPU (torch.cuda.is_available() is False), so that build is used: ~5 GB in VENV_DIR, a few minutes.
#   - triton 3.6.0: torch 2.11.0's own pin.
#   - numpy < 2.4: Triton 3.6's interpreter turns a loop bound (a 1-element array) into an int with int(), which
#     numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"), so under the
#     interpreter every kernel with a runtime-bound loop (attention, RoPE, RMSNorm backward) fails with numpy
#     2.5.2, the image's. The GPU never runs the interpreter, so the image needs no change; the kernel files
#     probe for the problem at import (triton_common.interpreter_loop_problem) and name this fix.
# Exit status: non-zero when any step failed; the last line sums them up. Logs in VENV_DIR/logs.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
VENV="${1:-/tmp/cmbert-gpu-image}"
# The carried cp312 wheels (megatron-core, psutil, rjieba, torch-optimi; docs/BENCHMARKS.md): by default in
# shared/wheels beside the main checkout, WHEELS=DIR for another folder.
MAIN_ROOT="$(dirname "$(git rev-parse --path-format=absolute --git-common-dir 2>/dev/null || echo "$PWD/.git")")"
WHEELS="${WHEELS:-$MAIN_ROOT/../shared/wheels}"
LOGS="$VENV/logs"
# The first python3.12 that runs: a pyenv shim is on PATH even where pyenv's global version is another one.
PY312="${PYTHON312:-}"
if [ -z "$PY312" ]; then
    for cand in $(command -v python3.12) "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
        if [ -x "$cand" ] && "$cand" -c "import sys" >/dev/null 2>&1; then PY312=$cand; break; fi
    done
fi
[ -n "$PY312" ] && "$PY312" -c "import sys" >/dev/null 2>&1 \
    || { echo "error: no working python3.12 (set PYTHON312=...; pyenv install 3.12)" >&2; exit 2; }

if [ ! -x "$VENV/bin/python" ]; then
    "$PY312" -m venv "$VENV" || exit 1
fi
PY="$VENV/bin/python"
mkdir -p "$LOGS"
echo "== installing into $VENV (torch's CUDA build from PyPI is ~5 GB the first time)"
"$PY" -m pip install -q --disable-pip-version-check torch==2.11.0 triton==3.6.0 "numpy<2.4" tokenizers==0.23.2 \
    transformers==5.17.0 tqdm pytest pytest-timeout > "$LOGS/pip.log" 2>&1 || { tail -5 "$LOGS/pip.log"; exit 1; }
SITE="$VENV/carried-wheels"
if compgen -G "$WHEELS/*.whl" >/dev/null; then   # as gpu_check.sh does on the device: --target, no deps
    "$PY" -m pip install -q --no-deps --no-index --no-compile --upgrade --target "$SITE" "$WHEELS"/*.whl \
        > "$LOGS/wheels.log" 2>&1 || { tail -5 "$LOGS/wheels.log"; exit 1; }
    echo "== carried wheels from $WHEELS: $(cd "$WHEELS" && ls *.whl | tr '\n' ' ')"
else
    echo "== no carried wheels in $WHEELS (set WHEELS=...): the training smoke steps need megatron-core and rjieba"
fi
export PYTHONPATH="$PWD:$SITE" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
"$PY" -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__,
           'triton', triton.__version__, 'numpy', numpy.__version__)" | tee "$LOGS/versions.txt"

declare -a NAMES RCS
step() {   # name, command...: output to $LOGS/name.log, last lines shown
    local name=$1; shift
    echo "== $name: $*"
    "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    tail -3 "$LOGS/$name.log" | sed 's/^/   /'
    NAMES+=("$name"); RCS+=("$rc")
}
WORK="$VENV/work"
mkdir -p "$WORK"
step interpreter_tests env TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider -rs \
    tests/test_kernels_attention.py tests/test_kernels_ops.py tests/test_kernels_bench.py tests/test_kernels_flex.py \
    tests/test_kernels_block_plan.py tests/test_kernels_validation.py tests/test_kernels_modes.py tests/test_model_attention.py \
    tests/test_gpu_check.py
step compile_tests env -u TRITON_INTERPRET "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_compile.py
step compile_kernels env -u TRITON_INTERPRET "$PY" tools/compile_kernels.py
step bench_kernels_smoke env TRITON_INTERPRET=1 "$PY" tools/bench_kernels.py --smoke --csv "$WORK/bench_smoke.csv"
step tokenizer "$PY" tools/train_tokenizer.py --input examples/data/demo_corpus.jsonl --vocab-size 1024 --pad-vocab \
    --output-dir "$WORK/tok"
step preprocess "$PY" tools/preprocess_data.py --input examples/data/demo_corpus.jsonl --tokenizer-model "$WORK/tok" \
    --output-prefix "$WORK/data/demo" --quiet
step bench_train_smoke "$PY" tools/bench_train.py --smoke --tokenizer-model "$WORK/tok" \
    --data-path "$WORK/data/demo_text_document" --output-json "$WORK/train_smoke.json"
step bench_throughput_smoke "$PY" tools/bench_throughput.py --smoke --preset tiny --tokenizer "$WORK/tok" \
    --input examples/data/demo_corpus.jsonl --kernels reference --output-json "$WORK/throughput_smoke.json" \
    --no-progress

failed=0 line=""
for i in "${!NAMES[@]}"; do line+=" ${NAMES[$i]}=${RCS[$i]}"; [ "${RCS[$i]}" = 0 ] || failed=1; done
echo "== done ($(cat "$LOGS/versions.txt")):$line (logs in $LOGS)"
exit $failed
