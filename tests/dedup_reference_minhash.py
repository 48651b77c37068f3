"""The single-process MinHash + LSH that tools/dedup_minhash.py used before it ran on datatrove.

Kept only as the reference of tests/test_dedup_agreement.py (what the datatrove pipeline removes is
compared with what this removed). It holds every signature in one process, so it is not a tool.

Pipeline: ``normalize`` (NFKC, drop punctuation/whitespace/control) -> character n-gram shingles
hashed to 64 bits (``shingle_hashes``) -> MinHash signatures with universal hashing
``(a*x + b) mod (2^61 - 1)`` (``MinHasher``) -> LSH banding with parameters from
``optimal_bands`` -> candidate pairs verified on the full signatures and clustered with union-find
(``find_duplicates``).

Everything here is deterministic for a seed: shingle hashes use a fixed mixing function (never
Python's salted ``hash()``), permutation parameters come from ``numpy.random.default_rng(seed)``,
and the clustering result is the set of connected components, which does not depend on the order
in which candidate pairs are visited.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

MERSENNE_P = (1 << 61) - 1
_P = np.uint64(MERSENNE_P)
_M32 = np.uint64(0xFFFFFFFF)
_M29 = np.uint64((1 << 29) - 1)
_U = np.uint64

# Shingles (NFKC, punctuation/whitespace dropped, character n-grams, splitmix64) are the ones the
# datatrove pipeline uses, so the comparison is about the engines (LSH + verification vs buckets).
from megatron_cmbert.data.dedup import _mix64, char_shingles as shingle_hashes  # noqa: E402


def mulmod_mersenne(a_hi, a_lo, x, b) -> np.ndarray:
    """``(a*x + b) mod (2^61-1)`` exactly, for a, x, b < 2^61, using only uint64 numpy ops.

    The 122-bit product is split into 32-bit halves and folded with 2^61 = 1 (mod p): this gives
    true universal hashing, unlike the common ``(a*x+b) % p`` on wrapped 64-bit products.
    ``a_hi``/``a_lo`` are a's high (< 2^29) and low 32 bits; arrays broadcast.
    """
    x_hi = x >> _U(32)
    x_lo = x & _M32
    # In-place ops on three (num_perm x T) buffers: this is the hot loop, allocation dominates.
    r = np.multiply(a_hi, x_hi)
    r <<= _U(3)  # a_hi*x_hi*2^64 = *8 (mod p), < 2^61
    mid = np.multiply(a_hi, x_lo)
    tmp = np.multiply(a_lo, x_hi)
    mid += tmp  # < 2^62
    np.right_shift(mid, _U(29), out=tmp)  # mid*2^32 = (mid>>29) + (mid&M29)<<32 (mod p)
    r += tmp
    mid &= _M29
    mid <<= _U(32)
    r += mid
    lo = np.multiply(a_lo, x_lo, out=mid)  # < 2^64, exact
    np.bitwise_and(lo, _P, out=tmp)
    r += tmp
    lo >>= _U(61)
    r += lo
    r += b  # total < 2^64, no wrap
    np.right_shift(r, _U(61), out=tmp)
    r &= _P
    r += tmp  # now r < p + 8
    np.subtract(r, _P, out=tmp)  # wraps to a huge value when r < p, so min picks the residue
    np.minimum(r, tmp, out=r)
    return r


class MinHasher:
    """Computes MinHash signatures; parameters are drawn from ``default_rng(seed)``."""

    # Elements per (num_perm x shingles) block: 2^16 (512 KiB buffers) stays cache-resident and
    # measured fastest; bigger blocks are memory-bound.
    BLOCK_ELEMENTS = 1 << 16

    def __init__(self, num_perm: int = 128, seed: int = 1, ngram: int = 5):
        if num_perm < 1 or ngram < 1:
            raise ValueError("num_perm and ngram must be >= 1")
        self.num_perm, self.seed, self.ngram = num_perm, seed, ngram
        rng = np.random.default_rng(seed)
        a = rng.integers(1, MERSENNE_P, size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, MERSENNE_P, size=num_perm, dtype=np.uint64)[:, None]
        self.a_hi = (a >> _U(32))[:, None]
        self.a_lo = (a & _M32)[:, None]

    def _hash_block(self, x: np.ndarray) -> np.ndarray:
        """(num_perm, len(x)) permuted hash values of shingle hashes ``x``."""
        x = (x & _P) + (x >> _U(61))  # reduce mod p first so x < 2^61
        x = np.where(x >= _P, x - _P, x)[None, :]
        return mulmod_mersenne(self.a_hi, self.a_lo, x, self.b)

    def signatures(self, hash_arrays: Sequence[np.ndarray]) -> np.ndarray:
        """One signature row per non-empty hash array (uint64, shape (n, num_perm)).

        Small documents are batched into one block and reduced with ``minimum.reduceat`` so the
        per-call numpy overhead is shared; a huge document is folded block by block.
        """
        out = np.empty((len(hash_arrays), self.num_perm), dtype=np.uint64)
        budget = max(1, self.BLOCK_ELEMENTS // self.num_perm)
        i = 0
        while i < len(hash_arrays):
            j, total = i, 0
            while j < len(hash_arrays) and (j == i or total + len(hash_arrays[j]) <= budget):
                total += len(hash_arrays[j])
                j += 1
            if total > budget:  # a single document larger than one block
                x = hash_arrays[i]
                acc = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
                for s in range(0, len(x), budget):
                    acc = np.minimum(acc, self._hash_block(x[s : s + budget]).min(axis=1))
                out[i] = acc
            else:
                sizes = [len(h) for h in hash_arrays[i:j]]
                starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
                vals = self._hash_block(np.concatenate(hash_arrays[i:j]))
                out[i:j] = np.minimum.reduceat(vals, starts, axis=1).T
            i = j
        return out

    def signatures_for_texts(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(signatures, valid): a row per text; ``valid`` is False where nothing is left to shingle."""
        hashes = [shingle_hashes(t, self.ngram) for t in texts]
        valid = np.array([len(h) > 0 for h in hashes], dtype=bool)
        sigs = np.full((len(texts), self.num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
        if valid.any():
            sigs[valid] = self.signatures([h for h in hashes if len(h)])
        return sigs, valid


def collision_probability(s, bands: int, rows: int):
    """LSH S-curve: probability that two docs of Jaccard ``s`` share at least one band bucket."""
    return 1.0 - (1.0 - np.asarray(s, dtype=float) ** rows) ** bands


def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5,
                  fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising weighted false-positive area (S-curve
    below ``threshold``) plus false-negative area (1 - S-curve above it), as datasketch does.

    Integrals use the trapezoid rule on a fixed grid; ties keep the first (smallest bands, then
    rows) so the choice is deterministic.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError("threshold must be in (0, 1]")
    grid = 2001
    s_lo = np.linspace(0.0, threshold, grid)
    s_hi = np.linspace(threshold, 1.0, grid)

    def area(y, s):
        return float(np.sum((y[1:] + y[:-1]) * np.diff(s)) / 2.0)

    best, best_err = (1, 1), math.inf
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = area(collision_probability(s_lo, b, r), s_lo)
            fn = area(1.0 - collision_probability(s_hi, b, r), s_hi)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


class UnionFind:
    """Union-find whose root is always the smallest index, i.e. the first document in input order."""

    def __init__(self, parent: np.ndarray):
        self.parent = [int(p) for p in parent]

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            lo, hi = (ri, rj) if ri < rj else (rj, ri)
            self.parent[hi] = lo


def _band_keys(block: np.ndarray) -> np.ndarray:
    """One 64-bit key per row of a band. Key collisions only add candidates, which are verified."""
    h = np.zeros(len(block), dtype=np.uint64)
    for c in range(block.shape[1]):
        h = _mix64(h * _U(0x100000001B3) ^ block[:, c])
    return h


def find_duplicates(sigs: np.ndarray, bands: int, rows: int, threshold: float) -> np.ndarray:
    """``keep_of[i]``: index of the document kept for doc ``i`` (``i`` itself when it is kept).

    Identical signatures are merged directly (estimate 1.0); LSH runs over the distinct ones.
    Docs sharing a band bucket are joined when their estimated Jaccard is >= ``threshold``.
    Clusters are the connected components, each represented by its smallest index.
    """
    n, num_perm = sigs.shape
    if bands * rows > num_perm:
        raise ValueError(f"bands*rows = {bands * rows} exceeds num_perm = {num_perm}")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    uniq, first, inverse = np.unique(sigs, axis=0, return_index=True, return_inverse=True)
    uf = UnionFind(first[inverse.reshape(-1)])  # exact-signature groups, rooted at first member
    need = math.ceil(threshold * num_perm - 1e-9)  # equal slots needed for estimate >= threshold
    for band in range(bands):
        keys = _band_keys(uniq[:, band * rows : (band + 1) * rows])
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        cuts = np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1
        bounds = np.concatenate(([0], cuts, [len(order)]))
        for s, e in zip(bounds[:-1], bounds[1:]):
            if e - s < 2:
                continue
            members = np.sort(order[s:e])
            for k in range(len(members) - 1):
                a = members[k]
                root_a = uf.find(int(first[a]))
                others = [m for m in members[k + 1 :] if uf.find(int(first[m])) != root_a]
                if not others:  # already connected: verifying again cannot change components
                    continue
                equal = (uniq[others] == uniq[a]).sum(axis=1)
                for m, eq in zip(others, equal):
                    if eq >= need:
                        uf.union(int(first[a]), int(first[m]))
    return np.array([uf.find(i) for i in range(n)], dtype=np.int64)
