"""One forward + backward of a model preset on random packed documents, at any tensor-parallel layout.

    torchrun --standalone --nproc_per_node 2 tools/smoke_model.py --preset tiny --tensor-model-parallel-size 2
    python tools/smoke_model.py --preset tiny                      # single process, plain PyTorch

Prints one JSON line (rank 0) with the loss, the global grad norm and timings. On CPU it uses gloo and one
thread per rank; on GPUs nccl.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

from megatron_cmbert.cli import ToolParser, run_tool
from megatron_cmbert.errors import ToolFailure, UserError


def parse_args(argv=None):
    parser = ToolParser(description=__doc__)
    parser.add_argument("--preset", default="tiny", help="model preset: tiny, base or large (default tiny)")
    parser.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocabulary size")
    parser.add_argument("--normalization", choices=("RMSNorm", "LayerNorm"), default=None,
                        help="override the preset's normalization")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1,
                        help="TP size; the world size must be a multiple of it (default 1)")
    parser.add_argument("--sequence-parallel", action="store_true", help="shard tokens between TP ranks")
    parser.add_argument("--transformer-impl", choices=("local", "transformer_engine"), default="local",
                        help="linear layers: megatron-core local or Transformer Engine (default local)")
    from megatron_cmbert.kernels.registry import add_kernel_args

    add_kernel_args(parser)
    parser.add_argument("--documents", type=int, default=8, help="documents packed into the micro-batch")
    parser.add_argument("--max-length", type=int, default=64, help="longest document in tokens")
    parser.add_argument("--seed", type=int, default=1234)
    return parser.parse_args(argv)


def run(argv=None) -> dict:
    """The JSON line's fields (every rank computes them; rank 0 prints)."""
    args = parse_args(argv)
    from megatron_cmbert.model import IGNORE_INDEX, get_preset
    from megatron_cmbert.model.padding import pack_sequences
    from megatron_cmbert.parallel.layer_spec import build_masked_lm
    from megatron_cmbert.parallel.sharding import allreduce_sequence_parallel_grads
    from megatron_cmbert.training.optimizer import clip_grad_norm

    overrides = {k: v for k, v in (("vocab_size", args.vocab_size), ("normalization", args.normalization),
                                   ("kernels", args.kernels)) if v is not None}
    try:
        config = get_preset(args.preset, **overrides)
    except ValueError as error:  # a field value or kernel name (an unknown preset is a UserError already)
        raise UserError(str(error)) from None
    distributed = "WORLD_SIZE" in os.environ
    tp = args.tensor_model_parallel_size
    device = torch.device("cpu")
    if distributed:
        import torch.distributed as dist
        from megatron.core import parallel_state

        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        rank = dist.get_rank()
    elif tp != 1:
        raise UserError(f"--tensor-model-parallel-size {tp} needs {tp} processes: launch with torchrun")
    else:
        rank = 0

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model = build_masked_lm(config, transformer_impl=args.transformer_impl,
                            sequence_parallel=args.sequence_parallel).to(device)
    built = time.perf_counter()

    # Every rank draws the same documents (same seed): TP ranks must see the same tokens.
    generator = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(1, args.max_length + 1, (args.documents,), generator=generator).tolist()
    docs = [torch.randint(0, config.vocab_size, (n,), generator=generator) for n in lengths]
    tokens, cu_seqlens, max_seqlen = pack_sequences(docs, pad_to_multiple_of=tp)
    labels = torch.full_like(tokens, IGNORE_INDEX)
    chosen = torch.rand(sum(lengths), generator=generator) < 0.3
    labels[: sum(lengths)][chosen] = tokens[: sum(lengths)][chosen]

    out = model(tokens.to(device), cu_seqlens.to(device), max_seqlen, labels=labels.to(device))
    out.loss.backward()
    if distributed:
        allreduce_sequence_parallel_grads(model)
    done = time.perf_counter()

    # Global grad norm, TP-split grads summed over ranks and replicated ones counted once; an infinite
    # max_norm only measures.
    tp_group = parallel_state.get_tensor_model_parallel_group() if distributed and tp > 1 else None
    grad_norm = clip_grad_norm(model.parameters(), float("inf"), tp_group).item()
    if not (torch.isfinite(out.loss) and grad_norm == grad_norm and grad_norm > 0):
        raise ToolFailure(f"bad step: loss {out.loss.item()}, grad norm {grad_norm}")
    result = {"preset": config.name, "tensor_model_parallel_size": tp, "sequence_parallel": args.sequence_parallel,
              "tokens": int(tokens.numel()), "predicted": out.num_predicted, "loss": round(out.loss.item(), 6),
              "grad_norm": round(grad_norm, 6), "build_s": round(built - start, 3), "step_s": round(done - built, 3)}
    if rank == 0:
        print(json.dumps(result), flush=True)
    if distributed:
        torch.distributed.destroy_process_group()
    return result


def main(argv=None) -> int:
    return run_tool(run, argv)


if __name__ == "__main__":
    sys.exit(main())
