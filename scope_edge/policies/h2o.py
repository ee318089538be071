"""H2O (Zhang et al., 2023): heavy hitters by accumulated attention, plus the
most recent tokens. A prefill selector, and the unified decode baseline."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .base import EMPTY, ReducesHeads, StepPlan, UnifiedDecode
from ..checks import require_int
from .checks import require_head_reduce
from .kernels import carry_scores
from .scored import ScoredDecode, ScoredPrefill
from .scores import aggregate, require_attn


@dataclass(frozen=True, kw_only=True)
class H2OPrefill(ScoredPrefill):
    """Keep the last `recent` prompt cells plus those that every prompt query
    together attended to most (the SCOPE reference's main prefill scoring).

    budget: prompt cells kept (None: all, or the unified baseline's room).
    """

    name: ClassVar[str] = "h2o"

    recent: int
    head_reduce: str = "max"

    def __post_init__(self) -> None:
        super().__post_init__()
        # recent >= 1: the last prompt cell must survive, decoding continues from it.
        require_int("H2OPrefill", "recent", self.recent, lo=1, hi=self.budget)
        require_head_reduce("H2OPrefill", self.head_reduce)

    @property
    def protected(self) -> int:
        return self.recent

    def capture_from(self, n_prompt: int) -> int | None:
        return 0

    def score(self, positions: np.ndarray, attn: np.ndarray) -> np.ndarray:
        """Attention summed over all captured prompt rows, aggregated per cell."""
        return aggregate(attn, head_reduce=self.head_reduce)


def _empty_scores() -> np.ndarray:
    return np.zeros(0, dtype=np.float64)


def _empty_positions() -> np.ndarray:
    return EMPTY.copy()


@dataclass(kw_only=True)
class H2O(ReducesHeads, UnifiedDecode, ScoredDecode):
    """Unified H2O baseline: prompt and generated cells share `total` cells;
    each cell's score is its attention accumulated over every observed step
    (the prompt's rows included).

    Holds per-generation state: bind() (Policy.for_generation) gives a fresh copy.
    """

    name: ClassVar[str] = "h2o"
    needs_attn: ClassVar[bool] = False  # attn is already in the sums: observe() comes first

    total: int
    recent: int
    head_reduce: str = "max"
    _positions: np.ndarray = field(default_factory=_empty_positions, init=False, repr=False, compare=False)
    _scores: np.ndarray = field(default_factory=_empty_scores, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        require_int("H2O", "recent", self.recent, lo=1, hi=self.total - 1)
        require_head_reduce("H2O", self.head_reduce)

    @property
    def protected(self) -> int:
        return self.recent

    def plan(self, step: int, n_held: int) -> StepPlan:
        # Every step's row feeds the running sums, evicting or not.
        return StepPlan(keep=self.keep_at(n_held), capture=True)

    def observe(self, positions: np.ndarray, attn: np.ndarray) -> None:
        positions = np.ascontiguousarray(positions, dtype=np.int32)
        step_scores = aggregate(require_attn("H2O", positions, attn), head_reduce=self.head_reduce)
        # Cells no longer held drop out: the state is exactly `positions`.
        self._scores = carry_scores(self._positions, self._scores, positions) + step_scores
        self._positions = positions.copy()

    def reindex(self, old: np.ndarray, new: np.ndarray) -> None:
        scores = carry_scores(self._positions, self._scores, old)
        self._positions, self._scores = new.astype(self._positions.dtype), scores

    def accumulated(self, positions: np.ndarray) -> np.ndarray:
        """Accumulated score of each position (0 for never observed)."""
        positions = np.ascontiguousarray(positions, dtype=np.int32)
        return carry_scores(self._positions, self._scores, positions)

    def score(self, positions: np.ndarray, attn: np.ndarray | None) -> np.ndarray:
        """The accumulated scores (attn is already in them)."""
        return self.accumulated(positions)
