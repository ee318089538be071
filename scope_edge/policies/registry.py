"""Policies by name: the one registry the facade's short form, the CLI and
the benchmarks use.

    policy = build(Budget(prefill=1024, decode=512), strategy="slide")

SCOPE strategies (slide, adaptive, discontinuous) and full use budget.prefill
and budget.decode separately; the unified baselines (streaming, h2o) share
budget.total between prompt and generated cells and run only with their own
prefill selector.
"""
from __future__ import annotations

from collections.abc import Callable

from .. import memory
from ..budget import Budget, min_cells
from .adaptive import Adaptive
from .base import DecodeStrategy, PrefillSelector
from .discontinuous import Discontinuous
from .full import Full, FullPrefill
from .h2o import H2O, H2OPrefill
from .lend import LENDERS
from .policy import Policy
from .slide import Slide
from .snapkv import SnapKV
from .streaming import Streaming, StreamingPrefill


def _limit(b: Budget, unified: bool) -> int | None:
    """A selector's budget: budget.prefill, or None under a unified baseline,
    whose prompt room (total - 1, DecodeStrategy.prompt_room) is the limit."""
    return None if unified else b.prefill


def _h2o_prefill(b: Budget, head_reduce: str, unified: bool) -> H2OPrefill:
    # The unified H2O baseline's recent window spans the whole sequence, so at
    # the end of the prompt it covers the last prompt tokens as well.
    recent = max(b.observation_window, b.recent_window) if unified else b.observation_window
    return H2OPrefill(budget=_limit(b, unified), recent=recent, head_reduce=head_reduce)


# (budget, head_reduce, unified) -> selector; unified: the strategy is a
# unified baseline.
_SELECTORS: dict[str, Callable[[Budget, str, bool], PrefillSelector]] = {
    "snapkv": lambda b, head_reduce, unified: SnapKV(
        budget=_limit(b, unified), window=b.observation_window, head_reduce=head_reduce
    ),
    "h2o": _h2o_prefill,
    "streaming": lambda b, head_reduce, unified: StreamingPrefill(budget=_limit(b, unified)),
    "full": lambda b, head_reduce, unified: FullPrefill(),
}

# (budget, head_reduce) -> strategy; Adaptive and Discontinuous take the
# generation's max_tokens from Policy.for_generation.
_STRATEGIES: dict[str, Callable[[Budget, str], DecodeStrategy]] = {
    "slide": lambda b, head_reduce: Slide(decode=b.decode, recent=b.recent_window, head_reduce=head_reduce),
    "adaptive": lambda b, head_reduce: Adaptive(decode=b.decode, recent=b.recent_window, head_reduce=head_reduce),
    "discontinuous": lambda b, head_reduce: Discontinuous(
        decode=b.decode, recent=b.recent_window, head_reduce=head_reduce
    ),
    "streaming": lambda b, head_reduce: Streaming(total=b.total),
    "h2o": lambda b, head_reduce: H2O(total=b.total, recent=b.recent_window, head_reduce=head_reduce),
    "full": lambda b, head_reduce: Full(),
}

PREFILL_SELECTORS: tuple[str, ...] = tuple(_SELECTORS)
# How a SCOPE strategy lends its decode room to the prompt (policies/lend.py);
# "none" is the paper's behaviour.
LEND_RULES: tuple[str, ...] = (*LENDERS, "none")
DEFAULT_LEND = "passed"  # measured best on bench/ordered.py (README); "none" is the paper
# The strategy a budget runs when none is named, the default budget's included.
DEFAULT_STRATEGY = "slide"
# Whether the default budget keeps the chat's structure (Policy.keep_structure),
# in ScopeLlama and in the server; a budget the user names runs its policy as
# built (measured: docs/budgets.md "Structure kept").
DEFAULT_KEEP_STRUCTURE = True
# The default budget: a quarter of the model's trained context, at least
# DEFAULT_MIN_CELLS (docs/budgets.md).
DEFAULT_CONTEXT_SHARE = 4
DEFAULT_MIN_CELLS = 2048
STRATEGIES: tuple[str, ...] = tuple(_STRATEGIES)
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


def build(
    budget: Budget,
    *,
    strategy: str = DEFAULT_STRATEGY,
    prefill_selector: str | None = None,
    head_reduce: str = "max",
    lend: str = DEFAULT_LEND,
) -> Policy:
    """The policy the names choose, sized by budget. head_reduce: how scoring
    policies aggregate heads. Call for_generation(max_tokens) on it for each
    generation (fresh H2O state, the schedules' max_tokens). lend: which
    prompt cells a SCOPE strategy gives back first once the output needs the
    decode room they borrowed ("none": the decode room stays empty until the
    output fills it, as in the paper); the unified baselines ignore it."""
    if not isinstance(budget, Budget):
        raise ValueError(f"build needs a Budget, got {type(budget).__name__}")
    selector = validate_names(strategy, prefill_selector)
    validate_lend(lend)
    unified = strategy in _BASELINES  # they share one budget: nothing to lend
    return Policy(
        prefill=_SELECTORS[selector](budget, head_reduce, unified),
        decode=_STRATEGIES[strategy](budget, head_reduce),
        lend=None if unified or lend == "none" else LENDERS[lend](
            protected=budget.observation_window, head_reduce=head_reduce),
    )


def default_budget(geometry: memory.KvGeometry, *, n_ctx: int | None = None,
                   prefill_chunk: int = memory.PREFILL_CHUNK) -> Budget | None:
    """The budget ScopeLlama(model_path) runs when given no policy arguments
    (with DEFAULT_STRATEGY and DEFAULT_LEND): cells for a quarter of the
    model's trained context, at least DEFAULT_MIN_CELLS and at most the whole
    context (or a fixed n_ctx), split by Budget.for_cells. A generation whose
    prompt and output fit in budget.total cells evicts nothing, so it is the
    stock cache's. None (the stock cache) when those cells are fewer than the
    smallest budget needs: the cache is then small anyway."""
    cells = max(geometry.n_ctx_train // DEFAULT_CONTEXT_SHARE, DEFAULT_MIN_CELLS)
    cells = min(cells, memory.padded_cells(geometry.n_ctx_train), n_ctx or cells)
    cells = cells // memory.KV_CELL_PADDING * memory.KV_CELL_PADDING
    if cells < min_cells(prefill_chunk):
        return None
    return Budget.for_cells(cells, prefill_chunk=prefill_chunk)


def validate_lend(lend: str) -> None:
    if lend not in LEND_RULES:
        raise ValueError(f"unknown lend rule {lend!r}; valid: {', '.join(map(repr, LEND_RULES))}")
