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
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import llama_cpp
import numpy as np
from numba import carray, cfunc, types

from . import memory, models, openai
from ._native import EVAL_CALLBACK, Hook
from .budget import Budget
from .devices import Devices
from .policies import Policy, make_policy, validate_names
from .policies.checks import is_int, require_head_reduce

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]
N_BATCH = 512  # llama-cpp-python's default, so prefill matches stock ubatch for ubatch
_CLOSE_WAIT = 10.0  # seconds close() waits for another thread's generation to let go before leaving it the free
_KV_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}


@dataclass
class GenerationStats:
    """Memory and speed of one generation. kv_cells_peak counts the cells
    held while decoding (after the prefill selection); prefill_cells_peak the
    cells held during prefill. hook_reads / hook_bytes_read: tensor reads the
    hook made (cell indices, mask rows, captured attention): with offloaded
    layers, transfers from the device."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    kv_cells_allocated: int = 0
    kv_cells_peak: int = 0
    prefill_cells_peak: int = 0
    kv_bytes_allocated: int = 0
    stock_kv_bytes: int = 0
    evicted_cells: int = 0
    captured_steps: int = 0
    hook_reads: int = 0
    hook_bytes_read: int = 0
    position_resets: int = 0
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
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if isinstance(self.temperature, bool) or not (
            isinstance(self.temperature, (int, float)) and 0.0 <= self.temperature < float("inf")
        ):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not is_int(self.top_k) or self.top_k < 0:
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

    def __init__(self, path: str, *, devices: Devices) -> None:
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = devices.n_gpu_layers
        params.main_gpu = devices.main_gpu
        # llama.cpp reads both arrays during the load only
        handles = devices.handles()
        if handles is not None:
            params.devices = ctypes.cast(handles, ctypes.c_void_p)
        split = (ctypes.c_float * len(devices.tensor_split))(*devices.tensor_split) if devices.tensor_split else None
        if split is not None:
            params.tensor_split = split
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


@cfunc(types.boolean(types.voidptr), cache=True)
def _aborted(flag: int) -> bool:
    """llama.cpp's abort callback: true once the bool at address flag is set. Compiled,
    not a Python callback: llama.cpp polls it at every graph node (about a
    thousand a token), and a Python callback would take the GIL each time."""
    return carray(flag, 1, np.uint8)[0] != 0


# Module-level, so the function pointer outlives every context that polls it.
_ABORT_CALLBACK = llama_cpp.ggml_abort_callback(_aborted.address)


def _layer_flags(layers: Sequence[int] | None, n_layer: int) -> np.ndarray | None:
    """capture_layers as flags [n_layer] (None: every layer)."""
    if layers is None:
        return None
    picked = list(layers) if not isinstance(layers, (str, bytes)) else None
    if not picked or any(not is_int(i) or not 0 <= i < n_layer for i in picked) or len(set(picked)) != len(picked):
        raise ValueError(f"capture_layers must be distinct layer indices in [0, {n_layer}) (None: every layer), "
                         f"got {layers!r}")
    flags = np.zeros(n_layer, dtype=bool)
    flags[picked] = True
    return flags


class _Context:
    """A llama_context of n_cells KV cells with our hook as eval callback.
    A decode stops at its next graph node once `abort` is set (close()).
    n_ubatch < N_BATCH makes llama.cpp split one decode into several ubatches
    (the tests use it; the facade keeps one ubatch per decode, as stock)."""

    def __init__(self, model: _Model, *, n_cells: int, n_threads: int, n_threads_batch: int, type_k: str,
                 abort: ctypes.c_bool, n_ubatch: int = N_BATCH) -> None:
        if not is_int(n_ubatch) or not 1 <= n_ubatch <= N_BATCH:
            raise ValueError(f"n_ubatch must be an int in [1, {N_BATCH}] (the batch size), got {n_ubatch!r}")
        self.hook = Hook(n_cells=n_cells, n_layer=model.n_layer, n_head=model.n_head)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_cells
        params.n_batch = N_BATCH
        params.n_ubatch = n_ubatch
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
        self.abort = abort  # llama.cpp holds its address: keep it alive with the context
        llama_cpp.llama_set_abort_callback(self.ptr, _ABORT_CALLBACK, ctypes.addressof(abort))
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
            if rc == 2 and self.abort.value:
                raise RuntimeError("this ScopeLlama is closed: close() stopped this generation mid-decode")
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
        hits = [i for i in (self._held.find(s) for s in self._stop) if i >= 0]
        if hits:  # the earliest stop string wins
            out, self._held, self.stopped = self._held[: min(hits)], "", True
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

    head_reduce: how a cell's score aggregates attention heads per layer: "max"
        (default; measured closer to the full cache, see README Results) or "sum".
    capture_layers: the layers whose attention scores cells (None: every
        layer). Each captured layer makes llama.cpp synchronise once per
        selection step and costs one read: with offloaded layers, one
        transfer from the device; fewer layers are cheaper there.
    n_gpu_layers, main_gpu, tensor_split, rpc_servers: offload, as
        scope_edge.devices.Devices documents (rpc_servers: 'host:port' of
        llama.cpp RPC servers, probed before use).
    n_ctx: fixed KV cells; None sizes the context per generation to what the
        budgets need (the full cache: prompt + max_tokens).
    type_k: K cache type, "f16", "q8_0" or "q4_0". V stays f16: a quantized V
        cache needs flash attention, which hides the attention the policies read.
    prefill_chunk, chunked_prefill: under a budget, a prompt longer than the
        kept prompt + prefill_chunk is prefilled in chunks of prefill_chunk
        tokens, trimming back to the prefill budget after each, so the cells
        needed do not grow with the prompt (None: automatic; True/False force).
    Under a budget, positions are re-indexed when they would pass the model's
    trained context, so generation can continue indefinitely.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        budget: Budget | None = None,
        strategy: str = "slide",
        prefill_selector: str | None = None,
        head_reduce: str = "max",
        capture_layers: Sequence[int] | None = None,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        main_gpu: int = 0,
        tensor_split: Sequence[float] | None = None,
        rpc_servers: Sequence[str] | None = None,
        seed: int = 0,
        type_k: str = "f16",
        prefill_chunk: int = N_BATCH,
        chunked_prefill: bool | None = None,
        verbose: bool = False,
    ) -> None:
        if budget is not None and not isinstance(budget, Budget):
            raise ValueError(f"budget must be a scope_edge.Budget or None, got {type(budget).__name__}")
        validate_names(strategy, prefill_selector)
        require_head_reduce("ScopeLlama", head_reduce)
        if budget is not None:  # settings a policy refuses fail here, not at the first generation
            make_policy(budget, strategy=strategy, prefill_selector=prefill_selector,
                        max_tokens=budget.total, head_reduce=head_reduce)
        if n_ctx is not None and (not is_int(n_ctx) or n_ctx < 1):
            raise ValueError(f"n_ctx must be an int >= 1 or None (sized per generation), got {n_ctx!r}")
        if not is_int(seed):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if n_threads is not None and (not is_int(n_threads) or n_threads < 1):
            raise ValueError(f"n_threads must be an int >= 1 or None, got {n_threads!r}")
        if isinstance(rpc_servers, str):
            raise ValueError(f"rpc_servers must be a list of 'host:port' strings, got the str {rpc_servers!r}")
        devices = Devices(n_gpu_layers=n_gpu_layers, main_gpu=main_gpu, tensor_split=tuple(tensor_split or ()),
                          rpc_servers=tuple(rpc_servers or ()))
        if not is_int(prefill_chunk) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be an int >= 1, got {prefill_chunk!r}")
        if chunked_prefill not in (None, True, False):
            raise ValueError(f"chunked_prefill must be None (auto), True or False, got {chunked_prefill!r}")
        if type_k not in _KV_TYPES:
            raise ValueError(f"type_k must be one of {sorted(_KV_TYPES)}, got {type_k!r}")
        llama_cpp.llama_backend_init()
        llama_cpp._logger.set_verbose(verbose)
        path = models.resolve_model_path(model_path)
        self.model_path = str(path)
        self.geometry = memory.read_geometry(path)
        self.devices = devices
        self._model = _Model(self.model_path, devices=devices)
        try:
            self._model.check_supported(self.model_path)
            self._capture_flags = _layer_flags(capture_layers, self._model.n_layer)
        except ValueError:
            self._model.close()
            raise
        self.capture_layers = capture_layers
        self.budget = budget
        self.strategy = strategy
        self.prefill_selector = prefill_selector
        self.head_reduce = head_reduce
        self.seed = seed
        self.type_k = type_k
        cpus = os.cpu_count() or 1
        # llama-cpp-python's defaults, so stock and ours compare like for like
        self._n_threads = n_threads or max(cpus // 2, 1)
        self._n_threads_batch = n_threads or cpus
        self._fixed_ctx = n_ctx
        self._prefill_chunk = prefill_chunk
        self._chunked = chunked_prefill
        self._ctx: _Context | None = None
        self._session: _Session | None = None
        self._lock = threading.Lock()
        self._active: tuple[weakref.ref[Iterator[Chunk]], int] | None = None
        self._closing = ctypes.c_bool(False)  # also read by llama.cpp's abort callback
        if n_ctx is not None:
            self._ensure_context(n_ctx)

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
        if getattr(self, "_ctx", None) is not None:
            self._drop_context()
        if getattr(self, "_model", None) is not None:
            self._model.close()

    def _check_open(self) -> None:
        if self._closing.value or self._model.ptr is None:
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
        return self._stream(self._prompt_tokens(prompt), sampling, resume=False)

    def create_completion(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """llama-cpp-python-shaped text completion. Like llama-cpp-python it
        continues the cache: a prompt extending the previous call's prompt and
        output prefills only the new tokens (under the same budgets)."""
        sampling = Sampling(
            max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, stop=_stop_tuple(stop)
        )
        chunks = self._stream(self._prompt_tokens(prompt), sampling, resume=True)
        return openai.completion_stream(self, chunks) if stream else openai.completion_response(self, chunks)

    def create_chat_completion(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """OpenAI-shaped chat completion through the GGUF's chat template.

        A conversation continues on its cache: when messages extend the
        previous call's (with the reply it produced), only the new messages
        are prefilled. Each turn, the prefill budget bounds what survives of
        the whole conversation so far and the decode budget bounds the new
        reply; the cells kept from earlier turns are scored again with the
        new turn's attention."""
        sampling = Sampling(
            max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, stop=_stop_tuple(stop)
        )
        if self._model.ptr is None:
            raise RuntimeError("this ScopeLlama is closed")
        prompt = openai.render_chat(self._model.ptr, messages)
        chunks = self._stream(self._prompt_tokens(prompt), sampling, resume=True)
        return openai.chat_stream(self, chunks) if stream else openai.chat_response(self, chunks)

    def _stream(self, tokens: list[int], sampling: Sampling, *, resume: bool) -> Iterator[Chunk]:
        self._close_abandoned_stream()
        gen = self._guarded(self._run(tokens, sampling, resume=resume))
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
        if isinstance(prompt, (bytes, bytearray)):
            raise TypeError("prompt must be a str or a sequence of token ids, got bytes: decode it first "
                            "(prompt.decode('utf-8'))")
        if not isinstance(prompt, (str, Sequence, np.ndarray)):
            raise TypeError(f"prompt must be a str or a sequence of token ids, got {type(prompt).__name__}")
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
            try:
                self._check_open()
                yield from gen
            finally:
                if self._closing.value:  # close() gave up waiting for us: free now that we let go
                    self._free()

    def _ensure_context(self, n_cells: int) -> _Context:
        """A context of at least n_cells; a bigger one replaces the old (and
        its conversation)."""
        n_cells = memory.padded_cells(n_cells)
        if self._ctx is not None and self._ctx.n_cells >= n_cells:
            return self._ctx
        self._drop_context()
        self._ctx = _Context(
            self._model,
            n_cells=n_cells,
            n_threads=self._n_threads,
            n_threads_batch=self._n_threads_batch,
            type_k=self.type_k,
            abort=self._closing,
        )
        self._ctx.hook.capture_layers(self._capture_flags)
        return self._ctx

    def _drop_context(self) -> None:
        self._session = None
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None

    def _policy(self, max_tokens: int) -> Policy | None:
        if self.budget is None:
            return None
        return make_policy(
            self.budget,
            strategy=self.strategy,
            prefill_selector=self.prefill_selector,
            max_tokens=max_tokens,
            head_reduce=self.head_reduce,
        )

    def _plan(self, prompt: list[int], s: Sampling, *, resume: bool) -> _Plan:
        """Decide what to reuse, whether to chunk, and how many cells."""
        policy = self._policy(s.max_tokens)
        reuse = self._session.common_prefix(prompt) if resume and self._session is not None else 0
        plan = self._plan_from(prompt, s, policy, reuse)
        if plan.reuse and self._grows(len(prompt), plan):
            # A bigger context starts empty: llama.cpp moves cells between
            # contexts only by state save/restore, which the hook's cell map
            # would not follow. So the plan sized for the compressed history no
            # longer applies: plan the whole prompt from its real length.
            fresh = self._plan_from(prompt, s, policy, 0)
            if self._fixed_ctx is None:  # big enough for both, so later turns like this one reuse
                fresh.cells = max(fresh.cells, plan.cells)
            plan = fresh
        return plan

    def _plan_from(self, prompt: list[int], s: Sampling, policy: Policy | None, reuse: int) -> _Plan:
        """The plan that takes the first `reuse` prompt tokens from the cache."""
        held_before = self._session.held_upto(reuse) if reuse and self._session is not None else 0
        n_new = len(prompt) - reuse
        if n_new == 0:  # the cache already holds the whole prompt: feed its last token again
            reuse -= 1
            held_before = self._session.held_upto(reuse) if reuse and self._session is not None else 0
            n_new = 1
        one_shot = held_before + n_new
        if policy is None:
            return _Plan(policy, reuse, None, one_shot + s.max_tokens)
        assert self.budget is not None
        keep = policy_prefill_keep(policy, self.budget, n_prompt=one_shot)
        chunk = self._prefill_chunk
        chunked = self._chunked if self._chunked is not None else one_shot > keep + chunk
        decode_cells = _decode_cells(policy, self.budget, kept=keep, max_tokens=s.max_tokens)
        # The first chunk lands on every cell held before (the last turn's
        # reply included, so possibly more than keep); later ones on keep.
        prefill_cells = min(one_shot, max(held_before, keep) + chunk) if chunked else one_shot
        return _Plan(policy, reuse, chunk if chunked else None, max(prefill_cells, decode_cells))

    def _cells_for(self, n_prompt: int, plan: _Plan) -> tuple[int, int]:
        """Cells to allocate for plan, and the most allowed: n_ctx if fixed,
        else the trained context (or the prompt, if longer)."""
        if self._fixed_ctx is not None:
            return plan.cells, self._fixed_ctx
        cap = max(self._model.n_ctx_train, memory.padded_cells(n_prompt + 1))
        return min(plan.cells, cap), cap

    def _grows(self, n_prompt: int, plan: _Plan) -> bool:
        """Whether plan needs a bigger context than the current one."""
        need, _ = self._cells_for(n_prompt, plan)
        return self._ctx is None or self._ctx.n_cells < memory.padded_cells(need)

    def _context_for(self, n_prompt: int, plan: _Plan) -> _Context:
        need, limit = self._cells_for(n_prompt, plan)
        if plan.chunk is None and n_prompt - plan.reuse >= memory.padded_cells(limit):
            raise ValueError(
                f"prompt has {n_prompt} tokens but the context holds {memory.padded_cells(limit)} cells; "
                "shorten the prompt, raise n_ctx, or give a budget (long prompts are then prefilled in chunks)"
            )
        if need > memory.padded_cells(limit):
            raise ValueError(
                f"this generation needs {need} KV cells but n_ctx is fixed at {memory.padded_cells(limit)}; "
                "raise n_ctx or lower the budgets / max_tokens"
            )
        return self._ensure_context(need)  # a new context drops the session: _plan reuses only when none is needed

    def _start(self, prompt: list[int], s: Sampling, *, resume: bool = False) -> _Run:
        plan = self._plan(prompt, s, resume=resume)
        ctx = self._context_for(len(prompt), plan)
        session = self._session if plan.reuse and self._session is not None else None
        if session is None:
            ctx.hook.clear(ctx.ptr)
            session = _Session()
        else:
            session.truncate(ctx, plan.reuse)
        self._session = session
        stats = GenerationStats(prompt_tokens=len(prompt), kv_cells_allocated=ctx.n_cells)
        stats.kv_bytes_allocated = memory.kv_bytes(self.geometry, ctx.n_cells, self.type_k, "f16")
        stats.reused_prompt_tokens = plan.reuse
        return _Run(self, ctx, plan, session, stats)

    def _run(self, prompt: list[int], s: Sampling, *, resume: bool = False) -> Iterator[Chunk]:
        run = self._start(prompt, s, resume=resume)
        sampler = _make_sampler(s, self.seed, self._model)
        try:
            yield from run.loop(prompt, s, sampler)
        except BaseException:
            self._session = None  # interrupted mid-step: the next call starts clean
            raise
        finally:
            llama_cpp.llama_sampler_free(sampler)


