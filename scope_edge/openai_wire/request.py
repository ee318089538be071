"""A chat request's OpenAI options turned into what the runtime runs: the
prompt (the messages rendered), the grammar (response_format or tools), the
tools and the logprobs asked for.

When the GGUF's own Jinja chat template takes tools and writes calls in a
syntax known here (scope_edge.runtime.template), every chat is rendered by
that template, with the tools and earlier calls and results as it expects
them. Otherwise (llama.cpp's built-in templates, which render_chat uses, have
no tool syntax) the tools are described in a system message (appended to the
conversation's first system message, or a new first one), earlier calls are
rendered as the JSON objects the model would write, tool results as "tool"
turns. scope_edge.openai_wire.tools says how a call is written and held to.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..runtime.grammar import JSON_OBJECT, json_schema_grammar
from ..runtime.model import Model
from ..runtime.template import BARE_JSON, tool_template
from .shapes import FieldError
from .tools import Tools, parse_tools


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
