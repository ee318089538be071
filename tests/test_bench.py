"""scope_edge.bench on a tiny configuration: keys, arithmetic, CLI JSON line,
the prompt through the GGUF's chat template, the scripts' shared pieces.
No timing assertions (the machine is shared)."""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scope_edge import Budget, EngineConfig, ScopeLlama, Sketch
from scope_edge.cli import build_parser
from scope_edge.devices import Devices
from scope_edge.flags import engine_config
from scope_edge.bench import (SYSTEM_PROMPT, BenchConfig, budget_pairs, chat_prompt, eog_tokens, free_running,
                              config_from_args, logbook_prompt, run_bench, run_many, save_results, stock_reference,
                              vocabulary)
from scope_edge.policies import build
from scope_edge.protocol import (Threads, batched_stock, ideal_fill, ratio, run_rounds, schedule, spread,
                                 steady_level, stock_greedy)

BENCH = Path(__file__).resolve().parents[1] / "bench"
RESULTS = BENCH / "results"

TINY = dict(prompt_tokens=300, max_tokens=64, prefill_budget=128, decode_budget=64, ideal_steps=16,
            engine=EngineConfig(prefill_chunk=128))


@pytest.fixture(scope="module")
def result(model_path):
    return run_bench(BenchConfig(**{**TINY, "engine": EngineConfig(model_path=str(model_path), prefill_chunk=128)}),
                     progress=False)


def check_result(result: dict) -> None:
    """Keys present and every derived number equal to what it is derived from."""
    for part in ("stock", "ours", "ideal"):
        for key in ("decode_tokens_per_s",):
            assert result[part][key] > 0
    for part in ("stock", "ours"):
        assert result[part]["kv_bytes"] > 0 and result[part]["prefill_tokens_per_s"] > 0
    assert result["ours"]["kv_bytes"] < result["stock"]["kv_bytes"]
    assert result["ideal"]["n_ctx"] == result["ours"]["kv_cells"]
    # KV is cells x the same bytes a cell: stock holds the whole context
    s, o, i, r = result["stock"], result["ours"], result["ideal"], result["ratios"]
    assert s["n_ctx"] >= TINY["prompt_tokens"] + TINY["max_tokens"]
    assert o["kv_bytes"] * s["n_ctx"] == s["kv_bytes"] * o["kv_cells"]
    # every ratio is ours over its reference, from the numbers reported beside it
    assert r["kv_bytes"] == pytest.approx(o["kv_bytes"] / s["kv_bytes"], rel=1e-12)
    assert r["decode_speedup"] == pytest.approx(o["decode_tokens_per_s"] / s["decode_tokens_per_s"], rel=1e-12)
    assert r["prefill_speedup"] == pytest.approx(o["prefill_tokens_per_s"] / s["prefill_tokens_per_s"], rel=1e-12)
    assert r["decode_vs_ideal"] == pytest.approx(o["decode_tokens_per_s"] / i["decode_tokens_per_s"], rel=1e-12)
    f = result["fidelity"]
    assert f["steps"] == 64
    assert 0.0 <= f["top1_agreement"] <= 1.0
    assert 0.0 <= f["mean_kl"] <= f["max_kl"]
    assert f["reference_consistency"] == 1.0
    assert 0 <= f["identical_prefix"] <= 64 and 0.0 <= f["rouge_l"] <= 1.0
    assert result["config"]["strategy"] == "slide"
    json.dumps(result)  # JSON-able


def test_keys_and_arithmetic(result):
    check_result(result)


@pytest.mark.parametrize("ratio", ["kv_bytes", "decode_speedup", "prefill_speedup", "decode_vs_ideal"])
def test_a_ratio_off_by_a_percent_is_caught(result, ratio):
    wrong = copy.deepcopy(result)
    wrong["ratios"][ratio] *= 1.01
    with pytest.raises(AssertionError):
        check_result(wrong)


def test_stock_logits_are_the_full_cache_logits(model_path):
    """The lockstep's default reference (kept stock logits) equals
    ScopeLlama(budget=None) teacher-forced on the same tokens."""
    path = str(model_path)
    prompt = logbook_prompt(path, 200)
    stock = stock_reference(path, prompt, 6)
    with ScopeLlama(path, budget=None) as llm:
        ours = np.stack(list(llm.teacher_force(prompt, stock.tokens)))
    np.testing.assert_allclose(ours, stock.logits, atol=1e-3)


