"""GBNF grammars for structured output, built with what llama-cpp-python
ships (llama_cpp.llama_grammar: its JSON grammar and its port of llama.cpp's
JSON-schema converter); Sampling(grammar=...) runs them through llama.cpp's
grammar sampler.

    Sampling(grammar=json_schema_grammar({"type": "object", ...}))
"""
from __future__ import annotations

import json
import re
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

_TOOL_CALL, _CALL_JSON, _FREE_TEXT = "scope-edge-call", "scope-edge-call-json", "scope-edge-text"
_ROOT = re.compile(r"^root ::=", re.MULTILINE)


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


def tool_call_grammar(functions: Sequence[tuple[str, Mapping[str, Any]]], *, allow_text: bool,
                      prefix: str = "", suffix: str = "") -> str:
    """GBNF for a call of one of functions ((name, parameters JSON schema)):
    prefix, the JSON object {"name": <name>, "arguments": <object valid
    under its parameters>}, suffix (a model family's markers around a call,
    e.g. "<tool_call>\\n" and "\\n</tool_call>"). allow_text: or else plain
    text, which then must not start with whitespace or the call's first
    character, so the first character tells a call from text."""
    if not functions:
        raise ValueError("a tool-call grammar needs at least one function")
    call = {"oneOf": [{"type": "object", "properties": {"name": {"const": name}, "arguments": params},
                       "required": ["name", "arguments"]} for name, params in functions]}
    gbnf = json_schema_grammar(call)
    if not (allow_text or prefix or suffix):
        return gbnf
    rules = _ROOT.sub(f"{_CALL_JSON} ::=", gbnf, count=1)
    marked = " ".join(part for part in (_literal(prefix), _CALL_JSON, _literal(suffix)) if part)
    root = f"root ::= {_TOOL_CALL}" + (f" | {_FREE_TEXT}" if allow_text else "")
    lead = ord((prefix or "{")[0])  # escaped as \UXXXXXXXX: any character is then safe in a class
    text = f"{_FREE_TEXT} ::= [^\\U{lead:08X} \\t\\r\\n] .*\n" if allow_text else ""
    return f"{root}\n{_TOOL_CALL} ::= {marked}\n{text}{rules}"


def _literal(text: str) -> str:
    """text as a GBNF string literal ("" for none)."""
    return json.dumps(text, ensure_ascii=False) if text else ""
