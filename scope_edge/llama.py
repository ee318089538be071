"""ScopeLlama: llama.cpp generation with the KV cache kept inside SCOPE budgets.

The facade wires three layers: llama.cpp (through llama_cpp's ctypes API and
our native hook), a policy (scope_edge.policies, which sees only positions and
scores) and the caller (stream of Chunk, then a Completion).
"""
from __future__ import annotations

import codecs
import ctypes
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import llama_cpp
import numpy as np

from . import memory, models
from ._native import EVAL_CALLBACK, Hook
from .budget import Budget
from .policies import Policy, make_policy, validate_names

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]
N_BATCH = 512  # llama-cpp-python's default, so prefill matches stock ubatch for ubatch
_KV_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}


@dataclass
class GenerationStats:
    """Memory and speed of one generation. kv_cells_peak counts the cells
    held while decoding (after the prefill selection); prefill_cells_peak the
    cells held during prefill."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    kv_cells_allocated: int = 0
    kv_cells_peak: int = 0
    prefill_cells_peak: int = 0
    kv_bytes_allocated: int = 0
    stock_kv_bytes: int = 0
    evicted_cells: int = 0
    captured_steps: int = 0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class Chunk:
    """One streamed step: the text it adds and its token. The last chunk
    carries finish_reason and stats; its token is None when the run ended on
    an end-of-generation token (which is neither text nor in tokens)."""

    text: str
    token: int | None
    finish_reason: FinishReason | None = None
    stats: GenerationStats | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: list[int]
    finish_reason: FinishReason
    stats: GenerationStats


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """Sampling settings; temperature 0 is greedy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and 0.0 <= self.temperature < float("inf")):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise ValueError(f"stop strings must be non-empty str, got {list(self.stop)!r}")


def _stop_tuple(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    return tuple(stop)


class _Model:
    """The loaded llama_model and its vocabulary."""

    def __init__(self, path: str, *, n_gpu_layers: int) -> None:
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        self.ptr = llama_cpp.llama_model_load_from_file(path.encode(), params)
        if not self.ptr:
            raise ValueError(f"llama.cpp could not load {path}: a truncated or unsupported GGUF? (run with verbose=True for its log)")
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_layer = llama_cpp.llama_model_n_layer(self.ptr)
        self.n_head = llama_cpp.llama_model_n_head(self.ptr)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.ptr)
        self._piece = ctypes.create_string_buffer(256)
        self._eog: list[int] | None = None

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None

    def check_supported(self, path: str) -> None:
        if llama_cpp.llama_model_is_recurrent(self.ptr) or llama_cpp.llama_model_is_hybrid(self.ptr):
            raise ValueError(
                f"{path}: recurrent and hybrid models keep state that cannot be evicted per token; "
                "scope-edge supports attention-only models (llama, qwen2, mistral, ...)"
            )
        if llama_cpp.llama_model_n_swa(self.ptr) > 0:
            raise ValueError(
                f"{path}: sliding-window attention (n_swa={llama_cpp.llama_model_n_swa(self.ptr)}, e.g. Gemma 3) "
                "uses an iSWA cache this runtime does not manage yet; use a full-attention model"
            )

    def tokenize(self, text: str) -> list[int]:
        if not self.ptr:
            raise RuntimeError("this ScopeLlama is closed")
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, True, True)
        if n < 0:  # buffer too small: -n tokens needed
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, True, True)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        if n < 0:
            self._piece = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        return self._piece.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def eog_tokens(self) -> list[int]:
        if self._eog is None:
            self._eog = [t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t)]
        return self._eog


