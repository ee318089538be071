"""Tool calls through a GGUF's own chat template: a copy of the default model
(written here with gguf's reader and writer, every tensor and key kept) whose
tokenizer.chat_template is a Hermes / Qwen 2.5-style template that takes
tools. The prompt is that template rendered directly through jinja2; the
call is constrained to its <tool_call> syntax, in process and through a real
`scope-edge serve` with the openai client; a template without tools keeps
the fallback (tests/test_structured.py tests that one's calls)."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import gguf
import jsonschema
import numpy as np
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from scope_edge import ScopeLlama
from scope_edge.openai import chat_options, create_chat_completion, parse_tools, prompt_messages
from scope_edge.runtime.grammar import tool_call_grammar
from scope_edge.runtime.model import Model
from scope_edge.runtime.template import HERMES, ToolTemplate, call_syntax, takes_tools, tool_template
from served import Served, start_server

T = 1  # one OpenMP thread: a shared 2-core machine
# A Hermes / Qwen 2.5-style template (ChatML turns; tools listed in the system
# turn; calls inside <tool_call></tool_call>; results as <tool_response> in a
# user turn), written for this test.
HERMES_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- '# Tools\\n\\nYou can call the functions whose signatures are inside <tools></tools>:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nTo call one, answer with its name and arguments as a JSON object inside '
        '<tool_call></tool_call> tags:\\n<tool_call>\\n{"name": <function name>, "arguments": '
        '<arguments object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
    {%- elif message.role in ['user', 'system'] or (message.role == 'assistant' and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for call in message.tool_calls %}
            {%- if call.function is defined %}
                {%- set call = call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' + call.name + '", "arguments": ' }}
            {{- call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 16}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "description": "The sum of two integers",
                                        "parameters": {"type": "object", "properties": {
                                            "a": {"type": "integer"}, "b": {"type": "integer"}},
                                            "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "system", "content": "You are a weather bot."},
       {"role": "user", "content": "What is the weather in Lisbon?"}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lisbon"}'}}
LATER = [*ASK, {"role": "assistant", "content": None, "tool_calls": [CALL]},
         {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"}]


def copy_gguf(src: str, dst: Path, strings: dict[str, str]) -> str:
    """A copy of the GGUF src with these string keys set (replaced or added),
    every other key and every tensor as they are (as gguf-py's
    gguf_new_metadata writes one)."""
    reader = gguf.GGUFReader(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(str(dst), arch=arch, endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF.") or field.name in strings:
            continue  # the writer writes the first ones itself
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for key, value in strings.items():
        writer.add_key_value(key, value, gguf.GGUFValueType.STRING)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    return str(dst)


@pytest.fixture(scope="session")
def tool_model_path(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The default model with HERMES_TEMPLATE as its chat template."""
    return copy_gguf(model_path, tmp_path_factory.mktemp("tools") / "SmolLM2-135M-Instruct.Q4_1.hermes-tools.gguf",
                     {gguf.Keys.Tokenizer.CHAT_TEMPLATE: HERMES_TEMPLATE})


@pytest.fixture(scope="module")
def tool_vocab(tool_model_path: str) -> Iterator[Model]:
    model = Model(tool_model_path, vocab_only=True)
    yield model
    model.close()


def _hf_tojson(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)  # transformers' tojson: keys in order, no HTML escaping


def direct(messages: list[dict], tools: list[dict] | None) -> str:
    """HERMES_TEMPLATE rendered straight through jinja2 (as transformers'
    apply_chat_template does), the calls' arguments as objects."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _hf_tojson
    hf = [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages]
    return env.from_string(HERMES_TEMPLATE).render(messages=hf, tools=tools, add_generation_prompt=True)


def _raw(field: gguf.ReaderField) -> bytes:
    """A key/value's bytes as stored (type, length and value)."""
    return b"".join(part.tobytes() for part in field.parts)


def test_the_copy_differs_from_the_default_model_only_in_its_chat_template(model_path, tool_model_path):
    old, new = gguf.GGUFReader(model_path), gguf.GGUFReader(tool_model_path)
    key = gguf.Keys.Tokenizer.CHAT_TEMPLATE
    assert new.get_field(key).contents() == HERMES_TEMPLATE != old.get_field(key).contents()
    assert set(old.fields) == set(new.fields)
    for name, field in old.fields.items():
        if name != key and not name.startswith("GGUF."):
            assert _raw(new.fields[name]) == _raw(field), name
    assert [t.name for t in old.tensors] == [t.name for t in new.tensors]
    for a, b in zip(old.tensors, new.tensors):
        assert a.tensor_type == b.tensor_type and np.array_equal(a.data, b.data), a.name


