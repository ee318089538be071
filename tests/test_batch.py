"""Several sequences in one context, decoded together (runtime/batch.py), on
the real default model, checked against llama.cpp's own view of each
sequence and against the same requests run alone through ScopeLlama."""
from __future__ import annotations

import contextlib
import ctypes
import logging
import threading

import llama_cpp
import numpy as np
import pytest

from scope_edge import Budget, EngineConfig, ScopeLlama
from scope_edge.hook import HookError
from scope_edge.policies import build
from scope_edge.runtime.batch import BatchRunner, BatchSettings, Cancelled, NoFreeSlot, on_own_thread
from scope_edge.runtime.context import Context
from scope_edge.runtime.generation import Limits
from scope_edge.runtime.model import Model
from scope_edge.runtime.sampling import Sampling

BUDGET = Budget(prefill=96, decode=48)
TOPICS = ["a lighthouse keeper", "a dragon who loves tea", "the history of bread", "a robot learning to paint"]
# Greedy choices of a batched sequence may differ from the same request run
# alone only where two tokens nearly tie: a batched step multiplies several
# sequences' rows at once, so llama.cpp's SIMD sums group them differently
# (measured gaps 0.01-0.29 logits at the first difference, with one unified
# cell space; a real fault would pick a token ranked far below). The same
# holds for the scores that choose which cells to evict: when a near tie
# there keeps another cell, the caches part, and the tokens may part later.
NEAR_TIE = 0.5
log = logging.getLogger(__name__)


def _story(llm: ScopeLlama, topic: str, *, words: int = 0) -> list[int]:
    notes = " ".join(f"note{i} about {topic}." for i in range(words))
    return llm.tokenize(llm.render_chat([{"role": "user", "content": f"{notes} Write a long story about {topic}."}]))


@pytest.fixture(scope="module")
def llm(model_path):
    with ScopeLlama(model_path, budget=BUDGET) as llm:
        yield llm


@pytest.fixture(scope="module")
def model(model_path):
    with Model(model_path) as model:
        yield model


def _runner(model: Model, slots: int, *, step_tokens: int | None = None, **engine) -> BatchRunner:
    return BatchRunner(model, BatchSettings(slots=slots, slot_cells=512, step_tokens=step_tokens,
                                            engine=EngineConfig(**engine)))


def _tokens(req) -> list[int]:
    return [c.token for c in req if c.token is not None]


def _greedy(runner: BatchRunner, prompt: list[int], max_tokens: int, **kw):
    return runner.start(prompt, policy=build(BUDGET), limits=Limits(max_tokens=max_tokens, **kw),
                        sampling=Sampling())


def test_one_request_on_a_batch_context_equals_scope_llama(llm, model):
    prompt = _story(llm, TOPICS[0], words=40)
    assert len(prompt) > BUDGET.prefill  # the prefill selection evicts
    alone = llm.generate(prompt, max_tokens=80)
    runner = _runner(model, 3)
    try:
        got = _tokens(_greedy(runner, prompt, 80))
        assert got == alone.tokens  # one sequence: the same cells, the same sums, token for token
        np.testing.assert_array_equal(runner.positions(0), llm.kv_positions())  # the same evictions
    finally:
        runner.close()


