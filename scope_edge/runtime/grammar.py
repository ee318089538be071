"""GBNF grammars for structured output, built with what llama-cpp-python
ships (llama_cpp.llama_grammar: its JSON grammar and its port of llama.cpp's
JSON-schema converter); Sampling(grammar=...) runs them through llama.cpp's
grammar sampler.

    Sampling(grammar=json_schema_grammar({"type": "object", ...}))
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from llama_cpp import llama_grammar

# Any JSON object (OpenAI's response_format {"type": "json_object"}).
JSON_OBJECT = llama_grammar.JSON_GBNF

# The converter's string character admits raw control characters, which JSON
# forbids inside strings (json.loads refuses them); llama.cpp's own converter
# and JSON_GBNF exclude them, so we do too.
_CHAR = "char ::= " + llama_grammar.PRIMITIVE_RULES["char"].content
_JSON_CHAR = _CHAR.replace(r'[^"\\]', r'[^"\\\x7F\x00-\x1F]', 1)

_TOOL_CALL, _FREE_TEXT = "scope-edge-call", "scope-edge-text"


def json_schema_grammar(schema: Mapping[str, Any]) -> str:
    """GBNF for JSON text valid under schema. The converter enforces types,
    required and listed properties, enums and consts, string lengths and
    patterns, array lengths; it does not enforce numeric bounds (minimum,
    maximum, multipleOf). ValueError if it cannot convert schema."""
    if not isinstance(schema, Mapping):
        raise ValueError(f"a JSON schema must be an object, got {schema!r}")
    try:
        gbnf = llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except (AssertionError, KeyError, TypeError, ValueError, RecursionError) as why:
        raise ValueError(f"cannot turn this JSON schema into a grammar: {why!r}") from None
    return gbnf.replace(_CHAR, _JSON_CHAR)


def tool_call_grammar(functions: Sequence[tuple[str, Mapping[str, Any]]], *, allow_text: bool) -> str:
    """GBNF for a call of one of functions ((name, parameters JSON schema)):
    the JSON object {"name": <name>, "arguments": <object valid under its
    parameters>}. allow_text: or else plain text, which then must not start
    with '{' or whitespace, so the first character tells a call from text."""
    if not functions:
        raise ValueError("a tool-call grammar needs at least one function")
    call = {"oneOf": [{"type": "object", "properties": {"name": {"const": name}, "arguments": params},
                       "required": ["name", "arguments"]} for name, params in functions]}
    gbnf = json_schema_grammar(call)
    if not allow_text:
        return gbnf
    rules = gbnf.replace("root ::=", f"{_TOOL_CALL} ::=", 1)
    return f"root ::= {_TOOL_CALL} | {_FREE_TEXT}\n{_FREE_TEXT} ::= [^{{ \\t\\r\\n] .*\n{rules}"
