"""SCOPE adaptive: the decode budget grows with the output, reaching
`decode` only at the last step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import StepPlan
from .scope import ScheduledScope


@dataclass(frozen=True, kw_only=True)
class Adaptive(ScheduledScope):
    """Budget at step t: t up to `recent`, then recent + (t - recent) * beta1
    / (max_tokens - recent), capped at decode (beta1 = decode - recent).

    max_tokens: the generation's max new tokens (T), where the budget peaks;
        None: the generation's, filled in by bind().
    """

    name: ClassVar[str] = "adaptive"

    def budget_at(self, step: int) -> int:
        """Generated cells attention may see at step `step`."""
        horizon = self.horizon
        if step <= self.recent:
            return min(step, self.decode)
        grown = (step - self.recent) * (self.decode - self.recent) // max(1, horizon - self.recent)
        return min(step, self.recent + grown, self.decode)

    def plan(self, step: int, n_held: int) -> StepPlan:
        # Leave room for the next token, but keep the whole recent window held
        # (SCOPE's budget counts the current token; ours the cells between steps).
        keep = max(min(self.recent, self.decode - 1), self.budget_at(step + 1) - 1, 1)
        if n_held > keep:
            return StepPlan(keep=keep, capture=True)
        return StepPlan(keep=None, capture=False)
