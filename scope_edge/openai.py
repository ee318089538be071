"""OpenAI- and llama-cpp-python-shaped completions over a ScopeLlama.

    from scope_edge import ScopeLlama
    from scope_edge.openai import create_chat_completion
    reply = create_chat_completion(llm, [{"role": "user", "content": "Hi"}], max_tokens=64)

Responses are dicts shaped like llama-cpp-python's (and so OpenAI's), typed
below, with our memory stats under the extra key "scope_edge". Both calls
continue the cache like llama-cpp-python: a prompt (or conversation) that
extends the previous call's prompt and output prefills only the new tokens.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal, TypedDict

from .llama import Chunk, FinishReason, ScopeLlama
from .runtime.sampling import Sampling


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(TypedDict):
    text: str
    index: int
    logprobs: None
    finish_reason: FinishReason | None


class _Response(TypedDict):
    id: str
    created: int
    model: str


class CompletionResponse(_Response, total=False):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]
    usage: Usage
    scope_edge: dict[str, float | int]


class ChatMessage(TypedDict):
    role: str
    content: str


class ChatChoice(TypedDict):
    index: int
    message: ChatMessage
    logprobs: None
    finish_reason: FinishReason | None


class ChatDelta(TypedDict, total=False):
    role: str
    content: str


class ChatChunkChoice(TypedDict):
    index: int
    delta: ChatDelta
    logprobs: None
    finish_reason: FinishReason | None


class ChatResponse(_Response, total=False):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage
    scope_edge: dict[str, float | int]


class ChatChunk(_Response, total=False):
    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]
    usage: Usage
    scope_edge: dict[str, float | int]


def create_completion(
    llm: ScopeLlama, prompt: str | Sequence[int], *, max_tokens: int = 256, temperature: float = 0.0,
    top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repeat_penalty: float = 1.0,
    presence_penalty: float = 0.0, frequency_penalty: float = 0.0, seed: int = 0,
    stop: str | Sequence[str] | None = None, stream: bool = False,
) -> CompletionResponse | Iterator[CompletionResponse]:
    """A text completion (greedy by default), streamed as chunks if stream."""
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, seed=seed)
    chunks = llm.stream(prompt, max_tokens=max_tokens, stop=stop, sampling=sampling, resume=True)
    return _completion_stream(llm, chunks) if stream else _completion(llm, chunks)


def create_chat_completion(
    llm: ScopeLlama, messages: Sequence[Mapping[str, str]], *, max_tokens: int = 256, temperature: float = 0.0,
    top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repeat_penalty: float = 1.0,
    presence_penalty: float = 0.0, frequency_penalty: float = 0.0, seed: int = 0,
    stop: str | Sequence[str] | None = None, stream: bool = False,
) -> ChatResponse | Iterator[ChatChunk]:
    """A chat completion through the GGUF's chat template (ScopeLlama.chat
    says how turns reuse the cache), streamed as chunks if stream."""
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, seed=seed)
    chunks = llm.chat(messages, max_tokens=max_tokens, stop=stop, sampling=sampling)
    return _chat_stream(llm, chunks) if stream else _chat(llm, chunks)


def _usage(chunk: Chunk) -> Usage:
    st = chunk.stats
    assert st is not None  # only the last chunk is asked
    return {"prompt_tokens": st.prompt_tokens, "completion_tokens": st.generated_tokens,
            "total_tokens": st.prompt_tokens + st.generated_tokens}


def _ids(kind: str, llm: ScopeLlama) -> _Response:
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": llm.model_path}


def _drain(chunks: Iterator[Chunk]) -> tuple[str, Chunk]:
    parts, last = [], None
    for last in chunks:
        parts.append(last.text)
    assert last is not None and last.stats is not None  # a stream always ends with a final chunk
    return "".join(parts), last


def _completion(llm: ScopeLlama, chunks: Iterator[Chunk]) -> CompletionResponse:
    text, last = _drain(chunks)
    return {**_ids("text_completion", llm), "object": "text_completion",
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": last.finish_reason}],
            "usage": _usage(last), "scope_edge": last.stats.as_dict()}


def _completion_stream(llm: ScopeLlama, chunks: Iterator[Chunk]) -> Iterator[CompletionResponse]:
    base = _ids("text_completion", llm)
    for ch in chunks:
        out: CompletionResponse = {**base, "object": "text_completion", "choices": [
            {"text": ch.text, "index": 0, "logprobs": None, "finish_reason": ch.finish_reason}]}
        if ch.stats is not None:
            out["usage"], out["scope_edge"] = _usage(ch), ch.stats.as_dict()
        yield out


def _chat(llm: ScopeLlama, chunks: Iterator[Chunk]) -> ChatResponse:
    text, last = _drain(chunks)
    return {**_ids("chat.completion", llm), "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": last.finish_reason}],
            "usage": _usage(last), "scope_edge": last.stats.as_dict()}


def _chat_stream(llm: ScopeLlama, chunks: Iterator[Chunk]) -> Iterator[ChatChunk]:
    base = _ids("chat.completion.chunk", llm)
    yield {**base, "object": "chat.completion.chunk",
           "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}]}
    for ch in chunks:
        delta: ChatDelta = {"content": ch.text} if ch.text else {}
        out: ChatChunk = {**base, "object": "chat.completion.chunk",
                          "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": ch.finish_reason}]}
        if ch.stats is not None:
            out["usage"], out["scope_edge"] = _usage(ch), ch.stats.as_dict()
        yield out