def test_logbook_prompt_is_the_chat_template_cut_to_size(model_path):
    """Exactly n tokens: the GGUF's chat template around the body, which is
    cut to fit; for the default model (ChatML) the same tokens as the
    hard-coded ChatML prompt that bench/results were measured with."""
    path = str(model_path)
    with vocabulary(path) as vocab:
        for n in (128, 300):
            prompt = logbook_prompt(path, n)
            assert len(prompt) == n
            assert "Here is a delivery logbook.\n\nRecord 1: " in vocab.detokenize(prompt)
            head = vocab.tokenize(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
                                  "Here is a delivery logbook.\n\n", add_special=False)
            tail = vocab.tokenize("\n\nGo through the logbook record by record. For each record write one line "
                                  "with the customer, the city, the number of items and what happened."
                                  "<|im_end|>\n<|im_start|>assistant\n", add_special=False)
            assert prompt[:len(head)] == head and prompt[-len(tail):] == tail
        assert logbook_prompt(path, 200, system=None) != logbook_prompt(path, 200)
        with pytest.raises(ValueError, match="cannot hold the template"):
            chat_prompt(vocab, "head ", "body", " tail", 10)
        assert eog_tokens(path).tolist() == vocab.eog_tokens()


def test_save_results(tmp_path, capsys):
    data = {"a": 1, "rows": [1.5]}
    out = save_results(tmp_path / "sub" / "x.json", data, print_json=True, table=lambda d: "TABLE")
    assert json.loads(out.read_text()) == data
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == data
    save_results(tmp_path / "x.json", data, table=lambda d: f"table of {d['a']}")
    assert capsys.readouterr().out == "table of 1\n"
    assert save_results(None, data, table=lambda d: "only printed") is None
    assert capsys.readouterr().out == "only printed\n"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


def test_fidelity_variants_evict(model_path):
    """bench/fidelity.py's scoring variants are real prefill selections: each
    keeps the prefill budget (a SnapKV without budget= keeps every cell)."""
    fidelity = load_script("fidelity")
    for v in fidelity.VARIANTS:
        policy = fidelity.variant_policy(v, 96, 64)
        assert policy.prefill_keep(300) == 96, v.name
    # the "(default)" variant is the policy the sweep runs: same lend rule, probe and decode
    default = next(v for v in fidelity.VARIANTS if "(default)" in v.name)
    shipped = BenchConfig(prompt_tokens=512, max_tokens=256, prefill_budget=192, decode_budget=128,
                          recent_window=64).policy()
    ours = fidelity.variant_policy(default, 192, 128)
    assert (ours.lend, ours.decode, ours.keep_structure) == (shipped.lend, shipped.decode, shipped.keep_structure)
    assert dataclasses.asdict(ours.prefill) == {**dataclasses.asdict(shipped.prefill), "first_layer": 0}
    upper = next(v for v in fidelity.VARIANTS if v.first_layer)
    prompt = logbook_prompt(str(model_path), 300)
    with fidelity.variant_llm(str(model_path), upper, 96, 64) as llm:
        assert isinstance(llm.policy.prefill, fidelity.LayerSnapKV)
        stats = llm.generate(prompt, max_tokens=8, ignore_eos=True).stats
    assert stats.evicted_cells >= 300 - (96 + 64)  # the lend rule lends the decode room to prompt cells


def test_lookback_keeps_every_key_token_of_an_ordered_prompt(model_path):
    """bench/ordered.py's prompt at 2x the prefill budget (a 2x prompt of the
    suite): after the prefill selection SnapKV's default window still holds
    every item's "name: quantity" tokens, where the paper's centred window
    of 7 loses some (a quantity's second digit, mostly): issue #17."""
    ordered = load_script("ordered")
    with ScopeLlama(str(model_path), budget=None) as full:
        task = ordered.sized_task(full, ordered.FAMILIES["inventory"], 512, 2001, 2)
        tokens = full.tokenize(full.render_chat(task.messages))
        keys = {p for k in ordered.token_spans(full, tokens, task)[0] for p in k}
    lost = {}
    for name, pooling in (("default", {}), ("centred", {"kernel": 7, "lookback": 0})):
        policy = build(Budget(prefill=256, decode=128))
        policy = dataclasses.replace(policy, prefill=dataclasses.replace(policy.prefill, **pooling))
        with ScopeLlama(str(model_path), policy=policy) as llm:
            next(iter(llm.stream(tokens, max_tokens=300)))  # the prompt is in, selected; one token out
            held = set(llm.kv_positions().tolist())
            assert len(held) < len(tokens)  # the selection did evict
            lost[name] = keys - held
    assert lost["default"] == set()
    assert len(lost["centred"]) >= 3


def test_bad_type_k():
    with pytest.raises(ValueError, match="type_k must be one of"):
        BenchConfig(engine=EngineConfig(type_k="q5_1"))


