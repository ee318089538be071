"""Sliding-window (iSWA) models: llama.cpp keeps their full-attention layers'
cells in one cache and their sliding-window layers' in a second one behind
the same llama_memory. Budgets apply to the first; the window's cells stay
llama.cpp's, and no eviction may take a position the window still sees.

Fast checks run on a tiny random-weight gemma3 (6 layers: layer 5 is the
full-attention one, window 16); the real Gemma 3 270M (window 512) checks
identity with stock llama-cpp-python, the hook's view of its cache and the
byte accounting against llama.cpp's log."""
from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from scope_edge import Budget, ScopeLlama, memory
from scope_edge.bench import eog_tokens
from scope_edge.protocol import Cache, stock_greedy
from scope_edge.policies import COMBINATIONS
from llama_log import llama_log
from test_bench import load_script
from test_device import endpoint  # noqa: F401  (the RPC server fixture)
from tiny_gguf import write_tiny_gguf

WINDOW = 16
TINY_BUDGET = Budget(prefill=32, decode=24, observation_window=4, recent_window=4)
MAX_TOKENS = 3 * TINY_BUDGET.decode + 10
T = 2
DEVICE_TOKENS = 128  # on the RPC device (512 verified by hand: docs/models.md)


@pytest.fixture(scope="module")
def tiny_iswa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("iswa") / "gemma3.gguf", "gemma3", n_layer=6,
                           sliding_window=WINDOW, n_ctx_train=4096)


def _tiny_prompt(n: int) -> list[int]:
    return [1] + [3 + (i * 37) % 259 for i in range(n - 1)]  # BOS, then byte and word tokens


def _bound(strategy: str, selector: str, n_prompt: int) -> int:
    if strategy in ("streaming", "h2o"):
        return TINY_BUDGET.total
    kept = n_prompt if selector == "full" else TINY_BUDGET.prefill
    if strategy == "full":
        return kept + MAX_TOKENS
    delta = (MAX_TOKENS - TINY_BUDGET.recent_window) // (TINY_BUDGET.decode - TINY_BUDGET.recent_window)
    return kept + TINY_BUDGET.decode + (delta if strategy == "discontinuous" else 0)


def test_the_hook_follows_the_full_attention_layer(tiny_iswa: Path) -> None:
    with ScopeLlama(tiny_iswa, n_threads=T) as llm:
        assert llm.model.n_swa == WINDOW
        np.testing.assert_array_equal(np.flatnonzero(~llm.model.swa_layers), [5])
        llm.generate(_tiny_prompt(40), max_tokens=8, ignore_eos=True)
        held = llm.kv_positions()
        mem = llm.context.memory
        # llama.cpp answers pos_min / pos_max from the window's cache: the same newest
        # position, the oldest one the window still keeps
        assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == held[-1] == 46  # 40 + the 7 tokens fed
        assert llama_cpp.llama_memory_seq_pos_min(mem, 0) >= held[0]
        np.testing.assert_array_equal(held, np.arange(47))
        visible, _ = llm.context.visible()
        assert len(visible) == 47  # the full-attention mask: every position, not the window's 16


@pytest.mark.parametrize("strategy,selector", COMBINATIONS)
def test_every_step_the_mask_shows_exactly_the_policys_cells(tiny_iswa: Path, strategy: str, selector: str) -> None:
    """After each step the cells llama.cpp's full-attention mask showed the
    step's token are the cells held after the previous step plus the token's
    own; within the bound; and the window's positions are all held."""
    with ScopeLlama(tiny_iswa, budget=TINY_BUDGET, strategy=strategy, prefill_selector=selector, lend="none",
                    n_threads=T) as llm:
        prompt = _tiny_prompt(80)
        bound = _bound(strategy, selector, len(prompt))
        before: np.ndarray | None = None
        steps = 0
        for chunk in llm.stream(prompt, max_tokens=MAX_TOKENS, ignore_eos=True):
            cells = llm.context.cells()
            visible, _ = llm.context.visible()
            held = llm.kv_positions()
            newest = int(held[-1])
            if before is not None:
                mine = set(np.flatnonzero(before >= 0).tolist()) | set(np.flatnonzero(cells == newest).tolist())
                assert set(visible.tolist()) == mine, steps
                assert len(visible) <= bound, (steps, len(visible), bound)
            # the next token's window: the last WINDOW - 1 positions, never evicted
            assert set(range(max(0, newest - WINDOW + 2), newest + 1)) <= set(held.tolist())
            before = cells
            if chunk.finish_reason is None:
                steps += 1
        st = chunk.stats
        assert st.generated_tokens == MAX_TOKENS and st.kv_cells_peak <= bound
        if (strategy, selector) != ("full", "full"):
            assert st.evicted_cells > 0


def test_budgets_below_the_window_are_refused(tiny_iswa: Path) -> None:
    with pytest.raises(ValueError, match=r"sliding window of 16 positions.*prefill=8, decode=24, need each >= 16"):
        ScopeLlama(tiny_iswa, budget=Budget(prefill=8, decode=24, observation_window=4, recent_window=4))


