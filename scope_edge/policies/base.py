"""What a policy is: pure functions of positions and attention scores.

A policy never sees llama.cpp. The runtime hands it
  positions: int32 array, sorted ascending, of the cells it may evict from;
  attn: float32 array [n_layer, n_head, len(positions)], the attention
        probabilities of the captured query rows summed per cell (None when
        nothing was captured);
and gets back the sorted int32 positions to evict.

A Policy composes one PrefillSelector (which prompt cells survive the
prefill, and how many) with one DecodeStrategy (which cells survive each
decode step, and how many cells decoding needs). The runtime asks the policy
for every number; it never looks at a policy's name.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from .checks import require_int

if TYPE_CHECKING:
    from .lend import Lend

EMPTY = np.zeros(0, dtype=np.int32)
# Structure cells never take more than half a selection: the policy always chooses the rest.
MAX_STRUCTURE_SHARE = 0.5
WHOLE_ROOM = 2**31 - 1  # a max_tokens past any generation: cells(kept=0) is then a strategy's whole room


@dataclass(frozen=True, kw_only=True)
class PrefillSelector(ABC):
    """Chooses the prompt cells kept after prefill.

    budget: prompt cells kept after prefill. None: no limit of its own (the
        selector keeps everything, or the decode strategy sets the limit,
        as the unified baselines do through prompt_room()).

    Subclasses are frozen dataclasses; one that defines __post_init__ calls
    super().__post_init__().
    """

    name: ClassVar[str]
    scored: ClassVar[bool] = True  # whether select() reads captured scores

    budget: int | None = None

    def __post_init__(self) -> None:
        if self.budget is not None:
            require_int(type(self).__name__, "budget", self.budget, lo=1)

    @property
    def probe_tokens(self) -> int:
        """Last prompt tokens the runtime re-runs after each earlier chunk of
        a chunked prefill, as the queries that score that chunk, and then
        removes (0: an earlier chunk is scored by its own rows, as
        capture_from says). A prompt's question usually comes last, so
        without a probe the earlier chunks are selected without it."""
        return 0

    def keep(self, n_prompt: int) -> int:
        """Prompt cells this selector keeps out of n_prompt."""
        require_int(type(self).__name__, "n_prompt", n_prompt, lo=0)
        return n_prompt if self.budget is None else min(n_prompt, self.budget)

    @abstractmethod
    def capture_from(self, n_prompt: int) -> int | None:
        """First prompt position whose attention row must be captured
        (0: every row), or None when the selector needs no scores."""

    @abstractmethod
    def select(self, positions: np.ndarray, attn: np.ndarray | None, *, keep: int) -> np.ndarray:
        """Positions to evict so that `keep` of `positions` remain."""


@dataclass(frozen=True)
class StepPlan:
    """What one decode step needs: keep is the number of eligible cells to
    keep once the step's token is in (None: evict nothing); capture says
    whether the step's attention row must be captured."""

    keep: int | None
    capture: bool


class ReadsAttention:
    """What a reader of captured attention (a decode strategy, a lend rule)
    tells the runtime about how it reads it."""

    @property
    def head_reduction(self) -> str | None:
        """"sum" or "max" when this reads attention only through
        aggregate(attn, head_reduce=that): the runtime may then hand it attn
        with each layer's heads already reduced, [n_layer, 1, n] (a ninth of
        the data, reduced natively). None (the default): every head."""
        return None


class ReducesHeads(ReadsAttention):
    """For a reader whose every read of attn is
    aggregate(attn, head_reduce=self.head_reduce) (its field)."""

    @property
    def head_reduction(self) -> str | None:
        return self.head_reduce  # type: ignore[attr-defined]  # the subclass's dataclass field


class DecodeStrategy(ReadsAttention, ABC):
    """Chooses the cells kept while decoding.

    unified=False: only generated tokens are eligible (SCOPE; the prompt cells
    chosen at prefill are never touched). unified=True: prompt and generated
    cells share one budget (the StreamingLLM and H2O baselines).

    Subclasses are dataclasses (frozen or not): bind() copies them with
    dataclasses.replace, which starts init=False state fields afresh. One that
    defines __post_init__ calls super().__post_init__().
    """

    name: ClassVar[str]
    unified: ClassVar[bool] = False
    scored: ClassVar[bool] = True  # whether any step captures scores

    def __post_init__(self) -> None:
        """Validation hook: subclasses extend it."""

    @property
    def slack(self) -> int:
        """Cells the strategy may hold above its budget between selections."""
        return 0

    @abstractmethod
    def cells(self, *, kept: int, max_tokens: int) -> int:
        """Cells the decode phase needs, the `kept` prompt cells included,
        for a generation of at most max_tokens tokens."""

    def prompt_room(self) -> int | None:
        """The most prompt cells this strategy lets the prefill keep (None:
        the prefill selector alone decides)."""
        return None

    def bind(self, max_tokens: int) -> DecodeStrategy:
        """A fresh copy for one generation of at most max_tokens tokens:
        per-generation state (accumulated scores) starts empty."""
        require_int(f"{type(self).__name__}.bind", "max_tokens", max_tokens, lo=1)
        if not dataclasses.is_dataclass(self):
            raise TypeError(f"{type(self).__name__} is not a dataclass: override bind() to return a fresh copy")
        return dataclasses.replace(self)

    @abstractmethod
    def plan(self, step: int, n_held: int) -> StepPlan:
        """Plan decode step `step` (1 for the first token fed after the
        prompt). n_held counts the eligible cells once this step's token is in.
        keep leaves room for the next token: the next step sees keep + 1."""

    def observe(self, positions: np.ndarray, attn: np.ndarray) -> None:
        """Called with every captured score (prefill included), in order."""

    def reindex(self, old: np.ndarray, new: np.ndarray) -> None:
        """Held positions `old` were renumbered to `new` (same order): state
        keyed by position must follow."""

    @abstractmethod
    def select(self, positions: np.ndarray, attn: np.ndarray | None, keep: int) -> np.ndarray:
        """Positions to evict so that `keep` of `positions` remain."""


