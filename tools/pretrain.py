#!/usr/bin/env python3
"""Pretrain Chinese ModernBERT with whole-word masking: TP x DP on megatron-core, launched by torchrun.

    torchrun --nproc_per_node 2 tools/pretrain.py --preset tiny --tensor-model-parallel-size 2 \\
        --tokenizer-model tok --data-path data/corpus_text_document --split 98,2,0 \\
        --seq-length 256 --micro-batch-size 4 --global-batch-size 8 --train-iters 100 \\
        --lr 8e-4 --lr-warmup-iters 10 --save ckpt --save-interval 50

A plain `python tools/pretrain.py ...` runs as a world of one process. --load resumes exactly (same
losses as an uninterrupted run); --finetune --load loads weights only (Stage II: --seq-length 8192).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Optional

from megatron_cmbert.training.schedules import ScheduleConfig, add_schedule_args


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="tiny", help="model preset: tiny, base, large (default tiny)")
    g.add_argument("--normalization", choices=("RMSNorm", "LayerNorm"), default=None,
                   help="override the preset (LayerNorm exports to the stock HF class)")
    g.add_argument("--transformer-impl", choices=("local", "transformer_engine"), default="local",
                   help="linear layers: megatron-core local or Transformer Engine (default local)")
    g.add_argument("--attention-backend", default=None,
                   help="reference, flex, flash_attn, triton or auto (default: $CMBERT_ATTN_BACKEND or auto)")
    g = p.add_argument_group("parallelism and precision")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size (default 1); DP = world / TP")
    g.add_argument("--sequence-parallel", action="store_true", help="shard activations between TP ranks")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast, fp32 master weights and optimizer")
    g = p.add_argument_group("data")
    g.add_argument("--tokenizer-model", required=True, help="tokenizer directory (tools/train_tokenizer.py)")
    g.add_argument("--data-path", nargs="+", required=True,
                   help="PREFIX_text_document, or weight/prefix pairs: 0.57 A 0.43 B (Megatron style)")
    g.add_argument("--split", default="98,2,0", help="train,valid,test shares of each dataset (default 98,2,0)")
    g.add_argument("--seq-length", type=int, default=1024, help="tokens per packed sample (default 1024)")
    g.add_argument("--micro-batch-size", type=int, default=4, help="samples per micro-batch (default 4)")
    g.add_argument("--global-batch-size", type=int, default=32,
                   help="samples per optimizer step, all DP ranks and accumulation together (default 32)")
    g.add_argument("--masking", choices=("word", "token"), default="word", help="whole-word or token masking")
    g.add_argument("--mask-prob", type=float, default=0.8, help="share of selected tokens -> [MASK] (default 0.8)")
    g.add_argument("--random-prob", type=float, default=0.1, help="share -> random token (default 0.1)")
    g.add_argument("--eval-mask-rate", type=float, default=0.15, help="fixed masking rate of validation")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    add_schedule_args(p)
    g = p.add_argument_group("optimizer (StableAdamW)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="decoupled weight decay (default 0.1)")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-6)
    g.add_argument("--clip-grad", type=float, default=1.0, help="global grad-norm clip (default 1.0)")
    g.add_argument("--skip-nan-steps", action="store_true", help="skip a step with non-finite loss/grad instead of stopping")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--save-interval", type=int, default=0, help="save every N steps (and at the end)")
    g.add_argument("--load", default=None, help="resume from this directory's latest checkpoint")
    g.add_argument("--finetune", action="store_true", help="with --load: weights only (new stage)")
    g.add_argument("--exit-interval", type=int, default=0,
                   help="stop (after saving, with --save) once the step is a multiple of N")
    g.add_argument("--log-interval", type=int, default=10, help="log every N steps (default 10)")
    g.add_argument("--eval-interval", type=int, default=0, help="validation loss every N steps (0: never)")
    g.add_argument("--eval-iters", type=int, default=2, help="global batches per validation (default 2)")
    g.add_argument("--metrics-file", default=None, help="append one JSON object per logged step")
    g.add_argument("--tensorboard-dir", default=None, help="TensorBoard event directory (if installed)")
    g.add_argument("--seed", type=int, default=1234, help="fixes initialisation, data order and masks")
    args = p.parse_args(argv)
    if args.finetune and not args.load:
        p.error("--finetune needs --load")
    if args.global_batch_size % args.micro_batch_size:
        p.error("--global-batch-size must be a multiple of --micro-batch-size")
    try:
        ScheduleConfig.from_args(args)
    except ValueError as exc:
        p.error(str(exc))
    return args


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: Optional[list[str]] = None) -> list[dict]:
    args = parse_args(argv)
    # Third-party notices that say nothing about this run: optional TE/apex absent, torch's own
    # deprecations inside megatron-core and torch.distributed, and a GPU-only tuning hint.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*is deprecated.*")
    if not _cuda_available():
        warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    import torch

    from megatron_cmbert.data.tokenizer import load_tokenizer
    from megatron_cmbert.model import get_preset
    from megatron_cmbert.training.trainer import Trainer

    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    overrides = {"vocab_size": load_tokenizer(args.tokenizer_model).get_vocab_size()}
    if args.normalization:
        overrides["normalization"] = args.normalization
    config = get_preset(args.preset, **overrides)
    if args.seq_length > config.max_position_embeddings:
        raise SystemExit(f"error: --seq-length {args.seq_length} exceeds the preset's "
                         f"{config.max_position_embeddings} positions")
    trainer = Trainer(args, config)
    history = trainer.run()
    torch.distributed.destroy_process_group()
    return history


if __name__ == "__main__":
    main()
    sys.exit(0)
