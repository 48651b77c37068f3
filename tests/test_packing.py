"""Packing of documents into unpadded samples, and Megatron-style blending ratios."""
import numpy as np
import pytest

from megatron_cmbert.data.packing import PIECE_OVERHEAD, blend_indices, pack_documents


@pytest.mark.parametrize("seq_length,min_piece", [(64, 4), (128, 16), (1024, 16)])
def test_packing_covers_every_token_once_within_budget(seq_length, min_piece):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 3 * seq_length, size=300)
    order = rng.permutation(lengths.size)
    pieces, offsets = pack_documents(lengths, seq_length, order, min_piece=min_piece)
    # every token of every document appears exactly once, pieces of a document in order
    for doc in range(lengths.size):
        mine = pieces[pieces[:, 0] == doc]
        assert mine[0, 1] == 0 and np.all(mine[1:, 1] == mine[:-1, 1] + mine[:-1, 2])
        assert mine[:, 2].sum() == lengths[doc]
    # documents are visited in the given order
    first_piece_doc = pieces[np.r_[True, pieces[1:, 0] != pieces[:-1, 0]], 0]
    np.testing.assert_array_equal(first_piece_doc, order)
    sizes = np.add.reduceat(pieces[:, 2] + PIECE_OVERHEAD, offsets[:-1])
    assert np.all(sizes <= seq_length) and offsets[-1] == len(pieces)
    # no sliver pieces: a piece shorter than min_piece is a whole (short) document or its tail
    short = pieces[pieces[:, 2] < min_piece]
    assert np.all((short[:, 1] == 0) & (short[:, 2] == lengths[short[:, 0]]) |
                  (short[:, 1] + short[:, 2] == lengths[short[:, 0]]))
    # samples are well filled: all but the last lose less than min_piece + overhead tokens
    assert np.all(sizes[:-1] > seq_length - min_piece - 2 * PIECE_OVERHEAD)


def test_packing_hand_computed():
    # seq 16: doc0 (10) fits with [CLS][SEP] = 12; 4 left -> doc1 (20) would be a sliver of 2 < min 3,
    # so a new sample starts: 14 tokens of doc1, then 6; then doc2 (3) joins the third sample.
    pieces, offsets = pack_documents(np.array([10, 20, 3]), 16, np.array([0, 1, 2]), min_piece=3)
    assert pieces.tolist() == [[0, 0, 10], [1, 0, 14], [1, 14, 6], [2, 0, 3]]
    assert offsets.tolist() == [0, 1, 2, 4]


def test_packing_rejects_too_short_sequences():
    with pytest.raises(ValueError, match="no room"):
        pack_documents(np.array([5]), 10, np.array([0]), min_piece=8)


@pytest.mark.parametrize("weights", [[0.57, 0.2, 0.23], [1, 1], [0.9, 0.05, 0.05]])
def test_blend_ratios(weights):
    n = 5000
    dataset, within = blend_indices(np.array(weights), n)
    share = np.bincount(dataset, minlength=len(weights)) / n
    target = np.array(weights) / np.sum(weights)
    np.testing.assert_allclose(share, target, atol=0.02)
    for d in range(len(weights)):  # each dataset is read in order, without gaps
        np.testing.assert_array_equal(within[dataset == d], np.arange((dataset == d).sum()))
    # at every prefix the counts trail the target by less than one sample
    counts = np.cumsum(np.eye(len(weights))[dataset], axis=0)
    assert np.all(np.abs(counts - np.outer(np.arange(1, n + 1), target)) < 1.0 + 1e-9)


def test_blend_rejects_bad_weights():
    with pytest.raises(ValueError):
        blend_indices(np.array([0.0, 0.0]), 3)
    with pytest.raises(ValueError):
        blend_indices(np.array([0.5, -0.1]), 3)


def test_lazy_blend_index_equals_the_full_computation():
    from megatron_cmbert.data.packing import BlendIndex

    weights = np.array([0.03, 0.57, 0.1, 0.1, 0.2])
    dataset, within = blend_indices(weights, 5000)
    lazy = BlendIndex(weights, 5000, block=256)  # many blocks, read out of order too
    for i in list(range(4999, 4000, -7)) + list(range(0, 5000, 3)):
        assert lazy[i] == (dataset[i], within[i])
    with pytest.raises(IndexError):
        lazy[5000]
