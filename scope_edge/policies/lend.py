"""Lending the decode room to the prompt (issue #17): no allocated cell
stands empty.

SCOPE allocates prefill + decode cells, but the decode half fills only as
the output grows. A Lend keeps up to `room - 1` extra prompt cells after the
prefill selection (the cells the prefill budget alone would evict, best
scored first) and gives them back one by one as generated cells need the
room, until only the prefill budget's remain. The allocation and the peak
memory are the same as without lending.

Which borrowed cell goes back first is the subclass's score(): it sees the
prompt cells still held and the current decode step's attention over them,
and observe() sees every decode step while cells are on loan.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .base import EMPTY, ReadsAttention, ReducesHeads
from ..checks import require_int
from .checks import require_head_reduce
from .kernels import carry_scores
from .scores import aggregate, evict_lowest, nothing_to_evict, require_attn


@dataclass(kw_only=True)
class Lend(ReadsAttention, ABC):
    """How many prompt cells are on loan, and which go back first.

    room: decode cells of the allocation, filled in by bind()
        (Policy.for_generation); None: not bound, nothing is lent.
    sinks: first prompt cells never given back (the system turn's start).
    protected: last prompt cells never given back (the instruction and the
        assistant header the output continues from).
    head_reduce: "sum" or "max" over heads before summing layers.

    Subclasses are dataclasses; bind() starts their state fields afresh.
    """

    name: ClassVar[str]

    room: int | None = None
    sinks: int = 4
    protected: int = 32
    head_reduce: str = "max"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.room is not None:
            require_int(owner, "room", self.room, lo=1)
        require_int(owner, "sinks", self.sinks, lo=0)
        require_int(owner, "protected", self.protected, lo=1)
        require_head_reduce(owner, self.head_reduce)

    def bind(self, room: int) -> Lend:
        """A fresh copy for one generation whose decode phase has `room` cells."""
        require_int(f"{type(self).__name__}.bind", "room", room, lo=1)
        return dataclasses.replace(self, room=room)

    def lent(self, *, floor: int, n_prompt: int) -> int:
        """Extra prompt cells kept above `floor` out of n_prompt: one decode
        cell stays free for the first generated token."""
        if self.room is None:
            return 0
        return max(0, min(n_prompt - floor, self.room - 1))

    def observe(self, positions: np.ndarray, attn: np.ndarray) -> None:
        """A decode step's attention over the prompt cells held (positions)."""

    def reindex(self, old: np.ndarray, new: np.ndarray) -> None:
        """Held positions `old` were renumbered to `new` (same order)."""

    @abstractmethod
    def score(self, positions: np.ndarray, attn: np.ndarray) -> np.ndarray:
        """One float per prompt position (higher stays); attn is this step's,
        checked to be [n_layer, n_head, len(positions)]."""

    def select(self, positions: np.ndarray, attn: np.ndarray | None, keep: int) -> np.ndarray:
        """Prompt positions to give back so that `keep` remain: the lowest
        scored, never the first `sinks` nor the last `protected`."""
        if nothing_to_evict(positions, keep):
            return EMPTY
        attn = require_attn(type(self).__name__, positions, attn)
        scores = self.score(positions, attn)
        scores[: self.sinks] = np.finfo(np.float64).max  # finite, and above any attention sum
        return evict_lowest(positions, scores, keep=keep, protect=self.protected)


@dataclass(kw_only=True)
class LendRecent(ReducesHeads, Lend):
    """Give back the prompt cell the current step attends to least (TOVA's rule)."""

    name: ClassVar[str] = "recent"

    def score(self, positions: np.ndarray, attn: np.ndarray) -> np.ndarray:
        return aggregate(attn, head_reduce=self.head_reduce)


def _no_positions() -> np.ndarray:
    return EMPTY.copy()


def _no_scores() -> np.ndarray:
    return np.zeros(0, dtype=np.float64)


@dataclass(kw_only=True)
class LendAccumulated(ReducesHeads, Lend):
    """Give back the prompt cell with the least attention summed over every
    decode step so far (H2O's rule, over the output's queries only)."""

    name: ClassVar[str] = "accumulated"

    _positions: np.ndarray = field(default_factory=_no_positions, init=False, repr=False, compare=False)
    _scores: np.ndarray = field(default_factory=_no_scores, init=False, repr=False, compare=False)

    def observe(self, positions: np.ndarray, attn: np.ndarray) -> None:
        positions = np.ascontiguousarray(positions, dtype=np.int32)
        self._add(positions, aggregate(require_attn(type(self).__name__, positions, attn),
                                       head_reduce=self.head_reduce))

    def _add(self, positions: np.ndarray, step: np.ndarray) -> None:
        """Add one step's per-cell scores; cells no longer held drop out."""
        self._scores = carry_scores(self._positions, self._scores, positions) + step
        self._positions = positions.copy()

    def reindex(self, old: np.ndarray, new: np.ndarray) -> None:
        self._scores = carry_scores(self._positions, self._scores, np.ascontiguousarray(old, dtype=np.int32))
        self._positions = np.ascontiguousarray(new, dtype=np.int32)

    def score(self, positions: np.ndarray, attn: np.ndarray) -> np.ndarray:
        return carry_scores(self._positions, self._scores, np.ascontiguousarray(positions, dtype=np.int32))


@dataclass(kw_only=True)
class LendPassed(LendAccumulated):
    """Give back first the prompt cells the output has moved past: those
    before the attention's frontier (the furthest prompt position that has
    been a decode step's most attended non-sink cell), least accumulated
    attention first; then the rest by accumulated attention.

    For outputs that walk the prompt in order (a list converted item by
    item), what lies behind the frontier has been used.
    """

    name: ClassVar[str] = "passed"

    _frontier: int = field(default=-1, init=False, repr=False, compare=False)

    def observe(self, positions: np.ndarray, attn: np.ndarray) -> None:
        positions = np.ascontiguousarray(positions, dtype=np.int32)
        step = aggregate(require_attn(type(self).__name__, positions, attn), head_reduce=self.head_reduce)
        self._add(positions, step)
        # The instruction tail and the sinks draw attention at every step: skip them.
        body = slice(min(self.sinks, len(positions)), max(len(positions) - self.protected, 0))
        if body.stop > body.start:
            peak = int(positions[body][int(np.argmax(step[body]))])
            self._frontier = max(self._frontier, peak)

    def reindex(self, old: np.ndarray, new: np.ndarray) -> None:
        super().reindex(old, new)
        if self._frontier >= 0:
            i = int(np.searchsorted(old, self._frontier, side="right")) - 1
            self._frontier = int(new[i]) if i >= 0 else -1

    def score(self, positions: np.ndarray, attn: np.ndarray) -> np.ndarray:
        scores = super().score(positions, attn)
        behind = np.asarray(positions) < self._frontier
        # Attention sums stay below 1 per layer: an offset above them puts
        # every cell ahead of the frontier above every cell behind it.
        offset = float(scores.max(initial=0.0)) + 1.0
        return np.where(behind, scores, scores + offset)


@dataclass(kw_only=True)
class LendProgress(LendAccumulated):
    """Give back first what the output has used: for outputs that walk the
    prompt in order (convert, copy, extract item by item).

    The output's place in the prompt is the median, over the last `steps`
    decode steps, of the prompt cell each step attends to most (the sinks
    and the protected tail aside, which draw attention at every step); the
    median ignores a single step that glances far ahead or back. The
    furthest such place so far is the frontier. Cells more than `margin`
    positions behind it go back first, oldest first (the output used them
    earliest); then the rest by accumulated attention, as LendAccumulated.
    """

    name: ClassVar[str] = "progress"

    steps: int = 8
    margin: int = 16

    _recent: list[int] = field(default_factory=list, init=False, repr=False, compare=False)
    _frontier: int = field(default=-1, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        require_int(type(self).__name__, "steps", self.steps, lo=1)
        require_int(type(self).__name__, "margin", self.margin, lo=0)

    def observe(self, positions: np.ndarray, attn: np.ndarray) -> None:
        positions = np.ascontiguousarray(positions, dtype=np.int32)
        step = aggregate(require_attn(type(self).__name__, positions, attn), head_reduce=self.head_reduce)
        self._add(positions, step)
        body = slice(min(self.sinks, len(positions)), max(len(positions) - self.protected, 0))
        if body.stop <= body.start:
            return
        self._recent = [*self._recent[-(self.steps - 1):], int(positions[body][int(np.argmax(step[body]))])]
        if len(self._recent) == self.steps:
            self._frontier = max(self._frontier, int(np.median(self._recent)))

    def reindex(self, old: np.ndarray, new: np.ndarray) -> None:
        super().reindex(old, new)

        def moved(p: int) -> int:
            i = int(np.searchsorted(old, p, side="right")) - 1
            return int(new[i]) if i >= 0 else -1

        self._recent = [moved(p) for p in self._recent]
        if self._frontier >= 0:
            self._frontier = moved(self._frontier)

    def score(self, positions: np.ndarray, attn: np.ndarray) -> np.ndarray:
        scores = super().score(positions, attn)
        positions = np.asarray(positions)
        behind = positions < self._frontier - self.margin
        # Behind the frontier: below every cell ahead, and the older the lower.
        # Ahead: accumulated attention, offset above anything behind.
        order = np.linspace(-1.0, -0.5, num=len(positions)) if len(positions) else scores
        return np.where(behind, order, scores)


LENDERS: dict[str, type[Lend]] = {cls.name: cls for cls in (LendAccumulated, LendRecent, LendPassed, LendProgress)}
