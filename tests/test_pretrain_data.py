"""Pretraining samples from real indexed datasets: packing back to the documents, blending, splits,
data-parallel slicing and determinism."""
import json

import numpy as np
import pytest
import torch

from megatron_cmbert.data.masking import IGNORE_INDEX, MaskingConfig
from megatron_cmbert.data.pretrain_data import (MicroBatchSchedule, PretrainSamples, StepSchedule, TokenDataset,
                                                parse_data_path, split_ranges, step_loader)
from megatron_cmbert.data.tokenizer import CLS_ID, MASK_ID, SEP_ID
from tools import preprocess_data


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory, tokenizer_dir, inews_dev):
    """Two indexed datasets built by the real builder: 300 and 200 news articles."""
    root = tmp_path_factory.mktemp("pretrain_data")
    out = []
    for name, texts in (("a", inews_dev[:300]), ("b", inews_dev[300:500])):
        src = root / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
        preprocess_data.run(["--input", str(src), "--tokenizer-model", tokenizer_dir,
                              "--output-prefix", str(root / name), "--quiet"])
        out.append(str(root / f"{name}_text_document"))
    return out


MASKING = MaskingConfig(mask_token_id=MASK_ID, vocab_size=8192)


def test_parse_data_path_and_split():
    assert parse_data_path(["p"]) == ([1.0], ["p"])
    assert parse_data_path(["0.7", "a", "0.3", "b"]) == ([0.7, 0.3], ["a", "b"])
    with pytest.raises(ValueError, match="pairs"):
        parse_data_path(["0.7", "a", "b"])
    with pytest.raises(ValueError, match="numbers"):
        parse_data_path(["a", "b"])
    assert split_ranges("98,2,0", 100) == [(0, 98), (98, 100), (100, 100)]
    assert split_ranges("1", 7) == [(0, 7), (7, 7), (7, 7)]
    with pytest.raises(ValueError):
        split_ranges("1,2,3,4", 10)


def test_samples_are_the_documents_packed(prefixes):
    seq = 256
    samples = PretrainSamples([prefixes[0]], "100,0,0", "train", seq, seed=1, num_samples=2000,
                              masking=MASKING)
    data = TokenDataset(prefixes[0])
    part = samples.parts[0]
    rebuilt = {}
    j = 0
    while part._epoch_starts[-1] == 0 or j < part._epoch_starts[1]:  # one full epoch
        tokens, flags, lens = part.sample(j)
        assert tokens.size == lens.sum() <= seq
        cu = np.concatenate(([0], np.cumsum(lens)))
        for (doc, start, length), lo, hi in zip(part.pieces(j).tolist(), cu[:-1], cu[1:]):
            assert tokens[lo] == CLS_ID and tokens[hi - 1] == SEP_ID and flags[lo + 1] == 1
            rebuilt.setdefault(doc, {})[start] = tokens[lo + 1:hi - 1]
        j += 1
    assert sorted(rebuilt) == [d for d in range(len(data.lengths)) if data.lengths[d] > 0]
    for doc, parts in rebuilt.items():  # every document comes back whole, exactly once
        np.testing.assert_array_equal(np.concatenate([parts[s] for s in sorted(parts)]), data.tokens[doc])


def test_blend_split_and_determinism(prefixes):
    args = (["0.7", prefixes[0], "0.3", prefixes[1]], "90,10,0")
    train = PretrainSamples(*args, "train", 128, seed=5, num_samples=3000, masking=MASKING)
    share = np.bincount([train.blend[i][0] for i in range(len(train))], minlength=2) / len(train)
    np.testing.assert_allclose(share, [0.7, 0.3], atol=0.02)
    again = PretrainSamples(*args, "train", 128, seed=5, num_samples=3000, masking=MASKING)
    for index in (0, 17, 2999):
        for x, y in zip(train.sample(index, 0.2), again.sample(index, 0.2)):
            np.testing.assert_array_equal(x, y)
    valid = PretrainSamples(*args, "valid", 128, seed=5, num_samples=50, masking=MASKING)
    train_docs = {(d, int(p)) for d, p in enumerate(train.parts) for p in p.docs}
    valid_docs = {(d, int(p)) for d, p in enumerate(valid.parts) for p in p.docs}
    assert train_docs and valid_docs and not (train_docs & valid_docs)
    with pytest.raises(ValueError, match="no documents in the test split"):
        PretrainSamples(*args, "test", 128, seed=5, num_samples=10, masking=MASKING)


def test_micro_batches_split_the_global_batch_across_data_parallel_ranks(prefixes):
    samples = PretrainSamples([prefixes[0]], "100,0,0", "train", 128, seed=3, num_samples=64, masking=MASKING)
    rate_at = lambda step: 0.15 + 0.01 * step
    single = MicroBatchSchedule(samples, global_batch=8, micro_batch=4, dp_size=1, dp_rank=0, rate_at=rate_at)
    ranks = [MicroBatchSchedule(samples, 8, 2, 2, r, rate_at) for r in range(2)]
    assert len(single) == 16 and all(len(r) == 16 for r in ranks)
    for step in range(8):
        whole = torch.cat([single[2 * step + k].input_ids for k in range(2)])
        parts = torch.cat([ranks[r][2 * step + k].input_ids for r in range(2) for k in range(2)])
        assert torch.equal(whole, parts)
    mb = single[5]
    assert mb.mask_rate == pytest.approx(0.17)
    assert mb.cu_seqlens[-1] == mb.input_ids.numel() and mb.max_seqlen <= 128
    predicted = mb.labels != IGNORE_INDEX
    assert 0 < predicted.sum() < mb.input_ids.numel()
    with pytest.raises(ValueError, match="multiple of"):
        MicroBatchSchedule(samples, 8, 3, 1, 0, rate_at)
    resumed = MicroBatchSchedule(samples, 8, 4, 1, 0, rate_at, first_step=3)
    assert torch.equal(resumed[0].input_ids, single[6].input_ids) and len(resumed) == 10


def _rate_at(step):  # module level: worker processes pickle the schedule
    return 0.15 + 0.01 * step


@pytest.mark.parametrize("num_workers", [0, 2])
def test_step_loader_yields_the_micro_batches_grouped_per_step(prefixes, num_workers):
    samples = PretrainSamples([prefixes[0]], "100,0,0", "train", 128, seed=3, num_samples=96, masking=MASKING)
    for dp_rank in range(2):
        args = (samples, 12, 3, 2, dp_rank, _rate_at)  # 2 micro-batches per step and rank
        micro = MicroBatchSchedule(*args, first_step=1, num_steps=5)
        steps = list(step_loader(StepSchedule(*args, first_step=1, num_steps=5), num_workers))
        assert [len(s) for s in steps] == [2] * 5
        flat = [mb for step in steps for mb in step]
        assert len(flat) == len(micro) == 10
        for k, mb in enumerate(flat):
            expected = micro[k]
            for field in ("input_ids", "labels", "cu_seqlens"):
                a, b = getattr(mb, field), getattr(expected, field)
                assert a.dtype == b.dtype and torch.equal(a, b), (k, field)
            assert (mb.max_seqlen, mb.mask_rate) == (expected.max_seqlen, expected.mask_rate)
        assert steps[0][0].mask_rate == pytest.approx(0.16)  # step 1 (first_step)
    with pytest.raises(IndexError):
        StepSchedule(*args, first_step=1, num_steps=5)[5]
