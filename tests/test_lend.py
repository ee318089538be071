"""Lending the decode room to the prompt (policies/lend.py, issue #17): the
rules on arrays, then the runtime on the default model, checked against
llama.cpp's own mask."""
from __future__ import annotations

import numpy as np
import pytest

from scope_edge import Budget, ScopeLlama
from scope_edge.policies import (
    LEND_RULES,
    H2O,
    LendAccumulated,
    LendPassed,
    LendRecent,
    Policy,
    Slide,
    SnapKV,
    build,
)

BUDGET = Budget(prefill=64, decode=32, observation_window=8, recent_window=8)
LEND = tuple(r for r in LEND_RULES if r != "none")
SCOPE = ("slide", "adaptive", "discontinuous")


def _attn(scores: list[float]) -> np.ndarray:
    """[1 layer, 1 head, n] attention with these per-cell values."""
    return np.asarray(scores, dtype=np.float32).reshape(1, 1, -1)


# -- the rules on arrays ----------------------------------------------------

def test_policy_lends_room_minus_one_and_allocates_at_most_the_budget():
    policy = Policy(prefill=SnapKV(budget=64, window=8), decode=Slide(decode=32, recent=8), lend=LendRecent())
    assert policy.prefill_keep(1000) == 64  # unbound: nothing is lent
    bound = policy.for_generation(100)
    assert bound.lend.room == 32 and policy.lend.room is None
    assert bound.prompt_floor(1000) == 64
    assert bound.prefill_keep(1000) == 64 + 31
    assert bound.prefill_keep(80) == 80 and bound.prefill_keep(30) == 30
    paper = Policy(prefill=policy.prefill, decode=policy.decode).for_generation(100)
    assert bound.decode_cells(kept=64, max_tokens=100, lent=31) == paper.decode_cells(kept=64, max_tokens=100) == 96
    # a short generation lends the whole decode room too: a prompt that fits
    # with its output in prefill + decode cells keeps every cell
    short = policy.for_generation(10)
    assert short.lend.room == 32 and short.prefill_keep(80) == 80 and short.prefill_keep(1000) == 64 + 31
    assert short.decode_cells(kept=64, max_tokens=10, lent=16) == 64 + 16 + 10  # the stock cache's cells
    assert short.decode_cells(kept=64, max_tokens=10, lent=31) == 64 + 32  # never past the budget


def test_policy_refuses_lending_to_a_unified_baseline_or_a_non_lend():
    with pytest.raises(ValueError, match="unified baseline.*lend=None"):
        Policy(prefill=SnapKV(budget=64, window=8), decode=H2O(total=96, recent=8), lend=LendRecent())
    with pytest.raises(ValueError, match="Policy.lend must be a Lend"):
        Policy(prefill=SnapKV(budget=64, window=8), decode=Slide(decode=32, recent=8), lend="recent")


@pytest.mark.parametrize("bad", [{"sinks": -1}, {"protected": 0}, {"head_reduce": "mean"}, {"room": 0},
                                 {"sinks": 1.5}])
def test_lend_rejects_bad_settings(bad):
    with pytest.raises(ValueError):
        LendRecent(**bad)


def test_build_names_the_lend_rule_and_baselines_ignore_it():
    assert isinstance(build(BUDGET, strategy="slide", lend="passed").lend, LendPassed)
    assert build(BUDGET, strategy="slide", lend="none").lend is None
    assert build(BUDGET, strategy="h2o", lend="recent").lend is None
    assert build(BUDGET, strategy="slide", lend="recent").lend.protected == BUDGET.observation_window
    with pytest.raises(ValueError, match="unknown lend rule 'oldest'"):
        build(BUDGET, strategy="slide", lend="oldest")
    with pytest.raises(ValueError, match="unknown lend rule"):
        ScopeLlama(budget=BUDGET, lend="oldest")


def test_select_gives_back_lowest_but_never_sinks_or_the_tail():
    lend = LendRecent(sinks=2, protected=2)
    positions = np.arange(8, dtype=np.int32)
    attn = _attn([0.0, 0.0, 0.5, 0.1, 0.9, 0.2, 0.0, 0.0])
    np.testing.assert_array_equal(lend.select(positions, attn, keep=6), [3, 5])
    assert len(lend.select(positions, attn, keep=8)) == 0
    with pytest.raises(ValueError, match="needs attention"):
        lend.select(positions, None, keep=6)


