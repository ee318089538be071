"""OpenAI's wire format: request options, response bodies, their types.

One module for both faces of the package that speak OpenAI: the server
(scope_edge.server, over the batched runtime) and the functions over a
ScopeLlama (scope_edge.openai). It imports no facade and no server, so
either can use it; one concept (the wire format), so it stays one module
past 400 lines.

    Answer(chat=True, model=model, model_name="smollm2", tools=opts.tools)
        .first() / .parts(chunk) / .whole(chunks): the bodies for a generation's chunks

Bodies are dicts shaped like OpenAI's (and llama-cpp-python's), typed below,
with our memory stats under the extra key "scope_edge".

Tools: when the GGUF's own Jinja chat template takes tools and writes calls
in a syntax known here (scope_edge.runtime.template: Hermes / Qwen's
<tool_call>{"name": ..., "arguments": {...}}</tool_call>), every chat is
rendered by that template, with the tools and earlier calls and results as it
expects them, and a call is written in its syntax. Otherwise (llama.cpp's
built-in templates, which render_chat uses, have no tool syntax) the fallback:
the tools are described in a system message (appended to the conversation's
first system message, or a new first one) and a call is the JSON object
{"name": ..., "arguments": {...}}; earlier calls are rendered in that same
JSON, tool results as "tool" turns. Either way a grammar constrains the reply
to a valid call of one of the given functions (tool_choice "required" or a
named function: only a call; "auto": a call, or text that does not start with
whitespace or the call's first character; "none": no tools offered, plain text).
"""
from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

from .runtime.generation import Chunk, GenerationStats
from .runtime.grammar import JSON_OBJECT, json_schema_grammar, tool_call_grammar
from .runtime.model import Model
from .runtime.sampling import TokenLogprobs
from .runtime.template import BARE_JSON, CallSyntax, tool_template

