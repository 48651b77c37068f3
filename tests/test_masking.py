"""Whole-word masking statistics on real text: rate, whole units, special tokens, 80/10/10."""
import numpy as np
import pytest

from megatron_cmbert.data.encode import DocumentEncoder
from megatron_cmbert.data.masking import IGNORE_INDEX, MaskingConfig, mask_tokens, sample_rng, select_units
from megatron_cmbert.data.tokenizer import CLS_ID, MASK_ID, SEP_ID

SPECIAL = (0, 1, 2, 3, 4)


@pytest.fixture(scope="module")
def samples(tokenizer_dir, inews_dev):
    """Real samples: 2-3 documents' pieces of up to 200 tokens, each as [CLS] piece [SEP]."""
    chunk = DocumentEncoder(tokenizer_dir).encode(inews_dev[:300])
    ends = np.cumsum(chunk.lengths)
    docs = [(chunk.tokens[e - n:e][:200], chunk.word_starts[e - n:e][:200]) for e, n in zip(ends, chunk.lengths)]
    out = []
    for i in range(0, len(docs) - 2, 3):
        toks, flags = [], []
        for t, f in docs[i:i + 3]:
            toks += [CLS_ID, *t.tolist(), SEP_ID]
            flags += [1, *f.tolist(), 1]
        out.append((np.array(toks), np.array(flags, dtype=np.uint8)))
    return out


def units_of(tokens, flags):
    """Whole-word units written plainly: a unit starts at a flagged or post-special maskable token
    and runs until the next start or special token."""
    units, current = [], None
    for i, (t, f) in enumerate(zip(tokens, flags)):
        if t in SPECIAL:
            current = None
            continue
        if f or current is None:
            current = []
            units.append(current)
        current.append(i)
    return units


def cfg(vocab=8192, **kw):
    return MaskingConfig(mask_token_id=MASK_ID, vocab_size=vocab, **kw)


@pytest.mark.parametrize("rate", [0.15, 0.30])
@pytest.mark.parametrize("granularity", ["word", "token"])
def test_rate_units_and_special_tokens(samples, rate, granularity):
    masked = maskable = 0
    for index, (tokens, flags) in enumerate(samples):
        inputs, labels = mask_tokens(tokens, flags, rate, sample_rng(1234, index), cfg(granularity=granularity))
        special = np.isin(tokens, SPECIAL)
        assert np.all(inputs[special] == tokens[special]) and np.all(labels[special] == IGNORE_INDEX)
        selected = labels != IGNORE_INDEX
        assert np.all(labels[selected] == tokens[selected])
        assert np.all(inputs[~selected] == tokens[~selected])  # nothing else is touched
        units = units_of(tokens, flags) if granularity == "word" else [[i] for i in np.flatnonzero(~special)]
        for unit in units:  # a unit is masked whole or not at all
            assert selected[unit].all() or not selected[unit].any(), unit
        masked += int(selected.sum())
        maskable += int((~special).sum())
    realised = masked / maskable
    assert abs(realised - rate) < 0.01 * rate, f"realised {realised:.4f} for target {rate}"


def test_replacement_shares_are_80_10_10(samples):
    counts = np.zeros(3)
    for index, (tokens, flags) in enumerate(samples * 4):
        inputs, labels = mask_tokens(tokens, flags, 0.3, sample_rng(7, index), cfg())
        sel = labels != IGNORE_INDEX
        is_mask = inputs[sel] == MASK_ID
        same = inputs[sel] == tokens[sel]
        counts += [is_mask.sum(), (~is_mask & ~same).sum(), same.sum()]
        assert np.all(inputs[sel][~is_mask & ~same] >= 5)  # random replacements are regular tokens
    n = counts.sum()
    shares = counts / n
    # Random draws equal the original with probability ~1/8187, negligible next to the tolerance.
    tol = 5 * np.sqrt(0.1 * 0.9 / n)  # 5 binomial standard errors
    assert n > 20_000
    np.testing.assert_allclose(shares, [0.8, 0.1, 0.1], atol=tol)


def test_same_seed_and_index_give_the_same_masks(samples):
    tokens, flags = samples[0]
    a = mask_tokens(tokens, flags, 0.2, sample_rng(3, 10), cfg())
    b = mask_tokens(tokens, flags, 0.2, sample_rng(3, 10), cfg())
    c = mask_tokens(tokens, flags, 0.2, sample_rng(3, 11), cfg())
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])


def test_unit_selection_hits_the_target_in_expectation():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 5, size=40)  # units of 1-4 tokens
    unit_ids = np.repeat(np.arange(40), sizes)
    n = int(sizes.sum())
    for rate in (0.05, 0.15, 0.3, 1.0):
        draws = [sizes[select_units(unit_ids, 40, n, rate, rng)].sum() for _ in range(4000)]
        expected = rate * n
        stderr = np.std(draws) / np.sqrt(len(draws)) + 1e-9
        assert abs(np.mean(draws) - expected) < 5 * stderr + 1e-6, (rate, np.mean(draws), expected)
    assert not select_units(unit_ids, 40, n, 0.0, rng).any()


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="granularity"):
        cfg(granularity="char")
    with pytest.raises(ValueError, match="sum to at most 1"):
        cfg(mask_prob=0.95, random_prob=0.1)
