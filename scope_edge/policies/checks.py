"""Validation of policy settings: ValueError naming the setting and its value
(the general int checks live in scope_edge.checks)."""
from __future__ import annotations

HEAD_REDUCTIONS = ("sum", "max")


def require_head_reduce(owner: str, value: object) -> None:
    """Raise unless value names a head aggregation."""
    if value not in HEAD_REDUCTIONS:
        raise ValueError(f"{owner}.head_reduce must be one of {HEAD_REDUCTIONS}, got {value!r}")