def test_free_running_scores():
    assert free_running([1, 2, 3, 4], [1, 2, 3, 4]) == {"identical_prefix": 4, "rouge_l": 1.0}
    r = free_running([1, 2, 3, 4], [1, 9, 3, 4])
    assert r["identical_prefix"] == 1 and r["rouge_l"] == pytest.approx(0.75)


def test_bad_config_names_the_numbers():
    with pytest.raises(ValueError, match="prompt_tokens must be an int >= 1, got 0"):
        BenchConfig(prompt_tokens=0)
    with pytest.raises(ValueError, match="unknown strategy"):
        BenchConfig(strategy="nope")
    with pytest.raises(ValueError, match="prompt_seed must be an int >= 0, got -1"):
        BenchConfig(prompt_seed=-1)


def test_budget_pairs():
    assert budget_pairs(["96:64", "192:128"]) == [(96, 64), (192, 128)]
    for bad in ("96", "a:b", "96:64:1", ":64"):
        with pytest.raises(ValueError, match=f"prefill:decode pairs of ints .*got '{bad}'"):
            budget_pairs([bad])


def test_run_many_takes_one_prompt():
    """Configs that would need different prompts are refused before anything runs."""
    with pytest.raises(ValueError, match="one prompt_tokens/prompt_seed/max_tokens/type_k/model"):
        run_many([BenchConfig(**TINY), BenchConfig(prompt_seed=1, **TINY)])


def test_fidelity_means_over_prompts():
    fidelity = load_script("fidelity")
    rows = [{"config": {"prefill_budget": 96, "decode_budget": 64, "strategy": "slide", "lend": "passed",
                        "prompt_seed": seed}, "fidelity": {"top1_agreement": top1, "mean_kl": kl}}
            for seed, top1, kl in ((0, 0.5, 1.0), (1, 0.75, 0.5), (2, 1.0, 0.0))]
    (m,) = fidelity.means(rows)
    assert m["prompts"] == 3 and m["budget"] == "96:64" and m["scoring"] == "exact"
    assert (m["top1_agreement"], m["top1_min"], m["top1_max"], m["mean_kl"]) == (0.75, 0.5, 1.0, 0.5)


def test_fidelity_pooling_paired_difference():
    """--pooling's table pairs the two poolings by prompt: the difference's
    interval comes from the per-prompt differences, not the two means."""
    fidelity = load_script("fidelity")
    (a, *_), (b, *_) = fidelity.POOLINGS
    rows = [{"seed": seed, "variant": v, "top1_agreement": top1, "mean_kl": kl}
            for seed, base in ((20, 0.5), (21, 0.7), (22, 0.9))
            for v, top1, kl in ((a, base + 0.01, 1.0), (b, base, 1.0))]
    lines = fidelity.pooling_table(rows)
    assert lines[0].startswith("pooling, 3 prompts (seeds 20..22)")
    assert "+1.00 ± 0.00 points (paired)" in lines[3]  # the same +1 point on every prompt
    assert "+0.0000 ± 0.0000 (paired)" in lines[6]


def test_ordered_paired_report():
    ordered = load_script("ordered")
    runs = [{"config": c, "family": "teams", "size": 3, "seed": j, "score": score}
            for j, (full, x, y) in enumerate(((0.5, 0.5, 0.25), (1.0, 0.75, 0.5)))
            for c, score in ((ordered.FULL, full), ("x", x), ("y", y))]
    res = {"config": {"families": ["teams"], "sizes": [3]}, "runs": runs}
    line = ordered.paired(res, "x", "y").splitlines()[1]
    assert "2 prompts" in line and "x 62.5% (83.3% of full)" in line and "y 37.5% (50.0% of full)" in line
    assert "x - y +25.0 ± 0.0 points" in line


