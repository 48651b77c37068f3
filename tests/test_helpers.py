"""The C++ helpers (megatron_cmbert._C) and their numpy twins give identical results."""
import numpy as np
import pytest

from megatron_cmbert.data import helpers

IMPLS = [pytest.param(helpers.word_start_flags_numpy, id="numpy")]
if helpers.HAVE_CPP:
    IMPLS.append(pytest.param(helpers._C.word_start_flags, id="cpp"))


@pytest.mark.parametrize("impl", IMPLS)
def test_word_start_flags_hand_computed(impl):
    # doc 0: text of 6 chars, words start at 0, 2, 3; tokens start at 0, 1, 2, 2(byte piece), 3, 5
    # doc 1 (chars 7..): words start at 7, 9; tokens at 7, 8, 9
    char_is_start = np.zeros(11, dtype=np.uint8)
    char_is_start[[0, 2, 3, 7, 9]] = 1
    starts = np.array([0, 1, 2, 2, 3, 5, 7, 8, 9], dtype=np.int64)
    offsets = np.array([0, 6, 9], dtype=np.int64)
    expected = [1, 0, 1, 0, 1, 0, 1, 0, 1]
    assert impl(starts, offsets, char_is_start).tolist() == expected


@pytest.mark.parametrize("impl", IMPLS)
def test_first_token_of_each_document_starts_a_unit_even_off_boundary(impl):
    char_is_start = np.zeros(8, dtype=np.uint8)  # no boundaries at all
    starts = np.array([1, 2, 4, 4], dtype=np.int64)
    offsets = np.array([0, 2, 2, 4], dtype=np.int64)  # an empty document in the middle
    assert impl(starts, offsets, char_is_start).tolist() == [1, 0, 1, 0]


@pytest.mark.parametrize("impl", IMPLS)
def test_rejects_offsets_outside_the_text(impl):
    with pytest.raises((IndexError, ValueError)):
        impl(np.array([0, 9]), np.array([0, 2]), np.ones(4, dtype=np.uint8))
    with pytest.raises(ValueError):
        impl(np.array([0, 1]), np.array([0, 1]), np.ones(4, dtype=np.uint8))


@pytest.mark.skipif(not helpers.HAVE_CPP, reason="C++ extension megatron_cmbert._C not built (no compiler)")
def test_cpp_and_numpy_agree_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n_docs = int(rng.integers(1, 8))
        doc_chars = rng.integers(1, 60, size=n_docs)
        char_is_start = (rng.random(int(doc_chars.sum())) < 0.5).astype(np.uint8)
        base = np.concatenate(([0], np.cumsum(doc_chars)[:-1]))
        starts, lengths = [], []
        for b, c in zip(base, doc_chars):
            k = int(rng.integers(0, c + 1))
            starts.append(np.sort(rng.integers(0, c, size=k)) + b)  # sorted, with repeats
            lengths.append(k)
        starts = np.concatenate(starts).astype(np.int64)
        offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
        a = helpers.word_start_flags_numpy(starts, offsets, char_is_start)
        b = helpers._C.word_start_flags(starts, offsets, char_is_start)
        assert a.dtype == b.dtype == np.uint8
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not helpers.HAVE_CPP, reason="C++ extension megatron_cmbert._C not built (no compiler)")
@pytest.mark.parametrize("seq_length,min_piece", [(20, 3), (64, 16), (1024, 16)])
def test_cpp_and_python_packing_agree_chunk_by_chunk(seq_length, min_piece):
    rng = np.random.default_rng(seq_length)
    lengths = rng.integers(0, 3 * seq_length, size=500).astype(np.int32)
    order = rng.permutation(500)
    whole = helpers.pack_chunk_python(lengths, order, seq_length, min_piece)
    used_py = used_cpp = 0
    got_pieces, got_ends = [], []
    for chunk in np.split(order, [1, 7, 250, 251]):  # an open sample carries over each cut
        a = helpers.pack_chunk_python(lengths, chunk, seq_length, min_piece, used_py)
        b = helpers._C.pack_chunk(lengths, chunk.astype(np.int64), seq_length, min_piece, used_cpp)
        assert a[0].dtype == b[0].dtype == np.int32 and a[1].dtype == b[1].dtype == np.int64
        for x, y in zip(a[:2], b[:2]):
            np.testing.assert_array_equal(x, y)
        assert a[2] == b[2]
        got_ends.append(b[1] + sum(len(p) for p in got_pieces))
        got_pieces.append(b[0])
        used_py, used_cpp = a[2], b[2]
    # the chunks together are the one-shot packing
    assert used_py == whole[2]
    np.testing.assert_array_equal(np.concatenate(got_pieces), whole[0])
    np.testing.assert_array_equal(np.concatenate(got_ends), whole[1])


@pytest.mark.skipif(not helpers.HAVE_CPP, reason="C++ extension megatron_cmbert._C not built (no compiler)")
@pytest.mark.parametrize("weights", [[0.03, 0.57, 0.1, 0.1, 0.2], [1.0], [0.5, 0.5], [0.0, 0.3, 0.7]])
def test_cpp_and_python_blending_agree_from_any_start(weights):
    w = np.array(weights) / np.sum(weights)
    counts_py = np.zeros(len(w), dtype=np.int64)
    counts_cpp = counts_py.copy()
    for start, n in ((0, 700), (700, 1), (701, 1300)):  # blocks continue where the last one stopped
        a = helpers.blend_block_python(w, counts_py, start, n)
        b = helpers._C.blend_block(w, counts_cpp, start, n)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(counts_py, counts_cpp)
