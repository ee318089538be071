"""Reliability: bad input, interrupts, leaks, threads, and the hook's checks of
the graph it reads. Nothing here may crash the Python process, hang, leak or
silently produce wrong output.

Tests that would crash the interpreter if the bug they look for is present
run their scenario in a subprocess. Models are created with n_threads=1: the
test machine runs benchmarks concurrently, and llama.cpp's two-thread barrier
then stalls prefill by seconds. Tiny random-weight GGUFs (tests/tiny_gguf.py)
stand in where an architecture or raw speed matters more than real weights.
"""
from __future__ import annotations

import ctypes
import gc
import math
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import llama_cpp
import numpy as np
import pytest

import scope_edge.hook as se_hook
from scope_edge import Budget, Sampling, ScopeLlama
from scope_edge.hook import HookError
from scope_edge.memory import read_geometry
from scope_edge.runtime.context import Context
from scope_edge.runtime.text import TextStream
from tiny_gguf import write_tiny_gguf

T = 1  # n_threads for every instance (see the module docstring)
B = Budget(prefill=64, decode=32, observation_window=8, recent_window=8)
SMALL = Budget(prefill=16, decode=8, observation_window=4, recent_window=4)
CHAT = "<|im_start|>user\nWrite a long story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"
REPO = Path(__file__).resolve().parents[1]


