"""Cached, memory-mapped sample indices (data/sample_cache.py): the micro-batches equal those of a
straightforward in-memory re-implementation of the packing/blending/masking rules, a second run reuses
the cache, a rewritten dataset gets new entries, and racing builders in separate processes build once."""
import multiprocessing as mp
import os
import time

import numpy as np
import pytest

from megatron_cmbert.data import helpers, sample_cache
from megatron_cmbert.data.masking import MaskingConfig, mask_tokens, sample_rng
from megatron_cmbert.data.pretrain_data import PretrainSamples, parse_data_path, split_ranges
from megatron_cmbert.data.tokenizer import CLS_ID, MASK_ID, SEP_ID
from tools.bench_data_scale import write_synthetic

pytestmark = pytest.mark.timeout(120)
MASKING = MaskingConfig(mask_token_id=MASK_ID, vocab_size=500)


@pytest.fixture()
def two_datasets(tmp_path):
    """Random token datasets with random word starts; a few empty documents and a too-long one."""
    out = []
    for k, n in enumerate((400, 150)):
        rng = np.random.default_rng(k)
        lengths = rng.integers(0, 300, size=n)
        lengths[[3, 10]] = 0
        lengths[20] = 1500  # longer than any sample: split across several
        out.append(write_synthetic(str(tmp_path / f"d{k}"), lengths, vocab=500, seed=k))
    return out


class ReferenceSamples:
    """The uncached implementation, spelled out: int64 document orders and pieces held in memory, Python
    packing and blending loops over everything, all at construction."""

    def __init__(self, data_path, split, which, seq_length, seed, num_samples, min_piece=16):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        weights, prefixes = parse_data_path(data_path)
        split_index = ("train", "valid", "test").index(which)
        self.seed, self.parts, kept = seed + 1000 * split_index, [], []
        for i, (w, prefix) in enumerate(zip(weights, prefixes)):
            tokens, flags = IndexedDataset(prefix), IndexedDataset(prefix + "_wordstart")
            lengths = tokens.sequence_lengths.astype(np.int64)
            docs = np.arange(*split_ranges(split, len(lengths))[split_index], dtype=np.int64)
            if w > 0 and lengths[docs].sum() > 0:
                epochs = []
                for k in range(20):
                    order = np.random.default_rng([self.seed, i, k]).permutation(docs)
                    pieces, ends, used = helpers.pack_chunk_python(lengths, order[lengths[order] > 0],
                                                                   seq_length, min_piece)
                    offsets = np.concatenate(([0], ends, [len(pieces)] if used else [])).astype(np.int64)
                    epochs += [pieces[offsets[s]:offsets[s + 1]] for s in range(len(offsets) - 1)]
                self.parts.append((tokens, flags, epochs))
                kept.append(w)
        w = np.array(kept) / np.sum(kept)
        self.blend = helpers.blend_block_python(w, np.zeros(len(w), dtype=np.int64), 0, num_samples)

    def sample(self, index, rate):
        tokens, flags, samples = self.parts[self.blend[0][index]]
        toks, fl = [], []
        for doc, start, length in samples[self.blend[1][index]].tolist():
            f = flags.get(doc, offset=start, length=length).copy()
            f[0] = 1
            toks += [[CLS_ID], tokens.get(doc, offset=start, length=length), [SEP_ID]]
            fl += [[1], f, [1]]
        t = np.concatenate(toks).astype(np.int64)
        return mask_tokens(t, np.concatenate(fl).astype(np.uint8), rate, sample_rng(self.seed, index), MASKING)


@pytest.mark.parametrize("which,split", [("train", "90,10,0"), ("valid", "90,10,0")])
def test_cached_micro_batches_equal_the_reference(two_datasets, tmp_path, which, split):
    a, b = two_datasets
    data_path = ["0.6", a, "0.4", b]
    n = 900  # several epochs of the small valid split, about two of train
    ref = ReferenceSamples(data_path, split, which, 128, 7, n)
    cached = PretrainSamples(data_path, split, which, 128, seed=7, num_samples=n, masking=MASKING,
                             cache_dir=str(tmp_path / "cache"), blend_block=64)  # many blend blocks
    for index in list(range(0, n, 7)) + [n - 1]:
        rate = 0.15 + 0.1 * (index % 3)
        inputs, labels = ref.sample(index, rate)
        got = cached.sample(index, rate)
        np.testing.assert_array_equal(got[0], inputs)
        np.testing.assert_array_equal(got[1], labels)
    assert sum(p.epochs_built for p in cached.parts) > 2  # epochs were built as the samples needed them
    mb = cached.micro_batch(5, 4, 0.2)  # a micro-batch is its samples, concatenated
    want = np.concatenate([ref.sample(i, 0.2)[0] for i in range(5, 9)])
    np.testing.assert_array_equal(mb.input_ids.numpy(), want)