def test_cli_json_last_line(model_path):
    cmd = [sys.executable, "-m", "scope_edge.bench", "--json", "--model", str(model_path), "--prompt-tokens", "128",
           "--max-tokens", "8", "--prefill-budget", "64", "--decode-budget", "8", "--prefill-chunk", "64",
           "--ideal-steps", "4"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for part, key in [("stock", "kv_bytes"), ("stock", "decode_tokens_per_s"), ("stock", "prefill_tokens_per_s"),
                      ("ours", "kv_bytes"), ("ours", "decode_tokens_per_s"), ("ours", "prefill_tokens_per_s"),
                      ("ideal", "decode_tokens_per_s")]:
        assert key in res[part]
    for key in ("top1_agreement", "mean_kl", "max_kl"):
        assert key in res["fidelity"]
    assert res["config"]["max_tokens"] == 8


def _every_engine_flag(model_path: str) -> tuple[list[str], EngineConfig]:
    """A command line naming every engine setting (none at its default), and the EngineConfig it means."""
    argv = ["--model", model_path, "--threads", "1", "--type-k", "q8_0", "--type-v", "q4_0", "--flash-attn",
            "--sketch-rank", "8", "--sketch-basis", "pca", "--sketch-scores", "keydiff", "--capture-layers", "2,6",
            "--prefill-chunk", "128", "--chunked-prefill", "on", "--position-limit", "4096",
            "--n-gpu-layers", "-1", "--main-gpu", "1", "--tensor-split", "1,3", "--rpc", "127.0.0.1:50052"]
    want = EngineConfig(model_path=model_path, n_threads=1, type_k="q8_0", type_v="q4_0", flash_attn=True,
                        scoring=Sketch(rank=8, basis="pca", scores="keydiff"), capture_layers=(2, 6),
                        prefill_chunk=128, chunked_prefill=True, position_limit=4096,
                        devices=Devices(n_gpu_layers=-1, main_gpu=1, tensor_split=(1.0, 3.0),
                                        rpc_servers=("127.0.0.1:50052",)))
    return argv, want


def test_the_command_line_exercises_every_engine_setting(model_path):
    """A setting added to EngineConfig (or Devices) must join _every_engine_flag, so the tests below cover it."""
    _, want = _every_engine_flag(str(model_path))
    for obj, default in ((want, EngineConfig()), (want.devices, Devices())):
        same = [f.name for f in dataclasses.fields(obj) if getattr(obj, f.name) == getattr(default, f.name)]
        assert same == [], f"settings left at their default, so no flag is checked for them: {same}"


def test_bench_takes_every_engine_flag(model_path):
    argv, want = _every_engine_flag(str(model_path))
    args = build_parser().parse_args(["bench", *argv, "--prompt-tokens", "128"])
    cfg = config_from_args(args)
    assert cfg.engine == want
    assert cfg.as_dict()["type_v"] == "q4_0" and cfg.as_dict()["rpc_servers"] == ("127.0.0.1:50052",)


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["serve"]])
def test_every_engine_command_takes_every_engine_flag(model_path, command):
    """generate, chat and serve read the engine flags from the same place as bench (scope_edge.flags)."""
    argv, want = _every_engine_flag(str(model_path))
    args = build_parser().parse_args([*command, *argv])
    assert engine_config(args) == want


# -- the speed protocol (scope_edge.protocol) and the scripts that run on it ------------------


def test_spread_is_median_and_min_max():
    assert spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "rounds": [3.0, 1.0, 2.0]}
    assert spread([1, 2, 3, 10])["median"] == 2.5  # even count: the mean of the middle two, not the mean
    with pytest.raises(ValueError, match="at least one value"):
        spread([])


def test_schedule_rotates_every_round():
    labels = ["stock", "none", "slide", "ideal"]
    order = schedule(labels, 3)
    assert order[0] == labels  # round 0 canonical: ours before its ideal
    assert [r[0] for r in order] == ["stock", "none", "slide"]  # none runs first in every round
    assert all(sorted(r) == sorted(labels) for r in order)  # every column once a round
    assert all(r.index("slide") < r.index("ideal") for r in order)  # rotation keeps ours before ideal for 3 rounds
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="rounds must be an int >= 1"):
            schedule(labels, bad)
    with pytest.raises(ValueError, match="distinct"):
        schedule(["a", "a"], 2)


def test_ratio_pairs_rounds():
    """Each ratio is the median of per-round ratios, not the ratio of medians."""
    runs = {"ours": [{"decode_tokens_per_s": v} for v in (30.0, 40.0, 60.0)],
            "stock": [{"decode_tokens_per_s": v} for v in (10.0, 40.0, 30.0)]}
    r = ratio(runs, "ours", "stock")
    assert r["rounds"] == [3.0, 1.0, 2.0] and (r["median"], r["min"], r["max"]) == (2.0, 1.0, 3.0)
    assert r["median"] != 40.0 / 30.0  # what the ratio of medians would give
    with pytest.raises(ValueError, match="not paired"):
        ratio({"ours": runs["ours"], "stock": runs["stock"][:2]}, "ours", "stock")


def test_run_rounds_interleaves_and_reads_the_load():
    calls = []

    def column(label):
        def run():
            calls.append(label)
            return {"decode_tokens_per_s": float(len(calls))}
        return run

    done = run_rounds({k: column(k) for k in ("a", "b", "c")}, 3)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert done["order"] == schedule(["a", "b", "c"], 3)
    assert [r["round"] for r in done["runs"]["a"]] == [0, 1, 2]
    assert [r["decode_tokens_per_s"] for r in done["runs"]["a"]] == [1.0, 6.0, 8.0]  # its call index each round
    assert set(done["load_1m"]) == {"before", "after"} and all(v >= 0 for v in done["load_1m"].values())


