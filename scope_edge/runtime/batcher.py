"""The shared context's stepping: one llama_decode per step for every running sequence.

Batcher collects the pending piece of every running sequence (a decoded
token, or part of a prompt) and runs one llama_decode for all of them, on
its own thread; SeqView is one sequence of that context as the
single-sequence runtime (Cache, Session, Generation) uses one
(SequenceCache). BatchRunner (batch.py) puts requests on them.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import llama_cpp
import numpy as np

from ..hook import Capture
from .context import Context
from .sampling import Sampler
from .sequence import SequenceCache

T = TypeVar("T")

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
