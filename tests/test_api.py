"""The public pieces of the runtime API (issue #15) on the real default model
and real llama.cpp: composed policies, Sampling, Context.capturing, resumed
streams, tokens and chat text, position_limit."""
from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from scope_edge import Budget, EngineConfig, Policy, Sampling, ScopeLlama
from scope_edge.hook import HookError
from scope_edge.policies import H2O, LendPassed, Slide, SnapKV, build
from scope_edge.runtime.sampling import GREEDY, RANDOM_SEED, Sampler

T = 1  # n_threads: see tests/test_reliability.py
REPO = Path(__file__).resolve().parents[1]
PROMPT = (
    "<|im_start|>user\nWrite a long story about a lighthouse keeper who finds a message in a bottle."
    "<|im_end|>\n<|im_start|>assistant\n"
)
# README's example prompt: greedy decoding of it falls into a loop
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


@pytest.fixture(scope="module")
def llm(model_path):
    """One full-cache instance for the checks that need no policy."""
    with ScopeLlama(model_path, budget=None, n_threads=T) as m:
        yield m


# -- policy= -----------------------------------------------------------------


def _steps(m: ScopeLlama, prompt: str, max_tokens: int) -> tuple[list[int], list[list[int]], object]:
    """Tokens, the positions held after every step, and the final stats."""
    tokens, held, last = [], [], None
    for last in m.stream(prompt, max_tokens=max_tokens, ignore_eos=True):
        if last.token is not None:
            tokens.append(last.token)
        held.append(m.kv_positions().tolist())
    return tokens, held, last.stats


def test_composed_policy_equals_the_short_form(model_path):
    budget = Budget(prefill=48, decode=24, observation_window=8, recent_window=8)
    policy = Policy(prefill=SnapKV(budget=48, window=8), decode=Slide(decode=24, recent=8),
                    lend=LendPassed(protected=8))
    with ScopeLlama(model_path, budget=budget, n_threads=T) as short:
        assert short.policy == build(budget) == policy
        want = _steps(short, PROMPT, 60)
    with ScopeLlama(model_path, policy=policy, n_threads=T) as composed:
        assert composed.policy is policy and composed.budget is None
        got = _steps(composed, PROMPT, 60)
        again = _steps(composed, PROMPT, 60)  # one Policy serves many generations (fresh decode state)
    assert got[0] == want[0] and len(got[0]) == 60  # token-identical
    assert got[1] == want[1]  # the same positions held, step by step
    assert got[2].evicted_cells == want[2].evicted_cells > 0
    assert got[2].captured_steps == want[2].captured_steps > 0
    assert again[:2] == got[:2]


def test_a_stateful_policy_starts_fresh_each_generation(model_path):
    # H2O accumulates scores per generation: for_generation() copies it, so a
    # second run of one Policy matches the first and the short form's.
    b = Budget(prefill=64, decode=32, observation_window=8, recent_window=8)
    with ScopeLlama(model_path, budget=b, strategy="h2o", n_threads=T) as short:
        want = _steps(short, PROMPT, 50)
    with ScopeLlama(model_path, policy=short.policy, n_threads=T) as composed:
        assert isinstance(composed.policy.decode, H2O)
        first, second = _steps(composed, PROMPT, 50), _steps(composed, PROMPT, 50)
    assert first[:2] == second[:2] == want[:2]


def test_the_engine_configuration_is_one_value(model_path):
    """ScopeLlama's keywords build the EngineConfig that config= takes, and
    both forms run alike; the short form's record (strategy, budget) is
    None once policy= or the policy setter names the policy instead."""
    b = Budget(prefill=48, decode=24, observation_window=8, recent_window=8)
    config = EngineConfig(model_path=model_path, n_threads=T, type_k="q8_0", prefill_chunk=256)
    with ScopeLlama(model_path, budget=b, n_threads=T, type_k="q8_0", prefill_chunk=256, tensor_split=None) as short:
        assert short.config == config
        assert (short.strategy, short.budget, short.lend) == ("slide", b, "passed")
        want = _steps(short, PROMPT, 30)
        short.policy = build(b, strategy="h2o")
        assert short.strategy is None and short.budget is None and short.lend is None
    with ScopeLlama(config=config, policy=build(b)) as long:
        assert long.config is config and long.strategy is None and long.budget is None
        assert _steps(long, PROMPT, 30)[:2] == want[:2]
    with pytest.raises(ValueError, match="not both"):
        ScopeLlama(model_path, config=config)
    with pytest.raises(ValueError, match="type_k.*not both"):
        ScopeLlama(config=config, type_k="f16")
    with pytest.raises(TypeError, match="typo_k"):
        ScopeLlama("unused.gguf", typo_k="f16")