class _Context:
    """A llama_context of n_cells KV cells with our hook as eval callback."""

    def __init__(self, model: _Model, *, n_cells: int, n_threads: int, n_threads_batch: int, type_k: str) -> None:
        self.hook = Hook(n_cells=n_cells, n_layer=model.n_layer, n_head=model.n_head)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_cells
        params.n_batch = params.n_ubatch = N_BATCH
        params.n_seq_max = 1
        params.n_threads = n_threads
        params.n_threads_batch = n_threads_batch
        # kq_soft_max only exists without flash attention; the hook reads it.
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.type_k = _KV_TYPES[type_k]
        params.type_v = llama_cpp.GGML_TYPE_F16
        params.cb_eval = EVAL_CALLBACK
        params.cb_eval_user_data = self.hook.user_data
        self.ptr = llama_cpp.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            self.hook.close()
            raise RuntimeError(f"llama.cpp could not create a context of {n_cells} cells (out of memory?)")
        self.n_cells = llama_cpp.llama_n_ctx(self.ptr)
        if self.n_cells != n_cells:
            self.close()
            raise RuntimeError(f"asked llama.cpp for {n_cells} cells, got {self.n_cells}")
        self.batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        self.n_vocab = model.n_vocab

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ptr)
            self.ptr = None
        self.hook.close()

    def decode(self, tokens: Sequence[int], positions: Sequence[int], *, want_logits: bool) -> None:
        """Decode tokens at positions; logits only for the last one if asked."""
        n = len(tokens)
        b = self.batch
        for i, (tok, pos) in enumerate(zip(tokens, positions)):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 0
        b.logits[n - 1] = want_logits
        b.n_tokens = n
        self.hook.begin(np.asarray(positions, dtype=np.int32))
        rc = llama_cpp.llama_decode(self.ptr, b)
        if rc != 0:
            self.hook.abandon()
            reason = {1: "no free KV cell (the cache is full)", 2: "aborted"}.get(rc, "error")
            raise RuntimeError(f"llama_decode failed with {rc}: {reason}")
        self.hook.end()

    def logits(self) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self.ptr, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()


def _make_sampler(s: Sampling, seed: int, model: _Model) -> llama_cpp.llama_sampler_p:
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    if s.ignore_eos:
        eog = model.eog_tokens()
        bias = (llama_cpp.llama_logit_bias * len(eog))(*[llama_cpp.llama_logit_bias(t, float("-inf")) for t in eog])
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_logit_bias(model.n_vocab, len(eog), bias))
    if s.temperature == 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    if s.top_k > 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(s.top_k))
    if s.top_p < 1.0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(s.top_p, 1))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(s.temperature))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain


