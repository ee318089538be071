"""GGUF metadata without the tokenizer's: a small reader of the file format
(github.com/ggml-org/ggml/blob/master/docs/gguf.md) that also checks the tensor
data is all there.

scope_edge.memory reads a model's KV geometry with it on every load; it is here
rather than ``gguf.GGUFReader`` because the reader builds numpy views of every
tokenizer string and takes 3-6 s on the 100 MB default model (this one: 0.15
s). tests/test_memory.py checks that both read the same key/values.
"""
from __future__ import annotations

import logging
import math
import mmap
import struct
from typing import Any

import gguf

logger = logging.getLogger(__name__)

_GGUF_HEADER_BYTES = 24  # magic, version, tensor count, metadata count


def read_metadata(path: str, size: int) -> dict[str, Any]:
    """GGUF key/values of a file, without the tokenizer's; checks the tensor data is all there."""
    if size < _GGUF_HEADER_BYTES:
        raise ValueError(f"{path} is {size} bytes, shorter than a GGUF header "
                         f"({_GGUF_HEADER_BYTES} bytes); fetch or copy it again")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            return _parse_gguf(buf)
        except (_Truncated, ValueError, struct.error) as exc:
            raise ValueError(
                f"{path} ({size:,} bytes) is not a valid GGUF file or is truncated ({exc}); "
                "fetch or copy it again"
            ) from exc


_V = gguf.GGUFValueType
_SCALAR_FORMATS: dict[int, str] = {
    _V.UINT8: "B", _V.INT8: "b", _V.UINT16: "H", _V.INT16: "h", _V.UINT32: "I", _V.INT32: "i",
    _V.FLOAT32: "f", _V.BOOL: "?", _V.UINT64: "Q", _V.INT64: "q", _V.FLOAT64: "d",
}


class _Truncated(Exception):
    """The file ends before the structure being read."""


class _Cursor:
    """Reads GGUF values front to back from a buffer."""

    def __init__(self, buf: mmap.mmap | bytes, byte_order: str) -> None:
        self.buf = buf
        self.pos = 0
        self.byte_order = byte_order

    def unpack(self, fmt: str, count: int = 1) -> tuple[Any, ...]:
        end = self.pos + count * struct.calcsize(fmt)
        if end > len(self.buf):
            raise _Truncated(f"reading at byte {self.pos:,} needs {end:,} bytes")
        values = struct.unpack_from(f"{self.byte_order}{count}{fmt}", self.buf, self.pos)
        self.pos = end
        return values

    def scalar(self, fmt: str) -> Any:
        return self.unpack(fmt)[0]

    def skip(self, n_bytes: int) -> None:
        if self.pos + n_bytes > len(self.buf):
            raise _Truncated(f"skipping at byte {self.pos:,} needs {self.pos + n_bytes:,} bytes")
        self.pos += n_bytes

    def string(self) -> str:
        start, length = self.pos + 8, self.scalar("Q")
        self.skip(length)
        return bytes(self.buf[start:start + length]).decode("utf-8")

    def value(self, value_type: int, keep: bool = True) -> Any:
        """The next value of GGUF type ``value_type``; skipped (None) unless ``keep``."""
        if value_type == _V.STRING:
            return self.string() if keep else self.skip(self.scalar("Q"))
        if value_type == _V.ARRAY:
            return self._array(keep)
        if value_type not in _SCALAR_FORMATS:
            raise ValueError(f"unknown GGUF value type {value_type} at byte {self.pos - 4:,}")
        return self.scalar(_SCALAR_FORMATS[value_type])

    def _array(self, keep: bool) -> list[Any] | None:
        item_type, count = self.scalar("I"), self.scalar("Q")
        if count > len(self.buf) - self.pos:
            raise _Truncated(f"array of {count:,} items at byte {self.pos:,}")
        if item_type in _SCALAR_FORMATS:
            fmt = _SCALAR_FORMATS[item_type]
            if not keep:
                return self.skip(count * struct.calcsize(fmt))
            return list(self.unpack(fmt, count))
        items = [self.value(item_type, keep) for _ in range(count)]
        return items if keep else None


def _parse_gguf(buf: mmap.mmap | bytes) -> dict[str, Any]:
    if buf[:4] != b"GGUF":
        raise ValueError(f"it starts with {bytes(buf[:4])!r}, not b'GGUF'")
    # A version with zero low bytes is a file of the other byte order.
    byte_order = ">" if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF == 0 else "<"
    cursor = _Cursor(buf, byte_order)
    cursor.skip(4)
    version = cursor.scalar("I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = cursor.scalar("Q"), cursor.scalar("Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cursor.string()
        keep = not key.startswith("tokenizer.")  # vocabularies: large and not needed here
        value = cursor.value(cursor.scalar("I"), keep)
        if keep:
            metadata[key] = value
    _check_tensor_data(cursor, n_tensors, metadata.get("general.alignment", 32))
    return metadata


def _check_tensor_data(cursor: _Cursor, n_tensors: int, alignment: int) -> None:
    """Raises _Truncated if the file ends before the end of its last tensor."""
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment must be a power of two, got {alignment!r}")
    data_end = 0
    for _ in range(n_tensors):
        cursor.skip(cursor.scalar("Q"))  # name
        dims = cursor.unpack("Q", cursor.scalar("I"))
        type_id, offset = cursor.scalar("I"), cursor.scalar("Q")
        data_end = max(data_end, offset + _tensor_bytes(type_id, dims))
    data_start = -(-cursor.pos // alignment) * alignment
    if data_start + data_end > len(cursor.buf):
        raise _Truncated(f"its tensor data ends at byte {data_start + data_end:,}")


def _tensor_bytes(type_id: int, dims: tuple[int, ...]) -> int:
    try:
        block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        logger.debug("ggml type %d is unknown to gguf %s; not checking its extent", type_id,
                     getattr(gguf, "__version__", "?"))
        return 0
    return math.prod(dims) // block_size * type_size
