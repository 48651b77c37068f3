#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on a CPU machine. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
python -m pytest -q --durations=15 "$@"
