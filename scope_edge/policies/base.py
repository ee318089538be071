"""What a policy is: pure functions of positions and attention scores.

A policy never sees llama.cpp. The facade hands it
  positions: int32 array, sorted ascending, of the cells it may evict from;
  attn: float32 array [n_layer, n_head, len(positions)], the attention
        probabilities of the captured query rows summed per cell (None when
        nothing was captured);
and gets back the sorted int32 positions to evict.

A generation composes one PrefillSelector (which prompt cells survive the
prefill) with one DecodeStrategy (which cells survive each decode step).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

EMPTY = np.zeros(0, dtype=np.int32)


class PrefillSelector(ABC):
    """Chooses the prompt cells kept after prefill."""

    name: ClassVar[str]

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


class DecodeStrategy(ABC):
    """Chooses the cells kept while decoding.

    unified=False: only generated tokens are eligible (SCOPE; the prompt cells
    chosen at prefill are never touched). unified=True: prompt and generated
    cells share one budget (the StreamingLLM and H2O baselines).
    """

    name: ClassVar[str]
    unified: ClassVar[bool] = False

    @property
    def slack(self) -> int:
        """Cells the strategy may hold above its budget between selections."""
        return 0

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


@dataclass(frozen=True)
class Policy:
    """A prefill selector and a decode strategy composed for one generation."""

    prefill: PrefillSelector
    decode: DecodeStrategy