class _TextStream:
    """Turns token bytes into text that never splits a UTF-8 character and
    never shows a possible start of a stop string before it is resolved."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = stop
        self._held = ""
        self.stopped = False

    def push(self, data: bytes) -> str:
        self._held += self._decoder.decode(data)
        for s in self._stop:
            i = self._held.find(s)
            if i >= 0:
                out, self._held, self.stopped = self._held[:i], "", True
                return out
        keep = self._longest_stop_prefix()
        out, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
        return out

    def flush(self) -> str:
        if self.stopped:
            return ""
        out = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return out

    def _longest_stop_prefix(self) -> int:
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self._held)), best, -1):
                if self._held.endswith(s[:k]):
                    best = k
                    break
        return best


class ScopeLlama:
    """A GGUF model whose KV cache stays inside a prefill and a decode budget.

    budget=None keeps the full cache (stock llama.cpp behaviour). Attention
    capture needs flash attention off, so contexts are created with it off.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        budget: Budget | None = None,
        strategy: str = "slide",
        prefill_selector: str | None = None,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        seed: int = 0,
        type_k: str = "f16",
        verbose: bool = False,
    ) -> None:
        if budget is not None and not isinstance(budget, Budget):
            raise ValueError(f"budget must be a scope_edge.Budget or None, got {type(budget).__name__}")
        validate_names(strategy, prefill_selector)
        if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1):
            raise ValueError(f"n_ctx must be an int >= 1 or None (sized per generation), got {n_ctx!r}")
        if n_threads is not None and (not isinstance(n_threads, int) or n_threads < 1):
            raise ValueError(f"n_threads must be an int >= 1 or None, got {n_threads!r}")
        if type_k not in _KV_TYPES:
            raise ValueError(f"type_k must be one of {sorted(_KV_TYPES)}, got {type_k!r}")
        llama_cpp.llama_backend_init()
        llama_cpp._logger.set_verbose(verbose)
        path = models.resolve_model_path(model_path)
        self.model_path = str(path)
        self.geometry = memory.read_geometry(path)
        self._model = _Model(self.model_path, n_gpu_layers=n_gpu_layers)
        try:
            self._model.check_supported(self.model_path)
        except ValueError:
            self._model.close()
            raise
        self.budget = budget
        self.strategy = strategy
        self.prefill_selector = prefill_selector
        self.seed = seed
        self.type_k = type_k
        cpus = os.cpu_count() or 1
        # llama-cpp-python's defaults, so stock and ours compare like for like
        self._n_threads = n_threads or max(cpus // 2, 1)
        self._n_threads_batch = n_threads or cpus
        self._fixed_ctx = n_ctx
        self._ctx: _Context | None = None
        self._lock = threading.Lock()
        self._active: tuple[weakref.ref[Iterator[Chunk]], int] | None = None
        if n_ctx is not None:
            self._ensure_context(n_ctx)

    # -- lifecycle -------------------------------------------------------
    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        if getattr(self, "_model", None) is not None:
            self._model.close()

    def __enter__(self) -> ScopeLlama:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may be gone
            pass

    @property
    def n_ctx(self) -> int:
        """KV cells allocated now (0 before the first generation)."""
        return self._ctx.n_cells if self._ctx else 0

    def kv_positions(self) -> np.ndarray:
        """Sorted positions held in the KV cache now."""
        return self._ctx.hook.positions() if self._ctx else np.zeros(0, dtype=np.int32)

    # -- public generation -----------------------------------------------
    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        ignore_eos: bool = False,
    ) -> Completion:
        text: list[str] = []
        tokens: list[int] = []
        last: Chunk | None = None
        for last in self.stream(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop=stop,
            ignore_eos=ignore_eos,
        ):
            text.append(last.text)
            if last.token is not None:
                tokens.append(last.token)
        assert last is not None and last.finish_reason is not None and last.stats is not None
        return Completion("".join(text), tokens, last.finish_reason, last.stats)

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        ignore_eos: bool = False,
    ) -> Iterator[Chunk]:
        """Stream a generation. ignore_eos keeps generating past end-of-text
        tokens (for benchmarks that need a fixed length)."""
        sampling = Sampling(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop=_stop_tuple(stop),
            ignore_eos=bool(ignore_eos),
        )
        tokens = self._prompt_tokens(prompt)
        self._close_abandoned_stream()
        gen = self._guarded(self._run(tokens, sampling))
        self._active = (weakref.ref(gen), threading.get_ident())
        return gen

    def teacher_force(self, prompt: str | Sequence[int], tokens: Sequence[int]) -> Iterator[np.ndarray]:
        """Next-token logits under this instance's cache policy while feeding
        `tokens` after `prompt`, whatever the model would have sampled: one
        float32 [n_vocab] array after the prompt, then one after each token but
        the last. The fidelity harness compares these between caches. The
        decode schedule sees max_tokens = len(tokens)."""
        forced = self._prompt_tokens(list(tokens)) if len(tokens) else []
        if not forced:
            raise ValueError("teacher_force needs at least one token to feed")
        sampling = Sampling(max_tokens=len(forced))
        prompt_tokens = self._prompt_tokens(prompt)
        self._close_abandoned_stream()
        gen = self._guarded(self._forced(prompt_tokens, forced, sampling))
        self._active = (weakref.ref(gen), threading.get_ident())
        return gen

    def _forced(self, prompt: list[int], forced: list[int], s: Sampling) -> Iterator[np.ndarray]:
        run = self._start(prompt, s)
        run.prefill(prompt)
        yield run.ctx.logits()
        for step, token in enumerate(forced[:-1], start=1):
            run.feed(token, step)
            yield run.ctx.logits()

    # -- internals ---------------------------------------------------------
    def _prompt_tokens(self, prompt: str | Sequence[int]) -> list[int]:
        if self._model.ptr is None:
            raise RuntimeError("this ScopeLlama is closed")
        if isinstance(prompt, str):
            if prompt == "":
                raise ValueError("prompt is empty; pass some text or a list of token ids")
            tokens = self._model.tokenize(prompt)
        else:
            tokens = list(prompt)
            bad = [t for t in tokens if isinstance(t, bool) or not isinstance(t, (int, np.integer))]
            if bad:
                raise ValueError(f"prompt token ids must be ints, got {bad[:3]!r}")
            tokens = [int(t) for t in tokens]
            out = [t for t in tokens if not 0 <= t < self._model.n_vocab]
            if out:
                raise ValueError(f"token ids {out[:5]} are outside the vocabulary [0, {self._model.n_vocab})")
        if not tokens:
            raise ValueError("prompt has no tokens")
        return tokens

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

    def _guarded(self, gen: Iterator[Chunk]) -> Iterator[Chunk]:
        """One generation at a time: other threads wait for the lock."""
        with self._lock:
            yield from gen

    def _needed_cells(self, n_prompt: int, s: Sampling, policy: Policy | None) -> int:
        if policy is None or self.budget is None:
            return n_prompt + s.max_tokens
        b = self.budget
        if policy.decode.unified:
            return max(n_prompt, b.total + policy.decode.slack)
        prompt_kept = n_prompt if policy.prefill.name == "full" else min(n_prompt, b.prefill)
        gen = s.max_tokens if policy.decode.name == "full" else min(s.max_tokens, b.decode + policy.decode.slack)
        return max(n_prompt, prompt_kept + gen)

    def _ensure_context(self, n_cells: int) -> _Context:
        n_cells = memory.padded_cells(n_cells)
        if self._ctx is not None and self._ctx.n_cells >= n_cells:
            return self._ctx
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        self._ctx = _Context(
            self._model,
            n_cells=n_cells,
            n_threads=self._n_threads,
            n_threads_batch=self._n_threads_batch,
            type_k=self.type_k,
        )
        return self._ctx

    def _policy(self, max_tokens: int) -> Policy | None:
        if self.budget is None:
            return None
        return make_policy(
            self.budget, strategy=self.strategy, prefill_selector=self.prefill_selector, max_tokens=max_tokens
        )

    def _context_for(self, n_prompt: int, s: Sampling, policy: Policy | None) -> _Context:
        need = self._needed_cells(n_prompt, s, policy)
        limit = self._fixed_ctx
        if limit is None:
            limit = max(self._model.n_ctx_train, memory.padded_cells(n_prompt + 1))
            need = min(need, limit)
        if n_prompt >= memory.padded_cells(limit):
            raise ValueError(
                f"prompt has {n_prompt} tokens but the context holds {memory.padded_cells(limit)} cells; "
                "shorten the prompt or raise n_ctx"
            )
        return self._ensure_context(min(need, memory.padded_cells(limit)))

    def _start(self, prompt: list[int], s: Sampling) -> _Run:
        policy = self._policy(s.max_tokens)
        ctx = self._context_for(len(prompt), s, policy)
        ctx.hook.clear(ctx.ptr)
        stats = GenerationStats(prompt_tokens=len(prompt), kv_cells_allocated=ctx.n_cells)
        stats.kv_bytes_allocated = memory.kv_bytes(self.geometry, ctx.n_cells, self.type_k, "f16")
        return _Run(self, ctx, policy, stats)

    def _run(self, prompt: list[int], s: Sampling) -> Iterator[Chunk]:
        run = self._start(prompt, s)
        sampler = _make_sampler(s, self.seed, self._model)
        try:
            yield from run.loop(prompt, s, sampler)
        finally:
            llama_cpp.llama_sampler_free(sampler)


