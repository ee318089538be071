"""SCOPE discontinuous: select only every delta + 1 steps, letting the
decode cache overshoot in between. Fewest captures, so cheapest."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import StepPlan
from .scope import ScheduledScope


@dataclass(frozen=True, kw_only=True)
class Discontinuous(ScheduledScope):
    """delta = (max_tokens - recent) // beta1 (beta1 = decode - recent). The
    cache grows to decode + delta, then one selection drops delta + 1 cells.

    max_tokens: the generation's max new tokens (T); None: the generation's,
        filled in by bind().
    """

    name: ClassVar[str] = "discontinuous"

    @property
    def delta(self) -> int:
        """Steps between selections, minus one. With no older cells to choose
        among (decode == recent) there is nothing to select: slide every step."""
        horizon = self.horizon
        beta1 = self.decode - self.recent
        if beta1 <= 0:
            return 0
        return max(0, (horizon - self.recent) // beta1)

    @property
    def slack(self) -> int:
        return self.delta

    def plan(self, step: int, n_held: int) -> StepPlan:
        if n_held > self.decode + self.delta - 1:
            return StepPlan(keep=self.decode - 1, capture=True)
        return StepPlan(keep=None, capture=False)
