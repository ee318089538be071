"""Structure kept (issue #30): the chat template's markers and the system
turn are taken out of every selection (Policy.keep_structure), within a cap,
on the real default model; held cells checked against llama.cpp's view."""
from __future__ import annotations

import dataclasses
from array import array

import llama_cpp
import numpy as np
import pytest

from scope_edge import Budget, GenerationStats, ScopeLlama
from scope_edge.policies import Policy, Slide, SnapKV, build
from scope_edge.runtime.structure import CLOSE, HEADER, OPEN, PLAIN, SYSTEM, SYSTEM_CLOSE, StructureMarker

SYSTEM_TEXT = "You are the clerk of the Lisbon depot. The gate code is 4821. Answer in one short sentence."
BUDGET = Budget(prefill=128, decode=64)  # cap: a quarter of 128 = 32 structure cells


def _log(k: int) -> str:
    """A user turn of about 150 tokens."""
    rows = "\n".join(f"Crate {k}-{i} holds {3 * i + k} lamps from shelf {'ABCDEF'[i % 6]}." for i in range(10))
    return f"Delivery log {k}:\n{rows}\n\nHow many lamps does crate {k}-4 hold?"


def _chat(llm: ScopeLlama, turns: int, system: str = SYSTEM_TEXT) -> tuple[list[int], GenerationStats]:
    """A chat of `turns` user turns continued on the cache: the last prompt's
    tokens and the last turn's stats."""
    messages = [{"role": "system", "content": system}]
    prompt: list[int] = []
    for k in range(1, turns + 1):
        messages.append({"role": "user", "content": _log(k)})
        prompt = llm.tokenize(llm.render_chat(messages))
        chunks = list(llm.chat(messages, max_tokens=12))
        messages.append({"role": "assistant", "content": "".join(c.text for c in chunks)})
    assert chunks[-1].stats is not None
    return prompt, chunks[-1].stats


def _structure(llm: ScopeLlama, prompt: list[int]) -> tuple[list[int], list[int]]:
    """(positions of the system turn, positions of the later turns' markers)
    in prompt, found from the template's own tokens: the system turn runs to
    the first <|im_end|>; a marker is <|im_start|>, <|im_end|> or the role
    header up to its newline."""
    start, end = llm.tokenize("<|im_start|>")[-1], llm.tokenize("<|im_end|>")[-1]
    newline = llm.tokenize("\n")[-1]
    system = list(range(prompt.index(end) + 1))
    markers, header = [], False
    for p in range(len(system), len(prompt)):
        t = prompt[p]
        if t in (start, end) or header:
            markers.append(p)
        header = t == start or (header and t != newline)
    return system, markers


def _check_llama_view(llm: ScopeLlama) -> np.ndarray:
    """The held positions, checked against llama.cpp: its min / max position
    of the sequence, and the cells its attention mask showed the last step."""
    held = llm.kv_positions()
    mem = llm.context.memory
    assert (llama_cpp.llama_memory_seq_pos_min(mem, 0), llama_cpp.llama_memory_seq_pos_max(mem, 0)) == \
        (held[0], held[-1])
    cells = llm.context.cells()
    visible, _ = llm.context.visible()
    assert set(np.flatnonzero(cells >= 0).tolist()) <= set(visible.tolist())
    assert sorted(cells[cells >= 0].tolist()) == held.tolist()
    return held


