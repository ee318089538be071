"""Policies on small arrays with known answers, and simulated decode loops."""
from __future__ import annotations

import numpy as np
import pytest

from scope_edge.budget import Budget
from scope_edge.policies import (
    COMBINATIONS,
    EMPTY,
    H2O,
    PREFILL_SELECTORS,
    STRATEGIES,
    Adaptive,
    DecodeStrategy,
    Discontinuous,
    Full,
    FullPrefill,
    H2OPrefill,
    Slide,
    SnapKV,
    StepPlan,
    Streaming,
    StreamingPrefill,
    make_policy,
    validate_names,
)


def attn_of(*rows: list[float]) -> np.ndarray:
    """[1 layer, len(rows) heads, n] float32 from per-head rows."""
    return np.array([rows], dtype=np.float32)


def ints(values: np.ndarray) -> list[int]:
    return [int(v) for v in values]


# --- SnapKV --------------------------------------------------------------------


def test_snapkv_capture_from_window() -> None:
    assert SnapKV(window=8).capture_from(100) == 92
    assert SnapKV(window=8).capture_from(5) == 0


def test_snapkv_pooling_keeps_neighbours_of_a_hit() -> None:
    scores = [0.0] * 12
    scores[3] = 1.0
    out = SnapKV(window=2, kernel=3).select(np.arange(12, dtype=np.int32), attn_of(scores), keep=5)
    assert ints(out) == [0, 1, 5, 6, 7, 8, 9]


def test_snapkv_window_does_not_bleed_into_prefix() -> None:
    scores = [0.1] * 12
    scores[5] = 0.5
    scores[10] = 50.0  # inside the window: must not lift position 9
    out = SnapKV(window=2, kernel=3).select(np.arange(12, dtype=np.int32), attn_of(scores), keep=3)
    # 4, 5, 6 tie after pooling: the later one stays.
    assert ints(out) == [0, 1, 2, 3, 4, 5, 7, 8, 9]


def test_snapkv_head_reduce_changes_the_choice() -> None:
    heads = ([0.6, 0.6, 0.0, 0.0], [0.6, 0.0, 1.0, 0.0])  # sum: 1.2, 0.6, 1.0; max: 0.6, 0.6, 1.0
    positions = np.array([10, 20, 30, 40], dtype=np.int32)
    by_sum = SnapKV(window=1, kernel=1, head_reduce="sum").select(positions, attn_of(*heads), keep=2)
    by_max = SnapKV(window=1, kernel=1, head_reduce="max").select(positions, attn_of(*heads), keep=2)
    assert ints(by_sum) == [20, 30]
    assert ints(by_max) == [10, 20]


