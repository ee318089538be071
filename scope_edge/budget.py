"""The two KV budgets of SCOPE: one for the prompt, one for the generated text."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Budget:
    """Cells the KV cache may hold, split as SCOPE splits them.

    prefill: cells kept from the prompt after prefill (alpha1 + alpha2).
    decode: cells for generated tokens (beta1 + beta2).
    observation_window: last prompt tokens always kept, and whose attention
        scores the rest of the prompt (alpha2).
    recent_window: last generated tokens always kept (beta2).
    """

    prefill: int
    decode: int
    observation_window: int = 8
    recent_window: int = 256

    def __post_init__(self) -> None:
        for name in ("prefill", "decode", "observation_window", "recent_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"Budget.{name} must be an int, got {value!r}")
        # decode >= 2: one cell is always the newest token, one must be free for the next
        if self.prefill < 1 or self.decode < 2:
            raise ValueError(
                f"Budget needs prefill >= 1 and decode >= 2 cells, got prefill={self.prefill}, "
                f"decode={self.decode}"
            )
        if not 1 <= self.observation_window <= self.prefill:
            raise ValueError(
                f"Budget.observation_window must be in [1, prefill={self.prefill}], "
                f"got {self.observation_window}"
            )
        if not 1 <= self.recent_window <= self.decode:
            raise ValueError(
                f"Budget.recent_window must be in [1, decode={self.decode}], got {self.recent_window}"
            )

    @property
    def total(self) -> int:
        """Prefill plus decode cells: the unified budget of the baselines."""
        return self.prefill + self.decode
