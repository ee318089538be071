"""Ordered output over a compressed prompt (issue #33): the probe that
scores each earlier prefill chunk with the prompt's own tail, chunks that
fill the allocation, and the progress-guided lend rule. The rules on
arrays, then the runtime on the default model against llama.cpp's view."""
from __future__ import annotations

import llama_cpp
import numpy as np
import pytest

from scope_edge import ScopeLlama
from scope_edge.policies import LendPassed, LendProgress, Policy, Slide, SnapKV

WINDOW = 16


def _attn(scores: list[float]) -> np.ndarray:
    return np.asarray(scores, dtype=np.float32).reshape(1, 1, -1)


# -- the rules on arrays ----------------------------------------------------

def test_snapkv_probes_with_its_window_unless_told_not_to():
    assert SnapKV(budget=64, window=WINDOW).probe_tokens == WINDOW
    assert SnapKV(budget=64, window=WINDOW, probe=False).probe_tokens == 0
    with pytest.raises(ValueError, match="SnapKV.probe must be True or False, got 1"):
        SnapKV(budget=64, window=WINDOW, probe=1)


def test_progress_frontier_is_the_median_of_recent_peaks():
    lend = LendProgress(sinks=1, protected=1, steps=3, margin=0)
    pos = np.arange(10, dtype=np.int32)
    for peak in (5, 6, 8):  # one step glances far ahead: the median (6) is the place
        step = [0.0] * 10
        step[peak] = 1.0
        lend.observe(pos, _attn(step))
    # behind the frontier 6 (not 8): oldest first, whatever their attention (5 had some); sink 0 stays
    assert lend.select(pos, _attn([0] * 10), keep=7).tolist() == [1, 2, 3]
    # ahead of it by accumulated attention: 7 (never attended) goes before 6 and 8
    assert lend.select(pos, _attn([0] * 10), keep=4).tolist() == [1, 2, 3, 4, 5, 7]


def test_progress_waits_for_enough_steps_and_follows_reindexing():
    lend = LendProgress(sinks=0, protected=1, steps=2, margin=1)
    pos = np.arange(6, dtype=np.int32)
    lend.observe(pos, _attn([0, 0, 0, 0, 1.0, 0]))
    # one step is not enough for a place: every cell is ranked by attention
    assert lend.select(pos, _attn([0] * 6), keep=5).tolist() == [0]
    lend.observe(pos, _attn([0, 0, 0, 0, 1.0, 0]))  # frontier 4, margin 1: 0..2 are behind
    assert lend.select(pos, _attn([0] * 6), keep=3).tolist() == [0, 1, 2]
    lend.reindex(pos, pos + 50)
    assert lend.select(pos + 50, _attn([0] * 6), keep=4).tolist() == [50, 51]
    with pytest.raises(ValueError, match="LendProgress.steps must be >= 1"):
        LendProgress(steps=0)


# -- the runtime ------------------------------------------------------------

RECORDS = 24


def _inventory(llm: ScopeLlama) -> tuple[list[int], list[list[int]]]:
    """A chat prompt of RECORDS records with padding fields, the question
    last; and each record's "name: qty" prompt positions."""
    rng = np.random.default_rng(7)
    names = ["apples", "violins", "kettles", "lemons", "candles", "brooms", "tulips", "rulers", "kites", "drums",
             "mugs", "ropes", "seeds", "forks", "belts", "coins", "lamps", "socks", "bolts", "pears", "keys",
             "hats", "jars", "nails"][:RECORDS]
    qty = rng.integers(10, 99, RECORDS)
    head = "<|im_start|>user\nInventory:\n"
    prompt = llm.tokenize(head)
    keys = []
    for i, (name, q) in enumerate(zip(names, qty), 1):
        prompt += llm.tokenize(f"{i}. ")
        start = len(prompt)
        prompt += llm.tokenize(f"{name}: {q}")
        keys.append(list(range(start, len(prompt))))
        prompt += llm.tokenize(f" (aisle {rng.integers(1, 9)}, shelf {'ABCDEF'[rng.integers(6)]}, color red)\n")
    prompt += llm.tokenize("\nList the items in order with their quantity only, one per line as: "
                           "<number>. <item>: <quantity><|im_end|>\n<|im_start|>assistant\n")
    return prompt, keys


