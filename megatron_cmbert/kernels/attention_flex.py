"""FlexAttention backend: one document + sliding-window block mask over the packed tokens.

Meant for GPUs (compiled). On CPU with torch 2.13 the forward runs (uncompiled), the backward raises, so the
dispatcher only picks it automatically on CUDA. Imported lazily by kernels.attention.
"""
from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

# Block masks are costly to build and every layer of a step shares the same few (cu_seqlens, window).
_MASK_CACHE_SIZE = 8


@functools.lru_cache(maxsize=_MASK_CACHE_SIZE)
def _block_mask(bounds: tuple[int, ...], window: tuple[int, int], device: str):
    lengths = torch.tensor([e - s for s, e in zip(bounds[:-1], bounds[1:])], device=device)
    document = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    left, right = window

    def mask_mod(batch, head, q_idx, kv_idx):
        keep = document[q_idx] == document[kv_idx]
        if left >= 0:
            keep = keep & (kv_idx >= q_idx - left)
        if right >= 0:
            keep = keep & (kv_idx <= q_idx + right)
        return keep

    total = bounds[-1]
    return create_block_mask(mask_mod, None, None, total, total, device=device)


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def attention_flex(q, k, v, cu_seqlens, max_seqlen=None, window=(-1, -1), softmax_scale=None):
    block_mask = _block_mask(tuple(cu_seqlens.tolist()), tuple(window), str(q.device))
    run = _compiled_flex() if q.is_cuda else flex_attention
    # flex wants (batch, heads, tokens, head_dim); the packed tokens form one batch row.
    out = run(*(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), block_mask=block_mask, scale=softmax_scale)
    return out.squeeze(0).transpose(0, 1)
