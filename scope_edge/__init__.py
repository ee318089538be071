"""scope-edge: SCOPE KV-cache compression inside an unmodified llama.cpp.

    from scope_edge import ScopeLlama, Budget
    with ScopeLlama(budget=Budget(prefill=1024, decode=512)) as llm:
        print(llm.generate("Hello", max_tokens=64).text)

A policy composed from parts: ScopeLlama(policy=Policy(prefill=SnapKV(...),
decode=Slide(...))) with scope_edge.policies. How the engine runs (devices,
cache types, flash attention, scoring, ...): ScopeLlama(config=EngineConfig(...)),
or its fields as keywords.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._cache_dir import place_numba_cache

place_numba_cache()  # before any kernel compiles: never write caches into the installed package

__version__ = "0.1.0"
__all__ = ["ScopeLlama", "EngineConfig", "Budget", "Policy", "Sampling", "Sketch", "Completion", "Chunk", "GenerationStats"]

if TYPE_CHECKING:
    from .budget import Budget
    from .llama import Chunk, Completion, GenerationStats, ScopeLlama
    from .policies import Policy
    from .runtime.config import EngineConfig
    from .runtime.sampling import Sampling
    from .runtime.sketch import Sketch


def __getattr__(name: str) -> Any:
    # Lazy, so policies and models import without loading llama.cpp.
    if name == "Budget":
        from .budget import Budget

        return Budget
    if name == "Policy":
        from .policies import Policy

        return Policy
    if name == "EngineConfig":
        from .runtime.config import EngineConfig

        return EngineConfig
    if name == "Sketch":
        from .runtime.sketch import Sketch

        return Sketch
    if name in ("ScopeLlama", "Completion", "Chunk", "GenerationStats", "Sampling"):
        from . import llama

        return getattr(llama, name)
    raise AttributeError(f"module 'scope_edge' has no attribute {name!r}")