FinishReason = Literal["stop", "length", "tool_calls"]
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class FieldError(ValueError):
    """A request option that cannot be honoured; param names it (the
    server answers 400 with it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(TypedDict):
    content: list[TokenLogprob]


class CompletionLogprobs(TypedDict):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(TypedDict):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
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


class FunctionCall(TypedDict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(TypedDict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ToolCallDelta(ToolCall):
    index: int


class ChatMessage(TypedDict, total=False):
    role: str
    content: str | None
    tool_calls: list[ToolCall]


class ChatChoice(TypedDict):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatDelta(TypedDict, total=False):
    role: str
    content: str
    tool_calls: list[ToolCallDelta]


class ChatChunkChoice(TypedDict):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
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


# -- request options -------------------------------------------------------------
def response_format_grammar(fmt: Any) -> str | None:
    """The grammar for OpenAI's response_format: {"type": "text"} (None),
    {"type": "json_object"} (any JSON object; llama-cpp-python's "schema" key
    is honoured too) or {"type": "json_schema", "json_schema": {"name",
    "schema", "strict", "description"}}."""
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        schema = fmt.get("schema")
        return JSON_OBJECT if schema is None else _schema_grammar(schema, "response_format.schema")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name", ""), str):
            raise FieldError("response_format", "response_format.json_schema must be an object "
                             '{"name": ..., "schema": {...}}')
        schema = spec.get("schema")
        return JSON_OBJECT if schema is None else _schema_grammar(schema, "response_format.json_schema.schema")
    raise FieldError("response_format", 'response_format.type must be "text", "json_object" or "json_schema", '
                     f"got {fmt!r}")


def _schema_grammar(schema: Any, where: str) -> str:
    try:
        return json_schema_grammar(schema)
    except ValueError as why:
        raise FieldError(where.split(".")[0], f"{where}: {why}") from None


@dataclass(frozen=True)
class Tools:
    """The tools offered and how the reply may use them.

    functions: (name, description, parameters JSON schema) of each.
    choice: "auto" (a call or text), "required" (a call), or the one
    function's name that must be called. specs: the tools as the request
    gave them (a chat template renders these). syntax: how a call is written."""

    functions: tuple[tuple[str, str, Mapping[str, Any]], ...]
    choice: str
    specs: tuple[Mapping[str, Any], ...] = ()
    syntax: CallSyntax = BARE_JSON

    def grammar(self) -> str:
        functions = [f for f in self.functions if self.choice in ("auto", "required", f[0])]
        return tool_call_grammar([(name, params) for name, _, params in functions],
                                 allow_text=self.choice == "auto", prefix=self.syntax.prefix,
                                 suffix=self.syntax.suffix)

    def system_text(self) -> str:
        lines = [json.dumps({"name": n, "description": d, "parameters": p}) for n, d, p in self.functions]
        must = ("Reply with only such a JSON object." if self.choice != "auto" else
                "Call one when it helps; otherwise answer in plain text.")
        return ("You can call these functions (JSON schemas of their parameters):\n" + "\n".join(lines) +
                '\nTo call one, reply with only the JSON object {"name": <function name>, "arguments": '
                f"<its arguments>}}. {must}")


def parse_tools(tools: Any, tool_choice: Any, *, syntax: CallSyntax = BARE_JSON) -> Tools | None:
    """OpenAI's tools / tool_choice, checked; None when no tool may be called.
    syntax: how the model writes a call."""
    if tools is None:
        if tool_choice not in (None, "none"):
            raise FieldError("tool_choice", f"tool_choice {tool_choice!r} needs 'tools'")
        return None
    if not isinstance(tools, list) or not tools:
        raise FieldError("tools", "'tools' must be a non-empty list of {\"type\": \"function\", \"function\": ...}")
    functions = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) and tool.get("type") == "function" else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not _NAME.match(fn["name"]):
            raise FieldError("tools", f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": "
                             f"<1-64 of a-z A-Z 0-9 _ ->, ...}}}}, got {tool!r}")
        params = fn.get("parameters") or NO_PARAMETERS
        if not isinstance(params, Mapping) or not isinstance(fn.get("description", ""), str):
            raise FieldError("tools", f"tools[{i}].function: 'parameters' must be a JSON schema object and "
                             "'description' a string")
        functions.append((fn["name"], fn.get("description", ""), params))
    names = [f[0] for f in functions]
    if len(set(names)) != len(names):
        raise FieldError("tools", f"tool names must be unique, got {names}")
    if tool_choice in (None, "auto", "required"):
        choice = tool_choice or "auto"
    elif tool_choice == "none":
        return None
    elif (isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function" and
          isinstance(tool_choice.get("function"), Mapping) and tool_choice["function"].get("name") in names):
        choice = tool_choice["function"]["name"]
    else:
        raise FieldError("tool_choice", 'tool_choice must be "none", "auto", "required" or {"type": "function", '
                         f'"function": {{"name": one of {names}}}}}, got {tool_choice!r}')
    out = Tools(tuple(functions), choice, tuple(tools), syntax)
    try:
        out.grammar()
    except ValueError as why:
        raise FieldError("tools", f"a function's parameters: {why}") from None
    return out


def prompt_messages(messages: Any, tools: Tools | None) -> list[dict[str, str]]:
    """OpenAI chat messages as the {role, content} strings a chat template
    renders: text parts joined, "developer" as "system", an assistant's
    tool calls as the JSON objects the model would write, the tools
    described in the first system message."""
    _check_messages(messages)
    out = [_message(i, m) for i, m in enumerate(messages)]
    if tools is not None:
        if out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{tools.system_text()}"}
        else:
            out.insert(0, {"role": "system", "content": tools.system_text()})
    return out


def template_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI chat messages as a Jinja chat template reads them (as Hugging
    Face's apply_chat_template takes them): text parts joined, "developer" as
    "system", an assistant's tool_calls with their arguments as objects, a
    tool result's tool_call_id (and name, if given)."""
    _check_messages(messages)
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        role, content, calls = _parts(i, m)
        msg: dict[str, Any] = {"role": role, "content": content or ""}
        if calls:
            msg["tool_calls"] = [{"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
                                 for call_id, name, args in calls]
        for key in ("tool_call_id", "name") if role == "tool" else ():
            if isinstance(m.get(key), str):
                msg[key] = m[key]
        out.append(msg)
    return out


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise FieldError("messages", "'messages' must be a non-empty list of {role, content} objects")


def _message(i: int, m: Any) -> dict[str, str]:
    role, content, calls = _parts(i, m)
    text = "\n".join([*([content] if content else []),
                      *(json.dumps({"name": name, "arguments": args}) for _, name, args in calls)])
    return {"role": role, "content": text}


def _parts(i: int, m: Any) -> tuple[str, str | None, list[tuple[str, str, Any]]]:
    """messages[i]'s role ("developer" as "system"), text (None: only
    calls) and tool calls (id, name, arguments as JSON values)."""
    role = m.get("role") if isinstance(m, Mapping) else None
    if role not in ("system", "developer", "user", "assistant", "tool"):
        raise FieldError("messages", f"messages[{i}] must be an object with a role among system, developer, user, "
                         f"assistant, tool, got {m!r}")
    content = m.get("content")
    if isinstance(content, list):  # content parts: only text is understood
        if any(not isinstance(p, Mapping) or p.get("type") != "text" or not isinstance(p.get("text"), str)
               for p in content):
            raise FieldError("messages", f"messages[{i}].content: only text parts are supported")
        content = "".join(p["text"] for p in content)
    calls = [_call(i, c) for c in (m.get("tool_calls") or [] if role == "assistant" else [])]
    if not isinstance(content, str) and not (calls and content is None):
        raise FieldError("messages", f"messages[{i}] needs a string 'content' (or, from the assistant, "
                         f"'tool_calls'), got {m!r}")
    return "system" if role == "developer" else role, content, calls


def _call(i: int, call: Any) -> tuple[str, str, Any]:
    fn = call.get("function") if isinstance(call, Mapping) else None
    try:
        name, args = fn["name"], json.loads(fn.get("arguments") or "{}")
        if not isinstance(name, str):
            raise TypeError(name)
    except (TypeError, KeyError, ValueError, AttributeError):
        raise FieldError("messages", f"messages[{i}].tool_calls: each must be {{\"type\": \"function\", "
                         f"\"function\": {{\"name\", \"arguments\": <JSON text>}}}}, got {call!r}") from None
    call_id = call.get("id")
    return call_id if isinstance(call_id, str) else f"call_{i}", name, args


def parse_tool_call(text: str, tools: Tools) -> ToolCall | None:
    """The tool call text makes, or None if it is not one (plain text, or a
    call cut off by max_tokens)."""
    prefix, suffix = tools.syntax.prefix, tools.syntax.suffix
    if not text.startswith(prefix or "{") or not text.endswith(suffix):
        return None
    try:
        call = json.loads(text[len(prefix):len(text) - len(suffix)])
    except ValueError:
        return None
    if not isinstance(call, dict) or call.get("name") not in {f[0] for f in tools.functions}:
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}))}}


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


