#!/usr/bin/env bash
# Stage II: context 1,024 -> 8,192 from the Stage I checkpoint (weights only), a smaller batch so tokens
# per update stay at 4.2M, and the paper's lower LR 1e-4 -> 5e-5.
#
#   NNODES=16 NODE_RANK=$i MASTER_ADDR=host0 DATA_DIR=/data/cmbert TOKENIZER=/data/cmbert/tok32k \
#   STAGE1=/ckpt/stage1 SAVE=/ckpt/stage2 bash examples/pretrain_stage2_8k.sh
#
# A rerun with the same SAVE resumes Stage II exactly (--load SAVE wins once SAVE has a checkpoint).
# Masking: the curriculum ended at 15% in Stage I; Stage II keeps 15% (the paper does not say otherwise).
cd "$(dirname "$0")/.."
. examples/common.sh

DATA_DIR=${DATA_DIR:?set DATA_DIR}; TOKENIZER=${TOKENIZER:?set TOKENIZER}
STAGE1=${STAGE1:?set STAGE1 to the Stage I checkpoint directory}; SAVE=${SAVE:?set SAVE}
TP=${TP:-2}                          # 8k-token samples: shard activations
MICRO_BATCH=${MICRO_BATCH:-2}
GLOBAL_BATCH=${GLOBAL_BATCH:-512}    # x 8,192 tokens = 4.2M tokens per update, as Stage I
TRAIN_ITERS=${TRAIN_ITERS:-20000}
check_layout "$TP" "$MICRO_BATCH" "$GLOBAL_BATCH"
need_int TRAIN_ITERS "$TRAIN_ITERS" 2
[[ -f "$STAGE1/latest_checkpointed_iteration.txt" ]] || die "no Stage I checkpoint in $STAGE1"
[[ -f "$TOKENIZER/tokenizer.json" ]] || die "no tokenizer.json in $TOKENIZER"

table1_mixture "$DATA_DIR"

if [[ -f "$SAVE/latest_checkpointed_iteration.txt" ]]; then
    LOAD_ARGS=(--load "$SAVE")                  # resume Stage II
else
    LOAD_ARGS=(--load "$STAGE1" --finetune)     # start Stage II from Stage I weights
fi
MODEL_ARGS=(--preset large --attention-backend auto --bf16)
PARALLEL_ARGS=(--tensor-model-parallel-size "$TP")
(( TP > 1 )) && PARALLEL_ARGS+=(--sequence-parallel)
DATA_ARGS=(
    --tokenizer-model "$TOKENIZER" --data-path "${MIXTURE[@]}" --split 998,2,0
    --seq-length 8192 --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
    --masking word --mask-schedule constant --mask-rate 0.15 --num-workers 2
)
OPTIMIZER_ARGS=(
    --lr 1e-4 --min-lr 5e-5 --lr-warmup-init 5e-5 --lr-warmup-iters "${WARMUP_ITERS:-200}"
    --lr-decay-style cosine --train-iters "$TRAIN_ITERS"
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
)
OUTPUT_ARGS=(
    --save "$SAVE" --save-interval 1000 --eval-interval 1000 --eval-iters 10 --log-interval 10
    --metrics-file "$SAVE/metrics.jsonl" --tensorboard-dir "$SAVE/tensorboard" --seed 4321
)

PRETRAIN_ARGS=("${LOAD_ARGS[@]}" "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${DATA_ARGS[@]}" "${OPTIMIZER_ARGS[@]}"
               "${OUTPUT_ARGS[@]}")
launch_pretrain
