"""Pretraining samples: blended indexed datasets → packed ``[CLS] piece [SEP]`` samples → whole-word
masked, packed varlen micro-batches.

Everything a sample contains is a pure function of (seed, global sample index, masking rate), and
the rate is a pure function of the sample's global step, so every rank, every loader worker and a
resumed run produce exactly the same micro-batches.

    --data-path 0.57 PREFIX_A 0.43 PREFIX_B   (PREFIX = tools/preprocess_data.py's ..._text_document)
    --split 98,2,0                            (train / valid / test shares of each dataset's documents)
    --data-cache-path DIR                     (sample indices, built once; default: cache/ beside each dataset)
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from megatron_cmbert.data.masking import MaskingConfig, mask_tokens, sample_rng
from megatron_cmbert.data.microbatch import MicroBatch, MicroBatchShape
from megatron_cmbert.data.packing import BlendIndex
from megatron_cmbert.data.sample_cache import (DocumentReader, EpochCache, EpochReader, check_word_starts,
                                               dataset_fingerprint, default_cache_dir)
from megatron_cmbert.data.tokenizer import CLS_ID, SEP_ID

SPLIT_NAMES = ("train", "valid", "test")


def parse_data_path(data_path: Sequence[str]) -> tuple[list[float], list[str]]:
    """``[PREFIX]`` or ``[W1, PREFIX1, W2, PREFIX2, ...]`` (Megatron's --data-path) → (weights, prefixes)."""
    items = list(data_path)
    if len(items) == 1:
        return [1.0], items
    if len(items) % 2:
        raise ValueError(f"--data-path takes one prefix or weight/prefix pairs, got {len(items)} items")
    try:
        weights = [float(w) for w in items[0::2]]
    except ValueError:
        raise ValueError(f"--data-path weights must be numbers: {items[0::2]}") from None
    return weights, items[1::2]


def split_ranges(split: str, num_documents: int) -> list[tuple[int, int]]:
    """Megatron's --split "98,2,0": contiguous document ranges for train / valid / test."""
    parts = [float(x) for x in split.replace("/", ",").split(",")]
    if len(parts) > 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"--split needs up to three non-negative numbers, got {split!r}")
    parts += [0.0] * (3 - len(parts))
    bounds = np.round(np.cumsum([0.0] + parts) / sum(parts) * num_documents).astype(int)
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(3)]


class TokenDataset:
    """A token dataset and its word-start flags (``PREFIX`` and ``PREFIX_wordstart``), memory-mapped.

    ``lengths`` is the int32 view of the ``.idx`` (no copy). With ``check`` the two datasets' document
    lengths are compared here; the pretraining path instead has the sample cache compare them once per
    dataset version, so a rank does not read the whole index.
    """

    def __init__(self, prefix: str, check: bool = True):
        with warnings.catch_warnings():  # megatron-core warns about optional TE/apex at import
            warnings.simplefilter("ignore")
            from megatron.core.datasets.indexed_dataset import IndexedDataset
        self.prefix = prefix
        self.tokens = IndexedDataset(prefix)
        self.word_starts = IndexedDataset(prefix + "_wordstart")
        if check and not np.array_equal(self.tokens.sequence_lengths, self.word_starts.sequence_lengths):
            raise ValueError(f"{prefix}: token and word-start datasets have different document lengths")
        self.lengths = self.tokens.sequence_lengths

    def __getstate__(self) -> str:  # pickled (spawned loader workers): reopen, never copy the index
        return self.prefix

    def __setstate__(self, prefix: str) -> None:
        self.__init__(prefix, check=False)


