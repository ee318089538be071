"""Eviction policies: which prompt cells survive prefill, which generated
cells survive decoding. Pure functions of positions and scores.

A policy is a prefill selector composed with a decode strategy, and
optionally a Lend that lends the decode room to the prompt until the output
needs it:

    from scope_edge.policies import Policy, SnapKV, Slide
    policy = Policy(prefill=SnapKV(budget=1024, window=32), decode=Slide(decode=512, recent=256))

or the same by name, sized by a Budget (what the short form of the facade,
the CLI and the benchmarks use):

    from scope_edge.policies import build
    policy = build(Budget(prefill=1024, decode=512), strategy="slide", prefill_selector="snapkv")

Each generation runs policy.for_generation(max_tokens): a fresh copy of the
decode strategy (per-generation state, the schedules' max_tokens). A new
policy subclasses ScoredPrefill / ScoredDecode (writing score()) or
PrefillSelector / DecodeStrategy; see examples/tova.py.
"""
from __future__ import annotations

from .adaptive import Adaptive
from .base import EMPTY, DecodeStrategy, PrefillSelector, StepPlan, UnifiedDecode
from .discontinuous import Discontinuous
from .full import Full, FullPrefill
from .h2o import H2O, H2OPrefill
from .lend import LENDERS, Lend, LendAccumulated, LendPassed, LendProgress, LendRecent
from .policy import Policy
from .registry import COMBINATIONS, DEFAULT_LEND, LEND_RULES, PREFILL_SELECTORS, STRATEGIES, build, validate_lend, validate_names
from .scope import ScheduledScope, ScopeDecode
from .scored import ScoredDecode, ScoredPrefill
from .scores import aggregate, evict_lowest
from .slide import Slide
from .snapkv import SnapKV
from .streaming import Streaming, StreamingPrefill

__all__ = [
    "EMPTY",
    "StepPlan",
    "Policy",
    "PrefillSelector",
    "ScoredPrefill",
    "SnapKV",
    "H2OPrefill",
    "StreamingPrefill",
    "FullPrefill",
    "DecodeStrategy",
    "ScoredDecode",
    "UnifiedDecode",
    "ScopeDecode",
    "ScheduledScope",
    "Slide",
    "Adaptive",
    "Discontinuous",
    "Streaming",
    "H2O",
    "Full",
    "Lend",
    "LendAccumulated",
    "LendRecent",
    "LendPassed",
    "LendProgress",
    "LENDERS",
    "LEND_RULES",
    "DEFAULT_LEND",
    "validate_lend",
    "PREFILL_SELECTORS",
    "STRATEGIES",
    "COMBINATIONS",
    "build",
    "validate_names",
    "aggregate",
    "evict_lowest",
]
