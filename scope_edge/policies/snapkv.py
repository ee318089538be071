"""SnapKV prefill selection (Li et al., 2024): the last `window` prompt
queries vote for the earlier cells, smoothed by max-pooling."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .checks import require_head_reduce, require_int
from .kernels import max_pool_1d
from .scored import ScoredPrefill
from .scores import aggregate


@dataclass(frozen=True, kw_only=True)
class SnapKV(ScoredPrefill):
    """Keep the observation window plus the prompt cells it attends to most.

    budget: prompt cells kept (None: all).
    window: last prompt tokens, always kept, whose attention rows score the
        rest; at most budget.
    kernel: odd max-pool width; pooling keeps neighbours of a hit, so kept
        spans stay contiguous enough to read.
    head_reduce: "sum" or "max" over heads before summing layers.
    """

    name: ClassVar[str] = "snapkv"

    window: int = 8
    kernel: int = 7
    head_reduce: str = "max"

    def __post_init__(self) -> None:
        super().__post_init__()
        require_int("SnapKV", "window", self.window, lo=1, hi=self.budget)
        require_int("SnapKV", "kernel", self.kernel, lo=1)
        if self.kernel % 2 == 0:
            raise ValueError(f"SnapKV.kernel must be odd, got {self.kernel}")
        require_head_reduce("SnapKV", self.head_reduce)

    @property
    def protected(self) -> int:
        return self.window

    def capture_from(self, n_prompt: int) -> int | None:
        return max(0, n_prompt - self.window)

    def score(self, positions: np.ndarray, attn: np.ndarray) -> np.ndarray:
        """One score per position: per-head attention max-pooled, then aggregated."""
        attn = np.asarray(attn)
        n_layer, n_head, n = attn.shape
        # Pool only the prefix, as SnapKV does: the window's own (diagonal-heavy)
        # scores must not bleed into its neighbours; the window is kept anyway.
        n_prefix = max(0, n - self.window)
        pooled = np.array(attn, dtype=np.float32, copy=True)
        prefix = np.ascontiguousarray(pooled[:, :, :n_prefix]).reshape(n_layer * n_head, n_prefix)
        pooled[:, :, :n_prefix] = max_pool_1d(prefix, self.kernel).reshape(n_layer, n_head, n_prefix)
        return aggregate(pooled, head_reduce=self.head_reduce)