class PackedSplit:
    """One dataset's documents of one split, packed; each epoch reshuffles the documents. The packing of
    each epoch is built once into the sample cache (data/sample_cache.py); samples read their rows from it."""

    def __init__(self, data: TokenDataset, doc_range: tuple[int, int], seq_length: int, seed: int,
                 dataset_index: int, min_piece: int = 16, cache_dir: Optional[str] = None):
        self.data, self.seq_length, self.min_piece = data, seq_length, min_piece
        self.docs = range(*doc_range)
        cache_dir = cache_dir or default_cache_dir(data.prefix)
        fingerprint = dataset_fingerprint(data.prefix)
        check_word_starts(data.tokens, data.word_starts, data.prefix, cache_dir, fingerprint)
        self.cache = EpochCache(data.prefix, fingerprint, doc_range, seq_length, seed, dataset_index,
                                min_piece, cache_dir)
        self.readers = (DocumentReader(data.prefix), DocumentReader(data.prefix + "_wordstart"))
        self._epochs: list[EpochReader] = []
        self._epoch_starts = [0]
        self._epoch(0)  # an empty split shows here, as no samples

    @property
    def epochs_built(self) -> int:
        return len(self._epochs)

    def __bool__(self) -> bool:
        return self._epoch_starts[1] > 0

    def _epoch(self, e: int) -> EpochReader:
        while len(self._epochs) <= e:
            reader = self.cache.reader(len(self._epochs), self.data.lengths)
            self._epochs.append(reader)
            self._epoch_starts.append(self._epoch_starts[-1] + len(reader))
        return self._epochs[e]

    def pieces(self, j: int) -> np.ndarray:
        """(n_pieces, 3) rows (document, start, length) of sample j (counting across epochs)."""
        if not self:
            raise IndexError("sample of an empty split")
        e = 0
        while True:
            reader = self._epoch(e)
            if j < self._epoch_starts[e + 1]:
                return reader[j - self._epoch_starts[e]]
            e += 1

    def sample(self, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, word-start flags, sequence lengths) of sample j with [CLS]/[SEP] around each piece."""
        toks, flags, lens = [], [], []
        for doc, start, length in self.pieces(j).tolist():
            t = self.readers[0].get(doc, start, length)
            f = self.readers[1].get(doc, start, length).copy()
            f[0] = 1  # a piece cut mid-word starts a unit of its own: units never span pieces
            toks += [[CLS_ID], t, [SEP_ID]]
            flags += [[1], f, [1]]
            lens.append(length + 2)
        return (np.concatenate(toks).astype(np.int64), np.concatenate(flags).astype(np.uint8),
                np.array(lens, dtype=np.int64))


class PretrainSamples:
    """Blended, split, packed and masked samples, addressed by global sample index."""

    def __init__(self, data_path: Sequence[str], split: str, which: str, seq_length: int, seed: int,
                 num_samples: int, masking: MaskingConfig, min_piece: int = 16, cache_dir: Optional[str] = None,
                 blend_block: int = 1 << 20):
        weights, prefixes = parse_data_path(data_path)
        split_index = SPLIT_NAMES.index(which)
        # Each split draws its own document order and masks, even at equal sample indices.
        self.seed, self.masking = seed + 1000 * split_index, masking
        parts, kept = [], []
        for i, (w, prefix) in enumerate(zip(weights, prefixes)):
            if w <= 0:
                continue
            data = TokenDataset(prefix, check=False)  # the cache checks it once
            part = PackedSplit(data, split_ranges(split, len(data.lengths))[split_index], seq_length,
                               self.seed, i, min_piece, cache_dir)
            if part:
                parts.append(part)
                kept.append(w)
        if not parts:
            raise ValueError(f"no documents in the {which} split of {', '.join(prefixes)} (--split {split})")
        self.parts, self.weights = parts, np.array(kept, dtype=np.float64)
        self.blend = BlendIndex(self.weights, num_samples, blend_block,
                                cache_dir or default_cache_dir(prefixes[0]))

    def __len__(self) -> int:
        return len(self.blend)

    def sample(self, index: int, rate: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(inputs, labels, tokens, sequence lengths) of global sample ``index`` masked at ``rate``."""
        dataset, within = self.blend[index]
        tokens, flags, lens = self.parts[dataset].sample(within)
        inputs, labels = mask_tokens(tokens, flags, rate, sample_rng(self.seed, index), self.masking)
        return inputs, labels, tokens, lens

    def micro_batch(self, first: int, count: int, rate: float, shape: Optional[MicroBatchShape] = None) -> MicroBatch:
        """Samples ``first .. first+count-1`` packed into one varlen micro-batch (static when `shape` is given:
        data/microbatch.py)."""
        inputs, labels, lens = [], [], []
        for index in range(first, first + count):
            i, l, _, n = self.sample(index, rate)
            inputs.append(i)
            labels.append(l)
            lens.append(n)
        return MicroBatch.pack(inputs, labels, lens, rate, shape)


