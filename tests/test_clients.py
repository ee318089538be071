"""The clients people use, against a real `scope-edge serve` on 127.0.0.1:
the official openai client (structured output on many prompts, logprobs,
tool calls, stream_options, refused fields), instructor with a pydantic
model, and LangChain's ChatOpenAI (with_structured_output and a tool call).
The small model's content is often silly; the grammar guarantees its shape."""
from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import instructor
import jsonschema
import openai
import pytest
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from served import Served, start_server

EVICT = {"prefill_budget": 24, "decode_budget": 10}  # the answer outgrows the decode budget: it is evicted from
SAMPLED = {"temperature": 0.9, "top_p": 0.95}
WHO = ["a pirate", "my grandmother", "a small robot", "a baker", "a knight", "an astronaut", "a cat owner",
       "a gardener", "a chess player", "a firefighter", "a poet", "a sailor", "a violinist"]


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int
    pet: Literal["cat", "dog", "none"]


PERSON = Person.model_json_schema()
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 16}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def server(model_path) -> Iterator[Served]:
    srv = start_server(model_path, "--slots", "4", "--queue-size", "64", "--slot-cells", "512",
                 "--prefill-budget", "256", "--decode-budget", "128")
    try:
        yield srv
    finally:
        assert srv.stop() == 0


def _cases() -> list[tuple[str, bool, bool]]:
    """(who, sampled, evicting): every combination over the names."""
    return [(who, sampled, evict) for who in WHO for sampled in (False, True) for evict in (False, True)]


def _ask(who: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Describe {who} as JSON with a name, an age and a pet."}]


def _options(i: int, sampled: bool, evict: bool) -> dict:
    return {**({**SAMPLED, "seed": i} if sampled else {"temperature": 0}),
            "extra_body": {"scope": EVICT} if evict else None}


def _check_evicted(stats: dict) -> None:
    """More was generated than the cells held at the peak leave room for:
    cells of the answer were evicted while it was written."""
    assert stats["generated_tokens"] > EVICT["decode_budget"] + 2, stats
    assert stats["kv_cells_peak"] <= EVICT["prefill_budget"] + EVICT["decode_budget"] + 1, stats
    assert stats["evicted_cells"] > 0


def test_json_schema_answers_validate_on_52_prompts(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    def ask(i_case):
        i, (who, sampled, evict) = i_case
        return server.client.chat.completions.create(model=server.model, messages=_ask(who), max_tokens=60,
                                                     response_format=fmt, **_options(i, sampled, evict))

    cases = _cases()
    with ThreadPoolExecutor(4) as pool:  # four at once: the server's slots decode them together
        replies = list(pool.map(ask, enumerate(cases)))
    assert len(replies) >= 50
    for (_, _, evict), r in zip(cases, replies):
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
        if evict:
            _check_evicted(r.model_extra["scope_edge"])
    assert server.wait_free(4)


def test_instructor_fills_a_pydantic_model_on_52_prompts(server):
    """instructor's default (a forced tool call) and its JSON_SCHEMA mode
    (llama-cpp-python's response_format), no retries: the first answer is valid."""
    clients = [instructor.from_openai(server.client, mode=mode) for mode in (instructor.Mode.TOOLS,
                                                                               instructor.Mode.JSON_SCHEMA)]

    def ask(i_case):
        i, (who, sampled, evict) = i_case
        person, raw = clients[i % 2].chat.completions.create_with_completion(
            model=server.model, messages=_ask(who), max_tokens=60, response_model=Person, max_retries=0,
            **_options(i, sampled, evict))
        return person, raw

    cases = _cases()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, enumerate(cases)))
    for i, ((_, _, evict), (person, raw)) in enumerate(zip(cases, answers)):
        assert isinstance(person, Person) and len(person.name) <= 12
        assert raw.choices[0].finish_reason == ("tool_calls" if i % 2 == 0 else "stop")
        if evict:
            _check_evicted(raw.model_extra["scope_edge"])


