"""The two KV budgets of SCOPE: one for the prompt, one for the generated text."""
from __future__ import annotations

from dataclasses import dataclass

# Defaults chosen by measurement (bench/fidelity.py, RESULTS.md "Score
# aggregation"): a 32-token observation window votes better than the paper's 8
# on this model; half the decode budget, at most the paper's 256, stays recent.
OBSERVATION_WINDOW = 32
RECENT_WINDOW = 256


@dataclass(frozen=True, kw_only=True)
class Budget:
    """Cells the KV cache may hold, split as SCOPE splits them.

    prefill: cells kept from the prompt after prefill (alpha1 + alpha2).
    decode: cells for generated tokens (beta1 + beta2).
    observation_window: last prompt tokens always kept, and whose attention
        scores the rest of the prompt (alpha2). None (default):
        min(32, prefill).
    recent_window: last generated tokens always kept (beta2). None (default):
        min(256, decode // 2).
    Both windows are ints once the Budget exists; explicit values outside
    their range raise ValueError.
    """

    prefill: int
    decode: int
    observation_window: int | None = None
    recent_window: int | None = None

    def __post_init__(self) -> None:
        for name in ("prefill", "decode", "observation_window", "recent_window"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"Budget.{name} must be an int, got {value!r}")
        # decode >= 2: one cell is always the newest token, one must be free for the next
        if self.prefill < 1 or self.decode < 2:
            raise ValueError(
                f"Budget needs prefill >= 1 and decode >= 2 cells, got prefill={self.prefill}, "
                f"decode={self.decode}"
            )
        if self.observation_window is None:
            object.__setattr__(self, "observation_window", min(OBSERVATION_WINDOW, self.prefill))
        if self.recent_window is None:
            object.__setattr__(self, "recent_window", min(RECENT_WINDOW, self.decode // 2))
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
