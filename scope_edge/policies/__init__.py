"""Eviction policies: which prompt cells survive prefill, which generated
cells survive decoding. Pure functions of positions and scores.

    policy = make_policy(budget, strategy="slide", prefill_selector=None, max_tokens=512)
"""
from __future__ import annotations

from ..budget import Budget
from .adaptive import Adaptive
from .base import EMPTY, DecodeStrategy, Policy, PrefillSelector, StepPlan
from .checks import require_int
from .discontinuous import Discontinuous
from .full import Full, FullPrefill
from .h2o import H2O, H2OPrefill
from .scope import ScopeDecode
from .scores import aggregate
from .slide import Slide
from .snapkv import SnapKV
from .streaming import Streaming, StreamingPrefill

__all__ = [
    "EMPTY",
    "PrefillSelector",
    "DecodeStrategy",
    "StepPlan",
    "Policy",
    "SnapKV",
    "H2OPrefill",
    "StreamingPrefill",
    "FullPrefill",
    "ScopeDecode",
    "Slide",
    "Adaptive",
    "Discontinuous",
    "Streaming",
    "H2O",
    "Full",
    "PREFILL_SELECTORS",
    "STRATEGIES",
    "COMBINATIONS",
    "make_policy",
    "validate_names",
    "aggregate",
]

PREFILL_SELECTORS = ("snapkv", "h2o", "streaming", "full")
STRATEGIES = ("slide", "adaptive", "discontinuous", "streaming", "h2o", "full")
# Unified-budget baselines: each runs only with its own prefill selector.
_BASELINES = ("streaming", "h2o")


def _allowed_selectors(strategy: str) -> tuple[str, ...]:
    return (strategy,) if strategy in _BASELINES else PREFILL_SELECTORS


COMBINATIONS: tuple[tuple[str, str], ...] = tuple(
    (strategy, selector) for strategy in STRATEGIES for selector in _allowed_selectors(strategy)
)


def validate_names(strategy: str, prefill_selector: str | None) -> str:
    """Check a (strategy, selector) pair; return the selector name to use
    (None: the strategy's own, snapkv for SCOPE and full)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if prefill_selector is None:
        return strategy if strategy in _BASELINES else "snapkv"
    if prefill_selector not in PREFILL_SELECTORS:
        raise ValueError(
            f"unknown prefill selector {prefill_selector!r}; valid: {', '.join(PREFILL_SELECTORS)}"
        )
    allowed = _allowed_selectors(strategy)
    if prefill_selector not in allowed:
        raise ValueError(
            f"strategy {strategy!r} is a unified-budget baseline and runs only with prefill "
            f"selector {allowed[0]!r} (or None), got {prefill_selector!r}"
        )
    return prefill_selector


def _make_selector(name: str, budget: Budget, head_reduce: str, *, unified: bool) -> PrefillSelector:
    match name:
        case "snapkv":
            return SnapKV(window=budget.observation_window, head_reduce=head_reduce)
        case "h2o":
            # The unified H2O baseline's recent window spans the whole sequence, so
            # at the end of the prompt it covers the last prompt tokens as well.
            recent = max(budget.observation_window, budget.recent_window) if unified else budget.observation_window
            return H2OPrefill(recent=recent, head_reduce=head_reduce)
        case "streaming":
            return StreamingPrefill()
        case _:
            return FullPrefill()


def _make_strategy(name: str, budget: Budget, max_tokens: int, head_reduce: str) -> DecodeStrategy:
    scope = dict(decode=budget.decode, recent=budget.recent_window, head_reduce=head_reduce)
    match name:
        case "slide":
            return Slide(**scope)
        case "adaptive":
            return Adaptive(**scope, max_tokens=max_tokens)
        case "discontinuous":
            return Discontinuous(**scope, max_tokens=max_tokens)
        case "streaming":
            return Streaming(total=budget.total)
        case "h2o":
            return H2O(total=budget.total, recent=budget.recent_window, head_reduce=head_reduce)
        case _:
            return Full()


def make_policy(
    budget: Budget,
    *,
    strategy: str,
    prefill_selector: str | None,
    max_tokens: int,
    head_reduce: str = "max",
) -> Policy:
    """A fresh policy for one generation (H2O keeps per-generation state).

    SCOPE strategies and full use budget.prefill / budget.decode separately;
    the baselines streaming and h2o share budget.total between prompt and
    generated cells. head_reduce: how scoring policies aggregate heads.
    """
    selector = validate_names(strategy, prefill_selector)
    require_int("make_policy", "max_tokens", max_tokens, lo=1)
    return Policy(
        prefill=_make_selector(selector, budget, head_reduce, unified=strategy in _BASELINES),
        decode=_make_strategy(strategy, budget, max_tokens, head_reduce),
    )
