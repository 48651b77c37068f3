"""FlexAttention backend: one document + sliding-window block mask over the packed tokens.

Meant for GPUs (compiled). On CPU with torch 2.13 the forward runs (uncompiled), the backward raises, so the
registry marks it CUDA-only. The block mask is the plan: built once per micro-batch and window and shared by
every layer with that window. Its block tables are made on the host from the lengths (kernels/block_plan.py:
which keys each block of 128 queries reaches, and which key blocks every one of its queries sees), so
nothing evaluates the mask over tokens x tokens (create_block_mask) and nothing reads the device; all eight
tables go to the device in one non-blocking copy. Their shapes depend only on the token count, and the
mask function reads the window and the token positions from tensors, so under a fixed token budget one
compiled flex kernel serves every micro-batch and both windows.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from megatron_cmbert.kernels.block_plan import block_ranges, token_key_bounds
from megatron_cmbert.kernels.varlen import PackedLayout, plan_from_cu_seqlens

BLOCK = 128  # flex's default sparse block (its kernels tile within it)


@dataclass(frozen=True, eq=False)
class FlexPlan:
    block_mask: BlockMask
    window: tuple[int, int]


def block_tables(lengths, window, total: int, block: int = BLOCK) -> tuple[np.ndarray, ...]:
    """The eight BlockMask tables, int32: (kv_num, kv_indices, full_kv_num, full_kv_indices) per query block,
    then (q_num, q_indices, full_q_num, full_q_indices) per key block (what flex's backward walks), shapes
    (n,) and (n, n) with n = cdiv(total, block). Partial blocks get the mask function per token, full ones
    (every query sees every key) none; in each row the chosen blocks come first, in order, as BlockMask
    wants. The key-block side is the transpose, computed here too rather than by BlockMask.from_kv_blocks on
    the device (a vmap and two argsorts per plan)."""
    lo, hi = token_key_bounds(lengths, window)
    ranges = block_ranges(lo, hi, block)  # per query block: [lo, hi, full_lo, full_hi] in tokens
    n = ranges.shape[0]
    first, last = ranges[:, 0] // block, (ranges[:, 1] - 1) // block  # key blocks holding some visited key
    full_first = -(-ranges[:, 2] // block)
    full_end = np.maximum(ranges[:, 3] // block, full_first)  # key blocks wholly inside [full_lo, full_hi)
    if total % block:  # the last query block has padding rows: let the mask function see it whole
        full_end[-1] = full_first[-1]
    cols = np.arange(n)[None, :]
    visited = (cols >= first[:, None]) & (cols <= last[:, None])
    full = (cols >= full_first[:, None]) & (cols < full_end[:, None])
    partial = visited & ~full
    tables = []
    for chosen in (partial, full, partial.T, full.T):
        tables.append(chosen.sum(1).astype(np.int32))
        tables.append(np.argsort(~chosen, axis=1, kind="stable").astype(np.int32))  # chosen blocks first, in order
    return tuple(tables)


def _mask_mod(positions: torch.Tensor, window: torch.Tensor):
    """Same sequence (equal start = index - position) and inside the window; window = (left, right) as a
    tensor (an unbounded side as the token count), so that every plan's function is the same code reading
    other tensors, which torch.compile treats as inputs rather than constants to recompile for."""
    def mask_mod(batch, head, q_idx, kv_idx):
        same = (q_idx - positions[q_idx]) == (kv_idx - positions[kv_idx])
        offset = kv_idx - q_idx
        return same & (offset >= -window[0]) & (offset <= window[1])
    return mask_mod


def plan(layout: PackedLayout, window=(-1, -1)) -> FlexPlan:
    window = tuple(int(w) for w in window)
    total = layout.total
    tables = block_tables(layout.lengths, window, total)
    bounded = np.array([w if w >= 0 else total for w in window], dtype=np.int32)
    parts = [*tables, bounded]
    host = torch.from_numpy(np.concatenate([p.reshape(-1) for p in parts]))
    if layout.device.type == "cuda":
        host = host.pin_memory()
    flat = host.to(layout.device, non_blocking=True)  # one copy, no sync
    views, offset = [], 0
    for p in parts:
        views.append(flat[offset:offset + p.size].view(p.shape))
        offset += p.size
    tables = [t.view(1, 1, *t.shape) for t in views[:8]]
    # The constructor's positional form, the same in torch 2.11 (the GPU image) and 2.13.
    block_mask = BlockMask((total, total), *tables, (BLOCK, BLOCK), _mask_mod(layout.positions, views[8]))
    return FlexPlan(block_mask, window)


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
