"""OpenAI- and llama-cpp-python-shaped completions over a ScopeLlama.

    from scope_edge import ScopeLlama
    from scope_edge.openai import create_chat_completion
    reply = create_chat_completion(llm, [{"role": "user", "content": "Hi"}], max_tokens=64)
    person = create_chat_completion(llm, messages, response_format={"type": "json_schema", "json_schema":
                                    {"name": "person", "schema": {...}}})

Responses are dicts shaped like llama-cpp-python's (and so OpenAI's), built
by scope_edge.openai_wire (which the server shares; its docstring says how
tools are offered), with our memory stats under the extra key "scope_edge".
Both calls continue the cache like llama-cpp-python: a prompt (or
conversation) that extends the previous call's prompt and output prefills
only the new tokens.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .llama import ScopeLlama
from .openai_wire import (Answer, ChatChunk, ChatOptions, ChatReply, ChatResponse, CompletionResponse, FieldError,
                          Tools, Usage, chat_options, completion_logprobs, logprob_entry, parse_tool_call,
                          parse_tools, prompt_messages, response_format_grammar)
from .runtime.generation import Chunk
from .runtime.sampling import Sampling

# The wire format's names, importable from here as before.
__all__ = ["create_completion", "create_chat_completion", "Answer", "ChatChunk", "ChatOptions", "ChatReply",
           "ChatResponse", "CompletionResponse", "FieldError", "Tools", "Usage", "chat_options",
           "completion_logprobs", "logprob_entry", "parse_tool_call", "parse_tools", "prompt_messages",
           "response_format_grammar"]


def create_completion(
    llm: ScopeLlama, prompt: str | Sequence[int], *, max_tokens: int = 256, temperature: float = 0.0,
    top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repeat_penalty: float = 1.0,
    presence_penalty: float = 0.0, frequency_penalty: float = 0.0, seed: int = 0,
    stop: str | Sequence[str] | None = None, stream: bool = False, logprobs: int | None = None,
    grammar: str | None = None,
) -> CompletionResponse | Iterator[CompletionResponse]:
    """A text completion (greedy by default), streamed as chunks if stream.
    logprobs: the chosen token's log-probability and this many alternatives
    (0-5, OpenAI's legacy shape). grammar: GBNF the text must match."""
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                 or not 0 <= logprobs <= 5):
        raise FieldError("logprobs", f"logprobs must be None or an int in [0, 5], got {logprobs!r}")
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, seed=seed,
                        logprobs=logprobs, grammar=grammar)
    chunks = llm.stream(prompt, max_tokens=max_tokens, stop=stop, sampling=sampling, resume=True)
    answer = Answer(chat=False, model=llm.model, model_name=llm.model_path, logprobs=logprobs)
    return _streamed(answer, chunks) if stream else answer.whole(list(chunks))


def create_chat_completion(
    llm: ScopeLlama, messages: Sequence[Mapping[str, Any]], *, max_tokens: int = 256, temperature: float = 0.0,
    top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repeat_penalty: float = 1.0,
    presence_penalty: float = 0.0, frequency_penalty: float = 0.0, seed: int = 0,
    stop: str | Sequence[str] | None = None, stream: bool = False, response_format: Mapping[str, Any] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None, tool_choice: str | Mapping[str, Any] | None = None,
    logprobs: bool = False, top_logprobs: int | None = None,
) -> ChatResponse | Iterator[ChatChunk]:
    """A chat completion through the GGUF's chat template (continued on the
    cache as ScopeLlama.chat is), streamed as chunks if stream.
    response_format, tools, tool_choice, logprobs, top_logprobs: as OpenAI's
    (scope_edge.openai_wire says how tools are offered); FieldError names a bad one."""
    opts = chat_options(list(messages), model=llm.model, response_format=response_format,
                        tools=list(tools) if tools else None, tool_choice=tool_choice, logprobs=logprobs,
                        top_logprobs=top_logprobs)
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, seed=seed,
                        grammar=opts.grammar, logprobs=opts.top_logprobs)
    chunks = llm.stream(opts.prompt, max_tokens=max_tokens, stop=stop, sampling=sampling, resume=True)
    answer = Answer(chat=True, model=llm.model, model_name=llm.model_path, tools=opts.tools,
                    logprobs=opts.top_logprobs)
    return _streamed(answer, chunks) if stream else answer.whole(list(chunks))


def _streamed(answer: Answer, chunks: Iterator[Chunk]) -> Iterator[Any]:
    first = answer.first()
    if first is not None:
        yield first
    for chunk in chunks:
        yield from answer.parts(chunk)
