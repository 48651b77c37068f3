"""The host-side attention plan (kernels/block_plan.py) against the dense document x window mask built from
scratch (tests/dense_attention.py): per-token key and query bounds, and per block of consecutive tokens the
visited columns (every one reached by some row, none missed) and the columns every row reaches."""
import numpy as np
import pytest

from megatron_cmbert.kernels.block_plan import block_ranges, token_key_bounds, token_query_bounds, work_items

from dense_attention import construct_local_mask

# One long sequence among many short ones, one-token and zero-length sequences, lengths that are not
# multiples of any block size, zero-length sequences at the end as static-shape padding leaves them.
SKEWED = [0, 150, 1, 0, 0, 5, 2, 3, 0, 37, 1, 3, 0, 64, 1] + [0] * 30
WINDOWS = [(-1, -1), (64, 64), (0, 0), (3, 1), (-1, 2), (5, -1)]


@pytest.mark.parametrize("window", WINDOWS)
def test_token_bounds_are_the_dense_mask_rows_and_columns(window):
    keep = construct_local_mask(SKEWED, window).numpy()
    total = keep.shape[0]
    lo, hi = token_key_bounds(SKEWED, window)
    cols = np.arange(total)
    expected = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
    assert np.array_equal(expected, keep)
    qlo, qhi = token_query_bounds(SKEWED, window)  # per key: the queries that see it (the mask's columns)
    assert np.array_equal((cols[:, None] >= qlo[None, :]) & (cols[:, None] < qhi[None, :]), keep)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("block", [1, 16, 64, 128])
def test_block_ranges_visit_exactly_the_columns_some_row_sees(window, block):
    keep = construct_local_mask(SKEWED, window).numpy()
    total = keep.shape[0]
    ranges = block_ranges(*token_key_bounds(SKEWED, window), block)
    assert ranges.shape == (-(-total // block), 4)
    for b, (lo, hi, full_lo, full_hi) in enumerate(ranges):
        rows = keep[b * block:(b + 1) * block]
        seen = np.flatnonzero(rows.any(0))
        assert (lo, hi) == (seen.min(), seen.max() + 1) and seen.size == hi - lo  # one interval, no gap
        every = np.flatnonzero(rows.all(0))
        if every.size:
            assert (full_lo, full_hi) == (every.min(), every.max() + 1) and every.size == full_hi - full_lo
        else:
            assert full_hi <= full_lo


def test_zero_length_sequences_change_no_shape_and_no_item():
    base = [150, 1, 5, 2, 3, 37, 1, 3, 64, 1]
    padded = [0, 0, *base[:3], 0, *base[3:]] + [0] * 1000  # ~budget/3 sequence slots, mostly empty
    for window in ((-1, -1), (64, 64)):
        for block in (64, 128):
            a = work_items(*token_key_bounds(base, window), block)
            b = work_items(*token_key_bounds(padded, window), block)
            assert a.shape == b.shape == (-(-sum(base) // block), 5) and np.array_equal(a, b)


def test_work_items_cover_every_token_once_heaviest_first():
    lo, hi = token_key_bounds(SKEWED, (-1, -1))
    items = work_items(lo, hi, 16)
    assert items.dtype == np.int32
    assert sorted(items[:, 0].tolist()) == list(range(0, sum(SKEWED), 16))
    work = items[:, 2] - items[:, 1]
    assert np.all(np.diff(work) <= 0)  # the long sequence's blocks first


def test_empty_batch_has_no_items():
    assert work_items(*token_key_bounds([0, 0], (-1, -1)), 64).shape == (0, 5)
