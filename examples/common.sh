# Shared checks for the multi-node launch scripts (sourced, not run). DRY_RUN=1 prints the command. Every value is checked before
# a single GPU-hour is spent: a typo should fail here, on the login node, not after the job starts.
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }
need_int() {  # name value min
    [[ "$2" =~ ^[0-9]+$ ]] || die "$1 must be a whole number, got '$2'"
    (( $2 >= $3 )) || die "$1 must be >= $3, got $2"
}
need_dataset() {  # PREFIX: both the token and the word-start datasets of tools/preprocess_data.py
    for f in "$1.idx" "$1.bin" "$1_wordstart.idx" "$1_wordstart.bin"; do
        [[ -f "$f" ]] || die "missing $f (build it with tools/preprocess_data.py)"
    done
}

# The cluster layout, from the environment (Slurm or by hand).
NNODES=${NNODES:-1}; NODE_RANK=${NODE_RANK:-0}; GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}; MASTER_PORT=${MASTER_PORT:-6000}
need_int NNODES "$NNODES" 1
need_int NODE_RANK "$NODE_RANK" 0
(( NODE_RANK < NNODES )) || die "NODE_RANK $NODE_RANK must be < NNODES $NNODES"
need_int GPUS_PER_NODE "$GPUS_PER_NODE" 1
need_int MASTER_PORT "$MASTER_PORT" 1
[[ -n "$MASTER_ADDR" ]] || die "MASTER_ADDR is empty"
WORLD_SIZE=$(( NNODES * GPUS_PER_NODE ))

check_layout() {  # TP MICRO_BATCH GLOBAL_BATCH
    need_int TP "$1" 1; need_int MICRO_BATCH "$2" 1; need_int GLOBAL_BATCH "$3" 1
    (( GPUS_PER_NODE % $1 == 0 )) || die "TP $1 must divide GPUS_PER_NODE $GPUS_PER_NODE (TP stays inside a node)"
    local dp=$(( WORLD_SIZE / $1 ))
    (( $3 % ($2 * dp) == 0 )) || die "GLOBAL_BATCH $3 must be a multiple of MICRO_BATCH $2 x data-parallel size $dp"
    echo "layout: $NNODES node(s) x $GPUS_PER_NODE GPUs = $WORLD_SIZE ranks; TP $1 x DP $dp;" \
         "$(( $3 / ($2 * dp) )) micro-batch(es) of $2 per rank per step"
}

# The paper's Table 1 mixture: weight, PREFIX (tools/preprocess_data.py --output-prefix + _text_document).
table1_mixture() {  # DATA_DIR -> sets MIXTURE and checks that every dataset exists
    MIXTURE=(
        0.03 "$1/baike_text_document"
        0.57 "$1/cci3_hq_text_document"
        0.10 "$1/cci4_fineweb_3_4_text_document"
        0.10 "$1/cci4_fineweb_4_5_text_document"
        0.20 "$1/cosmopedia_zh_text_document"
    )
    local i
    for (( i = 1; i < ${#MIXTURE[@]}; i += 2 )); do need_dataset "${MIXTURE[$i]}"; done
}

DISTRIBUTED_ARGS=(
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE"
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
)
# megatron-core's sequence-parallel overlap wants one CUDA connection per device.
export CUDA_DEVICE_MAX_CONNECTIONS=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# torchrun passes a SIGTERM on to its ranks, then kills them after this many seconds: long enough for the
# ranks to finish their step and save (tools/pretrain.py saves on SIGTERM and exits 0).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}

# tools/pretrain.py's own checks for the whole world first (a mistake is one line and exit 2, before
# torchrun's failure report could surround it), then torchrun. DRY_RUN=1 prints the torchrun command.
launch_pretrain() {  # runs tools/pretrain.py "${PRETRAIN_ARGS[@]}"
    if [[ -n "${DRY_RUN:-}" ]]; then
        echo torchrun "${DISTRIBUTED_ARGS[@]}" tools/pretrain.py "${PRETRAIN_ARGS[@]}"
        return
    fi
    WORLD_SIZE=$WORLD_SIZE python tools/pretrain.py --check-only "${PRETRAIN_ARGS[@]}" >/dev/null
    exec torchrun "${DISTRIBUTED_ARGS[@]}" tools/pretrain.py "${PRETRAIN_ARGS[@]}"
}
