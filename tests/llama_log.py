"""llama.cpp's own log, captured for tests that check what llama.cpp says it did."""
from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager

import llama_cpp


@contextmanager
def llama_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log lines inside the block, then put back whatever
    callback was installed before (llama_log_get / llama_log_set)."""
    lines: list[str] = []
    previous, user_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(user_data))

    @llama_cpp.llama_log_callback
    def collect(level, text, data):
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, None)
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(previous, user_data)
