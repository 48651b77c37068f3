"""Texts -> token ids + whole-word start flags, the per-chunk work of tools/preprocess_data.py.

A token starts a whole-word unit when its start offset is a word boundary of the segmenter. Token
offsets from ``tokenizers`` are character offsets into the original (pre-NFKC) text, and the
segmenter runs on that same original text, so the two line up. A token that straddles a word
boundary starts in one word and ends in the next: the second word then has no starting token and
joins the first in one unit, so every unit is a union of whole segmenter words.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass
from itertools import chain
from typing import Optional, Sequence

import numpy as np

from megatron_cmbert.data.helpers import word_start_flags
from megatron_cmbert.data.segment import Segmenter
from megatron_cmbert.data.tokenizer import load_tokenizer


@dataclass
class EncodedChunk:
    """Documents of one chunk, flattened: ``tokens``/``word_starts`` concatenated, ``lengths`` per doc."""

    tokens: np.ndarray       # int32 token ids
    word_starts: np.ndarray  # uint8, 1 where a token starts a whole-word unit
    lengths: np.ndarray      # int32 tokens per document
    chars: int               # characters of input text


class DocumentEncoder:
    """Tokenizes and segments batches of documents; one instance per worker process."""

    def __init__(self, tokenizer_dir: str, segmenter: str = "rjieba", user_dict: Optional[str] = None):
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.segmenter = Segmenter(segmenter, user_dict=user_dict)

    def encode(self, texts: Sequence[str]) -> EncodedChunk:
        if not texts:
            return EncodedChunk(np.zeros(0, np.int32), np.zeros(0, np.uint8), np.zeros(0, np.int32), 0)
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int32, count=len(encodings))
        total = int(lengths.sum())
        tokens = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.int32, count=total)
        starts = np.fromiter((s for e in encodings for s, _ in e.offsets), dtype=np.int64, count=total)
        # One slot per character plus one past the end of each document, so that a (theoretical)
        # empty token at the very end still indexes inside its own document.
        char_lengths = np.fromiter((len(t) + 1 for t in texts), dtype=np.int64, count=len(texts))
        char_base = np.concatenate(([0], np.cumsum(char_lengths)[:-1]))
        char_is_start = np.zeros(int(char_lengths.sum()), dtype=np.uint8)
        for base, text in zip(char_base.tolist(), texts):
            word_lengths = self.segmenter.word_lengths(text)
            char_is_start[base + np.cumsum(word_lengths) - word_lengths] = 1
        starts += np.repeat(char_base, lengths)
        doc_offsets = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))
        flags = word_start_flags(starts, doc_offsets, char_is_start)
        return EncodedChunk(tokens, flags, lengths, int(char_lengths.sum()) - len(texts))


# Worker-process plumbing for multiprocessing pools: one encoder per process, built once.
_WORKER_ENCODER: Optional[DocumentEncoder] = None


def init_worker(tokenizer_dir: str, segmenter: str, user_dict: Optional[str]) -> None:
    global _WORKER_ENCODER
    # Ctrl-C reaches the whole process group: the parent alone handles it and terminates the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER_ENCODER = DocumentEncoder(tokenizer_dir, segmenter, user_dict)


def encode_in_worker(texts: Sequence[str]) -> EncodedChunk:
    assert _WORKER_ENCODER is not None, "init_worker was not called in this process"
    return _WORKER_ENCODER.encode(texts)
