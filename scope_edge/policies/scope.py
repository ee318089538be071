"""SCOPE decode selection (Wu et al., 2024), shared by its three schedules.

Only generated cells are eligible; the prompt cells chosen at prefill are
never touched. Each schedule (slide.py, adaptive.py, discontinuous.py) only
decides when to select and how many to keep.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .base import ReducesHeads
from ..checks import require_int
from .checks import require_head_reduce
from .scored import ScoredDecode
from .scores import aggregate


@dataclass(frozen=True, kw_only=True)
class ScopeDecode(ReducesHeads, ScoredDecode):
    """Keep the last `recent` generated cells plus the older ones the current
    step attends to most (scores of this step only, not accumulated).

    decode: decode-cache cells at attention time (beta1 + beta2).
    recent: last generated cells always kept (beta2).
    head_reduce: "sum" or "max" over heads before summing layers.
    """

    decode: int
    recent: int
    head_reduce: str = "max"

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        # decode >= 2: keep = decode - 1 must leave the newest cell, which
        # llama.cpp continues from.
        require_int(owner, "decode", self.decode, lo=2)
        require_int(owner, "recent", self.recent, lo=1, hi=self.decode)
        require_head_reduce(owner, self.head_reduce)

    @property
    def protected(self) -> int:
        return self.recent

    def cells(self, *, kept: int, max_tokens: int) -> int:
        # The prompt cells stay as kept; generated ones peak at decode + slack.
        return kept + min(max_tokens, self.decode + self.slack)

    def score(self, positions: np.ndarray, attn: np.ndarray) -> np.ndarray:
        """The current step's attention, aggregated per generated cell."""
        return aggregate(attn, head_reduce=self.head_reduce)


@dataclass(frozen=True, kw_only=True)
class ScheduledScope(ScopeDecode):
    """A SCOPE schedule that depends on the generation's length.

    max_tokens: the generation's max new tokens (T). None (default): filled in
        by bind() (Policy.for_generation) with the generation's max_tokens; an
        explicit value is kept.
    """

    max_tokens: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_tokens is not None:
            require_int(type(self).__name__, "max_tokens", self.max_tokens, lo=1)

    @property
    def horizon(self) -> int:
        """max_tokens, once known."""
        if self.max_tokens is None:
            raise ValueError(
                f"{type(self).__name__}.max_tokens is None: call bind(max_tokens) (Policy.for_generation "
                "does) or pass max_tokens"
            )
        return self.max_tokens

    def bind(self, max_tokens: int) -> ScheduledScope:
        require_int(f"{type(self).__name__}.bind", "max_tokens", max_tokens, lo=1)
        return dataclasses.replace(self, max_tokens=max_tokens if self.max_tokens is None else self.max_tokens)