@dataclass(frozen=True)
class ChatOptions:
    """A chat request's OpenAI options: the prompt (the messages rendered),
    the grammar (response_format or tools), the tools, and the top logprobs
    asked for (None: no logprobs)."""

    prompt: str
    grammar: str | None
    tools: Tools | None
    top_logprobs: int | None


def chat_options(messages: Any, *, model: Model, response_format: Any = None, tools: Any = None,
                 tool_choice: Any = None, logprobs: Any = False, top_logprobs: Any = None) -> ChatOptions:
    """ChatOptions from OpenAI's request fields, the messages rendered for
    model (the module doc says which template is used); FieldError names a
    bad field, ValueError if the chat template cannot render the messages."""
    template = tool_template(model)
    offered = parse_tools(tools, tool_choice, syntax=template.syntax if template is not None else BARE_JSON)
    grammar = response_format_grammar(response_format)
    if offered is not None and grammar is not None:
        raise FieldError("response_format", "response_format cannot be combined with tools a reply may call "
                         "(tool_choice other than \"none\")")
    if not isinstance(logprobs, bool):
        raise FieldError("logprobs", f"'logprobs' must be a boolean, got {logprobs!r}")
    if top_logprobs is not None:
        if not logprobs:
            raise FieldError("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or not 0 <= top_logprobs <= 20:
            raise FieldError("top_logprobs", f"'top_logprobs' must be an int in [0, 20], got {top_logprobs!r}")
    if template is not None:
        prompt = template.render(template_messages(messages), offered.specs if offered is not None else None)
    else:
        prompt = model.render_chat(prompt_messages(messages, offered))
    return ChatOptions(prompt, grammar if offered is None else offered.grammar(), offered,
                       (top_logprobs or 0) if logprobs else None)


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
        self.base: _Response = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
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