def policy_prefill_keep(policy: Policy, budget: Budget, *, n_prompt: int) -> int:
    """Prompt cells the prefill selection keeps."""
    if policy.decode.unified:
        return min(n_prompt, budget.total - 1)  # one cell stays free for the first decode step
    if policy.prefill.name == "full":
        return n_prompt
    return min(n_prompt, budget.prefill)


def _decode_cells(policy: Policy, budget: Budget, *, kept: int, max_tokens: int) -> int:
    """Cells the decode phase needs, kept prompt cells included."""
    if policy.decode.unified:  # one budget over prompt and output
        return min(kept + max_tokens, budget.total + policy.decode.slack)
    if policy.decode.name == "full":
        return kept + max_tokens
    return kept + min(max_tokens, budget.decode + policy.decode.slack)


@dataclass
class _Plan:
    """How one generation uses the context: policy, prompt tokens reused from
    the cache, prefill chunk size (None: one shot) and cells needed."""

    policy: Policy | None
    reuse: int
    chunk: int | None
    cells: int


@dataclass
class _Session:
    """What the cache holds across calls.

    tokens: every token fed, in order: the next prompt is matched against all
    of it (4 bytes a token). held_index / held_pos: for the held tokens only,
    in feeding order, their index in tokens and their position (both
    ascending). So an eviction or a step costs work and memory in the cells
    held, not in the length of the history.
    """

    tokens: array[int] = field(default_factory=lambda: array("i"))
    held_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    held_pos: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    next_pos: int = 0

    def common_prefix(self, prompt: list[int]) -> int:
        n = min(len(prompt), len(self.tokens))
        fed = np.frombuffer(self.tokens, dtype=np.int32, count=n)
        differ = np.flatnonzero(np.asarray(prompt[:n], dtype=np.int32) != fed)
        return int(differ[0]) if len(differ) else n

    def held_upto(self, n: int) -> int:
        """Held cells among the first n tokens."""
        return int(np.searchsorted(self.held_index, n))

    def record(self, tokens: Sequence[int], positions: Sequence[int]) -> None:
        first = len(self.tokens)
        self.tokens.extend(tokens)
        self.held_index = np.concatenate((self.held_index, np.arange(first, len(self.tokens), dtype=np.int64)))
        self.held_pos = np.concatenate((self.held_pos, np.asarray(positions, dtype=np.int32)))
        self.next_pos = int(positions[-1]) + 1

    def truncate(self, ctx: _Context, n: int) -> None:
        """Keep the first n tokens: drop the cells of the rest."""
        if len(self.tokens) <= n:
            return
        cut = self.held_upto(n)
        if cut < len(self.held_pos):
            ctx.hook.truncate(ctx.ptr, int(self.held_pos[cut]))
        del self.tokens[n:]
        self.held_index, self.held_pos = self.held_index[:cut], self.held_pos[:cut]
        self.next_pos = int(self.held_pos[-1]) + 1 if cut else 0

    def forget(self, evicted: np.ndarray) -> None:
        kept = ~np.isin(self.held_pos, evicted, assume_unique=True)
        self.held_index, self.held_pos = self.held_index[kept], self.held_pos[kept]

    def renumber(self, old: np.ndarray, new: np.ndarray) -> None:
        """Held position old[i] becomes new[i] (old: sorted; one not in it is no longer held)."""
        kept = np.isin(self.held_pos, old, assume_unique=True)
        self.held_index = self.held_index[kept]
        self.held_pos = new[np.searchsorted(old, self.held_pos[kept])].astype(np.int32)


