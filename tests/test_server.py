"""`scope-edge serve` as a real process on 127.0.0.1, driven by the official
openai client (and httpx for what the client would not send)."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from scope_edge import Budget, ScopeLlama

ROOT = Path(__file__).resolve().parents[1]
SCOPE = {"prefill_budget": 64, "decode_budget": 32}  # small: conversations evict
log = logging.getLogger(__name__)
NEAR_TIE = 0.5  # tests/test_batch.py: batched greedy choices differ from alone ones only at near ties
TOPICS = ["a lighthouse keeper", "a dragon who loves tea", "the history of bread", "a robot learning to paint"]


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    model: str
    client: openai.OpenAI

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def wait_free(self, slots: int, timeout: float = 20) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.health()["free_slots"] == slots:
                return True
            time.sleep(0.05)
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model_path: str, *args: str, api_key: str | None = None,
           budget: tuple[str, ...] = ("--prefill-budget", "128", "--decode-budget", "64")) -> Server:
    """budget=(): serve's default budget."""
    port = _free_port()
    cmd = [sys.executable, "-m", "scope_edge.cli", "serve", "--model", model_path, "--port", str(port),
           *budget, *args]
    if api_key:
        cmd += ["--api-key", api_key]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k != "SCOPE_EDGE_API_KEY"})
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 90
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("the server did not answer /health within 90 s")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key or "unused", max_retries=0, timeout=120)
    return Server(proc, url, Path(model_path).name.removesuffix(".gguf"), client)


def _stop(server: Server) -> int:
    server.process.send_signal(signal.SIGTERM)
    try:
        return server.process.wait(timeout=30)
    finally:
        if server.process.poll() is None:
            server.process.kill()


@pytest.fixture(scope="module")
def server(model_path) -> Iterator[Server]:
    srv = _start(model_path, "--slots", "4", "--queue-size", "1")
    try:
        yield srv
    finally:
        assert _stop(srv) == 0


@pytest.fixture(scope="module")
def llm(model_path) -> Iterator[ScopeLlama]:
    with ScopeLlama(model_path, budget=Budget(prefill=SCOPE["prefill_budget"], decode=SCOPE["decode_budget"])) as llm:
        yield llm


def _chat(topic: str, notes: int = 0) -> list[dict[str, str]]:
    extra = " ".join(f"note{i}: {topic}." for i in range(notes))
    return [{"role": "user", "content": f"{extra} Write a long story about {topic}."}]


def _stats(resp) -> dict:
    return resp.model_extra["scope_edge"]


def _agrees_up_to_a_near_tie(llm: ScopeLlama, messages, served: list[str], max_tokens: int) -> bool:
    """served: the text of each streamed chunk (one per generated token).
    True if it is llm's greedy stream for messages (fresh cache), chunk for
    chunk; else assert that at the first chunk where they part, the alone
    run's two best tokens nearly tie. Returns whether they were identical."""
    prompt = llm.tokenize(llm.render_chat(messages))
    alone = list(llm.stream(prompt, max_tokens=max_tokens))
    texts = [c.text for c in alone]
    if texts == served:
        return True
    k = next(i for i, (x, y) in enumerate(zip(texts + [None], served + [None])) if x != y)
    tokens = [c.token for c in alone if c.token is not None]
    assert k < len(tokens), "the served stream runs past the alone one"
    logits = list(llm.teacher_force(prompt, tokens[: k + 1]))[k]
    # the served chunk is the text of a token that nearly ties the alone run's choice
    near = np.flatnonzero(logits >= logits[tokens[k]] - NEAR_TIE)
    pieces = {llm.detokenize([int(t)]) for t in near if t != tokens[k]}
    held = served[k] == "" and any("\ufffd" in p for p in pieces)  # part of a character, printed later
    assert served[k] in pieces or held, (f"streams part at token {k} where the served text is no near tie of the "
                                         f"alone run's: {list(zip(texts, served))[max(0, k - 4):k + 2]}")
    return False


