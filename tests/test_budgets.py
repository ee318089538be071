"""Every strategy x selector under real budgets on the default model, checked
step by step against llama.cpp's own view of the cells the attention sees."""
from __future__ import annotations

import numpy as np
import pytest

from scope_edge import Budget, ScopeLlama
from scope_edge.memory import padded_cells
from scope_edge.policies import COMBINATIONS

BUDGET = Budget(prefill=64, decode=32, observation_window=8, recent_window=8)
MAX_TOKENS = 3 * BUDGET.decode + 10
SCOPE = ("slide", "adaptive", "discontinuous")


def _prompt(llm: ScopeLlama) -> list[int]:
    text = (
        "<|im_start|>user\nHere is a list of instruments and numbers: "
        + ", ".join(f"{w} {i * 7 % 100}" for i, w in enumerate(["violin", "cello", "flute", "oboe", "harp"] * 8))
        + ". Repeat the list.<|im_end|>\n<|im_start|>assistant\n"
    )
    tokens = llm.tokenize(text)
    assert len(tokens) > BUDGET.prefill
    return tokens


def _bound(strategy: str, selector: str, n_prompt: int, delta: int) -> int:
    """Most cells a decode step may see."""
    if strategy in ("streaming", "h2o"):
        return BUDGET.total
    prompt_kept = n_prompt if selector == "full" else min(n_prompt, BUDGET.prefill)
    if strategy == "full":
        return prompt_kept + MAX_TOKENS
    return prompt_kept + BUDGET.decode + (delta if strategy == "discontinuous" else 0)


@pytest.mark.parametrize("strategy,selector", COMBINATIONS)
def test_budget_invariants_every_step(model_path, strategy, selector):
    check_invariants_every_step(model_path, strategy, selector)


def check_invariants_every_step(model_path: str, strategy: str, selector: str, **device: object) -> None:
    """Stream a generation under BUDGET and check, after every step, the held
    cells against llama.cpp's mask and the strategy's rules, as the paper
    has them (lend="none": tests/test_lend.py checks lending). `device`: the
    ScopeLlama offload arguments (tests/test_device.py)."""
    with ScopeLlama(model_path, budget=BUDGET, strategy=strategy, prefill_selector=selector, lend="none",
                    **device) as llm:
        prompt = _prompt(llm)
        n_prompt = len(prompt)
        delta = (MAX_TOKENS - BUDGET.recent_window) // (BUDGET.decode - BUDGET.recent_window)
        bound = _bound(strategy, selector, n_prompt, delta)
        kept_prompt = None
        steps = 0
        for chunk in llm.stream(prompt, max_tokens=MAX_TOKENS, ignore_eos=True):
            held = llm.kv_positions()
            visible, n_kv = llm.context.visible()
            cells = llm.context.cells()
            # llama.cpp's mask at the latest step saw every cell we hold now (and
            # the ones evicted right after it), never more than the bound
            assert set(np.flatnonzero(cells >= 0).tolist()) <= set(visible.tolist())
            if steps == 0:  # the latest step is the prompt's last token
                assert len(visible) == n_prompt
            else:
                assert len(visible) <= bound, (steps, len(visible), bound)
            assert n_kv <= llm.n_ctx
            n_fed = steps  # tokens fed after the prompt so far
            gen = held[held >= n_prompt]
            if strategy in SCOPE or strategy == "full":
                prompt_held = held[held < n_prompt]
                assert set(range(n_prompt - BUDGET.observation_window, n_prompt)) <= set(prompt_held.tolist())
                if kept_prompt is None:
                    kept_prompt = prompt_held
                    assert len(kept_prompt) == (n_prompt if selector == "full" else BUDGET.prefill)
                np.testing.assert_array_equal(prompt_held, kept_prompt)  # never touched while decoding
                want_recent = np.arange(n_prompt + max(0, n_fed - BUDGET.recent_window), n_prompt + n_fed)
                assert set(want_recent.tolist()) <= set(gen.tolist())
            else:
                last = n_prompt + n_fed - 1
                assert set(range(last - BUDGET.recent_window + 1, last + 1)) <= set(held.tolist())
            if chunk.token is not None and chunk.finish_reason is None:
                steps += 1
        st = chunk.stats
        assert chunk.finish_reason == "length" and st.generated_tokens == MAX_TOKENS
        assert st.kv_cells_peak <= bound
        assert st.kv_cells_allocated == padded_cells(max(n_prompt, bound))
        assert st.kv_cells_allocated <= padded_cells(n_prompt + MAX_TOKENS)
        if strategy != "full" or selector != "full":
            assert st.evicted_cells > 0


