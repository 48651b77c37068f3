#!/usr/bin/env bash
# The main job on the bundled demo corpus, on a CPU: dedup -> tokenizer -> indexed dataset -> a look ->
# 2-process TP=2 pretraining of the tiny preset with a checkpoint -> resume -> more steps -> HF export.
# Outputs go to $OUT (default demo_run/; removed first so every run starts fresh).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
OUT=${OUT:-demo_run}
rm -rf "$OUT"
CORPUS=examples/data/demo_corpus.jsonl
export TOKENIZERS_PARALLELISM=false

echo; echo "== 1/7 near-duplicate removal (datatrove MinHash on the local executor, character 5-grams, Jaccard ~0.8)"
python tools/dedup_minhash.py --input "$CORPUS" --output-dir "$OUT/dedup" --tasks 2 --workers 2 --quiet

echo; echo "== 2/7 tokenizer (character BPE, size a multiple of 64)"
python tools/train_tokenizer.py --input "$OUT/dedup/demo_corpus.jsonl" --vocab-size 8192 \
    --limit-alphabet 4000 --output-dir "$OUT/tokenizer" --quiet

echo; echo "== 3/7 indexed dataset with whole-word metadata"
python tools/preprocess_data.py --input "$OUT/dedup/demo_corpus.jsonl" --json-keys text \
    --tokenizer-model "$OUT/tokenizer" --output-prefix "$OUT/data/demo" --workers 2

echo; echo "== 4/7 a look at two documents, whole-word units between bars"
python tools/inspect_dataset.py --data-prefix "$OUT/data/demo_text_document" \
    --tokenizer-model "$OUT/tokenizer" --doc 0 300 --max-tokens 80

# Pretraining: the tiny preset, TP=2 with sequence parallelism on 2 CPU processes (gloo).
PRETRAIN_ARGS=(
    --preset tiny --tensor-model-parallel-size 2 --sequence-parallel
    --tokenizer-model "$OUT/tokenizer" --data-path "$OUT/data/demo_text_document" --split 98,2,0
    --seq-length 128 --micro-batch-size 8 --global-batch-size 16
    --train-iters 60 --lr 2e-3 --min-lr 1e-4 --lr-warmup-iters 6 --lr-decay-style damped_cosine
    --mask-schedule dynamic --log-interval 10 --eval-interval 30 --eval-iters 2
    --save "$OUT/checkpoints" --save-interval 30 --metrics-file "$OUT/metrics.jsonl" --seed 1234
)
echo; echo "== 5/7 pretraining, first 30 of 60 steps (then a checkpoint and a stop)"
OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tools/pretrain.py "${PRETRAIN_ARGS[@]}" --exit-interval 30

echo; echo "== 6/7 resume from the checkpoint, steps 31-60"
OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tools/pretrain.py "${PRETRAIN_ARGS[@]}" --load "$OUT/checkpoints"

python - "$OUT/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if '"loss"' in line]
print(f"\nloss at step {rows[0]['step']}: {rows[0]['loss']:.3f} -> step {rows[-1]['step']}: {rows[-1]['loss']:.3f}"
      f" (masked-token accuracy {rows[-1]['accuracy']:.3f})")
PY
echo; echo "== 7/7 export to Hugging Face (TP=2 checkpoint -> remote-code ModernBERT), one fill-mask"
OMP_NUM_THREADS=1 python tools/convert_to_hf.py --load "$OUT/checkpoints" --output "$OUT/hf_model"
python - "$OUT/hf_model" <<'PY'
import sys
from transformers import pipeline
fill = pipeline("fill-mask", model=sys.argv[1], trust_remote_code=True, device="cpu")
text = "北京是中国的[MASK]都。"
print(f"fill-mask: {text}")
for r in fill(text, top_k=5):
    print(f"  {r['token_str']!r:8} {r['score']:.4f}  {r['sequence']}")
PY
echo "demo finished in ${SECONDS} s (setup included)"
