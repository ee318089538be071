"""The runtime on the real default model: hook, cache map, identity, streaming."""
from __future__ import annotations

import functools
import re
import tracemalloc

import llama_cpp
import numpy as np
import pytest

import scope_edge.runtime.cache as se_cache
from scope_edge import Budget, ScopeLlama
from scope_edge.hook import HookError
from scope_edge.runtime.cache import Session
from scope_edge.runtime.context import Context
from scope_edge.runtime.text import TextStream
from llama_log import llama_log

# SmolLM2 answers through its chat template; a raw prompt often ends at once.
PROMPT = (
    "<|im_start|>user\nWrite a long story about a lighthouse keeper who finds a message in a bottle."
    "<|im_end|>\n<|im_start|>assistant\n"
)


def _text_of(n: int) -> str:
    """A prompt of roughly n tokens (more than one 512-token ubatch for n > 512)."""
    words = "the keeper counted ships and wrote their names in a blue book every night".split()
    return " ".join(words[i % len(words)] + str(i % 7) for i in range(n // 2))


def _llama_view(llm: ScopeLlama) -> tuple[set[int], int, int]:
    """Cells the attention could see at the last step, and llama.cpp's own
    min/max position of sequence 0."""
    cells, _ = llm.context.visible()
    mem = llm.context.memory
    return set(cells.tolist()), llama_cpp.llama_memory_seq_pos_min(mem, 0), llama_cpp.llama_memory_seq_pos_max(mem, 0)


def test_cell_map_matches_positions_across_ubatches_and_evictions(model_path):
    with ScopeLlama(model_path, budget=None, n_ctx=2048) as llm:
        prompt = llm.tokenize(_text_of(1300))
        assert len(prompt) > 1024  # three ubatches of 512
        out = llm.generate(prompt, max_tokens=4)
        held = llm.context.cells()
        positions = llm.kv_positions()
        n = len(prompt) + out.stats.generated_tokens - 1  # the last token is sampled, never fed
        np.testing.assert_array_equal(positions, np.arange(n))
        visible, pmin, pmax = _llama_view(llm)
        assert (pmin, pmax) == (0, n - 1)
        assert visible == set(np.flatnonzero(held >= 0).tolist())

        # evict runs and singles, then decode one more token through the hook
        ctx = llm.context
        evict = np.r_[np.arange(3, 40), np.arange(500, 777), [901, 903, 1000]].astype(np.int32)
        freed = ctx.evict(evict)
        assert freed == len(evict)
        ctx.decode([prompt[0]], [n], want_logits=True)
        assert np.isfinite(ctx.logits()).all()
        held = ctx.cells()
        expect = np.setdiff1d(np.arange(n + 1), evict)
        np.testing.assert_array_equal(np.sort(held[held >= 0]), expect)
        visible, pmin, pmax = _llama_view(llm)
        assert visible == set(np.flatnonzero(held >= 0).tolist())
        assert len(visible) == n + 1 - len(evict)
        assert (pmin, pmax) == (0, n)


def test_cell_map_and_stock_identity_across_ubatches_of_one_decode(model_path, monkeypatch):
    # n_batch 512 over n_ubatch 128: llama.cpp splits each decode of the
    # prompt (512 + the rest) into ubatches, each writing K through its own
    # index tensor, which the hook must read in order.
    monkeypatch.setattr(se_cache, "Context", functools.partial(Context, n_ubatch=128))
    n_ctx, max_tokens = 1024, 32
    with ScopeLlama(model_path, budget=None, n_ctx=n_ctx) as llm:
        prompt = llm.tokenize(PROMPT.replace("a message in a bottle", _text_of(700)))
        assert 640 < len(prompt) < 896  # a 512-token decode (4 ubatches), then 2 more ubatches
        got = llm.generate(prompt, max_tokens=max_tokens)
        n = len(prompt) + len(got.tokens) - 1
        held = llm.context.cells()
        np.testing.assert_array_equal(np.sort(held[held >= 0]), np.arange(n))
        visible, pmin, pmax = _llama_view(llm)
        assert visible == set(np.flatnonzero(held >= 0).tolist()) and (pmin, pmax) == (0, n - 1)
    stock = llama_cpp.Llama(model_path, n_ctx=n_ctx, n_batch=512, n_ubatch=128, verbose=False)
    try:
        want = stock.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)
    finally:
        stock.close()
    assert got.text == want["choices"][0]["text"]
    assert len(got.tokens) == want["usage"]["completion_tokens"] == max_tokens

    # under a budget: chunks of 512 over four ubatches, evictions between them
    b = Budget(prefill=128, decode=32, observation_window=8, recent_window=8)
    with ScopeLlama(model_path, budget=b, prefill_chunk=512) as llm:
        st = llm.generate(prompt, max_tokens=40, ignore_eos=True).stats
        assert st.evicted_cells > 0 and st.prefill_cells_peak >= 512
        nxt = int(llm.kv_positions()[-1]) + 1  # one more step, so the mask shows the cells after the last eviction
        llm.context.decode([prompt[0]], [nxt], want_logits=True)
        held = llm.context.cells()
        positions = llm.kv_positions()
        np.testing.assert_array_equal(np.sort(held[held >= 0]), positions)
        visible, pmin, pmax = _llama_view(llm)
        assert visible == set(np.flatnonzero(held >= 0).tolist())
        assert (pmin, pmax) == (positions[0], positions[-1]) and len(positions) <= b.total + 1


@pytest.mark.parametrize("type_k", ["f16", "q8_0"])
def test_kv_bytes_allocated_is_what_llama_cpp_allocated(model_path, type_k):
    # llama.cpp's own account (its log), not our formula on both sides
    b = Budget(prefill=64, decode=32, observation_window=8, recent_window=8)
    with ScopeLlama(model_path, budget=b, type_k=type_k) as llm, llama_log() as lines:
        st = llm.generate(PROMPT, max_tokens=8).stats
    log = "".join(lines)
    mib = [float(x) for x in re.findall(r"KV buffer size =\s*([0-9.]+) MiB", log)]
    cells = [int(x) for x in re.findall(r"\(\s*(\d+) cells", log)]
    assert len(mib) == 1 and cells == [st.kv_cells_allocated], log
    assert abs(mib[0] * 2**20 - st.kv_bytes_allocated) <= 0.005 * 2**20  # the log rounds to 0.01 MiB


def test_evicted_cells_are_invisible_and_reused(model_path):
    with ScopeLlama(model_path, budget=None, n_ctx=1024) as llm:
        prompt = llm.tokenize(_text_of(300))
        llm.generate(prompt, max_tokens=2)
        ctx = llm.context
        before = ctx.cells()
        evict = np.arange(10, 60, dtype=np.int32)
        freed_cells = set(np.flatnonzero(np.isin(before, evict)).tolist())
        ctx.evict(evict)
        nxt = int(llm.kv_positions()[-1]) + 1
        ctx.decode(prompt[:5], range(nxt, nxt + 5), want_logits=True)
        visible, _, _ = _llama_view(llm)
        after = ctx.cells()
        assert visible == set(np.flatnonzero(after >= 0).tolist())  # the mask shows exactly the cells held
        assert len(visible) == len(llm.kv_positions())
        new_cells = set(np.flatnonzero(after >= nxt).tolist())
        assert new_cells <= freed_cells  # llama.cpp reuses freed cells first
        assert not (freed_cells - new_cells) & visible  # freed and not refilled: masked
        assert not set(evict.tolist()) & set(llm.kv_positions().tolist())


def test_held_cells_come_in_position_order_after_reuse_and_shifts(model_path):
    # capture() lays cells out by position; the hook sorts them (a radix sort
    # over as many bytes as the largest position needs). Make cell order and
    # position order differ, and positions need three bytes.
    with ScopeLlama(model_path, budget=None, n_ctx=1024) as llm:
        prompt = llm.tokenize(_text_of(600))
        llm.generate(prompt, max_tokens=2)
        ctx = llm.context
        ctx.evict(np.arange(10, 300, 7, dtype=np.int32))
        nxt = int(llm.kv_positions()[-1]) + 1
        ctx.decode(prompt[:40], range(nxt, nxt + 40), want_logits=True)  # the new tokens fill the holes
        ctx.shift(200, nxt + 40, 70_000)
        cells = ctx.cells()
        for min_pos in (0, 150, 70_000, 70_000 + nxt + 39, 10**9):
            idx, pos = ctx.held(min_pos)
            np.testing.assert_array_equal(cells[idx], pos)
            np.testing.assert_array_equal(pos, np.sort(cells[cells >= min_pos]))
            assert (np.diff(pos) > 0).all()
        idx, pos = ctx.held()
        assert (np.diff(idx) < 0).any() and pos[-1] > 65_536  # the sort had work to do
        np.testing.assert_array_equal(ctx.positions(), pos)
        np.testing.assert_array_equal(llm.kv_positions(), pos)


def test_session_step_costs_follow_the_held_cells_not_the_history():
    # Regression (issue #14.3): every eviction rebuilt Python lists over every
    # token ever fed. Now a step allocates in the cells held (64 here), and the
    # history costs 8 bytes a token (the ids, for matching the next prompt, and
    # when each was evicted, for what a prompt that leaves the history may reuse).
    tracemalloc.start()
    s = Session()
    for start in range(0, 100_000, 1000):
        s.record(range(start, start + 1000), range(start, start + 1000))
        s.forget(s.held_pos[:-64])
    history, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    before, _ = tracemalloc.get_traced_memory()
    s.record([7], [100_000])
    s.forget(s.held_pos[:1])
    s.renumber(s.held_pos, np.arange(len(s.held_pos), dtype=np.int32))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert history < 9 * 100_000, history  # 4 bytes a token for its id, 4 for when it was evicted
    assert peak - before < 16_384, peak - before
    assert s.held_upto(100_001) == len(s.held_pos) == 64 and s.held_upto(99_937) == 0
    np.testing.assert_array_equal(s.held_pos, np.arange(64))
    assert s.common_prefix(list(range(500)) + [-1]) == 500


def test_session_reuses_only_the_holes_cut_before_a_prompt_left_the_history():
    s = Session()
    s.record(range(10), range(10))  # a prompt of 10 tokens
    s.prompt_end = 10
    s.forget(np.array([2]))  # evicted with 10 tokens fed
    s.record(range(10, 20), range(10, 20))  # its output
    s.forget(np.array([5, 15]))  # evicted with 20 tokens fed
    assert s.reusable(list(range(25))) == 20  # continues the last generation: the history as it is
    assert s.reusable(list(range(14)) + [-1]) == 14  # holds the last prompt and more: a continuation
    assert s.reusable(list(range(10))) == 5  # the same prompt again: the hole its output cut (at 5) is not its own
    assert s.reusable(list(range(8)) + [-1]) == 2  # left at 8: the hole at 2 was cut with 10 tokens fed
    assert s.reusable(list(range(2)) + [-1]) == 2  # before every hole
    assert s.reusable([-1]) == 0


def test_session_one_token_steps_keep_the_held_map():
    # A decode step records one token and forgets one position in place (no
    # new arrays); the held map must stay what a plain list says it is.
    s = Session()
    s.record(range(100), range(100))
    held = [(i, i) for i in range(100)]  # (token index, position)
    rng = np.random.default_rng(1)
    for step in range(300):
        s.record([step], [100 + step])
        held.append((100 + step, 100 + step))
        victim = int(rng.choice(s.held_pos[:-1]))
        s.forget(np.array([victim, 10**6]))  # a position not held is ignored: one eviction
        held = [(i, p) for i, p in held if p != victim]
        np.testing.assert_array_equal(s.held_index, [i for i, _ in held])
        np.testing.assert_array_equal(s.held_pos, [p for _, p in held])
    assert s.next_pos == 400 and len(s.held_pos) == 100 and len(s.tokens) == 400


def test_session_matches_the_cache_over_a_long_budgeted_run(model_path):
    b = Budget(prefill=32, decode=32, observation_window=8, recent_window=8)
    with ScopeLlama(model_path, budget=b) as llm:
        prompt = llm.tokenize(PROMPT)
        # when each cell was evicted: the tokens fed when llama.cpp's cache first lacked it
        evicted_at: dict[int, int] = {}
        tokens = []
        for chunk in llm.stream(prompt, max_tokens=600, ignore_eos=True):
            tokens.append(chunk.token)
            n_fed = len(llm.history())
            evicted_at.update({p: n_fed for p in set(range(n_fed)) - set(llm.kv_positions().tolist())
                               if p not in evicted_at})
        fed = prompt + tokens[:-1]  # the last token is sampled, never fed
        assert llm.history() == fed  # every token fed, the evicted ones included
        held = llm.kv_positions()
        assert len(held) <= b.total and held[-1] == len(fed) - 1
        # The session's record of the held cells (token index -> position) is
        # what a resumed call reuses, truncates at and continues from: check
        # each against the hook's map and llama.cpp's own view.
        # (a) an edit inside the output continues the last generation (it holds
        # the whole prompt): truncates at the first held cell of the edit and
        # continues right after the last cell kept
        k = int(held[-5])  # positions are still the token indexes (no re-indexing here)
        assert k > len(prompt)
        other = (fed[k] + 1) % llm.model.n_vocab
        edited = llm.generate(fed[:k] + [other], max_tokens=1, resume=True)
        assert (edited.stats.reused_prompt_tokens, edited.stats.prefilled_tokens) == (k, 1)
        fed = fed[:k] + [other]
        assert llm.history() == fed
        after = llm.kv_positions()
        np.testing.assert_array_equal(after, np.r_[held[:-5], held[-6] + 1])
        visible, pmin, pmax = _llama_view(llm)
        assert (pmin, pmax) == (after[0], after[-1]) and len(visible) == len(after)
        # (b) extending the history reuses all of it; the new token lands at the next position
        more = llm.generate(fed + [edited.tokens[-1]], max_tokens=1, resume=True)
        assert (more.stats.reused_prompt_tokens, more.stats.prefilled_tokens) == (len(fed), 1)
        fed.append(edited.tokens[-1])
        assert llm.history() == fed
        kept = llm.kv_positions()
        assert kept[-1] == after[-1] + 1 and set(kept[:-1].tolist()) <= set(after.tolist())
        # the prefill selection ran over the whole history, the decode room lent to it (#30):
        # what fits in prefill + decode - 1 cells stays
        assert len(kept) == min(len(after) + 1, b.total - 1)
        _, pmin, pmax = _llama_view(llm)
        assert (pmin, pmax) == (kept[0], kept[-1])
        # (c) a prompt that leaves the history before the last prompt's end (not a
        # continuation) at j reuses it only up to the first cell evicted after the
        # history passed j (those holes were cut for the text after j); (a) cut the
        # history at k (its holes count as cut at k), (b) evicted nothing
        assert len(kept) == len(after) + 1
        j = int(kept[len(kept) // 2])
        late = [p for p, t in evicted_at.items() if p < j and min(t, k) > j]
        assert late  # slide evicted older output cells after the history passed j
        back = llm.generate(fed[:j] + [other], max_tokens=1, resume=True)
        assert back.stats.reused_prompt_tokens == min(late)
        assert back.stats.prefilled_tokens == j + 1 - min(late)
        now = llm.kv_positions()
        assert set(now[now < min(late)].tolist()) <= set(kept.tolist())
        visible, pmin, pmax = _llama_view(llm)
        assert (pmin, pmax) == (now[0], now[-1]) and len(visible) == len(now)


def test_hook_refuses_bad_evictions(model_path):
    with ScopeLlama(model_path, budget=None, n_ctx=512) as llm:
        llm.generate("Hello there", max_tokens=3)
        ctx = llm.context
        last = int(llm.kv_positions()[-1])
        before = llm.kv_positions()
        with pytest.raises(HookError, match="last"):
            ctx.evict(np.array([0, last], dtype=np.int32))
        with pytest.raises(HookError, match="not held"):
            ctx.evict(np.array([last + 5], dtype=np.int32))
        np.testing.assert_array_equal(llm.kv_positions(), before)  # refusals change nothing


def test_captured_rows_sum_to_one_per_head_and_layer(model_path):
    with ScopeLlama(model_path, budget=None, n_ctx=1024) as llm:
        prompt = llm.tokenize(_text_of(700))
        llm.generate(prompt, max_tokens=2)
        ctx = llm.context
        nxt = int(llm.kv_positions()[-1]) + 1
        # one decode row
        with ctx.capturing(nxt):
            ctx.decode([prompt[1]], [nxt], want_logits=True)
        cap = ctx.capture()  # leaving the block disarms and keeps the capture readable (policies read it after)
        assert cap.attn.shape == (llm.model.n_layer, llm.model.n_head, nxt + 1)
        assert (cap.rows == 1).all()
        np.testing.assert_allclose(cap.attn.sum(axis=2), 1.0, atol=1e-4)
        assert (cap.attn >= 0).all()
        # the last 8 rows of a 40-token batch
        with ctx.capturing(nxt + 33):
            ctx.decode(prompt[:40], range(nxt + 1, nxt + 41), want_logits=True)
            cap = ctx.capture()
        assert (cap.rows == 8).all()
        np.testing.assert_allclose(cap.attn.sum(axis=2), 8.0, atol=1e-3)
        # causal: no captured row attends to a later position
        assert cap.attn[:, :, cap.positions > nxt + 40].sum() == 0


def test_capture_with_heads_reduced_natively_equals_reducing_the_full_capture(model_path):
    with ScopeLlama(model_path, budget=None, n_ctx=1024) as llm:
        prompt = llm.tokenize(_text_of(600))
        llm.generate(prompt, max_tokens=2)
        ctx = llm.context
        ctx.evict(np.arange(20, 200, 3, dtype=np.int32))  # cell order != position order
        nxt = int(llm.kv_positions()[-1]) + 1
        with ctx.capturing(nxt - 5):  # several rows: the heads' sums are reduced, as aggregate() does
            ctx.decode(prompt[:6], range(nxt, nxt + 6), want_logits=True)
        for min_pos in (0, 300):
            full = ctx.capture(min_pos)
            top, total = ctx.capture(min_pos, head_reduce="max"), ctx.capture(min_pos, head_reduce="sum")
            n = len(full.positions)
            assert top.attn.shape == total.attn.shape == (llm.model.n_layer, 1, n)
            np.testing.assert_array_equal(top.positions, full.positions)
            np.testing.assert_array_equal(top.rows, full.rows)
            np.testing.assert_array_equal(top.attn[:, 0], full.attn.max(axis=1))  # max is exact
            np.testing.assert_allclose(total.attn[:, 0], full.attn.sum(axis=1), rtol=1e-6, atol=1e-9)
            assert top.attn.max() > 0
        with pytest.raises(ValueError, match="head_reduce must be None or one of"):
            ctx.capture(head_reduce="mean")


def test_full_cache_is_token_identical_to_stock(model_path):
    n_ctx, max_tokens = 1024, 48
    stock = llama_cpp.Llama(model_path, n_ctx=n_ctx, verbose=False)
    try:
        want = stock.create_completion(PROMPT, max_tokens=max_tokens, temperature=0.0)
    finally:
        stock.close()
    with ScopeLlama(model_path, budget=None, n_ctx=n_ctx) as llm:
        got = llm.generate(PROMPT, max_tokens=max_tokens)
    assert got.text == want["choices"][0]["text"]
    assert len(got.tokens) == want["usage"]["completion_tokens"] == max_tokens  # a real, full-length run
    assert got.finish_reason == want["choices"][0]["finish_reason"]


def test_stream_equals_generate_and_last_chunk_carries_stats(model_path):
    with ScopeLlama(model_path, budget=None) as llm:
        chunks = list(llm.stream(PROMPT, max_tokens=40))
        full = llm.generate(PROMPT, max_tokens=40)
        n_prompt = len(llm.tokenize(PROMPT))
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate(PROMPT, max_tokens=2)
    assert "".join(c.text for c in chunks) == full.text
    assert [c.token for c in chunks if c.token is not None] == full.tokens
    assert all(c.finish_reason is None and c.stats is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == full.finish_reason == "length"
    st = last.stats
    assert st.prompt_tokens == n_prompt
    assert st.generated_tokens == len(full.tokens) == 40
    assert st.kv_bytes_allocated == st.kv_cells_allocated * 23040
    assert st.decode_tokens_per_s > 0 and st.prefill_tokens_per_s > 0


def test_utf8_stream_never_splits_characters(model_path):
    prompt = "<|im_start|>user\nTranslate to Japanese and Chinese: I love the sea.<|im_end|>\n<|im_start|>assistant\n"
    with ScopeLlama(model_path, budget=None) as llm:
        chunks = list(llm.stream(prompt, max_tokens=60))
        full = llm.generate(prompt, max_tokens=60)
        # tokens whose bytes alone are not whole UTF-8: part of a character
        partial = [c for c in chunks if c.token is not None and "\ufffd" in llm.detokenize([c.token])]
    text = "".join(c.text for c in chunks)
    assert text == full.text
    assert any(ord(ch) > 0x2E80 for ch in text), text  # the model did write CJK
    assert "\ufffd" not in text
    # some character's bytes arrived over several tokens, yet no chunk split it
    assert partial, "no character spanned several tokens: the test checks nothing"
    assert all("\ufffd" not in c.text for c in chunks)
    assert any(c.text == "" for c in partial)  # its first bytes were held back, not printed


def test_text_stream_joins_split_utf8_and_holds_stop_prefixes():
    ts = TextStream(("STOP",))
    data = "héllo 日本 ST".encode()
    out = "".join(ts.push(data[i : i + 1]) for i in range(len(data)))
    assert out == "héllo 日本 "  # "ST" is held: it may start "STOP"
    assert ts.push(b"OP and more") == "" and ts.stopped
    ts = TextStream(("STOP",))
    assert ts.push(b"ST") == "" and ts.flush() == "ST"


def test_stop_string_ends_generation(model_path):
    with ScopeLlama(model_path, budget=None) as llm:
        free = llm.generate(PROMPT, max_tokens=40)
        words = free.text.split()
        assert len(words) > 4
        stop = words[3]
        cut = llm.generate(PROMPT, max_tokens=40, stop=[stop])
        streamed = "".join(c.text for c in llm.stream(PROMPT, max_tokens=40, stop=stop))
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.index(stop)]
    assert streamed == cut.text


def test_bad_input(model_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        ScopeLlama(tmp_path / "nope.gguf")
    notgguf = tmp_path / "x.gguf"
    notgguf.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(ValueError, match="GGUF"):
        ScopeLlama(notgguf)
    with ScopeLlama(model_path, budget=None, n_ctx=256) as llm:
        with pytest.raises(ValueError, match=r"300 tokens.*256"):
            llm.generate([1] * 300, max_tokens=5)
        with pytest.raises(ValueError, match="max_tokens"):
            llm.generate("hi", max_tokens=0)
        with pytest.raises(ValueError, match="empty"):
            llm.generate("", max_tokens=3)
        with pytest.raises(ValueError, match="vocabulary"):
            llm.generate([1, 10**7], max_tokens=3)
        assert llm.generate("Hello", max_tokens=3).stats.generated_tokens >= 1  # still usable


def test_interrupted_stream_leaves_instance_usable(model_path):
    with ScopeLlama(model_path, budget=None) as llm:
        want = llm.generate(PROMPT, max_tokens=20).text
        for i, _ in enumerate(llm.stream(PROMPT, max_tokens=200)):
            if i == 5:
                break
        held = llm.stream(PROMPT, max_tokens=200)
        next(held)  # left suspended in this thread
        assert llm.generate(PROMPT, max_tokens=20).text == want
