"""OpenAI-shaped completions, multi-turn cache reuse, and the CLI end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from scope_edge import Budget, Sampling, ScopeLlama
from scope_edge.openai import create_chat_completion, create_completion

FIRST = [{"role": "user", "content": "Name three colours."}]
BIG = Budget(prefill=1024, decode=512, observation_window=8, recent_window=64)


def _second(reply: dict) -> list[dict]:
    return FIRST + [reply["choices"][0]["message"], {"role": "user", "content": "Now name three animals."}]


def test_chat_plain_and_streamed_agree(model_path):
    with ScopeLlama(model_path, budget=None) as llm:
        plain = create_chat_completion(llm, FIRST, max_tokens=40)
        chunks = list(create_chat_completion(llm, FIRST, max_tokens=40, stream=True))
    assert plain["object"] == "chat.completion" and plain["id"].startswith("chatcmpl-")
    msg = plain["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"]
    assert plain["usage"]["total_tokens"] == plain["usage"]["prompt_tokens"] + plain["usage"]["completion_tokens"]
    assert plain["scope_edge"]["kv_bytes_allocated"] > 0
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == msg["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == plain["usage"]


def test_completion_plain_and_streamed_agree(model_path):
    prompt = render_chat_text(model_path, FIRST)
    with ScopeLlama(model_path, budget=None) as llm:
        plain = create_completion(llm, prompt, max_tokens=30)
        streamed = list(create_completion(llm, prompt, max_tokens=30, stream=True))
        direct = llm.generate(prompt, max_tokens=30)
    assert plain["object"] == "text_completion"
    assert plain["choices"][0]["text"] == direct.text
    assert "".join(c["choices"][0]["text"] for c in streamed) == direct.text
    assert plain["usage"]["completion_tokens"] == len(direct.tokens)


def render_chat_text(model_path: str, messages: list[dict]) -> str:
    with ScopeLlama(model_path, budget=None) as llm:
        return llm.render_chat(messages)


@pytest.mark.parametrize("budget", [None, BIG], ids=["full", "big-budget"])
def test_second_turn_prefills_only_new_messages(model_path, budget):
    with ScopeLlama(model_path, budget=budget) as llm:
        r1 = create_chat_completion(llm, FIRST, max_tokens=40)
        u1 = r1["usage"]
        r2 = create_chat_completion(llm, _second(r1), max_tokens=40)
        st = r2["scope_edge"]
        history = llm.tokenize(llm.render_chat(_second(r1)))
        # the first turn's prompt and reply came from the cache
        assert st["reused_prompt_tokens"] == u1["prompt_tokens"] + u1["completion_tokens"]
        assert st["prefilled_tokens"] == len(history) - st["reused_prompt_tokens"]
        assert r2["usage"]["prompt_tokens"] == len(history)
        # the cache holds the whole conversation, as a fresh run over it would
        n = len(history) + r2["usage"]["completion_tokens"] - (r2["choices"][0]["finish_reason"] == "length")
        np.testing.assert_array_equal(llm.kv_positions(), np.arange(n))
    with ScopeLlama(model_path, budget=None) as fresh:
        whole = create_chat_completion(fresh, _second(r1), max_tokens=40)
        assert whole["scope_edge"]["reused_prompt_tokens"] == 0
    # llama.cpp computes a batch and one-token steps with slightly different
    # rounding, so a reply can differ at a near tie; the answer must start alike
    got, want = r2["choices"][0]["message"]["content"], whole["choices"][0]["message"]["content"]
    assert got[:10] == want[:10], (got, want)


def test_large_budget_conversation_equals_full_cache_conversation(model_path):
    replies = []
    for budget in (None, BIG):
        with ScopeLlama(model_path, budget=budget) as llm:
            r1 = create_chat_completion(llm, FIRST, max_tokens=40)
            r2 = create_chat_completion(llm, _second(r1), max_tokens=40)
            replies.append((r1["choices"][0]["message"]["content"], r2["choices"][0]["message"]["content"]))
            assert r2["scope_edge"]["evicted_cells"] == 0
    assert replies[0] == replies[1]


def test_edited_history_truncates_the_cache(model_path):
    with ScopeLlama(model_path, budget=None) as llm:
        r1 = create_chat_completion(llm, FIRST, max_tokens=40)
        edited = [{"role": "user", "content": "Name three fruits."}]
        r2 = create_chat_completion(llm, edited, max_tokens=20)
        n_prompt = r2["usage"]["prompt_tokens"]
        assert 0 < r2["scope_edge"]["reused_prompt_tokens"] < r1["usage"]["prompt_tokens"]
        n = n_prompt + r2["usage"]["completion_tokens"] - (r2["choices"][0]["finish_reason"] == "length")
        np.testing.assert_array_equal(llm.kv_positions(), np.arange(n))


SYSTEM = {"role": "system", "content": "You are the clerk of a harbour depot. The gate code is 4417 and the "
                                     "office extension is 2209. Answer in one short sentence."}


@pytest.mark.parametrize("keep", ["budget", "default"])
def test_a_new_conversation_does_not_inherit_the_last_ones_evictions(model_path, keep):
    # Regression (#30): a chat sharing only its system message with the previous
    # one reused that conversation's compressed prefix, holes and all, so its
    # reply depended on a conversation it never saw. Now it equals a fresh
    # instance's; the default budget keeps the system turn, so it is reused.
    policy = {"budget": Budget(prefill=32, decode=16, observation_window=8, recent_window=8)} \
        if keep == "budget" else {"n_ctx": 512}
    story = [SYSTEM, {"role": "user", "content": "Tell me a long story about the depot's night watchman."}]
    question = [SYSTEM, {"role": "user", "content": "What is the gate code?"}]
    with ScopeLlama(model_path, **policy) as fresh:
        want = create_chat_completion(fresh, question, max_tokens=24)
    with ScopeLlama(model_path, **policy) as llm:
        told = create_chat_completion(llm, story, max_tokens=500)
        assert told["scope_edge"]["evicted_cells"] > 0
        got = create_chat_completion(llm, question, max_tokens=24)
        a, b = (llm.tokenize(llm.render_chat(m)) for m in (story, question))
    assert got["choices"][0]["message"] == want["choices"][0]["message"]
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)  # the system turn and the user's marker
    reused = got["scope_edge"]["reused_prompt_tokens"]
    assert reused < shared if keep == "budget" else reused == shared


def test_multi_turn_under_a_small_budget_stays_within_it(model_path):
    b = Budget(prefill=32, decode=16, observation_window=8, recent_window=8)
    with ScopeLlama(model_path, budget=b) as llm:
        messages = list(FIRST)
        for turn in range(3):
            r = create_chat_completion(llm, messages, max_tokens=30)
            st = r["scope_edge"]
            assert st["kv_cells_peak"] <= b.prefill + b.decode
            if turn:
                assert st["reused_prompt_tokens"] > 0
            messages += [r["choices"][0]["message"], {"role": "user", "content": f"And {turn + 4} more?"}]


PROSE = ("the old lighthouse stood on a rock at the edge of the grey sea and every evening the keeper climbed "
         "its narrow stairs to light the lamp while the wind pulled at the windows and the gulls cried below").split()


def _words(n: int, start: int = 0) -> str:
    """n words of plain English prose (a turn's user message)."""
    return " ".join(PROSE[(start + i) % len(PROSE)] for i in range(n))


def test_long_conversation_survives_the_context_growing(model_path):
    # Regression (issue #14.1): turn 8 made the context grow; the plan had sized
    # and chosen chunking from the compressed history, the bigger context then
    # dropped reuse and the whole history was prefilled unchunked into it:
    # "llama_decode failed with 1: no free KV cell".
    b = Budget(prefill=64, decode=16, observation_window=8, recent_window=8)
    with ScopeLlama(model_path, budget=b) as llm:
        messages: list[dict] = []
        for turn, n_words in enumerate([40, 100, 100, 100, 100, 100, 100, 250, 30, 600]):
            messages.append({"role": "user", "content": _words(n_words, start=turn)})
            r = create_chat_completion(llm, messages, max_tokens=16)
            st = r["scope_edge"]
            assert st["kv_cells_peak"] <= b.prefill + b.decode
            assert st["prefill_cells_peak"] <= b.prefill + 512 + b.decode  # kept history + one chunk
            assert st["kv_cells_allocated"] <= 1024
            assert r["usage"]["prompt_tokens"] == len(llm.tokenize(llm.render_chat(messages)))
            messages.append(r["choices"][0]["message"])


def test_a_growing_chat_prefills_its_history_again_a_few_times(model_path):
    # Sized per generation (no n_ctx), a chat's context grows with it, and a
    # bigger context starts empty. It grows by doubling, up to what the policy
    # needs, so the history is prefilled again only at 512, 1,024, 2,048 cells.
    with ScopeLlama(model_path) as llm:
        messages: list[dict] = []
        sizes, again = [], 0
        for turn in range(12):
            messages.append({"role": "user", "content": _words(90, start=turn)})
            st = create_chat_completion(llm, messages, max_tokens=8)["scope_edge"]
            messages.append({"role": "assistant", "content": "Noted."})
            sizes.append(st["kv_cells_allocated"])
            again += turn > 0 and st["reused_prompt_tokens"] == 0
        assert sizes == sorted(sizes) and sizes[-1] <= llm.budget.total
        assert len(set(sizes)) <= 4 and again == len(set(sizes)) - 1, sizes


def test_chunked_turn_fits_on_the_last_reply(model_path):
    # Regression: a chunked turn was sized for the kept prompt + one chunk, but
    # its first chunk lands on everything the last turn left, reply included
    # (64 + 15 cells here): 79 + 192 > 256 cells, "no free KV cell".
    b = Budget(prefill=64, decode=16, observation_window=8, recent_window=8)
    with ScopeLlama(model_path, budget=b, prefill_chunk=192) as llm:
        messages = [{"role": "user", "content": _words(60)}]
        r = create_chat_completion(llm, messages, max_tokens=16)
        messages += [r["choices"][0]["message"], {"role": "user", "content": _words(250, start=1)}]
        fed = len(llm.history())
        r = create_chat_completion(llm, messages, max_tokens=16)
        st = r["scope_edge"]
        # 79 + 192 cells do not fit the first turn's 256: the first chunk is cut to the room left
        # and the turn runs on the history in the same cells (it once re-created a bigger context,
        # empty, and prefilled the whole conversation again)
        assert (st["kv_cells_allocated"], st["reused_prompt_tokens"]) == (256, fed)
        assert st["kv_cells_peak"] <= b.prefill + b.decode and st["prefill_cells_peak"] <= 256
        messages += [r["choices"][0]["message"], {"role": "user", "content": _words(250, start=2)}]
        st = create_chat_completion(llm, messages, max_tokens=16)["scope_edge"]
        assert st["kv_cells_allocated"] == 256 and st["reused_prompt_tokens"] > 0


def test_bad_messages(model_path):
    with ScopeLlama(model_path, budget=None) as llm:
        with pytest.raises(ValueError, match="empty"):
            create_chat_completion(llm, [])
        with pytest.raises(ValueError, match=r"messages\[0\]"):
            create_chat_completion(llm, [{"role": "wizard", "content": "hi"}])


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scope_edge.cli", *args], input=stdin, capture_output=True, text=True, timeout=300
    )


