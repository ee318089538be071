"""Numba kernels shared by the policies: plain functions over arrays.

Callers pass contiguous arrays of the documented dtypes (scores.py does the
conversion and validation), so each kernel compiles once and is cached.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def reduce_heads(attn: np.ndarray, head_max: bool) -> np.ndarray:
    """[n_layer, n_head, n] float32 -> [n] float64: heads summed (or maxed)
    per layer, then layers summed. float64 so long accumulations stay exact."""
    n_layer, n_head, n = attn.shape
    out = np.zeros(n, dtype=np.float64)
    per_layer = np.empty(n, dtype=np.float64)
    # Loops run along the contiguous last axis.
    for layer in range(n_layer):
        per_layer[:] = 0.0 if not head_max or n_head == 0 else -np.inf
        for h in range(n_head):
            for j in range(n):
                v = np.float64(attn[layer, h, j])
                if head_max:
                    per_layer[j] = max(per_layer[j], v)
                else:
                    per_layer[j] += v
        out += per_layer
    return out


@njit(cache=True)
def max_pool_1d(x2d: np.ndarray, before: int, after: int) -> np.ndarray:
    """Max over the window [j - before, j + after] along the last axis, per
    row; same length, window clipped at the edges. before = after = k // 2 is
    SnapKV's centred pooling of odd width k."""
    if before < 0 or after < 0:
        raise ValueError("max_pool_1d needs before >= 0 and after >= 0")
    n_row, n = x2d.shape
    out = np.empty_like(x2d)
    for r in range(n_row):
        for j in range(n):
            lo = max(0, j - before)
            hi = min(n, j + after + 1)
            best = x2d[r, lo]
            for k in range(lo + 1, hi):
                if x2d[r, k] > best:
                    best = x2d[r, k]
            out[r, j] = best
    return out


@njit(cache=True)
def select_evictions(
    positions: np.ndarray, scores: np.ndarray, keep: int, n_protect_tail: int
) -> np.ndarray:
    """Sorted positions to evict so that `keep` remain: the last
    n_protect_tail stay (only the last `keep` if keep is smaller), the rest
    keep their top scores. Ties evict the earlier position first."""
    n = positions.shape[0]
    if n <= keep:
        return np.empty(0, dtype=positions.dtype)
    keep = max(keep, 0)
    tail = min(max(n_protect_tail, 0), keep)
    n_candidates = n - tail
    n_evict = n - keep
    if n_evict == 1:  # a decode step's eviction: argmin takes the earliest of equal scores, as the sort does
        i = np.argmin(scores[:n_candidates])
        return positions[i : i + 1].copy()
    # Stable ascending sort: among equal scores the earlier index comes first.
    order = np.argsort(scores[:n_candidates], kind="mergesort")
    return np.sort(positions[order[:n_evict]])


@njit(cache=True)
def carry_scores(old_positions: np.ndarray, old_scores: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Scores of `positions` looked up in (old_positions, old_scores), 0 where
    absent. Both position arrays sorted ascending: one merge pass."""
    out = np.zeros(positions.shape[0], dtype=np.float64)
    i = 0
    n_old = old_positions.shape[0]
    for j in range(positions.shape[0]):
        while i < n_old and old_positions[i] < positions[j]:
            i += 1
        if i < n_old and old_positions[i] == positions[j]:
            out[j] = old_scores[i]
    return out


_warm = False


def warm() -> None:
    """Compile (or load from the cache) the kernels a decode step calls, with
    the dtypes the policies pass: a generation calls this before it starts,
    so its first eviction does not stall on them (10-30 ms from the cache,
    seconds when compiling) inside the decode loop."""
    global _warm
    if _warm:
        return
    reduce_heads(np.zeros((1, 1, 2), dtype=np.float32), False)
    positions = np.arange(2, dtype=np.int32)
    select_evictions(positions, np.zeros(2, dtype=np.float64), 1, 0)
    carry_scores(positions, np.zeros(2, dtype=np.float64), positions)
    _warm = True