@pytest.mark.parametrize("kwargs,match", [
    (dict(policy=Policy(prefill=SnapKV(budget=48, window=8), decode=Slide(decode=24, recent=8)),
          budget=Budget(prefill=48, decode=24)), r"either policy= or budget="),
    (dict(policy="slide"), r"policy must be a scope_edge\.policies\.Policy or None, got str"),
    (dict(policy=SnapKV(budget=48, window=8)), r"policy must be a scope_edge\.policies\.Policy.*got SnapKV"),
    (dict(policy=Budget(prefill=48, decode=24)), r"policy must be a scope_edge\.policies\.Policy.*got Budget"),
])
def test_bad_policy_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScopeLlama("unused.gguf", **kwargs)  # refused before the file is opened


def test_policy_parts_are_checked():
    with pytest.raises(ValueError, match=r"Policy needs prefill=PrefillSelector and decode=DecodeStrategy"):
        Policy(prefill=Slide(decode=24, recent=8), decode=SnapKV(budget=48, window=8))
    with pytest.raises(ValueError, match=r"SnapKV\.window must be in \[1, 48\], got 64"):
        SnapKV(budget=48, window=64)


# -- Sampling ------------------------------------------------------------------


BAD_SAMPLING = [
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "0.7"),
    ("temperature", True), ("top_k", -1), ("top_k", 1.5), ("top_k", True), ("top_p", 0.0), ("top_p", 1.5),
    ("top_p", math.nan), ("min_p", -0.1), ("min_p", 1.0), ("min_p", math.nan), ("repeat_penalty", 0.0),
    ("repeat_penalty", -1.0), ("repeat_penalty", math.inf), ("repeat_last_n", -1), ("repeat_last_n", 64.0),
    ("presence_penalty", math.nan), ("presence_penalty", "1"), ("frequency_penalty", math.inf),
    ("frequency_penalty", None), ("seed", -1), ("seed", 2**32), ("seed", 1.5), ("seed", "x"), ("seed", True),
]


@pytest.mark.parametrize("field,value", BAD_SAMPLING, ids=[f"{f}={v!r}" for f, v in BAD_SAMPLING])
def test_sampling_refuses_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must "):
        Sampling(**{field: value})


def test_sampling_defaults_are_greedy():
    s = Sampling()
    assert s == GREEDY and s.temperature == 0 and not s.penalized
    assert (s.top_k, s.top_p, s.min_p, s.repeat_penalty) == (0, 1.0, 0.0, 1.0)  # every filter off
    cli = Sampling.llama_cli()
    assert (cli.temperature, cli.top_k, cli.top_p, cli.min_p, cli.seed) == (0.8, 40, 0.95, 0.05, RANDOM_SEED)
    assert Sampling(seed=0) != Sampling(seed=1)
    with pytest.raises(Exception):  # frozen
        s.temperature = 1.0  # type: ignore[misc]
    Sampling(seed=0), Sampling(seed=2**32 - 1), Sampling(min_p=0.0), Sampling(top_p=1.0)  # the bounds are allowed


def test_default_sampling_equals_stock_greedy(model_path, llm):
    max_tokens = 40
    stock = llama_cpp.Llama(model_path, n_ctx=1024, n_threads=T, verbose=False)
    try:
        want = stock.create_completion(PROMPT, max_tokens=max_tokens, temperature=0.0)["choices"][0]["text"]
    finally:
        stock.close()
    none = llm.generate(PROMPT, max_tokens=max_tokens)
    assert none.text == want and len(none.tokens) == max_tokens
    assert llm.generate(PROMPT, max_tokens=max_tokens, sampling=Sampling()).tokens == none.tokens
    # temperature 0 is greedy whatever the filters and the seed
    filtered = Sampling(temperature=0.0, top_k=40, top_p=0.5, min_p=0.2, seed=3)
    assert llm.generate(PROMPT, max_tokens=max_tokens, sampling=filtered).tokens == none.tokens


