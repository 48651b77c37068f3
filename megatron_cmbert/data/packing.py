"""Packing documents into fixed-budget samples of ``[CLS] piece [SEP]`` sequences, and blending.

Packing is computed once, up front, from the document lengths alone, so a sample's content depends
only on (seed, sample index): a resumed run or another rank rebuilds the same index. Samples are
unpadded: each holds up to ``seq_length`` tokens made of one or more document pieces, each piece
wrapped in [CLS] ... [SEP]; the model sees them as separate sequences (``cu_seqlens``).
A document longer than the space left is split: the first part fills the sample, the rest starts
the next one. No piece is shorter than ``min_piece`` tokens unless its whole document is.
"""
from __future__ import annotations

import numpy as np

PIECE_OVERHEAD = 2  # [CLS] and [SEP]


def pack_documents(doc_lengths: np.ndarray, seq_length: int, order: np.ndarray,
                   min_piece: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Greedy sequential packing of the documents in ``order``.

    Returns ``pieces`` (n_pieces, 3) int64 rows of (document, start token, length) and
    ``sample_offsets`` (n_samples + 1) so that sample i is ``pieces[sample_offsets[i]:sample_offsets[i+1]]``.
    """
    if seq_length <= PIECE_OVERHEAD + min_piece:
        raise ValueError(f"seq_length {seq_length} leaves no room for a piece of {min_piece} tokens")
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    pieces: list[tuple[int, int, int]] = []
    offsets = [0]
    used = 0  # tokens of the current sample, overhead included
    for doc in np.asarray(order, dtype=np.int64).tolist():
        start, remaining = 0, int(lengths[doc])
        while remaining > 0:
            space = seq_length - used - PIECE_OVERHEAD
            if used and space < min(min_piece, remaining):
                offsets.append(len(pieces))  # close the sample: what is left would be a sliver
                used = 0
                continue
            take = min(remaining, space)
            pieces.append((doc, start, take))
            used += take + PIECE_OVERHEAD
            start += take
            remaining -= take
            if seq_length - used - PIECE_OVERHEAD <= 0:
                offsets.append(len(pieces))
                used = 0
    if used:
        offsets.append(len(pieces))
    return np.array(pieces, dtype=np.int64).reshape(-1, 3), np.array(offsets, dtype=np.int64)


def blend_indices(weights: np.ndarray, n_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's blending: sample i comes from the dataset furthest behind its share.

    Returns (dataset index, sample index within that dataset) for each of ``n_samples``; the
    realised share of dataset d after n samples differs from ``weights[d] * n`` by less than one.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be a non-empty list of non-negative numbers with a positive sum")
    w = w / w.sum()
    dataset = np.empty(n_samples, dtype=np.int16)
    within = np.empty(n_samples, dtype=np.int64)
    counts = np.zeros(w.size, dtype=np.int64)
    for i in range(n_samples):
        d = int(np.argmax(w * (i + 1) - counts))
        dataset[i], within[i] = d, counts[d]
        counts[d] += 1
    return dataset, within
