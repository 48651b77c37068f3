"""Pure-PyTorch varlen attention: the reference every other backend is tested against.

Runs on CPU and GPU, supports autograd. One sequence at a time so memory is O(max_seqlen^2), not O(T^2); the
sequence bounds come from the plan's host-side lengths, so nothing reads the device. Matmuls run in the input
dtype and the softmax in fp32, like HF's eager attention; pass fp32/fp64 inputs for an exact reference.
"""
from __future__ import annotations

import torch

from megatron_cmbert.kernels.varlen import VarlenPlan, plan_from_cu_seqlens


def window_mask(length: int, window: tuple[int, int], device=None) -> torch.Tensor | None:
    """Bool (length, length) mask, True where query i may see key j: i - left <= j <= i + right.
    A negative bound is unbounded on that side; None when nothing is masked."""
    left, right = window
    if left < 0 and right < 0:
        return None
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    keep = torch.ones(length, length, dtype=torch.bool, device=device)
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return keep


def plan(layout, window=(-1, -1)) -> VarlenPlan:
    return VarlenPlan(layout, tuple(window))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: VarlenPlan,
           softmax_scale: float | None = None) -> torch.Tensor:
    """q, k, v: (total_tokens, heads, head_dim) -> (total_tokens, heads, head_dim). No attention crosses a
    sequence boundary; tokens of zero-length sequences do not exist, so every token gets its output."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    bounds = plan.layout.host_cu_seqlens().tolist()
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (heads, L, head_dim)
        scores = torch.matmul(qs, ks.transpose(-1, -2)).float() * scale
        keep = window_mask(end - start, plan.window, device=q.device)
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(vs.dtype)
        outputs.append(torch.matmul(probs, vs).transpose(0, 1))
    if not outputs:
        return q.new_zeros(q.shape)
    return torch.cat(outputs, dim=0)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                        max_seqlen: int | None = None, window: tuple[int, int] = (-1, -1),
                        softmax_scale: float | None = None) -> torch.Tensor:
    """The functional form (tests, benchmarks): plan from cu_seqlens (read once), then attend."""
    return attend(q, k, v, plan_from_cu_seqlens(plan, cu_seqlens, max_seqlen, window), softmax_scale)