def test_greedy_argmax_equals_llama_cpps_greedy_sampler_with_eog_excluded(llm):
    # Plain greedy is an argmax over the logits (Sampler's fast path). Check it
    # against llama.cpp's own chain where it matters: a step whose argmax is
    # the end-of-turn token, which ignore_eos must skip.
    done = llm.generate(llm.render_chat([{"role": "user", "content": "What is 2+2?"}]), max_tokens=64)
    assert done.finish_reason == "stop"  # the context's last logits now rank an EOG token first
    ctx, model = llm.context, llm.model
    before = ctx.logits()
    eog = model.eog_tokens()
    masked = before.copy()
    masked[eog] = -np.inf
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    bias = (llama_cpp.llama_logit_bias * len(eog))(*[llama_cpp.llama_logit_bias(t, float("-inf")) for t in eog])
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_logit_bias(model.n_vocab, len(eog), bias))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    try:
        theirs = llama_cpp.llama_sampler_sample(chain, ctx.ptr, -1)
    finally:
        llama_cpp.llama_sampler_free(chain)
    plain, skip = (Sampler(GREEDY, model, ignore_eos=flag, history=[]) for flag in (False, True))
    try:
        assert plain.draw(ctx.ptr) in eog and plain.draw(ctx.ptr) == int(np.argmax(before))
        assert skip.draw(ctx.ptr) == theirs == int(np.argmax(masked)) and theirs not in eog
    finally:
        plain.close(), skip.close()
    np.testing.assert_array_equal(ctx.logits(), before)  # the context's logits were not masked in place


@dataclass(frozen=True, kw_only=True)
class _PerHeadSlide(Slide):
    @property
    def head_reduction(self) -> str | None:
        return None  # as a policy that reads each head would: the runtime passes every head


@dataclass(kw_only=True)
class _PerHeadH2O(H2O):
    @property
    def head_reduction(self) -> str | None:
        return None


@pytest.mark.parametrize("head_reduce", ["max", "sum"])
def test_policies_that_reduce_heads_get_them_reduced_and_evict_the_same(model_path, head_reduce):
    # Built-in strategies declare head_reduction, so a decode step's capture
    # comes with the heads reduced natively; the same policy taking every
    # head must hold the same cells after every step and write the same text.
    for decode, per_head in [(Slide(decode=24, recent=8, head_reduce=head_reduce),
                              _PerHeadSlide(decode=24, recent=8, head_reduce=head_reduce)),
                             (H2O(total=72, recent=8, head_reduce=head_reduce),
                              _PerHeadH2O(total=72, recent=8, head_reduce=head_reduce))]:
        lend = None if decode.unified else LendPassed(protected=8, head_reduce=head_reduce)
        runs = []
        for d in (decode, per_head):
            policy = Policy(prefill=SnapKV(budget=48, window=8, head_reduce=head_reduce), decode=d, lend=lend)
            with ScopeLlama(model_path, policy=policy, n_threads=T) as m:
                runs.append(_steps(m, PROMPT, 60))
        assert decode.head_reduction == head_reduce and per_head.head_reduction is None
        (tokens, held, stats), (tokens2, held2, stats2) = runs
        assert stats.evicted_cells > 0 and stats.captured_steps > 0
        assert held == held2 and tokens == tokens2


def test_same_seed_same_text_other_seed_other_text(llm):
    def sample(seed: int) -> list[int]:
        return llm.generate(PROMPT, max_tokens=40, sampling=Sampling(temperature=1.0, seed=seed)).tokens

    first, again = sample(1234), sample(1234)
    assert first == again
    greedy = llm.generate(PROMPT, max_tokens=40).tokens
    others = [sample(seed) for seed in (1, 2, 3)]
    assert any(o != first for o in others)  # each differs with high probability; all three alike would be a bug
    assert any(o != greedy for o in [first, *others])  # temperature 1 really samples


def test_top_k_1_and_a_high_min_p_equal_greedy(llm):
    greedy = llm.generate(PROMPT, max_tokens=48).tokens
    for seed in (1, 2):
        top1 = llm.generate(PROMPT, max_tokens=48, sampling=Sampling(temperature=1.5, top_k=1, seed=seed))
        assert top1.tokens == greedy  # only the most likely token survives top_k=1
    # min_p 0.99: only tokens within 1% of the top token's probability survive
    minp = llm.generate(PROMPT, max_tokens=48, sampling=Sampling(temperature=1.5, min_p=0.99, seed=5))
    assert minp.tokens == greedy


