"""One sequence's cache: what the single-sequence runtime (Cache, Session,
Generation) needs of a KV cache, declared once.

Two implementations: context.Context (a llama_context of its own; its
methods' seq keyword defaults to sequence 0) and batcher.SeqView (one sequence
of a context shared by a batch, its decodes run by the Batcher). Whatever
holds a SequenceCache never knows which one it has.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Protocol

import numpy as np

from ..hook import Capture
from .sampling import Sampler


class SequenceCache(Protocol):
    """The KV cells of one sequence, through the hook: decode, capture, evict."""

    n_cells: int  # cells this sequence may hold

    @property
    def can_shift(self) -> bool:
        """Whether llama.cpp can renumber positions in this cache (re-indexing)."""

    def decode(self, tokens: Sequence[int], positions: Sequence[int], *, want_logits: bool) -> None:
        """Decode tokens at positions; logits only for the last one if asked."""

    def sample(self, sampler: Sampler) -> int:
        """Draw a token from the last decode's logits."""

    def logits(self) -> np.ndarray:
        """float32 [n_vocab] logits of the last decode, a copy."""

    def synchronize(self) -> None:
        """Wait for the device to finish the decodes queued so far."""

    def capturing(self, from_pos: int, *, heads: str | None = None) -> AbstractContextManager[None]:
        """Capture the attention rows of query positions >= from_pos decoded
        inside the block; heads "sum" / "max": to be read with that
        head_reduce only (reduced as captured; "max": one query row)."""

    def capture(self, min_pos: int = 0, *, head_reduce: str | None = None) -> Capture:
        """What the last capturing() block captured, for held positions >= min_pos."""

    def transfers(self) -> tuple[int, int]:
        """(tensor reads, bytes read) by the hook so far."""

    def positions(self) -> np.ndarray:
        """Sorted positions held."""

    def visible(self) -> tuple[np.ndarray, int]:
        """(cells the latest query row could see, attention width), from llama.cpp's mask."""

    def evict(self, positions: np.ndarray) -> int:
        """Free the cells of positions (sorted, held); returns cells freed."""

    def shift(self, p0: int, p1: int, delta: int) -> None:
        """Add delta to the positions in [p0, p1) (llama.cpp re-rotates their K)."""

    def truncate(self, p0: int) -> None:
        """Remove every position >= p0."""

    def clear(self) -> None:
        """Empty this sequence's cells."""