def test_ideal_fill_averages_the_level():
    fill, steps = ideal_fill(1536, 1400.0, 256)
    assert fill + steps <= 1536 and fill + steps / 2 == pytest.approx(1400, abs=1)
    fill, steps = ideal_fill(1536, 1000.0, 256)
    assert (fill, steps) == (872, 256)
    # a budget held full: the last 256 cells, all 256 steps (it once timed 2)
    assert ideal_fill(1536, 1535.6, 256) == (1280, 256)
    assert ideal_fill(512, 512.0, 16) == (496, 16)
    with pytest.raises(ValueError, match="level must be in"):
        ideal_fill(512, 600.0, 16)
    assert steady_level([(10, 100), (60, 300), (100, 500)], 100) == 400.0  # second half only
    with pytest.raises(ValueError, match="second half"):
        steady_level([(10, 100)], 100)


def test_threads_labels():
    assert Threads(decode=2, batch=2).label() == "2 threads"
    assert Threads(decode=1, batch=2).label() == "1 thread (2 for a batch)"


def test_headline_columns_and_labels(model_path):
    """The stock-at-default column appears only when stock's equal threads are not the library's default."""
    headline = load_script("headline")
    prompt = logbook_prompt(str(model_path), 128)
    budget = Budget(prefill=64, decode=32)
    default = Threads().resolved()
    for n_threads, want_default in ((None, False), (default[0] + 1, True)):
        engine = EngineConfig(model_path=str(model_path), n_threads=n_threads)
        cols = headline.columns(str(model_path), prompt, 8, budget=budget, strategies=["slide", "h2o"],
                                engine=engine, ideal_steps=4, kept={})
        want = ["stock", *(["stock, library default threads"] if want_default else []), "ours, no budget",
                "ours, slide 64/32", "ideal, slide", "ours, h2o 64/32", "ideal, h2o"]
        assert list(cols) == want


def test_headline_protocol_on_the_model(model_path):
    """Two rounds at a tiny size: every column once a round in the rotated order, the ideal at ours'
    cells and steady level, stock's greedy tokens those of ours with no budget, every ratio from the runs."""
    headline = load_script("headline")
    path = str(model_path)
    prompt = logbook_prompt(path, 400)
    budget = Budget(prefill=64, decode=32)
    engine = EngineConfig(model_path=path, prefill_chunk=64, n_threads=1)  # one thread: quick on a busy machine
    kept: dict = {}
    cols = headline.columns(path, prompt, 40, budget=budget, strategies=["slide"], engine=engine, ideal_steps=8,
                            kept=kept)
    cols.pop(headline.STOCK_DEFAULT, None)  # its label is test_headline_columns_and_labels'
    done = run_rounds(cols, 2)
    runs = done["runs"]
    assert done["order"][1] == list(cols)[1:] + list(cols)[:1]
    assert all([r["round"] for r in v] == [0, 1] for v in runs.values())
    o, i, s = runs["ours, slide 64/32"][0], runs["ideal, slide"][0], runs["stock"][0]
    assert i["n_ctx"] == o["kv_cells"] < s["n_ctx"] and i["level"] == o["steady_cells"]
    assert i["prefilled"] + i["steps"] / 2 == pytest.approx(o["steady_cells"], abs=1)
    assert 64 < o["steady_cells"] <= o["kv_cells"] and o["evicted_cells"] > 0
    assert kept["stock"] == kept["ours, no budget"]  # the same greedy run (EOG masked on both)
    assert len(kept["stock"]) == 40 and runs["ours, no budget"][0]["kv_cells"] == s["n_ctx"]
    q = headline.ratios(runs, ["slide"], budget)
    assert set(q) == {"ours, no budget / stock", "ours, slide 64/32 / stock", "ours, slide 64/32 / ideal, slide"}
    per_round = [a["decode_tokens_per_s"] / b["decode_tokens_per_s"] for a, b in
                 zip(runs["ours, slide 64/32"], runs["stock"])]
    assert q["ours, slide 64/32 / stock"]["rounds"] == per_round
    res = {"protocol": {"rounds": 2}, "config": {"prompt_tokens": 400, "max_tokens": 40, "prefill_budget": 64,
                                                 "decode_budget": 32, "type_k": "f16", "type_v": "f16"},
           "load_1m": done["load_1m"], "columns": {k: headline.column(k, v) for k, v in runs.items()}, "ratios": q}
    text = headline.table(res)
    assert "| ours, slide 64/32 |" in text and f"{o['kv_bytes'] / s['kv_bytes']:.1%}" in text
    assert "compares different work" not in text  # every column generated the 40 tokens asked
    json.dumps(res)