def test_reindexing_keeps_the_window(tiny_iswa: Path) -> None:
    with ScopeLlama(tiny_iswa, budget=TINY_BUDGET, position_limit=128, n_threads=T) as llm:
        out = llm.generate(_tiny_prompt(60), max_tokens=160, ignore_eos=True)
        held = llm.kv_positions()
        assert out.stats.position_resets > 0 and held[-1] < 128
        assert set(range(int(held[-1]) - WINDOW + 2, int(held[-1]) + 1)) <= set(held.tolist())


def test_a_conversation_continues_but_never_steps_back(tiny_iswa: Path) -> None:
    """The window's cache overwrites what the next position no longer sees:
    a prompt continuing the cache reuses it, one diverging inside it is
    processed again."""
    prompt = _tiny_prompt(60)
    with ScopeLlama(tiny_iswa, budget=TINY_BUDGET, n_threads=T) as llm:
        history = prompt + llm.generate(prompt, max_tokens=100, ignore_eos=True).tokens
        again = llm.generate(history + _tiny_prompt(5)[1:], max_tokens=4, ignore_eos=True, resume=True)
        assert again.stats.reused_prompt_tokens == len(history) - 1  # all but the reply's last token, never fed
        back = llm.generate(history[:-3] + [7, 8], max_tokens=4, ignore_eos=True, resume=True)
        assert back.stats.reused_prompt_tokens == 0


def test_full_cache_continuation_equals_a_fresh_run(tiny_iswa: Path) -> None:
    first, more = _tiny_prompt(50), _tiny_prompt(9)[1:]
    with ScopeLlama(tiny_iswa, n_threads=T) as llm:
        out = llm.generate(first, max_tokens=30, ignore_eos=True)
        cont = llm.generate(first + out.tokens + more, max_tokens=40, ignore_eos=True, resume=True)
        assert cont.stats.reused_prompt_tokens == 79  # the reply's last token was never fed
    with ScopeLlama(tiny_iswa, n_threads=T) as fresh:
        assert fresh.generate(first + out.tokens + more, max_tokens=40, ignore_eos=True).tokens == cont.tokens


# -- the real model ----------------------------------------------------------

GEMMA_TEXT = ("The lighthouse keeper kept a log of every ship that passed the point. In the first week of March "
              "he wrote that")


@pytest.mark.network
def test_gemma3_full_cache_is_token_identical_to_stock(gemma_path: str) -> None:
    with ScopeLlama(gemma_path) as llm:
        prompt = llm.tokenize(GEMMA_TEXT)
        ours = llm.generate(prompt, max_tokens=512, ignore_eos=True)
    stock = stock_greedy(gemma_path, prompt, 512, eog=eog_tokens(gemma_path))
    assert ours.tokens == stock["tokens"]


def _long_prompt(llm: ScopeLlama, n: int) -> list[int]:
    words = "ship harbour lamp storm rope tide gull anchor keel mast".split()
    text = " ".join(f"{words[i % len(words)]} {i % 97}" for i in range(n))
    return llm.tokenize(text)[:n]


@pytest.mark.network
def test_gemma3_budget_keeps_the_window_and_the_bound(gemma_path: str) -> None:
    budget = Budget(prefill=512, decode=512)
    with llama_log() as lines, ScopeLlama(gemma_path, budget=budget, lend="none") as llm:
        prompt = _long_prompt(llm, 1100)
        n_swa = llm.model.n_swa
        steps = 0
        for chunk in llm.stream(prompt, max_tokens=24, ignore_eos=True):
            held = llm.kv_positions()
            visible, _ = llm.context.visible()
            assert set(np.flatnonzero(llm.context.cells() >= 0).tolist()) <= set(visible.tolist())
            if steps:  # (step 0's mask is the prompt's last chunk's)
                assert len(visible) <= budget.prefill + steps
            newest = int(held[-1])
            assert set(range(newest - n_swa + 2, newest + 1)) <= set(held.tolist())
            steps += 1
        st = chunk.stats
    assert st.evicted_cells == len(prompt) - budget.prefill
    # the bytes reported are llama.cpp's own: its full-attention cache, then its window's
    buffers = [float(line.split("=")[1].split("MiB")[0]) for line in lines if "KV buffer size" in line]
    assert buffers[-2:] == [pytest.approx(st.kv_bytes_full / 2**20, abs=0.01),
                            pytest.approx(st.kv_bytes_swa / 2**20, abs=0.01)]
    assert st.kv_bytes_allocated == st.kv_bytes_full + st.kv_bytes_swa
    geometry = memory.read_geometry(gemma_path)
    assert st.kv_bytes_swa == memory.kv_bytes_split(geometry, st.kv_cells_allocated)[1]
    # stock llama-cpp-python sizes its window cache like the full one (swa_full): all of it
    with llama_log() as lines:
        stock = stock_greedy(gemma_path, prompt[:64], 2, eog=eog_tokens(gemma_path), n_ctx=len(prompt) + 24)
    stock_mib = sum(float(line.split("=")[1].split("MiB")[0]) for line in lines if "KV buffer size" in line)
    assert stock_mib == pytest.approx(stock["kv_bytes"] / 2**20, abs=0.02)
    assert st.stock_kv_bytes == memory.kv_bytes(geometry, memory.padded_cells(len(prompt) + 24))


