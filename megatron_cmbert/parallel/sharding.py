"""Moving between a tensor-parallel model and its full (TP=1, logical) tensors, and the grad reduction that
sequence parallelism needs.

Every TP-split parameter is a contiguous slice of its full tensor along `partition_dim` (megatron-core's
`tensor_model_parallel` / `partition_dim` attributes, stride 1): the model's fused layouts are chosen so
(see model/modernbert.py). Replicated parameters are identical on every rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def is_tensor_parallel(param) -> bool:
    """Whether `param` is split over tensor-parallel ranks (megatron-core marks it `tensor_model_parallel`)."""
    return bool(getattr(param, "tensor_model_parallel", False))


def _tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def gather_full(shard: torch.Tensor, param) -> torch.Tensor:
    """All-gather a shard (a parameter or its grad) of `param` into the full tensor; identity if replicated."""
    if not is_tensor_parallel(param):
        return shard
    group = _tp_group()
    pieces = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, shard.contiguous(), group=group)
    return torch.cat(pieces, dim=param.partition_dim)


def shard_of(full: torch.Tensor, param) -> torch.Tensor:
    """This rank's slice of a full tensor, shaped like `param`."""
    if not is_tensor_parallel(param):
        return full
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    size = param.shape[param.partition_dim]
    return full.narrow(param.partition_dim, rank * size, size)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Full parameters by name (collective: every TP rank must call it)."""
    return {name: gather_full(p.detach(), p) for name, p in model.named_parameters()}


def full_grads(model) -> dict[str, torch.Tensor]:
    """Full gradients by name (collective); None entries for parameters without a grad."""
    return {name: None if p.grad is None else gather_full(p.grad, p) for name, p in model.named_parameters()}


@torch.no_grad()
def load_full_state_dict(model, state_dict: dict[str, torch.Tensor]):
    """Copy full tensors (e.g. from a TP=1 model or model.hf_keymap.from_hf) into this rank's shards."""
    params = dict(model.named_parameters())
    missing, unexpected = set(params) - set(state_dict), set(state_dict) - set(params)
    if missing or unexpected:
        raise KeyError(f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    for name, param in params.items():
        param.copy_(shard_of(state_dict[name], param))


def allreduce_sequence_parallel_grads(model):
    """Sum over TP the grads of weights that only saw this rank's token shard (norms under sequence
    parallelism, marked `sequence_parallel=True`). One coalesced all-reduce; call after backward."""
    grads = [p.grad for p in model.parameters() if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=_tp_group())
    for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(reduced)
