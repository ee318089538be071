"""OpenAI- and llama-cpp-python-shaped completions over a ScopeLlama, and the
OpenAI request options the server shares: response_format, tools and
tool_choice, logprobs.

    from scope_edge import ScopeLlama
    from scope_edge.openai import create_chat_completion
    reply = create_chat_completion(llm, [{"role": "user", "content": "Hi"}], max_tokens=64)
    person = create_chat_completion(llm, messages, response_format={"type": "json_schema", "json_schema":
                                    {"name": "person", "schema": {...}}})

Responses are dicts shaped like llama-cpp-python's (and so OpenAI's), typed
below, with our memory stats under the extra key "scope_edge". Both calls
continue the cache like llama-cpp-python: a prompt (or conversation) that
extends the previous call's prompt and output prefills only the new tokens.

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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

from .llama import Chunk, ScopeLlama
from .runtime.grammar import JSON_OBJECT, json_schema_grammar, tool_call_grammar
from .runtime.model import Model
from .runtime.sampling import TokenLogprobs, Sampling
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


# -- over a ScopeLlama ----------------------------------------------------------------
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
    return _completion_stream(llm, chunks, logprobs) if stream else _completion(llm, chunks, logprobs)


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
    (the module doc says how tools are offered); FieldError names a bad one."""
    opts = chat_options(list(messages), model=llm.model, response_format=response_format,
                        tools=list(tools) if tools else None,
                        tool_choice=tool_choice, logprobs=logprobs, top_logprobs=top_logprobs)
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, seed=seed,
                        grammar=opts.grammar, logprobs=opts.top_logprobs)
    chunks = llm.stream(opts.prompt, max_tokens=max_tokens, stop=stop, sampling=sampling, resume=True)
    reply = ChatReply(llm.model, opts.tools, logprobs=opts.top_logprobs is not None)
    return _chat_stream(llm, chunks, reply) if stream else _chat(llm, chunks, reply)


def _usage(chunk: Chunk) -> Usage:
    st = chunk.stats
    assert st is not None  # only the last chunk is asked
    return {"prompt_tokens": st.prompt_tokens, "completion_tokens": st.generated_tokens,
            "total_tokens": st.prompt_tokens + st.generated_tokens}


def _ids(kind: str, llm: ScopeLlama) -> _Response:
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": llm.model_path}


def _completion(llm: ScopeLlama, chunks: Iterator[Chunk], logprobs: int | None) -> CompletionResponse:
    all_chunks = list(chunks)
    last = all_chunks[-1]
    assert last.stats is not None  # a stream always ends with a final chunk
    lps = [c.logprobs for c in all_chunks if c.logprobs is not None]
    return {**_ids("text_completion", llm), "object": "text_completion",
            "choices": [{"text": "".join(c.text for c in all_chunks), "index": 0,
                         "logprobs": None if logprobs is None else completion_logprobs(llm.model, lps),
                         "finish_reason": last.finish_reason}],
            "usage": _usage(last), "scope_edge": last.stats.as_dict()}


def _completion_stream(llm: ScopeLlama, chunks: Iterator[Chunk], logprobs: int | None
                       ) -> Iterator[CompletionResponse]:
    base = _ids("text_completion", llm)
    offset = 0
    for ch in chunks:
        lps = None if logprobs is None else completion_logprobs(
            llm.model, [ch.logprobs] if ch.logprobs is not None else [], offset)
        offset += len(ch.text)
        out: CompletionResponse = {**base, "object": "text_completion", "choices": [
            {"text": ch.text, "index": 0, "logprobs": lps, "finish_reason": ch.finish_reason}]}
        if ch.stats is not None:
            out["usage"], out["scope_edge"] = _usage(ch), ch.stats.as_dict()
        yield out


def _chat(llm: ScopeLlama, chunks: Iterator[Chunk], reply: ChatReply) -> ChatResponse:
    reason: FinishReason | None = None
    for last in chunks:
        pushed = reply.push(last)
        reason = pushed[2] if pushed is not None else None
    assert last.stats is not None  # a stream always ends with a final chunk
    return {**_ids("chat.completion", llm), "object": "chat.completion",
            "choices": [{"index": 0, "message": reply.message(), "logprobs": reply.all_logprobs(),
                         "finish_reason": reason}],
            "usage": _usage(last), "scope_edge": last.stats.as_dict()}


def _chat_stream(llm: ScopeLlama, chunks: Iterator[Chunk], reply: ChatReply) -> Iterator[ChatChunk]:
    base = _ids("chat.completion.chunk", llm)
    yield {**base, "object": "chat.completion.chunk",
           "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}]}
    for ch in chunks:
        pushed = reply.push(ch)
        if pushed is None:
            continue
        delta, logprobs, reason = pushed
        out: ChatChunk = {**base, "object": "chat.completion.chunk",
                          "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}
        if ch.stats is not None:
            out["usage"], out["scope_edge"] = _usage(ch), ch.stats.as_dict()
        yield out
