"""The examples, on arrays: a policy written outside the package plugs in."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

from scope_edge.policies import EMPTY, Policy, ScoredDecode, SnapKV, StepPlan

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
tova_example = importlib.import_module("examples.tova")
TOVA, tova = tova_example.TOVA, tova_example.tova


def attn_of(*rows: list[float]) -> np.ndarray:
    """[1 layer, len(rows) heads, n] float32 from per-head rows."""
    return np.array([rows], dtype=np.float32)


def test_tova_is_short() -> None:
    assert len((ROOT / "examples" / "tova.py").read_text().splitlines()) < 40


def test_tova_evicts_the_least_attended_non_newest_cell() -> None:
    strategy = TOVA(total=5)
    assert isinstance(strategy, ScoredDecode) and strategy.unified and strategy.name == "tova"
    positions = np.array([0, 1, 2, 7, 8], dtype=np.int32)
    # heads summed: 0.5, 0.3, 0.6, 0.4, 0.0 -> the newest (8) scores lowest but stays
    attn = attn_of([0.5, 0.1, 0.2, 0.2, 0.0], [0.0, 0.2, 0.4, 0.2, 0.0])
    plan = strategy.plan(3, len(positions))
    assert plan == StepPlan(keep=4, capture=True)
    assert [int(p) for p in strategy.select(positions, attn, plan.keep)] == [1]
    # max over heads would have evicted 7 (0.5, 0.2, 0.4, 0.2): TOVA sums (averages) heads
    assert strategy.select(positions[:4], None, 4) is EMPTY


def test_tova_needs_this_steps_attention() -> None:
    with pytest.raises(ValueError, match="TOVA needs attention scores"):
        TOVA(total=4).select(np.arange(5, dtype=np.int32), None, 3)


def test_tova_keeps_total_minus_one_cells() -> None:
    strategy = TOVA(total=8)
    rng = np.random.default_rng(0)
    held = np.arange(7, dtype=np.int32)  # what the prefill left: prompt_room()
    for step in range(1, 50):
        held = np.append(held, np.int32(7 + step - 1))
        plan = strategy.plan(step, len(held))
        assert plan == StepPlan(keep=7, capture=True)
        evicted = strategy.select(held, rng.random((2, 3, len(held)), dtype=np.float32), plan.keep)
        assert len(evicted) == 1 and evicted[0] != held[-1]
        held = np.setdiff1d(held, evicted).astype(np.int32)
        assert len(held) == strategy.total - 1
    assert strategy.plan(1, 7) == StepPlan(keep=None, capture=False)  # not full: no capture


def test_tova_cells_and_prompt_room() -> None:
    strategy = TOVA(total=100)
    assert strategy.prompt_room() == 99
    assert strategy.cells(kept=99, max_tokens=500) == 100
    assert strategy.cells(kept=10, max_tokens=20) == 30
    with pytest.raises(ValueError, match="TOVA.total must be >= 2, got 1"):
        TOVA(total=1)


def test_tova_policy() -> None:
    policy = tova(100)
    assert isinstance(policy, Policy)
    assert policy.prefill == SnapKV(window=1, kernel=1, lookback=0, head_reduce="sum")
    assert policy.prefill.capture_from(500) == 499  # the last prompt row only
    assert policy.prefill_keep(500) == 99 and policy.prefill_keep(50) == 50
    assert policy.decode_cells(kept=99, max_tokens=10) == 100
    bound = policy.for_generation(64)
    assert bound.decode == policy.decode and bound.decode is not policy.decode
    # prefill: keep the cells the last prompt row attends to most, and that row's own cell
    attn = attn_of([0.1, 0.6, 0.05, 0.25, 0.0])
    assert [int(p) for p in policy.prefill.select(np.arange(5, dtype=np.int32), attn, keep=3)] == [0, 2]
