"""A llama_context whose KV cache our hook watches: decode, capture, evict.

Every cache operation goes through here, so llama.cpp's cells and the hook's
cell map never disagree (the hook verifies them after each change).
"""
from __future__ import annotations

import ctypes
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import llama_cpp
import numpy as np
from numba import carray, cfunc, types

from ..hook import EVAL_CALLBACK, Capture, Hook
from ..policies.checks import is_int
from .model import Model

N_BATCH = 512  # llama-cpp-python's default, so prefill matches stock ubatch for ubatch
KV_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}


@cfunc(types.boolean(types.voidptr), cache=True)
def _aborted(flag: int) -> bool:
    """llama.cpp's abort callback: true once the bool at address flag is set. Compiled,
    not a Python callback: llama.cpp polls it at every graph node (about a
    thousand a token), and a Python callback would take the GIL each time."""
    return carray(flag, 1, np.uint8)[0] != 0


# Module-level, so the function pointer outlives every context that polls it.
_ABORT_CALLBACK = llama_cpp.ggml_abort_callback(_aborted.address)


def layer_flags(layers: Sequence[int] | None, n_layer: int) -> np.ndarray | None:
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


def fill_batch(batch: llama_cpp.llama_batch, tokens: Sequence[int], positions: Sequence[int], *,
               want_logits: bool) -> None:
    """Write tokens at positions (sequence 0) into a llama_batch from
    llama_batch_init, logits asked for the last token only if want_logits."""
    for i, (tok, pos) in enumerate(zip(tokens, positions)):
        batch.token[i] = tok
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = 0
    batch.logits[len(tokens) - 1] = want_logits
    batch.n_tokens = len(tokens)