def _alone(llm: ScopeLlama, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """Tokens of llm's greedy run and the positions its cache held after each."""
    tokens, held = [], []
    for chunk in llm.stream(prompt, max_tokens=n, ignore_eos=True):
        tokens.append(chunk.token)
        held.append(llm.kv_positions())
    return tokens, held


def test_concurrent_sequences_match_their_runs_alone_up_to_near_ties(llm, model):
    prompts = [_story(llm, t, words=10 * i) for i, t in enumerate(TOPICS)]
    n = 72  # past the decode budget: every sequence evicts while the others decode
    alone = [_alone(llm, p, n) for p in prompts]
    runner = _runner(model, 4)
    got: list[list[tuple[int | None, np.ndarray]]] = [[] for _ in prompts]

    def sink_for(i: int):
        def sink(item) -> None:  # called by the sequence's worker between its steps
            got[i].append((item.token, runner.positions(i)))
        return sink

    try:
        for i, p in enumerate(prompts):  # empty slots, equally unused: request i takes slot i
            req = runner.start(p, policy=build(BUDGET), limits=Limits(max_tokens=n, ignore_eos=True),
                               sampling=Sampling(), sink=sink_for(i))
            assert req.slot == i
        while runner.free_slots() < 4 or any(len(g) < n for g in got):
            threading.Event().wait(0.05)
        assert runner.batcher.steps < 4 * n  # decoded together, not in turn
    finally:
        runner.close()
    parts = {"identical": 0, "token": 0, "cell": 0}
    for prompt, (a_tokens, a_held), g in zip(prompts, alone, got):
        b_tokens = [t for t, _ in g]
        assert len(b_tokens) == n
        # the first step where the token or the cache after it differs
        k = next((i for i in range(n) if a_tokens[i] != b_tokens[i] or not np.array_equal(a_held[i], g[i][1])), None)
        if k is None:
            parts["identical"] += 1
        elif a_tokens[k] != b_tokens[k]:  # the same cache held, another token chosen
            parts["token"] += 1
            logits = list(llm.teacher_force(prompt, a_tokens[: k + 1]))[k]  # the alone run's own logits there
            assert logits[a_tokens[k]] - logits[b_tokens[k]] < NEAR_TIE, f"step {k}: batched chose a token ranked far below"
        else:  # the same token, but the step's selection kept another cell
            parts["cell"] += 1
            check_one_cell_choice(a_held[k], g[k][1], step=k)
    log.info("batched against alone: %s", parts)
    assert parts["identical"] + parts["token"] + parts["cell"] == len(prompts)


def check_one_cell_choice(alone: np.ndarray, batched: np.ndarray, *, step: int) -> None:
    """Caches that part on a near-tie score differ by a choice between cells
    of equal number: the same count held, a cell or two swapped, and the
    newest cells (the recent window, which no score evicts) the same."""
    only_alone, only_batched = np.setdiff1d(alone, batched), np.setdiff1d(batched, alone)
    assert len(alone) == len(batched), f"step {step}: {len(batched)} cells held batched, {len(alone)} alone"
    assert 1 <= len(only_alone) <= 2, f"step {step}: caches differ by {len(only_alone)} cells, not one choice"
    recent = np.sort(alone)[-BUDGET.recent_window:]
    assert np.isin(recent, batched).all(), f"step {step}: batched lost recent cells {np.setdiff1d(recent, batched)}"
    assert only_batched.max() < recent[0], f"step {step}: batched kept {only_batched}, inside the recent window"


def test_each_sequence_cells_as_llama_cpp_sees_them(llm, model):
    runner = _runner(model, 3)
    try:
        prompts = [_story(llm, t, words=30) for t in TOPICS[:3]]
        reqs = [_greedy(runner, p, 64, ignore_eos=True) for p in prompts]
        for r in reqs:
            _tokens(r)
        ctx = runner.context
        # one more step of every sequence through the hook, then compare with llama.cpp's mask and positions
        held = [runner.positions(s) for s in range(3)]
        nxt = [int(h[-1]) + 1 for h in held]
        ctx.decode_seqs([prompts[0][1]] * 3, nxt, [0, 1, 2], [True, True, True])
        seqs, cells = ctx.cell_seqs(), ctx.cells()
        mem = ctx.memory
        for s in range(3):
            mine = np.flatnonzero(seqs == s)
            positions = np.sort(cells[mine])
            np.testing.assert_array_equal(positions, np.r_[held[s], nxt[s]])
            assert len(positions) <= BUDGET.total + 1  # the budget holds per sequence
            assert (llama_cpp.llama_memory_seq_pos_min(mem, s), llama_cpp.llama_memory_seq_pos_max(mem, s)) == (
                positions[0], positions[-1])
            visible, n_kv = runner.visible(s)
            assert set(visible.tolist()) == set(mine.tolist())  # its last row sees exactly its own cells
            # ... which are in its own stream (kv_unified off): the attention spans that stream's cells only
            base = s * runner.settings.slot_cells
            assert base <= mine.min() and mine.max() < base + runner.settings.slot_cells
            assert mine.max() - base + 1 <= n_kv <= runner.settings.slot_cells
        assert not (set(np.flatnonzero(seqs == 0)) & set(np.flatnonzero(seqs == 1)))
        # evicting from one sequence leaves the others alone
        before = [runner.positions(s) for s in (0, 2)]
        assert ctx.evict(before[0][:5], seq=0) == 5
        np.testing.assert_array_equal(runner.positions(2), before[1])
        assert llama_cpp.llama_memory_seq_pos_min(mem, 0) == before[0][5]
        with pytest.raises(HookError, match="not held"):
            ctx.evict(before[1][:1], seq=0)  # sequence 2's position: sequence 0 does not hold it
        with pytest.raises(HookError, match="last of sequence 2"):
            ctx.evict(before[1][-1:], seq=2)
        with pytest.raises(HookError, match="sequence 7"):
            ctx.evict(before[1][:1], seq=7)
        with pytest.raises(ValueError, match=r"sequence ids must be in \[0, 3\)"):
            ctx.decode_seqs([1], [0], [3], [True])
    finally:
        runner.close()


def check_reordered_step(batched_model: Model, alone_model: Model, prompts: list[list[int]]) -> None:
    """Decode prompts (one sequence each, unequal lengths) in one step on a
    context of batched_model with ubatches of 16: llama.cpp splits it into
    ubatches of equal tokens per sequence (split_equal, one KV stream each), in
    an order other than the batch's. Each sequence's cells, positions and
    captured attention must be what its tokens give decoded alone."""
    n = len(prompts)
    abort = ctypes.c_bool(False)
    batched = Context(batched_model, n_cells=n * 256, n_threads=2, n_threads_batch=2, type_k="f16", abort=abort,
                      n_ubatch=16, n_seq=n)
    try:
        with contextlib.ExitStack() as armed:
            for s in range(n):
                armed.enter_context(batched.capturing(0, seq=s))
            batched.decode_seqs([t for p in prompts for t in p], [i for p in prompts for i in range(len(p))],
                                [s for s, p in enumerate(prompts) for _ in p], [False] * sum(map(len, prompts)))
        seqs, cells = batched.cell_seqs(), batched.cells()
        for s, prompt in enumerate(prompts):
            mine = np.flatnonzero(seqs == s)
            assert (mine >= 256 * s).all() and (mine < 256 * (s + 1)).all()  # its own stream
            np.testing.assert_array_equal(np.sort(cells[mine]), np.arange(len(prompt)))
            assert llama_cpp.llama_memory_seq_pos_max(batched.memory, s) == len(prompt) - 1
            alone = Context(alone_model, n_cells=256, n_threads=2, n_threads_batch=2, type_k="f16", abort=abort,
                            n_ubatch=16)
            try:
                with alone.capturing(0):
                    alone.decode(prompt, list(range(len(prompt))), want_logits=False)
                want, got = alone.capture(), batched.capture(seq=s)
            finally:
                alone.close()
            np.testing.assert_array_equal(got.positions, want.positions)
            np.testing.assert_array_equal(got.rows, want.rows)
            np.testing.assert_allclose(got.attn, want.attn, rtol=1e-3, atol=1e-5)
    finally:
        batched.close()


def reordered_prompts(llm: ScopeLlama) -> list[list[int]]:
    prompts = [_story(llm, t, words=30)[:n] for t, n in zip(TOPICS, [20, 50, 7])]
    assert [len(p) for p in prompts] == [20, 50, 7]
    return prompts


def test_a_step_that_llama_cpp_reorders_is_captured_as_each_sequence_alone(llm, model):
    check_reordered_step(model, model, reordered_prompts(llm))


def test_a_long_prompt_is_prefilled_a_piece_per_step_while_others_decode(llm, model):
    runner = _runner(model, 2, step_tokens=64, prefill_chunk=128)  # chunked prefill, each chunk in two steps
    events: list[str] = []
    a_done = threading.Event()

    def sink(label: str):
        def put(item) -> None:
            events.append(label)  # list.append is atomic under the GIL
            if label == "a" and getattr(item, "finish_reason", None):
                a_done.set()
        return put

    try:
        short, long = _story(llm, TOPICS[0]), _story(llm, TOPICS[1], words=60)
        assert len(long) > 4 * 64
        a = runner.start(short, policy=build(BUDGET), limits=Limits(max_tokens=60, ignore_eos=True),
                         sampling=Sampling(), sink=sink("a"))
        while len(events) < 5:
            a_done.wait(0.01)
        mark = len(events)
        b = runner.start(long, policy=build(BUDGET), limits=Limits(max_tokens=4, ignore_eos=True),
                         sampling=Sampling(), sink=sink("b"))
        assert a_done.wait(60)
        first_b = events.index("b")
        pieces = -(-len(long) // 64)
        # every prefill step of the long prompt carried a token of the decoding sequence
        assert events[mark:first_b].count("a") >= pieces - 1, (events[mark:first_b], pieces)
        assert b.slot != a.slot
    finally:
        runner.close()


def test_bad_requests_and_busy_slots(llm, model):
    runner = _runner(model, 1)
    try:
        prompt = _story(llm, TOPICS[2])
        with pytest.raises(ValueError, match="512 cells of one slot"):
            runner.start(prompt, policy=build(Budget(prefill=96, decode=600)), limits=Limits(max_tokens=1000),
                         sampling=Sampling())
        assert runner.free_slots() == 1  # a refused request holds no slot
        req = _greedy(runner, prompt, 400, ignore_eos=True)
        with pytest.raises(NoFreeSlot):
            _greedy(runner, prompt, 4)
        it = iter(req)
        next(it)
        req.cancel()  # the slot frees at the next step
        with pytest.raises(Cancelled):
            for _ in it:
                pass
        while runner.free_slots() < 1:
            threading.Event().wait(0.01)
        assert len(_tokens(_greedy(runner, prompt, 4, ignore_eos=True))) == 4
    finally:
        runner.close()
    with pytest.raises(ValueError, match="slot_cells must be a multiple of 256"):
        BatchSettings(slots=2, slot_cells=500)
    with pytest.raises(ValueError, match="slots must be an int"):
        BatchSettings(slots=0, slot_cells=512)
    with pytest.raises(ValueError, match="step_tokens"):
        BatchSettings(slots=4, slot_cells=512, step_tokens=200)


def test_token_pieces_are_right_when_generations_ask_from_several_threads(model):
    # Each slot's generation turns its tokens into text in its own thread
    # (a shared piece buffer once gave one conversation another's text).
    tokens = list(range(1000, 1400))
    want = {t: model.piece(t) for t in tokens}
    wrong: list[int] = []

    def work(offset: int) -> None:
        for _ in range(20):
            for t in tokens[offset::4]:
                if model.piece(t) != want[t]:
                    wrong.append(t)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_every_step_decodes_on_the_batchers_one_thread(llm, model, monkeypatch):
    """Steps run on the Batcher's decode thread, whichever slot's piece came
    last: llama.cpp's CPU backend keeps an OpenMP worker team per calling
    thread, and with more OpenMP threads than cores libgomp sleeps at its
    barriers, slowing every step. close() stops that thread."""
    callers: set[str] = set()
    decode_seqs = Context.decode_seqs

    def recording(self, *args, **kwargs):
        callers.add(threading.current_thread().name)
        return decode_seqs(self, *args, **kwargs)

    monkeypatch.setattr(Context, "decode_seqs", recording)
    runner = _runner(model, 3)
    try:
        reqs = [_greedy(runner, _story(llm, topic), 12) for topic in TOPICS[:3]]
        assert all(len(_tokens(r)) == 12 for r in reqs)
    finally:
        runner.close()
    assert callers == {"scope-edge-decode"}
    assert "scope-edge-decode" not in {t.name for t in threading.enumerate()}


def test_on_own_thread_returns_raises_and_leaves_no_thread():
    assert on_own_thread(lambda: threading.current_thread().name) == "scope-edge-setup"

    def fails() -> None:
        raise ValueError("calibration failed")

    with pytest.raises(ValueError, match="calibration failed"):
        on_own_thread(fails)
    assert "scope-edge-setup" not in {t.name for t in threading.enumerate()}


def test_a_runner_that_fails_to_build_leaves_no_decode_thread(model, monkeypatch):
    """The decode thread starts with the Batcher, before the slots' caches:
    a failure building those stops it and frees the context."""
    import scope_edge.runtime.batch as batch

    def broken(*args, **kwargs):
        raise MemoryError("no room for the slot's cache")

    monkeypatch.setattr(batch, "Cache", broken)
    with pytest.raises(MemoryError, match="no room"):
        _runner(model, 2)
    assert "scope-edge-decode" not in {t.name for t in threading.enumerate()}


def test_the_cell_choice_check_refuses_caches_that_part_otherwise():
    alone = np.r_[0:40, 50:90]  # 80 cells: prompt cells then the recent window's 24 among them
    check_one_cell_choice(alone, np.r_[0:39, 45, 50:90], step=3)  # cell 39 swapped for 45: one choice
    for batched, why in [(np.r_[0:40, 50:91], "cells held"),            # one more cell held
                         (np.r_[0:37, 41:44, 50:90], "differ by 3"),    # three cells swapped
                         (np.r_[0:41, 50:89], "lost recent")]:          # the newest cell evicted
        with pytest.raises(AssertionError, match=why):
            check_one_cell_choice(alone, batched, step=3)