def test_which_templates_render_tools(model_path, tool_vocab):
    assert takes_tools(HERMES_TEMPLATE) and call_syntax(HERMES_TEMPLATE) is HERMES
    # takes tools, but writes calls in a syntax not known here (Llama 3.1's bare JSON): the fallback
    llama31 = ("{% for m in messages %}{{ m.content }}{% endfor %}{% if tools %}Respond with "
               '{"name": function name, "parameters": ...}{% for t in tools %}{{ t | tojson }}{% endfor %}{% endif %}')
    assert takes_tools(llama31) and call_syntax(llama31) is None
    assert not takes_tools("{% for m in messages %}{{ m.content }} tools {% endfor %}")  # the word is not the variable
    assert tool_template(tool_vocab).syntax is HERMES
    with Model(model_path, vocab_only=True) as smol:  # SmolLM2's own template takes no tools
        assert tool_template(smol) is None


def test_a_tool_use_template_beside_the_default_one_is_used(model_path, tmp_path):
    path = copy_gguf(model_path, tmp_path / "tool-use.gguf", {"tokenizer.chat_template.tool_use": HERMES_TEMPLATE})
    with Model(path, vocab_only=True) as model:
        template = tool_template(model)
        assert template is not None and template.source == HERMES_TEMPLATE
        assert chat_options(LATER, model=model, tools=TOOLS).prompt == direct(LATER, TOOLS)


def test_a_rendered_bos_is_dropped_when_the_tokenizer_adds_it_and_template_errors_are_value_errors():
    source = "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}{% if tools %}<tool_call>{% endif %}"
    hi = [{"role": "user", "content": "hi"}]
    for strip_bos, want in [(True, "hi"), (False, "<s>hi")]:
        t = ToolTemplate(source, HERMES, bos_token="<s>", eos_token="</s>", strip_bos=strip_bos)
        assert t.render(hi, None) == want
    refuses = ToolTemplate("{{ raise_exception('roles must alternate') }}{{ tools }}<tool_call>", HERMES,
                           bos_token="", eos_token="", strip_bos=False)
    with pytest.raises(ValueError, match="roles must alternate"):
        refuses.render(hi, [WEATHER])


def test_the_prompt_is_the_template_rendered_with_the_tools_calls_and_results(tool_vocab):
    opts = chat_options(LATER, model=tool_vocab, tools=TOOLS, tool_choice="auto")
    assert opts.prompt == direct(LATER, TOOLS)
    for tool in TOOLS:  # each tool as the template lists it
        assert f"\n{json.dumps(tool)}\n" in opts.prompt
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lisbon"}}\n'
            "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\nsunny, 24 C\n</tool_response><|im_end|>\n"
            ) in opts.prompt
    assert opts.prompt.endswith("<|im_start|>assistant\n") and "You can call these functions" not in opts.prompt
    assert opts.tools.syntax is HERMES and opts.grammar == tool_call_grammar(
        [(n, p) for n, p in SCHEMAS.items()], allow_text=True, prefix="<tool_call>\n", suffix="\n</tool_call>")
    # "none": no tools offered, the history still rendered by the template; no grammar
    none = chat_options(LATER, model=tool_vocab, tools=TOOLS, tool_choice="none")
    assert none.prompt == direct(LATER, None) and "<tools>" not in none.prompt and none.grammar is None
    plain = chat_options([{"role": "user", "content": "Hi"}], model=tool_vocab)
    assert plain.prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_a_template_without_tools_keeps_the_fallback(model_path):
    with Model(model_path, vocab_only=True) as smol:
        opts = chat_options(LATER, model=smol, tools=TOOLS, tool_choice="required")
        assert opts.prompt == smol.render_chat(prompt_messages(LATER, parse_tools(TOOLS, "required")))
    assert "You can call these functions" in opts.prompt and "<tool_call>" not in opts.prompt
    assert '\n{"name": "get_weather", "arguments": {"city": "Lisbon"}}<|im_end|>' in opts.prompt
    assert "<tool_call>" not in opts.grammar and opts.tools.syntax.prefix == ""


