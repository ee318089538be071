"""Constrained decoding and logprobs in the runtime and scope_edge.openai, on
the real default model through real llama.cpp: a grammar in Sampling on the
greedy fast path, the sampler chain, batched slots and under budgets that
evict during the answer; logprobs against llama.cpp's own logits; tool calls."""
from __future__ import annotations

import ctypes
import json

import jsonschema
import llama_cpp
import numpy as np
import pytest

from scope_edge import Budget, EngineConfig, Sampling, ScopeLlama
from scope_edge.openai import FieldError, create_chat_completion, create_completion
from scope_edge.policies import build
from scope_edge.runtime.batch import BatchRunner, BatchSettings
from scope_edge.runtime.generation import Limits
from scope_edge.runtime.grammar import JSON_OBJECT, json_schema_grammar
from scope_edge.runtime.model import Model
from scope_edge.runtime.sampling import TOKEN_DATA, Sampler

T = 1  # n_threads: one OpenMP thread keeps a shared 2-core machine from stalling at barriers (test_reliability.py)
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer"},
    "pet": {"enum": ["cat", "dog", "none"]}}, "required": ["name", "age", "pet"]}
SMALL = Budget(prefill=24, decode=10)  # evicts the prompt and, past 10 tokens, the answer
SAMPLED = {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 16}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
    "a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}


