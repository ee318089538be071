"""OpenAI-shaped response bodies for a generation's chunks: Answer builds
every body the server and scope_edge.openai send (whole responses and stream
chunks, with logprobs, tool calls held back until whole, usage and our
"scope_edge" memory stats); the one place they are built.

    Answer(chat=True, model=model, model_name="smollm2", tools=opts.tools)
        .first() / .parts(chunk) / .whole(chunks)
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from ..runtime.generation import Chunk, GenerationStats
from ..runtime.model import Model
from ..runtime.sampling import TokenLogprobs
from .shapes import (ChatChunk, ChatDelta, ChatLogprobs, ChatMessage, ChatResponse, CompletionLogprobs,
                     CompletionResponse, FinishReason, ResponseHead, TokenLogprob, ToolCall, TopLogprob, Usage)
from .tools import Tools, parse_tool_call


# -- logprobs ---------------------------------------------------------------------
def _token_text(model: Model, token: int) -> tuple[str, list[int]]:
    raw = model.piece(token)
    return raw.decode("utf-8", errors="replace"), list(raw)


def logprob_entry(model: Model, lp: TokenLogprobs) -> TokenLogprob:
    """One token of OpenAI's chat logprobs.content."""
    text, raw = _token_text(model, lp.token)
    top: list[TopLogprob] = []
    for token, logprob in lp.top:
        t, b = _token_text(model, token)
        top.append({"token": t, "logprob": logprob, "bytes": b})
    return {"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top}


def completion_logprobs(model: Model, lps: Sequence[TokenLogprobs], offset: int = 0) -> CompletionLogprobs:
    """OpenAI's (legacy) completions logprobs for these tokens; offset: of
    the first one in the completion's text."""
    out: CompletionLogprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in lps:
        text = _token_text(model, lp.token)[0]
        out["tokens"].append(text)
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append({_token_text(model, t)[0]: v for t, v in lp.top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


# -- replies ----------------------------------------------------------------------
class ChatReply:
    """A chat generation's chunks as OpenAI's deltas and message. Text
    streams as it comes; a tool call (known from its first character) is
    held back and handed over whole, as one tool_calls delta, at the end."""

    def __init__(self, model: Model, tools: Tools | None, *, logprobs: bool) -> None:
        self.model, self.tools, self.logprobs = model, tools, logprobs
        self.text = ""
        self.entries: list[TokenLogprob] = []
        self.call: ToolCall | None = None
        self._sent, self._sent_entries = 0, 0

    def _is_call(self) -> bool | None:
        """Whether the reply is a call; None while it cannot tell yet."""
        if self.tools is None:
            return False
        if self.tools.choice != "auto":
            return True
        return self.text.startswith((self.tools.syntax.prefix or "{")[0]) if self.text else None

    def push(self, chunk: Chunk) -> tuple[ChatDelta, ChatLogprobs | None, FinishReason | None] | None:
        """The delta, logprobs and finish reason to send for chunk; None
        while it is held back (a call, or not known yet)."""
        self.text += chunk.text
        if self.logprobs and chunk.logprobs is not None:
            self.entries.append(logprob_entry(self.model, chunk.logprobs))
        reason: FinishReason | None = chunk.finish_reason
        delta: ChatDelta = {}
        if reason is not None and self.tools is not None and reason == "stop":
            self.call = parse_tool_call(self.text, self.tools)
        if self.call is not None:
            delta, reason = {"tool_calls": [{"index": 0, **self.call}]}, "tool_calls"
        elif reason is not None or self._is_call() is False:
            if len(self.text) > self._sent:
                delta = {"content": self.text[self._sent:]}
        else:
            return None
        self._sent = len(self.text)
        entries, self._sent_entries = self.entries[self._sent_entries:], len(self.entries)
        return delta, ({"content": entries} if self.logprobs else None), reason

    def message(self) -> ChatMessage:
        """The whole reply, once every chunk was pushed."""
        if self.call is not None:
            return {"role": "assistant", "content": None, "tool_calls": [self.call]}
        return {"role": "assistant", "content": self.text}

    def all_logprobs(self) -> ChatLogprobs | None:
        return {"content": self.entries} if self.logprobs else None


# -- response bodies -------------------------------------------------------------
def usage(stats: GenerationStats) -> Usage:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens}


class Answer:
    """OpenAI-shaped bodies for one generation's chunks: whole() for a
    response, first() and parts() for a stream (stateful: a chat reply may
    hold back a tool call until its end).

    chat: chat.completion bodies, else text_completion. model_name: the
    "model" field. tools: what a chat reply may call. logprobs: the top
    alternatives asked for (None: no logprobs). include_usage:
    stream_options.include_usage (None: not given; the last chunk then
    carries the usage itself). extra_stats: added to the "scope_edge" stats
    (the server's slot)."""

    def __init__(self, *, chat: bool, model: Model, model_name: str, tools: Tools | None = None,
                 logprobs: int | None = None, include_usage: bool | None = None,
                 extra_stats: Mapping[str, int] | None = None) -> None:
        self.chat, self.model, self.logprobs, self.include_usage = chat, model, logprobs, include_usage
        self.extra_stats = dict(extra_stats or {})
        self.base: ResponseHead = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                                "created": int(time.time()), "model": model_name}
        self.reply = ChatReply(model, tools, logprobs=logprobs is not None) if chat else None
        self._offset = 0  # of the next completion token in the text (logprobs' text_offset)

    def _stats(self, stats: GenerationStats) -> dict[str, float | int]:
        return {**stats.as_dict(), **self.extra_stats}

    def whole(self, chunks: Sequence[Chunk]) -> ChatResponse | CompletionResponse:
        """The response to a generation that ended with chunks[-1]."""
        last = chunks[-1]
        assert last.stats is not None  # the last chunk carries them
        extra = {"usage": usage(last.stats), "scope_edge": self._stats(last.stats)}
        if self.reply is not None:
            reason = None
            for chunk in chunks:
                pushed = self.reply.push(chunk)
                reason = pushed[2] if pushed is not None else None
            return {**self.base, "object": "chat.completion", **extra, "choices": [
                {"index": 0, "message": self.reply.message(), "logprobs": self.reply.all_logprobs(),
                 "finish_reason": reason}]}
        lps = None if self.logprobs is None else completion_logprobs(
            self.model, [c.logprobs for c in chunks if c.logprobs is not None])
        return {**self.base, "object": "text_completion", **extra, "choices": [
            {"text": "".join(c.text for c in chunks), "index": 0, "logprobs": lps,
             "finish_reason": last.finish_reason}]}

    def first(self) -> ChatChunk | None:
        """A chat stream's opening chunk (the assistant's role); None for completions."""
        if self.reply is None:
            return None
        return {**self.base, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}]}

    def parts(self, chunk: Chunk) -> list[ChatChunk | CompletionResponse]:
        """The bodies to stream for chunk (none while a tool call is held
        back; with include_usage, a last one carrying only the usage)."""
        out: Any
        if self.reply is not None:
            pushed = self.reply.push(chunk)
            if pushed is None:
                return []  # held back: a tool call is sent whole at its end
            delta, logprobs, reason = pushed
            out = {**self.base, "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}
        else:
            lps = None if self.logprobs is None else completion_logprobs(
                self.model, [chunk.logprobs] if chunk.logprobs is not None else [], self._offset)
            self._offset += len(chunk.text)
            out = {**self.base, "object": "text_completion", "choices": [
                {"text": chunk.text, "index": 0, "logprobs": lps, "finish_reason": chunk.finish_reason}]}
        if chunk.stats is None:
            return [out]
        used, stats = usage(chunk.stats), self._stats(chunk.stats)
        if self.include_usage:  # OpenAI's shape: a last chunk with no choices carries the usage
            return [out, {**self.base, "object": out["object"], "choices": [], "usage": used, "scope_edge": stats}]
        out["scope_edge"] = stats
        if self.include_usage is None:
            out["usage"] = used
        return [out]