class MicroBatchSchedule(torch.utils.data.Dataset):
    """Item k = this data-parallel rank's k-th micro-batch of training, for a torch DataLoader.

    Step s uses global samples [s*G, (s+1)*G); DP rank r takes the r-th contiguous slice of G/DP
    samples, cut into micro-batches of M. The masking rate comes from ``rate_at(step)``.
    """

    def __init__(self, samples: PretrainSamples, global_batch: int, micro_batch: int, dp_size: int,
                 dp_rank: int, rate_at: Callable[[int], float], first_step: int = 0, num_steps: Optional[int] = None,
                 shape: Optional[MicroBatchShape] = None):
        if global_batch % (micro_batch * dp_size):
            raise ValueError(f"--global-batch-size {global_batch} must be a multiple of "
                             f"--micro-batch-size {micro_batch} x data-parallel size {dp_size}")
        self.samples, self.G, self.M, self.shape = samples, global_batch, micro_batch, shape
        self.dp_size, self.dp_rank, self.rate_at = dp_size, dp_rank, rate_at
        self.per_step = global_batch // (micro_batch * dp_size)
        self.first_step = first_step
        total_steps = len(samples) // global_batch
        self.num_steps = total_steps - first_step if num_steps is None else num_steps

    def __len__(self) -> int:
        return self.num_steps * self.per_step

    def __getitem__(self, k: int) -> MicroBatch:
        step = self.first_step + k // self.per_step
        first = step * self.G + self.dp_rank * (self.G // self.dp_size) + (k % self.per_step) * self.M
        return self.samples.micro_batch(first, self.M, self.rate_at(step), self.shape)


class StepSchedule(torch.utils.data.Dataset):
    """Item k = the list of this data-parallel rank's micro-batches of step ``first_step + k``: a loader of
    whole steps, so the training loop never regroups micro-batches. Takes MicroBatchSchedule's arguments;
    the micro-batches are MicroBatchSchedule's, in its order."""

    def __init__(self, *args, **kwargs):
        self.micro_batches = MicroBatchSchedule(*args, **kwargs)
        self.per_step, self.first_step = self.micro_batches.per_step, self.micro_batches.first_step

    def __len__(self) -> int:
        return self.micro_batches.num_steps

    def __getitem__(self, k: int) -> list[MicroBatch]:
        if not 0 <= k < len(self):
            raise IndexError(f"step {k} of a {len(self)}-step schedule")
        return [self.micro_batches[k * self.per_step + j] for j in range(self.per_step)]


def _as_is(item):
    return item  # module level: worker processes pickle the collate function


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers ignore SIGTERM and Ctrl-C: torchrun signals a rank's whole process group when it stops
    a run, and torch's worker handler would die on it, failing the rank's next batch before it could save.
    The training process decides when to stop and ends its workers (they also exit when it dies)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def step_loader(schedule: StepSchedule, num_workers: int = 0, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """Steps in order (item k in the k-th place), built in `num_workers` background processes while the
    device trains; `pin_memory` page-locks them so the copies to a GPU do not block."""
    return torch.utils.data.DataLoader(schedule, batch_size=None, shuffle=False, collate_fn=_as_is,
                                       num_workers=num_workers, pin_memory=pin_memory,
                                       worker_init_fn=_ignore_stop_signals if num_workers else None,
                                       persistent_workers=False, prefetch_factor=2 if num_workers else None)
