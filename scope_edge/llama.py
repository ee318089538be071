"""ScopeLlama: llama.cpp generation with the KV cache kept inside SCOPE budgets.

A thin facade over the runtime (scope_edge.runtime: model, context, cache,
sampling, generation) and a policy (scope_edge.policies, which sees only
positions and scores). It checks arguments, serialises generations, and
frees llama.cpp's memory exactly once.

One concept: the public single-conversation object. Its length is the
documented surface (constructor forms, generate / stream / chat /
teacher_force, the cache views) and their argument checks; the work is in
the runtime.
"""
from __future__ import annotations

import ctypes
import dataclasses
import enum
import logging
import os
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from . import memory
from .budget import Budget
from .devices import Devices
from .policies import Policy, build, validate_names
from .policies.registry import DEFAULT_KEEP_STRUCTURE, DEFAULT_LEND, DEFAULT_STRATEGY, default_budget, validate_lend
from .checks import is_int
from .policies.checks import require_head_reduce
from .runtime.cache import Cache, CacheSettings
from .runtime.config import EngineConfig
from .runtime.context import Context, default_capture_layers, layer_flags
from .runtime.generation import (Chunk, Completion, EvictionNotice, FinishReason, Generation, GenerationStats, Limits,
                                 start_generation)
from .runtime.model import Model
from .runtime.sampling import GREEDY, Sampler, Sampling
from .runtime.calibrate import basis_for
from .runtime.sketch import Sketch, SketchBasis

__all__ = ["ScopeLlama", "EngineConfig", "Chunk", "Completion", "FinishReason", "GenerationStats", "Sampling", "Sketch", "Limits"]

log = logging.getLogger(__name__)

_CLOSE_WAIT = 10.0  # seconds close() waits for another thread's generation to let go before leaving it the free


class _Default(enum.Enum):
    """budget= not given: tells "the default budget" apart from budget=None (the stock cache)."""

    BUDGET = "the default budget"


DEFAULT = _Default.BUDGET


def _limits(max_tokens: int, stop: str | Sequence[str] | None, ignore_eos: bool) -> Limits:
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    else:
        stops = tuple(stop)
    return Limits(max_tokens=max_tokens, stop=stops, ignore_eos=bool(ignore_eos))


def _sampling(sampling: Sampling | None) -> Sampling:
    if sampling is None:
        return GREEDY
    if not isinstance(sampling, Sampling):
        raise ValueError(f"sampling must be a scope_edge.Sampling or None (greedy), got {type(sampling).__name__}")
    return sampling


