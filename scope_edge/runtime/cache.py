"""The cache across calls: which tokens it holds, what a new prompt reuses,
and how many cells a generation needs.

Session is the bookkeeping (tokens fed, positions held); Cache owns the
context and sizes it per generation from the policy's own cell counts.
"""
from __future__ import annotations

import ctypes
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .. import memory
from ..policies import Policy
from .config import EngineConfig
from .context import Context
from .model import Model
from .sequence import SequenceCache
from .sketch import SketchBasis


@dataclass(frozen=True, kw_only=True)
class CacheSettings:
    """How contexts are made and sized: the engine's configuration, and what
    it resolves to once the model is loaded.

    n_ctx: fixed KV cells; None sizes the context per generation.
    capture_layers: flags [n_layer] of the captured layers (None: all).
    sketch: captures score from key sketches on this basis (the basis
        computed for engine.scoring; None: exact attention).
    """

    engine: EngineConfig
    n_ctx: int | None = None
    capture_layers: np.ndarray | None = None
    sketch: SketchBasis | None = None


@dataclass
class Session:
    """What the cache holds across calls.

    tokens: every token fed, in order: the next prompt is matched against all
    of it (4 bytes a token). marks: each fed token's chat-structure mark
    (runtime/structure.py; 1 byte a token). evicted_at: for each fed token,
    how many tokens had been fed when its cell was evicted (0: held; 4 bytes
    a token), so a prompt that leaves the history at n knows which holes
    were cut before the text past n existed. held_index / held_pos: for the
    held tokens only, in feeding order, their index in tokens and their
    position (both ascending). So an eviction or a step costs work and memory
    in the cells held, not in the length of the history. prompt_end: the
    last generation's prompt tokens (its output follows them in tokens).
    """

    tokens: array[int] = field(default_factory=lambda: array("i"))
    marks: array[int] = field(default_factory=lambda: array("b"))
    evicted_at: array[int] = field(default_factory=lambda: array("i"))
    next_pos: int = 0
    prompt_end: int = 0
    # held_index / held_pos live in the first _n entries of buffers that
    # grow by doubling: a step appends in place instead of copying both
    _index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)
    _pos: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32), repr=False)
    _n: int = 0

    @property
    def held_index(self) -> np.ndarray:
        return self._index[: self._n]

    @property
    def held_pos(self) -> np.ndarray:
        return self._pos[: self._n]

    def _keep(self, index: np.ndarray, pos: np.ndarray) -> None:
        """Make (index, pos) the held tokens (both the same length)."""
        self._n = 0
        self._append(index, pos)

    def _append(self, index: np.ndarray, pos: np.ndarray) -> None:
        n = self._n + len(index)
        if n > len(self._pos):
            size = max(n, 2 * len(self._pos), 64)
            self._index = np.resize(self._index[: self._n], size)
            self._pos = np.resize(self._pos[: self._n], size)
        self._index[self._n : n], self._pos[self._n : n] = index, pos
        self._n = n

    def common_prefix(self, prompt: Sequence[int]) -> int:
        n = min(len(prompt), len(self.tokens))
        fed = np.frombuffer(self.tokens, dtype=np.int32, count=n)
        differ = np.flatnonzero(np.asarray(prompt[:n], dtype=np.int32) != fed)
        return int(differ[0]) if len(differ) else n

    def reusable(self, prompt: Sequence[int]) -> int:
        """Prompt tokens this session serves as a prefix. A prompt that
        continues the last generation (holds its whole prompt, and more)
        takes the compressed history as it is, as the next turn of a chat
        does. A prompt that leaves the history at n (another conversation
        sharing a system message, an edited turn, the same prompt again)
        takes the first n tokens only up to the first cell evicted after the
        history passed n: that hole was cut for text this prompt does not
        have, and its answer must not depend on that text."""
        n = self.common_prefix(prompt)
        if n >= self.prompt_end and len(prompt) > self.prompt_end:
            return n
        late = np.flatnonzero(np.frombuffer(self.evicted_at, dtype=np.int32, count=n) > n)
        return int(late[0]) if len(late) else n

    def marks_of(self, positions: np.ndarray) -> np.ndarray:
        """The structure marks of held positions (int8, one per position)."""
        marks = np.frombuffer(self.marks, dtype=np.int8, count=len(self.marks)) if len(self.marks) else \
            np.zeros(0, dtype=np.int8)
        at = np.searchsorted(self.held_pos, positions)
        return marks[self.held_index[at]]

    def held_upto(self, n: int) -> int:
        """Held cells among the first n tokens."""
        return int(np.searchsorted(self.held_index, n))

    def record(self, tokens: Sequence[int], positions: Sequence[int]) -> None:
        first = len(self.tokens)
        self.tokens.extend(tokens)
        self.evicted_at.frombytes(bytes(4 * len(tokens)))
        if len(tokens) == 1 and self._n < len(self._pos):  # a decode step: two stores, not two arrays
            self._index[self._n], self._pos[self._n] = first, positions[0]
            self._n += 1
        else:
            self._append(np.arange(first, len(self.tokens), dtype=np.int64), np.asarray(positions, dtype=np.int32))
        self.next_pos = int(positions[-1]) + 1

    def truncate(self, ctx: SequenceCache, n: int) -> None:
        """Keep the first n tokens: drop the cells of the rest."""
        if len(self.tokens) <= n:
            return
        cut = self.held_upto(n)
        if cut < self._n:
            ctx.truncate(int(self._pos[cut]))
        del self.tokens[n:]
        del self.marks[n:]
        del self.evicted_at[n:]
        if n:  # holes the discarded text cut are now part of this history's first n tokens
            at = np.frombuffer(self.evicted_at, dtype=np.int32)
            np.minimum(at, n, out=at)
        self._n = cut
        self.next_pos = int(self._pos[cut - 1]) + 1 if cut else 0

    def forget(self, evicted: np.ndarray) -> None:
        """Drop the held positions in evicted (any not held are ignored)."""
        evicted = np.asarray(evicted, dtype=np.int32)
        held = self.held_pos
        if not len(evicted) or not len(held):
            return
        # held_pos is ascending: a binary search per evicted position, not np.isin's sort of both
        at = np.minimum(np.searchsorted(held, evicted), len(held) - 1)
        at = at[held[at] == evicted]
        np.frombuffer(self.evicted_at, dtype=np.int32)[self.held_index[at]] = len(self.tokens)
        if len(at) == 1:  # a decode step's one eviction: close the gap in place
            i, n = int(at[0]), self._n
            self._index[i : n - 1], self._pos[i : n - 1] = self._index[i + 1 : n], self._pos[i + 1 : n]
            self._n = n - 1
            return
        self._keep(np.delete(self.held_index, at), np.delete(held, at))

    def renumber(self, old: np.ndarray, new: np.ndarray) -> None:
        """Held position old[i] becomes new[i] (old: sorted; one not in it is no longer held)."""
        kept = np.isin(self.held_pos, old, assume_unique=True)
        self._keep(self.held_index[kept], new[np.searchsorted(old, self.held_pos[kept])])


