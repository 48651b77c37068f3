"""FlexAttention backend: one document + sliding-window block mask over the packed tokens.

Meant for GPUs (compiled). On CPU with torch 2.13 the forward runs (uncompiled), the backward raises, so the
registry marks it CUDA-only. The block mask is the plan: built once per micro-batch and window from the
host-side lengths, shared by every layer with that window.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from megatron_cmbert.kernels.varlen import plan_from_cu_seqlens


@dataclass(frozen=True, eq=False)
class FlexPlan:
    block_mask: BlockMask
    window: tuple[int, int]


def plan(layout, window=(-1, -1)) -> FlexPlan:
    document = torch.from_numpy(np.repeat(np.arange(layout.num_seqs, dtype=np.int32), layout.lengths))
    document = document.to(layout.device)
    left, right = window

    def mask_mod(batch, head, q_idx, kv_idx):
        keep = document[q_idx] == document[kv_idx]
        if left >= 0:
            keep = keep & (kv_idx >= q_idx - left)
        if right >= 0:
            keep = keep & (kv_idx <= q_idx + right)
        return keep

    total = layout.total
    return FlexPlan(create_block_mask(mask_mod, None, None, total, total, device=layout.device), tuple(window))


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def attend(q, k, v, plan: FlexPlan, softmax_scale=None):
    run = _compiled_flex() if q.is_cuda else flex_attention
    # flex wants (batch, heads, tokens, head_dim); the packed tokens form one batch row.
    out = run(*(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), block_mask=plan.block_mask, scale=softmax_scale)
    return out.squeeze(0).transpose(0, 1)


def attention_flex(q, k, v, cu_seqlens, max_seqlen=None, window=(-1, -1), softmax_scale=None):
    return attend(q, k, v, plan_from_cu_seqlens(plan, cu_seqlens, max_seqlen, window), softmax_scale)
