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
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import llama_cpp
import numpy as np

from .. import memory
from ..hook import Capture
from ..policies import Policy
from ..checks import is_int
from .cache import Cache, CacheSettings
from .config import EngineConfig
from .context import N_BATCH, Context, default_capture_layers, layer_flags
from .generation import Chunk, EvictionNotice, Generation, Limits, start_generation
from .model import Model
from .sampling import Sampler, Sampling
from .sequence import SequenceCache
from .calibrate import basis_for

log = logging.getLogger("scope_edge")
T = TypeVar("T")


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


@dataclass
class _Piece:
    tokens: Sequence[int]
    positions: Sequence[int]
    want_logits: bool


def on_own_thread(work: Callable[[], T]) -> T:
    """work() on a thread that ends with it (its exception re-raised here).

    llama.cpp's CPU backend keeps an OpenMP worker team for each thread that
    has computed a graph, for as long as that thread lives. With more OpenMP
    threads alive than cores, libgomp stops spinning at the barriers between
    graph nodes and sleeps instead: a step of 2 sequences measured 49 ms
    instead of 21 on 2 cores once the caller's thread had decoded anything.
    So llama.cpp work outside the decode thread (sketch calibration) runs
    here."""
    out: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            out.append(work())
        except BaseException as why:  # handed to the caller
            error.append(why)

    thread = threading.Thread(target=run, name="scope-edge-setup")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return out[0]


class Batcher:
    """Runs one llama_decode per step, carrying the pending piece of every
    running sequence; `lock` guards every use of the context.

    Every step runs on the Batcher's own thread: llama.cpp's CPU backend
    (OpenMP) keeps a team of worker threads per thread that calls it, and
    more teams than cores slow every step (see on_own_thread). On 2 cores a
    step of 4 sequences measured 72 ms decoded from whichever slot thread
    arrived last, 44 ms from one thread. close() stops it."""

    def __init__(self, ctx: Context, *, piece: int) -> None:
        self.ctx, self.piece = ctx, piece
        self.lock = threading.Condition(threading.RLock())
        self._running: set[int] = set()
        self._pending: dict[int, _Piece] = {}
        self._results: dict[int, int | BaseException] = {}
        self.steps = 0
        self._closed = False
        self._thread = threading.Thread(target=self._decode_loop, name="scope-edge-decode", daemon=True)
        self._thread.start()

    def join(self, seq: int) -> None:
        """seq runs: steps wait for its pieces from now on."""
        with self.lock:
            self._running.add(seq)

    def leave(self, seq: int) -> None:
        """seq stopped: steps no longer wait for it (one may run now)."""
        with self.lock:
            self._running.discard(seq)
            self._pending.pop(seq, None)
            self.lock.notify_all()

    def close(self) -> None:
        """Stop the decode thread once the step it runs (if any) is done.
        Call it after every sequence has left: a piece submitted later is
        never decoded."""
        with self.lock:
            self._closed = True
            self.lock.notify_all()
        self._thread.join()

    def submit(self, seq: int, tokens: Sequence[int], positions: Sequence[int], *, want_logits: bool) -> int:
        """Decode tokens of seq, a piece per step; returns the batch index of
        the last token's logits (-1 if not wanted)."""
        index = -1
        for i in range(0, len(tokens), self.piece):
            last = i + self.piece >= len(tokens)
            index = self._one_step(seq, _Piece(tokens[i : i + self.piece], positions[i : i + self.piece],
                                               want_logits and last))
        return index

    def _one_step(self, seq: int, piece: _Piece) -> int:
        with self.lock:
            if seq not in self._running:
                raise RuntimeError(f"sequence {seq} decodes without having joined the batch")
            if self._closed:
                raise RuntimeError("this batch's decode thread is closed")
            self._pending[seq] = piece
            self.lock.notify_all()
            while seq in self._pending:
                self.lock.wait()
            result = self._results.pop(seq)
        if isinstance(result, BaseException):
            raise result
        return result

    def _ready(self) -> bool:
        return bool(self._pending) and self._running <= self._pending.keys()

    def _decode_loop(self) -> None:
        with self.lock:
            while True:
                while not self._closed and not self._ready():
                    self.lock.wait()
                if self._closed:
                    return
                self._step()

    def _step(self) -> None:
        tokens: list[int] = []
        positions: list[int] = []
        seqs: list[int] = []
        logits: list[bool] = []
        last: dict[int, int] = {}
        for seq in sorted(self._pending):
            p = self._pending[seq]
            tokens += p.tokens
            positions += p.positions
            seqs += [seq] * len(p.tokens)
            logits += [False] * (len(p.tokens) - 1) + [p.want_logits]
            last[seq] = len(tokens) - 1 if p.want_logits else -1
        try:
            self.ctx.decode_seqs(tokens, positions, seqs, logits)
            self._results.update(last)
        except BaseException as why:  # every sequence of the step sees the failure
            self._results.update({seq: why for seq in last})
        self.steps += 1
        self._pending.clear()
        self.lock.notify_all()


