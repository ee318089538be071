"""ScopeLlama(model_path) with no policy arguments: the default budget, sized
by memory or by the model, never evicting silently (docs/budgets.md)."""
from __future__ import annotations

import logging
import re
import subprocess
import sys

import llama_cpp
import pytest
from llama_log import llama_log

from scope_edge import Budget, EngineConfig, ScopeLlama, memory
from scope_edge.bench.command import config_from_args
from scope_edge.budget import sized_chunk
from scope_edge.cli import build_parser, serve_settings
from scope_edge.policies.registry import DEFAULT_STRATEGY, default_budget

STORY = "Write a long story about a lighthouse keeper."


def _messages(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.name == "scope_edge" and "evicting KV cells" in r.getMessage()]


def _long_prompt(llm: ScopeLlama, n_tokens: int) -> list[int]:
    """A chat prompt of about n_tokens: a logbook to summarise."""
    entries = " ".join(f"Day {i}: the lamp was lit at {6 + i % 5} pm and {i * 7 % 40} ships passed." for i in range(400))
    head = llm.tokenize(f"<|im_start|>user\nHere is a lighthouse logbook. {entries}")[: n_tokens - 20]
    return head + llm.tokenize("\nSummarise it.<|im_end|>\n<|im_start|>assistant\n")[1:]


def test_default_budget_rule_and_strategy(model_path):
    geometry = memory.read_geometry(model_path)
    budget = default_budget(geometry)
    # a quarter of the trained 8192 positions, a quarter of it for the output
    assert geometry.n_ctx_train == 8192 and budget == Budget(prefill=1536, decode=512)
    with ScopeLlama(model_path) as llm:
        assert llm.budget == budget and llm.default_budget and llm.strategy == DEFAULT_STRATEGY
        assert llm.policy is not None
    with ScopeLlama(model_path, budget=None) as stock:
        assert stock.budget is None and stock.policy is None and not stock.default_budget
    # a fixed n_ctx bounds the default; one too small for any budget keeps the stock cache
    assert default_budget(geometry, n_ctx=1024) == Budget.for_cells(1024)
    assert default_budget(geometry, n_ctx=512) == Budget.for_cells(512)
    assert default_budget(geometry, n_ctx=256) is None


@pytest.mark.parametrize(("cells", "split"), [(512, (256, 256)), (768, (512, 256)), (1024, (768, 256)),
                                              (2048, (1536, 512)), (4096, (3072, 1024))])