# -- every layer on llama.cpp's RPC device ---------------------------------------

def test_on_the_device_the_mask_shows_exactly_the_policys_cells(tiny_iswa: Path, endpoint: str) -> None:
    """The inputs reach the device split as the scheduler's copies (both
    caches' under the same names): the hook still follows the full-attention
    layer, and the full cache matches the CPU's tokens."""
    device = {"rpc_servers": [endpoint], "n_gpu_layers": -1}
    prompt = _tiny_prompt(80)
    with ScopeLlama(tiny_iswa, n_threads=T) as cpu:
        want = cpu.generate(prompt, max_tokens=40, ignore_eos=True).tokens
    with ScopeLlama(tiny_iswa, n_threads=T, **device) as llm:
        assert llm.generate(prompt, max_tokens=40, ignore_eos=True).tokens == want
    with ScopeLlama(tiny_iswa, budget=TINY_BUDGET, strategy="slide", prefill_selector="snapkv", lend="none",
                    n_threads=T, **device) as llm:
        assert llm.capture_layers == [5]  # offloaded: the full-attention layers only
        before = None
        for chunk in llm.stream(prompt, max_tokens=MAX_TOKENS, ignore_eos=True):
            cells, (visible, _) = llm.context.cells(), llm.context.visible()
            newest = int(llm.kv_positions()[-1])
            if before is not None:
                mine = set(np.flatnonzero(before >= 0).tolist()) | set(np.flatnonzero(cells == newest).tolist())
                assert set(visible.tolist()) == mine
            before = cells
        assert chunk.stats.evicted_cells > 0


@pytest.mark.network
def test_gemma3_full_cache_on_the_device_is_token_identical_to_stock(gemma_path: str, endpoint: str) -> None:
    with ScopeLlama(gemma_path, rpc_servers=[endpoint], n_gpu_layers=-1) as llm:
        prompt = llm.tokenize(GEMMA_TEXT)
        ours = llm.generate(prompt, max_tokens=DEVICE_TOKENS, ignore_eos=True)
    assert ours.tokens == stock_greedy(gemma_path, prompt, DEVICE_TOKENS, eog=eog_tokens(gemma_path),
                                      n_gpu_layers=-1)["tokens"]


@pytest.mark.network
def test_stock_without_swa_full_allocates_what_memory_says(gemma_path: str) -> None:
    """bench/iswa.py's second stock (swa_full=false, what a stock user can pass): llama.cpp's own
    buffers are the window plus a ubatch for the window layers, the whole context for the others."""
    cells = 2048
    with llama_log() as lines:
        stock = stock_greedy(gemma_path, list(range(2, 66)), 2, eog=eog_tokens(gemma_path), n_ctx=cells,
                             cache=Cache(swa_full=False))
    buffers = [float(line.split("=")[1].split("MiB")[0]) for line in lines if "KV buffer size" in line]
    full, window = memory.kv_bytes_split(memory.read_geometry(gemma_path), cells, swa_full=False)
    assert buffers[-2:] == [pytest.approx(full / 2**20, abs=0.01), pytest.approx(window / 2**20, abs=0.01)]
    assert window < memory.kv_bytes_split(memory.read_geometry(gemma_path), cells, swa_full=True)[1]
    assert stock["n_ctx"] == cells


def test_iswa_script_steps_both_stocks_and_ours_in_rounds(tiny_iswa: Path) -> None:
    """bench/iswa.py's speed part on the tiny gemma3: every side once a round, the order rotated,
    each ratio the median of its per-round ratios; stock without swa_full holds a smaller window cache."""
    iswa = load_script("iswa")
    res = iswa.speed(str(tiny_iswa), _tiny_prompt(700), 200, [(32, 24)], rounds=2)
    cols = res["columns"]
    assert list(cols) == ["stock", "stock, swa_full=false", "ours, 32/24"]
    assert all([r["round"] for r in c["runs"]] == [0, 1] for c in cols.values())
    assert cols["stock, swa_full=false"]["kv_bytes_swa"] < cols["stock"]["kv_bytes_swa"]
    assert cols["stock, swa_full=false"]["kv_bytes_full"] == cols["stock"]["kv_bytes_full"]
    assert cols["ours, 32/24"]["kv_bytes"] < cols["stock, swa_full=false"]["kv_bytes"]
    for name, r in res["ratios"].items():
        num, den = name.split(" / ")
        assert r["rounds"] == [a["decode_tokens_per_s"] / b["decode_tokens_per_s"]
                               for a, b in zip(cols[num]["runs"], cols[den]["runs"])], name
    assert len(res["ratios"]) == 3 and "| ours, 32/24 |" in iswa.table(
        {**res, "prompt_tokens": 700, "gen_tokens": 200, "fidelity": {"budgets": []}})
