#!/usr/bin/env python3
"""Turn a Hugging Face ModernBERT into a pretraining checkpoint, to continue pretraining from it.

    python tools/convert_from_hf.py --hf HF_DIR --save CKPT --tensor-model-parallel-size 2
    torchrun --nproc_per_node 2 tools/pretrain.py --load CKPT --finetune --tensor-model-parallel-size 2 ...

HF_DIR is a stock ModernBertForMaskedLM directory (config.json + *.safetensors + tokenizer; any size: its
config becomes our model config) or a tools/convert_to_hf.py export (RMSNorm ones too). CKPT gets
iter_0000000 (weights only: --finetune starts a fresh optimizer), its config.json and the tokenizer.
--tensor-model-parallel-size sets the vocabulary padding of the embedding (a multiple of 128 and of N);
the checkpoint loads at any TP size whose padding is the same (every N dividing 128).
"""
from __future__ import annotations

import sys
from typing import Optional

from megatron_cmbert.cli import ToolParser


def parse_args(argv: Optional[list[str]] = None):
    p = ToolParser(description=__doc__)
    p.add_argument("--hf", required=True, help="Hugging Face model directory (safetensors weights)")
    p.add_argument("--save", required=True, help="checkpoint directory to create")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="TP size the checkpoint is meant for (vocabulary padding; default 1)")
    args = p.parse_args(argv)
    if args.tensor_model_parallel_size < 1:
        p.error("--tensor-model-parallel-size must be >= 1")
    return args


def run(argv: Optional[list[str]] = None) -> str:
    """The checkpoint path written."""
    args = parse_args(argv)
    from megatron_cmbert.hf.importer import import_hf

    return import_hf(args.hf, args.save, args.tensor_model_parallel_size)


def main(argv: Optional[list[str]] = None) -> int:
    from megatron_cmbert.cli import run_tool

    return run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
