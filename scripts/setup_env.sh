# Sourced by scripts/demo.sh and scripts/test.sh: creates (or reuses) a virtualenv and installs the
# project with pinned, CPU-friendly dependencies. Safe to run again: it only installs what is missing.
#   PYTHON=python3.11 VENV=.venv TORCH_SPEC="torch==2.13.0" can be overridden from the environment.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# An unpinned torch pulls a multi-GB CUDA build; this pin is the CPU build on our CPU machines.
# Elsewhere, a CPU wheel comes from: pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "[setup] installing $TORCH_SPEC and megatron_cmbert[test] (editable, builds the C++ helpers)"
# shellcheck disable=SC2086  # TORCH_SPEC may carry extra pip options (e.g. --index-url)
python -m pip install -q $TORCH_SPEC
python -m pip install -q -e ".[test]"
python -W ignore -c "import torch, megatron.core, megatron_cmbert.data.helpers as h; \
print(f'[setup] torch {torch.__version__}, megatron-core {megatron.core.__version__}, C++ helpers built: {h.HAVE_CPP}')"
