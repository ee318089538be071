"""One generation: prefill under the prefill selection, then the decode
loop that samples, feeds and evicts under the decode strategy.

mlx-lm's shape: a stream of Chunk, the last one carrying the finish reason
and the GenerationStats.

One concept: the state of one generation (session, held cells, loan,
counts) is shared by its prefill, its evictions and its decode loop, so they
are methods of one object; the pieces that need none of it (sampling,
structure marks, text decoding, the cache's plan) live in their own modules.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from ..policies import Policy
from ..policies.kernels import warm as warm_kernels
from .cache import Cache, Plan, Session
from .context import N_BATCH
from .model import Model
from .sampling import Sampler, TokenLogprobs
from .sequence import SequenceCache
from .structure import PLAIN, StructureMarker, pinned
from .text import TextStream

log = logging.getLogger("scope_edge")

FinishReason = Literal["stop", "length"]


@dataclass
class GenerationStats:
    """Memory and speed of one generation. kv_cells_peak counts the cells
    held while decoding (after the prefill selection); prefill_cells_peak the
    cells held during prefill. evicted_cells: every cell the policy evicted,
    evicted_prefill_cells + evicted_decode_cells (by when: prompt cells given
    back while decoding count as decode). kv_bytes_allocated is the KV
    cache's bytes: kv_bytes_full of the full-attention layers
    (kv_cells_allocated cells) plus kv_bytes_swa of a sliding-window model's
    window cache (llama.cpp's own size for it); stock_kv_bytes is stock
    llama-cpp-python's for the same tokens (its window cache as big as the
    full one). hook_reads / hook_bytes_read: tensor reads the hook made (cell
    indices, mask rows, captured attention): with offloaded layers, transfers
    from the device. structure_cells: the most cells a selection kept out of
    the policy's reach as chat structure (Policy.keep_structure)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    kv_cells_allocated: int = 0
    kv_cells_peak: int = 0
    prefill_cells_peak: int = 0
    kv_bytes_allocated: int = 0
    kv_bytes_full: int = 0
    kv_bytes_swa: int = 0
    stock_kv_bytes: int = 0
    evicted_cells: int = 0
    evicted_prefill_cells: int = 0
    evicted_decode_cells: int = 0
    captured_steps: int = 0
    hook_reads: int = 0
    hook_bytes_read: int = 0
    position_resets: int = 0
    structure_cells: int = 0
    prefilled_tokens: int = 0
    reused_prompt_tokens: int = 0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class Chunk:
    """One streamed step: the text it adds and its token. The last chunk
    carries finish_reason and stats; its token is None when the run ended on
    an end-of-generation token (which is neither text nor in tokens).
    logprobs: the token's, when Sampling.logprobs asked for them."""

    text: str
    token: int | None
    finish_reason: FinishReason | None = None
    stats: GenerationStats | None = None
    logprobs: TokenLogprobs | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: list[int]
    finish_reason: FinishReason
    stats: GenerationStats


@dataclass(frozen=True, kw_only=True)
class EvictionNotice:
    """The one line a generation's first eviction logs on logger scope_edge:
    holder names what bounds the cache (a budget, a policy), at level."""

    holder: str
    level: int = logging.INFO
    off: str = "pass budget=None for the full cache (nothing evicted)"

    def log(self, *, phase: str, position: int, n_tokens: int) -> None:
        log.log(self.level, "evicting KV cells (first during %s, position %d, %d tokens so far): %s holds the "
                "cache; %s", phase, position, n_tokens, self.holder, self.off)


@dataclass(frozen=True, kw_only=True)
class Limits:
    """When a generation ends, besides an end-of-generation token.

    max_tokens: tokens generated at most. stop: strings that end the text
    (not included). ignore_eos: generate past end-of-generation tokens
    (benchmarks that need a fixed length)."""

    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not isinstance(self.stop, tuple) or any(not isinstance(s, str) or s == "" for s in self.stop):
            raise ValueError(f"stop strings must be non-empty str, got {list(self.stop)!r}")