def test_headline_table_flags_a_column_that_stopped_short():
    """The goal run's no-budget column stops at the trained context (8,192 positions) while stock runs
    on: the table says so beside the ratios, from the runs' own token counts."""
    headline = load_script("headline")
    res = json.loads((RESULTS / "goal_4096_12288.json").read_text())
    made = res["columns"]["ours, no budget"]["runs"][0]["generated_tokens"]
    assert made < res["config"]["max_tokens"]
    assert headline.short_notes(res) == [
        f"\nours, no budget generated {made:,} of the {res['config']['max_tokens']:,} tokens asked (a cache "
        "without a budget stops at the model's trained context): its ratio to stock compares different work."]
    assert headline.short_notes(json.loads((RESULTS / "headline.json").read_text())) == []


def test_batched_stock_is_n_streams_of_our_cells(model_path):
    """Plain llama.cpp batched: n sequences x cells of KV, aggregate tok/s over n tokens a step; a
    sequence decoded alone gives stock's greedy tokens (same prompt, same cells)."""
    path = str(model_path)
    eog = eog_tokens(path)
    prompts = [logbook_prompt(path, 100, seed=s) for s in (0, 1)]
    res = batched_stock(path, prompts, 8, cells=256, eog=eog, threads=Threads(decode=1, batch=1))
    alone = stock_greedy(path, prompts[0], 8, eog=eog, n_ctx=256, threads=Threads(decode=1, batch=1))
    assert res["kv_bytes"] == 2 * alone["kv_bytes"] and res["sequences"] == 2 and res["prefilled"] == [100, 100]
    assert res["decode_tokens_per_s"] > 0 and [len(t) for t in res["tokens"]] == [8, 8]
    one = batched_stock(path, prompts[:1], 8, cells=256, eog=eog, threads=Threads(decode=1, batch=1))
    assert one["tokens"][0] == alone["tokens"]
    with pytest.raises(ValueError, match="exceed 256 cells"):
        batched_stock(path, prompts, 200, cells=256, eog=eog)


def test_server_ratios_and_kv():
    """bench/server.py's arithmetic on made-up rounds: stock over its first N requests, ratios paired by
    round, KV against one context held, N at once and the batched streams, the targets."""
    server = load_script("server")
    stock = [{"kv_bytes": 100, "requests": [{"prefill_s": 1.0, "decode_s": d} for d in ds]} for ds in ((9.0, 27.0),
                                                                                                        (18.0, 18.0))]
    runs = {server.EQUAL: stock,
            server.ours_label(2): [{"decode_tokens_per_s": v, "end_to_end_tokens_per_s": v / 2, "kv_bytes": 60}
                                   for v in (4.0, 3.0)],
            server.batched_label(2): [{"decode_tokens_per_s": v, "kv_bytes": 80} for v in (4.0, 4.0)]}
    r = server.per_conversations(runs, 2, 10)  # 2 x 9 tokens over 36 s of decode: 0.5 tok/s in both rounds
    assert r[server.EQUAL]["decode_tokens_per_s"]["rounds"] == [0.5, 0.5]
    assert server.first_n(stock[0], 1, 10)["decode_tokens_per_s"] == 1.0
    assert r["ratios"][f"ours / {server.EQUAL}"]["rounds"] == [8.0, 6.0]
    assert r["ratios"]["ours / llama.cpp batched, 2"]["rounds"] == [1.0, 0.75]
    assert r["kv"] == {"ours": 60, "stock_held": 100, "stock_at_once": 200, "batched": 80, "ours / stock_held": 0.6,
                       "ours / stock_at_once": 0.3, "ours / batched": 0.75}
    assert r["targets"] == {"ours >= 0.9x batched llama.cpp": False, "ours >= 2x stock in turn at equal threads": True}


# -- the other speed scripts on the protocol, each at a smoke size ---------------------------------------------------
def check_protocol_run(res: dict, rounds: int, want: list[str]) -> None:
    """Every column once a round in the rotated order, the load read, every ratio the median of its
    per-round ratios, each budgeted ours' ideal at ours' allocated cells and steady level."""
    cols = res["columns"]
    assert list(cols) == want
    assert res["order"] == schedule(want, rounds) and set(res["load_1m"]) == {"before", "after"}
    for label, col in cols.items():
        assert [r["round"] for r in col["runs"]] == list(range(rounds)), label
        assert col["summary"]["decode_tokens_per_s"]["median"] > 0, label
    for name, r in res["ratios"].items():
        num, den = name.split(" / ")
        assert r["rounds"] == [a["decode_tokens_per_s"] / b["decode_tokens_per_s"]
                               for a, b in zip(cols[num]["runs"], cols[den]["runs"])], name
    for label in want:
        if label.startswith("ideal, "):
            o, i = cols["ours, " + label.removeprefix("ideal, ")]["runs"][-1], cols[label]["runs"][-1]
            assert i["n_ctx"] == o["kv_cells"] and i["level"] == o["steady_cells"]
    json.dumps(res)


