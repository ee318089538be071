"""The policy: a prefill selector and a decode strategy composed, and
optionally a Lend. Above base.py and lend.py, which it composes."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..checks import require_int
from .base import DecodeStrategy, PrefillSelector
from .lend import Lend

WHOLE_ROOM = 2**31 - 1  # a max_tokens past any generation: cells(kept=0) is then a strategy's whole room
# Structure cells never take more than half a selection: the policy always chooses the rest.
MAX_STRUCTURE_SHARE = 0.5


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