def test_cli_generate_chat_models_and_errors(model_path):
    prompt = render_chat_text(model_path, FIRST)
    budget = ["--prefill-budget", "64", "--decode-budget", "16", "--recent-window", "8"]
    gen = _cli("generate", prompt, "--model", model_path, "--max-tokens", "12", "--temperature", "0", *budget)
    assert gen.returncode == 0, gen.stderr
    # the CLI samples with llama.cpp's CLI defaults: seeded, it is what the API gives with them
    sampled = _cli("generate", prompt, "--model", model_path, "--max-tokens", "12", "--seed", "7", *budget)
    assert sampled.returncode == 0, sampled.stderr
    with ScopeLlama(model_path, budget=Budget(prefill=64, decode=16, recent_window=8)) as llm:
        assert gen.stdout == llm.generate(prompt, max_tokens=12).text + "\n"
        assert sampled.stdout == llm.generate(prompt, max_tokens=12, sampling=Sampling.llama_cli(seed=7)).text + "\n"
    assert "KV" in gen.stderr and "tok/s" in gen.stderr

    chat = _cli("chat", "--model", model_path, "--max-tokens", "20", stdin="Name three colours.\nAnd animals?\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stderr.count("[turn:") == 2 and "reused from the cache" in chat.stderr

    models = _cli("models", "list")
    assert models.returncode == 0 and "smollm2" in models.stdout and "gemma3-270m-q4_k_m" in models.stdout

    bad = _cli("generate", "hi", "--model", model_path, "--max-tokens", "0")
    assert bad.returncode != 0
    assert bad.stderr.strip().count("\n") == 0 and "max_tokens" in bad.stderr
    missing = _cli("generate", "hi", "--model", "/nope/x.gguf")
    assert missing.returncode != 0 and "/nope/x.gguf" in missing.stderr

    for cmd in ("generate", "chat", "bench", "models"):
        helped = _cli(cmd, "--help")
        assert helped.returncode == 0 and "usage:" in helped.stdout


def test_cli_bench_json_last_line(model_path):
    out = _cli("bench", "--model", model_path, "--prompt-tokens", "300", "--max-tokens", "24",
               "--prefill-budget", "128", "--decode-budget", "32", "--recent-window", "8", "--json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ours"]["kv_bytes"] <= res["stock"]["kv_bytes"]  # 300 + 24 tokens: both pad to 512 cells
    assert 0.0 <= res["fidelity"]["top1_agreement"] <= 1.0
