"""flash-attn 2 varlen backend (only importable where the `flash_attn` package is installed)."""
from __future__ import annotations

import torch
from flash_attn import flash_attn_varlen_func


def attention_flash_attn(q, k, v, cu_seqlens, max_seqlen, window=(-1, -1), softmax_scale=None):
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    return flash_attn_varlen_func(q, k, v, cu, cu, int(max_seqlen), int(max_seqlen), dropout_p=0.0,
                                  softmax_scale=softmax_scale, causal=False, window_size=tuple(window))