class Context:
    """A llama_context of n_cells KV cells (one sequence) with our hook as
    its eval callback.

    A decode stops at its next graph node once `abort` is set (close()).
    n_ubatch < N_BATCH makes llama.cpp split one decode into several ubatches
    (the tests use it; the facade keeps one ubatch per decode, as stock).
    capture_layers: flags [n_layer] of the layers whose attention is captured
    (None: every layer)."""

    def __init__(self, model: Model, *, n_cells: int, n_threads: int, n_threads_batch: int, type_k: str,
                 abort: ctypes.c_bool, capture_layers: np.ndarray | None = None, n_ubatch: int = N_BATCH) -> None:
        if not is_int(n_ubatch) or not 1 <= n_ubatch <= N_BATCH:
            raise ValueError(f"n_ubatch must be an int in [1, {N_BATCH}] (the batch size), got {n_ubatch!r}")
        if type_k not in KV_TYPES:
            raise ValueError(f"type_k must be one of {sorted(KV_TYPES)}, got {type_k!r}")
        self._hook = Hook(n_cells=n_cells, n_layer=model.n_layer, n_head=model.n_head)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_cells
        params.n_batch = N_BATCH
        params.n_ubatch = n_ubatch
        params.n_seq_max = 1
        params.n_threads = n_threads
        params.n_threads_batch = n_threads_batch
        # kq_soft_max only exists without flash attention; the hook reads it.
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.type_k = KV_TYPES[type_k]
        params.type_v = llama_cpp.GGML_TYPE_F16
        params.cb_eval = EVAL_CALLBACK
        params.cb_eval_user_data = self._hook.user_data
        self.ptr = llama_cpp.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            self._hook.close()
            raise RuntimeError(f"llama.cpp could not create a context of {n_cells} cells (out of memory?)")
        self._abort = abort  # llama.cpp holds its address: keep it alive with the context
        llama_cpp.llama_set_abort_callback(self.ptr, _ABORT_CALLBACK, ctypes.addressof(abort))
        self.n_cells: int = llama_cpp.llama_n_ctx(self.ptr)
        if self.n_cells != n_cells:
            self.close()
            raise RuntimeError(f"asked llama.cpp for {n_cells} cells, got {self.n_cells}")
        self._hook.capture_layers(capture_layers)
        self._batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        self._n_vocab = model.n_vocab

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self.ptr)
            self.ptr = None
        self._hook.close()

    @property
    def memory(self) -> llama_cpp.llama_memory_t:
        """llama.cpp's memory handle, for its own view of the cache
        (llama_memory_seq_pos_min / _max and friends)."""
        return llama_cpp.llama_get_memory(self.ptr)

    @property
    def can_shift(self) -> bool:
        """Whether llama.cpp can renumber positions in this cache (re-indexing)."""
        return bool(llama_cpp.llama_memory_can_shift(self.memory))

    # -- decoding --------------------------------------------------------
    def decode(self, tokens: Sequence[int], positions: Sequence[int], *, want_logits: bool) -> None:
        """Decode up to N_BATCH tokens at positions; logits only for the last one if asked."""
        n = len(tokens)
        if not 1 <= n <= N_BATCH or len(positions) != n:
            raise ValueError(f"decode takes 1..{N_BATCH} tokens with one position each, got {n} tokens "
                             f"and {len(positions)} positions")
        fill_batch(self._batch, tokens, positions, want_logits=want_logits)
        self._hook.begin(np.asarray(positions, dtype=np.int32))
        rc = llama_cpp.llama_decode(self.ptr, self._batch)
        if rc != 0:
            self._hook.abandon()
            if rc == 2 and self._abort.value:
                raise RuntimeError("this ScopeLlama is closed: close() stopped this generation mid-decode")
            reason = {1: "no free KV cell (the cache is full)", 2: "aborted"}.get(rc, "error")
            raise RuntimeError(f"llama_decode failed with {rc}: {reason}")
        self._hook.end()

    def synchronize(self) -> None:
        """Wait for the device to finish the decodes queued so far (llama_decode
        may return before an offloaded graph has run)."""
        llama_cpp.llama_synchronize(self.ptr)

    def logits(self) -> np.ndarray:
        """float32 [n_vocab] logits of the last decoded token that asked for them (a copy)."""
        ptr = llama_cpp.llama_get_logits_ith(self.ptr, -1)
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).copy()

    # -- attention capture ----------------------------------------------
    @contextmanager
    def capturing(self, from_pos: int) -> Iterator[None]:
        """Capture the attention rows of query positions >= from_pos decoded
        inside the block (accumulators zeroed on entry). Always disarmed on
        exit; read the result with capture()."""
        self._hook.arm(from_pos)
        try:
            yield
        finally:
            self._hook.arm(None)

    def capture(self, min_pos: int = 0) -> Capture:
        """What the last capturing() block captured, for held positions >= min_pos."""
        return self._hook.capture(min_pos)

    def transfers(self) -> tuple[int, int]:
        """(tensor reads, bytes read) by the hook so far; on a device, transfers to the host."""
        return self._hook.transfers()

    # -- the cache, as llama.cpp holds it -------------------------------
    def cells(self) -> np.ndarray:
        """Position held by each cell, -1 for empty cells (a copy)."""
        return self._hook.cells()

    def positions(self) -> np.ndarray:
        """Sorted positions held."""
        return self._hook.positions()

    def visible(self) -> tuple[np.ndarray, int]:
        """(cells the latest query row could see, attention width n_kv), read
        from llama.cpp's attention mask."""
        return self._hook.visible()

    def evict(self, positions: np.ndarray) -> int:
        """Free the cells of positions (sorted, held); returns cells freed."""
        return self._hook.evict(self.ptr, positions)

    def shift(self, p0: int, p1: int, delta: int) -> None:
        """Add delta to positions in [p0, p1) (llama.cpp re-rotates their K)."""
        self._hook.shift(self.ptr, p0, p1, delta)

    def truncate(self, p0: int) -> None:
        """Remove every position >= p0."""
        self._hook.truncate(self.ptr, p0)

    def clear(self) -> None:
        """Empty the cache."""
        self._hook.clear(self.ptr)
