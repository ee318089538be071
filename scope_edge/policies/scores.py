"""Plain-Python glue around the kernels: validation, dtypes, aggregation.

Shared by every policy: a policy's score() turns attention into one float per
position, and evict_lowest() is the one top-k selection they all use
(kvpress's ScorerPress split).
"""
from __future__ import annotations

import numpy as np

from .base import EMPTY
from .checks import HEAD_REDUCTIONS
from .kernels import reduce_heads, select_evictions


def aggregate(attn: np.ndarray, *, head_reduce: str, layers: slice | None = None) -> np.ndarray:
    """[n_layer, n_head, n] attention -> [n] float64 cell scores: heads summed
    or maxed per layer, then the chosen layers summed."""
    if head_reduce not in HEAD_REDUCTIONS:
        raise ValueError(f"head_reduce must be one of {HEAD_REDUCTIONS}, got {head_reduce!r}")
    attn = np.asarray(attn)
    if attn.ndim != 3:
        raise ValueError(f"attn must be [n_layer, n_head, n], got shape {attn.shape}")
    if layers is not None:
        attn = attn[layers]
    # One dtype and layout, so the kernel compiles once.
    return reduce_heads(np.ascontiguousarray(attn, dtype=np.float32), head_reduce == "max")


def require_attn(owner: str, positions: np.ndarray, attn: np.ndarray | None) -> np.ndarray:
    """attn, checked to be present and aligned with positions."""
    if attn is None:
        raise ValueError(f"{owner} needs attention scores to select, got attn=None")
    attn = np.asarray(attn)
    if attn.ndim != 3 or attn.shape[2] != len(positions):
        raise ValueError(
            f"{owner}: attn must be [n_layer, n_head, {len(positions)}] to match positions, "
            f"got shape {attn.shape}"
        )
    return attn


def nothing_to_evict(positions: np.ndarray, keep: int) -> bool:
    """True when `keep` already covers every position (keep checked >= 0)."""
    if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or keep < 0:
        raise ValueError(f"keep must be an int >= 0, got {keep!r}")
    return len(positions) <= keep


def evict_lowest(positions: np.ndarray, scores: np.ndarray, *, keep: int, protect: int) -> np.ndarray:
    """Sorted int32 positions to evict: the last `protect` stay, the others
    keep their top scores (ties keep the later position), `keep` in all."""
    if nothing_to_evict(positions, keep):
        return EMPTY
    scores = np.ascontiguousarray(scores, dtype=np.float64)
    if scores.shape != (len(positions),):
        raise ValueError(f"scores must have shape ({len(positions)},), got {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError(f"scores must be finite, got {int((~np.isfinite(scores)).sum())} non-finite")
    positions = np.ascontiguousarray(positions, dtype=np.int32)
    return select_evictions(positions, scores, int(keep), int(protect))
