"""TOVA (Oren et al., 2024) as a scope_edge policy, written on the public API.

Unified: prompt and generated cells share `total` cells. Once full, each step
evicts the cell the current query attends to least (heads summed, i.e. the
mean up to a constant, then layers summed); the newest cell always stays.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from scope_edge.policies import Policy, ScoredDecode, SnapKV, UnifiedDecode, aggregate


@dataclass(frozen=True, kw_only=True)
class TOVA(UnifiedDecode, ScoredDecode):
    """Keep `total` cells; UnifiedDecode plans (evict to total - 1, capturing
    this step's row, once full) and counts cells; ScoredDecode selects."""

    name: ClassVar[str] = "tova"
    total: int

    def score(self, positions: np.ndarray, attn: np.ndarray) -> np.ndarray:
        return aggregate(attn, head_reduce="sum")


def tova(total: int) -> Policy:
    """TOVA end to end: the prompt is scored by its last row alone (SnapKV
    with a one-token window and no pooling), then TOVA decoding."""
    prefill = SnapKV(window=1, kernel=1, lookback=0, head_reduce="sum")
    return Policy(prefill=prefill, decode=TOVA(total=total))