def test_for_cells_gives_the_decode_room_every_cell_the_prefill_peak_takes(cells, split):
    b = Budget.for_cells(cells)
    assert (b.prefill, b.decode) == split
    assert b.prefill + max(b.decode, memory.PREFILL_CHUNK) == cells  # neither phase leaves a cell unused
    # the chunk a sized budget prefills with: half its decode room, at most 256
    assert sized_chunk(b) == min(256, split[1] // 2)


def test_a_sized_budget_prefills_in_chunks_of_half_its_decode_room(model_path):
    """At n_ctx=512 the default is 256/256 and prefills in chunks of 128, so
    earlier chunks keep the other half of the room (docs/ordered.md); a chunk
    given is kept, and a chosen budget keeps 256."""
    with ScopeLlama(model_path, n_ctx=512) as llm:
        assert llm.config.prefill_chunk == 128 and llm.budget == Budget(prefill=256, decode=256)
        prompt = _long_prompt(llm, 900)
        stream = llm.stream(prompt, max_tokens=4, ignore_eos=True)
        next(stream)  # the whole prompt went through the 512 cells, in chunks
        held = llm.kv_positions()
        mem = llm.context.memory
        assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == held.max() == len(prompt) - 1
        assert len(held) <= 512
        *_, last = stream
        assert last.stats.kv_cells_allocated == 512 and last.stats.evicted_prefill_cells >= len(prompt) - 512
        llm.policy = llm.policy  # a policy set: the sized budget's chunk goes with the budget
        assert llm.config.prefill_chunk is None and llm.config.chunk == memory.PREFILL_CHUNK
    with ScopeLlama(model_path, n_ctx=512, prefill_chunk=256) as given:
        assert given.config.prefill_chunk == 256
    with ScopeLlama(model_path, kv_memory="12MiB") as sized:  # 512 cells at f16
        assert sized.budget.decode == 256 and sized.config.prefill_chunk == 128
    with ScopeLlama(model_path, budget=Budget(prefill=256, decode=256)) as chosen:
        assert chosen.config.prefill_chunk is None and chosen.config.chunk == memory.PREFILL_CHUNK
    with ScopeLlama(model_path) as default:  # 2,048 cells: half the room is 256
        assert default.config.prefill_chunk == 256


def test_kv_memory_sizes_the_budget_and_the_chunk_in_one_place(model_path):
    """EngineConfig.budget_for_memory, what ScopeLlama, serve and bench call
    for kv_memory: the budget at the configuration's cache types and chunk,
    the automatic chunk resolved for it, a given chunk kept."""
    geometry = memory.read_geometry(model_path)
    budget, cfg = EngineConfig(model_path=model_path, type_k="q8_0").budget_for_memory("16MiB", geometry)
    assert budget == Budget.for_memory("16MiB", geometry, type_k="q8_0")  # 768 cells; f16's would be 512
    assert budget.total > 512 and cfg.type_k == "q8_0" and cfg.prefill_chunk == sized_chunk(budget)
    budget, cfg = EngineConfig(model_path=model_path, prefill_chunk=64).budget_for_memory("12MiB", geometry)
    assert budget == Budget.for_memory("12MiB", geometry, prefill_chunk=64) and cfg.prefill_chunk == 64
    with pytest.raises(ValueError, match="kv_memory='1KiB'"):
        EngineConfig(model_path=model_path).budget_for_memory("1KiB", geometry)


@pytest.mark.parametrize("command", ["serve", "bench"])
def test_serve_and_bench_size_kv_memory_as_scope_llama_does(model_path, command):
    """`--kv-memory 12MiB` (512 cells at f16) gives serve's settings and
    bench's configuration the budget and the sized chunk ScopeLlama gets."""
    args = build_parser().parse_args([command, "--model", str(model_path), "--kv-memory", "12MiB"])
    if command == "serve":
        settings = serve_settings(args)
        budget, engine = settings.budget, settings.engine
    else:
        config = config_from_args(args)
        budget, engine = Budget(prefill=config.prefill_budget, decode=config.decode_budget), config.engine
    assert (budget.prefill, budget.decode) == (256, 256) and engine.prefill_chunk == 128
    both = build_parser().parse_args([command, "--model", str(model_path), "--kv-memory", "12MiB",
                                      "--prefill-budget", "256"])
    with pytest.raises(ValueError, match="either --kv-memory or --prefill-budget"):
        serve_settings(both) if command == "serve" else config_from_args(both)


def test_a_prompt_as_long_as_a_small_default_context(model_path):
    # Regression: at n_ctx=512 the default budget prefills a prompt of keep + chunk = 512 tokens in one
    # shot; it was refused ("prompt has 512 tokens but the context holds 512 cells") although the
    # selection frees cells before the first token after it needs one.
    with ScopeLlama(model_path, n_ctx=512) as llm:
        prompt = llm.tokenize(" ".join(f"item {i}" for i in range(400)))[:512]
        out = llm.generate(prompt, max_tokens=16, ignore_eos=True)
        assert out.stats.generated_tokens == 16 and out.stats.kv_cells_allocated == 512
        assert out.stats.evicted_prefill_cells > 0 and len(llm.kv_positions()) <= llm.budget.total
    with ScopeLlama(model_path, n_ctx=512, budget=None) as full, pytest.raises(ValueError, match="512 cells"):
        full.generate(prompt, max_tokens=1)  # the full cache needs a cell for its first token


def test_short_generation_is_stock_token_for_token(model_path, caplog):
    with ScopeLlama(model_path, budget=None) as stock:
        prompt = stock.render_chat([{"role": "user", "content": STORY}])
        want = stock.generate(prompt, max_tokens=120, ignore_eos=True)
    with caplog.at_level(logging.INFO, logger="scope_edge"), ScopeLlama(model_path) as llm:
        got = llm.generate(prompt, max_tokens=120, ignore_eos=True)
    assert got.tokens == want.tokens
    assert got.stats.kv_cells_allocated <= want.stats.kv_cells_allocated
    assert got.stats.evicted_cells == 0 and not _messages(caplog.records)


def test_prompt_past_the_prefill_budget_that_fits_with_its_output_is_stock(model_path, caplog):
    """The decode room is lent to the prompt, whatever max_tokens: prompt +
    output within the budget's total evicts nothing, even past its prefill."""
    with ScopeLlama(model_path) as llm:
        budget = llm.budget
        prompt = _long_prompt(llm, budget.prefill + 200)
        assert budget.prefill < len(prompt) and len(prompt) + 40 <= budget.total
        with caplog.at_level(logging.INFO, logger="scope_edge"):
            got = llm.generate(prompt, max_tokens=40, ignore_eos=True)
    with ScopeLlama(model_path, budget=None) as stock:
        want = stock.generate(prompt, max_tokens=40, ignore_eos=True)
    assert got.tokens == want.tokens and got.stats.evicted_cells == 0 and not _messages(caplog.records)
    assert got.stats.kv_cells_allocated <= want.stats.kv_cells_allocated


def test_long_generation_is_held_at_the_bound_and_logs_once(model_path, caplog):
    with ScopeLlama(model_path) as llm:
        budget = llm.budget
        prompt = _long_prompt(llm, budget.total - 100)
        with caplog.at_level(logging.INFO, logger="scope_edge"):
            out = llm.generate(prompt, max_tokens=300, ignore_eos=True)
        held = len(llm.kv_positions())
    st = out.stats
    assert len(prompt) + st.generated_tokens > budget.total
    assert held <= budget.total and st.kv_cells_allocated <= memory.padded_cells(budget.total)
    assert st.evicted_cells == st.evicted_prefill_cells + st.evicted_decode_cells > 0
    assert st.evicted_decode_cells > 0  # the prompt fitted; the output pushed past the bound
    [line] = _messages(caplog.records)  # exactly once, at WARNING: the user asked for no budget
    assert [r.levelno for r in caplog.records if "evicting KV cells" in r.getMessage()] == [logging.WARNING]
    assert "default budget" in line and f"prefill={budget.prefill}" in line and "budget=None" in line


def test_a_chosen_budget_logs_its_first_eviction_at_info(model_path, caplog):
    b = Budget(prefill=64, decode=32, observation_window=8, recent_window=8)
    with caplog.at_level(logging.INFO, logger="scope_edge"), ScopeLlama(model_path, budget=b) as llm:
        st = llm.generate(_long_prompt(llm, 200), max_tokens=60, ignore_eos=True).stats
    assert st.evicted_prefill_cells > 0 and st.evicted_decode_cells > 0
    records = [r for r in caplog.records if "evicting KV cells" in r.getMessage()]
    assert [r.levelno for r in records] == [logging.INFO] and "during prefill" in records[0].getMessage()


def _kv_buffer_bytes(lines: list[str]) -> int:
    """llama.cpp's own "KV buffer size = N MiB" lines, summed."""
    sizes = [float(m.group(1)) for line in lines if (m := re.search(r"KV buffer size =\s*([\d.]+) MiB", line))]
    assert sizes, lines
    return round(sum(sizes) * 2**20)


@pytest.mark.parametrize("type_k", ["f16", "q8_0"])
def test_kv_memory_allocates_within_5_percent_of_the_figure(model_path, type_k):
    figure = "40MiB"  # 1,792 cells at f16, 2,304 with a q8_0 K: 1.6% and 3.1% under it
    with ScopeLlama(model_path, kv_memory=figure, type_k=type_k) as llm:
        budget = llm.budget
        assert budget == Budget.for_memory(figure, memory.read_geometry(model_path), type_k=type_k)
        prompt = _long_prompt(llm, budget.prefill + 100)  # past the prefill budget: the loan fills the room
        with llama_log() as lines:
            stream = llm.stream(prompt, max_tokens=4 * budget.decode, ignore_eos=True)
            next(stream)  # the context is made for the whole generation before the first token
        stream.close()
    allocated = _kv_buffer_bytes(lines)
    asked = memory.parse_bytes(figure)
    assert 0.95 * asked <= allocated <= asked, (allocated, asked)


def test_kv_memory_refuses_a_figure_below_the_smallest_budget(model_path):
    with pytest.raises(ValueError, match=r"kv_memory='8MiB' .* holds 364 KV cells of 23,040 B .* smallest budget "
                                         r"needs 512 cells = 11\.2 MiB"):
        ScopeLlama(model_path, kv_memory="8MiB")
    with pytest.raises(ValueError, match="either kv_memory= .* or budget="):
        ScopeLlama(model_path, kv_memory="64MiB", budget=None)
    with pytest.raises(ValueError, match="memory figure"):
        ScopeLlama(model_path, kv_memory="lots")


@pytest.mark.parametrize(("figure", "nbytes"), [("512MiB", 512 * 2**20), ("1.5 GiB", 3 * 2**29), ("800MB", 8 * 10**8),
                                                ("64M", 64 * 2**20), (4096, 4096)])
def test_parse_bytes(figure, nbytes):
    assert memory.parse_bytes(figure) == nbytes


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scope_edge.cli", *args], capture_output=True, text=True,
                          timeout=600)