def _repeated_4grams(tokens: list[int]) -> int:
    counts = Counter(tuple(tokens[i : i + 4]) for i in range(len(tokens) - 3))
    return sum(c - 1 for c in counts.values() if c > 1)


def test_repeat_penalty_breaks_a_greedy_loop(llm):
    prompt = llm.render_chat(STORY)
    greedy = llm.generate(prompt, max_tokens=300)
    loops = _repeated_4grams(greedy.tokens)
    assert loops > 60, (loops, greedy.text[-300:])  # the positive control: greedy repeats itself here
    penalised = llm.generate(prompt, max_tokens=300, sampling=Sampling(repeat_penalty=1.1))
    assert penalised.tokens != greedy.tokens
    assert _repeated_4grams(penalised.tokens) < loops / 2, penalised.text[-300:]
    # repeat_last_n=0 turns the penalties off
    off = llm.generate(prompt, max_tokens=300, sampling=Sampling(repeat_penalty=1.1, repeat_last_n=0))
    assert off.tokens == greedy.tokens


def test_presence_and_frequency_penalties_change_greedy_output(llm):
    prompt = llm.render_chat(STORY)
    greedy = llm.generate(prompt, max_tokens=300).tokens
    for s in (Sampling(presence_penalty=1.0), Sampling(frequency_penalty=0.5)):
        out = llm.generate(prompt, max_tokens=300, sampling=s).tokens
        assert out != greedy and _repeated_4grams(out) < _repeated_4grams(greedy) / 2


# -- Context.capturing -------------------------------------------------------


class _Boom(Exception):
    pass


def test_capturing_disarms_when_the_block_raises(model_path):
    with ScopeLlama(model_path, budget=None, n_ctx=512, n_threads=T) as llm:
        prompt = llm.tokenize(PROMPT)
        llm.generate(prompt, max_tokens=2)
        ctx = llm.context
        nxt = int(llm.kv_positions()[-1]) + 1
        # armed: a decode inside the block captures its row
        with pytest.raises(_Boom):
            with ctx.capturing(nxt):
                ctx.decode([prompt[1]], [nxt], want_logits=True)
                raise _Boom
        cap = ctx.capture()
        assert (cap.rows == 1).all() and cap.attn.sum() > 0
        # the exception disarmed: a decode after the block captures nothing
        ctx.decode([prompt[2]], [nxt + 1], want_logits=True)
        after = ctx.capture()
        np.testing.assert_array_equal(after.rows, cap.rows)
        np.testing.assert_array_equal(after.attn[:, :, :-1], cap.attn)  # the new cell got no score
        assert after.attn[:, :, -1].sum() == 0 and after.positions[-1] == nxt + 1
        # raising before any decode: zeroed on entry, and nothing captured after it
        with pytest.raises(_Boom):
            with ctx.capturing(0):
                raise _Boom
        ctx.decode([prompt[3]], [nxt + 2], want_logits=True)
        empty = ctx.capture()
        assert (empty.rows == 0).all() and not empty.attn.any()
        # the hook is sound after all that: llama.cpp's mask shows exactly the cells held
        visible, _ = ctx.visible()
        cells = ctx.cells()
        assert set(visible.tolist()) == set(np.flatnonzero(cells >= 0).tolist())
        assert llama_cpp.llama_memory_seq_pos_max(ctx.memory, 0) == nxt + 2


