"""Data parallelism: torch DistributedDataParallel over the data-parallel group, with gradients SUMMED.

Why not a hand-written all-reduce after backward: DDP buckets the gradients and all-reduces each bucket
while backward is still computing the earlier layers, and `no_sync()` skips the communication on all but
the last micro-batch of a step. Why torch DDP and not megatron-core's: megatron-core's DDP allocates its
grad buffer with torch.cuda calls and cannot run on the CPU test machines; torch's runs on gloo and NCCL
and wraps megatron-core's tensor-parallel layers as they are (each TP rank's shards are reduced over the
ranks that hold the same shards: the DP group).

Why a sum: the trainer divides every micro-batch's loss by the predicted tokens of the whole global batch,
so the global gradient is the sum of the replicas' gradients; DDP's default (and torch's `allreduce_hook`)
divides by the group size, which would shrink every update by DP.
"""
import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def allreduce_sum_hook(group, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: all-reduce a gradient bucket, no division (torch's allreduce_hook minus its div_).
    DDP checks these annotations as objects: this module must not use `from __future__ import annotations`."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class LocalModule(nn.Module):
    """A data-parallel group of one rank: nothing to reduce, but the same `.module` / `.no_sync()` as DDP,
    so the loop has one code path."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def no_sync(self):
        return contextlib.nullcontext()


def data_parallel(model: nn.Module, group=None, bucket_cap_mb: float = 25) -> nn.Module:
    """Wrap `model` for data parallelism over `group` (default: the world).

    Returns an nn.Module with `.module` (the bare model: save and load checkpoints through it, so no
    `module.` prefix reaches them) and `.no_sync()` (a context manager: backward inside it accumulates
    locally; the first backward outside it reduces everything accumulated). Gradients are summed over the
    group. Every replica must start from the same weights (DDP broadcasts the group's first rank's anyway).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return LocalModule(model)
    device = next(model.parameters()).device
    ddp = DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None, process_group=group,
        bucket_cap_mb=bucket_cap_mb,
        broadcast_buffers=False)  # the one buffer (vocab-padding mask) never changes: no per-step copy
    ddp.register_comm_hook(group, allreduce_sum_hook)
    return ddp
