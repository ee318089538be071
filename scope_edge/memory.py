"""KV-cache byte accounting from GGUF metadata.

Per attention layer llama.cpp allocates a K tensor of n_cells rows of n_head_kv * head_dim_k
elements and a V tensor of n_cells rows of n_head_kv * head_dim_v elements. Quantized cache
types store each row in blocks (q8_0: 34 bytes per 32 elements, q4_0: 18 per 32). ``kv_bytes``
is the sum of those tensors, the "KV self size" llama.cpp reports; the context size llama.cpp
uses is ``padded_cells(n_ctx)``.

Sliding-window (iSWA) models have two caches: their full-attention layers' of n_cells cells and
their sliding-window layers' of ``swa_cells`` cells (``kv_bytes_split``; stock llama.cpp makes the
second as big as the first unless told ``swa_full = false``). Recurrent/hybrid models have other
memory: ``read_geometry`` flags them and ``KvGeometry.unsupported_reason`` says why.

The metadata is read by scope_edge.gguf_meta, a small GGUF reader (``gguf.GGUFReader`` takes
seconds on the default model's tokenizer; ``ScopeLlama`` reads the geometry on every load).
"""
from __future__ import annotations

import functools
import operator
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from .gguf_meta import read_metadata

KV_CELL_PADDING = 256
"""llama.cpp rounds the number of KV cells (n_ctx) up to a multiple of this."""

N_BATCH = 512
"""Tokens per llama_decode call: llama-cpp-python's default, so prefill matches stock ubatch for
ubatch."""

PREFILL_CHUNK = N_BATCH // 2
"""The default prefill chunk under a budget (cells, its probe included): half the default
budget's decode room, so each earlier chunk's selection keeps what the next chunk leaves of the
allocation (the ordered suite's tuning chose half the room over all of it: docs/ordered.md)."""

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30, "t": 2**40, "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)

_T = gguf.GGMLQuantizationType
KV_TYPES: dict[str, gguf.GGMLQuantizationType] = {
    "f32": _T.F32, "f16": _T.F16, "bf16": _T.BF16, "q8_0": _T.Q8_0,
    "q4_0": _T.Q4_0, "q4_1": _T.Q4_1, "q5_0": _T.Q5_0, "q5_1": _T.Q5_1,
}
"""KV cache types by llama.cpp name (``--cache-type-k``); the int values are ggml_type."""

KvType = str | int
"""A KV cache type: a name from KV_TYPES ("q8_0") or its ggml_type number."""

RECURRENT_ARCHITECTURES = frozenset({
    "mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7",  # recurrent only
    "jamba", "falcon-h1", "granitehybrid", "plamo2", "lfm2", "lfm2moe", "nemotron_h",
    "nemotron_h_moe", "qwen3next", "qwen35", "qwen35moe", "kimi-linear",  # hybrid
})
_RECURRENT_KEY_PARTS = (".ssm.", ".wkv.", ".shortconv.", ".kda.")

SWA_PATTERNS = {"gemma3": 6}
"""Sliding-window layouts verified against llama.cpp's (its hparams.set_swa_pattern(n), which no
GGUF key or API exposes): every n-th layer (il % n == n - 1) is full-attention, the rest use the
window. Gemma 3 270M's log shows layers 5, 11 and 17 in the non-SWA cache."""

@dataclass(frozen=True)
class KvGeometry:
    """The shape of a model's KV cache, as read from its GGUF metadata."""

    architecture: str
    n_layer: int
    n_head: int  # query heads (the largest, if they vary per layer)
    n_head_kv: int  # KV heads (the largest, if they vary per layer)
    head_dim_k: int
    head_dim_v: int
    n_ctx_train: int
    n_head_kv_per_layer: tuple[int, ...]  # 0 for layers without attention (hybrid models)
    sliding_window: int | None = None
    recurrent: bool = False  # has recurrent (SSM/RWKV/conv) state, alone or beside attention

    @property
    def swa_layers(self) -> tuple[bool, ...] | None:
        """Which layers use the sliding window (None: no window, or a layout not in SWA_PATTERNS)."""
        pattern = SWA_PATTERNS.get(self.architecture)
        if not self.sliding_window or pattern is None:
            return None
        return tuple(il % pattern != pattern - 1 for il in range(self.n_layer))

    @property
    def n_kv_layers(self) -> int:
        """Layers that have a KV cache."""
        return sum(1 for n in self.n_head_kv_per_layer if n > 0)

    def unsupported_reason(self) -> str | None:
        """Why this model's memory is not one plain KV cache, or None if it is."""
        if self.recurrent:
            return (f"{self.architecture} keeps recurrent state (SSM/RWKV/conv layers) instead of "
                    "or beside a KV cache; only attention-only models have a plain KV cache")
        if self.sliding_window and self.swa_layers is None:
            return (f"{self.architecture} uses sliding-window attention (window {self.sliding_window}) "
                    "with a layer layout scope-edge has not verified (verified: "
                    f"{', '.join(sorted(SWA_PATTERNS))}); llama.cpp gives those layers a separate SWA cache")
        if self.swa_layers is not None and all(self.swa_layers):
            return f"{self.architecture} has no full-attention layer: its sliding-window cache is bounded already"
        return None


