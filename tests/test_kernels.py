"""Numba kernels and their Python glue, on hand-made arrays."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scope_edge.policies.kernels import carry_scores, max_pool_1d, reduce_heads, select_evictions
from scope_edge.policies.scores import aggregate, evict_lowest


def i32(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int32)


def f64(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


# --- reduce_heads / aggregate ------------------------------------------------

ATTN = np.array(
    [
        [[0.1, 0.5, 0.0], [0.3, 0.2, 0.4]],  # layer 0: heads 0, 1
        [[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]],  # layer 1
    ],
    dtype=np.float32,
)


def test_reduce_heads_sum_then_layers() -> None:
    np.testing.assert_allclose(reduce_heads(ATTN, False), [1.4, 0.7, 2.4], rtol=1e-6)


def test_reduce_heads_max_then_layers() -> None:
    np.testing.assert_allclose(reduce_heads(ATTN, True), [1.3, 0.5, 2.4], rtol=1e-6)


def test_aggregate_layer_subset_and_dtype() -> None:
    out = aggregate(ATTN.astype(np.float64), head_reduce="max", layers=slice(1, 2))
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, [1.0, 0.0, 2.0])


def test_aggregate_rejects_bad_head_reduce_and_shape() -> None:
    with pytest.raises(ValueError, match="'mean'"):
        aggregate(ATTN, head_reduce="mean")
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        aggregate(np.zeros((2, 3), dtype=np.float32), head_reduce="sum")


def test_aggregate_empty_positions() -> None:
    assert aggregate(np.zeros((2, 3, 0), dtype=np.float32), head_reduce="sum").shape == (0,)


# --- max_pool_1d ---------------------------------------------------------------


def test_max_pool_clips_window_at_edges() -> None:
    x = np.array([[1, 0, 0, 5, 0, 0, 0, 2]], dtype=np.float32)
    np.testing.assert_array_equal(max_pool_1d(x, 1, 1), [[1, 1, 5, 5, 5, 0, 2, 2]])
    np.testing.assert_array_equal(max_pool_1d(x, 2, 2), [[1, 5, 5, 5, 5, 5, 2, 2]])


def test_max_pool_lopsided_window_reaches_further_back() -> None:
    x = np.array([[1, 0, 0, 5, 0, 0, 0, 2]], dtype=np.float32)
    # [j - 3, j + 1]: the hit at 3 lifts 2..6, the 1 at 0 reaches 3 cells on
    np.testing.assert_array_equal(max_pool_1d(x, 3, 1), [[1, 1, 5, 5, 5, 5, 5, 2]])
    np.testing.assert_array_equal(max_pool_1d(x, 0, 0), x)


def test_max_pool_zero_window_is_identity_and_wide_window_is_row_max() -> None:
    x = np.array([[3, 1, 2], [0, 4, 0]], dtype=np.float32)
    np.testing.assert_array_equal(max_pool_1d(x, 0, 0), x)
    np.testing.assert_array_equal(max_pool_1d(x, 3, 3), [[3, 3, 3], [4, 4, 4]])


def test_max_pool_empty_row_and_negative_reach() -> None:
    assert max_pool_1d(np.zeros((2, 0), dtype=np.float32), 1, 1).shape == (2, 0)
    with pytest.raises(ValueError):
        max_pool_1d(np.zeros((1, 4), dtype=np.float32), -1, 1)


# --- select_evictions ----------------------------------------------------------


def test_select_keeps_tail_and_top_scores() -> None:
    positions = i32(10, 11, 12, 13, 14)
    out = select_evictions(positions, f64(5, 1, 3, 1, 0), 3, 1)
    np.testing.assert_array_equal(out, [11, 13])
    assert out.dtype == np.int32


def test_select_ties_keep_the_later_position() -> None:
    out = select_evictions(i32(0, 1, 2, 3, 4), f64(1, 1, 1, 1, 1), 2, 0)
    np.testing.assert_array_equal(out, [0, 1, 2])


def test_select_keep_below_protect_keeps_last_keep() -> None:
    out = select_evictions(i32(0, 1, 2, 3, 4, 5), f64(9, 9, 9, 0, 0, 0), 2, 4)
    np.testing.assert_array_equal(out, [0, 1, 2, 3])


def test_select_nothing_to_evict_and_empty_input() -> None:
    assert select_evictions(i32(1, 2), f64(0, 0), 2, 0).size == 0
    assert select_evictions(i32(), f64(), 0, 3).size == 0


def test_select_one_eviction_is_the_sorts_choice() -> None:
    """A decode step evicts one cell through argmin, not the sort: the same
    cell, the earliest of equal lowest scores, whatever the tail."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 40))
        positions = np.sort(rng.choice(1000, n, replace=False)).astype(np.int32)
        scores = rng.integers(0, 4, n).astype(np.float64)  # few values: many ties
        protect = int(rng.integers(0, n))
        out = select_evictions(positions, scores, n - 1, protect)
        tail = min(protect, n - 1)
        order = np.argsort(scores[: n - tail], kind="mergesort")
        np.testing.assert_array_equal(out, positions[order[:1]])
        assert out.dtype == np.int32


def test_select_keep_zero_evicts_all() -> None:
    np.testing.assert_array_equal(select_evictions(i32(4, 7), f64(1, 2), 0, 5), [4, 7])


def test_evict_lowest_validates_with_numbers() -> None:
    with pytest.raises(ValueError, match="-1"):
        evict_lowest(i32(0, 1), f64(0, 0), keep=-1, protect=0)
    with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)"):
        evict_lowest(i32(0, 1, 2), f64(0, 0), keep=1, protect=0)
    with pytest.raises(ValueError, match="1 non-finite"):
        evict_lowest(i32(0, 1, 2), f64(0, np.nan, 1), keep=1, protect=0)


@settings(max_examples=200, deadline=None)
@given(
    positions=st.sets(st.integers(0, 10_000), max_size=40).map(sorted),
    data=st.data(),
)
def test_select_evictions_properties(positions: list[int], data: st.DataObject) -> None:
    n = len(positions)
    # Few distinct values, so ties are common.
    scores = f64(*data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)))
    keep = data.draw(st.integers(0, n + 2))
    protect = data.draw(st.integers(0, n + 2))
    pos = np.array(positions, dtype=np.int32)

    evicted = evict_lowest(pos, scores, keep=keep, protect=protect)

    assert len(evicted) == max(0, n - keep)
    assert np.all(np.diff(evicted) > 0) and np.isin(evicted, pos).all()
    tail = min(protect, keep)
    assert not np.isin(pos[n - tail :], evicted).any()
    # Every evicted candidate ranks below every kept candidate (ties: earlier goes).
    gone = np.isin(pos, evicted)
    kept_candidates = [(scores[i], pos[i]) for i in range(n - tail) if not gone[i]]
    for i in np.flatnonzero(gone):
        assert all((scores[i], pos[i]) < kept for kept in kept_candidates)


# --- carry_scores --------------------------------------------------------------


def test_carry_scores_merges_sorted_positions() -> None:
    out = carry_scores(i32(1, 3, 5, 9), f64(10, 30, 50, 90), i32(0, 3, 4, 5, 10))
    np.testing.assert_array_equal(out, [0, 30, 0, 50, 0])
    assert carry_scores(i32(), f64(), i32(2, 3)).tolist() == [0, 0]
