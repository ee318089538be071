"""OpenAI- and llama-cpp-python-shaped completions over ScopeLlama.

Responses are plain dicts shaped like llama-cpp-python's (and so OpenAI's),
with our memory stats under the extra key "scope_edge".
"""
from __future__ import annotations

import ctypes
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import llama_cpp

if TYPE_CHECKING:
    from .llama import Chunk, ScopeLlama

_ROLES = ("system", "user", "assistant", "tool")


def render_chat(model: llama_cpp.llama_model_p, messages: Sequence[Mapping[str, str]]) -> str:
    """The prompt text for messages, through the GGUF's own chat template,
    ending with the assistant's turn opened."""
    if not messages:
        raise ValueError("messages is empty; pass at least one {'role': 'user', 'content': ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise ValueError(
                f"messages[{i}] must be a dict with role in {_ROLES} and str content, got {m!r}"
            )
    tmpl = llama_cpp.llama_model_chat_template(model, None)
    if not tmpl:
        raise ValueError("this GGUF has no chat template; use create_completion with a plain prompt")
    keep = [(m["role"].encode(), m["content"].encode()) for m in messages]  # alive while C reads them
    chat = (llama_cpp.llama_chat_message * len(keep))(*[llama_cpp.llama_chat_message(r, c) for r, c in keep])
    size = 2 * sum(len(r) + len(c) for r, c in keep) + 256
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_chat_apply_template(tmpl, chat, len(keep), True, buf, size)
        if n < 0:
            raise ValueError("llama.cpp does not recognise this GGUF's chat template")
        if n <= size:
            return buf.raw[:n].decode("utf-8", errors="replace")
        size = n
    raise RuntimeError("chat template output kept growing")  # unreachable: the second size fits


def _usage(stats: Any) -> dict[str, int]:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generated_tokens,
        "total_tokens": stats.prompt_tokens + stats.generated_tokens,
    }


def _base(kind: str, model: str) -> dict[str, Any]:
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model}


def completion_response(llm: ScopeLlama, chunks: Iterator[Chunk]) -> dict[str, Any]:
    parts, last = [], None
    for last in chunks:
        parts.append(last.text)
    assert last is not None and last.stats is not None
    out = _base("text_completion", llm.model_path)
    out["choices"] = [{"text": "".join(parts), "index": 0, "logprobs": None, "finish_reason": last.finish_reason}]
    out["usage"] = _usage(last.stats)
    out["scope_edge"] = last.stats.as_dict()
    return out


def completion_stream(llm: ScopeLlama, chunks: Iterator[Chunk]) -> Iterator[dict[str, Any]]:
    base = _base("text_completion", llm.model_path)
    for ch in chunks:
        out = dict(base)
        out["choices"] = [{"text": ch.text, "index": 0, "logprobs": None, "finish_reason": ch.finish_reason}]
        if ch.stats is not None:
            out["usage"] = _usage(ch.stats)
            out["scope_edge"] = ch.stats.as_dict()
        yield out


def chat_response(llm: ScopeLlama, chunks: Iterator[Chunk]) -> dict[str, Any]:
    parts, last = [], None
    for last in chunks:
        parts.append(last.text)
    assert last is not None and last.stats is not None
    out = _base("chat.completion", llm.model_path)
    out["choices"] = [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "".join(parts)},
            "logprobs": None,
            "finish_reason": last.finish_reason,
        }
    ]
    out["usage"] = _usage(last.stats)
    out["scope_edge"] = last.stats.as_dict()
    return out


def chat_stream(llm: ScopeLlama, chunks: Iterator[Chunk]) -> Iterator[dict[str, Any]]:
    base = _base("chat.completion.chunk", llm.model_path)
    yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}]}
    for ch in chunks:
        delta = {"content": ch.text} if ch.text else {}
        out = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": ch.finish_reason}]}
        if ch.stats is not None:
            out["usage"] = _usage(ch.stats)
            out["scope_edge"] = ch.stats.as_dict()
        yield out
