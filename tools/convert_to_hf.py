#!/usr/bin/env python3
"""Export a pretraining checkpoint as a Hugging Face model directory.

    python tools/convert_to_hf.py --load CKPT --output HF_DIR [--dtype bfloat16] [--sentence-transformers] [--onnx]

--load is a --save directory (its newest complete checkpoint) or one iter_N directory, saved at any TP size;
the model config, training flags and tokenizer come from the checkpoint itself. LayerNorm models become a
stock ModernBertForMaskedLM; RMSNorm models (the default presets) the same classes with RMSNorm as remote
code (load with trust_remote_code=True). HF_DIR gets model.safetensors, config.json (max_position_embeddings
= the trained --seq-length), the tokenizer and a model card. Before anything appears at HF_DIR the export is
loaded back and compared with our model on sample Chinese texts: the largest logit difference is printed and
above 1e-4 the tool fails and writes nothing.
"""
from __future__ import annotations

import sys
from typing import Optional

from megatron_cmbert.cli import ToolParser


def parse_args(argv: Optional[list[str]] = None):
    p = ToolParser(description=__doc__)
    p.add_argument("--load", required=True, help="checkpoint: a --save directory or one iter_N directory")
    p.add_argument("--output", required=True, help="the Hugging Face model directory to create")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the saved weights (default float32)")
    p.add_argument("--sentence-transformers", action="store_true",
                   help="also write sentence-transformers files (mean pooling, normalised) and check them")
    p.add_argument("--onnx", action="store_true",
                   help="also export onnx/model.onnx (the encoder, dynamic batch and length), checked with onnxruntime")
    p.add_argument("--force", action="store_true", help="replace --output if it exists (after the checks pass)")
    return p.parse_args(argv)


def run(argv: Optional[list[str]] = None):
    """The ExportReport (largest logit / embedding / ONNX differences)."""
    args = parse_args(argv)
    from megatron_cmbert.hf.export import export_checkpoint

    return export_checkpoint(args.load, args.output, dtype=args.dtype, onnx=args.onnx, force=args.force,
                             sentence_transformers=args.sentence_transformers)


def main(argv: Optional[list[str]] = None) -> int:
    from megatron_cmbert.cli import run_tool

    return run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
