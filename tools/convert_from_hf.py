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

import argparse
import sys
import warnings
from typing import Optional


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="Hugging Face model directory (safetensors weights)")
    p.add_argument("--save", required=True, help="checkpoint directory to create")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="TP size the checkpoint is meant for (vocabulary padding; default 1)")
    args = p.parse_args(argv)
    if args.tensor_model_parallel_size < 1:
        p.error("--tensor-model-parallel-size must be >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    # megatron-core calls a torch.distributed.checkpoint function that torch has deprecated: not about this run
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*is deprecated.*")
    from megatron_cmbert.hf.importer import import_hf
    from megatron_cmbert.hf.load import run_tool

    return run_tool(lambda: import_hf(args.hf, args.save, args.tensor_model_parallel_size))


if __name__ == "__main__":
    sys.exit(main())
