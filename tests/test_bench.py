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
                              config_from_args, logbook_prompt, run_bench, run_many, run_stock, save_results,
                              vocabulary)
from scope_edge.policies import build

BENCH = Path(__file__).resolve().parents[1] / "bench"

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
    stock = run_stock(path, prompt, 6, "f16", keep_logits=True)
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


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


def test_fidelity_variants_evict(model_path):
    """bench/fidelity.py's scoring variants are real prefill selections: each
    keeps the prefill budget (a SnapKV without budget= keeps every cell)."""
    fidelity = _script("fidelity")
    for v in fidelity.VARIANTS:
        policy = fidelity.variant_policy(v, 96, 64)
        assert policy.prefill_keep(300) == 96, v.name
    upper = next(v for v in fidelity.VARIANTS if v.first_layer)
    prompt = logbook_prompt(str(model_path), 300)
    with fidelity.variant_llm(str(model_path), upper, 96, 64) as llm:
        assert isinstance(llm.policy.prefill, fidelity.LayerSnapKV)
        stats = llm.generate(prompt, max_tokens=8, ignore_eos=True).stats
    assert stats.evicted_cells >= 300 - 96


def test_lookback_keeps_every_key_token_of_an_ordered_prompt(model_path):
    """bench/ordered.py's prompt at 2x the prefill budget (a 2x prompt of the
    suite): after the prefill selection SnapKV's default window still holds
    every item's "name: quantity" tokens, where the paper's centred window
    of 7 loses some (a quantity's second digit, mostly): issue #17."""
    ordered = _script("ordered")
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
    fidelity = _script("fidelity")
    rows = [{"config": {"prefill_budget": 96, "decode_budget": 64, "strategy": "slide", "lend": "passed",
                        "prompt_seed": seed}, "fidelity": {"top1_agreement": top1, "mean_kl": kl}}
            for seed, top1, kl in ((0, 0.5, 1.0), (1, 0.75, 0.5), (2, 1.0, 0.0))]
    (m,) = fidelity.means(rows)
    assert m["prompts"] == 3 and m["budget"] == "96:64" and m["scoring"] == "exact"
    assert (m["top1_agreement"], m["top1_min"], m["top1_max"], m["mean_kl"]) == (0.75, 0.5, 1.0, 0.5)


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