def test_cli_kv_memory_and_the_summary_shows_evictions(model_path):
    prompt = "Tell me about lighthouses. " * 130  # 911 tokens
    gen = _cli("generate", prompt, "--model", model_path, "--kv-memory", "17MiB", "--max-tokens", "8",
               "--temperature", "0")
    assert gen.returncode == 0, gen.stderr
    # 17 MiB: at most 768 cells, Budget(prefill=512, decode=192); the prompt alone passes 704 cells
    summary = re.search(r"KV [\d.]+ MiB \((\d+) cells.*evicted \d+ cells \([1-9]\d* prefill, \d+ decode\)", gen.stderr)
    assert summary and int(summary.group(1)) <= 768, gen.stderr
    small = _cli("generate", "hi", "--model", model_path, "--kv-memory", "8MiB")
    assert small.returncode == 2 and "smallest budget needs 512 cells" in small.stderr
    both = _cli("generate", "hi", "--model", model_path, "--kv-memory", "64MiB", "--full-cache")
    assert both.returncode == 2 and "--kv-memory --full-cache" in both.stderr


@pytest.mark.parametrize("extra", [[], ["--kv-memory", "64MiB"], ["--full-cache"]])
def test_windows_without_budgets_are_refused_not_dropped(model_path, extra):
    """--recent-window shapes a budget the flags give; with the default budget, --kv-memory or
    --full-cache it used to be dropped silently."""
    refused = "--recent-window set the windows of a budget given by --prefill-budget"
    gen = _cli("generate", "hi", "--model", str(model_path), "--recent-window", "64", *extra)
    assert gen.returncode == 2 and refused in gen.stderr, gen.stderr
    if extra[:1] == ["--kv-memory"]:
        with pytest.raises(ValueError, match=refused):
            serve_settings(build_parser().parse_args(["serve", "--model", str(model_path), "--recent-window", "64",
                                                      *extra]))
    given = build_parser().parse_args(["serve", "--model", str(model_path), "--prefill-budget", "256",
                                       "--decode-budget", "128", "--recent-window", "64"])
    assert serve_settings(given).budget.recent_window == 64