def test_capturing_with_heads_reduces_as_it_reads(model_path):
    # A step captured with heads= is the step captured with every head and
    # reduced on reading, to the bit (one row: the same floats in the same
    # order); its heads are gone, and "max" takes one row only.
    with ScopeLlama(model_path, budget=None, n_ctx=512, n_threads=T) as llm:
        prompt = llm.tokenize(PROMPT)
        llm.generate(prompt, max_tokens=2)
        ctx = llm.context
        nxt = int(llm.kv_positions()[-1]) + 1
        for heads in ("max", "sum"):
            with ctx.capturing(nxt):
                ctx.decode([prompt[1]], [nxt], want_logits=True)
            each = ctx.capture(head_reduce=heads)
            ctx.truncate(nxt)
            with ctx.capturing(nxt, heads=heads):
                ctx.decode([prompt[1]], [nxt], want_logits=True)
            reduced = ctx.capture(head_reduce=heads)
            ctx.truncate(nxt)
            assert reduced.attn.shape == each.attn.shape and (reduced.rows == 1).all() and reduced.attn.any()
            np.testing.assert_array_equal(reduced.attn, each.attn)
            np.testing.assert_array_equal(reduced.positions, each.positions)
            with pytest.raises(ValueError, match="armed to keep its heads reduced"):
                ctx.capture()
        with pytest.raises(HookError, match="second query row"):
            with ctx.capturing(nxt, heads="max"):
                ctx.decode(prompt[1:3], [nxt, nxt + 1], want_logits=True)
        with ctx.capturing(nxt + 2, heads="sum"):  # sums take any number of rows
            ctx.decode(prompt[3:5], [nxt + 2, nxt + 3], want_logits=True)
        assert (ctx.capture(head_reduce="sum").rows == 2).all()


def test_context_is_none_before_the_first_generation_and_after_close(model_path):
    llm = ScopeLlama(model_path, budget=None, n_threads=T)
    assert llm.context is None and llm.n_ctx == 0 and len(llm.kv_positions()) == 0 and llm.history() == []
    llm.generate("Hello", max_tokens=2)
    assert llm.context is not None and llm.n_ctx == llm.context.n_cells >= 256
    llm.close()
    assert llm.context is None and llm.closed and llm.model.closed


# -- resume ------------------------------------------------------------------


def test_resume_prefills_only_the_new_tokens(llm):
    prompt = llm.tokenize(PROMPT)
    first = llm.generate(prompt, max_tokens=16, ignore_eos=True)
    assert first.stats.reused_prompt_tokens == 0
    fed = prompt + first.tokens[:-1]  # the last token is sampled, never fed
    assert llm.history() == fed
    more = llm.model.tokenize(" Then the tide turned.", add_special=False)
    extended = fed + [first.tokens[-1]] + more
    chunks = list(llm.stream(extended, max_tokens=8, resume=True, ignore_eos=True))
    st = chunks[-1].stats
    assert (st.reused_prompt_tokens, st.prefilled_tokens) == (len(fed), len(extended) - len(fed))
    assert st.prompt_tokens == len(extended)
    out = [c.token for c in chunks if c.token is not None]
    assert llm.history() == extended + out[:-1]  # the history grew by the new prompt and the reply
    np.testing.assert_array_equal(llm.kv_positions(), np.arange(len(llm.history())))
    # a prompt the cache already holds whole re-feeds only its last token
    same = llm.generate(llm.history(), max_tokens=1, resume=True)
    assert (same.stats.reused_prompt_tokens, same.stats.prefilled_tokens) == (len(extended + out[:-1]) - 1, 1)
    # resume=False (the default) starts from an empty cache
    fresh = llm.generate(extended, max_tokens=8, ignore_eos=True)
    assert (fresh.stats.reused_prompt_tokens, fresh.stats.prefilled_tokens) == (0, len(extended))
    assert llm.history() == extended + fresh.tokens[:-1]
    np.testing.assert_array_equal(llm.kv_positions(), np.arange(len(llm.history())))


def test_resume_under_a_budget_reuses_the_compressed_cache(model_path):
    b = Budget(prefill=32, decode=16, observation_window=8, recent_window=8)
    with ScopeLlama(model_path, budget=b, n_threads=T) as llm:
        first = llm.generate(PROMPT, max_tokens=40, ignore_eos=True)
        fed = llm.history()
        assert len(fed) == len(llm.tokenize(PROMPT)) + 39 and len(llm.kv_positions()) < len(fed)
        extended = fed + [first.tokens[-1]] + llm.model.tokenize(" More.", add_special=False)
        st = llm.generate(extended, max_tokens=8, resume=True, ignore_eos=True).stats
        assert (st.reused_prompt_tokens, st.prefilled_tokens) == (len(fed), len(extended) - len(fed))
        assert st.kv_cells_peak <= b.prefill + b.decode
        held = llm.kv_positions()
        assert held[-1] == len(extended) + 8 - 2  # positions continue the history
        assert llama_cpp.llama_memory_seq_pos_max(llm.context.memory, 0) == held[-1]