@dataclass
class Plan:
    """How one generation uses the context: its policy (None: full cache),
    prompt tokens reused from the cache, prompt tokens per prefill chunk
    (None: one shot), cells needed, the probe tokens run after each
    earlier chunk (PrefillSelector.probe_tokens, carved out of the
    configured chunk; 0 in a one-shot prefill), and the prompt tokens of a
    shortened first chunk (None: the usual schedule; see Cache._plan_from)."""

    policy: Policy | None
    reuse: int
    chunk: int | None
    cells: int
    probe: int = 0
    first: int | None = None

    def chunks(self, n_new: int) -> list[tuple[int, int, bool]]:
        """The prefill's chunks of the n_new prompt tokens after the reused
        ones: (start, end, probed), in order. A shortened first chunk is never
        probed (its own last rows score it); after it, the usual schedule:
        chunks of `chunk` tokens, each but the last followed by the probe; the
        last takes the probe's room too. Under a lend the short chunk comes
        first, so the last selection (where cells are lent) sees a whole one."""
        lend = self.policy is not None and self.policy.lend is not None
        start = self.first if self.first is not None and self.first < n_new else 0
        out = [(0, start, False)] if start else []
        n = n_new - start
        chunk = self.chunk or n
        tail = min(n, chunk + self.probe) if self.probe else 0
        head = n - tail
        first = head % chunk if lend else 0
        bounds = sorted({0, *range(first or chunk, head, chunk), head, n})
        out += [(start + lo, start + hi, bool(self.probe) and hi < n) for lo, hi in zip(bounds, bounds[1:])]
        return out


