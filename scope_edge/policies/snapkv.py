"""SnapKV prefill selection (Li et al., 2024): the last `window` prompt
queries vote for the earlier cells, smoothed by max-pooling.

The pooling here looks back: a cell takes the best score of itself and the
`lookback` cells before it (the paper's window is centred, width 7). The
prompt's last queries attend to the first token of a name or a number far
more than to its later tokens (a word's other sub-words, a quantity's second
digit), which the output needs all the same. On the ordered suite at 2x the
prefill budget the centred window lost about one key token in 25 (mostly a
quantity's second digit) and scored 74% of the full cache; looking back 6
cells kept every key token (bench/results/ordered.json, README Results).
`SnapKV(kernel=7, lookback=0)` is the paper's pooling.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..checks import require_int
from .checks import require_head_reduce
from .kernels import max_pool_1d
from .scored import ScoredPrefill
from .scores import aggregate


@dataclass(frozen=True, kw_only=True)
class SnapKV(ScoredPrefill):
    """Keep the observation window plus the prompt cells it attends to most.

    budget: prompt cells kept (None: all).
    window: last prompt tokens, always kept, whose attention rows score the
        rest; at most budget.
    kernel: odd max-pool width, centred on the cell; pooling keeps
        neighbours of a hit, so kept spans stay contiguous enough to read.
    lookback: further cells before a cell that its pooling window covers, so
        the later tokens of an attended span inherit its score. The window
        is [j - kernel // 2 - lookback, j + kernel // 2].
    head_reduce: "sum" or "max" over heads before summing layers.
    probe: under a chunked prefill, score each earlier chunk with the
        prompt's own last `window` tokens run after it as probe queries (then
        removed), so every chunk is selected by the question at the prompt's
        end, as a one-shot prefill is. False: an earlier chunk is scored by
        its own last `window` rows.
    """

    name: ClassVar[str] = "snapkv"

    window: int = 8
    kernel: int = 1
    lookback: int = 6
    head_reduce: str = "max"
    probe: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require_int("SnapKV", "window", self.window, lo=1, hi=self.budget)
        require_int("SnapKV", "kernel", self.kernel, lo=1)
        if self.kernel % 2 == 0:
            raise ValueError(f"SnapKV.kernel must be odd, got {self.kernel}")
        require_int("SnapKV", "lookback", self.lookback, lo=0)
        require_head_reduce("SnapKV", self.head_reduce)
        if not isinstance(self.probe, bool):
            raise ValueError(f"SnapKV.probe must be True or False, got {self.probe!r}")

    @property
    def protected(self) -> int:
        return self.window

    @property
    def probe_tokens(self) -> int:
        return self.window if self.probe else 0

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
        half = self.kernel // 2
        pooled[:, :, :n_prefix] = max_pool_1d(prefix, half + self.lookback, half).reshape(n_layer, n_head, n_prefix)
        return aggregate(pooled, head_reduce=self.head_reduce)