def test_snapkv_needs_attn_only_when_evicting() -> None:
    positions = np.arange(4, dtype=np.int32)
    assert SnapKV().select(positions, None, keep=4) is EMPTY
    with pytest.raises(ValueError, match="attn=None"):
        SnapKV().select(positions, None, keep=3)
    with pytest.raises(ValueError, match=r"\[n_layer, n_head, 4\].*\(1, 1, 3\)"):
        SnapKV().select(positions, np.zeros((1, 1, 3), dtype=np.float32), keep=3)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        (dict(kernel=4), "kernel must be odd, got 4"),
        (dict(kernel=0), r"kernel must be >= 1, got 0"),
        (dict(window=0), r"window must be >= 1, got 0"),
        (dict(head_reduce="mean"), "'mean'"),
    ],
)
def test_snapkv_bad_settings(settings: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SnapKV(**settings)


# --- H2O prefill and decode ------------------------------------------------------


def test_h2o_prefill_heavy_hitters_plus_recent() -> None:
    sel = H2OPrefill(recent=2)
    assert sel.capture_from(50) == 0
    attn = attn_of([0.9, 0.1, 0.8, 0.2, 0.0, 0.0], [0.0, 0.0, 0.3, 0.0, 0.0, 0.0])
    assert ints(sel.select(np.arange(6, dtype=np.int32), attn, keep=4)) == [1, 3]


def test_h2o_prefill_bad_recent() -> None:
    with pytest.raises(ValueError, match="recent must be >= 1, got 0"):
        H2OPrefill(recent=0)


def test_h2o_plan_always_captures() -> None:
    h2o = H2O(total=10, recent=2)
    assert h2o.unified
    assert h2o.plan(1, 9) == StepPlan(keep=None, capture=True)
    assert h2o.plan(1, 10) == StepPlan(keep=9, capture=True)


def test_h2o_accumulates_and_drops_unheld_positions() -> None:
    h2o = H2O(total=4, recent=1, head_reduce="sum")
    h2o.observe(np.arange(5, dtype=np.int32), attn_of([1, 2, 3, 4, 5], [0, 0, 0, 0, 1]))
    held = np.array([0, 1, 3, 4, 5], dtype=np.int32)  # 2 was evicted, 5 is new
    h2o.observe(held, attn_of([5, 0, 0, 1, 1], [0, 0, 0, 0, 0]))
    np.testing.assert_allclose(h2o.accumulated(np.arange(6, dtype=np.int32)), [6, 2, 0, 4, 7, 1])
    # Lowest accumulated outside the last one: 1 (2.0) then 3 (4.0).
    assert ints(h2o.select(held, None, 3)) == [1, 3]


def test_h2o_bad_settings() -> None:
    with pytest.raises(ValueError, match=r"recent must be in \[1, 9\], got 10"):
        H2O(total=10, recent=10)
    with pytest.raises(ValueError, match="total must be >= 2, got 1"):
        H2O(total=1, recent=1)


# --- Streaming -------------------------------------------------------------------


def test_streaming_prefill_keeps_sinks_and_recent() -> None:
    sel = StreamingPrefill(sinks=2)
    assert sel.capture_from(100) is None
    assert ints(sel.select(np.arange(10, dtype=np.int32), None, keep=5)) == [2, 3, 4, 5, 6]
    assert sel.select(np.arange(3, dtype=np.int32), None, keep=5) is EMPTY


def test_streaming_small_keep_keeps_the_newest() -> None:
    sel = StreamingPrefill(sinks=4)
    assert ints(sel.select(np.arange(10, dtype=np.int32), None, keep=3)) == [2, 3, 4, 5, 6, 7, 8]
    assert ints(sel.select(np.arange(3, dtype=np.int32), None, keep=0)) == [0, 1, 2]


def test_streaming_decode_evicts_oldest_non_sink() -> None:
    strat = Streaming(total=8, sinks=2)
    assert strat.unified
    assert strat.plan(3, 7) == StepPlan(keep=None, capture=False)
    assert strat.plan(3, 8) == StepPlan(keep=7, capture=False)
    positions = np.array([0, 1, 5, 6, 7, 8, 9, 10], dtype=np.int32)
    assert ints(strat.select(positions, None, 7)) == [5]


def test_streaming_bad_settings() -> None:
    with pytest.raises(ValueError, match="total must be >= 6, got 5"):
        Streaming(total=5, sinks=4)
    with pytest.raises(ValueError, match="sinks must be >= 0, got -1"):
        StreamingPrefill(sinks=-1)


# --- Full ------------------------------------------------------------------------


def test_full_never_evicts() -> None:
    assert FullPrefill().capture_from(10) is None
    assert FullPrefill().select(np.arange(10, dtype=np.int32), None, keep=2) is EMPTY
    assert Full().plan(100, 10_000) == StepPlan(keep=None, capture=False)
    assert Full().select(np.arange(10, dtype=np.int32), None, 2) is EMPTY


# --- SCOPE decode ----------------------------------------------------------------


def test_scope_select_uses_current_scores_and_protects_recent() -> None:
    slide = Slide(decode=5, recent=2)
    assert not slide.unified
    positions = np.arange(100, 107, dtype=np.int32)
    attn = np.array(
        [[[0.5, 0.1, 0.9, 0.2, 0.3, 0.0, 0.0]], [[0.0, 0.0, 0.0, 0.2, 0.0, 0.0, 0.0]]], dtype=np.float32
    )  # per cell: 0.5, 0.1, 0.9, 0.4, 0.3 | recent 105, 106
    assert ints(slide.select(positions, attn, 4)) == [101, 103, 104]
    # Not accumulated: a second step with other scores chooses afresh.
    slide.observe(positions, attn)
    later = attn_of([0.0, 0.0, 0.3, 0.4, 0.9, 0.0, 0.0])
    assert ints(slide.select(positions, later, 4)) == [100, 101, 102]


def test_scope_select_needs_attn() -> None:
    with pytest.raises(ValueError, match="Slide needs attention"):
        Slide(decode=4, recent=2).select(np.arange(5, dtype=np.int32), None, 3)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        (dict(decode=1, recent=1), "decode must be >= 2, got 1"),
        (dict(decode=8, recent=9), r"recent must be in \[1, 8\], got 9"),
        (dict(decode=8, recent=0), r"recent must be in \[1, 8\], got 0"),
        (dict(decode=8, recent=2, head_reduce="avg"), "'avg'"),
        (dict(decode=8.0, recent=2), "decode must be an int, got 8.0"),
    ],
)
def test_scope_bad_settings(settings: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Slide(**settings)


@pytest.mark.parametrize("cls", [Adaptive, Discontinuous])
def test_scheduled_bad_max_tokens(cls: type) -> None:
    with pytest.raises(ValueError, match="max_tokens must be >= 1, got 0"):
        cls(decode=8, recent=2, max_tokens=0)


def simulate(strategy: DecodeStrategy, steps: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Run the facade's decode loop on cells with random scores. Returns the
    cells attention saw at each step and the steps that selected."""
    rng = np.random.default_rng(seed)
    held = np.zeros(0, dtype=np.int32)
    seen, selections = [], []
    for step in range(1, steps + 1):
        held = np.append(held, np.int32(step - 1))
        plan = strategy.plan(step, len(held))
        seen.append(len(held))
        attn = rng.random((2, 3, len(held)), dtype=np.float32) if plan.capture else None
        if attn is not None:
            strategy.observe(held, attn)
        if plan.keep is None:
            continue
        evicted = strategy.select(held, attn, plan.keep)
        recent = getattr(strategy, "recent", 1)
        assert not np.isin(held[-min(recent, plan.keep) :], evicted).any()
        held = np.setdiff1d(held, evicted).astype(np.int32)
        assert len(held) == plan.keep
        selections.append(step)
    return seen, selections


def test_slide_invariant() -> None:
    seen, selections = simulate(Slide(decode=16, recent=4), steps=100)
    assert max(seen) == 16
    assert seen[:16] == list(range(1, 17))
    assert selections == list(range(16, 101))  # every step once full


def test_adaptive_schedule() -> None:
    ada = Adaptive(decode=16, recent=4, max_tokens=100)
    budgets = [ada.budget_at(s) for s in range(0, 200)]
    assert all(b1 >= b0 for b0, b1 in zip(budgets, budgets[1:]))
    assert budgets[:5] == [0, 1, 2, 3, 4]
    assert ada.budget_at(99) < 16 == ada.budget_at(100) == ada.budget_at(199)
    assert ada.budget_at(52) == 4 + (48 * 12) // 96


def test_adaptive_simulated_stays_within_schedule() -> None:
    ada = Adaptive(decode=16, recent=4, max_tokens=100)
    seen, selections = simulate(ada, steps=150)
    # the whole recent window stays held between steps, so a step sees at least recent + 1
    assert all(n <= max(ada.budget_at(t), ada.recent + 1) for t, n in enumerate(seen, start=1))
    assert seen[99] == 16 and max(seen) == 16
    assert selections[0] == 5  # the first step holding more than the recent window


def test_adaptive_short_generation_grows_like_slide() -> None:
    ada = Adaptive(decode=8, recent=4, max_tokens=3)  # T <= recent
    assert [ada.budget_at(s) for s in range(1, 11)] == [1, 2, 3, 4, 5, 6, 7, 8, 8, 8]
    assert simulate(ada, steps=30) == simulate(Slide(decode=8, recent=4), steps=30)


def test_adaptive_keeps_the_newest_cell() -> None:
    ada = Adaptive(decode=2, recent=1, max_tokens=100)  # budget_at(2) == 1
    assert ada.plan(1, 1) == StepPlan(keep=None, capture=False)
    assert ada.plan(2, 2) == StepPlan(keep=1, capture=True)


def test_discontinuous_delta_and_cadence() -> None:
    dis = Discontinuous(decode=16, recent=4, max_tokens=100)
    assert dis.delta == dis.slack == (100 - 4) // 12 == 8
    seen, selections = simulate(dis, steps=200)
    assert max(seen) == 16 + 8
    assert selections[0] == 24
    assert set(np.diff(selections)) == {9}  # every delta + 1 steps


def test_discontinuous_short_generation_is_slide() -> None:
    dis = Discontinuous(decode=16, recent=4, max_tokens=3)
    assert dis.delta == 0
    assert simulate(dis, steps=40) == simulate(Slide(decode=16, recent=4), steps=40)


@pytest.mark.parametrize("strategy", [H2O(total=12, recent=3), Streaming(total=12, sinks=2)])
def test_unified_baselines_simulated(strategy: DecodeStrategy) -> None:
    seen, selections = simulate(strategy, steps=60)
    assert max(seen) == 12
    assert selections == list(range(12, 61))


def test_scope_strategies_capture_only_when_selecting() -> None:
    for strategy in (Slide(decode=8, recent=2), Adaptive(decode=8, recent=2, max_tokens=40),
                     Discontinuous(decode=8, recent=2, max_tokens=40)):
        for step in range(1, 60):
            for n_held in range(1, 20):
                plan = strategy.plan(step, n_held)
                assert plan.capture == (plan.keep is not None)
                assert plan.keep is None or 1 <= plan.keep < n_held


# --- make_policy -----------------------------------------------------------------

BUDGET = Budget(prefill=64, decode=32, observation_window=6, recent_window=8)


def test_combinations_cover_every_name() -> None:
    assert {s for s, _ in COMBINATIONS} == set(STRATEGIES)
    assert {p for _, p in COMBINATIONS} == set(PREFILL_SELECTORS)
    assert ("streaming", "snapkv") not in COMBINATIONS
    assert len(COMBINATIONS) == len(set(COMBINATIONS)) == 4 * 4 + 2


@pytest.mark.parametrize(("strategy", "selector"), COMBINATIONS)
def test_make_policy_every_combination(strategy: str, selector: str) -> None:
    policy = make_policy(BUDGET, strategy=strategy, prefill_selector=selector, max_tokens=100)
    assert policy.decode.name == strategy
    assert policy.prefill.name == selector
    assert validate_names(strategy, selector) == selector
    assert policy.decode.unified == (strategy in ("streaming", "h2o"))


def test_make_policy_maps_the_budget() -> None:
    def build(strategy: str, selector: str | None = None):
        return make_policy(BUDGET, strategy=strategy, prefill_selector=selector, max_tokens=100)

    assert build("slide").prefill == SnapKV(window=6)
    assert build("full", "h2o").prefill == H2OPrefill(recent=6)
    assert build("h2o").prefill == H2OPrefill(recent=8)  # the baseline's recent window, if longer
    assert build("slide").decode == Slide(decode=32, recent=8)
    assert build("adaptive").decode == Adaptive(decode=32, recent=8, max_tokens=100)
    assert build("discontinuous").decode == Discontinuous(decode=32, recent=8, max_tokens=100)
    assert build("streaming").decode == Streaming(total=96)
    assert build("h2o").decode == H2O(total=96, recent=8)
    assert build("full").decode == Full()
    assert build("h2o").decode is not build("h2o").decode  # fresh state per generation
    tuned = make_policy(BUDGET, strategy="slide", prefill_selector=None, max_tokens=9, head_reduce="max")
    assert tuned.prefill.head_reduce == tuned.decode.head_reduce == "max"


@pytest.mark.parametrize(
    ("strategy", "natural"),
    [("slide", "snapkv"), ("adaptive", "snapkv"), ("discontinuous", "snapkv"), ("full", "snapkv"),
     ("streaming", "streaming"), ("h2o", "h2o")],
)
def test_natural_selector(strategy: str, natural: str) -> None:
    assert validate_names(strategy, None) == natural
    policy = make_policy(BUDGET, strategy=strategy, prefill_selector=None, max_tokens=10)
    assert policy.prefill.name == natural


@pytest.mark.parametrize(
    ("strategy", "selector", "match"),
    [
        ("sliding", None, "unknown strategy 'sliding'; valid: slide, adaptive, discontinuous"),
        ("slide", "snap", "unknown prefill selector 'snap'; valid: snapkv, h2o, streaming, full"),
        ("streaming", "snapkv", "only with prefill selector 'streaming'"),
        ("h2o", "full", "only with prefill selector 'h2o'"),
    ],
)
def test_bad_names(strategy: str, selector: str | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_names(strategy, selector)
    with pytest.raises(ValueError, match=match):
        make_policy(BUDGET, strategy=strategy, prefill_selector=selector, max_tokens=10)


def test_make_policy_bad_max_tokens() -> None:
    with pytest.raises(ValueError, match="max_tokens must be >= 1, got 0"):
        make_policy(BUDGET, strategy="full", prefill_selector=None, max_tokens=0)