def _smoke(name: str, argv: list[str]) -> tuple[object, dict]:
    script = load_script(name)
    res = script.run(script.parser().parse_args(argv))
    return script, res


THREADS = ["--threads", "1"]  # one thread: quick on a busy machine; stock also at the library default (labelled)
DEFAULT = "stock, library default threads"


def with_default(labels: list[str]) -> list[str]:
    """Stock's library-default column follows stock when one thread is not the library's default."""
    return labels[:1] + [DEFAULT] + labels[1:] if Threads().resolved() != (1, 1) else labels


def test_speed_script_on_the_protocol():
    script, res = _smoke("speed", ["--contexts", "128", "--steps", "8", "--prefill-budget", "64", "--decode-budget",
                                   "16", "--rounds", "2", "--hook-cached", *THREADS])
    (row,) = res["rows"]
    want = with_default(["stock", "ours, no budget", "ours, slide 64/16", "ideal, slide 64/16"])
    check_protocol_run(row, 2, want)
    assert all(r["timed_steps"] == 8 for c in row["columns"].values() if not c.get("level") for r in c["runs"])
    text = script.table(res)
    assert all(f"| {label} |" in text for label in want) and "context 128" in text


def test_beyond_script_on_the_protocol():
    script, res = _smoke("beyond", ["--prompt-tokens", "128", "--max-tokens", "24", "--prefill-budget", "64",
                                    "--decode-budget", "16", "--rounds", "2", "--ideal-steps", "8", "--skip-chunking",
                                    *THREADS])
    t = res["targets"]
    want = with_default(["stock", "stock, K q8_0", "ours, no budget", "ours, slide 64/16 K f16",
                          "ideal, slide 64/16 K f16", "ours, slide 64/16 K q8_0", "ideal, slide 64/16 K q8_0"])
    check_protocol_run(t, 2, want)
    cols = t["columns"]
    assert cols["stock, K q8_0"]["kv_bytes"] < cols["stock"]["kv_bytes"]  # equal K types: q8_0 is smaller
    assert "ours, slide 64/16 K q8_0 / stock, K q8_0" in t["ratios"]
    assert t["kv_vs_stock_f16"]["ours, slide 64/16 K f16"] == cols["ours, slide 64/16 K f16"]["kv_bytes"] / \
        cols["stock"]["kv_bytes"]
    assert "| ours, slide 64/16 K q8_0 |" in script.table(res)


def test_flash_script_on_the_protocol(tmp_path):
    script, res = _smoke("flash", ["--prompt", "128", "--tokens", "24", "--timed", "8", "--prefill-budget", "64",
                                   "--decode-budget", "16", "--rank", "8", "--rounds", "1", "--skip-device",
                                   "--skip-memory", "--out", str(tmp_path / "flash.json"), *THREADS])
    cpu = res["cpu"]
    want = with_default(["stock", "stock, fa on", "stock, fa on q8_0", "ours, no budget", "ours, exact fa off",
                          "ideal, exact fa off", "ours, sketch fa off", "ours, sketch fa on", "ideal, sketch fa on",
                          "ours, sketch fa on q8_0", "ideal, sketch fa on q8_0"])
    check_protocol_run(cpu, 1, want)  # one round: each sketched ScopeLlama takes seconds to set up
    assert set(script.RATIOS) <= set(cpu["ratios"])
    assert all(r["timed_steps"] == 8 for c in cpu["columns"].values() if not c.get("level") for r in c["runs"])
    assert "| ours, sketch fa on q8_0 |" in script.table(res)


def test_long_run_script_on_the_protocol():
    script, res = _smoke("long_run", ["--tokens", "48", "--window", "16", "--prompt", "128", "--prefill-budget",
                                      "64", "--decode-budget", "16", "--rounds", "2", "--stock-tokens", "16",
                                      "--ideal-steps", "8", *THREADS])
    want = with_default(["stock", "ours, no budget", "ours, slide 64/16", "ideal, slide 64/16"])
    check_protocol_run(res, 2, want)
    windows = res["columns"][res["long"]]["runs"][0]["windows"]
    assert [w["tokens"] for w in windows] == [16, 32, 48] and all(w["cells_held"] <= w["cells_allocated"]
                                                                 for w in windows)
    assert res["last_over_first"]["rounds"] == [r["summary"]["tokens_per_s_last_over_first"]
                                                for r in res["columns"][res["long"]]["runs"]]
    assert "re-indexings" in script.table(res)


