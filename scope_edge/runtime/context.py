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

from .. import memory
from ..memory import N_BATCH
from ..hook import EVAL_CALLBACK, Capture, Hook
from ..checks import is_int
from .model import Model
from .sampling import Sampler
from .sequence import SequenceCache
from .sketch import SketchBasis

# The cache types an engine may ask for (EngineConfig checks the names).
KV_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}


@cfunc(types.boolean(types.voidptr), cache=True)
def _aborted(flag: int) -> bool:
    """llama.cpp's abort callback: true once the bool at address flag is set. Compiled,
    not a Python callback: llama.cpp polls it at every graph node (about a
    thousand a token), and a Python callback would take the GIL each time."""
    return carray(flag, 1, np.uint8)[0] != 0


# Module-level, so the function pointer outlives every context that polls it.
_ABORT_CALLBACK = llama_cpp.ggml_abort_callback(_aborted.address)


DEVICE_CAPTURE_START, DEVICE_CAPTURE_STRIDE = 2, 4


def default_capture_layers(n_layer: int, *, offloaded: bool, swa: np.ndarray | None = None) -> list[int] | None:
    """The layers captured when the caller names none. On the CPU every
    layer (None). With offloaded layers each captured layer makes llama.cpp
    stop the device's graph and wait for it once per captured step, so every
    4th layer from layer 2 (7 of the default model's 30): measured in README
    "Offload" at the same top-1 as every layer at 192:128, 0.7 points below
    at 320:192, for 0.23x the synchronisations. A sliding-window model
    (swa: its flags) offers only its few full-attention layers: those."""
    if offloaded and swa is not None:
        return np.flatnonzero(~swa).tolist()
    if not offloaded or n_layer <= DEVICE_CAPTURE_START:
        return None
    return list(range(DEVICE_CAPTURE_START, n_layer, DEVICE_CAPTURE_STRIDE))


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
    n = len(tokens)
    if n == 1:  # a decode step: no per-token lists
        batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.logits[0] = tokens[0], positions[0], 1, want_logits
        batch.seq_id[0][0] = 0
        batch.n_tokens = 1
        return
    fill_batch_seqs(batch, tokens, positions, [0] * n, [False] * (n - 1) + [want_logits])


def fill_batch_seqs(batch: llama_cpp.llama_batch, tokens: Sequence[int], positions: Sequence[int],
                    seq_ids: Sequence[int], logits: Sequence[bool]) -> None:
    """Write tokens at positions of sequences seq_ids into a llama_batch from
    llama_batch_init, logits asked where logits[i]."""
    for i, (tok, pos, seq, want) in enumerate(zip(tokens, positions, seq_ids, logits)):
        batch.token[i] = tok
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = want
    batch.n_tokens = len(tokens)


