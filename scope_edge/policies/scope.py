"""SCOPE decode selection (Wu et al., 2024), shared by its three schedules.

Only generated cells are eligible; the prompt cells chosen at prefill are
never touched. Each schedule (slide.py, adaptive.py, discontinuous.py) only
decides when to select and how many to keep.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import EMPTY, DecodeStrategy
from .checks import require_head_reduce, require_int
from .scores import aggregate, evict_lowest, nothing_to_evict, require_attn


@dataclass(frozen=True, kw_only=True)
class ScopeDecode(DecodeStrategy):
    """Keep the last `recent` generated cells plus the older ones the current
    step attends to most (scores of this step only, not accumulated).

    decode: decode-cache cells at attention time (beta1 + beta2).
    recent: last generated cells always kept (beta2).
    head_reduce: "sum" or "max" over heads before summing layers.
    """

    decode: int
    recent: int
    head_reduce: str = "max"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        # decode >= 2: keep = decode - 1 must leave the newest cell, which
        # llama.cpp continues from.
        require_int(owner, "decode", self.decode, lo=2)
        require_int(owner, "recent", self.recent, lo=1, hi=self.decode)
        require_head_reduce(owner, self.head_reduce)

    def score(self, positions: np.ndarray, attn: np.ndarray) -> np.ndarray:
        """The current step's attention, aggregated per generated cell."""
        attn = require_attn(type(self).__name__, positions, attn)
        return aggregate(attn, head_reduce=self.head_reduce)

    def select(self, positions: np.ndarray, attn: np.ndarray | None, keep: int) -> np.ndarray:
        if nothing_to_evict(positions, keep):
            return EMPTY
        return evict_lowest(positions, self.score(positions, attn), keep=keep, protect=self.recent)
