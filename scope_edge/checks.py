"""Argument validators every layer shares: ValueError naming the setting and its value.

A leaf module (it imports nothing of the package), so the policies, the
runtime and the facade can all use it without importing each other.
"""
from __future__ import annotations


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
