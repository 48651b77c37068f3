#!/usr/bin/env bash
# Stage I: the paper's large model at 1,024 tokens, Table 1 data mixture, whole-word masking with the
# dynamic curriculum (15% -> 30% in warmup, 30% -> 15% after), StableAdamW, damped-cosine LR 5e-5 -> 8e-4.
#
#   NNODES=16 NODE_RANK=$i MASTER_ADDR=host0 GPUS_PER_NODE=8 DATA_DIR=/data/cmbert \
#   TOKENIZER=/data/cmbert/tok32k SAVE=/ckpt/stage1 bash examples/pretrain_stage1_1k.sh
#
# Paper values: model, mixture, betas, weight decay, clip, LR warmup 5e-5 -> 8e-4, masking curriculum,
# ~1.2T tokens over both stages. Our choices (the paper does not state them; override by environment):
# batch, warmup length, cycles N, damping, min LR, TP, and how the tokens split between the stages.
#
# Length: 4,096 x 1,024 = 4,194,304 tokens per step in both stages (Stage II: 512 x 8,192), so
#   Stage I  266,000 steps x 4,194,304 = 1.1157e12 tokens
#   Stage II  20,000 steps x 4,194,304 = 0.0839e12 tokens   (examples/pretrain_stage2_8k.sh)
#   total                               = 1.1996e12 ~= the paper's 1.2T
#
# A rerun with the same SAVE resumes (it passes --load SAVE only once SAVE holds a checkpoint; a first
# run must not pass --load). SIGTERM makes the ranks save and exit 0 (see examples/slurm_pretrain.sbatch).
cd "$(dirname "$0")/.."
. examples/common.sh

DATA_DIR=${DATA_DIR:?set DATA_DIR to the folder of the preprocessed datasets}
TOKENIZER=${TOKENIZER:?set TOKENIZER to the tokenizer directory}
SAVE=${SAVE:?set SAVE to the checkpoint directory}
TP=${TP:-1}                            # 1 fits the 377M model on one H100; 2 halves activations
MICRO_BATCH=${MICRO_BATCH:-16}
GLOBAL_BATCH=${GLOBAL_BATCH:-4096}     # x 1,024 tokens = 4.2M tokens per update; divides 16 nodes x 8 GPUs
TRAIN_ITERS=${TRAIN_ITERS:-266000}     # see the token arithmetic above
WARMUP_ITERS=${WARMUP_ITERS:-3000}
check_layout "$TP" "$MICRO_BATCH" "$GLOBAL_BATCH"
need_int TRAIN_ITERS "$TRAIN_ITERS" 1; need_int WARMUP_ITERS "$WARMUP_ITERS" 0
(( WARMUP_ITERS < TRAIN_ITERS )) || die "WARMUP_ITERS must be < TRAIN_ITERS"
[[ -f "$TOKENIZER/tokenizer.json" ]] || die "no tokenizer.json in $TOKENIZER"

table1_mixture "$DATA_DIR"

if [[ -f "$SAVE/latest_checkpointed_iteration.txt" ]]; then
    LOAD_ARGS=(--load "$SAVE")                  # resume Stage I
else
    LOAD_ARGS=()                                # a new run (tools/pretrain.py refuses --load of an empty dir)
fi

MODEL_ARGS=(--preset large --attention-backend auto --bf16)
PARALLEL_ARGS=(--tensor-model-parallel-size "$TP")
(( TP > 1 )) && PARALLEL_ARGS+=(--sequence-parallel)
DATA_ARGS=(
    --tokenizer-model "$TOKENIZER" --data-path "${MIXTURE[@]}" --split 998,2,0
    --seq-length 1024 --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
    --masking word --mask-schedule dynamic --mask-rate-min 0.15 --mask-rate-max 0.30 --num-workers 2
)
OPTIMIZER_ARGS=(
    --lr 8e-4 --lr-warmup-init 5e-5 --lr-warmup-iters "$WARMUP_ITERS" --min-lr 1e-5
    --lr-decay-style damped_cosine --cycles "${CYCLES:-3}" --damping "${DAMPING:-0.5}"
    --train-iters "$TRAIN_ITERS" --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
)
OUTPUT_ARGS=(
    --save "$SAVE" --save-interval 2000 --eval-interval 2000 --eval-iters 10
    --log-interval 20 --metrics-file "$SAVE/metrics.jsonl" --tensorboard-dir "$SAVE/tensorboard" --seed 1234
)

PRETRAIN_ARGS=("${LOAD_ARGS[@]}" "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${DATA_ARGS[@]}" "${OPTIMIZER_ARGS[@]}"
               "${OUTPUT_ARGS[@]}")
launch_pretrain
