"""Attention by backend name, outside a model (tests, benchmarks): the same registry a model uses.

    attention(q, k, v, cu_seqlens, max_seqlen, window=(left, right), softmax_scale=None, backend="auto")

q, k, v are packed: (total_tokens, heads, head_dim); sequence b owns tokens cu_seqlens[b]:cu_seqlens[b+1].
Query i sees key j of the same sequence when i - left <= j <= i + right; window (-1, -1) is global.
A model calls its own `KernelSet` (kernels/registry.py) instead, chosen when it is built.
"""
from __future__ import annotations

import torch

from megatron_cmbert.kernels.registry import backends, kernel
from megatron_cmbert.kernels.varlen import PackedLayout

BACKENDS = backends("attention")


def check_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one (tokens, heads, head_dim) shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if int(cu_seqlens[-1]) != q.shape[0]:
        raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but there are {q.shape[0]} tokens")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
              window: tuple[int, int] = (-1, -1), softmax_scale: float | None = None,
              backend: str = "auto") -> torch.Tensor:
    """Varlen (packed) self-attention; returns (total_tokens, heads, head_dim). See the module docstring."""
    check_packed(q, k, v, cu_seqlens)
    entry = kernel("attention", backend, q.device, q.dtype)
    plan = entry.load_plan()(PackedLayout.from_cu_seqlens(cu_seqlens, max_seqlen), tuple(window))
    return entry.load()(q, k, v, plan, softmax_scale=softmax_scale)
