"""Tools: OpenAI's tools / tool_choice checked, the grammar a reply that
may call them is held to, and the call read back from the reply's text.

A call is written in the syntax the chat template knows
(scope_edge.runtime.template: Hermes / Qwen's <tool_call>{"name": ...,
"arguments": {...}}</tool_call>), else as the bare JSON object {"name": ...,
"arguments": {...}} with the tools described in a system message
(Tools.system_text). The grammar constrains the reply to a valid call of one
of the given functions (tool_choice "required" or a named function: only a
call; "auto": a call, or text that does not start with whitespace or the
call's first character; "none": no tools offered, plain text).
"""
from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..runtime.grammar import tool_call_grammar
from ..runtime.template import BARE_JSON, CallSyntax
from .shapes import FieldError, ToolCall

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


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
