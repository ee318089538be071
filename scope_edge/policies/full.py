"""The uncompressed reference: nothing is ever evicted."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import EMPTY, DecodeStrategy, PrefillSelector, StepPlan


@dataclass(frozen=True)
class FullPrefill(PrefillSelector):
    """Keep every prompt cell; needs no scores."""

    name: ClassVar[str] = "full"

    def capture_from(self, n_prompt: int) -> int | None:
        return None

    def select(self, positions: np.ndarray, attn: np.ndarray | None, *, keep: int) -> np.ndarray:
        return EMPTY


@dataclass(frozen=True)
class Full(DecodeStrategy):
    """Keep every generated cell; never captures."""

    name: ClassVar[str] = "full"

    def plan(self, step: int, n_held: int) -> StepPlan:
        return StepPlan(keep=None, capture=False)

    def select(self, positions: np.ndarray, attn: np.ndarray | None, keep: int) -> np.ndarray:
        return EMPTY