class SeqView(SequenceCache):
    """Sequence `seq` of a shared context, as the single-sequence runtime
    (Cache, Session, Generation) uses one (SequenceCache). Decodes go
    through the Batcher; everything holds its lock. transfers() counts the
    hook's reads for every sequence of the context."""

    def __init__(self, batcher: Batcher, seq: int, *, n_cells: int) -> None:
        self.batcher, self.seq, self.n_cells = batcher, seq, n_cells
        self._ctx = batcher.ctx
        self._logits_index = -1

    @property
    def memory(self) -> llama_cpp.llama_memory_t:
        return self._ctx.memory

    @property
    def can_shift(self) -> bool:
        return self._ctx.can_shift

    def decode(self, tokens: Sequence[int], positions: Sequence[int], *, want_logits: bool) -> None:
        self._logits_index = self.batcher.submit(self.seq, tokens, positions, want_logits=want_logits)

    def sample(self, sampler: Sampler) -> int:
        with self.batcher.lock:
            return self._ctx.sample(sampler, self._logits_index)

    def logits(self) -> np.ndarray:
        with self.batcher.lock:
            return self._ctx.logits(self._logits_index)

    def synchronize(self) -> None:
        with self.batcher.lock:
            self._ctx.synchronize()

    @contextmanager
    def capturing(self, from_pos: int, *, heads: str | None = None) -> Iterator[None]:
        with self.batcher.lock:
            cm = self._ctx.capturing(from_pos, seq=self.seq, heads=heads)
            cm.__enter__()
        try:
            yield
        finally:
            with self.batcher.lock:
                cm.__exit__(None, None, None)

    def capture(self, min_pos: int = 0, *, head_reduce: str | None = None) -> Capture:
        with self.batcher.lock:
            return self._ctx.capture(min_pos, seq=self.seq, head_reduce=head_reduce)

    def transfers(self) -> tuple[int, int]:
        with self.batcher.lock:
            return self._ctx.transfers()

    def positions(self) -> np.ndarray:
        with self.batcher.lock:
            return self._ctx.positions(seq=self.seq)

    def visible(self) -> tuple[np.ndarray, int]:
        with self.batcher.lock:
            return self._ctx.visible(seq=self.seq)

    def evict(self, positions: np.ndarray) -> int:
        with self.batcher.lock:
            return self._ctx.evict(positions, seq=self.seq)

    def shift(self, p0: int, p1: int, delta: int) -> None:
        with self.batcher.lock:
            self._ctx.shift(p0, p1, delta, seq=self.seq)

    def truncate(self, p0: int) -> None:
        with self.batcher.lock:
            self._ctx.truncate(p0, seq=self.seq)

    def clear(self) -> None:
        with self.batcher.lock:
            self._ctx.clear(seq=self.seq)


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
        """Prompt tokens this slot's cache already holds, as a prefix."""
        session = self.cache.session
        return session.common_prefix(prompt) if session is not None else 0


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
