"""Beyond the paper: chunked prefill, unbounded generation, quantized K."""
from __future__ import annotations

import logging

import llama_cpp
import numpy as np
import pytest

from scope_edge import Budget, ScopeLlama
from scope_edge.memory import padded_cells

BUDGET = Budget(prefill=1024, decode=512, observation_window=8, recent_window=256)


def _document(tokenizer: ScopeLlama, n_tokens: int) -> list[int]:
    """A chat prompt of about n_tokens: a long log of varied records."""
    rows = [f"Day {i}: the ship {['Aurora', 'Borealis', 'Cygnus', 'Delphi'][i % 4]} carried {i * 37 % 500} crates "
            f"of {['tea', 'salt', 'iron', 'silk', 'wool'][i % 5]} to port {i % 13}." for i in range(n_tokens // 25)]
    body = "\n".join(rows)
    ask = "Write a very long, detailed story about the sailors of these ships, one voyage per chapter."
    text = f"<|im_start|>user\n{body}\n{ask}<|im_end|>\n<|im_start|>assistant\n"
    return tokenizer.tokenize(text)


def test_long_prompt_then_generation_past_the_trained_context(model_path):
    with ScopeLlama(model_path, budget=BUDGET) as llm:
        prompt = _document(llm, 7900)
        assert 7600 < len(prompt) < 8192 - 100
        tokens: list[int] = []
        for chunk in llm.stream(prompt, max_tokens=700, ignore_eos=True):
            assert np.isfinite(llm.context.logits()).all()
            if chunk.token is not None:
                tokens.append(chunk.token)
        st = chunk.stats
        assert chunk.finish_reason == "length" and st.generated_tokens == 700
        assert llm.position_limit == llm.model.n_ctx_train == 8192  # the default limit: the trained context
        assert len(prompt) + 700 > llm.position_limit  # positions would have passed 8192
        assert st.position_resets >= 1
        assert st.kv_cells_allocated < 2048  # chunked: independent of the prompt length
        assert st.prefill_cells_peak <= BUDGET.prefill + 512
        assert st.kv_cells_peak <= BUDGET.total
        assert max(llm.kv_positions()) < llm.model.n_ctx_train
        assert len(set(tokens[-300:])) > 5  # not one repeated token
        # llama.cpp agrees: the re-indexed sequence is compact and inside the trained range
        mem = llm.context.memory
        assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == max(llm.kv_positions())


def test_prompt_over_6000_tokens_fits_under_2048_cells(model_path):
    with ScopeLlama(model_path, budget=BUDGET) as llm:
        prompt = _document(llm, 6400)
        assert len(prompt) > 6000
        out = llm.generate(prompt, max_tokens=8)
    assert out.stats.kv_cells_allocated < 2048
    assert out.stats.prefilled_tokens == len(prompt)


def test_reindexing_renumbers_positions_and_keeps_decoding(model_path, monkeypatch):
    b = Budget(prefill=64, decode=64, observation_window=8, recent_window=16)
    with ScopeLlama(model_path, budget=b) as llm:
        prompt = _document(llm, 200)
        want = llm.generate(prompt, max_tokens=b.decode, ignore_eos=True)  # the same decode room (lend)
    limit = len(prompt) + 20  # a small position limit: re-index often
    with ScopeLlama(model_path, budget=b, position_limit=limit) as llm:
        got = llm.generate(prompt, max_tokens=400, ignore_eos=True)
        held = llm.kv_positions()
        pmax = llama_cpp.llama_memory_seq_pos_max(llm.context.memory, 0)
    assert got.stats.position_resets >= 2  # at len(prompt) + 20, then every ~(len(prompt) + 20 - 128) steps
    assert got.tokens[:20] == want.tokens[:20]  # identical until the first re-index
    assert pmax == held.max() < limit
    assert len(set(got.tokens[-100:])) > 3


def test_model_that_cannot_shift_stops_with_length(model_path, monkeypatch, caplog):
    b = Budget(prefill=64, decode=64, observation_window=8, recent_window=16)
    monkeypatch.setattr(llama_cpp, "llama_memory_can_shift", lambda mem: False)
    with ScopeLlama(model_path, budget=None) as tokenizer:
        prompt = _document(tokenizer, 200)
    with ScopeLlama(model_path, budget=b, position_limit=len(prompt) + 50) as llm:
        with caplog.at_level(logging.WARNING, logger="scope_edge"):
            out = llm.generate(prompt, max_tokens=400, ignore_eos=True)
    assert out.finish_reason == "length"
    assert out.stats.generated_tokens == 51  # positions len(prompt) .. limit - 1 were fed, one more sampled
    assert "cannot shift" in caplog.text


def test_chunked_prefill_bounds_the_prompt_cells(model_path):
    b = Budget(prefill=128, decode=64, observation_window=8, recent_window=16)
    with ScopeLlama(model_path, budget=b, prefill_chunk=256) as llm:
        prompt = _document(llm, 1500)
        out = llm.generate(prompt, max_tokens=16)
        assert out.stats.prefill_cells_peak <= 128 + 256
        assert out.stats.kv_cells_allocated == padded_cells(128 + 256)
        held = llm.kv_positions()
        # the observation window of the whole prompt survived the last trim
        assert set(range(len(prompt) - 8, len(prompt))) <= set(held.tolist())
    with ScopeLlama(model_path, budget=b, chunked_prefill=False) as llm:
        one_shot = llm.generate(prompt, max_tokens=16)
    assert one_shot.stats.prefill_cells_peak == len(prompt)
    assert one_shot.stats.kv_cells_allocated == padded_cells(len(prompt))


def test_q8_0_k_cache_is_smaller_and_close_to_f16(model_path):
    b = Budget(prefill=256, decode=128, observation_window=8, recent_window=32)
    runs = {}
    for type_k in ("f16", "q8_0"):
        with ScopeLlama(model_path, budget=b, type_k=type_k) as llm:
            prompt = _document(llm, 600)
            ref = llm.generate(prompt, max_tokens=96, ignore_eos=True) if type_k == "f16" else runs["f16"][0]
            logits = np.stack(list(llm.teacher_force(prompt, ref.tokens)))
            runs[type_k] = (ref, logits, llm.n_ctx, ref.stats.kv_bytes_allocated)
    f16, q8 = runs["f16"], runs["q8_0"]
    with ScopeLlama(model_path, budget=b, type_k="q8_0") as llm:
        q8_bytes = llm.generate(prompt, max_tokens=4).stats.kv_bytes_allocated
    assert q8_bytes <= 0.8 * f16[3]
    # exact accounting: K at 34 B per 32 values, V at f16
    cells = f16[2]
    assert q8_bytes == cells * 30 * 3 * (64 * 34 // 32 + 64 * 2)
    top1 = (f16[1].argmax(1) == q8[1].argmax(1)).mean()
    assert top1 >= 0.9, top1


def test_type_k_validated(model_path):
    with pytest.raises(ValueError, match="type_k"):
        ScopeLlama(model_path, type_k="q3_k")
