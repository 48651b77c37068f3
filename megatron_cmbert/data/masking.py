"""Whole-word masking for MLM, deterministic per (seed, sample index, rate).

A sample is a packed token sequence with a word-start flag per token (from the indexed dataset,
see data/encode.py). Units are runs of tokens that begin at a flag; special tokens ([CLS], [SEP],
[PAD], ...) are never masked and never belong to a unit. Units are drawn in random order until the
target share of maskable tokens is reached; the unit that would cross the target is taken with the
probability that makes the expected count exactly ``rate * maskable``, so the realised rate is
unbiased rather than always a little short. Each selected token then becomes [MASK] (80%), a random
non-special token (10%), or stays as it is (10%); all of them are predicted.
``granularity="token"`` treats every token as its own unit (the paper's ablation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from megatron_cmbert.tokens import IGNORE_INDEX, SPECIAL_TOKENS  # noqa: F401  (IGNORE_INDEX re-exported)


@dataclass(frozen=True)
class MaskingConfig:
    """How selected tokens are corrupted."""

    mask_token_id: int
    """Id of [MASK]."""
    vocab_size: int
    """Random replacements are drawn from [first_regular_id, vocab_size)."""
    special_ids: Sequence[int] = tuple(range(len(SPECIAL_TOKENS)))
    """Ids never masked: [PAD] [UNK] [CLS] [SEP] [MASK]."""
    first_regular_id: int = len(SPECIAL_TOKENS)
    """Smallest id a random replacement may take (after the special tokens)."""
    mask_prob: float = 0.8
    """Share of selected tokens replaced by [MASK]."""
    random_prob: float = 0.1
    """Share of selected tokens replaced by a random token; the rest stay unchanged."""
    granularity: str = "word"
    """"word": whole-word units from the word-start flags; "token": every token alone."""

    def __post_init__(self):
        if self.granularity not in ("word", "token"):
            raise ValueError(f"granularity must be 'word' or 'token', not {self.granularity!r}")
        if not (0 <= self.mask_prob and 0 <= self.random_prob and self.mask_prob + self.random_prob <= 1):
            raise ValueError("mask_prob and random_prob must be >= 0 and sum to at most 1")
        if not 0 <= self.first_regular_id < self.vocab_size:
            raise ValueError("first_regular_id must lie inside the vocabulary")


def sample_rng(seed: int, sample_index: int) -> np.random.Generator:
    """The generator of one sample: depends on nothing but the seed and the sample's global index."""
    return np.random.default_rng([seed, sample_index])


def select_units(unit_ids: np.ndarray, n_units: int, n_maskable: int, rate: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Boolean per unit: the units chosen so that their tokens are ``rate`` of the maskable ones
    in expectation (see module docstring)."""
    if n_units == 0 or rate <= 0:
        return np.zeros(n_units, dtype=bool)
    sizes = np.bincount(unit_ids, minlength=n_units)
    order = rng.permutation(n_units)
    cum = np.cumsum(sizes[order])
    target = rate * n_maskable
    k = int(np.searchsorted(cum, target, side="right"))  # units that fit entirely under the target
    if k < n_units:
        below = cum[k - 1] if k else 0
        if rng.random() < (target - below) / sizes[order[k]]:
            k += 1
    chosen = np.zeros(n_units, dtype=bool)
    chosen[order[:k]] = True
    return chosen


def mask_tokens(tokens: np.ndarray, word_starts: np.ndarray, rate: float, rng: np.random.Generator,
                cfg: MaskingConfig) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) for one sample; labels are IGNORE_INDEX where nothing is predicted."""
    tokens = np.asarray(tokens, dtype=np.int64)
    maskable = ~np.isin(tokens, np.asarray(cfg.special_ids, dtype=np.int64))
    if cfg.granularity == "token":
        starts = maskable
    else:
        # A unit also starts after any non-maskable token, so no unit spans a special token.
        after_special = np.concatenate(([True], ~maskable[:-1]))
        starts = maskable & ((np.asarray(word_starts) != 0) | after_special)
    unit_of_token = np.cumsum(starts) - 1
    n_units = int(starts.sum())
    chosen = select_units(unit_of_token[maskable], n_units, int(maskable.sum()), rate, rng)
    selected = np.zeros(tokens.shape, dtype=bool)
    selected[maskable] = chosen[unit_of_token[maskable]]

    labels = np.full(tokens.shape, IGNORE_INDEX, dtype=np.int64)
    labels[selected] = tokens[selected]
    inputs = tokens.copy()
    idx = np.flatnonzero(selected)
    action = rng.random(idx.size)
    to_mask = idx[action < cfg.mask_prob]
    to_random = idx[(action >= cfg.mask_prob) & (action < cfg.mask_prob + cfg.random_prob)]
    inputs[to_mask] = cfg.mask_token_id
    inputs[to_random] = rng.integers(cfg.first_regular_id, cfg.vocab_size, size=to_random.size)
    return inputs, labels