def test_entries_are_memory_mapped_named_by_inputs_and_reused(two_datasets, tmp_path):
    cache = tmp_path / "c"
    args = ([two_datasets[0]], "100,0,0", "train", 128)
    first = PretrainSamples(*args, seed=1, num_samples=200, masking=MASKING, cache_dir=str(cache))
    first.sample(199, 0.3)
    pieces, offsets, _ = first.parts[0].cache.open(0, first.parts[0].data.lengths)
    assert isinstance(pieces, np.memmap) and isinstance(offsets, np.memmap)
    assert pieces.dtype == np.int32 and offsets.dtype == np.int64
    assert first.parts[0].data.lengths.dtype == np.int32 and first.parts[0].data.lengths.base is not None
    files = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    builds = dict(sample_cache.BUILDS)
    again = PretrainSamples(*args, seed=1, num_samples=200, masking=MASKING, cache_dir=str(cache))
    for x, y in zip(first.sample(150, 0.3), again.sample(150, 0.3)):
        np.testing.assert_array_equal(x, y)
    assert sample_cache.BUILDS == builds  # nothing rebuilt
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == files
    # another seed or length is another entry; the first ones stay
    PretrainSamples(*args[:3], 96, seed=1, num_samples=10, masking=MASKING, cache_dir=str(cache))
    PretrainSamples(*args, seed=2, num_samples=10, masking=MASKING, cache_dir=str(cache))
    assert sample_cache.BUILDS["epoch"] == builds["epoch"] + 2 and set(files) < {p.name for p in cache.iterdir()}
    # default place: cache/ beside the dataset
    PretrainSamples(*args, seed=1, num_samples=10, masking=MASKING)
    assert any(p.name.endswith(".pieces.npy") for p in (tmp_path / "cache").iterdir())


def test_a_rewritten_dataset_gets_new_entries(tmp_path):
    prefix = write_synthetic(str(tmp_path / "d"), np.full(50, 40), vocab=500, seed=0)
    cache = str(tmp_path / "c")
    old = PretrainSamples([prefix], "100,0,0", "train", 128, seed=1, num_samples=20, masking=MASKING,
                          cache_dir=cache)
    old_name = old.parts[0].cache.stem
    write_synthetic(prefix, np.full(60, 40), vocab=500, seed=1)  # same path, new content and lengths
    builds = sample_cache.BUILDS["epoch"]
    new = PretrainSamples([prefix], "100,0,0", "train", 128, seed=1, num_samples=20, masking=MASKING,
                          cache_dir=cache)
    assert new.parts[0].cache.stem != old_name and sample_cache.BUILDS["epoch"] == builds + 1
    ref = ReferenceSamples([prefix], "100,0,0", "train", 128, 1, 20)
    np.testing.assert_array_equal(new.sample(19, 0.2)[0], ref.sample(19, 0.2)[0])


def test_mismatched_word_starts_are_refused_once_checked(tmp_path):
    prefix = write_synthetic(str(tmp_path / "d"), np.full(20, 30), vocab=500, seed=0)
    other = write_synthetic(str(tmp_path / "e"), np.full(20, 31), vocab=500, seed=0)
    for ext in (".idx", ".bin"):
        os.replace(other + "_wordstart" + ext, prefix + "_wordstart" + ext)
    with pytest.raises(ValueError, match="different document lengths"):
        PretrainSamples([prefix], "100,0,0", "train", 128, seed=1, num_samples=5, masking=MASKING,
                        cache_dir=str(tmp_path / "c"))


def _race(prefix, cache, start_at, queue):
    from megatron_cmbert.data import sample_cache as sc

    while time.time() < start_at:  # start together, so both find the cache empty
        time.sleep(0.001)
    s = PretrainSamples([prefix], "100,0,0", "train", 128, seed=3, num_samples=3000, masking=MASKING,
                        cache_dir=cache)
    pieces, offsets, _ = s.parts[0].cache.open(0, s.parts[0].data.lengths)
    queue.put((dict(sc.BUILDS), np.asarray(pieces).tobytes(), np.asarray(offsets).tobytes()))


def test_concurrent_builders_build_once_and_agree(tmp_path):
    prefix = write_synthetic(str(tmp_path / "d"), np.random.default_rng(0).integers(1, 400, 20000),
                             vocab=500, seed=0)
    ctx = mp.get_context("spawn")  # fresh processes: nothing shared but the files
    queue = ctx.Queue()
    start_at = time.time() + 8  # spawned interpreters import torch first
    procs = [ctx.Process(target=_race, args=(prefix, str(tmp_path / "c"), start_at, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=90) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sum(r[0]["epoch"] for r in results) == 1 and sum(r[0]["check"] for r in results) == 1
    assert results[0][1:] == results[1][1:]
    assert not [p.name for p in (tmp_path / "c").iterdir() if ".tmp" in p.name or ".raw" in p.name]