def start_generation(cache: Cache, prompt: list[int], *, policy: Policy | None, max_tokens: int, resume: bool,
                     check_open: Callable[[], None], notice: EvictionNotice) -> Generation:
    """A generation of at most max_tokens on cache's context, sized for it:
    the one way a generation starts, for ScopeLlama and for each slot of a
    BatchRunner. policy: the engine's (None: the full cache); a fresh copy
    runs (Policy.for_generation). resume: continue the cache's session."""
    run_policy = policy.for_generation(max_tokens) if policy is not None else None
    if run_policy is not None:
        warm_kernels()
    plan = cache.plan(prompt, max_tokens=max_tokens, policy=run_policy, resume=resume)
    ctx, session = cache.start(len(prompt), plan)
    full, swa = cache.kv_bytes(ctx.n_cells)
    stats = GenerationStats(prompt_tokens=len(prompt), kv_cells_allocated=ctx.n_cells, kv_bytes_allocated=full + swa,
                            kv_bytes_full=full, kv_bytes_swa=swa, reused_prompt_tokens=plan.reuse)
    return Generation(cache.model, ctx, plan, session, stats, position_limit=cache.position_limit,
                      check_open=check_open, kv_bytes=cache.stock_kv_bytes, notice=notice)


class Generation:
    """One generation on a prepared context: feeds tokens through the hook,
    applies the policy, keeps the counts and timings.

    position_limit: positions stay below it under a policy (re-indexed);
    check_open raises once the owner is closed; kv_bytes(cells) sizes a
    cache of that many cells, for the stock comparison in the stats; notice:
    what the first eviction logs."""

    def __init__(self, model: Model, ctx: SequenceCache, plan: Plan, session: Session, stats: GenerationStats, *,
                 position_limit: int, check_open: Callable[[], None], kv_bytes: Callable[[int], int],
                 notice: EvictionNotice = EvictionNotice(holder="the policy")) -> None:
        self.model, self.ctx, self.plan, self.session, self.stats = model, ctx, plan, session, stats
        self.policy = plan.policy
        self._check_open, self._kv_bytes, self._notice = check_open, kv_bytes, notice
        self.decoding = False  # which phase's count an eviction adds to
        self.n_held = len(ctx.positions())
        self.gen_start = session.next_pos  # first position of this run's generated text
        self.n_eligible = 0  # cells the decode strategy may evict
        self.prompt_floor = 0  # prompt cells kept once the output needs its whole room
        self.n_lent = 0  # prompt cells held above prompt_floor (Policy.lend)
        self.transfers_before = ctx.transfers()
        self.head_reduce = _decode_head_reduction(plan.policy)
        # Positions past the limit are re-indexed under a policy; the full
        # cache behaves as stock and simply runs on.
        self.pos_limit = position_limit if plan.policy is not None else 2**31 - 1
        self.n_swa = model.n_swa
        self.marker = StructureMarker(model)

    # feeding ---------------------------------------------------------------
    def _make_room(self, n: int) -> None:
        """Re-index positions if the next n tokens would pass the limit."""
        if self.session.next_pos + n > self.pos_limit:
            self._reindex(n)

    def _decode(self, tokens: Sequence[int], *, want_logits: bool) -> None:
        self._make_room(len(tokens))
        start = self.session.next_pos
        positions = list(range(start, start + len(tokens)))
        self.ctx.decode(tokens, positions, want_logits=want_logits)
        self.session.record(tokens, positions)
        self.marker.extend(self.session.marks, self.session.tokens)
        self.n_held += len(tokens)

    def _reindex(self, n_next: int) -> None:
        """Renumber the held positions 0..n-1 (llama_memory_seq_add
        re-rotates K) so the next tokens stay inside the limit."""
        if self.policy is None or not self.ctx.can_shift:
            raise PositionLimit("this model's cache cannot shift positions")
        old = self.ctx.positions()
        new = np.arange(len(old), dtype=np.int32)
        if len(old) + n_next > self.pos_limit:
            raise PositionLimit(f"the {len(old)} cells held do not fit below it once renumbered")
        runs = np.flatnonzero(np.diff(old) != 1) + 1
        for first, last in zip(np.r_[0, runs], np.r_[runs, len(old)]):
            delta = int(new[first] - old[first])
            if delta:
                self.ctx.shift(int(old[first]), int(old[last - 1]) + 1, delta)
        self.gen_start = int(np.searchsorted(old, self.gen_start))
        self.session.renumber(old, new)
        self.session.next_pos = len(old)
        self.policy.decode.reindex(old, new)
        if self.policy.lend is not None:
            self.policy.lend.reindex(old, new)
        self.stats.position_resets += 1
        log.info("re-indexed %d held positions (max %d -> %d) to continue past %d",
                 len(old), int(old[-1]), len(old) - 1, self.pos_limit)

    def _outside_window(self, positions: np.ndarray, attn: np.ndarray | None,
                        keep: int) -> tuple[np.ndarray, np.ndarray | None, int]:
        """The positions a selector may evict under a sliding window, their
        scores, and how many of them to keep. llama_memory_seq_rm removes a
        position from the sliding-window cache too, so the last n_swa - 1
        positions, which the next token's window still sees, are never
        offered: they count against keep (which never drops below them)."""
        if not self.n_swa:
            return positions, attn, keep
        split = int(np.searchsorted(positions, self.session.next_pos - self.n_swa + 1))
        in_window = len(positions) - split
        if in_window > keep:
            log.debug("keeping the %d positions the sliding window sees, %d above the policy's %d",
                      in_window, in_window - keep, keep)
        return positions[:split], None if attn is None else attn[:, :, :split], max(keep - in_window, 0)

    def _select(self, select: Callable[[np.ndarray, np.ndarray | None, int], np.ndarray], positions: np.ndarray,
                attn: np.ndarray | None, keep: int) -> None:
        """Evict what select(positions, attn, keep) picks, the window and the
        structure cells left out."""
        positions, attn, keep = self._outside_window(positions, attn, keep)
        positions, attn, keep = self._outside_structure(positions, attn, keep)
        if len(positions) > keep:
            self._evict(select(positions, attn, keep))

    def _outside_structure(self, positions: np.ndarray, attn: np.ndarray | None,
                           keep: int) -> tuple[np.ndarray, np.ndarray | None, int]:
        """Under Policy.keep_structure, take the structure cells (at most
        structure_cap(keep)) out of the candidates and out of keep, so every
        selector and strategy keeps them without knowing of them. Only
        prompt cells count: a generated control token is output."""
        cap = self.policy.structure_cap(keep)
        if cap == 0 or not len(positions):
            return positions, attn, keep
        marks = self.session.marks_of(positions)
        if self.decoding:
            marks[positions >= self.gen_start] = PLAIN
        pin = pinned(marks, cap)
        self.stats.structure_cells = max(self.stats.structure_cells, len(pin))
        if not len(pin):
            return positions, attn, keep
        rest = np.ones(len(positions), dtype=bool)
        rest[pin] = False
        return positions[rest], None if attn is None else attn[:, :, rest], keep - len(pin)

    def _evict(self, positions: np.ndarray) -> None:
        if len(positions):
            freed = self.ctx.evict(positions)
            if freed and not self.stats.evicted_cells:
                self._notice.log(phase="decode" if self.decoding else "prefill", position=int(positions[0]),
                                 n_tokens=len(self.session.tokens))
            self.n_held -= freed
            self.stats.evicted_cells += freed
            if self.decoding:
                self.stats.evicted_decode_cells += freed
            else:
                self.stats.evicted_prefill_cells += freed
            self.session.forget(positions)

    # prefill -------------------------------------------------------------
    def prefill(self, prompt: Sequence[int]) -> None:
        t0 = time.perf_counter()
        new = prompt[self.plan.reuse :]
        probe = prompt[len(prompt) - self.plan.probe :] if self.plan.probe else ()
        try:
            for lo, hi, probed in self.plan.chunks(len(new)):
                self._prefill_chunk(new[lo:hi], last=hi == len(new), probe=probe if probed else ())
        except PositionLimit:
            raise ValueError(
                f"the prompt ({len(prompt)} tokens) passes the model's trained context of {self.pos_limit} "
                "positions; give a budget and leave chunked_prefill on so positions can be re-indexed"
            ) from None
        self.ctx.synchronize()  # time the prefill, not its launch
        self.gen_start = self.session.next_pos
        self.n_eligible = self.n_held if self.policy is not None and self.policy.decode.unified else 0
        lends = self.policy is not None and self.policy.lend is not None
        self.n_lent = max(0, self.n_held - self.prompt_floor) if lends else 0
        self.stats.prefill_tokens_per_s = len(new) / max(time.perf_counter() - t0, 1e-9)
        self.stats.prefilled_tokens = len(new)
        self.decoding = True

    def _prefill_chunk(self, tokens: Sequence[int], *, last: bool, probe: Sequence[int]) -> None:
        """Decode one chunk of the prompt, then select. probe: tokens run
        after the chunk as the queries that score it, then removed."""
        policy = self.policy
        self._make_room(len(tokens) + len(probe))
        end = self.session.next_pos + len(tokens)
        capture_from = end if probe else policy.prefill.capture_from(end) if policy else None
        try:
            with self.ctx.capturing(capture_from) if capture_from is not None else nullcontext():
                for i in range(0, len(tokens), N_BATCH):
                    self._check_open()  # backends that do not poll the abort callback stop here
                    self._decode(tokens[i : i + N_BATCH], want_logits=last and i + N_BATCH >= len(tokens))
                for i in range(0, len(probe), N_BATCH):
                    self._check_open()
                    piece = probe[i : i + N_BATCH]
                    self.ctx.decode(piece, list(range(end + i, end + i + len(piece))), want_logits=False)
            self.stats.prefill_cells_peak = max(self.stats.prefill_cells_peak, self.n_held + len(probe))
            if policy is not None:
                self._select_prompt(policy, captured=capture_from is not None, last=last, probed=len(probe))
        finally:
            if probe:  # the probe's cells were never the prompt's: gone whatever happened
                self.ctx.truncate(end)

    def _select_prompt(self, policy: Policy, *, captured: bool, last: bool, probed: int) -> None:
        """Select the prompt cells. The last selection keeps the floor plus
        the cells lent (Policy.lend); an earlier one keeps as many as leave
        room for the next chunk and its probe inside the plan's cells, and
        at least the floor."""
        if captured:
            cap = self.ctx.capture()
            positions, attn = cap.positions, cap.attn
            if probed:  # the probe's own cells are not the prompt's
                n = len(positions) - probed
                positions, attn = positions[:n], attn[:, :, :n]
            policy.decode.observe(positions, attn)
        else:
            positions, attn = self.ctx.positions(), None
        self.prompt_floor = policy.prompt_floor(len(positions))
        # Never more than the plan's cells less one, the first token's.
        keep = min(policy.prefill_keep(len(positions)), max(self.plan.cells - 1, self.prompt_floor))
        if not last:
            room = self.plan.cells - (self.plan.chunk or 0) - self.plan.probe
            keep = max(self.prompt_floor, min(keep, room))
        if len(positions) > keep:
            self._select(lambda p, a, k: policy.prefill.select(p, a, keep=k), positions, attn, keep)

    # decode --------------------------------------------------------------
    def feed(self, token: int, step: int) -> None:
        """Decode the token sampled at decode step `step` (1: the first after
        the prompt), then let the decode strategy select."""
        self._check_open()
        plan = self.policy.decode.plan(step, self.n_eligible + 1) if self.policy else None
        # While prompt cells are on loan, every step's row scores them.
        capture = plan is not None and (plan.capture or self.n_lent > 0)
        self._make_room(1)
        with self.ctx.capturing(self.session.next_pos, heads=self.head_reduce) if capture else nullcontext():
            self._decode([token], want_logits=True)
        if capture:
            self.stats.captured_steps += 1
        self.n_eligible += 1
        self.stats.kv_cells_peak = max(self.stats.kv_cells_peak, self.n_held)
        if plan is not None and (capture or (plan.keep is not None and self.n_eligible > plan.keep)):
            self._select_decode(plan.keep, capture)

    def _select_decode(self, keep: int | None, captured: bool) -> None:
        assert self.policy is not None  # feed() plans only under a policy
        decode = self.policy.decode
        eligible = 0 if decode.unified else self.gen_start  # SCOPE: only generated cells
        if captured:
            cap = self.ctx.capture(min_pos=0 if self.n_lent else eligible, head_reduce=self.head_reduce)
            positions, attn = cap.positions, cap.attn
        else:
            positions, attn = self.ctx.positions(), None
        split = int(np.searchsorted(positions, eligible))
        prompt, prompt_attn = positions[:split], None if attn is None else attn[:, :, :split]
        positions, attn = positions[split:], None if attn is None else attn[:, :, split:]
        if captured:
            decode.observe(positions, attn)
        if keep is not None and len(positions) > keep:
            before = self.n_held
            self._select(decode.select, positions, attn, keep)
            self.n_eligible -= before - self.n_held
        if self.n_lent:
            self._repay(prompt, prompt_attn)

    def _repay(self, prompt: np.ndarray, attn: np.ndarray) -> None:
        """Give back the prompt cells on loan that the output now needs, so
        the next step still has a free cell in the allocation."""
        lend = self.policy.lend
        lend.observe(prompt, attn)
        # The loan never takes the next token's cell, in the lend's room or the plan's.
        limit = min(self.prompt_floor + lend.room, self.plan.cells) - 1
        due = min(self.n_lent, self.n_held - limit)
        if due > 0:
            before = self.n_held
            self._select(lend.select, prompt, attn, len(prompt) - due)
            self.n_lent -= before - self.n_held

    def logits_after(self, prompt: Sequence[int], forced: Sequence[int]) -> Iterator[np.ndarray]:
        """Next-token logits after the prompt, then after each forced token but the last."""
        self.prefill(prompt)
        yield self.ctx.logits()
        for step, token in enumerate(forced[:-1], start=1):
            self.feed(token, step)
            yield self.ctx.logits()

    def stream(self, prompt: Sequence[int], limits: Limits, sampler: Sampler) -> Iterator[Chunk]:
        """Prefill, then sample until an end-of-generation token, a stop
        string or max_tokens; the last chunk carries the finish reason."""
        model = self.model
        self.prefill(prompt)
        text = TextStream(limits.stop)
        t0 = time.perf_counter()
        n_fed = generated = 0
        while True:
            token = self.ctx.sample(sampler)
            if model.is_eog(token):
                yield self._final(text.flush(), None, "stop", n_fed, t0, generated)
                return
            generated += 1
            piece, logprobs = text.push(model.piece(token)), sampler.logprobs
            if text.stopped:
                yield self._final(piece, token, "stop", n_fed, t0, generated, logprobs)
                return
            if generated == limits.max_tokens or (self.policy is None and self.session.next_pos >= self.ctx.n_cells):
                yield self._final(piece + text.flush(), token, "length", n_fed, t0, generated, logprobs)
                return
            yield Chunk(piece, token, logprobs=logprobs)
            try:
                self.feed(token, n_fed + 1)
            except PositionLimit as why:
                log.warning("stopping at position %d: generation cannot pass the trained context of %d (%s)",
                            self.session.next_pos, self.pos_limit, why)
                yield self._final(text.flush(), None, "length", n_fed, t0, generated)
                return
            n_fed += 1

    def _final(self, piece: str, token: int | None, reason: FinishReason, n_fed: int, t0: float,
               generated: int, logprobs: TokenLogprobs | None = None) -> Chunk:
        st = self.stats
        st.generated_tokens = generated
        st.decode_tokens_per_s = n_fed / max(time.perf_counter() - t0, 1e-9) if n_fed else 0.0
        st.stock_kv_bytes = self._kv_bytes(st.prompt_tokens + generated)
        if st.kv_cells_peak == 0:
            st.kv_cells_peak = self.n_held
        reads, size = self.ctx.transfers()
        st.hook_reads, st.hook_bytes_read = reads - self.transfers_before[0], size - self.transfers_before[1]
        return Chunk(piece, token, reason, st, logprobs)


def _decode_head_reduction(policy: Policy | None) -> str | None:
    """The head reduction a decode step's capture can be handed over in: the
    decode strategy's, if the lend (which reads the same capture) has the same."""
    if policy is None:
        return None
    reduce = policy.decode.head_reduction
    if policy.lend is not None and policy.lend.head_reduction != reduce:
        return None
    return reduce


class PositionLimit(Exception):
    """The next token would pass the position limit and positions cannot be
    re-indexed."""