def test_marks_follow_the_template_whatever_the_feeding_order(model_path):
    with ScopeLlama(model_path, budget=None) as llm:
        messages = [{"role": "system", "content": SYSTEM_TEXT}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
        tokens = array("i", llm.tokenize(llm.render_chat(messages)))
        marker = StructureMarker(llm.model)
        whole = array("b")
        marker.extend(whole, tokens)
        system, markers = _structure(llm, list(tokens))
        assert [whole[p] for p in system] == [SYSTEM] * (len(system) - 1) + [SYSTEM_CLOSE]
        assert {whole[p] for p in markers} == {OPEN, HEADER, CLOSE}
        assert all(whole[p] == PLAIN for p in range(len(tokens)) if p not in system and p not in markers)
        assert [llm.model.piece(tokens[p]) for p in markers if whole[p] == HEADER] == \
            [b"user", b"\n", b"ass", b"istant", b"\n", b"user", b"\n", b"ass", b"istant", b"\n"]
        # fed in pieces (a cache continued token by token, chunk by chunk) the marks are the same
        for cuts in ([1, 2, 3], [5, 17, 18, 19], list(range(1, len(tokens)))):
            parts = array("b")
            for hi in [*cuts, len(tokens)]:
                marker.extend(parts, tokens[:hi])
            assert parts == whole


def test_structure_cells_survive_a_long_chat_that_evicts(model_path):
    policy = dataclasses.replace(build(BUDGET), keep_structure=True)
    with ScopeLlama(model_path, policy=policy) as llm:
        prompt, stats = _chat(llm, turns=4)
        assert len(llm.history()) > 3 * BUDGET.total and stats.evicted_cells > 0
        held = set(_check_llama_view(llm).tolist())
        system, markers = _structure(llm, prompt)
        cap = int(policy.structure_share * BUDGET.prefill)
        assert len(system) < cap < len(system) + len(markers)  # the cap binds: older markers are ordinary
        kept = system + markers[len(markers) - (cap - len(system)):]  # the system turn, then the newest markers
        assert set(kept) <= held
        assert stats.structure_cells == cap
    # without keep_structure the same chat loses some of those cells: what the setting changes
    with ScopeLlama(model_path, policy=build(BUDGET)) as llm:
        prompt_plain, stats = _chat(llm, turns=4)
        held_plain = set(_check_llama_view(llm).tolist())
        assert prompt_plain[: len(system)] == prompt[: len(system)]
        assert not set(system) <= held_plain
        assert stats.structure_cells == 0


def test_the_cap_holds_a_long_system_message_to_its_share(model_path):
    """A system message longer than the cap: its first cap cells are pinned,
    and no marker; the rest of it competes as ordinary cells."""
    long_system = SYSTEM_TEXT + " " + " ".join(f"Rule {i}: log crate {i} before noon." for i in range(12))
    share = 0.125
    policy = dataclasses.replace(build(BUDGET), keep_structure=True, structure_share=share)
    with ScopeLlama(model_path, policy=policy) as llm:
        prompt, stats = _chat(llm, turns=3, system=long_system)
        system, _ = _structure(llm, prompt)
        cap = int(share * BUDGET.prefill)
        assert len(system) > 4 * cap
        held = set(_check_llama_view(llm).tolist())
        assert set(system[:cap]) <= held
        assert len(set(system) & held) < len(system)  # the rest of it was not pinned: some went
        assert stats.structure_cells == cap


def test_bad_structure_settings_raise_with_their_values():
    parts = {"prefill": SnapKV(budget=64, window=8), "decode": Slide(decode=32, recent=8)}
    with pytest.raises(ValueError, match="keep_structure must be True or False, got 1"):
        Policy(**parts, keep_structure=1)
    with pytest.raises(ValueError, match=r"structure_share must be a number in \(0, 0.5\], got 0.6"):
        Policy(**parts, keep_structure=True, structure_share=0.6)
    with pytest.raises(ValueError, match=r"structure_share must be a number in \(0, 0.5\], got 0"):
        Policy(**parts, structure_share=0)
    assert Policy(**parts, keep_structure=True).structure_cap(1000) == 16  # a quarter of the prefill budget
    assert Policy(**parts, keep_structure=True).structure_cap(40) == 10  # a quarter of a smaller keep
    assert Policy(**parts).structure_cap(1000) == 0


def test_the_default_budget_keeps_structure_and_a_chosen_budget_does_not(model_path):
    with ScopeLlama(model_path) as llm:  # no policy arguments: the default budget
        assert llm.policy.keep_structure and llm.policy == dataclasses.replace(build(llm.budget), keep_structure=True)
    with ScopeLlama(model_path, budget=BUDGET) as llm:
        assert not llm.policy.keep_structure
    with ScopeLlama(model_path, budget=None) as llm:
        assert llm.policy is None
