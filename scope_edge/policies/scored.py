"""Scoring policies: a subclass turns attention into one float per cell
(score) and says how many trailing cells are protected; the selection is
written once here: the `keep` - protected best-scored cells stay, with the
protected tail (kvpress's ScorerPress split).
"""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import EMPTY, DecodeStrategy, PrefillSelector
from .scores import evict_lowest, nothing_to_evict, require_attn


@dataclass(frozen=True, kw_only=True)
class ScoredPrefill(PrefillSelector):
    """A prefill selector that keeps the best-scored prompt cells.

    Subclasses write score() and capture_from(), and override `protected`
    when more than the last prompt cell (which decoding continues from) must
    always stay.
    """

    @property
    def protected(self) -> int:
        """Last prompt cells that always stay."""
        return 1

    @abstractmethod
    def score(self, positions: np.ndarray, attn: np.ndarray) -> np.ndarray:
        """One float per position (higher stays). attn is checked to be
        [n_layer, n_head, len(positions)]."""

    def select(self, positions: np.ndarray, attn: np.ndarray | None, *, keep: int) -> np.ndarray:
        if nothing_to_evict(positions, keep):
            return EMPTY
        attn = require_attn(type(self).__name__, positions, attn)
        return evict_lowest(positions, self.score(positions, attn), keep=keep, protect=self.protected)


class ScoredDecode(DecodeStrategy):
    """A decode strategy that keeps the best-scored eligible cells.

    Subclasses write score(), plan() and cells() (or inherit them, e.g. from
    UnifiedDecode), and override `protected` when more than the newest cell
    must always stay. needs_attn=False: score() does not read attn (it may be
    None), e.g. scores accumulated in observe().
    """

    needs_attn: ClassVar[bool] = True

    @property
    def protected(self) -> int:
        """Newest eligible cells that always stay (at least the newest, which
        decoding continues from)."""
        return 1

    @abstractmethod
    def score(self, positions: np.ndarray, attn: np.ndarray | None) -> np.ndarray:
        """One float per position (higher stays). With needs_attn, attn is
        checked to be [n_layer, n_head, len(positions)]."""

    def select(self, positions: np.ndarray, attn: np.ndarray | None, keep: int) -> np.ndarray:
        if nothing_to_evict(positions, keep):
            return EMPTY
        if self.needs_attn:
            attn = require_attn(type(self).__name__, positions, attn)
        return evict_lowest(positions, self.score(positions, attn), keep=keep, protect=self.protected)
