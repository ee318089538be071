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
    Policy,
    PrefillSelector,
    ScopeDecode,
    ScoredDecode,
    ScoredPrefill,
    Slide,
    SnapKV,
    StepPlan,
    Streaming,
    StreamingPrefill,
    UnifiedDecode,
    build,
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
    out = SnapKV(window=2, kernel=3, lookback=0).select(np.arange(12, dtype=np.int32), attn_of(scores), keep=5)
    assert ints(out) == [0, 1, 5, 6, 7, 8, 9]


def test_snapkv_lookback_keeps_the_tokens_after_a_hit() -> None:
    # A hit on a span's first token (a name, a number's first digit). The
    # default window [j - 6, j] lifts it and the 6 cells after it; the
    # paper's centred width 7 only 3 after (and 3 before), so with the same
    # cells kept it gives up the span's 4th to 6th tokens (7, 8, 9) instead.
    scores = [0.0] * 14
    scores[3] = 1.0
    positions = np.arange(14, dtype=np.int32)
    assert ints(SnapKV(window=2).select(positions, attn_of(scores), keep=10)) == [0, 1, 2, 10]
    centred = SnapKV(window=2, kernel=7, lookback=0)
    assert ints(centred.select(positions, attn_of(scores), keep=10)) == [7, 8, 9, 10]


def test_snapkv_window_does_not_bleed_into_prefix() -> None:
    scores = [0.1] * 12
    scores[5] = 0.5
    scores[10] = 50.0  # inside the window: must not lift position 9
    out = SnapKV(window=2, kernel=3, lookback=0).select(np.arange(12, dtype=np.int32), attn_of(scores), keep=3)
    # 4, 5, 6 tie after pooling: the later one stays.
    assert ints(out) == [0, 1, 2, 3, 4, 5, 7, 8, 9]


def test_snapkv_head_reduce_changes_the_choice() -> None:
    heads = ([0.6, 0.6, 0.0, 0.0], [0.6, 0.0, 1.0, 0.0])  # sum: 1.2, 0.6, 1.0; max: 0.6, 0.6, 1.0
    positions = np.array([10, 20, 30, 40], dtype=np.int32)
    by_sum = SnapKV(window=1, kernel=1, lookback=0, head_reduce="sum").select(positions, attn_of(*heads), keep=2)
    by_max = SnapKV(window=1, kernel=1, lookback=0, head_reduce="max").select(positions, attn_of(*heads), keep=2)
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
        (dict(lookback=-1), r"lookback must be >= 0, got -1"),
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



# --- budgets, bind and cell counts on the classes ---------------------------------


