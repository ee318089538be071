"""Several generations in one context, decoded together (continuous batching).

One Context holds `slots` sequences (n_seq = slots, one KV stream of
slot_cells cells each: a token attends over its own sequence's cells only).
Each slot is one sequence with its own Cache and Session (over a SeqView of
the shared context), policy copy, budgets and Generation: the
single-sequence runtime, unchanged. Each generation runs in
its own thread; its decodes go through its SeqView to the Batcher, which runs
one llama_decode once every running generation has handed in its next piece
(a decoded token, or up to step_tokens of a prompt). So one step carries the
next token of every running sequence, a new request joins at the next step,
a finished one leaves, and a long prompt is prefilled a piece per step
instead of stalling the others.

Every use of the shared context (decode, capture, evict, sample) holds the
Batcher's lock, and a step runs only when every running generation waits in
it, so no cache operation ever overlaps a decode.
"""
from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .. import memory
from ..policies import Policy
from ..checks import is_int
from .batcher import Batcher, SeqView, on_own_thread
from .cache import Cache, CacheSettings
from .config import EngineConfig
from .context import N_BATCH, Context, default_capture_layers, layer_flags
from .generation import Chunk, EvictionNotice, Generation, Limits, start_generation
from .model import Model
from .sampling import Sampler, Sampling
from .calibrate import basis_for

log = logging.getLogger("scope_edge")


