"""The uncompressed reference: nothing is ever evicted."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import EMPTY, DecodeStrategy, PrefillSelector, StepPlan


@dataclass(frozen=True)
class FullPrefill(PrefillSelector):
    """Keep every prompt cell; needs no scores. budget stays None."""

    name: ClassVar[str] = "full"
    scored: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.budget is not None:
            raise ValueError(f"FullPrefill keeps every prompt cell: budget must be None, got {self.budget!r}")

    def capture_from(self, n_prompt: int) -> int | None:
        return None

    def select(self, positions: np.ndarray, attn: np.ndarray | None, *, keep: int) -> np.ndarray:
        return EMPTY


@dataclass(frozen=True)
class Full(DecodeStrategy):
    """Keep every generated cell; never captures."""

    name: ClassVar[str] = "full"
    scored: ClassVar[bool] = False

    def cells(self, *, kept: int, max_tokens: int) -> int:
        return kept + max_tokens

    def plan(self, step: int, n_held: int) -> StepPlan:
        return StepPlan(keep=None, capture=False)

    def select(self, positions: np.ndarray, attn: np.ndarray | None, keep: int) -> np.ndarray:
        return EMPTY
