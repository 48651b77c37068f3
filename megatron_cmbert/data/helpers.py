"""Hot data helpers: a compiled C++ version (megatron_cmbert._C) when it was built, else numpy.

Both implementations follow the same contract; tests/test_helpers.py checks they agree.
"""
from __future__ import annotations

import numpy as np

try:  # built by setup.py when a compiler was available
    from megatron_cmbert import _C  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the install
    _C = None

HAVE_CPP = _C is not None


def word_start_flags_numpy(
    token_starts: np.ndarray, doc_token_offsets: np.ndarray, char_is_start: np.ndarray
) -> np.ndarray:
    """uint8 flags, 1 where a token starts a whole-word unit (numpy twin of ``_C.word_start_flags``).

    A token starts a unit when it is the first token of its document, or when its start offset is a
    segmenter word boundary and differs from the previous token's start (the byte-fallback pieces of
    one character share a start offset and must stay in one unit).

    Args:
        token_starts: int64 global character offsets of each token (documents concatenated).
        doc_token_offsets: int64 ``[0, n0, n0+n1, ...]`` token boundaries of the documents.
        char_is_start: uint8, 1 at each character offset where a segmenter word starts.
    """
    starts = np.ascontiguousarray(token_starts, dtype=np.int64)
    offs = np.ascontiguousarray(doc_token_offsets, dtype=np.int64)
    is_start = np.ascontiguousarray(char_is_start, dtype=np.uint8)
    if offs.size < 1 or offs[0] != 0 or offs[-1] != starts.size:
        raise ValueError("doc_token_offsets must start at 0 and end at len(token_starts)")
    if np.any(np.diff(offs) < 0):
        raise ValueError("doc_token_offsets must be non-decreasing")
    if starts.size and (starts.min() < 0 or starts.max() >= is_start.size):
        raise IndexError("token start outside the text")
    flags = is_start[starts] != 0
    flags[1:] &= starts[1:] != starts[:-1]
    firsts = offs[:-1][offs[:-1] < offs[1:]]
    flags[firsts] = True
    return flags.astype(np.uint8)


def word_start_flags(
    token_starts: np.ndarray, doc_token_offsets: np.ndarray, char_is_start: np.ndarray
) -> np.ndarray:
    """Dispatch to the C++ helper when built, else the numpy twin (same output)."""
    if _C is not None:
        return _C.word_start_flags(token_starts, doc_token_offsets, char_is_start)
    return word_start_flags_numpy(token_starts, doc_token_offsets, char_is_start)


def pack_chunk_python(doc_lengths: np.ndarray, order: np.ndarray, seq_length: int, min_piece: int,
                      used: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """Python twin of ``_C.pack_chunk`` (see data/packing.py for the rules): packs the documents of
    ``order`` into a sample that already holds ``used`` tokens. Returns (pieces int32 (n, 3) rows of
    (document, start, length), sample ends int64 (local piece count at each sample close), the used
    tokens of the sample left open)."""
    lengths = np.asarray(doc_lengths)
    pieces: list[tuple[int, int, int]] = []
    ends: list[int] = []
    for doc in np.asarray(order, dtype=np.int64).tolist():
        start, remaining = 0, int(lengths[doc])
        while remaining > 0:
            space = seq_length - used - 2
            if used and space < min(min_piece, remaining):
                ends.append(len(pieces))  # close the sample: what is left would be a sliver
                used = 0
                continue
            take = min(remaining, space)
            pieces.append((doc, start, take))
            used += take + 2
            start += take
            remaining -= take
            if seq_length - used - 2 <= 0:
                ends.append(len(pieces))
                used = 0
    return np.array(pieces, dtype=np.int32).reshape(-1, 3), np.array(ends, dtype=np.int64), used


def blend_block_python(weights: np.ndarray, counts: np.ndarray, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Python twin of ``_C.blend_block``: Megatron's greedy blending of samples start..start+n-1;
    ``counts`` (int64, samples per dataset before ``start``) is updated in place."""
    w = np.ascontiguousarray(weights, dtype=np.float64)
    dataset = np.empty(n, dtype=np.int16)
    within = np.empty(n, dtype=np.int64)
    for k in range(n):
        d = int(np.argmax(w * (start + k + 1) - counts))
        dataset[k], within[k] = d, counts[d]
        counts[d] += 1
    return dataset, within


def pack_chunk(doc_lengths: np.ndarray, order: np.ndarray, seq_length: int, min_piece: int,
               used: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """Dispatch to the C++ helper when built, else the Python twin (same output). ``doc_lengths`` should
    be the int32 lengths of the .idx (passed without a copy); wider arrays are narrowed once."""
    lengths = np.asarray(doc_lengths)
    if lengths.dtype != np.int32:
        if lengths.size and (lengths.min() < 0 or lengths.max() > np.iinfo(np.int32).max):
            raise ValueError("document lengths must fit int32")
        lengths = lengths.astype(np.int32)
    if _C is not None:
        pieces, ends, used = _C.pack_chunk(lengths, np.ascontiguousarray(order, dtype=np.int64), int(seq_length),
                                           int(min_piece), int(used))
        return pieces, ends, int(used)
    return pack_chunk_python(lengths, order, seq_length, min_piece, used)


def pack_documents(doc_lengths: np.ndarray, order: np.ndarray, seq_length: int,
                   min_piece: int) -> tuple[np.ndarray, np.ndarray]:
    """All of ``order`` packed at once: (pieces int64 (n, 3), sample offsets int64 (m + 1))."""
    pieces, ends, used = pack_chunk(doc_lengths, order, seq_length, min_piece)
    offsets = np.concatenate(([0], ends, [len(pieces)] if used else [])).astype(np.int64)
    return pieces.astype(np.int64), offsets


def blend_block(weights: np.ndarray, counts: np.ndarray, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Dispatch to the C++ helper when built, else the Python twin (same output)."""
    if counts.dtype != np.int64 or not counts.flags.c_contiguous:
        raise ValueError("counts must be a contiguous int64 array (it is updated in place)")
    if _C is not None:
        return _C.blend_block(np.ascontiguousarray(weights, dtype=np.float64), counts, int(start), int(n))
    return blend_block_python(weights, counts, start, n)
