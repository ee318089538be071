"""SCOPE slide: once the decode cache is full, select at every step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import StepPlan
from .scope import ScopeDecode


@dataclass(frozen=True, kw_only=True)
class Slide(ScopeDecode):
    """Attention always sees at most `decode` generated cells; costs one
    capture and one selection per step once full."""

    name: ClassVar[str] = "slide"

    def plan(self, step: int, n_held: int) -> StepPlan:
        if n_held > self.decode - 1:
            return StepPlan(keep=self.decode - 1, capture=True)
        return StepPlan(keep=None, capture=False)