def test_one_slot_script_times_both_drivers(tmp_path):
    out = tmp_path / "one_slot.json"
    cmd = [sys.executable, str(BENCH / "one_slot.py"), "--prompt", "128", "--tokens", "16",
           "--prefill-budget", "64", "--decode-budget", "16", "--rounds", "1", "--out", str(out)]
    subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    res = json.loads(out.read_text())
    facade, one = (res["runs"][k][0]["decode_tokens_per_s"] for k in ("facade (ScopeLlama)", "one slot (BatchRunner)"))
    assert facade > 0 and one > 0
    assert res["one slot / facade"]["median"] == pytest.approx(one / facade)


def test_compare_places_a_rerun_against_the_stored_spread(tmp_path):
    """bench/compare.py: a re-run identical to the stored file is within; one
    ratio moved past the stored max is outside (and --strict exits 1); a
    server re-run with more conversation counts is matched by its count."""
    compare = load_script("compare")
    results = RESULTS
    headline = json.loads((results / "headline.json").read_text())
    server = json.loads((results / "server.json").read_text())
    (tmp_path / "headline.json").write_text(json.dumps(headline))
    extra = copy.deepcopy(server["runs"][-1]) | {"conversations": 99}
    (tmp_path / "server.json").write_text(json.dumps(server | {"runs": [extra, *server["runs"]]}))
    rows, hosts = compare.run(compare.parser().parse_args([str(tmp_path)]))
    stock_in_turn = extra["stock in turn, equal threads"]["decode_tokens_per_s"]["median"]
    assert hosts == {"headline.json": (compare.stock_speed(headline),) * 2,
                     "server.json": (compare.stock_speed(server), stock_in_turn)}
    assert {r.file for r in rows} == {"headline.json", "server.json"}
    assert len(rows) == len(headline["ratios"]) + len(server["runs"][-1]["ratios"])
    assert all(r.verdict == "within" for r in rows)

    name = "ours, slide 1024/512 / stock"
    top = headline["ratios"][name]["max"]
    headline["ratios"][name].update(median=top * 1.2, min=top * 1.1, max=top * 1.3)
    (tmp_path / "headline.json").write_text(json.dumps(headline))
    cmd = [sys.executable, str(BENCH / "compare.py"), str(tmp_path), "--files", "headline.json", "--strict"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"| headline.json | {name} |" in done.stdout and "| outside |" in done.stdout
    missing = subprocess.run([*cmd[:3], "--files", "goal_4096_12288.json"], capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "no goal_4096_12288.json in" in missing.stderr


def test_run_all_writes_every_result_into_the_folder_asked(tmp_path):
    """run_all.py --results DIR: every run's files go to DIR (a re-run to
    compare with bench/compare.py leaves the stored files alone)."""
    run_all = load_script("run_all")
    stored = str(RESULTS)
    for quick in (False, True):
        seen: set[str] = set()
        for i, (script, full, small) in enumerate(run_all.RUNS):
            extra = run_all.arguments(script, small if quick else full, tmp_path, quick=quick,
                                      first=script not in seen, index=i)
            seen.add(script)
            assert any(a.startswith(str(tmp_path)) for a in extra), (script, extra)
            assert not any("RESULTS" in a or a.startswith(stored) for a in extra), (script, extra)


def test_run_all_only_selects_result_files_and_scripts():
    """--only NAME: the runs writing that result file, or every run of a
    script; an unknown name is refused with the names there are."""
    run_all = load_script("run_all")
    assert [(s, run_all.result_name(s, a)) for s, a, _ in run_all.selected(["fidelity_long", "tasks"])] == [
        ("fidelity.py", "fidelity_long"), ("tasks.py", "tasks")]
    server = run_all.selected(["server.py"])
    assert len(server) == 3 and {s for s, _, _ in server} == {"server.py"}
    assert run_all.selected(None) == run_all.RUNS
    with pytest.raises(SystemExit, match="--only fidelity_lend: no such result file or script; choose from"):
        run_all.selected(["fidelity_lend"])


def test_report_labels_memory_by_allocated_bytes():
    """RESULTS.md renders every stored file it reads, and no table has a
    bare "memory" column: KV is bytes llama.cpp allocated over stock's, cells
    held say so (issue #29)."""
    done = subprocess.run([sys.executable, str(BENCH / "report.py")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    headers = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert not [h for h in headers if "| memory |" in h], "a column labelled memory"
    fidelity = json.loads((RESULTS / "fidelity.json").read_text())
    kv = max(r["ratios"]["kv_bytes"] for r in fidelity["sweep"]
             if (r["config"]["prefill_budget"], r["config"]["decode_budget"]) == (96, 64))
    assert f"| 96:64 | {kv:.1%} |" in text
