"""A GGUF's own Jinja chat template, for conversations with tools.

llama.cpp's built-in templates (Model.render_chat) have no tool syntax. When
the GGUF's template (its tokenizer.chat_template) reads the variable `tools`
and writes calls in a syntax known here (CALL_SYNTAXES), a conversation with
tools is rendered by that template itself, the way llama-cpp-python renders
chat templates (its Jinja2ChatFormatter: jinja2's ImmutableSandboxedEnvironment
with trim_blocks and lstrip_blocks, raise_exception and strftime_now), and the
model's call is constrained to that syntax. Any other template: None, and
scope_edge.openai falls back to describing the tools in a system message.

    template = tool_template(model)          # None: the fallback
    prompt = template.render(messages, tools)
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.ext
import llama_cpp
from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from .model import Model


@dataclass(frozen=True)
class CallSyntax:
    """How a model family writes one tool call: prefix, then the JSON object
    {"name": ..., "arguments": {...}}, then suffix. marker: what a chat
    template that writes calls this way contains."""

    family: str
    marker: str
    prefix: str
    suffix: str


BARE_JSON = CallSyntax("json", "", "", "")  # the fallback's: the JSON object alone
HERMES = CallSyntax("hermes", "<tool_call>", "<tool_call>\n", "\n</tool_call>")  # Hermes 2 Pro, Qwen 2.5 / 3, ...
CALL_SYNTAXES = (HERMES,)


def takes_tools(source: str) -> bool:
    """Whether the Jinja chat template source reads the variable `tools`."""
    # the extensions llama-cpp-python's formatter parses templates with
    env = ImmutableSandboxedEnvironment(extensions=[Jinja2ChatFormatter.IgnoreGenerationTags, jinja2.ext.loopcontrols])
    try:
        tree = env.parse(source)
    except jinja2.TemplateSyntaxError:
        return False
    return "tools" in meta.find_undeclared_variables(tree)


def call_syntax(source: str) -> CallSyntax | None:
    """How the model of this chat template writes a call; None if the
    template takes no tools or writes calls in a syntax not known here."""
    if not takes_tools(source):
        return None
    return next((s for s in CALL_SYNTAXES if s.marker in source), None)


class ToolTemplate:
    """A chat template that renders tools; syntax: how its model calls one.
    bos_token, eos_token: the model's texts for them (templates use them);
    strip_bos: the tokenizer adds BOS itself, so a rendered one is dropped."""

    def __init__(self, source: str, syntax: CallSyntax, *, bos_token: str, eos_token: str, strip_bos: bool) -> None:
        self.source, self.syntax = source, syntax
        self._formatter = Jinja2ChatFormatter(source, eos_token=eos_token, bos_token=bos_token,
                                              add_generation_prompt=True)
        self._bos = bos_token if strip_bos else ""

    def render(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None) -> str:
        """The prompt for messages (as Hugging Face's apply_chat_template
        takes them) and tools (OpenAI's list; None: none offered), the
        assistant's turn opened. ValueError if the template refuses them."""
        try:
            text = self._formatter(messages=list(messages), tools=list(tools) if tools else None).prompt
        # ValueError: the template's raise_exception; the others: a template reading what is not there
        except (jinja2.TemplateError, TypeError, KeyError, ValueError) as why:
            raise ValueError(f"the GGUF's chat template cannot render these messages: {why}") from None
        return text[len(self._bos):] if self._bos and text.startswith(self._bos) else text


def tool_template(model: Model) -> ToolTemplate | None:
    """The model's chat template if it renders tools in a known syntax (its
    "tool_use" template first, tokenizer.chat_template.tool_use, which some
    GGUFs carry beside the default one, as llama-server does); None: no such
    template, or calls in a syntax not known here."""
    if model.closed:
        raise RuntimeError("this ScopeLlama is closed")
    vocab = model.vocab
    bos, eos = (_token_text(vocab, t) for t in (llama_cpp.llama_vocab_bos(vocab), llama_cpp.llama_vocab_eos(vocab)))
    for name in (b"tool_use", None):
        raw = llama_cpp.llama_model_chat_template(model.ptr, name)
        template = _compiled(raw.decode("utf-8", errors="replace"), bos, eos,
                             bool(llama_cpp.llama_vocab_get_add_bos(vocab))) if raw else None
        if template is not None:
            return template
    return None


@functools.lru_cache(maxsize=8)  # parsed once per template, not per request
def _compiled(source: str, bos_token: str, eos_token: str, strip_bos: bool) -> ToolTemplate | None:
    syntax = call_syntax(source)
    if syntax is None:
        return None
    return ToolTemplate(source, syntax, bos_token=bos_token, eos_token=eos_token, strip_bos=strip_bos)


def _token_text(vocab: llama_cpp.llama_vocab_p, token: int) -> str:
    if token < 0:  # LLAMA_TOKEN_NULL: the model has none
        return ""
    return (llama_cpp.llama_vocab_get_text(vocab, token) or b"").decode("utf-8", errors="replace")