@dataclass(frozen=True, kw_only=True)
class BatchSettings:
    """How a BatchRunner's shared context is made.

    slots: sequences decoded together (n_seq_max). slot_cells: KV cells each
    sequence may hold; a request whose plan needs more is refused
    (ValueError). step_tokens: prompt tokens one sequence adds to a step
    (None: N_BATCH // slots, so a step never exceeds one batch).
    engine: how the model runs (EngineConfig: threads, cache types, flash
    attention, scoring, capture layers, chunking, position limit; its model
    path and devices are the loaded Model's).
    """

    slots: int
    slot_cells: int
    step_tokens: int | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if not is_int(self.slots) or not 1 <= self.slots <= N_BATCH:
            raise ValueError(f"slots must be an int in [1, {N_BATCH}], got {self.slots!r}")
        if not is_int(self.slot_cells) or self.slot_cells < 1:
            raise ValueError(f"slot_cells must be an int >= 1, got {self.slot_cells!r}")
        if self.slot_cells != memory.padded_cells(self.slot_cells):
            raise ValueError(f"slot_cells must be a multiple of {memory.KV_CELL_PADDING} (llama.cpp pads contexts "
                             f"so), got {self.slot_cells}; use {memory.padded_cells(self.slot_cells)}")
        if self.step_tokens is not None and (not is_int(self.step_tokens) or
                                             not 1 <= self.step_tokens <= N_BATCH // self.slots):
            raise ValueError(f"step_tokens must be an int in [1, {N_BATCH // self.slots}] (N_BATCH // slots) or "
                             f"None, got {self.step_tokens!r}")
        if not isinstance(self.engine, EngineConfig):
            raise ValueError(f"engine must be an EngineConfig, got {type(self.engine).__name__}")

    @property
    def piece(self) -> int:
        """Prompt tokens one sequence adds to a step."""
        return self.step_tokens or N_BATCH // self.slots


def slot_cells_for(policy: Policy, *, max_tokens: int, prefill_chunk: int = memory.PREFILL_CHUNK) -> int:
    """KV cells one slot needs for any prompt under policy: the kept prompt
    plus a prefill chunk, or the decode phase, whichever is more (padded)."""
    bound = policy.for_generation(max_tokens)
    keep = bound.prompt_floor(2**30)
    decode = bound.decode_cells(kept=keep, max_tokens=max_tokens, lent=bound.prefill_keep(2**30) - keep)
    return memory.padded_cells(max(keep + prefill_chunk, decode))


class Cancelled(RuntimeError):
    """The request was cancelled (its client left, or the runner closes)."""


class NoFreeSlot(RuntimeError):
    """Every slot runs a generation; try again once one finishes."""


@dataclass
class Slot:
    """One sequence of the shared context and the cache it keeps across requests."""

    seq: int
    cache: Cache
    busy: bool = False
    last_used: float = 0.0

    def history(self) -> list[int]:
        session = self.cache.session
        return list(session.tokens) if session is not None else []

    def reuse(self, prompt: Sequence[int]) -> int:
        """Prompt tokens this slot's cache would serve, as a prefix (Session.reusable)."""
        session = self.cache.session
        return session.reusable(prompt) if session is not None else 0


# What a Request hands its consumer: a chunk, or the error that ended the generation.
Item = Chunk | BaseException


@dataclass
class Request:
    """A running generation: its slot, the stream of items, cancellation.

    With no sink given, iterate it (blocking) for the chunks; an error that
    ended the generation is raised there."""

    slot: int
    sink: Callable[[Item], None] | None = None
    cancelled: bool = False
    _items: queue.SimpleQueue[Item] = field(default_factory=queue.SimpleQueue)

    def put(self, item: Item) -> None:
        (self.sink or self._items.put)(item)

    def cancel(self) -> None:
        """Stop at the next step; the slot is freed then."""
        self.cancelled = True

    def __iter__(self) -> Iterator[Chunk]:
        while True:
            item = self._items.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return


class BatchRunner:
    """Generations of one model on `slots` sequences of one context, decoded together.

        runner = BatchRunner(Model(path), BatchSettings(slots=4, slot_cells=1024))
        req = runner.start(tokens, policy=policy, limits=Limits(max_tokens=64), sampling=Sampling())
        for chunk in req: ...

    start() picks the free slot whose cache holds the longest beginning of
    the prompt, if more than half of it (a continued conversation), else the
    least recently used one, and continues its cache; it raises NoFreeSlot when
    every slot is busy and ValueError when the request cannot fit a slot."""

    def __init__(self, model: Model, settings: BatchSettings) -> None:
        self.model, self.settings = model, settings
        if model.n_swa:
            raise ValueError(f"{model.path}: sliding-window (iSWA) models run one sequence at a time (ScopeLlama); "
                             "batched slots, each a stream of both caches, are not verified for them")
        self._closing = ctypes.c_bool(False)
        engine = settings.engine
        n_threads, n_threads_batch = engine.threads()
        sketch = None if engine.scoring is None else on_own_thread(lambda: basis_for(
            model, engine.scoring, type_k=engine.type_k, flash_attn=engine.flash_attn, n_threads=n_threads_batch))
        self.sketch = sketch  # the key-sketch basis (None: exact scores); its bytes_per_cell is host memory
        layers = engine.capture_layers
        if layers is None:
            layers = default_capture_layers(model.n_layer, offloaded=model.devices.offloads())
        flags = layer_flags(layers, model.n_layer)
        # the captured layers (None: every one)
        self.capture_layers: list[int] | None = None if flags is None else np.flatnonzero(flags).tolist()
        cs = CacheSettings(engine=engine, n_ctx=settings.slot_cells, capture_layers=flags, sketch=sketch)
        self.context = Context(model, n_cells=settings.slots * settings.slot_cells, n_threads=n_threads,
                               n_threads_batch=n_threads_batch, type_k=engine.type_k, abort=self._closing,
                               capture_layers=cs.capture_layers, n_seq=settings.slots, type_v=engine.type_v,
                               flash_attn=engine.flash_attn, sketch=sketch)
        self.batcher = Batcher(self.context, piece=settings.piece)
        try:
            self.slots = [Slot(seq, Cache(model, cs, abort=self._closing,
                                          context=SeqView(self.batcher, seq, n_cells=settings.slot_cells)))
                          for seq in range(settings.slots)]
        except BaseException:  # no decode thread or context left behind
            self.batcher.close()
            self.context.close()
            raise
        self._lock = threading.Lock()
        self._threads: dict[int, threading.Thread] = {}
        self._requests: dict[int, Request] = {}
        self.on_free: Callable[[], None] | None = None  # called (from a worker thread) when a slot frees

    # -- state -------------------------------------------------------------
    def free_slots(self) -> int:
        with self._lock:
            return sum(not s.busy for s in self.slots)

    def positions(self, slot: int) -> np.ndarray:
        """Sorted positions slot's sequence holds (between steps)."""
        return self.slots[slot].cache.context.positions()

    def visible(self, slot: int) -> tuple[np.ndarray, int]:
        """(cells slot's latest query row could see, attention width), from llama.cpp's mask."""
        return self.slots[slot].cache.context.visible()

    def history(self, slot: int) -> list[int]:
        """Tokens slot's cache was fed since it was last emptied."""
        return self.slots[slot].history()

    def kv_bytes(self, n_cells: int) -> int:
        """KV bytes of n_cells cells of this model and cache types."""
        return sum(self.slots[0].cache.kv_bytes(n_cells))

    # -- requests ----------------------------------------------------------
    def start(self, prompt: Sequence[int], *, policy: Policy, limits: Limits, sampling: Sampling,
              sink: Callable[[Item], None] | None = None) -> Request:
        """Start a generation on a free slot, continuing its cache; see the class doc."""
        if self._closing.value:
            raise RuntimeError("this BatchRunner is closed")
        slot = self._acquire(prompt)
        try:
            gen = self._generation(slot, list(prompt), policy, limits.max_tokens)
        except BaseException:
            self._release(slot)
            raise
        req = Request(slot.seq, sink)
        self.batcher.join(slot.seq)
        thread = threading.Thread(target=self._run, args=(slot, gen, list(prompt), limits, sampling, req),
                                  name=f"scope-edge-slot-{slot.seq}", daemon=True)
        with self._lock:
            self._requests[slot.seq], self._threads[slot.seq] = req, thread
        thread.start()
        return req

    def _acquire(self, prompt: Sequence[int]) -> Slot:
        with self._lock:
            free = [s for s in self.slots if not s.busy]
            if not free:
                raise NoFreeSlot(f"all {len(self.slots)} slots are busy")
            # as llama.cpp's server: a slot holding more than half of the prompt's beginning
            extending = [s for s in free if 2 * s.reuse(prompt) > len(prompt)]
            slot = max(extending, key=lambda s: s.reuse(prompt)) if extending else min(free, key=lambda s: s.last_used)
            slot.busy = True
            return slot

    def _release(self, slot: Slot) -> None:
        with self._lock:
            slot.busy = False
            slot.last_used = time.monotonic()
            self._requests.pop(slot.seq, None)
            self._threads.pop(slot.seq, None)
        if self.on_free is not None:
            self.on_free()

    def _generation(self, slot: Slot, prompt: list[int], policy: Policy, max_tokens: int) -> Generation:
        notice = EvictionNotice(holder=f"slot {slot.seq}'s policy", off="a request's \"scope\" sets its budget")
        try:
            return start_generation(slot.cache, prompt, policy=policy, max_tokens=max_tokens, resume=True,
                                    check_open=self._check_open_for(slot.seq), notice=notice)
        except ValueError as why:
            raise ValueError(f"{why} (here n_ctx is the {self.settings.slot_cells} cells of one slot)") from None

    def _check_open_for(self, seq: int) -> Callable[[], None]:
        def check() -> None:
            req = self._requests.get(seq)
            if self._closing.value or (req is not None and req.cancelled):
                raise Cancelled(f"the request on slot {seq} was cancelled")
        return check

    def _run(self, slot: Slot, gen: Generation, prompt: list[int], limits: Limits, sampling: Sampling,
             req: Request) -> None:
        sampler = Sampler(sampling, self.model, ignore_eos=limits.ignore_eos, history=prompt)
        last: Item | None = None  # handed over once the slot is free, so a client's next turn finds it free
        try:
            for chunk in gen.stream(prompt, limits, sampler):
                if chunk.finish_reason is not None:
                    last = chunk
                else:
                    req.put(chunk)
        except BaseException as why:  # the consumer sees it; the slot starts clean next time
            slot.cache.forget_session()
            if not isinstance(why, Cancelled) and not self._closing.value:
                log.exception("generation on slot %d failed", slot.seq)
            last = why
        finally:
            sampler.close()
            self.batcher.leave(slot.seq)
            self._release(slot)
            if last is not None:
                req.put(last)

    def cancel_all(self) -> None:
        """Cancel every running request (each stops at its next step)."""
        with self._lock:
            for req in self._requests.values():
                req.cancel()

    def close(self) -> None:
        """Cancel every request, wait for their threads, free the context."""
        self._closing.value = True
        with self._lock:
            threads = list(self._threads.values())
        for thread in threads:
            thread.join()
        self.batcher.close()
        self.context.close()