class Cache:
    """The context (re-created bigger when a generation needs more cells)
    and the session of tokens it holds.

    context: a given sequence (one of a shared context, batcher.SeqView)
    instead of a Context made and owned here; settings.n_ctx must then be
    its cell count, so it is never replaced."""

    def __init__(self, model: Model, settings: CacheSettings, *, abort: ctypes.c_bool,
                 context: SequenceCache | None = None) -> None:
        self.model, self.settings, self._abort = model, settings, abort
        self.geometry = memory.read_geometry(model.path)
        self.context: SequenceCache | None = context
        self._owned: Context | None = None  # the context made here (closed with the cache)
        self.session: Session | None = None
        if context is not None and settings.n_ctx != context.n_cells:
            raise ValueError(f"a given context needs n_ctx = its {context.n_cells} cells, got {settings.n_ctx}")
        if context is None and settings.n_ctx is not None:
            self._ensure_context(settings.n_ctx)

    def kv_bytes(self, n_cells: int) -> tuple[int, int]:
        """(full-attention, sliding-window) KV bytes of a context of n_cells cells."""
        e = self.settings.engine
        return memory.kv_bytes_split(self.geometry, n_cells, e.type_k, e.type_v)

    def stock_kv_bytes(self, n_tokens: int) -> int:
        """Stock llama-cpp-python's KV bytes for n_tokens tokens (its sliding-window cache, if any, as big
        as the full one: llama.cpp's default swa_full)."""
        e = self.settings.engine
        return memory.kv_bytes(self.geometry, memory.padded_cells(n_tokens), e.type_k, e.type_v)

    @property
    def own_context(self) -> Context | None:
        """The Context this cache made and owns (None: none yet, or a given sequence)."""
        return self._owned

    @property
    def position_limit(self) -> int:
        return self.settings.engine.position_limit or self.model.n_ctx_train

    def close(self) -> None:
        self.session = None
        if self._owned is not None:
            self._owned.close()
            self._owned = None
            self.context = None

    def forget_session(self) -> None:
        """The cache content is unknown (an interrupted step): the next call starts clean."""
        self.session = None

    # -- sizing ------------------------------------------------------------
    def plan(self, prompt: Sequence[int], *, max_tokens: int, policy: Policy | None, resume: bool) -> Plan:
        """Decide what to reuse, whether to chunk, and how many cells."""
        reuse = self.session.reusable(prompt) if resume and self.session is not None else 0
        if reuse and self.model.n_swa and not reuse == len(self.session.tokens) < len(prompt):
            # llama.cpp's window cache overwrites what the next position no longer sees, so it can
            # continue where it stands but not step back (llama-server re-processes the prompt too)
            reuse = 0
        plan = self._plan_from(prompt, max_tokens, policy, reuse)
        if plan.reuse and self._grows(len(prompt), plan):
            # A bigger context starts empty: llama.cpp moves cells between
            # contexts only by state save/restore, which the hook's cell map
            # would not follow. So the plan sized for the compressed history no
            # longer applies: plan the whole prompt from its real length.
            fresh = self._plan_from(prompt, max_tokens, policy, 0)
            if self.settings.n_ctx is None:  # big enough for both, and room for the turns after it
                fresh.cells = max(fresh.cells, plan.cells, self._doubled(max_tokens, policy))
            plan = fresh
        return plan

    def _doubled(self, max_tokens: int, policy: Policy | None) -> int:
        """Twice the context's cells, up to the most any plan of policy needs
        (the full cache: the trained context). A chat whose context grows by
        doubling prefills its history again a logarithmic number of times,
        not once every few turns."""
        twice = 2 * self.context.n_cells if self.context is not None else 0
        if policy is None:
            return min(twice, self.model.n_ctx_train)
        return min(twice, self._plan_from(range(self.model.n_ctx_train), max_tokens, policy, 0).cells)

    def _plan_from(self, prompt: Sequence[int], max_tokens: int, policy: Policy | None, reuse: int) -> Plan:
        """The plan that takes the first `reuse` prompt tokens from the cache."""
        held_before = self.session.held_upto(reuse) if reuse and self.session is not None else 0
        n_new = len(prompt) - reuse
        if n_new == 0:  # the cache already holds the whole prompt: feed its last token again
            reuse -= 1
            held_before = self.session.held_upto(reuse) if reuse and self.session is not None else 0
            n_new = 1
        one_shot = held_before + n_new
        if policy is None:
            return Plan(policy, reuse, None, one_shot + max_tokens)
        keep = policy.prompt_floor(one_shot)  # cells on loan (Policy.lend) come out of the decode room
        chunk = self.settings.engine.chunk
        forced = self.settings.engine.chunked_prefill
        chunked = forced if forced is not None else one_shot > keep + chunk
        # A chunk's probe comes out of the chunk, so it costs no cell; a
        # chunk too small to carry one is scored by its own rows.
        probe = policy.prefill.probe_tokens if chunked else 0
        probe = probe if probe < chunk else 0
        # The first chunk lands on every cell held before (the last turn's
        # reply included, so possibly more than keep); later ones on keep.
        prefill_cells = min(one_shot, max(held_before, keep) + chunk) if chunked else one_shot
        # The loan is taken at the last selection, from the cells held then
        # (at least keep + a chunk; Generation caps it at the plan's cells).
        last = min(one_shot, keep + chunk) if chunked and n_new > chunk else one_shot
        lent = policy.prefill_keep(last) - policy.prompt_floor(last)
        decode_cells = policy.decode_cells(kept=keep, max_tokens=max_tokens, lent=lent)
        plan = Plan(policy, reuse, chunk - probe if chunked else None, max(prefill_cells, decode_cells), probe)
        if chunked and held_before > keep:
            self._fit_first(plan, held_before, n_new, base=max(min(one_shot, keep + chunk), decode_cells))
        return plan

    @staticmethod
    def _fit_first(plan: Plan, held_before: int, n_new: int, *, base: int) -> None:
        """Fit a resumed prompt's chunks in the cells a fresh prompt's get
        (base). The first chunk lands on every cell held before it (the last
        reply and the cells on loan included); the selection after it makes
        room for the next. So only the first can pass base: then it is cut to
        the room left, rather than the context growing (a context that grows
        starts empty, and the whole history is prefilled again)."""
        lo, hi, probed = plan.chunks(n_new)[0]
        room = base - held_before
        if held_before + hi - lo + (plan.probe if probed else 0) <= base:
            plan.cells = base
        elif room >= 1:
            plan.first, plan.cells = min(room, n_new), base

    def _cells_for(self, n_prompt: int, plan: Plan) -> tuple[int, int]:
        """Cells to allocate for plan, and the most allowed: n_ctx if fixed,
        else the trained context (or the prompt, if longer)."""
        if self.settings.n_ctx is not None:
            return plan.cells, self.settings.n_ctx
        cap = max(self.model.n_ctx_train, memory.padded_cells(n_prompt + 1))
        return min(plan.cells, cap), cap

    def _grows(self, n_prompt: int, plan: Plan) -> bool:
        """Whether plan needs a bigger context than the current one."""
        need, _ = self._cells_for(n_prompt, plan)
        return self.context is None or self.context.n_cells < memory.padded_cells(need)

    # -- starting a generation ----------------------------------------------
    def start(self, n_prompt: int, plan: Plan) -> tuple[SequenceCache, Session]:
        """The context for plan, its session truncated to the reused tokens
        (or a fresh one on an emptied cache)."""
        ctx = self._context_for(n_prompt, plan)
        session = self.session if plan.reuse and self.session is not None else None
        if session is None:
            ctx.clear()
            session = Session()
        else:
            session.truncate(ctx, plan.reuse)
        session.prompt_end = n_prompt
        self.session = session
        return ctx, session

    def _context_for(self, n_prompt: int, plan: Plan) -> SequenceCache:
        need, limit = self._cells_for(n_prompt, plan)
        # A one-shot prefill must fit; the full cache also needs a cell for the first token after it,
        # where a policy's selection frees cells first.
        room = memory.padded_cells(limit) - (plan.policy is None)
        if plan.chunk is None and n_prompt - plan.reuse > room:
            raise ValueError(
                f"prompt has {n_prompt} tokens but the context holds {memory.padded_cells(limit)} cells; "
                "shorten the prompt, raise n_ctx, or give a budget (long prompts are then prefilled in chunks)"
            )
        if need > memory.padded_cells(limit):
            raise ValueError(
                f"this generation needs {need} KV cells but n_ctx is fixed at {memory.padded_cells(limit)}; "
                "raise n_ctx or lower the budgets / max_tokens"
            )
        return self._ensure_context(need)  # a new context drops the session: plan() reuses only when none is needed

    def _ensure_context(self, n_cells: int) -> SequenceCache:
        """A context of at least n_cells; a bigger one replaces the old (and
        its session)."""
        n_cells = memory.padded_cells(n_cells)
        if self.context is not None and self.context.n_cells >= n_cells:
            return self.context
        self.close()
        s, e = self.settings, self.settings.engine
        n_threads, n_threads_batch = e.threads()
        self._owned = Context(self.model, n_cells=n_cells, n_threads=n_threads, n_threads_batch=n_threads_batch,
                              type_k=e.type_k, abort=self._abort, capture_layers=s.capture_layers,
                              type_v=e.type_v, flash_attn=e.flash_attn, sketch=s.sketch)
        self.context = self._owned
        return self.context
