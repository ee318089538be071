"""Validation of policy settings: ValueError naming the setting and its value."""
from __future__ import annotations

HEAD_REDUCTIONS = ("sum", "max")


def is_int(value: object) -> bool:
    """True for a plain int: bool is an int subclass, but True is not a count."""
    return isinstance(value, int) and not isinstance(value, bool)


def require_int(owner: str, name: str, value: object, *, lo: int, hi: int | None = None) -> None:
    """Raise unless lo <= value (<= hi) and value is a plain int."""
    if not is_int(value):
        raise ValueError(f"{owner}.{name} must be an int, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{owner}.{name} must be {bounds}, got {value}")


def require_head_reduce(owner: str, value: object) -> None:
    """Raise unless value names a head aggregation."""
    if value not in HEAD_REDUCTIONS:
        raise ValueError(f"{owner}.head_reduce must be one of {HEAD_REDUCTIONS}, got {value!r}")