def read_geometry(path: str | os.PathLike[str]) -> KvGeometry:
    """KV geometry of a GGUF file; ValueError if the file is not a valid, complete GGUF."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        raise FileNotFoundError(f"GGUF file not found: {resolved}")
    if not resolved.is_file():
        raise ValueError(f"{resolved} is not a file; pass the path of a .gguf model")
    stat = resolved.stat()
    return _read_geometry_cached(str(resolved), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read_geometry_cached(path: str, size: int, mtime_ns: int) -> KvGeometry:
    # Keyed by (path, size, mtime): a rewritten file is read again.
    return geometry_from_metadata(read_metadata(path, size), source=path)


def geometry_from_metadata(metadata: dict[str, Any], source: str = "<metadata>") -> KvGeometry:
    """KV geometry from GGUF key/values (as ``gguf.GGUFReader`` fields' ``contents()``)."""
    arch = str(_required(metadata, "general.architecture", source))
    n_layer = _as_int(_required(metadata, f"{arch}.block_count", source), f"{arch}.block_count", source)
    heads = _per_layer(metadata, f"{arch}.attention.head_count", n_layer, 0, source)
    heads_kv = _per_layer(metadata, f"{arch}.attention.head_count_kv", n_layer, heads, source)
    n_head = max(heads, default=0)
    return KvGeometry(
        architecture=arch,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=max(heads_kv, default=0),
        head_dim_k=_head_dim(metadata, f"{arch}.attention.key_length", arch, n_head, source),
        head_dim_v=_head_dim(metadata, f"{arch}.attention.value_length", arch, n_head, source),
        n_ctx_train=_as_int(_required(metadata, f"{arch}.context_length", source),
                            f"{arch}.context_length", source),
        n_head_kv_per_layer=heads_kv,
        sliding_window=int(metadata.get(f"{arch}.attention.sliding_window") or 0) or None,
        recurrent=_is_recurrent(metadata, arch),
    )


def _required(metadata: dict[str, Any], key: str, source: str) -> Any:
    if key not in metadata:
        raise ValueError(f"{source}: GGUF metadata has no {key!r}; is this a llama.cpp model file?")
    return metadata[key]


def _as_int(value: Any, key: str, source: str) -> int:
    if isinstance(value, (list, str, bytes)) or value is None:
        raise ValueError(f"{source}: {key} should be an integer, got {value!r}")
    return int(value)


def _per_layer(metadata: dict[str, Any], key: str, n_layer: int,
               default: int | tuple[int, ...], source: str) -> tuple[int, ...]:
    """A per-layer count stored either as one integer or as an array of n_layer integers."""
    value = metadata.get(key, default)
    if isinstance(value, tuple):
        return value
    if isinstance(value, list):
        if len(value) != n_layer:
            raise ValueError(f"{source}: {key} has {len(value)} entries for {n_layer} layers")
        return tuple(int(v) for v in value)
    return (_as_int(value, key, source),) * n_layer


def _head_dim(metadata: dict[str, Any], key: str, arch: str, n_head: int, source: str) -> int:
    if key in metadata:
        return _as_int(metadata[key], key, source)
    if n_head == 0:
        return 0
    n_embd = _as_int(_required(metadata, f"{arch}.embedding_length", source),
                     f"{arch}.embedding_length", source)
    if n_embd % n_head:
        raise ValueError(f"{source}: embedding_length {n_embd} is not a multiple of "
                         f"head_count {n_head}, and {key} is missing")
    return n_embd // n_head


def _is_recurrent(metadata: dict[str, Any], arch: str) -> bool:
    if arch in RECURRENT_ARCHITECTURES:
        return True
    return any(key.startswith(f"{arch}.") and part in key
               for key in metadata for part in _RECURRENT_KEY_PARTS)


def kv_type(name: KvType) -> gguf.GGMLQuantizationType:
    """The ggml type of a KV cache type name ("f16", "q8_0", ...) or ggml_type number."""
    if isinstance(name, str) and name.lower() in KV_TYPES:
        return KV_TYPES[name.lower()]
    if isinstance(name, int) and not isinstance(name, bool) and name in KV_TYPES.values():
        return gguf.GGMLQuantizationType(name)
    raise ValueError(f"unsupported KV cache type {name!r}; valid types: {', '.join(KV_TYPES)}")


def bytes_per_cell(geometry: KvGeometry, type_k: KvType = "f16", type_v: KvType = "f16") -> int:
    """Bytes one KV cell takes over all layers, K plus V."""
    k, v = kv_type(type_k), kv_type(type_v)
    _check_blocks(k, geometry.head_dim_k, "type_k", "head_dim_k")
    _check_blocks(v, geometry.head_dim_v, "type_v", "head_dim_v")
    return sum(_row_bytes(k, n * geometry.head_dim_k) + _row_bytes(v, n * geometry.head_dim_v)
               for n in geometry.n_head_kv_per_layer)


def kv_bytes(geometry: KvGeometry, n_cells: int, type_k: KvType = "f16",
             type_v: KvType = "f16") -> int:
    """Bytes llama.cpp allocates for a KV cache of ``n_cells`` cells (see ``padded_cells``)."""
    cells = operator.index(n_cells)
    if cells < 0:
        raise ValueError(f"n_cells must be >= 0, got {cells}")
    return cells * bytes_per_cell(geometry, type_k, type_v)


def parse_bytes(size: int | str) -> int:
    """Bytes in a memory figure: an int, or a str such as "512MiB", "1.5 GiB", "800MB", "64M".
    KiB/MiB/GiB and bare K/M/G are powers of 1024; KB/MB/GB powers of 1000."""
    if isinstance(size, int) and not isinstance(size, bool):
        nbytes = size
    elif isinstance(size, str) and (m := _SIZE.fullmatch(size)) and m.group(2).lower() in _UNITS:
        nbytes = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise ValueError(f"a memory figure is an int of bytes or a str like '512MiB', '1.5GiB', '800MB', "
                         f"got {size!r}")
    if nbytes < 1:
        raise ValueError(f"a memory figure must be at least 1 byte, got {size!r}")
    return nbytes


def swa_cells(n_cells: int, sliding_window: int, *, n_seq: int = 1, n_ubatch: int = 512,
              swa_full: bool = False) -> int:
    """Cells of llama.cpp's sliding-window cache beside a full-attention cache of n_cells: the
    window of each sequence plus a ubatch, padded to 256, at most n_cells (llama_kv_cache_iswa;
    n_cells itself with swa_full, llama.cpp's default)."""
    if swa_full:
        return n_cells
    return min(n_cells, -(-(sliding_window * n_seq + n_ubatch) // KV_CELL_PADDING) * KV_CELL_PADDING)


def kv_bytes_split(geometry: KvGeometry, n_cells: int, type_k: KvType = "f16", type_v: KvType = "f16", *,
                   swa_full: bool = False, n_seq: int = 1, n_ubatch: int = 512) -> tuple[int, int]:
    """(full-attention cache bytes, sliding-window cache bytes) llama.cpp allocates for a
    context of n_cells cells; (kv_bytes, 0) for a model without sliding-window layers."""
    swa = geometry.swa_layers
    if swa is None:
        return kv_bytes(geometry, n_cells, type_k, type_v), 0
    k, v = kv_type(type_k), kv_type(type_v)
    per_layer = [_row_bytes(k, n * geometry.head_dim_k) + _row_bytes(v, n * geometry.head_dim_v)
                 for n in geometry.n_head_kv_per_layer]
    n_swa = swa_cells(n_cells, geometry.sliding_window or 0, n_seq=n_seq, n_ubatch=n_ubatch, swa_full=swa_full)
    full = sum(b for b, is_swa in zip(per_layer, swa) if not is_swa) * n_cells
    return full, sum(b for b, is_swa in zip(per_layer, swa) if is_swa) * n_swa


def padded_cells(n: int) -> int:
    """The number of KV cells llama.cpp allocates for a context of ``n`` tokens."""
    n = operator.index(n)
    if n < 1:
        raise ValueError(f"context size must be >= 1 token, got {n}")
    return -(-n // KV_CELL_PADDING) * KV_CELL_PADDING


def _row_bytes(qtype: gguf.GGMLQuantizationType, n_elements: int) -> int:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return n_elements // block_size * type_size


def _check_blocks(qtype: gguf.GGMLQuantizationType, head_dim: int, arg: str, dim: str) -> None:
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    if head_dim % block_size:
        raise ValueError(
            f"{arg}={qtype.name.lower()} stores blocks of {block_size} elements, which do not "
            f"divide {dim}={head_dim}; llama.cpp refuses this combination: use f16, bf16 or f32"
        )
