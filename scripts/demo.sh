#!/usr/bin/env bash
# The main job on the bundled demo corpus, on a CPU: dedup -> tokenizer -> indexed dataset -> a look.
# Outputs go to $OUT (default demo_run/). Later issues extend this to pretraining and HF export.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
OUT=${OUT:-demo_run}
CORPUS=examples/data/demo_corpus.jsonl
export TOKENIZERS_PARALLELISM=false

echo; echo "== 1/4 near-duplicate removal (MinHash, Jaccard >= 0.8)"
python tools/dedup_minhash.py --input "$CORPUS" --output-dir "$OUT/dedup" --no-progress

echo; echo "== 2/4 tokenizer (character BPE, size a multiple of 64)"
python tools/train_tokenizer.py --input "$OUT/dedup/demo_corpus.jsonl" --vocab-size 8192 \
    --limit-alphabet 4000 --output-dir "$OUT/tokenizer" --quiet

echo; echo "== 3/4 indexed dataset with whole-word metadata"
python tools/preprocess_data.py --input "$OUT/dedup/demo_corpus.jsonl" --json-keys text \
    --tokenizer-model "$OUT/tokenizer" --output-prefix "$OUT/data/demo" --workers 2

echo; echo "== 4/4 a look at two documents, whole-word units between bars"
python tools/inspect_dataset.py --data-prefix "$OUT/data/demo_text_document" \
    --tokenizer-model "$OUT/tokenizer" --doc 0 300 --max-tokens 80