def test_accumulated_sums_steps_and_follows_reindexing():
    lend = LendAccumulated(sinks=0, protected=1)
    pos = np.array([10, 11, 12, 13], dtype=np.int32)
    lend.observe(pos, _attn([0.1, 0.5, 0.2, 0.2]))
    lend.observe(pos, _attn([0.2, 0.0, 0.4, 0.2]))
    np.testing.assert_allclose(lend.score(pos, _attn([0, 0, 0, 0])), [0.3, 0.5, 0.6, 0.4], rtol=1e-6)
    # the lowest accumulated (not this step's lowest, 11) goes first; 13 is protected
    np.testing.assert_array_equal(lend.select(pos, _attn([0.9, 0.0, 0.9, 0.9]), keep=3), [10])
    lend.reindex(pos, np.arange(4, dtype=np.int32))
    np.testing.assert_allclose(lend.score(np.arange(4, dtype=np.int32), _attn([0] * 4)), [0.3, 0.5, 0.6, 0.4],
                               rtol=1e-6)
    assert lend.bind(5).score(pos, _attn([0] * 4)).sum() == 0  # a bound copy starts afresh


def test_passed_gives_back_behind_the_frontier_first():
    lend = LendPassed(sinks=1, protected=1)
    pos = np.arange(6, dtype=np.int32)
    lend.observe(pos, _attn([0.9, 0.0, 0.1, 0.3, 0.0, 0.9]))  # peak of the body (1..4): position 3
    # cell 2 has more attention than 4, but it lies behind the frontier
    np.testing.assert_array_equal(lend.select(pos, _attn([0] * 6), keep=4), [1, 2])
    lend.observe(pos, _attn([0.9, 0.3, 0.0, 0.0, 0.0, 0.9]))  # the frontier never moves back
    np.testing.assert_array_equal(lend.select(pos, _attn([0] * 6), keep=5), [2])
    lend.reindex(pos + 0, pos + 100)
    assert lend.select(pos + 100, _attn([0] * 6), keep=5).tolist() == [102]


# -- the runtime, against llama.cpp's mask ----------------------------------