class _Run:
    """One generation: feeds tokens through the hook, applies the policy,
    keeps the counts and timings."""

    def __init__(self, llm: ScopeLlama, ctx: _Context, plan: _Plan, session: _Session, stats: GenerationStats) -> None:
        self.llm, self.ctx, self.plan, self.session, self.stats = llm, ctx, plan, session, stats
        self.policy = plan.policy
        self.n_held = len(ctx.hook.positions())
        self.gen_start = session.next_pos  # first position of this run's generated text
        self.n_eligible = 0  # cells the decode strategy may evict
        self.transfers_before = ctx.hook.transfers()
        # Positions past the trained context are re-indexed under a budget;
        # the full cache behaves as stock and simply runs on.
        self.pos_limit = llm._model.n_ctx_train if plan.policy is not None else 2**31 - 1

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
        self.n_held += len(tokens)

    def _reindex(self, n_next: int) -> None:
        """Renumber the held positions 0..n-1 (llama_memory_seq_add
        re-rotates K) so the next tokens stay inside the trained range."""
        if self.policy is None or not llama_cpp.llama_memory_can_shift(llama_cpp.llama_get_memory(self.ctx.ptr)):
            raise _PositionLimit("this model's cache cannot shift positions")
        old = self.ctx.hook.positions()
        new = np.arange(len(old), dtype=np.int32)
        if len(old) + n_next > self.pos_limit:
            raise _PositionLimit(f"the {len(old)} cells held do not fit below it once renumbered")
        runs = np.flatnonzero(np.diff(old) != 1) + 1
        for first, last in zip(np.r_[0, runs], np.r_[runs, len(old)]):
            delta = int(new[first] - old[first])
            if delta:
                self.ctx.hook.shift(self.ctx.ptr, int(old[first]), int(old[last - 1]) + 1, delta)
        self.gen_start = int(np.searchsorted(old, self.gen_start))
        self.session.renumber(old, new)
        self.session.next_pos = len(old)
        if self.policy is not None:
            self.policy.decode.reindex(old, new)
        self.stats.position_resets += 1
        log.info("re-indexed %d held positions (max %d -> %d) to continue past %d",
                 len(old), int(old[-1]), len(old) - 1, self.pos_limit)

    def _evict(self, positions: np.ndarray) -> None:
        if len(positions):
            freed = self.ctx.hook.evict(self.ctx.ptr, positions)
            self.n_held -= freed
            self.stats.evicted_cells += freed
            self.session.forget(positions)

    # prefill -------------------------------------------------------------
    def prefill(self, prompt: list[int]) -> None:
        t0 = time.perf_counter()
        new = prompt[self.plan.reuse :]
        chunk = self.plan.chunk or len(new)
        try:
            for i in range(0, len(new), chunk):
                self._prefill_chunk(new[i : i + chunk], last=i + chunk >= len(new))
        except _PositionLimit:
            raise ValueError(
                f"the prompt ({len(prompt)} tokens) passes the model's trained context of {self.pos_limit} "
                "positions; give a budget and leave chunked_prefill on so positions can be re-indexed"
            ) from None
        self.gen_start = self.session.next_pos
        self.n_eligible = self.n_held if self.policy is not None and self.policy.decode.unified else 0
        self.stats.prefill_tokens_per_s = len(new) / max(time.perf_counter() - t0, 1e-9)
        self.stats.prefilled_tokens = len(new)

    def _prefill_chunk(self, tokens: list[int], *, last: bool) -> None:
        policy = self.policy
        hook = self.ctx.hook
        self._make_room(len(tokens))
        end = self.session.next_pos + len(tokens)
        capture_from = policy.prefill.capture_from(end) if policy else None
        hook.arm(capture_from)
        for i in range(0, len(tokens), N_BATCH):
            self.llm._check_open()  # backends that do not poll the abort callback stop here
            self._decode(tokens[i : i + N_BATCH], want_logits=last and i + N_BATCH >= len(tokens))
        hook.arm(None)
        self.stats.prefill_cells_peak = max(self.stats.prefill_cells_peak, self.n_held)
        if policy is not None:
            self._select_prompt(policy, captured=capture_from is not None)

    def _select_prompt(self, policy: Policy, *, captured: bool) -> None:
        assert self.llm.budget is not None
        if captured:
            cap = self.ctx.hook.capture()
            positions, attn = cap.positions, cap.attn
            policy.decode.observe(positions, attn)
        else:
            positions, attn = self.ctx.hook.positions(), None
        keep = policy_prefill_keep(policy, self.llm.budget, n_prompt=len(positions))
        if len(positions) > keep:
            self._evict(policy.prefill.select(positions, attn, keep=keep))

    # decode --------------------------------------------------------------
    def feed(self, token: int, step: int) -> None:
        self.llm._check_open()
        plan = self.policy.decode.plan(step, self.n_eligible + 1) if self.policy else None
        capture = plan is not None and plan.capture
        self._make_room(1)
        if capture:
            self.ctx.hook.arm(self.session.next_pos)
        try:
            self._decode([token], want_logits=True)
        finally:
            if capture:
                self.ctx.hook.arm(None)
        if capture:
            self.stats.captured_steps += 1
        self.n_eligible += 1
        self.stats.kv_cells_peak = max(self.stats.kv_cells_peak, self.n_held)
        if plan is not None and (capture or (plan.keep is not None and self.n_eligible > plan.keep)):
            self._select_decode(plan.keep, capture)

    def _select_decode(self, keep: int | None, captured: bool) -> None:
        assert self.policy is not None
        decode = self.policy.decode
        eligible = 0 if decode.unified else self.gen_start  # SCOPE: only generated cells
        if captured:
            cap = self.ctx.hook.capture(min_pos=eligible)
            positions, attn = cap.positions, cap.attn
        else:
            positions, attn = self.ctx.hook.positions(), None
            positions = positions[positions >= eligible]
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
        n_fed = generated = 0
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
            if generated == s.max_tokens or (self.policy is None and self.session.next_pos >= self.ctx.n_cells):
                yield self._final(piece + text.flush(), token, "length", n_fed, t0, generated)
                return
            yield Chunk(piece, token)
            try:
                self.feed(token, n_fed + 1)
            except _PositionLimit as why:
                log.warning("stopping at position %d: generation cannot pass the trained context of %d (%s)",
                            self.session.next_pos, self.pos_limit, why)
                yield self._final(text.flush(), None, "length", n_fed, t0, generated)
                return
            n_fed += 1

    def _final(self, piece: str, token: int | None, reason: FinishReason, n_fed: int, t0: float, generated: int) -> Chunk:
        st = self.stats
        st.generated_tokens = generated
        st.decode_tokens_per_s = n_fed / max(time.perf_counter() - t0, 1e-9) if n_fed else 0.0
        st.stock_kv_bytes = memory.kv_bytes(
            self.llm.geometry, memory.padded_cells(st.prompt_tokens + generated), self.llm.type_k, "f16"
        )
        if st.kv_cells_peak == 0:
            st.kv_cells_peak = self.n_held
        reads, size = self.ctx.hook.transfers()
        st.hook_reads, st.hook_bytes_read = reads - self.transfers_before[0], size - self.transfers_before[1]
        return Chunk(piece, token, reason, st)


class _PositionLimit(Exception):
    """The next token would pass the model's trained context and positions
    cannot be re-indexed."""
