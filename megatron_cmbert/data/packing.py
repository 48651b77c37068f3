"""Packing documents into fixed-budget samples of ``[CLS] piece [SEP]`` sequences, and blending.

Packing is computed from the document lengths alone, so a sample's content depends only on (seed,
sample index); data/sample_cache.py builds it once per epoch and every rank, worker and resumed run
reads that copy. Samples are
unpadded: each holds up to ``seq_length`` tokens made of one or more document pieces, each piece
wrapped in [CLS] ... [SEP]; the model sees them as separate sequences (``cu_seqlens``).
A document longer than the space left is split: the first part fills the sample, the rest starts
the next one. No piece is shorter than ``min_piece`` tokens unless it is a whole document or the tail
of one.
The loops run in C++ (csrc/helpers.cpp) with Python twins in data/helpers.py.
"""
from __future__ import annotations

import numpy as np

from megatron_cmbert.data import helpers
from megatron_cmbert.data.sample_cache import blend_starts

PIECE_OVERHEAD = 2  # [CLS] and [SEP]


def pack_documents(doc_lengths: np.ndarray, seq_length: int, order: np.ndarray,
                   min_piece: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Greedy sequential packing of the documents in ``order``.

    Returns ``pieces`` (n_pieces, 3) int64 rows of (document, start token, length) and
    ``sample_offsets`` (n_samples + 1) so that sample i is ``pieces[sample_offsets[i]:sample_offsets[i+1]]``.
    """
    if seq_length <= PIECE_OVERHEAD + min_piece:
        raise ValueError(f"seq_length {seq_length} leaves no room for a piece of {min_piece} tokens")
    return helpers.pack_documents(doc_lengths, order, seq_length, min_piece)


def _normalised(weights) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be a non-empty list of non-negative numbers with a positive sum")
    return w / w.sum()


def blend_indices(weights: np.ndarray, n_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's blending: sample i comes from the dataset furthest behind its share.

    Returns (dataset index, sample index within that dataset) for each of ``n_samples``; the
    realised share of dataset d after n samples differs from ``weights[d] * n`` by less than one.
    """
    return helpers.blend_block(_normalised(weights), np.zeros(len(weights), dtype=np.int64), 0, n_samples)


class BlendIndex:
    """``blend_indices`` computed lazily in blocks, so a run of a billion samples holds one block.

    Sample i -> (dataset, index within it). Block b is recomputed from the per-dataset counts at its
    start (``blocks + 1`` rows of a few integers, from data/sample_cache.blend_starts: cached on disk
    when ``cache_dir`` is given); the current block's arrays are kept, and training reads samples in
    order, so each block is computed about once per process.
    """

    def __init__(self, weights, n_samples: int, block: int = 1 << 20, cache_dir: str | None = None):
        self.weights, self.n, self.block = _normalised(weights), int(n_samples), int(block)
        self._starts = blend_starts(self.weights, self.n, self.block, cache_dir)
        self._cached: tuple[int, np.ndarray, np.ndarray] = (-1, np.empty(0), np.empty(0))

    def __len__(self) -> int:
        return self.n

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cached[0] != b:
            lo = b * self.block
            counts = np.array(self._starts[b], dtype=np.int64)  # a writable copy: blend_block updates it
            dataset, within = helpers.blend_block(self.weights, counts, lo, min(self.block, self.n - lo))
            self._cached = (b, dataset, within)
        return self._cached[1], self._cached[2]

    def __getitem__(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.n:
            raise IndexError(f"sample {i} outside 0..{self.n - 1}")
        dataset, within = self._block(i // self.block)
        return int(dataset[i % self.block]), int(within[i % self.block])
