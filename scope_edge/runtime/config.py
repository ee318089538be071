"""EngineConfig: how an engine runs a model, declared and validated once.

Every engine takes one: ScopeLlama (whose keyword short form builds it),
the batched runtime (BatchSettings.engine), the server (ServerSettings.engine)
and the benchmarks (BenchConfig.engine). The policy is not part of it: a
Policy (scope_edge.policies) is the one description of what the cache keeps,
and check_policy() says whether this engine can run one.

    from scope_edge import EngineConfig, ScopeLlama, Sketch
    config = EngineConfig(model_path="model.gguf", flash_attn=True, scoring=Sketch(rank=16))
    llm = ScopeLlama(config=config, budget=Budget(prefill=1024, decode=512))
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import models
from ..budget import Budget, sized_chunk
from ..checks import is_int
from ..devices import Devices
from ..policies import Policy
from ..memory import PREFILL_CHUNK, KvGeometry
from .context import KV_TYPES
from .sketch import Sketch


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """How an engine loads and runs a model.

    model_path: the GGUF file (None: the default model, fetched once).
    devices: where the layers run (scope_edge.devices.Devices: n_gpu_layers,
        main_gpu, tensor_split, rpc_servers).
    n_threads: decode threads (None: llama-cpp-python's defaults, half the
        CPUs for one token and all of them for a batch, so stock and ours
        compare like for like).
    type_k, type_v: K and V cache types, "f16", "q8_0" or "q4_0". A quantized
        V cache needs flash_attn=True.
    flash_attn: llama.cpp's fused attention (off by default). It never
        computes the attention probabilities the policies score with, so a
        policy that reads scores then needs scoring=Sketch(...).
    scoring: None scores cells with the exact attention probabilities;
        Sketch(rank=..., basis=...) approximates them from low-rank key
        sketches, with flash attention on or off (scope_edge.runtime.sketch).
    capture_layers: the layers whose attention scores cells (None: every
        layer on the CPU, every 4th from layer 2 when layers are offloaded:
        runtime.context.default_capture_layers); checked against the model
        when it loads.
    prefill_chunk, chunked_prefill: under a policy, a prompt longer than the
        kept prompt + prefill_chunk is prefilled in chunks of prefill_chunk
        cells, selecting after each (chunked_prefill None: automatic;
        True/False force). prefill_chunk None (automatic): 256, or for a
        budget ScopeLlama sizes from cells (the default budget, kv_memory)
        half its decode room, at most 256 (budget.sized_chunk).
    position_limit: under a policy, positions are re-indexed when they would
        reach it (None: the model's trained context).
    """

    model_path: str | None = None
    devices: Devices = field(default_factory=Devices)
    n_threads: int | None = None
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = False
    scoring: Sketch | None = None
    capture_layers: tuple[int, ...] | None = None
    prefill_chunk: int | None = None
    chunked_prefill: bool | None = None
    position_limit: int | None = None

    def __post_init__(self) -> None:
        if self.model_path is not None:
            if not isinstance(self.model_path, (str, os.PathLike)):
                raise ValueError(f"model_path must be a path or None (the default model), got {self.model_path!r}")
            object.__setattr__(self, "model_path", os.fspath(self.model_path))
        if not isinstance(self.devices, Devices):
            raise ValueError(f"devices must be a scope_edge.devices.Devices, got {type(self.devices).__name__}")
        if self.n_threads is not None and (not is_int(self.n_threads) or self.n_threads < 1):
            raise ValueError(f"n_threads must be an int >= 1 or None, got {self.n_threads!r}")
        self._check_kv_types()
        if self.scoring is not None and not isinstance(self.scoring, Sketch):
            raise ValueError(f"scoring must be None (exact attention) or a scope_edge.Sketch, got {self.scoring!r}")
        if self.capture_layers is not None:
            if isinstance(self.capture_layers, (str, bytes)) or not isinstance(self.capture_layers, Sequence):
                raise ValueError(f"capture_layers must be layer indices or None (every layer), "
                                 f"got {self.capture_layers!r}")
            object.__setattr__(self, "capture_layers", tuple(self.capture_layers))
        if self.prefill_chunk is not None and (not is_int(self.prefill_chunk) or self.prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be an int >= 1 or None (automatic), got {self.prefill_chunk!r}")
        if self.chunked_prefill not in (None, True, False):
            raise ValueError(f"chunked_prefill must be None (auto), True or False, got {self.chunked_prefill!r}")
        if self.position_limit is not None and (not is_int(self.position_limit) or self.position_limit < 2):
            raise ValueError(f"position_limit must be an int >= 2 or None (the trained context), "
                             f"got {self.position_limit!r}")

    @property
    def chunk(self) -> int:
        """The prefill chunk: prefill_chunk, or PREFILL_CHUNK when automatic."""
        return PREFILL_CHUNK if self.prefill_chunk is None else self.prefill_chunk

    def for_sized_budget(self, budget: Budget) -> EngineConfig:
        """This configuration for a budget sized from cells (the default,
        kv_memory): an automatic prefill_chunk becomes budget.sized_chunk."""
        if self.prefill_chunk is not None:
            return self
        return dataclasses.replace(self, prefill_chunk=sized_chunk(budget))

    def budget_for_memory(self, size: int | str, geometry: KvGeometry) -> tuple[Budget, EngineConfig]:
        """The budget whose allocation fits in `size` (Budget.for_memory, at
        this configuration's cache types and chunk) and this configuration
        for it (for_sized_budget): what kv_memory means wherever it is given."""
        budget = Budget.for_memory(size, geometry, type_k=self.type_k, type_v=self.type_v, prefill_chunk=self.chunk)
        return budget, self.for_sized_budget(budget)

    @classmethod
    def from_keywords(cls, model_path: str | os.PathLike[str] | None = None, **fields: Any) -> EngineConfig:
        """The configuration ScopeLlama's short form names with flat keywords:
        EngineConfig's fields, and Devices' (n_gpu_layers, main_gpu,
        tensor_split, rpc_servers) for `devices`."""
        device_fields = {f.name for f in dataclasses.fields(Devices)}
        devices = Devices(**{name: fields.pop(name) for name in list(fields) if name in device_fields})
        return cls(model_path=model_path, devices=devices, **fields)

    def _check_kv_types(self) -> None:
        """ValueError for cache types llama.cpp would refuse."""
        for name, value in (("type_k", self.type_k), ("type_v", self.type_v)):
            if value not in KV_TYPES:
                raise ValueError(f"{name} must be one of {sorted(KV_TYPES)}, got {value!r}")
        if self.flash_attn not in (True, False):
            raise ValueError(f"flash_attn must be True or False, got {self.flash_attn!r}")
        if self.type_v != "f16" and not self.flash_attn:
            raise ValueError(f"type_v={self.type_v!r}: llama.cpp quantizes the V cache only with flash attention; "
                             "pass flash_attn=True (policies then score with key sketches: scoring=Sketch())")

    def check_policy(self, policy: Policy | None) -> None:
        """ValueError when this engine cannot run policy: one that reads
        attention scores has none under flash attention without key sketches."""
        if policy is not None and not isinstance(policy, Policy):
            raise ValueError(f"policy must be a scope_edge.policies.Policy or None, got {type(policy).__name__}")
        if self.flash_attn and self.scoring is None and policy is not None and policy.scored:
            raise ValueError(
                f"policy {type(policy.prefill).__name__}+{type(policy.decode).__name__} scores cells by attention "
                "probabilities, which flash attention never computes: pass scoring=Sketch() (scores from key "
                "sketches; --sketch-rank on the command line), flash_attn=False, or the full cache / streaming")

    def threads(self) -> tuple[int, int]:
        """(n_threads, n_threads_batch): n_threads for both when given, else
        llama-cpp-python's defaults (half the CPUs, all of them)."""
        cpus = os.cpu_count() or 1
        return self.n_threads or max(cpus // 2, 1), self.n_threads or cpus

    def path(self) -> str:
        """The model file, checked (the default model is fetched once)."""
        return str(models.resolve_model_path(self.model_path))