def _ask(who: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Describe {who} as JSON with a name, an age and a pet."}]


@pytest.fixture(scope="module")
def full(model_path):
    with ScopeLlama(model_path, n_ctx=512, n_threads=T) as llm:
        yield llm


@pytest.fixture(scope="module")
def small(model_path):
    with ScopeLlama(model_path, budget=SMALL, n_threads=T) as llm:
        yield llm


@pytest.mark.parametrize("budget", [None, SMALL], ids=["full", "evicting"])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_a_schema_grammar_gives_valid_json_greedy_and_sampled_with_and_without_eviction(
        full, small, budget, sampled):
    llm = small if budget else full
    grammar = json_schema_grammar(PERSON)
    for seed, who in enumerate(["a pirate", "my grandmother", "a small robot"]):
        sampling = Sampling(grammar=grammar, seed=seed, **(SAMPLED if sampled else {}))
        done = llm.generate(llm.render_chat(_ask(who)), max_tokens=60, sampling=sampling)
        assert done.finish_reason == "stop", done.text
        jsonschema.validate(json.loads(done.text), PERSON)
        if budget:  # the answer outgrew the decode budget: cells of it were evicted while it was written
            st = done.stats
            assert st.generated_tokens > SMALL.decode + 2 and st.kv_cells_peak <= SMALL.prefill + SMALL.decode + 1
            assert st.evicted_cells > st.prompt_tokens - SMALL.prefill


def test_greedy_under_a_grammar_is_the_best_allowed_token(full, model_path):
    """The fast path (argmax, shortlists, first bytes) chooses what llama.cpp's
    grammar sampler applied to every token of the vocabulary leaves best,
    step for step (the steps' logits from a teacher-forced run)."""
    prompt = full.render_chat(_ask("a sailor"))
    grammar = json_schema_grammar(PERSON)
    fast = full.generate(prompt, max_tokens=40, sampling=Sampling(grammar=grammar))
    with ScopeLlama(model_path, n_ctx=512, n_threads=T) as ref:
        steps = list(ref.teacher_force(prompt, fast.tokens))
        sampler = llama_cpp.llama_sampler_init_grammar(ref.model.vocab, grammar.encode(), b"root")
        try:
            for logits, token in zip(steps, fast.tokens):
                data = np.zeros(len(logits), dtype=TOKEN_DATA)
                data["id"], data["logit"] = np.arange(len(logits)), logits
                cur = llama_cpp.llama_token_data_array(data=data.ctypes.data_as(llama_cpp.llama_token_data_p),
                                                       size=len(data), selected=-1, sorted=False)
                llama_cpp.llama_sampler_apply(sampler, ctypes.byref(cur))
                assert data["logit"][token] == logits[token] == data["logit"].max()  # allowed, and the best
                llama_cpp.llama_sampler_accept(sampler, token)
        finally:
            llama_cpp.llama_sampler_free(sampler)
    assert fast.finish_reason == "stop"


def test_grammar_in_batched_slots_with_eviction(model_path):
    model = Model(model_path)
    runner = BatchRunner(model, BatchSettings(slots=4, slot_cells=256, engine=EngineConfig(n_threads=T)))
    try:
        grammar = json_schema_grammar(PERSON)
        policy = build(SMALL)
        reqs = [runner.start(model.tokenize(model.render_chat(_ask(who))), policy=policy,
                             limits=Limits(max_tokens=60),
                             sampling=Sampling(grammar=grammar, seed=i, **(SAMPLED if i % 2 else {})))
                for i, who in enumerate(["a baker", "a knight", "an astronaut", "a cat owner"])]
        for req in reqs:
            chunks = list(req)
            assert chunks[-1].finish_reason == "stop"
            jsonschema.validate(json.loads("".join(c.text for c in chunks)), PERSON)
            assert chunks[-1].stats.generated_tokens > SMALL.decode + 2
        assert runner.free_slots() == 4
    finally:
        runner.close()
        model.close()


def test_logprobs_are_the_log_softmax_of_llama_cpps_logits(full, model_path):
    prompt = full.render_chat(_ask("a farmer"))
    for sampling in (Sampling(logprobs=5), Sampling(logprobs=3, grammar=JSON_OBJECT, seed=1, **SAMPLED)):
        chunks = [c for c in full.stream(prompt, max_tokens=24, sampling=sampling) if c.token is not None]
        tokens = [c.token for c in chunks]
        with ScopeLlama(model_path, n_ctx=512, n_threads=T) as ref:  # the same context size: the same arithmetic
            logits = list(ref.teacher_force(prompt, tokens))
        for chunk, step in zip(chunks, logits):
            x = step.astype(np.float64)
            logsoftmax = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
            lp = chunk.logprobs
            assert lp.token == chunk.token
            assert abs(lp.logprob - logsoftmax[chunk.token]) < 1e-4  # before the grammar: the model's own
            assert len(lp.top) == sampling.logprobs
            want = np.argsort(-logsoftmax, kind="stable")[: sampling.logprobs]
            assert [t for t, _ in lp.top] == want.tolist()
            np.testing.assert_allclose([v for _, v in lp.top], logsoftmax[want], atol=1e-4)


def test_openai_shapes_response_format_logprobs_and_tool_calls(full):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = create_chat_completion(full, _ask("a teacher"), max_tokens=60, response_format=fmt, logprobs=True,
                               top_logprobs=2)
    jsonschema.validate(json.loads(r["choices"][0]["message"]["content"]), PERSON)
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"]
    assert "".join(e["token"] for e in content) == r["choices"][0]["message"]["content"]
    assert all(len(e["top_logprobs"]) == 2 and e["bytes"] == list(e["token"].encode()) for e in content)
    obj = create_chat_completion(full, _ask("a doctor"), max_tokens=80, response_format={"type": "json_object"})
    assert isinstance(json.loads(obj["choices"][0]["message"]["content"]), dict)

    ask = [{"role": "user", "content": "What is the weather in Lisbon?"}]
    call = create_chat_completion(full, ask, max_tokens=60, tools=[WEATHER, ADD], tool_choice="required")
    choice = call["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    fn = choice["message"]["tool_calls"][0]["function"]
    schema = {"get_weather": WEATHER, "add": ADD}[fn["name"]]["function"]["parameters"]
    jsonschema.validate(json.loads(fn["arguments"]), schema)
    named = create_chat_completion(full, ask, max_tokens=60, tools=[WEATHER, ADD],
                                   tool_choice={"type": "function", "function": {"name": "add"}})
    assert named["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "add"
    streamed = list(create_chat_completion(full, ask, max_tokens=60, tools=[WEATHER], tool_choice="required",
                                           stream=True))
    deltas = [c["choices"][0]["delta"] for c in streamed[1:]]
    assert len(deltas) == 1 and deltas[0]["tool_calls"][0]["function"] == fn  # a call is handed over whole
    assert streamed[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # the tool's result in a later turn; "auto" may answer in text
    later = ask + [choice["message"], {"role": "tool", "tool_call_id": choice["message"]["tool_calls"][0]["id"],
                                       "content": "sunny, 24 C"}]
    answer = create_chat_completion(full, later, max_tokens=30, tools=[WEATHER], tool_choice="auto")
    assert answer["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
    none = create_chat_completion(full, later, max_tokens=10, tools=[WEATHER], tool_choice="none")
    assert isinstance(none["choices"][0]["message"]["content"], str)


def test_completion_logprobs_legacy_shape(full):
    r = create_completion(full, "The capital of France is", max_tokens=6, logprobs=3)
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == r["usage"]["completion_tokens"]
    assert "".join(lp["tokens"]) == r["choices"][0]["text"]
    assert lp["text_offset"][0] == 0 and all(len(t) == 3 for t in lp["top_logprobs"])
    assert all(max(t.values()) >= v - 1e-9 for t, v in zip(lp["top_logprobs"], lp["token_logprobs"]))


def test_bad_grammars_schemas_and_options_are_value_errors(full):
    with pytest.raises(ValueError, match="could not parse the grammar"):
        full.generate("Hi", max_tokens=2, sampling=Sampling(grammar="root ::= ("))
    with pytest.raises(ValueError, match="ignore_eos"):
        Sampler(Sampling(grammar=JSON_OBJECT), full.model, ignore_eos=True, history=[])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Sampler(Sampling(logit_bias=((10**7, 1.0),)), full.model, ignore_eos=False, history=[])
    with pytest.raises(ValueError, match="logprobs"):
        Sampling(logprobs=21)
    with pytest.raises(ValueError, match="JSON schema"):
        json_schema_grammar({"type": "bogus"})
    for kwargs, param in [({"response_format": {"type": "xml"}}, "response_format"),
                          ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
                          ({"tool_choice": "required"}, "tool_choice"),
                          ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
                           "tool_choice"),
                          ({"top_logprobs": 3}, "top_logprobs"),
                          ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format")]:
        with pytest.raises(FieldError) as err:
            create_chat_completion(full, _ask("x"), max_tokens=2, **kwargs)
        assert err.value.param == param
