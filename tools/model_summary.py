"""Parameter counts and layer pattern of a model preset, counted on a model built on the meta device
(no memory is allocated) and cross-checked against the arithmetic count.

    python tools/model_summary.py --preset large --vocab-size 32979 --json

`parameters` is embeddings + encoder without the MLM head and without vocabulary padding rows (the paper's
figure: 377.0M for the large preset at vocab 32,979, 9.0% of it in the embedding).
"""
from __future__ import annotations

import json
import sys

import torch

from megatron_cmbert.cli import ToolParser, run_tool


def parse_args(argv=None):
    parser = ToolParser(description=__doc__)
    parser.add_argument("--preset", default="large", help="tiny, base or large (default large)")
    parser.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocabulary size")
    parser.add_argument("--normalization", choices=("RMSNorm", "LayerNorm"), default=None,
                        help="override the preset's normalization")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser.parse_args(argv)


def summarize(config) -> dict:
    """Counts from a meta-device (single-process) model; raises if they disagree with count_parameters."""
    from megatron_cmbert.model import CMBertForMaskedLM, count_parameters

    with torch.device("meta"):
        model = CMBertForMaskedLM(config)
    encoder_and_embedding = sum(p.numel() for p in model.model.parameters())
    head = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("model."))
    padding_rows = model.model.embeddings.tok_embeddings.weight.shape[0] - config.vocab_size
    parameters = encoder_and_embedding - padding_rows * config.hidden_size
    embedding = config.vocab_size * config.hidden_size
    arithmetic = count_parameters(config)
    if (arithmetic.parameters, arithmetic.mlm_head, arithmetic.embedding) != (parameters, head, embedding):
        raise AssertionError(f"meta-device count {parameters} / head {head} disagrees with {arithmetic}")
    global_layers = [i for i in range(config.num_layers) if config.is_global_layer(i)]
    return {
        "preset": config.name,
        "parameters": parameters,
        "parameters_human": f"{parameters / 1e6:.1f}M",
        "embedding_parameters": embedding,
        "embedding_share": round(embedding / parameters, 4),
        "embedding_share_human": f"{100 * embedding / parameters:.1f}%",
        "mlm_head_parameters": head,
        "vocab_size": config.vocab_size,
        "padded_vocab_size": config.padded_vocab_size(),
        "vocab_padding_parameters": padding_rows * config.hidden_size,
        "layers": config.num_layers,
        "global_layers": len(global_layers),
        "global_layer_indices": global_layers,
        "local_layers": config.num_layers - len(global_layers),
        "hidden_size": config.hidden_size,
        "ffn_hidden_size": config.ffn_hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "local_attention": config.local_attention,
        "rope_theta": {"global": config.global_rope_theta, "local": config.local_rope_theta},
        "normalization": config.normalization,
    }


def run(argv=None) -> dict:
    """The summary printed."""
    args = parse_args(argv)
    from megatron_cmbert.model import get_preset

    overrides = {k: v for k, v in (("vocab_size", args.vocab_size), ("normalization", args.normalization))
                 if v is not None}
    summary = summarize(get_preset(args.preset, **overrides))
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:26s} {value}")
    return summary


def main(argv=None) -> int:
    return run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