def _text_of(n: int) -> str:
    """About n tokens of the default model (the words of tests/test_runtime.py)."""
    words = "the keeper counted ships and wrote their names in a blue book every night".split()
    return " ".join(words[i % len(words)] + str(i % 7) for i in range(n // 2))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Tiny GGUFs: "llama" (trained context 4096), "mamba", "gemma3" (iSWA window 64)."""
    d = tmp_path_factory.mktemp("tiny")
    return {
        "llama": write_tiny_gguf(d / "llama.gguf", "llama", n_ctx_train=4096),
        "mamba": write_tiny_gguf(d / "mamba.gguf", "mamba"),
        "gemma3": write_tiny_gguf(d / "gemma3.gguf", "gemma3", sliding_window=64),
    }


@pytest.fixture(scope="module")
def llm(model_path):
    """One full-cache instance shared by the cheap input checks."""
    with ScopeLlama(model_path, budget=None, n_threads=T) as m:
        yield m


# =============================================================================
# 1. Bad input: the right exception, a message naming the problem (and numbers)
# =============================================================================


@dataclass(frozen=True)
class Env:
    model: Path
    files: Path
    tiny: dict[str, Path]
    llm: ScopeLlama


@pytest.fixture(scope="module")
def env(model_path, tiny, llm, tmp_path_factory) -> Env:
    d = tmp_path_factory.mktemp("bad")
    data = Path(model_path).read_bytes()
    (d / "empty.gguf").write_bytes(b"")
    (d / "zip.gguf").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    (d / "lfs.gguf").write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 98362432\n")
    (d / "short.gguf").write_bytes(data[:10])
    (d / "head.gguf").write_bytes(data[: 1 << 20])  # ends inside the tokenizer metadata
    (d / "tail.gguf").write_bytes(data[:-4096])  # ends inside the last tensor
    (d / "v9.gguf").write_bytes(b"GGUF" + (9).to_bytes(4, "little") + data[8:4096])
    (d / "adir.gguf").mkdir()
    return Env(Path(model_path), d, tiny, llm)


SIZE = 98_362_432  # the default model's bytes

# (id, call, exception, regex the message must match)
BAD_INPUT: list[tuple[str, Callable[[Env], Any], type[BaseException], str]] = [
    # -- files
    ("missing file", lambda e: ScopeLlama(e.files / "nope.gguf"), FileNotFoundError, r"nope\.gguf.*absolute"),
    ("directory", lambda e: ScopeLlama(e.files / "adir.gguf"), ValueError, r"adir\.gguf is not a file"),
    ("empty file", lambda e: ScopeLlama(e.files / "empty.gguf"), ValueError, r"empty \(0 bytes\)"),
    ("zip, not GGUF", lambda e: ScopeLlama(e.files / "zip.gguf"), ValueError, r"not a GGUF file.*PK"),
    ("git-lfs pointer", lambda e: ScopeLlama(e.files / "lfs.gguf"), ValueError, r"Git LFS pointer.*git lfs pull"),
    ("10-byte GGUF", lambda e: ScopeLlama(e.files / "short.gguf"), ValueError, r"10 bytes, shorter than a GGUF header \(24"),
    ("GGUF version 9", lambda e: ScopeLlama(e.files / "v9.gguf"), ValueError, r"GGUF version 9 is not supported"),
    ("truncated metadata", lambda e: ScopeLlama(e.files / "head.gguf"), ValueError,
     r"\(1,048,576 bytes\) is not a valid GGUF file or is truncated \(.*1,048,5\d\d.*\); fetch or copy it again"),
    ("truncated tensor data", lambda e: ScopeLlama(e.files / "tail.gguf"), ValueError,
     rf"\({SIZE - 4096:,} bytes\).*truncated \(its tensor data ends at byte {SIZE:,}\)"),
    # -- architectures whose memory this runtime cannot evict from, refused at load
    ("recurrent (mamba)", lambda e: ScopeLlama(e.tiny["mamba"]), ValueError,
     r"mamba\.gguf: recurrent and hybrid models keep state that cannot be evicted.*attention models"),
    ("sliding window only (gemma3, 2 layers)", lambda e: ScopeLlama(e.tiny["gemma3"], budget=B), ValueError,
     r"gemma3\.gguf: sliding-window attention \(n_swa=64, an iSWA cache\): gemma3 has no full-attention layer"),
    # -- budgets
    ("Budget float", lambda e: Budget(prefill=64.0, decode=32), ValueError, r"Budget\.prefill must be an int, got 64\.0"),
    ("Budget bool", lambda e: Budget(prefill=64, decode=True), ValueError, r"Budget\.decode must be an int, got True"),
    ("Budget negative", lambda e: Budget(prefill=-5, decode=32), ValueError, r"prefill >= 1 and decode >= 2.*prefill=-5"),
    ("Budget window 0", lambda e: Budget(prefill=8, decode=8, observation_window=0, recent_window=4), ValueError,
     r"observation_window must be in \[1, prefill=8\], got 0"),
    ("Budget recent 0", lambda e: Budget(prefill=8, decode=8, observation_window=4, recent_window=0), ValueError,
     r"recent_window must be in \[1, decode=8\], got 0"),
    ("budget over a fixed n_ctx", lambda e: ScopeLlama(e.model, n_ctx=256, budget=Budget(prefill=512, decode=512),
                                                       n_threads=T).generate("hi", max_tokens=600), ValueError,
     r"needs 513 KV cells but n_ctx is fixed at 256; raise n_ctx or lower the budgets"),
    # -- strategies, selectors and other settings (checked before the file is opened)
    ("strategy case", lambda e: ScopeLlama("unused.gguf", strategy="SLIDE"), ValueError,
     r"unknown strategy 'SLIDE'; valid: slide, adaptive, discontinuous, streaming, h2o, full"),
    ("strategy None", lambda e: ScopeLlama("unused.gguf", strategy=None), ValueError, r"unknown strategy None"),
    ("selector case", lambda e: ScopeLlama("unused.gguf", prefill_selector="SnapKV"), ValueError,
     r"unknown prefill selector 'SnapKV'; valid: snapkv, h2o, streaming, full"),
    ("n_ctx 0", lambda e: ScopeLlama("unused.gguf", n_ctx=0), ValueError, r"n_ctx must be an int >= 1 or None.*got 0"),
    ("n_ctx float", lambda e: ScopeLlama("unused.gguf", n_ctx=512.0), ValueError, r"n_ctx must be an int.*512\.0"),
    ("n_threads 0", lambda e: ScopeLlama("unused.gguf", n_threads=0), ValueError, r"n_threads must be an int >= 1.*got 0"),
    ("n_gpu_layers str", lambda e: ScopeLlama("unused.gguf", n_gpu_layers="all"), ValueError,
     r"n_gpu_layers must be an int >= -1 \(-1: every layer\), got 'all'"),
    ("prefill_chunk 0", lambda e: ScopeLlama("unused.gguf", prefill_chunk=0), ValueError, r"prefill_chunk must be an int >= 1 or None \(automatic\), got 0"),
    ("chunked_prefill str", lambda e: ScopeLlama("unused.gguf", chunked_prefill="yes"), ValueError,
     r"chunked_prefill must be None \(auto\), True or False, got 'yes'"),
    ("type_k q5_0", lambda e: ScopeLlama("unused.gguf", type_k="q5_0"), ValueError,
     r"type_k must be one of \['f16', 'q4_0', 'q8_0'\], got 'q5_0'"),
    # -- sampling
    ("max_tokens -1", lambda e: e.llm.generate("hi", max_tokens=-1), ValueError, r"max_tokens must be an int >= 1, got -1"),
    ("max_tokens float", lambda e: e.llm.generate("hi", max_tokens=2.5), ValueError, r"max_tokens must be an int >= 1, got 2\.5"),
    ("max_tokens None", lambda e: e.llm.generate("hi", max_tokens=None), ValueError, r"max_tokens must be an int >= 1, got None"),
    ("max_tokens bool", lambda e: e.llm.generate("hi", max_tokens=True), ValueError, r"max_tokens must be an int >= 1, got True"),
    ("temperature < 0", lambda e: e.llm.generate("hi", sampling=Sampling(temperature=-0.5)), ValueError,
     r"temperature must be a finite number >= 0 \(0 is greedy\), got -0\.5"),
    ("temperature nan", lambda e: e.llm.generate("hi", sampling=Sampling(temperature=math.nan)), ValueError,
     r"temperature.*got nan"),
    ("temperature inf", lambda e: e.llm.generate("hi", sampling=Sampling(temperature=math.inf)), ValueError,
     r"temperature.*got inf"),
    ("temperature str", lambda e: e.llm.generate("hi", sampling=Sampling(temperature="0.7")), ValueError,
     r"temperature.*got '0\.7'"),
    ("top_k -1", lambda e: e.llm.generate("hi", sampling=Sampling(top_k=-1)), ValueError,
     r"top_k must be an int >= 0 \(0 disables it\), got -1"),
    ("top_k float", lambda e: e.llm.generate("hi", sampling=Sampling(top_k=1.5)), ValueError, r"top_k.*got 1\.5"),
    ("top_p 0", lambda e: e.llm.generate("hi", sampling=Sampling(top_p=0.0)), ValueError,
     r"top_p must be in \(0, 1\] \(1 disables it\), got 0\.0"),
    ("top_p 1.5", lambda e: e.llm.generate("hi", sampling=Sampling(top_p=1.5)), ValueError,
     r"top_p must be in \(0, 1\] \(1 disables it\), got 1\.5"),
    ("top_p nan", lambda e: e.llm.generate("hi", sampling=Sampling(top_p=math.nan)), ValueError, r"top_p.*got nan"),
    ("sampling dict", lambda e: e.llm.generate("hi", sampling={"temperature": 0.5}), ValueError,
     r"sampling must be a scope_edge\.Sampling or None \(greedy\), got dict"),
    ("temperature= on generate", lambda e: e.llm.generate("hi", temperature=0.5), TypeError, r"temperature"),
    # -- stop strings
    ("stop ''", lambda e: e.llm.generate("hi", stop=""), ValueError, r"stop strings must be non-empty str, got \[''\]"),
    ("stop ['a', '']", lambda e: e.llm.generate("hi", stop=["a", ""]), ValueError, r"stop strings must be non-empty str"),
    ("stop [None]", lambda e: e.llm.generate("hi", stop=[None]), ValueError, r"stop strings must be non-empty str, got \[None\]"),
    ("stop bytes", lambda e: e.llm.generate("hi", stop=b"x"), ValueError, r"stop strings must be non-empty str"),
    # -- prompts
    ("prompt []", lambda e: e.llm.generate([], max_tokens=2), ValueError, r"prompt has no tokens"),
    ("token id float", lambda e: e.llm.generate([1, 2.0], max_tokens=2), ValueError, r"prompt token ids must be ints, got \[2\.0\]"),
    ("token id bool", lambda e: e.llm.generate([True], max_tokens=2), ValueError, r"prompt token ids must be ints, got \[True\]"),
    ("token id -1", lambda e: e.llm.generate([1, -1], max_tokens=2), ValueError,
     r"token ids \[-1\] are outside the vocabulary \[0, 49152\)"),
    ("token id n_vocab", lambda e: e.llm.generate([49152, 5, 10**9], max_tokens=2), ValueError,
     r"token ids \[49152, 1000000000\] are outside the vocabulary \[0, 49152\)"),
    ("lone surrogate", lambda e: e.llm.generate("a\ud800b", max_tokens=2), ValueError, r"surrogates not allowed"),
    # bytes would otherwise be taken as token ids ([104, 101, 108, ...] for b"hello")
    ("bytes prompt", lambda e: e.llm.generate(b"hello", max_tokens=2), TypeError, r"prompt.*bytes.*decode"),
    ("None prompt", lambda e: e.llm.generate(None, max_tokens=2), TypeError, r"prompt must be a str or a sequence of token ids"),
    ("int prompt", lambda e: e.llm.generate(5, max_tokens=2), TypeError, r"prompt must be a str or a sequence of token ids"),
    ("temperature bool", lambda e: e.llm.generate("hi", sampling=Sampling(temperature=True), max_tokens=2), ValueError,
     r"temperature"),
    # settings a policy refuses fail at construction, not at the first generation
    ("streaming budget too small, at construction",
     lambda e: ScopeLlama(e.model, budget=Budget(prefill=2, decode=2, observation_window=1, recent_window=1),
                          strategy="streaming", n_threads=T), ValueError, r"(?is)streaming.*>= 6, got 4"),
    ("seed str", lambda e: e.llm.generate("hi", sampling=Sampling(seed="x")), ValueError,
     r"seed must be an int in \[0, 2\*\*32 - 1\].*got 'x'"),
    ("seed= on the facade", lambda e: ScopeLlama(e.model, seed=1, n_threads=T), TypeError, r"seed"),
    ("n_threads bool", lambda e: ScopeLlama(e.model, n_threads=True), ValueError, r"n_threads must be an int >= 1"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_table(env, call, exc, match):
    with pytest.raises(exc, match=match):
        call(env)
    # the shared instance survives every refusal
    assert env.llm.generate([1, 2, 3], max_tokens=1).stats.generated_tokens == 1


def test_read_geometry_flags_what_the_facade_refuses(tiny):
    mamba, gemma, llama = (read_geometry(tiny[a]) for a in ("mamba", "gemma3", "llama"))
    assert mamba.recurrent and "recurrent state" in mamba.unsupported_reason()
    assert gemma.sliding_window == 64 and "no full-attention layer" in gemma.unsupported_reason()
    assert llama.unsupported_reason() is None
    # the positive control: the same writer makes a model that loads and runs under a budget
    with ScopeLlama(tiny["llama"], budget=SMALL, n_threads=T) as m:
        out = m.generate("hello world " * 20, max_tokens=30, ignore_eos=True)
    assert out.stats.generated_tokens == 30 and out.stats.evicted_cells > 0


def test_refused_models_leak_no_file_descriptors(tiny):
    before = _n_fds()
    for _ in range(20):
        for arch in ("mamba", "gemma3"):
            with pytest.raises(ValueError):
                ScopeLlama(tiny[arch], budget=None, n_threads=T)
    gc.collect()
    assert _n_fds() <= before + 1


SPECIAL_ONLY = [[1], [2], [1, 2], [0], [0, 0, 0], [1, 2] * 20, "<|im_start|><|im_end|>", "<|endoftext|>"]


def test_special_token_prompts_match_stock(model_path, llm):
    stock = llama_cpp.Llama(model_path, n_ctx=512, n_threads=T, verbose=False)
    try:
        for prompt in SPECIAL_ONLY:
            ids = prompt
            if isinstance(prompt, str):
                ids = stock.tokenize(prompt.encode(), special=True)
                assert llm.tokenize(prompt) == ids
            stock.reset()
            want = []
            for tok in stock.generate(ids, temp=0.0):
                if llama_cpp.llama_vocab_is_eog(llm.model.vocab, tok) or len(want) == 6:
                    break
                want.append(tok)
            got = llm.generate(prompt, max_tokens=6)
            assert got.tokens == want, prompt
    finally:
        stock.close()
    with ScopeLlama(model_path, budget=SMALL, n_threads=T) as m:  # and under a tiny budget: no crash
        for prompt in SPECIAL_ONLY:
            assert m.generate(prompt, max_tokens=12, ignore_eos=True).stats.generated_tokens == 12


UNICODE = [
    "👩‍👩‍👧‍👦 family, 🇯🇵 flag, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "مرحبا بالعالم — שלום עולם",  # right to left
    "e\u0301 a\u0308 n\u0303 \u200b\u200d\ufeff",  # combining marks, zero-width, BOM
    "日本語のテキストと中文文本",
    "nul \x00 inside, tab \t, bell \x07",
    "\U0010ffff\ue000 private use",
]


def test_any_unicode_prompt_tokenizes_as_stock_and_decodes_consistently(model_path, llm):
    stock = llama_cpp.Llama(model_path, n_ctx=512, n_threads=T, verbose=False, vocab_only=True)
    try:
        for text in UNICODE:
            ids = llm.tokenize(text)
            assert ids == stock.tokenize(text.encode("utf-8"), special=True), text
            chunks = list(llm.stream(text, max_tokens=8))
            out = llm.generate(text, max_tokens=8)
            assert "".join(c.text for c in chunks) == out.text
            raw = b"".join(llm.model.piece(t) for t in out.tokens)
            assert out.text == raw.decode("utf-8", errors="replace")
            # no chunk splits a character: every chunk but the last is whole UTF-8
            assert all("\ufffd" not in c.text for c in chunks[:-1]) or "\ufffd" in raw.decode("utf-8", "replace")
    finally:
        stock.close()


def test_model_path_with_unicode_and_spaces(model_path, tmp_path):
    path = tmp_path / "mödel 日本 ✓.gguf"
    path.symlink_to(model_path)
    with ScopeLlama(path, budget=None, n_threads=T) as m:
        assert m.generate("Hi", max_tokens=2).stats.generated_tokens == 2
        assert m.model_path.endswith(".gguf")


def test_stop_strings_edge_cases(llm):
    free = llm.generate(CHAT, max_tokens=24)
    assert len(free.text) > 10
    # a stop string only in the prompt changes nothing
    assert llm.generate(CHAT, max_tokens=24, stop=["lighthouse keeper."]).text == free.text
    # a stop string longer than the output never matches, and is not half-shown
    never = free.text + "@@never@@"
    got = llm.generate(CHAT, max_tokens=24, stop=never)
    assert got.text == free.text and got.finish_reason == "length"
    # a stop at the very start: empty text
    got = llm.generate(CHAT, max_tokens=24, stop=free.text[:2])
    assert got.text == "" and got.finish_reason == "stop"
    # several stops: the text ends before the first one that occurs
    a, b = free.text[5:8], free.text[12:15]
    got = llm.generate(CHAT, max_tokens=24, stop=[b, a])
    assert got.text == free.text[: free.text.index(a)] and got.finish_reason == "stop"


def test_unicode_stop_string(llm):
    prompt = "<|im_start|>user\nTranslate to Japanese: I love the sea.<|im_end|>\n<|im_start|>assistant\n"
    free = llm.generate(prompt, max_tokens=30)
    wide = [i for i, ch in enumerate(free.text) if ord(ch) > 0x2E80 and i > 0]
    if not wide:
        pytest.skip(f"the model wrote no CJK here: {free.text!r}")
    i = wide[len(wide) // 2]
    got = llm.generate(prompt, max_tokens=30, stop=free.text[i])
    assert got.text == free.text[: free.text.index(free.text[i])] and got.finish_reason == "stop"
    assert "\ufffd" not in got.text


def test_text_stream_cuts_at_the_earliest_stop_string():
    # Regression: push once cut at the first stop *in list order* found in the
    # held text, so the output could contain another stop string that occurs earlier.
    ts = TextStream(("e", "t"))
    assert ts.push(b" the") == " " and ts.stopped


# =============================================================================
# 3. Interrupts
# =============================================================================


def _interrupt_second_prefill_batch(monkeypatch, where: str) -> list[int]:
    """Make the 2nd decode (the prompt's 2nd 512-token batch) raise
    KeyboardInterrupt: "before" it reaches llama.cpp, or "after" llama_decode
    returned (a Ctrl-C that arrived while in C is raised there, before the hook's
    end)."""
    calls = [0]
    if where == "before":
        real = Context.decode

        def decode(self, tokens, positions, *, want_logits):
            calls[0] += 1
            if calls[0] == 2:
                raise KeyboardInterrupt
            return real(self, tokens, positions, want_logits=want_logits)

        monkeypatch.setattr(Context, "decode", decode)
    else:
        real_c = llama_cpp.llama_decode

        def llama_decode(ctx, batch):
            rc = real_c(ctx, batch)
            calls[0] += 1
            if calls[0] == 2:
                raise KeyboardInterrupt
            return rc

        monkeypatch.setattr(llama_cpp, "llama_decode", llama_decode)
    return calls


def _llama_agrees(m: ScopeLlama) -> None:
    """The hook's cell map and llama.cpp's own memory describe the same sequence."""
    held = m.kv_positions()
    mem = m.context.memory
    pmax = llama_cpp.llama_memory_seq_pos_max(mem, 0)
    assert pmax == (held.max() if len(held) else -1)
    assert llama_cpp.llama_memory_seq_pos_min(mem, 0) == (held.min() if len(held) else -1)


def _interrupt_case(path, budget, where, prompt, monkeypatch, max_tokens=16):
    with ScopeLlama(path, budget=budget, n_threads=T) as fresh:
        want = fresh.generate(prompt, max_tokens=max_tokens, ignore_eos=True)
    with ScopeLlama(path, budget=budget, n_threads=T) as m:
        with monkeypatch.context() as mp:
            calls = _interrupt_second_prefill_batch(mp, where)
            with pytest.raises(KeyboardInterrupt):
                m.generate(prompt, max_tokens=max_tokens, ignore_eos=True)
            assert calls[0] == 2
        _llama_agrees(m)
        got = m.generate(prompt, max_tokens=max_tokens, ignore_eos=True)
        _llama_agrees(m)
        again = "".join(c.text for c in m.stream(prompt, max_tokens=max_tokens, ignore_eos=True))
    assert got.tokens == want.tokens and got.text == want.text == again
    assert got.stats.evicted_cells == want.stats.evicted_cells


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("budget", [None, B, Budget(prefill=600, decode=16, observation_window=8, recent_window=4)],
                         ids=["full", "chunked", "one-shot"])
def test_keyboard_interrupt_in_prefill_tiny(tiny, monkeypatch, budget, where):
    """The 2nd 512-token batch of a 900-token prompt is interrupted (tiny model:
    the whole matrix in a second)."""
    rng = np.random.default_rng(1)
    prompt = [1] + rng.integers(3, 263, 899).tolist()
    _interrupt_case(tiny["llama"], budget, where, prompt, monkeypatch, max_tokens=40)


def test_keyboard_interrupt_in_prefill_real_model(model_path, monkeypatch):
    with ScopeLlama(model_path, budget=None, n_threads=T) as m:
        prompt = m.tokenize(_text_of(560))[:530]
    assert len(prompt) > 512
    _interrupt_case(model_path, B, "after", prompt, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("budget", [None, B], ids=["full", "budget"])
def test_keyboard_interrupt_in_prefill_real_model_matrix(model_path, monkeypatch, budget, where):
    with ScopeLlama(model_path, budget=None, n_threads=T) as m:
        prompt = m.tokenize(_text_of(1200))[:1100]
    _interrupt_case(model_path, budget, where, prompt, monkeypatch)


@pytest.fixture(scope="module")
def scoped(model_path):
    """A budgeted instance and what a fresh instance generates for CHAT."""
    with ScopeLlama(model_path, budget=SMALL, n_threads=T) as fresh:
        want = fresh.generate(CHAT, max_tokens=24, ignore_eos=True)
    with ScopeLlama(model_path, budget=SMALL, n_threads=T) as m:
        yield m, want


class _ConsumerError(Exception):
    pass


@pytest.mark.parametrize("exc", [_ConsumerError, KeyboardInterrupt])
def test_consumer_exception_mid_stream_leaves_instance_usable(scoped, exc):
    m, want = scoped

    def consume() -> None:
        stream = m.stream(CHAT, max_tokens=200, ignore_eos=True)  # a local: the traceback keeps it alive
        for i, _ in enumerate(stream):
            if i == 12:  # past the first evictions
                raise exc

    with pytest.raises(exc) as info:
        consume()
    assert info.value is not None  # the traceback (and the suspended stream) are still referenced
    got = m.generate(CHAT, max_tokens=24, ignore_eos=True)
    assert got.tokens == want.tokens and got.stats.evicted_cells == want.stats.evicted_cells
    _llama_agrees(m)


def test_closed_and_abandoned_streams_and_teacher_force(scoped):
    m, want = scoped
    s = m.stream(CHAT, max_tokens=200, ignore_eos=True)
    for _ in range(15):
        next(s)
    s.close()
    with pytest.raises(StopIteration):
        next(s)
    forced = m.teacher_force(CHAT, want.tokens)
    next(forced), next(forced)  # left suspended in this thread
    s2 = m.stream(CHAT, max_tokens=200, ignore_eos=True)
    next(s2)
    s3 = m.stream(CHAT, max_tokens=24, ignore_eos=True)  # ends s2, which holds the lock
    with pytest.raises(StopIteration):
        next(s2)
    assert [c.token for c in s3 if c.token is not None] == want.tokens
    # a stream started and abandoned in another thread is closed when that thread's reference goes
    t = threading.Thread(target=lambda: next(m.stream(CHAT, max_tokens=200)))
    t.start()
    t.join()
    gc.collect()
    assert m.generate(CHAT, max_tokens=24, ignore_eos=True).tokens == want.tokens


STREAM_AFTER_CLOSE = """
from scope_edge import Budget, ScopeLlama
m = ScopeLlama({path!r}, n_threads=1, budget=Budget(prefill=16, decode=8, observation_window=4, recent_window=4))
s = m.stream("hello world " * 10, max_tokens=50, ignore_eos=True)
next(s), next(s)
m.close()
try:
    next(s)
except StopIteration:
    print("ok: the stream ended")
except RuntimeError as exc:
    print("ok: closed" if "closed" in str(exc) else f"unclear: {{exc}}")
del s
for _ in range(20):  # the heap must still be sound
    with ScopeLlama({path!r}, budget=None, n_threads=1) as k:
        k.generate("hello " * 50, max_tokens=20)
print("survived")
"""


def test_using_a_stream_after_close_in_the_same_thread_is_safe(tiny):
    # Regression: close() once freed the llama_batch under a suspended stream,
    # whose next step wrote token ids into the freed batch (heap corruption;
    # SIGBUS with MALLOC_PERTURB_). A subprocess, so a relapse cannot kill pytest.
    env = dict(os.environ, MALLOC_CHECK_="3", MALLOC_PERTURB_="165")
    proc = subprocess.run([sys.executable, "-c", STREAM_AFTER_CLOSE.format(path=str(tiny["llama"]))],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-1500:]}"
    assert "ok: " in proc.stdout and "survived" in proc.stdout, proc.stdout


# =============================================================================
# 4. Leaks
# =============================================================================


def _n_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss() -> int:
    """Resident bytes after a full collection and giving free heap back to the OS."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


MiB = 1 << 20
# RSS is read from /proc; under AddressSanitizer (memcheck_hook.py --asan) freed
# memory sits in its quarantine, so RSS says nothing about our leaks there.
linux_only = pytest.mark.skipif(not Path("/proc/self/statm").exists() or "libasan" in os.environ.get("LD_PRELOAD", ""),
                                reason="reads /proc; RSS is meaningless under AddressSanitizer")


def _soak(path, n: int, prompt, budget) -> tuple[int, int]:
    """RSS and fd growth over n generations on one instance, after a warm-up."""
    with ScopeLlama(path, budget=budget, n_threads=T) as m:
        for i in range(5):
            m.generate(prompt, max_tokens=12, ignore_eos=True, sampling=Sampling(temperature=0.8 * (i % 2)))
        rss, fds = _rss(), _n_fds()
        for i in range(n):
            if i % 3 == 0:  # also the interrupted paths
                for j, _ in enumerate(m.stream(prompt, max_tokens=12, ignore_eos=True)):
                    if j == 5:
                        break
            else:
                m.generate(prompt, max_tokens=12, ignore_eos=True, sampling=Sampling(temperature=0.8 * (i % 2)))
        grown, fds_grown = _rss() - rss, _n_fds() - fds
    print(f"\n{Path(path).name}: {n} generations grew RSS by {grown / MiB:+.2f} MiB, fds by {fds_grown:+d}")
    return grown, fds_grown


@linux_only
def test_rss_flat_over_generations_tiny(tiny):
    grown, fds = _soak(tiny["llama"], 200, "hello world the a " * 6, SMALL)
    assert grown < 10 * MiB and fds <= 0


@linux_only
def test_rss_flat_over_generations_real_model(model_path):
    grown, fds = _soak(model_path, 30, CHAT, SMALL)
    assert grown < 10 * MiB and fds <= 0


@linux_only
@pytest.mark.slow
def test_rss_flat_over_200_generations_real_model(model_path):
    grown, fds = _soak(model_path, 200, CHAT, SMALL)
    assert grown < 10 * MiB and fds <= 0


def _churn(path, n: int, *, close: bool) -> tuple[int, int]:
    def one() -> None:
        m = ScopeLlama(path, budget=SMALL, n_threads=T)
        m.generate("hello world the a " * 4, max_tokens=10, ignore_eos=True)
        if close:
            m.close()
        else:
            del m  # relies on __del__

    for _ in range(3):
        one()
    rss, fds = _rss(), _n_fds()
    for _ in range(n):
        one()
    grown, fds_grown = _rss() - rss, _n_fds() - fds
    print(f"\n{Path(path).name}: {n} instances ({'closed' if close else 'dropped'}) grew RSS by "
          f"{grown / MiB:+.2f} MiB, fds by {fds_grown:+d}")
    return grown, fds_grown


@linux_only
@pytest.mark.parametrize("close", [True, False], ids=["closed", "dropped"])
def test_instances_churn_tiny(tiny, close):
    grown, fds = _churn(tiny["llama"], 50, close=close)
    assert grown < 8 * MiB and fds <= 0


@linux_only
def test_instances_churn_real_model(model_path):
    grown, fds = _churn(model_path, 8, close=True)
    assert grown < 16 * MiB and fds <= 0


@linux_only
@pytest.mark.slow
def test_50_instances_real_model(model_path):
    grown, fds = _churn(model_path, 50, close=True)
    assert grown < 16 * MiB and fds <= 0


# =============================================================================
# 5. Threads
# =============================================================================


def _in_threads(*jobs: Callable[[], Any], timeout: float = 300) -> list[Any]:
    results: list[Any] = [None] * len(jobs)

    def run(i: int) -> None:
        try:
            results[i] = jobs[i]()
        except BaseException as exc:  # surfaced by the caller
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a generation hung"
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def test_one_instance_two_threads_is_serialised(scoped):
    m, want = scoped
    outs = _in_threads(*[lambda: [m.generate(CHAT, max_tokens=24, ignore_eos=True).tokens for _ in range(2)]] * 2)
    assert all(toks == want.tokens for pair in outs for toks in pair)

    # a stream held open in one thread makes another thread's generation wait, not interleave
    held = m.stream(CHAT, max_tokens=24, ignore_eos=True)
    first = next(held)
    other: list[Any] = []
    t = threading.Thread(target=lambda: other.append(m.generate(CHAT, max_tokens=24, ignore_eos=True)))
    t.start()
    time.sleep(0.5)
    assert t.is_alive() and not other  # waiting for the lock
    mine = [first.token] + [c.token for c in held if c.token is not None]
    t.join(120)
    assert mine == want.tokens and other[0].tokens == want.tokens


def test_two_instances_in_two_threads_match_single_thread_runs(model_path):
    specs = [dict(budget=SMALL, strategy="slide"), dict(budget=B, strategy="h2o")]
    prompts = [CHAT, _text_of(150)]
    with ScopeLlama(model_path, n_threads=T, **specs[0]) as a, ScopeLlama(model_path, n_threads=T, **specs[1]) as b:
        want = [a.generate(prompts[0], max_tokens=40, ignore_eos=True).tokens,
                b.generate(prompts[1], max_tokens=40, ignore_eos=True).tokens]
        for _ in range(2):
            got = _in_threads(lambda: a.generate(prompts[0], max_tokens=40, ignore_eos=True).tokens,
                              lambda: b.generate(prompts[1], max_tokens=40, ignore_eos=True).tokens)
            assert got == want


CLOSE_DURING_GENERATION = """
import threading, time
from scope_edge import ScopeLlama
llm = ScopeLlama({path!r}, budget=None, n_threads=1)
def run():
    try:
        out = llm.generate("Hello there " * 150, max_tokens=200, ignore_eos=True)
        print("thread: finished", out.stats.generated_tokens, flush=True)
    except RuntimeError as exc:
        print("thread: raised", exc, flush=True)
t = threading.Thread(target=run)
t.start()
time.sleep({delay})
llm.close()
print("main: closed", flush=True)
t.join()
"""


@pytest.mark.parametrize("delay", [0.5, 2.0], ids=["in-prefill", "in-decode"])
def test_close_from_another_thread_during_generation_does_not_crash(model_path, delay):
    # Regression: close() once freed the llama context under a running
    # llama_decode in another thread (SIGSEGV). A subprocess, as above.
    script = CLOSE_DURING_GENERATION.format(path=model_path, delay=delay)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-2000:]}"
    assert "main: closed" in proc.stdout
    assert "thread: finished" in proc.stdout or ("thread: raised" in proc.stdout and "closed" in proc.stdout)


CLOSE_DURING_LONG_PREFILL = """
import threading, time
from scope_edge import ScopeLlama
llm = ScopeLlama({path!r}, budget=None, n_threads=1)
prompt = llm.tokenize({text!r})
def run():
    try:
        llm.generate(prompt, max_tokens=4)
        print("thread: finished", flush=True)
    except RuntimeError as exc:
        print("thread: raised", exc, flush=True)
t = threading.Thread(target=run)
t.start()
time.sleep(3.0)  # in the prefill: {n} tokens in 512-token decodes take far longer at one thread
t0 = time.perf_counter()
llm.close()
print(f"main: closed in {{time.perf_counter() - t0:.2f}} s", flush=True)
t.join()
print("freed:", llm.context is None and llm.model.closed, flush=True)
"""


def test_close_stops_a_long_prefill_mid_decode(model_path):
    # Regression (issue #14.2): close() waited 60 s for the lock, then freed the
    # context whether or not it got it, and an unchunked prefill runs its
    # 512-token decodes with no check between them. Now llama.cpp's abort
    # callback stops the running decode, and close() frees after it let go.
    text = _text_of(6000)
    with ScopeLlama(model_path, budget=None, n_threads=T) as m:
        n = len(m.tokenize(text))
    assert 5000 < n < 8000  # unchunked (full cache), inside the trained context
    script = CLOSE_DURING_LONG_PREFILL.format(path=model_path, text=text, n=n)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-2000:]}"
    out = proc.stdout
    assert "thread: raised" in out and "closed" in out, out
    assert float(re.search(r"closed in ([0-9.]+) s", out).group(1)) < 2.0, out
    assert "freed: True" in out, out


def test_close_leaves_the_free_to_a_stream_suspended_in_another_thread(model_path):
    # close() never frees what another thread still holds: a stream suspended
    # there keeps the memory until it resumes (and raises "closed").
    # (close() waits its fixed 10 s for the lock here: no public setting shortens it.)
    m = ScopeLlama(model_path, budget=SMALL, n_threads=T)
    first = threading.Event()
    resume = threading.Event()
    outcome: list[str] = []

    def consume() -> None:
        s = m.stream(CHAT, max_tokens=50, ignore_eos=True)
        next(s)
        first.set()
        resume.wait(60)
        try:
            next(s)
            outcome.append("went on")
        except RuntimeError as exc:
            outcome.append(str(exc))

    t = threading.Thread(target=consume)
    t.start()
    assert first.wait(120)
    m.close()  # returns after its wait for the lock: the other thread holds it
    assert m.closed
    assert m.context is not None and not m.model.closed  # not freed under the suspended stream
    resume.set()
    t.join(120)
    assert outcome and "closed" in outcome[0], outcome
    assert m.context is None and m.model.closed  # the stream freed it as it ended
    with pytest.raises(RuntimeError, match="closed"):
        m.generate(CHAT, max_tokens=2)


# =============================================================================
# 6. The hook: graph checks, flash attention, version pin
# =============================================================================


@pytest.mark.parametrize("budget,strategy,selector,first_capture", [
    (B, "slide", None, "prefill"), (B, "slide", "streaming", "decode"), (B, "streaming", None, None),
    (B, "full", "full", None), (None, "slide", None, None),
], ids=["slide-snapkv", "slide-streaming", "streaming", "full-full", "no-budget"])
def test_flash_attention_behind_the_policys_back(model_path, monkeypatch, budget, strategy, selector, first_capture):
    """A context with flash attention on that the facade believes off (the
    supported way is flash_attn=True with scoring=Sketch(), tests/test_sketch.py):
    a policy that captures exact attention fails with a clear error at its
    first capture, every time and without a crash; one that never captures
    runs, since the hook understands the flash-attention graph."""
    monkeypatch.setattr(llama_cpp, "LLAMA_FLASH_ATTN_TYPE_DISABLED", llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED)
    with ScopeLlama(model_path, budget=budget, strategy=strategy, prefill_selector=selector, n_threads=T) as m:
        if first_capture is None:
            out = m.generate(CHAT, max_tokens=40, ignore_eos=True)
            assert len(out.tokens) == 40
            held = m.kv_positions()
            visible, _ = m.context.visible()
            assert len(visible) >= len(held) > 0
            return
        for _ in range(2):  # the same clear error every time, no crash
            chunks = []
            with pytest.raises(HookError, match="flash attention never computes") as info:
                for chunk in m.stream(CHAT, max_tokens=40, ignore_eos=True):
                    chunks.append(chunk)
            assert info.value.code == -3
            # the prefill selection captures before any token; streaming's prefill lets the decode start
            assert (len(chunks) == 0) == (first_capture == "prefill")


def test_llama_cpp_version_is_pinned_at_import():
    code = textwrap.dedent("""
        import llama_cpp
        llama_cpp.__version__ = "0.3.99"
        import scope_edge
        assert scope_edge.Budget(prefill=8, decode=8, observation_window=4, recent_window=4)  # no llama.cpp needed
        try:
            from scope_edge import ScopeLlama
        except ImportError as exc:
            print(exc)
        else:
            print("imported")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    msg = proc.stdout
    assert "llama-cpp-python==0.3.36" in msg and "found 0.3.99" in msg
    assert "pip install llama-cpp-python==0.3.36" in msg


# -- the hook on synthetic graphs: every tensor shape it reads is checked -----

_GGML = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
F32, F16, I32, I64 = 0, 1, 26, 27


class _Tensor(ctypes.Structure):
    """struct ggml_tensor of ggml.h (GGML_MAX_DIMS 4, MAX_OP_PARAMS 64, MAX_SRC 10, MAX_NAME 64)."""

    _fields_ = [
        ("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p), ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64), ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


_TP = ctypes.POINTER(_Tensor)
_VP = ctypes.c_void_p
_GGML_SIGS = {
    "ggml_init": (_VP, [_InitParams]), "ggml_free": (None, [_VP]),
    "ggml_new_tensor_4d": (_TP, [_VP, ctypes.c_int] + [ctypes.c_int64] * 4),
    "ggml_set_name": (_TP, [_TP, ctypes.c_char_p]),
    "ggml_set_rows": (_TP, [_VP, _TP, _TP, _TP]),
    "ggml_soft_max_ext": (_TP, [_VP, _TP, _TP, ctypes.c_float, ctypes.c_float]),
    "ggml_backend_cpu_buffer_type": (_VP, []),
    "ggml_backend_alloc_ctx_tensors_from_buft": (_VP, [_VP, _VP]),
    "ggml_backend_buffer_free": (None, [_VP]),
    "ggml_backend_tensor_set": (None, [_TP, _VP, ctypes.c_size_t, ctypes.c_size_t]),
    "ggml_tensor_overhead": (ctypes.c_size_t, []),
}
_G = {name: ctypes.CFUNCTYPE(res, *args)((name, _GGML)) for name, (res, args) in _GGML_SIGS.items()}

_EVAL = se_hook.EVAL_CALLBACK  # the hook's C eval callback, as llama.cpp's scheduler calls it


class _Graph:
    """The nodes of one ubatch that the hook reads (layer-0 K write, layer-0
    mask, kq_soft_max-<il>), built with ggml in a CPU buffer, so the hook can be
    fed shapes and names llama.cpp does not make today."""

    def __init__(self) -> None:
        self.ctx = _G["ggml_init"](_InitParams(1 << 20, None, True))
        self.data: list[tuple[Any, np.ndarray]] = []
        self.buf = None

    def tensor(self, type_: int, *ne: int, name: str | None = None, data: np.ndarray | None = None):
        t = _G["ggml_new_tensor_4d"](self.ctx, type_, *(list(ne) + [1] * (4 - len(ne))))
        if name:
            _G["ggml_set_name"](t, name.encode())
        if data is not None:
            self.data.append((t, data))
        return t

    def name(self, t, name: str):
        _G["ggml_set_name"](t, name.encode())
        return t

    def alloc(self) -> None:
        self.buf = _G["ggml_backend_alloc_ctx_tensors_from_buft"](self.ctx, _G["ggml_backend_cpu_buffer_type"]())
        assert self.buf
        for t, arr in self.data:
            arr = np.ascontiguousarray(arr)
            _G["ggml_backend_tensor_set"](t, arr.ctypes.data, 0, arr.nbytes)

    def close(self) -> None:
        if self.buf:
            _G["ggml_backend_buffer_free"](self.buf)
        _G["ggml_free"](self.ctx)


def _ubatch(g: _Graph, *, cells=(5, 6, 7), n_cache=8, n_kv=8, n_head=2, layer_names=("kq_soft_max-0",),
            visible=(0, 5, 6, 7), idx_type=I64, idx_name="attn_inp_k_idxs", idx_rows=1, mask_type=F32,
            mask_name="attn_inp_kq_mask", mask_rows=None, sm_rows=None, sm_type=F32):
    """set_rows + one softmax per layer name, as llama.cpp builds them; each
    softmax row attends uniformly to the visible cells."""
    n = len(cells)
    cache = g.tensor(F32, 4, n_cache, idx_rows, name="cache_k_l0")
    rows = g.tensor(F32, 4, n, idx_rows)
    idx = g.tensor(idx_type, n, idx_rows, name=idx_name,
                   data=np.tile(np.array(cells, dtype=np.int64 if idx_type == I64 else np.int32), idx_rows))
    write = _G["ggml_set_rows"](g.ctx, cache, rows, idx)
    m_rows, s_rows = mask_rows or n, sm_rows or n
    m = np.full((m_rows, n_kv), -np.inf, dtype=np.float32)
    m[:, list(visible)] = 0
    mask = g.tensor(mask_type, n_kv, m_rows, name=mask_name, data=m.astype(np.float16 if mask_type == F16 else np.float32))
    nodes = [write]
    for name in layer_names:
        p = np.zeros((n_head, s_rows, n_kv), dtype=np.float32)
        p[:, :, list(visible)] = 1 / len(visible)
        kq = g.tensor(sm_type, n_kv, s_rows, n_head)
        sm = _G["ggml_soft_max_ext"](g.ctx, kq, mask, 1.0, 0.0)
        g.name(sm, name)
        g.data.append((sm, p.astype(np.float16 if sm_type == F16 else np.float32)))
        nodes.append(sm)
    return nodes


def _eval_decode(hook: se_hook.Hook, positions, nodes) -> tuple[int, str]:
    """One llama_decode as the scheduler drives the callback: ask every node,
    then report the observed ones computed. Returns scope_hook_end's code and message."""
    hook.begin(np.asarray(positions, dtype=np.int32))
    for t in nodes:
        if _EVAL(ctypes.cast(t, _VP), True, hook.user_data):
            _EVAL(ctypes.cast(t, _VP), False, hook.user_data)
    try:
        hook.end()
    except HookError as exc:  # its message: "<status> (<code>): <the hook's last error>"
        return exc.code, str(exc)
    return 0, ""


def _poke_nb1(nodes, factor: int = 2):
    """A strided kq_soft_max (as if a view): nb[1] bigger than a packed row."""
    nodes[1].contents.nb[1] *= factor
    return nodes


GRAPH_CASES: list[tuple[str, dict, int, str]] = [
    ("index past the cells", dict(cells=(5, 6, 8), n_cache=16), -4, r"write index 8 outside the 8 cells"),
    ("index I32", dict(idx_type=I32), -4, r"attn_inp_k_idxs: expected contiguous I64 \[n_tokens\].*got type 26"),
    ("index 2-D", dict(idx_rows=2), -4, r"attn_inp_k_idxs: expected contiguous I64.*ne=\[3,2\]"),
    ("mask wider than the cells", dict(n_cache=16, n_kv=16), -4,
     r"attn_inp_kq_mask: type 0 ne=\[16,3,1,1\].*\[<=8, rows, 1, streams\] with rows x streams = 3"),
    ("mask padded rows", dict(mask_rows=4), -4, r"attn_inp_kq_mask.*ne=\[8,4,1,1\].*3 \(ubatch tokens\)"),
    ("mask renamed", dict(mask_name="kq_mask"), -3, r"layer 0's attention has no 'attn_inp_kq_mask' operand"),
    ("softmax renamed", dict(layer_names=("kq_softmax-0",)), -3,
     r"layer 0's attention with its 'attn_inp_kq_mask' operand was seen in 0 of 1 ubatches: llama.cpp renamed"),
    ("softmax layer past the model", dict(layer_names=("kq_soft_max-0", "kq_soft_max-7")), -3,
     r"attention of layer 7 but the model has 1 layers"),
    ("softmax head count", dict(n_head=3), -4, r"kq_soft_max-0: type 0 ne=\[8,3,3,1\].*\[<=8, rows, 2, streams\]"),
    ("softmax F16", dict(sm_type=F16), -4, r"kq_soft_max-0: type 1 "),
    ("softmax rows != ubatch", dict(sm_rows=2), -4, r"kq_soft_max-0: type 0 ne=\[8,2,2,1\].*rows x streams = 3 \(ubatch tokens\)"),
    ("no K write", dict(idx_name="k_idxs"), -3, r"no 'attn_inp_k_idxs' write into 'cache_k_l0' was seen"),
    ("copy of another input", dict(idx_name="CUDA0#k_idxs#0"), -3, r"no 'attn_inp_k_idxs' write"),
    ("mask copy renamed", dict(mask_name="CUDA0#kq_mask#0"), -3, r"layer 0's attention has no 'attn_inp_kq_mask' operand"),
    ("copy of a longer name", dict(idx_name="CUDA0#attn_inp_k_idxs_swa#0"), -3, r"no 'attn_inp_k_idxs' write"),
]

# The scheduler's copies of the inputs into a device split (ggml_backend_sched_split_graph
# names them "<backend>#<input>#<copy>", cut to 63 characters): the hook must accept them.
SCHED_COPIES = [
    ("CUDA0#attn_inp_k_idxs#0", "MTL0#attn_inp_kq_mask#1"),
    ("RPC0[127.0.0.1:50052]#attn_inp_k_idxs#0", "RPC0[127.0.0.1:50052]#attn_inp_kq_mask#0"),
    ("RPC0[a-very-long-host-name.example.internal:50052]#attn_inp_k_i",  # 63 characters: cut
     "RPC0[a-very-long-host-name.example.internal:50052]#attn_inp_kq_"),
]


def _check_good_decode(hook: se_hook.Hook, *, mask_type=F32, **names: str) -> None:
    g = _Graph()
    try:
        nodes = _ubatch(g, mask_type=mask_type, **names)
        g.alloc()
        hook.arm(11)
        rc, msg = _eval_decode(hook, [10, 11, 12], nodes)
        assert (rc, msg) == (0, "")
        cells = hook.cells()
        assert cells[5:8].tolist() == [10, 11, 12] and (cells[:5] == -1).all()
        visible, n_kv = hook.visible()
        assert visible.tolist() == [0, 5, 6, 7] and n_kv == 8
        cap = hook.capture()
        assert cap.positions.tolist() == [10, 11, 12] and cap.rows.tolist() == [2]
        np.testing.assert_allclose(cap.attn, 0.5)  # 2 captured rows x 1/4 per visible cell, each head
    finally:
        hook.arm(None)
        g.close()


@pytest.mark.parametrize("kwargs,code,match", [c[1:] for c in GRAPH_CASES], ids=[c[0] for c in GRAPH_CASES])
def test_hook_checks_every_tensor_it_reads(kwargs, code, match):
    assert ctypes.sizeof(_Tensor) + 32 == _G["ggml_tensor_overhead"]()  # the struct mirrors this ggml
    hook = se_hook.Hook(n_cells=8, n_layer=1, n_head=2)
    g = _Graph()
    try:
        _check_good_decode(hook)
        nodes = _ubatch(g, **kwargs)
        g.alloc()
        hook.arm(10)
        rc, msg = _eval_decode(hook, [10, 11, 12], nodes)
        assert rc == code and re.search(match, msg), (rc, msg)
        hook.arm(None)
        _check_good_decode(hook)  # the next decode is clean again
        _check_good_decode(hook, mask_type=F16)
    finally:
        g.close()
        hook.close()


def test_hook_checks_strides_layers_and_call_order():
    hook = se_hook.Hook(n_cells=8, n_layer=2, n_head=2)
    g = _Graph()
    try:
        strided = _poke_nb1(_ubatch(g, layer_names=("kq_soft_max-0", "kq_soft_max-1")))
        one_layer = _ubatch(g)
        strided_heads, strided_idx = _ubatch(g), _ubatch(g)
        g.alloc()
        # after alloc, as views of llama.cpp's buffers would be: the hook must refuse before reading
        strided_heads[1].contents.nb[2] *= 2
        ctypes.cast(strided_idx[0].contents.src[1], _TP).contents.nb[0] = 16
        hook.arm(10)
        rc, msg = _eval_decode(hook, [10, 11, 12], strided_heads)
        assert rc == -4 and "expected contiguous F32" in msg
        rc, msg = _eval_decode(hook, [10, 11, 12], strided_idx)
        assert rc == -4 and "expected contiguous I64 [n_tokens]" in msg and "nb[0]=16" in msg
        hook.arm(10)
        rc, msg = _eval_decode(hook, [10, 11, 12], strided)
        assert rc == -4 and "expected contiguous F32" in msg
        hook.arm(10)  # zero the sums: the strided decode captured layer 1
        rc, msg = _eval_decode(hook, [10, 11, 12], one_layer)  # layer 1 never shows up while capturing
        assert rc == -3 and "layer 1 gave 0 captured rows (layer 0: 3)" in msg
        hook.arm(None)
        rc, msg = _eval_decode(hook, [10, 11], one_layer)  # 3 K writes for a 2-token batch
        assert rc == -8 and "3 K writes but the batch given to begin has 2 tokens" in msg
    finally:
        g.close()
    with pytest.raises(HookError, match="end without begin"):
        hook.end()
    with pytest.raises(HookError, match=r"increasing; token 1 has 3 after 3"):
        hook.begin(np.array([3, 3], dtype=np.int32))
    with pytest.raises(HookError, match="non-empty batch"):
        hook.begin(np.zeros(0, dtype=np.int32))
    with pytest.raises(HookError, match="from_pos -2"):
        hook.arm(-2)
    with pytest.raises(HookError, match=r"bad range \[5, 3\)"):
        hook.shift(ctypes.c_void_p(1), 5, 3, 1)
    with pytest.raises(HookError, match="bad position -1"):
        hook.truncate(ctypes.c_void_p(1), -1)
    hook.close()
    for call in (hook.cells, lambda: hook.begin(np.arange(2, dtype=np.int32)), hook.end, hook.capture):
        with pytest.raises(HookError, match="null hook"):  # a closed hook refuses, never dereferences
            call()
    assert _EVAL(None, True, None) is False


def test_hook_evict_refusals_change_nothing(tiny):
    with ScopeLlama(tiny["llama"], budget=None, n_ctx=512, n_threads=T) as m:
        m.generate([1] + list(range(3, 103)), max_tokens=4)
        ctx = m.context
        before = m.kv_positions()
        last = int(before[-1])
        for bad, match in [([-1], "not held"), ([3, 3, 10**6], "not held"), ([0, last], "last"), ([last, last], "last")]:
            with pytest.raises(HookError, match=match):
                ctx.evict(np.array(bad, dtype=np.int32))
            np.testing.assert_array_equal(m.kv_positions(), before)
            _llama_agrees(m)
        assert ctx.evict(np.array([7, 3, 7, 5, 4], dtype=np.int32)) == 4  # duplicates, unsorted
        assert set(before.tolist()) - set(m.kv_positions().tolist()) == {3, 4, 5, 7}
        _llama_agrees(m)
        assert ctx.evict(np.zeros(0, dtype=np.int32)) == 0


@pytest.mark.parametrize("idx_name,mask_name", SCHED_COPIES)
def test_hook_reads_the_schedulers_copies_of_its_inputs(idx_name, mask_name):
    assert all(len(n) <= 63 for n in (idx_name, mask_name))
    hook = se_hook.Hook(n_cells=8, n_layer=1, n_head=2)
    try:
        _check_good_decode(hook, idx_name=idx_name, mask_name=mask_name)
    finally:
        hook.close()


def test_hook_detects_a_cache_changed_behind_its_back(model_path):
    # Regression (issue #14.4): evict/shift/truncate verify llama.cpp's view afterwards.
    with ScopeLlama(model_path, budget=None, n_ctx=512) as llm:
        llm.generate("Tell me about the sea.", max_tokens=8)
        ctx = llm.context
        with pytest.raises(HookError, match=r"shift: positions up to .* would pass the int32 range"):
            ctx.shift(0, 10, 2**31 - 5)
        llama_cpp.llama_memory_seq_rm(ctx.memory, 0, 0, 2)  # not through the hook
        with pytest.raises(HookError, match=r"evict: llama.cpp holds positions \[2, \d+\] .* map holds \[0, "):
            ctx.evict(np.array([4], dtype=np.int32))