class Context(SequenceCache):
    """A llama_context of n_cells KV cells with our hook as its eval callback
    (sequence 0 of it: a SequenceCache, for the single-sequence runtime).

    n_seq > 1: sequences [0, n_seq) each own a stream of n_cells / n_seq
    cells (llama.cpp's kv_unified = false: a token attends over its own
    sequence's cells only, not over every sequence's, which made a step of 4
    sequences 1.5x slower); methods with a seq keyword act on that sequence
    (default 0), and decode_seqs decodes tokens of several sequences in one
    llama_decode.

    A decode stops at its next graph node once `abort` is set (close()).
    n_ubatch < N_BATCH makes llama.cpp split one decode into several ubatches
    (the tests use it; the facade keeps one ubatch per decode, as stock).
    capture_layers: flags [n_layer] of the layers whose attention is captured
    (None: every layer).
    flash_attn: llama.cpp's fused attention. It never computes the attention
    probabilities, so captures then need `sketch` (scores from key sketches);
    a quantized type_v needs it.
    sketch: capture scores from key sketches on this basis (None: exact
    attention probabilities, flash attention off)."""

    def __init__(self, model: Model, *, n_cells: int, n_threads: int, n_threads_batch: int, type_k: str,
                 abort: ctypes.c_bool, capture_layers: np.ndarray | None = None, n_ubatch: int = N_BATCH,
                 n_seq: int = 1, type_v: str = "f16", flash_attn: bool = False,
                 sketch: SketchBasis | None = None) -> None:
        if not is_int(n_ubatch) or not 1 <= n_ubatch <= N_BATCH:
            raise ValueError(f"n_ubatch must be an int in [1, {N_BATCH}] (the batch size), got {n_ubatch!r}")
        if not is_int(n_seq) or not 1 <= n_seq <= N_BATCH:
            raise ValueError(f"n_seq must be an int in [1, {N_BATCH}], got {n_seq!r}")
        if n_seq > 1 and (n_cells % n_seq or (n_cells // n_seq) % memory.KV_CELL_PADDING):
            raise ValueError(f"{n_cells} cells for {n_seq} sequences: each sequence's stream must be a multiple of "
                             f"{memory.KV_CELL_PADDING} cells (llama.cpp pads it so)")
        self.n_seq = n_seq
        self._hook = Hook(n_cells=n_cells, n_layer=model.n_layer, n_head=model.n_head, n_seq=n_seq,
                          streams=n_seq > 1)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_cells
        params.n_batch = N_BATCH
        params.n_ubatch = n_ubatch
        params.n_seq_max = n_seq
        params.kv_unified = n_seq == 1
        # llama.cpp's default sizes a sliding-window cache like the full one; its own cells are the window's
        params.swa_full = False
        params.n_threads = n_threads
        params.n_threads_batch = n_threads_batch
        # Never AUTO: whether kq_soft_max exists must be known, and it exists only with flash attention off.
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.type_k = KV_TYPES[type_k]
        params.type_v = KV_TYPES[type_v]
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
        if model.swa_layers is not None:
            self._hook.swa_layers(model.swa_layers)
        self._hook.capture_layers(capture_layers)
        self.flash_attn = flash_attn
        self.sketch = sketch
        if sketch is not None:
            self._hook.sketch(sketch.basis, sketch.basis_q, sketch.scale, sketch.scores)
        self._batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        self._n_vocab = model.n_vocab
        self._n_embd_k = model.n_embd_k

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
        self._decode_filled(positions)

    def _decode_filled(self, positions: Sequence[int], seq_ids: Sequence[int] | None = None) -> None:
        """llama_decode the filled batch between the hook's begin and end
        (seq_ids None: every token of sequence 0)."""
        self._hook.begin(np.asarray(positions, dtype=np.int32),
                         None if seq_ids is None else np.asarray(seq_ids, dtype=np.int32))
        rc = llama_cpp.llama_decode(self.ptr, self._batch)
        if rc != 0:
            self._hook.abandon()
            if rc == 2 and self._abort.value:
                raise RuntimeError("this ScopeLlama is closed: close() stopped this generation mid-decode")
            reason = {1: "no free KV cell (the cache is full)", 2: "aborted"}.get(rc, "error")
            raise RuntimeError(f"llama_decode failed with {rc}: {reason}")
        self._hook.end()

    def decode_seqs(self, tokens: Sequence[int], positions: Sequence[int], seq_ids: Sequence[int],
                    logits: Sequence[bool]) -> None:
        """Decode up to N_BATCH tokens of several sequences in one llama_decode
        (token i at positions[i] of sequence seq_ids[i]; its logits kept if
        logits[i], read with sample(index=i))."""
        n = len(tokens)
        if not 1 <= n <= N_BATCH or not len(positions) == len(seq_ids) == len(logits) == n:
            raise ValueError(f"decode_seqs takes 1..{N_BATCH} tokens with one position, sequence and logits flag "
                             f"each, got {n} tokens, {len(positions)} positions, {len(seq_ids)} sequences and "
                             f"{len(logits)} flags")
        bad = [s for s in seq_ids if not 0 <= s < self.n_seq]
        if bad:
            raise ValueError(f"sequence ids must be in [0, {self.n_seq}), got {bad[:3]}")
        fill_batch_seqs(self._batch, tokens, positions, seq_ids, logits)
        # llama.cpp runs a batch of several tokens (one per sequence included)
        # on n_threads_batch, and a single token on n_threads.
        self._decode_filled(positions, seq_ids)

    def sample(self, sampler: Sampler, index: int = -1) -> int:
        """Draw a token with sampler from the logits of batch token index (-1: the last with logits)."""
        return sampler.draw(self.ptr, index)

    def synchronize(self) -> None:
        """Wait for the device to finish the decodes queued so far (llama_decode
        may return before an offloaded graph has run)."""
        llama_cpp.llama_synchronize(self.ptr)

    def logits(self, index: int = -1) -> np.ndarray:
        """float32 [n_vocab] logits of batch token index (-1: the last that asked for them), a copy."""
        ptr = llama_cpp.llama_get_logits_ith(self.ptr, index)
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).copy()

    # -- attention capture ----------------------------------------------
    @contextmanager
    def capturing(self, from_pos: int, *, seq: int = 0, heads: str | None = None) -> Iterator[None]:
        """Capture the attention rows of seq's query positions >= from_pos
        decoded inside the block (its accumulators zeroed on entry). Always
        disarmed on exit; read the result with capture(). heads "sum" or
        "max": read only with that head_reduce, so the hook reduces each
        row's heads as it reads it ("max": one query row, a decode step)."""
        self._hook.arm(from_pos, seq=seq, heads=heads)
        try:
            yield
        finally:
            self._hook.arm(None, seq=seq)

    def capture(self, min_pos: int = 0, *, seq: int = 0, head_reduce: str | None = None) -> Capture:
        """What the last capturing() block of seq captured, for its held
        positions >= min_pos; head_reduce "sum" or "max" reduces each
        layer's heads natively (attn [n_layer, 1, n])."""
        return self._hook.capture(min_pos, seq=seq, head_reduce=head_reduce)

    def transfers(self) -> tuple[int, int]:
        """(tensor reads, bytes read) by the hook so far; on a device, transfers to the host."""
        return self._hook.transfers()

    def sketches(self, *, seq: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(seq's held positions, their key sketches [n_layer, n_head_kv, n,
        rank]) on this context's basis, brought up to date."""
        if self.sketch is None:
            raise ValueError("this context scores with exact attention: it keeps no key sketches")
        return self._hook.sketches(seq=seq)

    def track_queries(self, on: bool) -> None:
        """Sum q q^T of the queries captured from now on (per layer and KV
        head; a sketch context only), or stop: what calibration learns from."""
        if self.sketch is None:
            raise ValueError("query moments are tracked by the sketch path: create the context with sketch=")
        self._hook.track_queries(on)

    def query_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """(sum of q q^T [n_layer, n_head_kv, head_dim, head_dim], query rows
        summed [n_layer, n_head_kv]) since track_queries(True)."""
        return self._hook.query_moments()

    def keys(self, layer: int, *, seq: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(seq's held positions, layer's keys of them, float32 [n, n_head_kv
        * head_dim], as stored: after RoPE, rotated when K is quantized).
        llama.cpp applies a shift() to K at the next decode: keys read between
        the two are the old ones."""
        if not is_int(layer) or not 0 <= layer < self._hook.n_layer:
            raise ValueError(f"layer must be in [0, {self._hook.n_layer}), got {layer!r}")
        return self._hook.keys(layer, self._n_embd_k, seq=seq)

    # -- the cache, as llama.cpp holds it -------------------------------
    def cells(self) -> np.ndarray:
        """Position held by each cell, -1 for empty cells (a copy)."""
        return self._hook.cells()

    def cell_seqs(self) -> np.ndarray:
        """Sequence of each cell, -1 for empty cells (a copy)."""
        return self._hook.cell_seqs()

    def positions(self, *, seq: int = 0) -> np.ndarray:
        """Sorted positions held by seq."""
        return self._hook.positions(seq=seq)

    def held(self, min_pos: int = 0, *, seq: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(the cells seq holds at positions >= min_pos, their positions),
        int32, in position order: the order capture() lays cells out in."""
        return self._hook.held(min_pos, seq=seq)

    def visible(self, *, seq: int = 0) -> tuple[np.ndarray, int]:
        """(cells seq's latest query row could see, attention width n_kv),
        read from llama.cpp's attention mask."""
        return self._hook.visible(seq=seq)

    def evict(self, positions: np.ndarray, *, seq: int = 0) -> int:
        """Free the cells of seq's positions (sorted, held); returns cells freed."""
        return self._hook.evict(self.ptr, positions, seq=seq)

    def shift(self, p0: int, p1: int, delta: int, *, seq: int = 0) -> None:
        """Add delta to seq's positions in [p0, p1) (llama.cpp re-rotates their K)."""
        self._hook.shift(self.ptr, p0, p1, delta, seq=seq)

    def truncate(self, p0: int, *, seq: int = 0) -> None:
        """Remove every position >= p0 of seq."""
        self._hook.truncate(self.ptr, p0, seq=seq)

    def clear(self, *, seq: int = 0) -> None:
        """Empty seq's cells."""
        self._hook.clear(self.ptr, seq=seq)