def _check_call(message: dict, finish_reason: str, names: set[str]) -> dict:
    assert finish_reason == "tool_calls" and message["content"] is None, message
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    fn = call["function"]
    assert fn["name"] in names
    jsonschema.validate(json.loads(fn["arguments"]), SCHEMAS[fn["name"]])
    return call


def _check_auto(message: dict, finish_reason: str) -> None:
    """An "auto" reply: a valid call, or text that does not start like one
    (a call cut off by max_tokens is text with finish_reason "length")."""
    if finish_reason == "tool_calls":
        _check_call(message, finish_reason, set(SCHEMAS))
    else:
        assert finish_reason == "length" or not message["content"].startswith(("<", " ", "\n")), message


def test_in_process_calls_in_the_templates_syntax(tool_model_path, tool_vocab):
    with ScopeLlama(tool_model_path, n_ctx=1024, n_threads=T) as llm:
        r = create_chat_completion(llm, ASK, max_tokens=80, tools=TOOLS, tool_choice="required")
        choice = r["choices"][0]
        call = _check_call(choice["message"], choice["finish_reason"], set(SCHEMAS))
        assert r["usage"]["prompt_tokens"] == len(tool_vocab.tokenize(direct(ASK, TOOLS)))
        named = create_chat_completion(llm, ASK, max_tokens=80, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "add"}})
        _check_call(named["choices"][0]["message"], named["choices"][0]["finish_reason"], {"add"})
        parts = list(create_chat_completion(llm, ASK, max_tokens=80, tools=TOOLS, tool_choice="required",
                                            stream=True))
        deltas = [p["choices"][0]["delta"] for p in parts[1:]]
        assert len(deltas) == 1 and parts[-1]["choices"][0]["finish_reason"] == "tool_calls"
        assert deltas[0]["tool_calls"][0]["function"]["name"] in SCHEMAS
        # the call and its result in the next turn, rendered by the template
        later = [*ASK, choice["message"], {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 24 C"}]
        answer = create_chat_completion(llm, later, max_tokens=80, tools=TOOLS, tool_choice="auto")
        assert answer["usage"]["prompt_tokens"] == len(tool_vocab.tokenize(direct(later, TOOLS)))
        _check_auto(answer["choices"][0]["message"], answer["choices"][0]["finish_reason"])


@pytest.fixture(scope="module")
def server(tool_model_path: str) -> Iterator[Served]:
    srv = start_server(tool_model_path, "--slots", "1", "--slot-cells", "1024")
    try:
        yield srv
    finally:
        assert srv.stop() == 0


def test_the_openai_client_against_the_server(server, tool_vocab):
    assert server.model == Path(tool_vocab.path).name.removesuffix(".gguf")
    c = server.client
    r = c.chat.completions.create(model=server.model, messages=ASK, tools=TOOLS, tool_choice="required",
                                  max_tokens=80, temperature=0)
    call = _check_call(r.choices[0].message.model_dump(), r.choices[0].finish_reason, set(SCHEMAS))
    assert r.usage.prompt_tokens == len(tool_vocab.tokenize(direct(ASK, TOOLS)))
    sampled = c.chat.completions.create(model=server.model, messages=ASK, tools=TOOLS, max_tokens=80, seed=3,
                                        tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                        temperature=0.9, top_p=0.95)
    _check_call(sampled.choices[0].message.model_dump(), sampled.choices[0].finish_reason, {"get_weather"})
    parts = list(c.chat.completions.create(model=server.model, messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=80, temperature=0, stream=True))
    deltas = [p.choices[0].delta.tool_calls for p in parts if p.choices and p.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and parts[-1].choices[0].finish_reason == "tool_calls"
    streamed = deltas[0][0].model_dump()  # the call handed over whole
    _check_call({"content": None, "tool_calls": [streamed]}, "tool_calls", set(SCHEMAS))
    later = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 24 C"}]
    after = c.chat.completions.create(model=server.model, messages=later, tools=TOOLS, max_tokens=80, temperature=0)
    _check_auto(after.choices[0].message.model_dump(), after.choices[0].finish_reason)
    assert after.usage.prompt_tokens == len(tool_vocab.tokenize(direct(later, TOOLS)))
    none = c.chat.completions.create(model=server.model, messages=later, tools=TOOLS, tool_choice="none",
                                     max_tokens=8, temperature=0)
    assert isinstance(none.choices[0].message.content, str) and not none.choices[0].message.tool_calls
    assert none.usage.prompt_tokens == len(tool_vocab.tokenize(direct(later, None)))
    assert server.wait_free(1)
