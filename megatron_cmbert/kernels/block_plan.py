"""Host-side attention planning for packed batches: which keys each token sees, and the work of each block of
consecutive tokens, computed with numpy from the host lengths alone (no device read, no tokens x tokens mask).

Shared by the Triton kernels (kernels/attention_triton.py: one program per block of the packed token stream)
and the FlexAttention block masks (kernels/attention_flex.py). Every array here has a shape fixed by the token
count and the block size: zero-length sequences (static-shape padding of the sequence list) add no token, so
they change no shape and cost no work.

A block is `block` consecutive tokens of the packed stream; it may span several short sequences. Per block:
    lo, hi          the union of its rows' ranges (contiguous, see `block_ranges`): the columns to visit;
    full_lo, full_hi the columns that *every* row of the block reaches: visited without masks (empty when the
                    block spans sequences or a window edge cuts through).
"""
from __future__ import annotations

import numpy as np


def token_key_bounds(lengths: np.ndarray, window: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) int64 (total,): token t of sequence [s, e) sees keys lo[t] <= j < hi[t], where
    lo = max(s, t - left), hi = min(e, t + right + 1); a negative bound is unbounded on that side."""
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    ends = np.cumsum(lengths)
    t = np.arange(int(ends[-1]) if ends.size else 0, dtype=np.int64)
    start = np.repeat(ends - lengths, lengths)
    end = np.repeat(ends, lengths)
    left, right = (int(w) for w in window)
    lo = start if left < 0 else np.maximum(start, t - left)
    hi = end if right < 0 else np.minimum(end, t + right + 1)
    return lo, hi


def token_query_bounds(lengths: np.ndarray, window: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi): key c is seen by the queries lo[c] <= i < hi[c]. Query i sees key c iff i - left <= c <= i + right,
    i.e. c - right <= i <= c + left: the key bounds of the mirrored window."""
    left, right = window
    return token_key_bounds(lengths, (right, left))


def block_ranges(lo: np.ndarray, hi: np.ndarray, block: int) -> np.ndarray:
    """(cdiv(total, block), 4) int64 rows [lo, hi, full_lo, full_hi] per block of `block` rows (see the module
    docstring). The union is one interval: consecutive rows of one sequence have overlapping ranges (each holds
    its own row), and the last row of a sequence ends where the next sequence's first row starts. The last,
    partial block is padded with copies of its last row, which change no min or max."""
    total = int(lo.shape[0])
    n = -(-total // block)
    if n == 0:
        return np.zeros((0, 4), dtype=np.int64)
    pad = n * block - total
    lo2 = np.pad(lo, (0, pad), mode="edge").reshape(n, block)
    hi2 = np.pad(hi, (0, pad), mode="edge").reshape(n, block)
    return np.stack([lo2.min(1), hi2.max(1), lo2.max(1), hi2.min(1)], axis=1)


def work_items(lo: np.ndarray, hi: np.ndarray, block: int) -> np.ndarray:
    """(cdiv(total, block), 5) int32 rows [first row, lo, hi, full_lo, full_hi], one per block, heaviest first
    (most columns to visit): the long sequences' blocks start first and the many short ones fill in behind
    them, instead of one long block running alone at the end of the launch."""
    ranges = block_ranges(lo, hi, block)
    first = np.arange(ranges.shape[0], dtype=np.int64) * block
    order = np.argsort(ranges[:, 0] - ranges[:, 1], kind="stable")
    return np.concatenate([first[:, None], ranges], axis=1)[order].astype(np.int32)