def test_prefill_budget_and_keep() -> None:
    assert SnapKV(budget=10, window=4).keep(25) == 10
    assert SnapKV(budget=10, window=4).keep(7) == 7
    assert SnapKV().keep(25) == 25  # no budget: keep everything
    assert H2OPrefill(budget=3, recent=2).keep(9) == 3
    assert StreamingPrefill(budget=6).keep(9) == 6
    assert FullPrefill().keep(9) == 9
    # no budget, nothing evicted, whatever the selector
    assert Policy(prefill=SnapKV(), decode=Slide(decode=4, recent=2)).prefill_keep(1000) == 1000


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: SnapKV(budget=0), "SnapKV.budget must be >= 1, got 0"),
        (lambda: SnapKV(budget=2.5), "SnapKV.budget must be an int, got 2.5"),
        (lambda: SnapKV(budget=4, window=8), r"SnapKV.window must be in \[1, 4\], got 8"),
        (lambda: H2OPrefill(budget=4, recent=5), r"H2OPrefill.recent must be in \[1, 4\], got 5"),
        (lambda: StreamingPrefill(budget=True), "StreamingPrefill.budget must be an int, got True"),
        (lambda: FullPrefill(budget=8), "FullPrefill keeps every prompt cell: budget must be None, got 8"),
        (lambda: SnapKV(budget=4, window=2).keep(-1), "SnapKV.n_prompt must be >= 0, got -1"),
    ],
)
def test_prefill_bad_budget(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_decode_cells_per_class() -> None:
    assert Full().cells(kept=10, max_tokens=500) == 510
    assert Full().prompt_room() is None
    slide = Slide(decode=32, recent=8)
    assert slide.prompt_room() is None
    assert slide.cells(kept=64, max_tokens=500) == 64 + 32
    assert slide.cells(kept=64, max_tokens=20) == 64 + 20
    dis = Discontinuous(decode=32, recent=8, max_tokens=100)  # delta = 92 // 24 = 3
    assert dis.cells(kept=64, max_tokens=100) == 64 + 32 + 3
    for unified in (Streaming(total=96), H2O(total=96, recent=8)):
        assert unified.prompt_room() == 95
        assert unified.cells(kept=95, max_tokens=500) == 96
        assert unified.cells(kept=10, max_tokens=20) == 30
    assert isinstance(H2O(total=4, recent=1), UnifiedDecode) and isinstance(Streaming(total=8), UnifiedDecode)


@pytest.mark.parametrize("cls", [Adaptive, Discontinuous])
def test_scheduled_max_tokens_from_bind(cls: type) -> None:
    unbound = cls(decode=16, recent=4)
    assert unbound.max_tokens is None
    with pytest.raises(ValueError, match=rf"{cls.__name__}.max_tokens is None: call bind\(max_tokens\)"):
        unbound.plan(20, 20)
    if cls is Discontinuous:  # its slack (delta) depends on max_tokens; adaptive's cells do not
        with pytest.raises(ValueError, match="call bind"):
            unbound.cells(kept=4, max_tokens=100)
    bound = unbound.bind(100)
    assert bound == cls(decode=16, recent=4, max_tokens=100)
    assert unbound.max_tokens is None  # bind copies
    assert simulate(bound, steps=120) == simulate(cls(decode=16, recent=4, max_tokens=100), steps=120)
    # An explicit max_tokens is kept.
    assert cls(decode=16, recent=4, max_tokens=40).bind(100).max_tokens == 40
    with pytest.raises(ValueError, match=f"{cls.__name__}.bind.max_tokens must be >= 1, got 0"):
        unbound.bind(0)


def test_bind_gives_fresh_state() -> None:
    h2o = H2O(total=4, recent=1, head_reduce="sum")
    h2o.observe(np.arange(3, dtype=np.int32), attn_of([1, 2, 3]))
    fresh = h2o.bind(10)
    assert fresh == h2o and fresh is not h2o
    np.testing.assert_allclose(fresh.accumulated(np.arange(3, dtype=np.int32)), [0, 0, 0])
    np.testing.assert_allclose(h2o.accumulated(np.arange(3, dtype=np.int32)), [1, 2, 3])
    slide = Slide(decode=8, recent=2)
    assert slide.bind(5) == slide
    assert Full().bind(5) == Full()


def test_policy_composed() -> None:
    policy = Policy(prefill=SnapKV(budget=1024, window=32), decode=Slide(decode=512, recent=256))
    assert policy.prefill_keep(5000) == 1024 and policy.prefill_keep(100) == 100
    assert policy.decode_cells(kept=1024, max_tokens=2000) == 1024 + 512
    assert policy.for_generation(64) == policy
    # A unified strategy caps even a selector budget at its room.
    capped = Policy(prefill=SnapKV(budget=1024, window=32), decode=Streaming(total=200))
    assert capped.prefill_keep(5000) == 199
    with pytest.raises(ValueError, match="Policy.max_tokens must be >= 1, got 0"):
        policy.for_generation(0)
    with pytest.raises(ValueError, match="Policy.max_tokens must be an int, got 1.5"):
        policy.for_generation(1.5)


def test_policy_checks_its_parts() -> None:
    with pytest.raises(ValueError, match="got prefill=Slide, decode=SnapKV"):
        Policy(prefill=Slide(decode=4, recent=2), decode=SnapKV())
    with pytest.raises(ValueError, match="got prefill=str, decode=Full"):
        Policy(prefill="snapkv", decode=Full())


def test_scored_bases() -> None:
    assert isinstance(SnapKV(), ScoredPrefill) and isinstance(H2OPrefill(recent=1), ScoredPrefill)
    assert isinstance(Slide(decode=4, recent=2), ScopeDecode)
    assert isinstance(Slide(decode=4, recent=2), ScoredDecode) and isinstance(H2O(total=4, recent=1), ScoredDecode)
    assert SnapKV(window=5).protected == 5 and H2OPrefill(recent=3).protected == 3
    assert Slide(decode=8, recent=3).protected == 3 and H2O(total=8, recent=2).protected == 2


def test_a_new_scored_prefill_writes_only_score() -> None:
    from dataclasses import dataclass

    @dataclass(frozen=True, kw_only=True)
    class LastRow(ScoredPrefill):
        name = "last-row"

        def capture_from(self, n_prompt: int) -> int | None:
            return n_prompt - 1

        def score(self, positions: np.ndarray, attn: np.ndarray) -> np.ndarray:
            return attn.sum(axis=(0, 1))

    sel = LastRow(budget=3)
    assert isinstance(sel, PrefillSelector)
    positions = np.arange(6, dtype=np.int32)
    # 5 is the protected last cell even though it scores lowest
    assert ints(sel.select(positions, attn_of([0.1, 0.9, 0.2, 0.8, 0.3, 0.0]), keep=sel.keep(6))) == [0, 2, 4]
    with pytest.raises(ValueError, match="LastRow needs attention scores"):
        sel.select(positions, None, keep=3)
    assert Policy(prefill=sel, decode=Full()).prefill_keep(6) == 3


# --- the registry ------------------------------------------------------------------

BUDGET = Budget(prefill=64, decode=32, observation_window=6, recent_window=8)


def test_combinations_cover_every_name() -> None:
    assert {s for s, _ in COMBINATIONS} == set(STRATEGIES)
    assert {p for _, p in COMBINATIONS} == set(PREFILL_SELECTORS)
    assert ("streaming", "snapkv") not in COMBINATIONS
    assert len(COMBINATIONS) == len(set(COMBINATIONS)) == 4 * 4 + 2
    assert STRATEGIES == ("slide", "adaptive", "discontinuous", "streaming", "h2o", "full")
    assert PREFILL_SELECTORS == ("snapkv", "h2o", "streaming", "full")


@pytest.mark.parametrize(("strategy", "selector"), COMBINATIONS)
def test_build_every_combination(strategy: str, selector: str) -> None:
    policy = build(BUDGET, strategy=strategy, prefill_selector=selector).for_generation(100)
    assert policy.decode.name == strategy
    assert policy.prefill.name == selector
    assert validate_names(strategy, selector) == selector
    assert policy.decode.unified == (strategy in ("streaming", "h2o"))


def test_build_maps_the_budget() -> None:
    def named(strategy: str, selector: str | None = None) -> Policy:
        return build(BUDGET, strategy=strategy, prefill_selector=selector).for_generation(100)

    assert named("slide").prefill == SnapKV(budget=64, window=6)
    assert named("slide", "streaming").prefill == StreamingPrefill(budget=64)
    assert named("full", "h2o").prefill == H2OPrefill(budget=64, recent=6)
    assert named("full", "full").prefill == FullPrefill()
    # The unified baselines' prompt limit is their room (total - 1), not the selector's.
    assert named("h2o").prefill == H2OPrefill(recent=8)  # the baseline's recent window, if longer
    assert named("streaming").prefill == StreamingPrefill()
    assert named("slide").decode == Slide(decode=32, recent=8)
    assert named("adaptive").decode == Adaptive(decode=32, recent=8, max_tokens=100)
    assert named("discontinuous").decode == Discontinuous(decode=32, recent=8, max_tokens=100)
    assert named("streaming").decode == Streaming(total=96)
    assert named("h2o").decode == H2O(total=96, recent=8)
    assert named("full").decode == Full()
    assert named("h2o").decode is not named("h2o").decode  # fresh state per generation
    # Built without a max_tokens: the schedules take the generation's.
    assert build(BUDGET, strategy="adaptive").decode == Adaptive(decode=32, recent=8)
    assert build(BUDGET, strategy="discontinuous").decode.max_tokens is None
    one = build(BUDGET, strategy="h2o")
    assert one.for_generation(5).decode is not one.for_generation(5).decode
    tuned = build(BUDGET, strategy="slide", prefill_selector=None, head_reduce="sum").for_generation(9)
    assert tuned.prefill.head_reduce == tuned.decode.head_reduce == "sum"
    assert build(BUDGET).decode == Slide(decode=32, recent=8)  # slide by default


@pytest.mark.parametrize(
    ("strategy", "natural"),
    [("slide", "snapkv"), ("adaptive", "snapkv"), ("discontinuous", "snapkv"), ("full", "snapkv"),
     ("streaming", "streaming"), ("h2o", "h2o")],
)
def test_natural_selector(strategy: str, natural: str) -> None:
    assert validate_names(strategy, None) == natural
    policy = build(BUDGET, strategy=strategy, prefill_selector=None)
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
        build(BUDGET, strategy=strategy, prefill_selector=selector)


def test_build_bad_settings() -> None:
    with pytest.raises(ValueError, match="max_tokens must be >= 1, got 0"):
        build(BUDGET, strategy="full").for_generation(0)
    with pytest.raises(ValueError, match="build needs a Budget, got dict"):
        build({"prefill": 64, "decode": 32}, strategy="slide")
    with pytest.raises(ValueError, match="head_reduce must be one of"):
        build(BUDGET, strategy="slide", head_reduce="mean")


# The facade's cell counts before policies carried them (scope_edge/llama.py,
# policy_prefill_keep and _decode_cells), kept here to pin the behaviour.
def old_prefill_keep(policy: Policy, budget: Budget, *, n_prompt: int) -> int:
    if policy.decode.unified:
        return min(n_prompt, budget.total - 1)
    if policy.prefill.name == "full":
        return n_prompt
    return min(n_prompt, budget.prefill)


def old_decode_cells(policy: Policy, budget: Budget, *, kept: int, max_tokens: int) -> int:
    if policy.decode.unified:
        return min(kept + max_tokens, budget.total + policy.decode.slack)
    if policy.decode.name == "full":
        return kept + max_tokens
    return kept + min(max_tokens, budget.decode + policy.decode.slack)


@pytest.mark.parametrize(("strategy", "selector"), COMBINATIONS)
def test_cell_counts_match_the_old_facade(strategy: str, selector: str) -> None:
    budgets = [
        Budget(prefill=4, decode=2),  # total 6: the least Streaming (4 sinks) accepts
        Budget(prefill=16, decode=8),
        Budget(prefill=10, decode=6, observation_window=3, recent_window=2),
        Budget(prefill=64, decode=32, observation_window=6, recent_window=32),
        Budget(prefill=1024, decode=512),
    ]
    for budget in budgets:
        for head_reduce in ("max", "sum"):
            named = build(budget, strategy=strategy, prefill_selector=selector, head_reduce=head_reduce)
            for max_tokens in (1, 2, 7, 33, 100, 511, 512, 513, 5000):
                policy = named.for_generation(max_tokens)
                room = 0 if policy.lend is None else policy.lend.room
                for n_prompt in (0, 1, 2, 5, 9, 10, 11, 63, 64, 65, 96, 97, 1000, 1535, 1536, 10_000):
                    # the floor and the allocation are the old ones; lending adds room - 1 at most
                    floor = policy.prompt_floor(n_prompt)
                    assert floor == old_prefill_keep(policy, budget, n_prompt=n_prompt)
                    assert policy.decode_cells(kept=floor, max_tokens=max_tokens) == old_decode_cells(
                        policy, budget, kept=floor, max_tokens=max_tokens
                    )
                    assert policy.prefill_keep(n_prompt) == min(n_prompt, floor + max(room - 1, 0))