class UnifiedDecode(DecodeStrategy):
    """Mixin for unified strategies: prompt and generated cells share `total`
    cells (the subclass declares the field `total: int`).

    The prefill keeps at most total - 1 prompt cells (one stays free for the
    first decode step); each step that holds more than total - 1 cells
    evicts down to total - 1. The default plan captures exactly on those
    steps (right for a strategy scoring with the current step's attention).
    """

    unified: ClassVar[bool] = True
    total: int

    def __post_init__(self) -> None:
        super().__post_init__()
        # Room for the newest cell and one free cell for the next token.
        require_int(type(self).__name__, "total", self.total, lo=2)

    def keep_at(self, n_held: int) -> int | None:
        """total - 1 once n_held passes it, else None (nothing to evict)."""
        return self.total - 1 if n_held > self.total - 1 else None

    def plan(self, step: int, n_held: int) -> StepPlan:
        keep = self.keep_at(n_held)
        return StepPlan(keep=keep, capture=keep is not None)

    def prompt_room(self) -> int | None:
        return self.total - 1

    def cells(self, *, kept: int, max_tokens: int) -> int:
        return min(kept + max_tokens, self.total + self.slack)


@dataclass(frozen=True)
class Policy:
    """A prefill selector and a decode strategy composed, and optionally a
    Lend (policies/lend.py) that lends the decode room to the prompt until
    the output needs it (None: the paper's behaviour, the decode room stands
    empty until generated cells fill it).

    keep_structure: the runtime keeps the chat's structure cells (the
        template's control tokens and role headers, and the system turn)
        out of every selection, like attention sinks: they are never
        evicted, and the selector or strategy keeps that many fewer of the
        rest. The policy never sees which cells they are (docs/budgets.md).
    structure_share: the most of a selection's keep (and of the prefill
        budget) structure cells may take: the system turn first, then the
        newest turns' markers; beyond it older markers are ordinary cells,
        so a long chat cannot pin the whole budget.

    One Policy can serve many generations: for_generation() gives the copy a
    single generation uses (fresh decode and lend state, max_tokens filled in).
    """

    prefill: PrefillSelector
    decode: DecodeStrategy
    lend: Lend | None = None
    keep_structure: bool = False
    structure_share: float = 0.25

    def __post_init__(self) -> None:
        from .lend import Lend  # lend.py builds on this module

        if not isinstance(self.prefill, PrefillSelector) or not isinstance(self.decode, DecodeStrategy):
            raise ValueError(
                "Policy needs prefill=PrefillSelector and decode=DecodeStrategy, got "
                f"prefill={type(self.prefill).__name__}, decode={type(self.decode).__name__}"
            )
        if self.lend is not None and not isinstance(self.lend, Lend):
            raise ValueError(f"Policy.lend must be a Lend or None, got {type(self.lend).__name__}")
        if not isinstance(self.keep_structure, bool):
            raise ValueError(f"Policy.keep_structure must be True or False, got {self.keep_structure!r}")
        share = self.structure_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= MAX_STRUCTURE_SHARE:
            raise ValueError(f"Policy.structure_share must be a number in (0, {MAX_STRUCTURE_SHARE}], got {share!r}")
        if self.lend is not None and self.decode.unified:
            raise ValueError(
                f"{type(self.decode).__name__} is a unified baseline: prompt and output already share its cells, "
                "so there is no decode room to lend; pass lend=None"
            )

    @property
    def scored(self) -> bool:
        """Whether this policy ever reads captured attention scores."""
        return self.prefill.scored or self.decode.scored or self.lend is not None

    def prompt_floor(self, n_prompt: int) -> int:
        """Prompt cells kept out of n_prompt once the output needs all its room."""
        keep = self.prefill.keep(n_prompt)
        room = self.decode.prompt_room()
        return keep if room is None else min(keep, room)

    def prefill_keep(self, n_prompt: int) -> int:
        """Prompt cells the prefill selection keeps out of n_prompt: the
        floor, plus the cells on loan."""
        floor = self.prompt_floor(n_prompt)
        return floor if self.lend is None else floor + self.lend.lent(floor=floor, n_prompt=n_prompt)

    def decode_cells(self, *, kept: int, max_tokens: int, lent: int = 0) -> int:
        """Cells the decode phase needs, `kept` (the prompt floor) included.
        Cells on loan share the decode room with the output: they take what
        max_tokens leaves of it."""
        return self.decode.cells(kept=kept, max_tokens=max_tokens + lent)

    def structure_cap(self, keep: int) -> int:
        """Structure cells a selection that keeps `keep` cells may hold:
        structure_share of keep, and of the prefill budget (0 without
        keep_structure)."""
        if not self.keep_structure:
            return 0
        return int(self.structure_share * min(keep, self.prompt_floor(WHOLE_ROOM)))

    def for_generation(self, max_tokens: int) -> Policy:
        """The policy one generation of at most max_tokens tokens runs. The
        lend's room is the whole decode room, however short the generation:
        a prompt that fits in prefill + decode cells with its output keeps
        every cell (the allocation grows to hold it, never past the budget)."""
        require_int("Policy", "max_tokens", max_tokens, lo=1)
        decode = self.decode.bind(max_tokens)
        lend = None if self.lend is None else self.lend.bind(decode.cells(kept=0, max_tokens=WHOLE_ROOM))
        return dataclasses.replace(self, decode=decode, lend=lend)
