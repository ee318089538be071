"""A bounded soak of a real `scope-edge serve` on 127.0.0.1, two rounds of:
80 mixed requests from 16 client threads (streamed, structured, cancelled
mid-stream, malformed, plain), then a flood of 48 at once past the queue
(256 requests). No crash; every accepted request gets a complete, valid
answer or a clean error; 429s only beyond the queue; RSS flat (the second
round grows it by less than RSS_ROUND_BOUND); every slot free at the end.
About 110 s on the shared 2-core machine under load."""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema

from served import Served, start_server

SLOTS, QUEUE, THREADS, MIXED, FLOOD, ROUNDS = 4, 16, 16, 80, 48, 2
RSS_BOUND = 96 * 2**20  # growth allowed after the warm-up (allocator arenas of new threads, caches)
RSS_ROUND_BOUND = 16 * 2**20  # growth allowed in the last round: flat, no leak per request
SCHEMA = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 10}, "n": {"type": "integer"}},
          "required": ["word", "n"]}
KINDS = ("stream", "structured", "cancel", "malformed", "completion")


def _sse(resp: httpx.Response) -> list:
    return [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]


def _one(http: httpx.Client, url: str, model: str, i: int) -> str:
    """Request i of the mixed load; returns its kind once its answer checked out."""
    kind = KINDS[i % len(KINDS)]
    chat = {"model": model, "messages": [{"role": "user", "content": f"Tell me about item {i}."}], "max_tokens": 16,
            "temperature": 0 if i % 2 else 0.8, "seed": i}
    if kind == "malformed":
        resp = http.post(f"{url}/v1/chat/completions", content=b'{"model": "x", "messages": [', timeout=60)
        assert resp.status_code == 400 and resp.json()["error"]["message"], resp.text
    elif kind == "structured":
        resp = http.post(f"{url}/v1/chat/completions", timeout=120, json={**chat, "max_tokens": 40, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}})
        assert resp.status_code == 200, resp.text
        choice = resp.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    elif kind == "completion":
        resp = http.post(f"{url}/v1/completions", json={"model": model, "prompt": f"Item {i} is", "max_tokens": 12},
                         timeout=120)
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] >= 1, resp.text
    else:
        with http.stream("POST", f"{url}/v1/chat/completions", json={**chat, "stream": True,
                                                                      "stream_options": {"include_usage": True}},
                         timeout=120) as resp:
            assert resp.status_code == 200
            if kind == "cancel":  # read two events, then leave mid-stream
                lines = (line for line in resp.iter_lines() if line.startswith("data: "))
                next(lines), next(lines)
                return kind
            events = _sse(resp)
        assert events[-1] == "[DONE]", events[-3:]
        bodies = [json.loads(e) for e in events[:-1]]
        assert "error" not in bodies[-1], bodies[-1]
        assert bodies[-2]["choices"][0]["finish_reason"] in ("stop", "length")
        assert bodies[-1]["choices"] == [] and bodies[-1]["usage"]["completion_tokens"] >= 1
    return kind


def test_soak_mixed_load_and_a_flood(model_path):
    srv = start_server(model_path, "--slots", str(SLOTS), "--queue-size", str(QUEUE), "--slot-cells", "512",
                       "--prefill-budget", "64", "--decode-budget", "32")
    try:
        with httpx.Client() as http:
            for i in range(2 * len(KINDS)):  # warm-up: every kind of request, grammars compiled, pools grown
                _one(http, srv.url, srv.model, i)
        assert srv.wait_free(SLOTS)
        rss = [srv.rss()]
        refused = 0
        for _ in range(ROUNDS):
            refused += _round(srv)
            assert srv.wait_free(SLOTS, timeout=60), srv.health()
            assert srv.health()["queued"] == 0
            rss.append(srv.rss())
        print(f"RSS after the warm-up and after each round of {MIXED} + {FLOOD} requests: "
              f"{[round(r / 2**20, 1) for r in rss]} MiB; {refused} of {ROUNDS * FLOOD} flooded requests got 429")
        assert rss[-1] - rss[0] < RSS_BOUND and rss[-1] - rss[-2] < RSS_ROUND_BOUND
    finally:
        assert srv.stop() == 0


def _round(srv: Served) -> int:
    """MIXED requests from THREADS threads, then FLOOD at once; the 429s."""
    local = threading.local()

    def mixed(i: int) -> str:
        if not hasattr(local, "http"):
            local.http = httpx.Client()
        return _one(local.http, srv.url, srv.model, i)

    with ThreadPoolExecutor(THREADS) as pool:  # never more in flight than slots + queue: no 429
        kinds = list(pool.map(mixed, range(MIXED)))
    assert len(kinds) == MIXED and set(kinds) == set(KINDS)

    start = threading.Barrier(FLOOD)

    def flood(i: int) -> int:
        start.wait()
        resp = httpx.post(f"{srv.url}/v1/completions", timeout=300, json={
            "model": srv.model, "prompt": f"Flood {i}:", "max_tokens": 24, "temperature": 0})
        if resp.status_code == 200:
            assert resp.json()["choices"][0]["finish_reason"] in ("stop", "length")
        else:
            assert resp.status_code == 429 and resp.json()["error"]["code"] == "queue_full", resp.text
        return resp.status_code

    with ThreadPoolExecutor(FLOOD) as pool:
        codes = list(pool.map(flood, range(FLOOD)))
    refused = codes.count(429)
    assert 0 < refused <= FLOOD - SLOTS - QUEUE, codes  # only what the slots and the queue could not take
    return refused