def test_langchain_structured_output_tool_call_and_stream(server):
    llm = ChatOpenAI(model=server.model, base_url=f"{server.url}/v1", api_key="unused", temperature=0,
                     max_tokens=60, max_retries=0)
    for method in ("json_schema", "function_calling", "json_mode"):
        structured = llm.with_structured_output(Person if method != "json_mode" else PERSON, method=method)
        out = structured.invoke(_ask("a pirate") if method != "json_mode" else
                                [("system", "Answer in JSON."), *[(m["role"], m["content"]) for m in _ask("a pirate")]])
        if method == "json_mode":
            assert isinstance(out, dict)
        else:
            assert isinstance(out, Person)

    @tool
    def get_weather(city: str) -> str:
        """Current weather of a city."""
        return f"sunny in {city}"

    ask = [("user", "What is the weather in Lisbon?")]
    called = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(ask)
    assert called.tool_calls and called.tool_calls[0]["name"] == "get_weather"
    assert isinstance(called.tool_calls[0]["args"]["city"], str)
    result = get_weather.invoke(called.tool_calls[0])  # a ToolMessage answering the call
    after = llm.bind_tools([get_weather]).invoke([*ask, called, result])
    assert after.content or after.tool_calls

    chunks = list(llm.stream("Say hello.", stream_usage=True))
    assert "".join(c.content for c in chunks)
    usage = [c.usage_metadata for c in chunks if c.usage_metadata]
    assert len(usage) == 1 and usage[0]["output_tokens"] > 0  # include_usage: counted once


def test_logprobs_tool_calls_and_stream_options_with_the_openai_client(server):
    c = server.client
    parsed = c.beta.chat.completions.parse(model=server.model, messages=_ask("a poet"), max_tokens=60,
                                           temperature=0, response_format=Person)
    assert isinstance(parsed.choices[0].message.parsed, Person)
    r = c.chat.completions.create(model=server.model, messages=_ask("a poet"), max_tokens=12, temperature=0,
                                  logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(e.token for e in content) == r.choices[0].message.content
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.logprob - 1e-9 for e in content)
    chunks = list(c.chat.completions.create(model=server.model, messages=_ask("a poet"), max_tokens=12, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True,
                                            stream_options={"include_usage": True}))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])

    done = c.completions.create(model=server.model, prompt="The capital of France is", max_tokens=5, temperature=0,
                                logprobs=2)
    lp = done.choices[0].logprobs
    assert "".join(lp.tokens) == done.choices[0].text and all(len(t) == 2 for t in lp.top_logprobs)

    ask = [{"role": "user", "content": "What is the weather in Lisbon?"}]
    call = c.chat.completions.create(model=server.model, messages=ask, max_tokens=40, temperature=0,
                                     tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    assert call.choices[0].finish_reason == "tool_calls"
    tc = call.choices[0].message.tool_calls[0]
    jsonschema.validate(json.loads(tc.function.arguments), WEATHER["function"]["parameters"])
    parts = list(c.chat.completions.create(model=server.model, messages=ask, max_tokens=40, temperature=0,
                                           tools=[WEATHER], tool_choice="required", stream=True))
    deltas = [p.choices[0].delta.tool_calls for p in parts if p.choices and p.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and deltas[0][0].function.arguments == tc.function.arguments
    later = c.chat.completions.create(model=server.model, max_tokens=20, temperature=0, tools=[WEATHER], messages=[
        *ask, call.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": tc.id, "content": "sunny, 24 C"}])
    assert later.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_every_request_field_is_used_or_refused_by_name(server):
    url = f"{server.url}/v1/chat/completions"
    good = {"model": server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    accepted = {"user": "u1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto", "modalities": ["text"],
                "safety_identifier": "s", "prompt_cache_key": "k", "parallel_tool_calls": True, "n": 1,
                "logit_bias": {"42": -100}, "seed": 3, "top_k": 20, "min_p": 0.1, "repeat_penalty": 1.1,
                "max_completion_tokens": 3, "stop": ["\n\n"], "presence_penalty": 0.5, "frequency_penalty": 0.5}
    ok = httpx.post(url, json={**good, **accepted}, timeout=60)
    assert ok.status_code == 200, ok.text
    refused = {"store": True, "service_tier": "flex", "modalities": ["text", "audio"], "audio": {"voice": "alloy"},
               "prediction": {"type": "content", "content": "x"}, "web_search_options": {},
               "functions": [{"name": "f"}], "function_call": "auto", "reasoning_effort": "low", "verbosity": "low",
               "n": 2, "bogus": 1, "stream_options": {"include_usage": True}, "top_logprobs": 2,
               "logit_bias": {"99999999": 1}, "grammar": "root ::= ("}
    for name, value in refused.items():
        resp = httpx.post(url, json={**good, name: value}, timeout=60)
        assert resp.status_code == 400, (name, resp.text)
        assert resp.json()["error"]["param"] == name, (name, resp.text)
    for name, value in {"echo": True, "best_of": 2, "suffix": "end", "logprobs": 9, "bogus": 1}.items():
        resp = httpx.post(f"{server.url}/v1/completions", json={"model": server.model, "prompt": "Hi",
                                                               "max_tokens": 2, name: value}, timeout=60)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == name, (name, resp.text)
    with pytest.raises(openai.BadRequestError, match="reasoning"):
        server.client.chat.completions.create(model=server.model, messages=good["messages"], reasoning_effort="low")
    assert server.wait_free(4)