# -- tokens and chat text ----------------------------------------------------


TEXTS = ["Hello world", "The keeper counted 42 ships.", "héllo 日本語 👩‍👩‍👧", "  leading spaces\nand lines\t."]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenize_detokenize_round_trip(llm, text):
    tokens = llm.tokenize(text)
    assert tokens and all(0 <= t < llm.model.n_vocab for t in tokens)
    assert llm.detokenize(tokens) == text
    assert llm.model.detokenize(llm.model.tokenize(text, add_special=False)) == text
    assert b"".join(llm.model.piece(t) for t in tokens).decode("utf-8") == text


def test_tokens_bad_input(llm):
    assert llm.detokenize([]) == ""
    assert len(llm.model.tokenize("<|im_start|>", add_special=False)) == 1  # special tokens are parsed
    with pytest.raises(TypeError, match="tokenize takes a str"):
        llm.tokenize(b"bytes")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.detokenize([1, llm.model.n_vocab])
    with pytest.raises(ValueError, match="must be ints"):
        llm.detokenize([1.0])


def test_render_chat(llm):
    text = llm.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert "<|im_start|>system\nBe brief.<|im_end|>" in text and "<|im_start|>user\nHi<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")  # the assistant's turn opened
    assert llm.render_chat(STORY) == llm.model.render_chat(STORY)
    last = list(llm.chat(STORY, max_tokens=4))[-1]
    assert last.stats.prompt_tokens == len(llm.tokenize(llm.render_chat(STORY)))


@pytest.mark.parametrize("messages,match", [
    ([], r"messages is empty"),
    ([{"role": "wizard", "content": "hi"}], r"messages\[0\] must be a dict with role in"),
    ([{"role": "user", "content": "hi"}, {"role": "user"}], r"messages\[1\]"),
    ([{"role": "user", "content": 5}], r"messages\[0\]"),
    (["hi"], r"messages\[0\]"),
])
def test_render_chat_errors_are_value_errors(llm, messages, match):
    with pytest.raises(ValueError, match=match):
        llm.render_chat(messages)
    with pytest.raises(ValueError, match=match):
        next(llm.chat(messages, max_tokens=2))


def test_vocab_only_model_tokenizes_like_the_full_one(model_path, llm):
    # Model(vocab_only=True) (what scope_edge.bench tokenizes with) loads no
    # weights; in a subprocess, as llama.cpp aborts on some questions to it.
    code = (
        "from scope_edge.runtime.model import Model\n"
        f"with Model({model_path!r}, vocab_only=True) as m:\n"
        f"    print(m.tokenize({PROMPT!r}), m.n_vocab)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-600:]}"
    assert proc.stdout.split("] ")[0] + "]" == str(llm.tokenize(PROMPT))
    assert proc.stdout.split("] ")[1].strip() == str(llm.model.n_vocab)


# -- position_limit ------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, 1, -5, 2.0, "64", True])
def test_bad_position_limit(bad):
    with pytest.raises(ValueError, match=r"position_limit must be an int >= 2 or None"):
        ScopeLlama("unused.gguf", position_limit=bad)


def test_small_position_limit_keeps_positions_below_it(model_path):
    b = Budget(prefill=32, decode=32, observation_window=8, recent_window=8)
    limit = 128
    with ScopeLlama(model_path, budget=b, position_limit=limit, n_threads=T) as llm:
        assert llm.position_limit == limit
        prompt = llm.tokenize(PROMPT)
        n_steps = 0
        for chunk in llm.stream(prompt, max_tokens=300, ignore_eos=True):
            held = llm.kv_positions()
            pmax = llama_cpp.llama_memory_seq_pos_max(llm.context.memory, 0)
            assert pmax == held.max() < limit  # llama.cpp's own view
            assert llama_cpp.llama_memory_seq_pos_min(llm.context.memory, 0) == held.min()
            n_steps += 1
        st = chunk.stats
    assert chunk.finish_reason == "length" and st.generated_tokens == 300
    assert len(prompt) + 300 > 2 * limit  # positions would have passed the limit twice over
    assert st.position_resets >= 2
    with ScopeLlama(model_path, budget=b, n_threads=T) as default:
        assert default.position_limit == default.model.n_ctx_train == 8192
