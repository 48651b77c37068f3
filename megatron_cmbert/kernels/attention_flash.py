"""flash-attn 2 varlen backend (only importable where the `flash_attn` package is installed)."""
from __future__ import annotations

import torch
from flash_attn import flash_attn_varlen_func

from megatron_cmbert.kernels.varlen import VarlenPlan, plan_from_cu_seqlens


def plan(layout, window=(-1, -1)) -> VarlenPlan:
    return VarlenPlan(layout, tuple(window))


def attend(q, k, v, plan: VarlenPlan, softmax_scale=None):
    cu, max_seqlen = plan.layout.cu_seqlens.to(device=q.device, dtype=torch.int32), plan.layout.max_seqlen
    return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=0.0,
                                  softmax_scale=softmax_scale, causal=False, window_size=plan.window)


def attention_flash_attn(q, k, v, cu_seqlens, max_seqlen, window=(-1, -1), softmax_scale=None):
    return attend(q, k, v, plan_from_cu_seqlens(plan, cu_seqlens, max_seqlen, window), softmax_scale)