class ScopeLlama:
    """A GGUF model whose KV cache stays inside a prefill and a decode budget.

    The policy: policy=Policy(prefill=..., decode=...) composed from
    scope_edge.policies, or the short form budget=Budget(...) (or
    kv_memory="512MiB", a budget sized by memory) with strategy /
    prefill_selector / head_reduce naming the parts. Neither: the default
    budget for the model (policies.registry.default_budget, docs/budgets.md):
    a generation whose prompt and output fit in it is the stock cache's, token
    for token; longer ones are held at the bound, the chat's structure kept
    (Policy.keep_structure), and the first eviction of a generation logs one
    line. budget=None: the full cache (stock llama.cpp
    behaviour). Exact attention capture needs flash attention off (the
    default); with flash_attn=True a policy that reads scores needs
    scoring=Sketch(...).

    kv_memory: the KV cache's size as bytes or a str ("512MiB", "1.5GiB"):
        Budget.for_memory sizes the budget for this model and type_k / type_v,
        so a generation allocates at most that (docs/budgets.md).

    head_reduce: how a cell's score aggregates attention heads per layer: "max"
        (default; measured closer to the full cache, see README Results) or "sum".
    lend: under a SCOPE strategy, the prompt borrows the decode room until
        the output needs it, and this rule picks which borrowed cell goes back
        first: "accumulated", "recent", "passed" (policies/lend.py) or "none"
        (the paper: the decode room stays empty until the output fills it).
    n_ctx: fixed KV cells; None sizes the context per generation to what the
        policy needs (the full cache: prompt + max_tokens).

    How the engine runs (scope_edge.EngineConfig, validated there): config=
    EngineConfig(...), or its fields as keywords, the short form:
    capture_layers, n_threads, type_k, type_v, flash_attn, scoring,
    prefill_chunk, chunked_prefill, position_limit, and the devices'
    n_gpu_layers, main_gpu, tensor_split, rpc_servers (scope_edge.devices).
    With flash_attn=True a policy that reads scores needs scoring=Sketch(...).
    A selector with a probe (SnapKV's default) fills the last probe_tokens of
    each prefill chunk with the prompt's own tail, run as the queries that
    score the chunk and then removed, so every chunk is selected by the
    question at the end.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        config: EngineConfig | None = None,
        policy: Policy | None = None,
        budget: Budget | None | _Default = DEFAULT,
        kv_memory: int | str | None = None,
        strategy: str = DEFAULT_STRATEGY,
        prefill_selector: str | None = None,
        head_reduce: str = "max",
        lend: str = DEFAULT_LEND,
        n_ctx: int | None = None,
        verbose: bool = False,
        **engine: Any,
    ) -> None:
        if config is not None and (model_path is not None or engine):
            raise ValueError("give config=EngineConfig(...) or model_path and engine keywords "
                             f"({', '.join(sorted(engine)) or 'model_path'}), not both")
        self.config = config if config is not None else EngineConfig.from_keywords(model_path, **engine)
        if not isinstance(self.config, EngineConfig):
            raise ValueError(f"config must be a scope_edge.EngineConfig, got {type(self.config).__name__}")
        self._check_policy_args(policy, budget, kv_memory, strategy, prefill_selector, head_reduce, lend)
        if n_ctx is not None and (not is_int(n_ctx) or n_ctx < 1):
            raise ValueError(f"n_ctx must be an int >= 1 or None (sized per generation), got {n_ctx!r}")
        cfg = self.config
        cfg.check_policy(policy)
        self.model_path = cfg.path()
        self.geometry = memory.read_geometry(self.model_path)
        # whether the budget is the default one (its evictions are announced louder)
        self.default_budget = policy is None and budget is DEFAULT and kv_memory is None
        # an automatic chunk follows a sized budget (budget.sized_chunk) while that budget runs
        self._given_chunk = cfg.prefill_chunk
        if kv_memory is not None:
            budget, cfg = cfg.budget_for_memory(kv_memory, self.geometry)
        elif budget is DEFAULT and policy is None:
            budget = default_budget(self.geometry, n_ctx=n_ctx, prefill_chunk=cfg.chunk)
            cfg = cfg if budget is None else cfg.for_sized_budget(budget)
        elif budget is DEFAULT:
            budget = None
        self.config = cfg
        self._policy = policy if policy is not None else self._policy_from(budget, strategy, prefill_selector,
                                                                           head_reduce, lend)
        if self.default_budget and self._policy is not None:
            self._policy = dataclasses.replace(self._policy, keep_structure=DEFAULT_KEEP_STRUCTURE)
        cfg.check_policy(self._policy)
        # The short form the policy was built from; all None when policy= named the parts.
        short = policy is None
        self.budget = budget if short else None
        self.strategy = strategy if short else None
        self.prefill_selector = prefill_selector if short else None
        self.head_reduce = head_reduce if short else None
        self.lend = lend if short else None
        self._lock = threading.Lock()
        self._active: tuple[weakref.ref[Iterator[Chunk]], int] | None = None
        self._closing = ctypes.c_bool(False)  # also read by llama.cpp's abort callback
        self.model = Model(self.model_path, devices=cfg.devices, verbose=verbose)
        try:
            self.model.check_supported()
            self._check_window(budget)
            capture_layers = cfg.capture_layers
            if capture_layers is None:
                capture_layers = default_capture_layers(self.model.n_layer, offloaded=cfg.devices.offloads(),
                                                        swa=self.model.swa_layers)
            flags = layer_flags(capture_layers, self.model.n_layer)
            # the captured layers (None: every one)
            self.capture_layers: list[int] | None = None if flags is None else np.flatnonzero(flags).tolist()
            self.sketch: SketchBasis | None = None if cfg.scoring is None else basis_for(
                self.model, cfg.scoring, type_k=cfg.type_k, flash_attn=cfg.flash_attn, n_threads=cfg.threads()[1])
        except ValueError:
            self.model.close()
            raise
        settings = CacheSettings(engine=cfg, n_ctx=n_ctx, capture_layers=flags, sketch=self.sketch)
        self._cache = Cache(self.model, settings, abort=self._closing)

    @property
    def devices(self) -> Devices:
        """Where the layers run (config.devices)."""
        return self.config.devices

    @property
    def policy(self) -> Policy | None:
        """The policy every generation runs (a fresh copy each); None: the
        full cache. budget / strategy / prefill_selector / head_reduce / lend
        record the short form it was built from; setting a policy clears them
        (None), so they never describe a policy that no longer runs."""
        return self._policy

    @policy.setter
    def policy(self, policy: Policy | None) -> None:
        self.config.check_policy(policy)
        if self.config.prefill_chunk != self._given_chunk:  # the sized budget's chunk goes with it
            self.config = dataclasses.replace(self.config, prefill_chunk=self._given_chunk)
            self._cache.settings = dataclasses.replace(self._cache.settings, engine=self.config)
        self._policy = policy
        self.budget = self.strategy = self.prefill_selector = self.head_reduce = self.lend = None
        self.default_budget = False

    def _check_window(self, budget: Budget | None) -> None:
        """A sliding-window model's budgets must hold its window: evicting a
        position removes it from the window's cache too (llama_memory_seq_rm
        acts on both), so the last n_swa - 1 positions always stay."""
        n_swa = self.model.n_swa
        if n_swa and budget is not None and min(budget.prefill, budget.decode) < n_swa:
            raise ValueError(
                f"{self.model_path}: sliding window of {n_swa} positions, whose cells an eviction would take from "
                f"the sliding-window layers too; budgets must hold it: got prefill={budget.prefill}, "
                f"decode={budget.decode}, need each >= {n_swa}")

    @staticmethod
    def _check_policy_args(policy: Policy | None, budget: Budget | None | _Default, kv_memory: int | str | None,
                           strategy: str, prefill_selector: str | None, head_reduce: str, lend: str) -> None:
        """Refuse bad or conflicting policy arguments before the model file is opened."""
        validate_names(strategy, prefill_selector)
        validate_lend(lend)
        require_head_reduce("ScopeLlama", head_reduce)
        if budget is not DEFAULT and budget is not None and not isinstance(budget, Budget):
            raise ValueError(f"budget must be a scope_edge.Budget or None (the full cache), "
                             f"got {type(budget).__name__}")
        if kv_memory is not None:
            memory.parse_bytes(kv_memory)
            if budget is not DEFAULT:
                raise ValueError("give either kv_memory= (a budget sized by memory) or budget=, not both")
        if policy is not None:
            if budget is not DEFAULT and budget is not None or kv_memory is not None:
                raise ValueError("give either policy= or budget= / kv_memory= (the short forms that build one), "
                                 "not both")

    @staticmethod
    def _policy_from(budget: Budget | None, strategy: str, prefill_selector: str | None, head_reduce: str,
                     lend: str) -> Policy | None:
        """The policy the short form names (None: full cache)."""
        if budget is None:
            return None
        return build(budget, strategy=strategy, prefill_selector=prefill_selector, head_reduce=head_reduce,
                     lend=lend)

    # -- lifecycle -------------------------------------------------------
    def close(self) -> None:
        """Free llama.cpp's memory. A generation running in another thread
        stops at its next decode (llama.cpp's abort callback) or step, raising
        RuntimeError("... closed ...") there, and the memory is freed only once
        it has let go: here, or by that generation as it ends if it holds on
        longer than _CLOSE_WAIT (a stream suspended in another thread). A
        suspended stream raises when resumed."""
        closing = getattr(self, "_closing", None)
        if closing is not None:
            closing.value = True
        lock = getattr(self, "_lock", None)
        if lock is None:  # __init__ failed before any generation could start
            self._free()
            return
        active = getattr(self, "_active", None)
        if active is not None and active[1] == threading.get_ident():
            self._close_abandoned_stream()
        if not lock.acquire(timeout=_CLOSE_WAIT):
            log.info("close(): a generation in another thread still holds this ScopeLlama; it frees it as it ends")
            return
        try:
            self._free()
        finally:
            lock.release()

    def _free(self) -> None:
        if getattr(self, "_cache", None) is not None:
            self._cache.close()
        if getattr(self, "model", None) is not None:
            self.model.close()

    @property
    def closed(self) -> bool:
        """True once close() was called (memory freed, or about to be)."""
        return bool(self._closing.value) or self.model.closed

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this ScopeLlama is closed")

    def __enter__(self) -> ScopeLlama:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may be gone
            pass

    # -- what the cache holds ----------------------------------------------
    @property
    def context(self) -> Context | None:
        """The llama.cpp context and its cache (None before the first
        generation, or after close()): cells(), visible(), memory for
        llama.cpp's own view. Use it between generations, not during one."""
        return self._cache.own_context

    @property
    def n_ctx(self) -> int:
        """KV cells allocated now (0 before the first generation)."""
        ctx = self._cache.context
        return ctx.n_cells if ctx else 0

    @property
    def position_limit(self) -> int:
        """Positions stay below this under a policy (re-indexed when they would reach it)."""
        return self._cache.position_limit

    def kv_positions(self) -> np.ndarray:
        """Sorted positions held in the KV cache now."""
        ctx = self._cache.context
        return ctx.positions() if ctx else np.zeros(0, dtype=np.int32)

    def history(self) -> list[int]:
        """Every token the cache has been fed since it was last emptied (the
        prompt a resumed call is matched against), evicted ones included."""
        session = self._cache.session
        return list(session.tokens) if session is not None else []

    # -- tokens and text -----------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids of text as a prompt (BOS added, special tokens parsed)."""
        if not isinstance(text, str):
            raise TypeError(f"tokenize takes a str, got {type(text).__name__}")
        return self.model.tokenize(text)

    def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of token ids."""
        return self.model.detokenize(self._prompt_tokens(list(tokens)) if len(tokens) else [])

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The prompt for messages through the GGUF's chat template, the
        assistant's turn opened."""
        return self.model.render_chat(messages)

    # -- generation ------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], *, max_tokens: int = 256, stop: str | Sequence[str] | None = None,
                 sampling: Sampling | None = None, ignore_eos: bool = False, resume: bool = False) -> Completion:
        """The whole completion of prompt; stream() documents the arguments."""
        text: list[str] = []
        tokens: list[int] = []
        last: Chunk | None = None
        for last in self.stream(prompt, max_tokens=max_tokens, stop=stop, sampling=sampling, ignore_eos=ignore_eos,
                                resume=resume):
            text.append(last.text)
            if last.token is not None:
                tokens.append(last.token)
        assert last is not None and last.finish_reason is not None and last.stats is not None  # stream ends so
        return Completion("".join(text), tokens, last.finish_reason, last.stats)

    def stream(self, prompt: str | Sequence[int], *, max_tokens: int = 256, stop: str | Sequence[str] | None = None,
               sampling: Sampling | None = None, ignore_eos: bool = False, resume: bool = False) -> Iterator[Chunk]:
        """Stream a generation: one Chunk per token, the last carrying the
        finish reason and stats.

        sampling: how tokens are chosen (None: greedy, as stock llama.cpp's greedy).
        stop: strings that end the text. ignore_eos: keep generating past
        end-of-generation tokens (benchmarks that need a fixed length).
        resume: continue the cache: a prompt extending what the cache was fed
        (the last prompt and its output) prefills only the new tokens. A
        prompt that leaves it earlier reuses the shared beginning up to the
        first cell evicted after the history passed it (docs/budgets.md), so
        its answer never depends on text it does not hold. Otherwise the cache
        starts empty.
        """
        limits = _limits(max_tokens, stop, ignore_eos)
        return self._start(self._prompt_tokens(prompt), limits, _sampling(sampling), resume=bool(resume))

    def chat(self, messages: Sequence[Mapping[str, str]], *, max_tokens: int = 256,
             stop: str | Sequence[str] | None = None, sampling: Sampling | None = None) -> Iterator[Chunk]:
        """Stream the assistant's reply to messages, through the GGUF's chat template.

        A conversation continues on its cache: when messages extend the
        previous call's (with the reply it produced), only the new messages
        are prefilled. Each turn, the prefill budget bounds what survives of
        the whole conversation so far and the decode budget bounds the new
        reply; the cells kept from earlier turns are scored again with the
        new turn's attention."""
        self._check_open()
        return self.stream(self.render_chat(messages), max_tokens=max_tokens, stop=stop, sampling=sampling,
                           resume=True)

    def teacher_force(self, prompt: str | Sequence[int], tokens: Sequence[int]) -> Iterator[np.ndarray]:
        """Next-token logits under this instance's cache policy while feeding
        `tokens` after `prompt`, whatever the model would have sampled: one
        float32 [n_vocab] array after the prompt, then one after each token but
        the last. The fidelity harness compares these between caches. The
        decode schedule sees max_tokens = len(tokens)."""
        forced = self._prompt_tokens(list(tokens)) if len(tokens) else []
        if not forced:
            raise ValueError("teacher_force needs at least one token to feed")
        prompt_tokens = self._prompt_tokens(prompt)
        self._close_abandoned_stream()

        def run() -> Iterator[np.ndarray]:
            yield from self._generation(prompt_tokens, len(forced), resume=False).logits_after(prompt_tokens, forced)

        return self._guard(run())

    # -- internals ---------------------------------------------------------
    def _start(self, prompt: list[int], limits: Limits, sampling: Sampling, *, resume: bool) -> Iterator[Chunk]:
        self._close_abandoned_stream()

        def run() -> Iterator[Chunk]:
            gen = self._generation(prompt, limits.max_tokens, resume=resume)
            sampler = Sampler(sampling, self.model, ignore_eos=limits.ignore_eos, history=prompt)
            try:
                yield from gen.stream(prompt, limits, sampler)
            finally:
                sampler.close()

        return self._guard(run())

    def _generation(self, prompt: list[int], max_tokens: int, *, resume: bool) -> Generation:
        return start_generation(self._cache, prompt, policy=self._policy, max_tokens=max_tokens, resume=resume,
                                check_open=self._check_open, notice=self._notice())

    def _notice(self) -> EvictionNotice:
        """What the first eviction of a generation says: WARNING under the
        default budget (the user asked for nothing), INFO under one they chose."""
        if self.budget is None:
            return EvictionNotice(holder="this ScopeLlama's policy")
        b = self.budget
        size = self._cache.stock_kv_bytes(b.total) / 2**20
        kind = "the default budget" if self.default_budget else "the budget"
        return EvictionNotice(holder=f"{kind} (prefill={b.prefill} + decode={b.decode} cells, {size:.1f} MiB of KV)",
                              level=logging.WARNING if self.default_budget else logging.INFO)

    def _guard(self, gen: Iterator) -> Iterator:
        """One generation at a time (other threads wait for the lock); an
        interrupted one leaves the cache to start clean next time."""
        guarded = self._guarded(gen)
        self._active = (weakref.ref(guarded), threading.get_ident())
        return guarded

    def _guarded(self, gen: Iterator) -> Iterator:
        with self._lock:
            try:
                self._check_open()
                yield from gen
            except BaseException:
                self._cache.forget_session()  # interrupted mid-step: the next call starts clean
                raise
            finally:
                if self._closing.value:  # close() gave up waiting for us: free now that we let go
                    self._free()

    def _close_abandoned_stream(self) -> None:
        """A new generation in the thread that left an older stream unfinished
        ends that stream (it would otherwise hold the lock forever)."""
        if self._active is None:
            return
        ref, thread = self._active
        old = ref()
        if old is not None and thread == threading.get_ident():
            log.info("closing an unfinished stream of this ScopeLlama to start a new generation")
            old.close()

    def _prompt_tokens(self, prompt: str | Sequence[int]) -> list[int]:
        self._check_open()
        if isinstance(prompt, (bytes, bytearray)):
            raise TypeError("prompt must be a str or a sequence of token ids, got bytes: decode it first "
                            "(prompt.decode('utf-8'))")
        if not isinstance(prompt, (str, Sequence, np.ndarray)):
            raise TypeError(f"prompt must be a str or a sequence of token ids, got {type(prompt).__name__}")
        if isinstance(prompt, str):
            if prompt == "":
                raise ValueError("prompt is empty; pass some text or a list of token ids")
            tokens = self.model.tokenize(prompt)
        else:
            tokens = list(prompt)
            bad = [t for t in tokens if isinstance(t, bool) or not isinstance(t, (int, np.integer))]
            if bad:
                raise ValueError(f"prompt token ids must be ints, got {bad[:3]!r}")
            tokens = [int(t) for t in tokens]
            out = [t for t in tokens if not 0 <= t < self.model.n_vocab]
            if out:
                raise ValueError(f"token ids {out[:5]} are outside the vocabulary [0, {self.model.n_vocab})")
        if not tokens:
            raise ValueError("prompt has no tokens")
        return tokens