def _policy(probe: bool) -> Policy:
    """96 prompt cells plus 160 of decode room lent to the prompt: 255 of the
    prompt's ~580 tokens stay after the prefill."""
    return Policy(prefill=SnapKV(budget=96, window=WINDOW, probe=probe), decode=Slide(decode=160, recent=16),
                  lend=LendPassed(protected=WINDOW))


def _prefill(model_path: str, probe: bool, chunk: int) -> tuple[float, int, int, int, int]:
    """(share of the records' key tokens held after the prefill selection,
    prompt tokens, llama.cpp's highest position then, cells held, prefill
    peak cells)."""
    with ScopeLlama(model_path, policy=_policy(probe), prefill_chunk=chunk) as llm:
        prompt, keys = _inventory(llm)
        stream = llm.stream(prompt, max_tokens=200)
        next(stream)
        held = set(llm.kv_positions().tolist())
        top = llama_cpp.llama_memory_seq_pos_max(llm.context.memory, 0)
        assert llama_cpp.llama_memory_seq_pos_min(llm.context.memory, 0) == min(held)
        # llama.cpp's mask for the prompt's last row saw every cell held now
        # (and the last selection's evictions besides)
        cells = llm.context.cells()
        visible, _ = llm.context.visible()
        assert set(np.flatnonzero(cells >= 0).tolist()) <= set(visible.tolist())
        assert len(held) == len(np.flatnonzero(cells >= 0))
        stream.close()
        st = llm.generate(prompt, max_tokens=8).stats
        assert st.prefill_cells_peak <= st.kv_cells_allocated
        key_held = float(np.mean([p in held for k in keys for p in k]))
        return key_held, len(prompt), top, len(held), st.prefill_cells_peak


def test_probe_cells_are_gone_and_the_tail_selects_every_chunk(model_path):
    probed, n_prompt, top, n_held, peak = _prefill(model_path, probe=True, chunk=48)
    plain, _, top_plain, n_held_plain, peak_plain = _prefill(model_path, probe=False, chunk=48)
    # the probe ran past each chunk's end, and none of its positions stayed
    assert top == top_plain == n_prompt - 1
    assert n_held == n_held_plain == 96 + 160 - 1  # the floor plus the loan, probe or not
    assert peak == peak_plain  # the probe's cells come out of the chunk
    # scored by the question at the end, the earlier chunks keep more of the records' names and quantities
    # (measured 0.56 against 0.46)
    assert probed > plain + 0.05, (probed, plain)


def test_earlier_chunks_fill_what_the_allocation_leaves(model_path):
    """With chunks smaller than the decode room, the kept prompt grows above
    the prefill budget between chunks: the prefill's peak reaches the cells
    the decode phase needs anyway (96 + 64), never more. The progress rule
    then gives the loan back as the output grows."""
    policy = Policy(prefill=SnapKV(budget=96, window=WINDOW), decode=Slide(decode=64, recent=16),
                    lend=LendProgress(protected=WINDOW))
    with ScopeLlama(model_path, policy=policy, prefill_chunk=40) as llm:
        prompt, _ = _inventory(llm)
        out = llm.generate(prompt, max_tokens=100, ignore_eos=True)
        st = out.stats
        assert st.prefill_cells_peak == 96 + 64  # not 96 + 40: earlier chunks kept more than the floor
        assert st.kv_cells_peak <= 96 + 64 <= st.kv_cells_allocated
        held = llm.kv_positions()
        assert len(held[held < len(prompt)]) == 96  # the whole loan went back: 100 tokens > 64 cells