class _Run:
    """State of one generation: positions, counts and timings."""

    def __init__(self, llm: ScopeLlama, ctx: _Context, policy: Policy | None, stats: GenerationStats) -> None:
        self.llm, self.ctx, self.policy, self.stats = llm, ctx, policy, stats
        self.n_prompt = 0
        self.next_pos = 0
        self.n_held = 0  # cells of the sequence
        self.n_eligible = 0  # cells the decode strategy may evict

    # prefill -------------------------------------------------------------
    def prefill(self, prompt: list[int]) -> None:
        t0 = time.perf_counter()
        self.n_prompt = len(prompt)
        hook = self.ctx.hook
        policy = self.policy
        capture_from = policy.prefill.capture_from(len(prompt)) if policy else None
        hook.arm(capture_from)
        for i in range(0, len(prompt), N_BATCH):
            chunk = prompt[i : i + N_BATCH]
            self.ctx.decode(chunk, range(i, i + len(chunk)), want_logits=i + N_BATCH >= len(prompt))
        hook.arm(None)
        self.next_pos = self.n_held = len(prompt)
        self.stats.prefill_cells_peak = self.n_held
        if policy is not None:
            self._select_prompt(policy, captured=capture_from is not None)
        self.n_eligible = self.n_held if policy is not None and policy.decode.unified else 0
        self.stats.prefill_tokens_per_s = len(prompt) / max(time.perf_counter() - t0, 1e-9)

    def _select_prompt(self, policy: Policy, *, captured: bool) -> None:
        budget = self.llm.budget
        assert budget is not None
        keep = budget.total - 1 if policy.decode.unified else budget.prefill
        if captured:
            cap = self.ctx.hook.capture()
            positions, attn = cap.positions, cap.attn
            policy.decode.observe(positions, attn)
        else:
            positions, attn = self.ctx.hook.positions(), None
        if len(positions) > keep:
            self._evict(policy.prefill.select(positions, attn, keep=keep))

    def _evict(self, positions: np.ndarray) -> None:
        if len(positions):
            freed = self.ctx.hook.evict(self.ctx.ptr, positions)
            self.n_held -= freed
            self.stats.evicted_cells += freed

    # decode --------------------------------------------------------------
    def feed(self, token: int, step: int) -> None:
        plan = self.policy.decode.plan(step, self.n_eligible + 1) if self.policy else None
        capture = plan is not None and plan.capture
        hook = self.ctx.hook
        if capture:
            hook.arm(self.next_pos)
        self.ctx.decode([token], [self.next_pos], want_logits=True)
        if capture:
            hook.arm(None)
            self.stats.captured_steps += 1
        self.next_pos += 1
        self.n_held += 1
        self.n_eligible += 1
        self.stats.kv_cells_peak = max(self.stats.kv_cells_peak, self.n_held)
        if plan is not None and (capture or (plan.keep is not None and self.n_eligible > plan.keep)):
            self._select_decode(plan.keep, capture)

    def _select_decode(self, keep: int | None, captured: bool) -> None:
        assert self.policy is not None
        decode = self.policy.decode
        if captured:
            cap = self.ctx.hook.capture()
            positions, attn = cap.positions, cap.attn
        else:
            positions, attn = self.ctx.hook.positions(), None
        if not decode.unified:
            mask = positions >= self.n_prompt
            positions = positions[mask]
            attn = attn[:, :, mask] if attn is not None else None
        if captured:
            decode.observe(positions, attn)
        if keep is not None and len(positions) > keep:
            before = self.n_held
            self._evict(decode.select(positions, attn, keep))
            self.n_eligible -= before - self.n_held

    def loop(self, prompt: list[int], s: Sampling, sampler: llama_cpp.llama_sampler_p) -> Iterator[Chunk]:
        model = self.llm._model
        self.prefill(prompt)
        text = _TextStream(s.stop)
        t0 = time.perf_counter()
        n_fed = 0
        generated = 0
        while True:
            token = llama_cpp.llama_sampler_sample(sampler, self.ctx.ptr, -1)
            if model.is_eog(token):
                yield self._final(text.flush(), None, "stop", n_fed, t0, generated)
                return
            generated += 1
            piece = text.push(model.piece(token))
            if text.stopped:
                yield self._final(piece, token, "stop", n_fed, t0, generated)
                return
            if generated == s.max_tokens:
                yield self._final(piece + text.flush(), token, "length", n_fed, t0, generated)
                return
            if self.next_pos >= self.ctx.n_cells and self.policy is None:
                yield self._final(piece + text.flush(), token, "length", n_fed, t0, generated)
                return
            yield Chunk(piece, token)
            n_fed += 1
            self.feed(token, n_fed)

    def _final(self, piece: str, token: int | None, reason: FinishReason, n_fed: int, t0: float, generated: int) -> Chunk:
        st = self.stats
        st.generated_tokens = generated
        st.decode_tokens_per_s = n_fed / max(time.perf_counter() - t0, 1e-9) if n_fed else 0.0
        st.stock_kv_bytes = memory.kv_bytes(
            self.llm.geometry, memory.padded_cells(st.prompt_tokens + generated), self.llm.type_k, "f16"
        )
        if st.kv_cells_peak == 0:
            st.kv_cells_peak = self.n_held
        return Chunk(piece, token, reason, st)
