"""Pure-PyTorch varlen attention: the reference every other backend is tested against, and the CPU path.

Runs on CPU and GPU with autograd, through torch's `scaled_dot_product_attention` (on CPU its fused kernel:
softmax in fp32, nothing of size L^2 saved for backward). No attention crosses a sequence boundary. The plan,
made once per micro-batch and window from the layout's host-side lengths, lays the packed batch out in one
of two ways, whichever computes fewer query-key pairs (both exact; docs/KERNELS.md, issue 22):

- `documents`: consecutive sequences of equal length form runs; each run is a (count, length) view of the
  packed tensor (no copy) and one SDPA call. Several runs are cut apart by one `split` (its backward
  concatenates the gradients once, where slicing per document zero-filled a full-size gradient per
  document). A window is one band mask per plan, of the longest length; a run uses its top-left corner.
- `blocks` (sliding windows only): all tokens in blocks of `block` queries, each block with the
  block + left + right keys around it (one gather of k and of v), and one mask per plan keeping the keys in
  the query's own sequence and window: one SDPA call for the whole batch, tokens x (block + left + right)
  pairs instead of sum(length^2).

Zero-length sequences (static-shape padding, any number of them) vanish in numpy when the plan is made and
cost nothing per call. Masks are made on the host once, moved once, and kept per dtype on first use.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from megatron_cmbert.kernels.varlen import PackedLayout, plan_from_cu_seqlens

# `blocks` is chosen when its pairs are below this share of `documents`' pairs: it also gathers every key
# (block + left + right) / block times, which `documents` does not.
BLOCKS_PAIR_SHARE = 0.75


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


@dataclass(frozen=True, eq=False)
class ReferencePlan:
    layout: PackedLayout
    window: tuple[int, int]
    runs: tuple[tuple[int, int], ...] = ()
    """documents: (count, length) of each run of consecutive equal-length sequences, in order."""
    keep: torch.Tensor | None = None
    """documents: bool (longest, longest) band, or None (global); blocks: bool (blocks, 1, block, keys)."""
    block: int = 0
    """blocks: queries per block; 0 for the documents layout."""
    key_index: torch.Tensor | None = None
    """blocks: (blocks * keys,) token of each block's keys (clamped into range; the mask drops the clamped)."""
    _masks: dict = field(default_factory=dict, repr=False)

    @property
    def kind(self) -> str:
        return "blocks" if self.block else "documents"

    def mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """`keep` as an additive mask (0 / -inf) in q's dtype, made on first use per dtype."""
        if self.keep is None:
            return None
        found = self._masks.get(dtype)
        if found is None:
            found = self._masks[dtype] = torch.zeros(self.keep.shape, dtype=dtype, device=self.keep.device) \
                .masked_fill_(~self.keep, float("-inf"))
        return found


def block_size(window: tuple[int, int]) -> int:
    """Queries per block: about half the window's width, a multiple of 16 (smaller blocks gather every key
    more often, larger ones compute more masked pairs; at window (64, 64) on CPU, 64 ran best of 16..256 in
    issue 22's measurement)."""
    return max(16, -(-(window[0] + window[1]) // 32) * 16)


def plan(layout: PackedLayout, window=(-1, -1)) -> ReferencePlan:
    window = tuple(int(w) for w in window)
    lengths = np.asarray(layout.lengths, dtype=np.int64)
    real = lengths[lengths > 0]
    total = int(real.sum())
    left, right = window
    if left >= 0 and right >= 0 and total:
        block = block_size(window)
        blocks = -(-total // block)
        if blocks * block * (block + left + right) < BLOCKS_PAIR_SHARE * float(np.square(real).sum()):
            return _blocks_plan(layout, window, real, block, blocks)
    runs: tuple[tuple[int, int], ...] = ()
    if real.size:
        starts = np.flatnonzero(np.concatenate(([True], real[1:] != real[:-1])))
        counts = np.diff(np.concatenate((starts, [real.size])))
        runs = tuple(zip(counts.tolist(), real[starts].tolist()))
    band = window_mask(int(real.max()), window, layout.device) if real.size else None
    return ReferencePlan(layout, window, runs=runs, keep=band)


def _blocks_plan(layout, window, real: np.ndarray, block: int, blocks: int) -> ReferencePlan:
    left, right = window
    total, keys = int(real.sum()), block + left + right
    doc = np.repeat(np.arange(real.size), real)
    query = np.arange(blocks * block).reshape(blocks, block, 1)
    key = (np.arange(blocks) * block - left)[:, None, None] + np.arange(keys)[None, None, :]
    inside = (key >= 0) & (key < total)
    clamped = np.clip(key, 0, total - 1)
    offset = key - query  # in [-left, right] for keys inside the window
    keep = inside & (offset >= -left) & (offset <= right) & (query < total) & \
        (doc[np.minimum(query, total - 1)] == doc[clamped])
    keep |= (query >= total) & (offset == 0)  # a padding query sees one key: no all -inf row, no NaN
    return ReferencePlan(layout, window, keep=torch.from_numpy(keep[:, None]).to(layout.device), block=block,
                         key_index=torch.from_numpy(clamped[:, 0, :].reshape(-1)).to(layout.device))


def _sdpa(q, k, v, mask, scale):
    """(n, L, H, d) q and (n, S, H, d) k, v -> (n, L, H, d)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


# Shapes follow the data (runs, blocks): the registry hands attend out torch.compiler.disable'd
# (Kernel.traceable=False), so under --compile it runs eagerly; no decorator here, which would import
# torch._dynamo (and triton with it) whenever this module is imported.
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: ReferencePlan,
           softmax_scale: float | None = None) -> torch.Tensor:
    """q, k, v: (total_tokens, heads, head_dim) -> (total_tokens, heads, head_dim). Every token gets its
    output (tokens of zero-length sequences do not exist)."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    total, heads, dim = q.shape
    if total == 0:
        return q.new_zeros(q.shape)
    mask = plan.mask(q.dtype)
    if plan.block:
        block, blocks = plan.block, plan.keep.shape[0]
        padded = blocks * block
        qb = (F.pad(q, (0, 0, 0, 0, 0, padded - total)) if padded > total else q).reshape(blocks, block, heads, dim)
        kb, vb = (t.index_select(0, plan.key_index).view(blocks, -1, heads, dim) for t in (k, v))
        out = _sdpa(qb, kb, vb, mask, scale).reshape(padded, heads, dim)
        return out[:total] if padded > total else out
    sizes = [count * length for count, length in plan.runs]
    pieces = zip(*(t.split(sizes) for t in (q, k, v))) if len(sizes) > 1 else [(q, k, v)]
    outputs = []
    for (count, length), (qs, ks, vs) in zip(plan.runs, pieces):
        runs = [t.view(count, length, heads, dim) for t in (qs, ks, vs)]
        run_mask = None if mask is None else mask[:length, :length]
        outputs.append(_sdpa(*runs, run_mask, scale).reshape(count * length, heads, dim))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                        max_seqlen: int | None = None, window: tuple[int, int] = (-1, -1),
                        softmax_scale: float | None = None) -> torch.Tensor:
    """The functional form (tests, benchmarks): plan from cu_seqlens (read once), then attend."""
    return attend(q, k, v, plan_from_cu_seqlens(plan, cu_seqlens, max_seqlen, window), softmax_scale)
