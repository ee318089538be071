"""Thin binding to the native hook (native/scope_hook.h); every negative return code raises.

The hook library is the `scope_edge._scope_hook` extension. It links to the
libllama that llama_cpp has already loaded, so both share one llama.cpp.
"""
from __future__ import annotations

import ctypes
import importlib.util
from dataclasses import dataclass

import llama_cpp
import numpy as np

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the hook reads this llama.cpp's graph node names
if llama_cpp.__version__ != LLAMA_CPP_PYTHON_VERSION:
    raise ImportError(
        f"scope_edge needs llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} (its graph names are what the hook "
        f"reads), found {llama_cpp.__version__}; run: pip install llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"
    )

# Arrays cross as bare addresses: ndarray.ctypes.data_as builds a typed
# pointer per call, a few microseconds each on every decode step's calls.
_ADDR = ctypes.c_void_p

_STATUS = {
    -1: "invalid argument",
    -2: "out of memory",
    -3: "unexpected graph",
    -4: "unexpected tensor shape",
    -5: "refused to evict the last position",
    -6: "position not held",
    -7: "llama.cpp refused the operation",
    -8: "call out of order",
}


class HookError(RuntimeError):
    """The native hook failed; `code` is its scope_hook_status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{_STATUS.get(code, 'error')} ({code}): {message}")
        self.code = code


def _load() -> ctypes.CDLL:
    spec = importlib.util.find_spec("scope_edge._scope_hook")
    if spec is None or spec.origin is None:
        raise ImportError(
            "scope_edge's native hook is not built; install the package with `pip install .` "
            "(or `pip install -e .` in a checkout)"
        )
    lib = ctypes.CDLL(spec.origin)
    sig = {
        "scope_hook_new": (ctypes.c_void_p, [ctypes.c_int32] * 4 + [ctypes.c_bool]),
        "scope_hook_free": (None, [ctypes.c_void_p]),
        "scope_hook_begin": (ctypes.c_int32, [ctypes.c_void_p, _ADDR, _ADDR, ctypes.c_int32]),
        "scope_hook_end": (ctypes.c_int32, [ctypes.c_void_p]),
        "scope_hook_capture_arm": (ctypes.c_int32, [ctypes.c_void_p] + [ctypes.c_int32] * 3),
        "scope_hook_capture_set_layers": (ctypes.c_int32, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32]),
        "scope_hook_swa_set_layers": (ctypes.c_int32, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32]),
        "scope_hook_capture_gather": (
            ctypes.c_int32, [ctypes.c_void_p, ctypes.c_int32, _ADDR, ctypes.c_int32, _ADDR, ctypes.c_int64, _ADDR]),
        "scope_hook_capture_reduce": (
            ctypes.c_int32,
            [ctypes.c_void_p, ctypes.c_int32, _ADDR, ctypes.c_int32, ctypes.c_int32, _ADDR, ctypes.c_int64, _ADDR]),
        "scope_hook_seq_held": (
            ctypes.c_int32, [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, _ADDR, _ADDR, ctypes.c_int32]),
        "scope_hook_cells_get_pos": (ctypes.c_int32, [ctypes.c_void_p, _ADDR, ctypes.c_int32]),
        "scope_hook_cells_get_seq": (ctypes.c_int32, [ctypes.c_void_p, _ADDR, ctypes.c_int32]),
        "scope_hook_seq_visible": (ctypes.c_int32, [ctypes.c_void_p, ctypes.c_int32, _ADDR, ctypes.c_int32, _ADDR]),
        "scope_hook_seq_evict": (
            ctypes.c_int32,
            [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, _ADDR, ctypes.c_int32, _ADDR],
        ),
        "scope_hook_seq_shift": (ctypes.c_int32, [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int32] * 4),
        "scope_hook_seq_truncate": (ctypes.c_int32, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32]),
        "scope_hook_seq_clear": (ctypes.c_int32, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32]),
        "scope_hook_sketch_set": (
            ctypes.c_int32, [ctypes.c_void_p] + [ctypes.c_int32] * 3 + [_ADDR, _ADDR, ctypes.c_float, ctypes.c_int32]),
        "scope_hook_sketch_track_queries": (ctypes.c_int32, [ctypes.c_void_p, ctypes.c_int32]),
        "scope_hook_sketch_get_moments": (
            ctypes.c_int32, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_double), ctypes.c_int64,
                             ctypes.POINTER(ctypes.c_int64)]),
        "scope_hook_sketch_gather": (
            ctypes.c_int32, [ctypes.c_void_p, ctypes.c_int32, _ADDR, ctypes.c_int32, _ADDR, ctypes.c_int64]),
        "scope_hook_keys_read": (
            ctypes.c_int32, [ctypes.c_void_p, ctypes.c_int32, _ADDR, ctypes.c_int32, _ADDR, ctypes.c_int64]),
        "scope_hook_transfers_get": (ctypes.c_int32, [ctypes.c_void_p] + [ctypes.POINTER(ctypes.c_int64)] * 2),
        "scope_hook_last_error": (ctypes.c_char_p, [ctypes.c_void_p]),
    }
    for name, (restype, argtypes) in sig.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


_lib = _load()


def library_path() -> str:
    """Path of the loaded native hook library."""
    return _lib._name


# The C callback itself: installed in llama_context_params.cb_eval, no Python per node.
EVAL_CALLBACK = llama_cpp.ggml_backend_sched_eval_callback(
    ctypes.cast(_lib.scope_hook_eval, ctypes.c_void_p).value
)


# enum scope_hook_heads: how capture(head_reduce=) reduces a layer's heads
# (and arm(heads=) keeps them); every head is -1
HEAD_REDUCTIONS = {"sum": 0, "max": 1}
_EACH_HEAD = -1

# enum scope_hook_score: what a sketch-scored capture adds per cell
SKETCH_SCORES = {"attention": 0, "keydiff": 1, "knorm": 2}

_BYTE = ctypes.c_char


def _addr(a: np.ndarray) -> int:
    """The address of a contiguous array's data. A one-byte ctypes view of
    the buffer finds it in about a fifth of ndarray.ctypes.data's time (which
    builds a helper object per call, several per decode step); read-only
    and empty arrays take that slower way."""
    try:
        return ctypes.addressof(_BYTE.from_buffer(a))
    except (TypeError, ValueError):
        return a.ctypes.data


@dataclass(frozen=True)
class Capture:
    """Attention captured since the hook was armed, per held position.

    positions: sorted int32 positions held now.
    attn: float32 [n_layer, n_head, len(positions)], each entry the sum of the
        captured query rows' attention probabilities on that position's cell
        ([n_layer, 1, len(positions)] when captured with head_reduce).
    rows: query rows summed per layer.
    """

    positions: np.ndarray
    attn: np.ndarray
    rows: np.ndarray


class Hook:
    """Owner of one native scope_hook: sequences [0, n_seq) of one llama
    context. Methods act on sequence `seq` (default 0).

    streams: the context has one KV stream per sequence (kv_unified = false;
    sequence s owns cells [s, s + 1) x n_cells / n_seq), else one unified
    cell space."""

    def __init__(self, *, n_cells: int, n_layer: int, n_head: int, n_seq: int = 1, streams: bool = False) -> None:
        self.n_cells, self.n_layer, self.n_head, self.n_seq = n_cells, n_layer, n_head, n_seq
        if streams and n_cells % n_seq:
            raise ValueError(f"{n_cells} cells do not split into {n_seq} equal streams")
        self._ptr = _lib.scope_hook_new(n_cells, n_layer, n_head, n_seq, not streams)
        if not self._ptr:
            raise MemoryError(f"scope_hook_new({n_cells}, {n_layer}, {n_head}, {n_seq}, kv_unified={not streams}) "
                              f"failed")
        self._rows = np.zeros(n_layer, dtype=np.int32)
        self._cells = np.zeros(n_cells, dtype=np.int32)
        self._heads: list[str | None] = [None] * n_seq  # per sequence, arm's heads
        self._zeros, self._zeros_at = np.zeros(0, dtype=np.int32), 0  # begin's sequence ids when all are 0
        self._sketch_shape = (0, 0, 0)  # n_head_kv, rank, head_dim

    @property
    def user_data(self) -> ctypes.c_void_p:
        return ctypes.c_void_p(self._ptr)

    def close(self) -> None:
        if self._ptr:
            _lib.scope_hook_free(self._ptr)
            self._ptr = None

    def _check(self, rc: int) -> int:
        if rc < 0:
            msg = _lib.scope_hook_last_error(self._ptr) or b""
            raise HookError(rc, msg.decode("utf-8", "replace"))
        return rc

    def begin(self, positions: np.ndarray, seq_ids: np.ndarray | None = None) -> None:
        """Before a decode: each batch token's position and sequence (None: all 0)."""
        pos = np.ascontiguousarray(positions, dtype=np.int32)
        seqs = None if seq_ids is None else np.ascontiguousarray(seq_ids, dtype=np.int32)
        if seqs is not None and len(seqs) != len(pos):
            raise ValueError(f"begin: {len(pos)} positions but {len(seqs)} sequence ids")
        at = self._seq0(len(pos)) if seqs is None else _addr(seqs)
        self._check(_lib.scope_hook_begin(self._ptr, _addr(pos), at, len(pos)))

    def _seq0(self, n: int) -> int:
        """Address of n sequence ids 0: one buffer, grown as needed, for every begin."""
        if len(self._zeros) < n:
            self._zeros = np.zeros(n, dtype=np.int32)
            self._zeros_at = _addr(self._zeros)
        return self._zeros_at

    def end(self) -> None:
        self._check(_lib.scope_hook_end(self._ptr))

    def abandon(self) -> None:
        """Close a begin whose decode failed; its error is the decode's."""
        _lib.scope_hook_end(self._ptr)

    def arm(self, from_pos: int | None, *, seq: int = 0, heads: str | None = None) -> None:
        """Capture the rows of seq's query positions >= from_pos in the
        following decodes, from zeroed accumulators. None stops capturing;
        what was captured stays readable through capture() until the next arm.
        heads "sum" or "max": the capture will be read with that head_reduce
        only, so the hook reduces each row's heads as it reads it (one pass,
        not three); "max" then takes one query row per layer (a decode step)."""
        if heads is not None and heads not in HEAD_REDUCTIONS:
            raise ValueError(f"heads must be None or one of {tuple(HEAD_REDUCTIONS)}, got {heads!r}")
        code = _EACH_HEAD if heads is None else HEAD_REDUCTIONS[heads]
        self._check(_lib.scope_hook_capture_arm(self._ptr, seq, -1 if from_pos is None else from_pos, code))
        if from_pos is not None and 0 <= seq < self.n_seq:
            self._heads[seq] = heads

    def capture_layers(self, layers: np.ndarray | None) -> None:
        """Capture only the layers flagged in layers (bool [n_layer]); None: every layer."""
        flags = None if layers is None else np.ascontiguousarray(layers, dtype=np.uint8).tobytes()
        self._check(_lib.scope_hook_capture_set_layers(self._ptr, flags, self.n_layer))

    def swa_layers(self, swa: np.ndarray) -> None:
        """Flag the sliding-window layers (bool [n_layer]) of an iSWA model: the
        hook then maps, shows and evicts the full-attention cache's cells and
        never captures those layers. Before the first decode."""
        flags = np.ascontiguousarray(swa, dtype=np.uint8).ravel()
        self._check(_lib.scope_hook_swa_set_layers(self._ptr, flags.tobytes(), flags.size))

    def cells(self) -> np.ndarray:
        """Position held by each cell, -1 for empty cells (a copy)."""
        self._check(_lib.scope_hook_cells_get_pos(self._ptr, _addr(self._cells), self.n_cells))
        return self._cells.copy()

    def cell_seqs(self) -> np.ndarray:
        """Sequence of each cell, -1 for empty cells (a copy)."""
        out = np.zeros(self.n_cells, dtype=np.int32)
        self._check(_lib.scope_hook_cells_get_seq(self._ptr, _addr(out), self.n_cells))
        return out

    def seq_cells(self, seq: int) -> np.ndarray:
        """Position held by each cell for seq, -1 for cells not of seq."""
        cells = self.cells()
        if self.n_seq > 1:
            cells[self.cell_seqs() != seq] = -1
        return cells

    def positions(self, *, seq: int = 0) -> np.ndarray:
        """Sorted positions held by seq."""
        return self.held(seq=seq)[1]

    def held(self, min_pos: int = 0, *, seq: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(the cells seq holds at positions >= min_pos, their positions),
        both int32 in position order."""
        cells = np.empty(self.n_cells, dtype=np.int32)
        pos = np.empty(self.n_cells, dtype=np.int32)
        n = self._check(_lib.scope_hook_seq_held(self._ptr, seq, min_pos, _addr(cells), _addr(pos), self.n_cells))
        return cells[:n], pos[:n]

    def capture(self, min_pos: int = 0, *, seq: int = 0, head_reduce: str | None = None) -> Capture:
        """What was captured for seq since its last arm, for its held
        positions >= min_pos, in position order. head_reduce "sum" or
        "max": attn comes with each layer's heads reduced so, shape
        [n_layer, 1, n] (max exact, sum to float32 rounding)."""
        armed = self._heads[seq] if 0 <= seq < self.n_seq else None
        if armed is not None and head_reduce != armed:
            raise ValueError(f"sequence {seq} was armed to keep its heads reduced by {armed!r}; capture(head_reduce="
                             f"{head_reduce!r}) cannot read it (arm with heads=None to keep every head)")
        order, positions = self.held(min_pos, seq=seq)
        if head_reduce is None:
            attn = np.empty((self.n_layer, self.n_head, len(order)), dtype=np.float32)
            rc = _lib.scope_hook_capture_gather(self._ptr, seq, _addr(order), len(order),
                                                _addr(attn), attn.size, _addr(self._rows))
        elif head_reduce in HEAD_REDUCTIONS:
            attn = np.empty((self.n_layer, 1, len(order)), dtype=np.float32)
            rc = _lib.scope_hook_capture_reduce(self._ptr, seq, _addr(order), len(order),
                                                HEAD_REDUCTIONS[head_reduce], _addr(attn),
                                                attn.size, _addr(self._rows))
        else:
            raise ValueError(f"head_reduce must be None or one of {tuple(HEAD_REDUCTIONS)}, got {head_reduce!r}")
        self._check(rc)
        return Capture(positions, attn, self._rows.copy())

    def visible(self, *, seq: int = 0) -> tuple[np.ndarray, int]:
        """(cells seq's latest query row could see, attention width n_kv),
        from llama.cpp's attention mask."""
        out = np.zeros(self.n_cells, dtype=np.int32)
        n_kv = ctypes.c_int32(0)
        n = self._check(_lib.scope_hook_seq_visible(self._ptr, seq, _addr(out), self.n_cells, ctypes.byref(n_kv)))
        return out[:n], n_kv.value

    def evict(self, ctx: llama_cpp.llama_context_p, positions: np.ndarray, *, seq: int = 0) -> int:
        """Free the cells of seq's `positions`; returns the number of cells freed."""
        pos = np.ascontiguousarray(positions, dtype=np.int32)
        freed = ctypes.c_int32(0)
        self._check(_lib.scope_hook_seq_evict(self._ptr, ctx, seq, _addr(pos), len(pos), ctypes.byref(freed)))
        return freed.value

    def shift(self, ctx: llama_cpp.llama_context_p, p0: int, p1: int, delta: int, *, seq: int = 0) -> None:
        self._check(_lib.scope_hook_seq_shift(self._ptr, ctx, seq, p0, p1, delta))

    def truncate(self, ctx: llama_cpp.llama_context_p, p0: int, *, seq: int = 0) -> None:
        """Remove every position >= p0 of seq, the last one included."""
        self._check(_lib.scope_hook_seq_truncate(self._ptr, ctx, seq, p0))

    def sketch(self, basis: np.ndarray | None, basis_q: np.ndarray | None = None, scale: float = 1.0,
               scores: str = "attention") -> None:
        """Score captures from key sketches: basis (keys) and basis_q (queries;
        None: basis) float32 [n_layer, n_head_kv, rank, head_dim], scale the
        attention's softmax scale, scores one of SKETCH_SCORES. basis None:
        exact attention probabilities again."""
        if basis is None:
            self._check(_lib.scope_hook_sketch_set(self._ptr, 0, 0, 0, None, None, 0.0, 0))
            self._sketch_shape = (0, 0, 0)
            return
        b = np.ascontiguousarray(basis, dtype=np.float32)
        bq = b if basis_q is None else np.ascontiguousarray(basis_q, dtype=np.float32)
        if b.ndim != 4 or b.shape[0] != self.n_layer or bq.shape != b.shape:
            raise ValueError(f"sketch bases must be [n_layer={self.n_layer}, n_head_kv, rank, head_dim], both the "
                             f"same shape; got {b.shape} and {bq.shape}")
        n_head_kv, rank, head_dim = b.shape[1:]
        if scores not in SKETCH_SCORES:
            raise ValueError(f"scores must be one of {tuple(SKETCH_SCORES)}, got {scores!r}")
        self._check(_lib.scope_hook_sketch_set(self._ptr, n_head_kv, head_dim, rank, b.ctypes.data,
                                               bq.ctypes.data, float(scale), SKETCH_SCORES[scores]))
        self._sketch_shape = (n_head_kv, rank, head_dim)

    def track_queries(self, on: bool) -> None:
        """Start (from zero) or stop summing q q^T of the captured queries per layer and KV head."""
        self._check(_lib.scope_hook_sketch_track_queries(self._ptr, int(bool(on))))

    def query_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """(sum of q q^T float64 [n_layer, n_head_kv, head_dim, head_dim], rows summed [n_layer, n_head_kv])."""
        n_head_kv, _, head_dim = self._sketch_shape
        out = np.zeros((self.n_layer, n_head_kv, head_dim, head_dim), dtype=np.float64)
        counts = np.zeros((self.n_layer, n_head_kv), dtype=np.int64)
        self._check(_lib.scope_hook_sketch_get_moments(
            self._ptr, out.ctypes.data_as(ctypes.POINTER(ctypes.c_double)), out.size,
            counts.ctypes.data_as(ctypes.POINTER(ctypes.c_int64))))
        return out, counts

    def sketches(self, *, seq: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(sorted held positions of seq, their sketches float32 [n_layer,
        n_head_kv, n, rank]), brought up to date. Between decodes."""
        order, positions = self.held(seq=seq)
        n_head_kv, rank, _ = self._sketch_shape
        out = np.empty((self.n_layer, n_head_kv, len(order), rank), dtype=np.float32)
        self._check(_lib.scope_hook_sketch_gather(
            self._ptr, seq, _addr(order), len(order), out.ctypes.data, out.size))
        return positions, out

    def keys(self, layer: int, n_embd: int, *, seq: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(sorted held positions of seq, layer's keys of those cells float32
        [n, n_embd] as the attention reads them). Between decodes."""
        order, positions = self.held(seq=seq)
        out = np.empty((len(order), n_embd), dtype=np.float32)
        self._check(_lib.scope_hook_keys_read(self._ptr, layer, _addr(order), len(order), out.ctypes.data,
                                              out.size))
        return positions, out

    def transfers(self) -> tuple[int, int]:
        """(tensor reads, bytes read) since the hook was created; on a device
        every read is a transfer to the host."""
        n, size = ctypes.c_int64(0), ctypes.c_int64(0)
        self._check(_lib.scope_hook_transfers_get(self._ptr, ctypes.byref(n), ctypes.byref(size)))
        return n.value, size.value

    def clear(self, ctx: llama_cpp.llama_context_p, *, seq: int = 0) -> None:
        self._check(_lib.scope_hook_seq_clear(self._ptr, ctx, seq))
