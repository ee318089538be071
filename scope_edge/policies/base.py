"""What a policy is: pure functions of positions and attention scores.

A policy never sees llama.cpp. The runtime hands it
  positions: int32 array, sorted ascending, of the cells it may evict from;
  attn: float32 array [n_layer, n_head, len(positions)], the attention
        probabilities of the captured query rows summed per cell (None when
        nothing was captured);
and gets back the sorted int32 positions to evict.

A Policy (policy.py) composes one PrefillSelector (which prompt cells
survive the prefill, and how many) with one DecodeStrategy (which cells
survive each decode step, and how many cells decoding needs). The runtime
asks the policy for every number; it never looks at a policy's name.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..checks import require_int

EMPTY = np.zeros(0, dtype=np.int32)


@dataclass(frozen=True, kw_only=True)
class PrefillSelector(ABC):
    """Chooses the prompt cells kept after prefill.

    budget: prompt cells kept after prefill. None: no limit of its own (the
        selector keeps everything, or the decode strategy sets the limit,
        as the unified baselines do through prompt_room()).

    Subclasses are frozen dataclasses; one that defines __post_init__ calls
    super().__post_init__().
    """

    name: ClassVar[str]
    scored: ClassVar[bool] = True  # whether select() reads captured scores

    budget: int | None = None

    def __post_init__(self) -> None:
        if self.budget is not None:
            require_int(type(self).__name__, "budget", self.budget, lo=1)

    @property
    def probe_tokens(self) -> int:
        """Last prompt tokens the runtime re-runs after each earlier chunk of
        a chunked prefill, as the queries that score that chunk, and then
        removes (0: an earlier chunk is scored by its own rows, as
        capture_from says). A prompt's question usually comes last, so
        without a probe the earlier chunks are selected without it."""
        return 0

    def keep(self, n_prompt: int) -> int:
        """Prompt cells this selector keeps out of n_prompt."""
        require_int(type(self).__name__, "n_prompt", n_prompt, lo=0)
        return n_prompt if self.budget is None else min(n_prompt, self.budget)

    @abstractmethod
    def capture_from(self, n_prompt: int) -> int | None:
        """First prompt position whose attention row must be captured
        (0: every row), or None when the selector needs no scores."""

    @abstractmethod
    def select(self, positions: np.ndarray, attn: np.ndarray | None, *, keep: int) -> np.ndarray:
        """Positions to evict so that `keep` of `positions` remain."""


@dataclass(frozen=True)
class StepPlan:
    """What one decode step needs: keep is the number of eligible cells to
    keep once the step's token is in (None: evict nothing); capture says
    whether the step's attention row must be captured."""

    keep: int | None
    capture: bool


class ReadsAttention:
    """What a reader of captured attention (a decode strategy, a lend rule)
    tells the runtime about how it reads it."""

    @property
    def head_reduction(self) -> str | None:
        """"sum" or "max" when this reads attention only through
        aggregate(attn, head_reduce=that): the runtime may then hand it attn
        with each layer's heads already reduced, [n_layer, 1, n] (a ninth of
        the data, reduced natively). None (the default): every head."""
        return None


class ReducesHeads(ReadsAttention):
    """For a reader whose every read of attn is
    aggregate(attn, head_reduce=self.head_reduce) (its field)."""

    @property
    def head_reduction(self) -> str | None:
        return self.head_reduce  # type: ignore[attr-defined]  # the subclass's dataclass field


class DecodeStrategy(ReadsAttention, ABC):
    """Chooses the cells kept while decoding.

    unified=False: only generated tokens are eligible (SCOPE; the prompt cells
    chosen at prefill are never touched). unified=True: prompt and generated
    cells share one budget (the StreamingLLM and H2O baselines).

    Subclasses are dataclasses (frozen or not): bind() copies them with
    dataclasses.replace, which starts init=False state fields afresh. One that
    defines __post_init__ calls super().__post_init__().
    """

    name: ClassVar[str]
    unified: ClassVar[bool] = False
    scored: ClassVar[bool] = True  # whether any step captures scores

    def __post_init__(self) -> None:
        """Validation hook: subclasses extend it."""

    @property
    def slack(self) -> int:
        """Cells the strategy may hold above its budget between selections."""
        return 0

    @abstractmethod
    def cells(self, *, kept: int, max_tokens: int) -> int:
        """Cells the decode phase needs, the `kept` prompt cells included,
        for a generation of at most max_tokens tokens."""

    def prompt_room(self) -> int | None:
        """The most prompt cells this strategy lets the prefill keep (None:
        the prefill selector alone decides)."""
        return None

    def bind(self, max_tokens: int) -> DecodeStrategy:
        """A fresh copy for one generation of at most max_tokens tokens:
        per-generation state (accumulated scores) starts empty."""
        require_int(f"{type(self).__name__}.bind", "max_tokens", max_tokens, lo=1)
        if not dataclasses.is_dataclass(self):
            raise TypeError(f"{type(self).__name__} is not a dataclass: override bind() to return a fresh copy")
        return dataclasses.replace(self)

    @abstractmethod
    def plan(self, step: int, n_held: int) -> StepPlan:
        """Plan decode step `step` (1 for the first token fed after the
        prompt). n_held counts the eligible cells once this step's token is in.
        keep leaves room for the next token: the next step sees keep + 1."""

    def observe(self, positions: np.ndarray, attn: np.ndarray) -> None:
        """Called with every captured score (prefill included), in order."""

    def reindex(self, old: np.ndarray, new: np.ndarray) -> None:
        """Held positions `old` were renumbered to `new` (same order): state
        keyed by position must follow."""

    @abstractmethod
    def select(self, positions: np.ndarray, attn: np.ndarray | None, keep: int) -> np.ndarray:
        """Positions to evict so that `keep` of `positions` remain."""


class UnifiedDecode(DecodeStrategy):
    """Mixin for unified strategies: prompt and generated cells share `total`
    cells (the subclass declares the field `total: int`).

    The prefill keeps at most total - 1 prompt cells (one stays free for the
    first decode step); each step that holds more than total - 1 cells
    evicts down to total - 1. The default plan captures exactly on those
    steps (right for a strategy scoring with the current step's attention).
    """

    unified: ClassVar[bool] = True
    total: int

    def __post_init__(self) -> None:
        super().__post_init__()
        # Room for the newest cell and one free cell for the next token.
        require_int(type(self).__name__, "total", self.total, lo=2)

    def keep_at(self, n_held: int) -> int | None:
        """total - 1 once n_held passes it, else None (nothing to evict)."""
        return self.total - 1 if n_held > self.total - 1 else None

    def plan(self, step: int, n_held: int) -> StepPlan:
        keep = self.keep_at(n_held)
        return StepPlan(keep=keep, capture=keep is not None)

    def prompt_room(self) -> int | None:
        return self.total - 1

    def cells(self, *, kept: int, max_tokens: int) -> int:
        return min(kept + max_tokens, self.total + self.slack)