@pytest.mark.parametrize("strategy,selector", COMBINATIONS)
def test_large_budgets_are_token_identical_to_full_cache(model_path, strategy, selector):
    big = Budget(prefill=512, decode=512, observation_window=8, recent_window=64)
    with ScopeLlama(model_path, budget=None) as full:
        prompt = _prompt(full)
        want = full.generate(prompt, max_tokens=48, ignore_eos=True)
    with ScopeLlama(model_path, budget=big, strategy=strategy, prefill_selector=selector) as llm:
        got = llm.generate(prompt, max_tokens=48, ignore_eos=True)
    assert got.tokens == want.tokens
    assert got.stats.evicted_cells == 0


def test_scope_captures_only_on_selection_steps(model_path):
    b = Budget(prefill=64, decode=32, observation_window=8, recent_window=8)
    counts = {}
    for strategy in SCOPE:
        with ScopeLlama(model_path, budget=b, strategy=strategy, lend="none") as llm:  # a loan captures too
            st = llm.generate(_prompt(llm), max_tokens=120, ignore_eos=True).stats
            counts[strategy] = st.captured_steps
    # slide selects on every step once the decode cache is full (from step decode);
    # discontinuous once every delta + 1 steps
    fed = 120 - 1
    assert counts["slide"] == fed - b.decode + 1
    delta = (120 - b.recent_window) // (b.decode - b.recent_window)
    assert counts["discontinuous"] <= fed // (delta + 1) + 1
    assert counts["discontinuous"] < counts["adaptive"] <= counts["slide"]


@pytest.mark.parametrize(("prefill", "decode", "window", "recent"),
                         [(1024, 512, 32, 256), (2048, 2048, 32, 256), (16, 8, 16, 4), (1, 2, 1, 1)])
def test_budget_default_windows_fit_any_budget(prefill, decode, window, recent):
    b = Budget(prefill=prefill, decode=decode)
    assert (b.observation_window, b.recent_window) == (window, recent)
    assert Budget(prefill=prefill, decode=decode, observation_window=1, recent_window=1).observation_window == 1


def test_invalid_budgets_and_names():
    with pytest.raises(ValueError, match="observation_window.*prefill=4.*got 8"):
        Budget(prefill=4, decode=32, observation_window=8, recent_window=8)
    with pytest.raises(ValueError, match="recent_window.*decode=16.*got 32"):
        Budget(prefill=64, decode=16, observation_window=8, recent_window=32)
    with pytest.raises(ValueError, match="prefill=0"):
        Budget(prefill=0, decode=16)
    with pytest.raises(ValueError, match="decode=1"):
        Budget(prefill=8, decode=1, observation_window=1, recent_window=1)
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        ScopeLlama("unused.gguf", budget=BUDGET, strategy="nope")
    with pytest.raises(ValueError, match="unknown prefill selector"):
        ScopeLlama("unused.gguf", budget=BUDGET, prefill_selector="nope")
    with pytest.raises(ValueError, match="baseline"):
        ScopeLlama("unused.gguf", budget=BUDGET, strategy="streaming", prefill_selector="snapkv")
    with pytest.raises(ValueError, match="Budget"):
        ScopeLlama("unused.gguf", budget={"prefill": 64})  # type: ignore[arg-type]


def test_policies_see_real_attention_scores(model_path, monkeypatch):
    """Regression: the scores a policy gets are the captured attention, not zeros."""
    from scope_edge.policies import SnapKV, Slide

    seen: list[float] = []
    for cls in (SnapKV, Slide):
        original = cls.select

        def spy(self, positions, attn, *args, _original=original, **kw):
            seen.append(float(attn.sum()))
            return _original(self, positions, attn, *args, **kw)

        monkeypatch.setattr(cls, "select", spy)
    with ScopeLlama(model_path, budget=BUDGET, strategy="slide", prefill_selector="snapkv") as llm:
        llm.generate(_prompt(llm), max_tokens=BUDGET.decode + 4, ignore_eos=True)
    assert len(seen) >= 2
    # snapkv: 8 window rows x 30 layers x 9 heads, each row summing to 1 over the held cells
    assert seen[0] == pytest.approx(8 * 30 * 9, rel=1e-3)
    assert all(s > 0 for s in seen)
