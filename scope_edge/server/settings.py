"""What `scope-edge serve` is configured with (ServerSettings: the engine's
configuration plus the serving fields), and the default policy and the one a
request's "scope" names, both built by policies.registry.build, the path the
facade's short form takes."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from ..budget import Budget
from ..checks import is_int
from ..policies import Policy, build, validate_names
from ..policies.registry import DEFAULT_LEND, DEFAULT_STRATEGY
from ..runtime.batch import BatchSettings, slot_cells_for
from ..runtime.config import EngineConfig


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """Everything `scope-edge serve` is configured with: the engine's
    configuration (EngineConfig: model, devices, cache types, scoring, ...)
    and the serving fields.

    budget / strategy / prefill_selector / lend: the default policy, by
    name; a request's "scope" may change them (a scope naming another
    strategy runs that strategy's own selector). keep_structure: the
    server's budget keeps the chat's structure (Policy.keep_structure);
    `serve` sets it when given no budget, as ScopeLlama's default budget
    does (policies.registry.DEFAULT_KEEP_STRUCTURE); a scope that names a
    budget runs without it, like a budget passed to ScopeLlama. slots: conversations decoded together. slot_cells: KV cells
    per slot (None: what the default budget needs, slot_cells_for()).
    max_tokens: when a request gives none. queue_size: requests that may wait
    for a slot. api_key: required as "Authorization: Bearer <key>" on /v1
    when set."""

    engine: EngineConfig
    model_name: str
    budget: Budget
    strategy: str = DEFAULT_STRATEGY
    prefill_selector: str | None = None
    lend: str = DEFAULT_LEND
    keep_structure: bool = False
    slots: int = 4
    slot_cells: int | None = None
    step_tokens: int | None = None
    max_tokens: int = 512
    queue_size: int = 16
    api_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000

    def __post_init__(self) -> None:
        if not isinstance(self.engine, EngineConfig):
            raise ValueError(f"engine must be an EngineConfig, got {type(self.engine).__name__}")
        validate_names(self.strategy, self.prefill_selector)
        if not isinstance(self.keep_structure, bool):
            raise ValueError(f"keep_structure must be True or False, got {self.keep_structure!r}")
        for name in ("max_tokens", "port"):
            if not is_int(getattr(self, name)) or getattr(self, name) < (0 if name == "port" else 1):
                raise ValueError(f"{name} must be an int >= {0 if name == 'port' else 1}, got {getattr(self, name)!r}")
        if not is_int(self.queue_size) or self.queue_size < 0:
            raise ValueError(f"queue_size must be an int >= 0, got {self.queue_size!r}")
        self.engine.check_policy(self.policy())

    def policy(self, *, budget: Budget | None = None, strategy: str | None = None, lend: str | None = None) -> Policy:
        """The default policy, or the one a request's scope names (its
        budget, strategy, lend; the server's for what it leaves out). The
        structure is kept on the server's budget only (keep_structure)."""
        strategy = strategy or self.strategy
        selector = self.prefill_selector if strategy == self.strategy else None
        policy = build(budget or self.budget, strategy=strategy, prefill_selector=selector, lend=lend or self.lend)
        return dataclasses.replace(policy, keep_structure=self.keep_structure and budget is None)

    def batch_settings(self) -> BatchSettings:
        cells = self.slot_cells or slot_cells_for(self.policy(), max_tokens=self.max_tokens,
                                                  prefill_chunk=self.engine.chunk)
        return BatchSettings(slots=self.slots, slot_cells=cells, step_tokens=self.step_tokens, engine=self.engine)


def model_name_of(path: str) -> str:
    """The id a model is served under: its file name without .gguf."""
    name = os.path.basename(path)
    return name[: -len(".gguf")] if name.endswith(".gguf") else name
