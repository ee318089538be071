"""StreamingLLM (Xiao et al., 2024): attention sinks plus a recent window."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import EMPTY, PrefillSelector, StepPlan, UnifiedDecode
from ..checks import require_int
from .scores import nothing_to_evict


def evict_middle(positions: np.ndarray, keep: int, sinks: int) -> np.ndarray:
    """Evict all but the first `sinks` and the most recent of `positions`.
    The newest position always stays (when keep >= 1): decoding continues
    from it, so sinks give way first when keep is small."""
    if nothing_to_evict(positions, keep):
        return EMPTY
    n = len(positions)
    head = min(sinks, max(keep - 1, 0))
    return np.ascontiguousarray(positions[head : n - (keep - head)], dtype=np.int32)


@dataclass(frozen=True)
class StreamingPrefill(PrefillSelector):
    """Keep the first `sinks` prompt cells and the most recent rest; no scores.

    budget: prompt cells kept (None: all, or the unified baseline's room).
    """

    name: ClassVar[str] = "streaming"
    scored: ClassVar[bool] = False

    sinks: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        require_int("StreamingPrefill", "sinks", self.sinks, lo=0)

    def capture_from(self, n_prompt: int) -> int | None:
        return None

    def select(self, positions: np.ndarray, attn: np.ndarray | None, *, keep: int) -> np.ndarray:
        return evict_middle(positions, keep, self.sinks)


@dataclass(frozen=True, kw_only=True)
class Streaming(UnifiedDecode):
    """Unified StreamingLLM baseline: `total` cells for prompt and generated
    text together; the oldest non-sink cell goes first. Never captures."""

    name: ClassVar[str] = "streaming"
    scored: ClassVar[bool] = False

    total: int
    sinks: int = 4

    def __post_init__(self) -> None:
        require_int("Streaming", "sinks", self.sinks, lo=0)
        super().__post_init__()
        # Room for the sinks, one older cell and the newest: total - 1 kept per step.
        require_int("Streaming", "total", self.total, lo=self.sinks + 2)

    def plan(self, step: int, n_held: int) -> StepPlan:
        return StepPlan(keep=self.keep_at(n_held), capture=False)

    def select(self, positions: np.ndarray, attn: np.ndarray | None, keep: int) -> np.ndarray:
        return evict_middle(positions, keep, self.sinks)