def _prompt(llm: ScopeLlama, n_words: int = 40) -> list[int]:
    text = ("<|im_start|>user\nHere is a list of instruments and numbers: "
            + ", ".join(f"{w} {i * 7 % 100}" for i, w in enumerate(["violin", "cello", "flute", "oboe", "harp"]
                                                                  * (n_words // 5)))
            + ". Repeat the list.<|im_end|>\n<|im_start|>assistant\n")
    return llm.tokenize(text)


@pytest.mark.parametrize("strategy", SCOPE)
@pytest.mark.parametrize("lend", LEND)
def test_lent_cells_go_back_as_the_output_needs_them(model_path, strategy, lend):
    check_lending_every_step(model_path, strategy, lend)


def check_lending_every_step(model_path: str, strategy: str, lend: str, **device: object) -> None:
    """Stream a generation under BUDGET with a lend rule and check, after
    every step, the held cells against llama.cpp's mask and the loan's rules.
    `device`: the ScopeLlama offload arguments (tests/test_device.py)."""
    max_tokens = 3 * BUDGET.decode
    with ScopeLlama(model_path, budget=BUDGET, strategy=strategy, lend=lend, **device) as llm:
        room = llm.policy.for_generation(max_tokens).lend.room  # the decode cells, slack included
        prompt = _prompt(llm)
        n_prompt, floor = len(prompt), BUDGET.prefill
        assert n_prompt > floor + room
        last_prompt_held = None
        for step, chunk in enumerate(llm.stream(prompt, max_tokens=max_tokens, ignore_eos=True)):
            cells = llm.context.cells()
            held = np.sort(cells[cells >= 0])
            visible, _ = llm.context.visible()
            # llama.cpp's mask at the latest step saw every cell held now
            assert set(np.flatnonzero(cells >= 0).tolist()) <= set(visible.tolist())
            prompt_held, gen_held = held[held < n_prompt], held[held >= n_prompt]
            if step == 0:  # after the prefill: the floor plus room - 1 on loan
                assert len(prompt_held) == floor + room - 1
                assert len(visible) == n_prompt
            else:
                assert len(visible) <= floor + room  # the allocation the paper's policy has
                # prompt cells go back exactly as the generated ones need the room
                want = max(floor, min(last_prompt_held, floor + room - 1 - len(gen_held)))
                assert len(prompt_held) == want, (step, len(prompt_held), want)
            # the sinks and the instruction tail are never given back
            assert {0, 1, 2, 3} | set(range(n_prompt - BUDGET.observation_window, n_prompt)) <= set(
                prompt_held.tolist())
            last_prompt_held = len(prompt_held)
        if strategy != "adaptive":  # adaptive's decode budget reaches `decode` only at the end
            assert last_prompt_held == floor
        allocation = chunk.stats.kv_cells_allocated
    with ScopeLlama(model_path, budget=BUDGET, strategy=strategy, lend="none", **device) as paper:
        st = paper.generate(prompt, max_tokens=max_tokens, ignore_eos=True).stats
    assert allocation == st.kv_cells_allocated


def test_lending_keeps_the_whole_prompt_until_the_output_needs_the_room(model_path):
    """A prompt just over the prefill budget fits with the loan: decoding
    matches the full cache until the first cell goes back, where the paper's
    policy already differs at the first token's cells."""
    with ScopeLlama(model_path, budget=None) as full:
        prompt = _prompt(full, n_words=15)
        want = full.generate(prompt, max_tokens=40, ignore_eos=True).tokens
    b = Budget(prefill=len(prompt) - 8, decode=32, observation_window=8, recent_window=8)
    free_steps = b.prefill + b.decode - 1 - len(prompt)  # tokens fed before the first repayment
    with ScopeLlama(model_path, budget=b, lend="recent") as llm:
        got = llm.generate(prompt, max_tokens=40, ignore_eos=True)
        assert got.tokens[: free_steps + 1] == want[: free_steps + 1]
        assert got.stats.evicted_cells > 0  # it did have to give cells back later
        assert len(llm.kv_positions()) <= b.total


@pytest.mark.parametrize("lend", LEND)
def test_chunked_prefill_lends_only_at_the_last_chunk(model_path, lend):
    """Chunked prefill keeps its peak: earlier chunks trim to the floor, and
    the last chunk (whole: the short one comes first) brings the loan."""
    b = Budget(prefill=48, decode=32, observation_window=8, recent_window=8)
    kw = dict(budget=b, prefill_chunk=64, chunked_prefill=True)
    with ScopeLlama(model_path, lend=lend, **kw) as llm:
        prompt = _prompt(llm, n_words=60)
        assert len(prompt) % 64 != 0
        stream = llm.stream(prompt, max_tokens=40, ignore_eos=True)
        next(stream)
        held = llm.kv_positions()
        assert len(held) == b.prefill + b.decode - 1
        assert set(range(len(prompt) - 64, len(prompt))) & set(held.tolist())  # the last chunk's cells
        stream.close()
        lent = llm.generate(prompt, max_tokens=40, ignore_eos=True).stats
    with ScopeLlama(model_path, lend="none", **kw) as paper:
        st = paper.generate(prompt, max_tokens=40, ignore_eos=True).stats
    assert lent.kv_cells_allocated == st.kv_cells_allocated
    assert lent.prefill_cells_peak == st.prefill_cells_peak


def test_lending_survives_reindexing(model_path):
    """Positions renumbered while cells are on loan: the lend state follows
    and every held cell stays visible to llama.cpp."""
    with ScopeLlama(model_path, budget=None) as full:
        prompt = _prompt(full)
    limit = len(prompt) + 20  # passed while cells are still on loan
    with ScopeLlama(model_path, budget=BUDGET, lend="passed", position_limit=limit) as llm:
        out = llm.generate(prompt, max_tokens=100, ignore_eos=True)
        assert out.stats.position_resets >= 1
        held = llm.kv_positions()
        assert len(held) <= BUDGET.total and held.max() < limit
        cells = llm.context.cells()
        visible, _ = llm.context.visible()
        assert set(np.flatnonzero(cells >= 0).tolist()) <= set(visible.tolist())