def test_models_health_chat_and_completion_plain_and_streamed(server, llm):
    c = server.client
    assert [m.id for m in c.models.list().data] == [server.model]
    health = server.health()
    assert health["status"] == "ok" and health["slots"] == 4 and health["free_slots"] == 4

    messages = _chat("a cat")
    plain = c.chat.completions.create(model=server.model, messages=messages, max_tokens=24, temperature=0,
                                      extra_body={"scope": SCOPE})
    text = plain.choices[0].message.content
    assert plain.object == "chat.completion" and plain.choices[0].finish_reason in ("stop", "length")
    assert text == llm.generate(llm.render_chat(messages), max_tokens=24).text  # one request: as ScopeLlama
    assert plain.usage.prompt_tokens == len(llm.tokenize(llm.render_chat(messages)))
    assert plain.usage.completion_tokens == _stats(plain)["generated_tokens"] > 0
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    assert _stats(plain)["kv_cells_allocated"] == health["slot_cells"]

    chunks = list(c.chat.completions.create(model=server.model, messages=messages, max_tokens=24, temperature=0,
                                            stream=True, extra_body={"scope": SCOPE}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert _stats(chunks[-1])["reused_prompt_tokens"] > 0  # the same prompt again: its slot's cache

    done = c.completions.create(model=server.model, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert done.object == "text_completion"
    assert done.choices[0].text == llm.generate("The capital of France is", max_tokens=8).text
    parts = list(c.completions.create(model=server.model, prompt="The capital of France is", max_tokens=8,
                                      temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == done.choices[0].text
    assert parts[-1].usage.completion_tokens == done.usage.completion_tokens
    assert "evicted_cells" in _stats(parts[-1])

    stopped = c.completions.create(model=server.model, prompt="The capital of France is", max_tokens=8,
                                   temperature=0, stop=[done.choices[0].text.strip().split()[0]])
    assert stopped.choices[0].finish_reason == "stop" and len(stopped.choices[0].text) < len(done.choices[0].text)


def test_concurrent_conversations_match_each_run_alone(model_path):
    # Prompts inside the prefill budget and replies inside the decode budget:
    # nothing is evicted, so the caches hold the same tokens as alone and only
    # the summation order differs (test_batch.py covers eviction while
    # batched, where near-tie scores may also pick other cells).
    scope = {"prefill_budget": 128, "decode_budget": 64}
    srv = _start(model_path, "--slots", "4")  # fresh slots: no cache reused from other tests
    llm = ScopeLlama(model_path, budget=Budget(prefill=128, decode=64))
    try:
        convs = [_chat(t, notes=2 * i) for i, t in enumerate(TOPICS)]
        n = 40

        def ask(messages):
            return list(srv.client.chat.completions.create(model=srv.model, messages=messages, max_tokens=n,
                                                           temperature=0, stream=True, extra_body={"scope": scope}))

        with ThreadPoolExecutor(len(convs)) as pool:
            replies = list(pool.map(ask, convs))
        finals = [r[-1] for r in replies]
        assert sorted(_stats(f)["slot"] for f in finals) == [0, 1, 2, 3]  # all four ran at once
        assert all(_stats(f)["evicted_cells"] == 0 for f in finals)
        identical = sum(_agrees_up_to_a_near_tie(llm, m, [ch.choices[0].delta.content or "" for ch in r[1:]], n)
                        for m, r in zip(convs, replies))
        # near ties are rare: a runtime that parted every conversation would be batching them wrongly
        log.info("%d of %d conversations identical to their runs alone", identical, len(convs))
        assert identical >= len(convs) // 2, f"only {identical} of {len(convs)} conversations identical to alone"
    finally:
        llm.close()
        assert _stop(srv) == 0


def test_a_long_conversation_under_a_small_budget_never_fails(server):
    messages: list[dict[str, str]] = []
    slots, reused = set(), []
    for turn in range(10):
        messages.append({"role": "user", "content": f"Turn {turn}: tell me one more fact about lighthouses."})
        r = server.client.chat.completions.create(model=server.model, messages=messages, max_tokens=40,
                                                  temperature=0, extra_body={"scope": SCOPE})
        assert r.choices[0].finish_reason in ("stop", "length")
        st = _stats(r)
        assert st["kv_cells_peak"] <= SCOPE["prefill_budget"] + SCOPE["decode_budget"] + 1
        slots.add(st["slot"])
        reused.append(st["reused_prompt_tokens"])
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
    assert r.usage.prompt_tokens > 4 * SCOPE["prefill_budget"]  # the conversation outgrew the budget many times
    assert len(slots) == 1  # every turn continued on its slot's cache
    assert all(n > 0 for n in reused[1:])


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    url = f"{server.url}/v1/chat/completions"
    good = {"model": server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    err = _error(httpx.post(url, content=b'{"model": "x", "messages": [', timeout=30), 400)
    assert "not valid JSON" in err["message"]
    err = _error(httpx.post(url, json={**good, "model": "gpt-4"}, timeout=30), 404)
    assert err["code"] == "model_not_found" and server.model in err["message"]
    err = _error(httpx.post(url, json={**good, "scope": {"prefill_budget": 0}}, timeout=30), 400)
    assert err["param"] == "scope" and "prefill >= 1" in err["message"]
    err = _error(httpx.post(url, json={**good, "scope": {"decode_budget": 5000}, "max_tokens": 6000}, timeout=30), 400)
    assert "--slot-cells" in err["message"]  # more than a slot holds: says what to change
    err = _error(httpx.post(url, json={**good, "scope": {"strategy": "bogus"}}, timeout=30), 400)
    assert "bogus" in err["message"]
    err = _error(httpx.post(url, json={**good, "scope": {"lend": "oldest"}}, timeout=30), 400)
    assert "unknown lend rule 'oldest'" in err["message"]
    err = _error(httpx.post(url, json={**good, "scope": {"budget": 3}}, timeout=30), 400)
    assert "prefill_budget" in err["message"]
    _error(httpx.post(url, json={**good, "messages": []}, timeout=30), 400)
    _error(httpx.post(url, json={**good, "messages": [{"role": "user"}]}, timeout=30), 400)
    _error(httpx.post(url, json={**good, "max_tokens": 0}, timeout=30), 400)
    _error(httpx.post(url, json={**good, "temperature": "hot"}, timeout=30), 400)
    _error(httpx.post(url, json={**good, "stop": [1]}, timeout=30), 400)
    _error(httpx.post(f"{server.url}/v1/completions", json={"model": server.model, "prompt": ["a", "b"]},
                      timeout=30), 400)
    _error(httpx.get(f"{server.url}/v1/nothing", timeout=30), 404)
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="gpt-4", messages=good["messages"])
    with pytest.raises(openai.BadRequestError):
        server.client.chat.completions.create(model=server.model, messages=good["messages"],
                                              extra_body={"scope": {"decode_budget": 1}})
    ok = server.client.chat.completions.create(model=server.model, messages=good["messages"], max_tokens=4)
    assert ok.usage.completion_tokens >= 1
    assert server.health()["free_slots"] == 4


def _open_stream(server: Server, max_tokens: int = 4000) -> tuple[httpx.Client, Iterator[str], httpx.Response]:
    client = httpx.Client(timeout=60)
    request = client.build_request("POST", f"{server.url}/v1/completions",
                                   json={"model": server.model, "prompt": "Once upon a time",
                                         "max_tokens": max_tokens, "stream": True, "temperature": 0})
    resp = client.send(request, stream=True)
    assert resp.status_code == 200
    lines = (line for line in resp.iter_lines() if line.startswith("data: "))
    next(lines)  # generating
    return client, lines, resp


def test_a_disconnect_mid_stream_frees_the_slot(server):
    client, lines, resp = _open_stream(server)
    for _ in range(3):
        assert json.loads(next(lines)[6:])["choices"][0]["finish_reason"] is None
    assert server.health()["free_slots"] == 3
    resp.close()
    client.close()  # the client leaves mid-stream
    assert server.wait_free(4), "the slot of a disconnected stream was not freed"


def test_a_full_queue_answers_429_and_queued_requests_run_when_a_slot_frees(server):
    streams = [_open_stream(server) for _ in range(4)]
    assert server.health()["free_slots"] == 0
    queued: list = []
    waiter = threading.Thread(target=lambda: queued.append(server.client.completions.create(
        model=server.model, prompt="Hello", max_tokens=3, temperature=0)))
    waiter.start()
    end = time.monotonic() + 10
    while server.health()["queued"] < 1 and time.monotonic() < end:
        time.sleep(0.05)
    assert server.health()["queued"] == 1  # queue size 1: it waits
    with pytest.raises(openai.RateLimitError) as full:
        server.client.completions.create(model=server.model, prompt="Hello", max_tokens=3)
    assert full.value.body["code"] == "queue_full"
    client, _, resp = streams.pop()
    resp.close()
    client.close()
    waiter.join(60)
    assert queued and queued[0].usage.completion_tokens >= 1
    for client, _, resp in streams:
        resp.close()
        client.close()
    assert server.wait_free(4)


def test_api_key_and_sigterm_mid_stream_exit_cleanly(model_path):
    srv = _start(model_path, "--slots", "2", api_key="sesame")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(f"{srv.url}/v1/models", timeout=10).status_code == 401
        assert [m.id for m in srv.client.models.list().data] == [srv.model]
        stream = srv.client.completions.create(model=srv.model, prompt="Once upon a time", max_tokens=4000,
                                               temperature=0, stream=True)
        next(iter(stream))
        t0 = time.monotonic()
        srv.process.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match="cancelled"):
            for _ in stream:
                pass
        assert srv.process.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 15
    finally:
        if srv.process.poll() is None:
            srv.process.kill()


def test_flash_attention_with_key_sketches_serves_and_saves_v(model_path):
    """K and V q8_0 under flash attention, cells scored from key sketches:
    conversations run together, evict, and the cache takes less than the f16
    one; a scored strategy on a server without sketches is refused."""
    srv = _start(model_path, "--slots", "2", "--flash-attn", "--type-k", "q8_0", "--type-v", "q8_0",
                 "--sketch-rank", "8")
    try:
        with ThreadPoolExecutor(2) as pool:
            finals = list(pool.map(lambda topic: srv.client.chat.completions.create(
                model=srv.model, messages=_chat(topic, notes=30), max_tokens=80, temperature=0,
                extra_body={"scope": SCOPE}), TOPICS[:2]))
        for f in finals:
            st = _stats(f)
            assert st["evicted_cells"] > 0 and f.usage.completion_tokens == st["generated_tokens"] > 0
            assert st["kv_bytes_allocated"] < 0.6 * st["kv_cells_allocated"] * 23040  # f16 K and V: 23,040 B a cell
    finally:
        assert _stop(srv) == 0
    plain = _start(model_path, "--slots", "1", "--flash-attn", "--strategy", "streaming")
    try:
        with pytest.raises(openai.BadRequestError, match="flash attention never computes"):
            plain.client.chat.completions.create(model=plain.model, messages=_chat("bread"), max_tokens=8,
                                                 extra_body={"scope": {**SCOPE, "strategy": "slide"}})
        ok = plain.client.chat.completions.create(model=plain.model, messages=_chat("bread"), max_tokens=8)
        assert ok.usage.completion_tokens > 0
    finally:
        assert _stop(plain) == 0
    with pytest.raises(RuntimeError, match="--sketch-rank"):
        _start(model_path, "--slots", "1", "--flash-attn")


def test_the_default_budget_keeps_the_chat_structure_as_scopellama_does(model_path):
    """serve given no budget keeps the system turn and the template's markers
    when a conversation passes its budget (ScopeLlama's default, docs/budgets.md
    "Structure kept"), also for a scope naming only a strategy; a scope that
    names a budget runs it as built, like a budget passed to ScopeLlama."""
    srv = _start(model_path, "--slots", "1", "--threads", "1", budget=())
    system = {"role": "system", "content": "You are the clerk of the Oslo depot. The gate code is 4812."}
    try:
        def ask(tag: str, scope: dict | None) -> dict:
            notes = " ".join(f"{tag} note {i}: a crate of {i} lamps." for i in range(110))  # ~1,750 tokens
            r = srv.client.chat.completions.create(
                model=srv.model, messages=[system, {"role": "user", "content": f"{notes} What is the gate code?"}],
                max_tokens=8, temperature=0, extra_body=None if scope is None else {"scope": scope})
            assert r.usage.prompt_tokens > 1024 + 512  # past serve's default budget
            return _stats(r)

        for tag, scope in (("default", None), ("strategy", {"strategy": "slide"})):
            st = ask(tag, scope)
            assert st["evicted_cells"] > 0 and 20 < st["structure_cells"] <= 1024 // 4, (tag, st)
        st = ask("chosen", {"prefill_budget": 1024, "decode_budget": 512})
        assert st["evicted_cells"] > 0 and st["structure_cells"] == 0, st
    finally:
        assert _stop(srv) == 0
