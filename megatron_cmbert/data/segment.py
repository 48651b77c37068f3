"""Chinese word segmentation into character spans, for whole-word masking.

One entry point, ``Segmenter(backend).spans_batch(texts)``, returns for each text an int32 array of
shape (n_words, 2) with ``[start, end)`` character offsets that tile the text exactly. Backends:

- ``rjieba`` (default): jieba's algorithm in Rust, ~10x faster; identical output on Chinese text.
- ``jieba``: the pure-Python reference.

User dictionary words (domain terms that must never be split) are added with ``user_words`` or a
jieba-format ``user_dict`` file (one ``word [freq [tag]]`` per line).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import numpy as np

BACKENDS = ("rjieba", "jieba")


def _read_user_dict(path: str) -> list[tuple[str, Optional[int]]]:
    words = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:
                continue
            freq = None
            if len(parts) > 1:
                try:
                    freq = int(parts[1])
                except ValueError:
                    raise ValueError(f"{path}:{lineno}: frequency {parts[1]!r} is not an integer") from None
            words.append((parts[0], freq))
    return words


class Segmenter:
    """Turns texts into word spans with a named backend (see module docstring)."""

    def __init__(
        self,
        backend: str = "rjieba",
        user_words: Iterable[str] = (),
        user_dict: Optional[str] = None,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"unknown segmenter {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.backend = backend
        words = [(w, None) for w in user_words]
        if user_dict:
            words += _read_user_dict(user_dict)
        self._cut: Callable[[str], list[str]] = self._make_cutter(backend, words)

    @staticmethod
    def _make_cutter(backend: str, words: list[tuple[str, Optional[int]]]) -> Callable[[str], list[str]]:
        if backend == "rjieba":
            import rjieba

            # A private instance so that user words never leak into other Segmenters.
            seg = rjieba.Jieba() if words else None
            for word, freq in words:
                seg.add_word(word, freq, None)
            return seg.cut if seg is not None else rjieba.cut
        import logging

        import jieba

        jieba.setLogLevel(logging.WARNING)
        seg = jieba.Tokenizer()
        for word, freq in words:
            seg.add_word(word, freq)
        return lambda text: seg.lcut(text, HMM=True)

    def word_lengths(self, text: str) -> np.ndarray:
        """Length in characters of each word, in order (sums to ``len(text)``)."""
        words = self._cut(text)
        lengths = np.fromiter(map(len, words), dtype=np.int32, count=len(words))
        if int(lengths.sum()) != len(text):
            raise RuntimeError(f"{self.backend} returned words that do not tile the text: {text[:50]!r}")
        return lengths

    def spans(self, text: str) -> np.ndarray:
        """(n_words, 2) int32 ``[start, end)`` character offsets of the words of ``text``."""
        ends = np.cumsum(self.word_lengths(text), dtype=np.int32)
        return np.stack([ends - np.diff(ends, prepend=np.int32(0)), ends], axis=1)

    def spans_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Word spans for each text of a batch (see ``spans``)."""
        return [self.spans(t) for t in texts]


def segment_batch(texts: Sequence[str], backend: str = "rjieba", user_words: Iterable[str] = ()) -> list[np.ndarray]:
    """Convenience: word spans for a batch with a fresh Segmenter (build one Segmenter for repeated use)."""
    return Segmenter(backend, user_words=user_words).spans_batch(texts)
