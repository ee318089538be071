"""SCOPE adaptive: the decode budget grows with the output, reaching
`decode` only at the last step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import StepPlan
from .checks import require_int
from .scope import ScopeDecode


@dataclass(frozen=True, kw_only=True)
class Adaptive(ScopeDecode):
    """Budget at step t: t up to `recent`, then recent + (t - recent) * beta1
    / (max_tokens - recent), capped at decode (beta1 = decode - recent).

    max_tokens: the generation's max new tokens (T), where the budget peaks.
    """

    name: ClassVar[str] = "adaptive"

    max_tokens: int

    def __post_init__(self) -> None:
        super().__post_init__()
        require_int("Adaptive", "max_tokens", self.max_tokens, lo=1)

    def budget_at(self, step: int) -> int:
        """Generated cells attention may see at step `step`."""
        if step <= self.recent:
            return min(step, self.decode)
        grown = (step - self.recent) * (self.decode - self.recent) // max(1, self.max_tokens - self.recent)
        return min(step, self.recent + grown, self.decode)

    def plan(self, step: int, n_held: int) -> StepPlan:
        # Leave room for the next token, but keep the whole recent window held
        # (SCOPE's budget counts the current token; ours the cells between steps).
        keep = max(min(self.recent, self.decode - 1), self.budget_at(step + 1) - 1, 1)
        if n_held > keep:
            return StepPlan(keep=keep, capture=True)
        return StepPlan(keep=None, capture=False)
