"""scope_edge.bench on a tiny configuration: keys, arithmetic, CLI JSON line.
No timing assertions (the machine is shared)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from scope_edge import ScopeLlama
from scope_edge.bench import BenchConfig, free_running, logbook_prompt, run_bench, run_stock

TINY = dict(prompt_tokens=300, max_tokens=64, prefill_budget=128, decode_budget=64, prefill_chunk=128, ideal_steps=16)


@pytest.fixture(scope="module")
def result(model_path):
    return run_bench(BenchConfig(model=str(model_path), **TINY), progress=False)


def test_keys_and_arithmetic(result):
    for part in ("stock", "ours", "ideal"):
        for key in ("decode_tokens_per_s",):
            assert result[part][key] > 0
    for part in ("stock", "ours"):
        assert result[part]["kv_bytes"] > 0 and result[part]["prefill_tokens_per_s"] > 0
    assert result["ours"]["kv_bytes"] < result["stock"]["kv_bytes"]
    assert result["ideal"]["n_ctx"] == result["ours"]["kv_cells"]
    f = result["fidelity"]
    assert f["steps"] == 64
    assert 0.0 <= f["top1_agreement"] <= 1.0
    assert 0.0 <= f["mean_kl"] <= f["max_kl"]
    assert f["reference_consistency"] == 1.0
    assert 0 <= f["identical_prefix"] <= 64 and 0.0 <= f["rouge_l"] <= 1.0
    assert result["config"]["strategy"] == "slide"
    json.dumps(result)  # JSON-able


def test_stock_logits_are_the_full_cache_logits(model_path):
    """The lockstep's default reference (kept stock logits) equals
    ScopeLlama(budget=None) teacher-forced on the same tokens."""
    path = str(model_path)
    prompt = logbook_prompt(path, 200)
    stock = run_stock(path, prompt, 6, "f16", keep_logits=True)
    with ScopeLlama(path) as llm:
        ours = np.stack(list(llm.teacher_force(prompt, stock.tokens)))
    np.testing.assert_allclose(ours, stock.logits, atol=1e-3)


def test_free_running_scores():
    assert free_running([1, 2, 3, 4], [1, 2, 3, 4]) == {"identical_prefix": 4, "rouge_l": 1.0}
    r = free_running([1, 2, 3, 4], [1, 9, 3, 4])
    assert r["identical_prefix"] == 1 and r["rouge_l"] == pytest.approx(0.75)


def test_bad_config_names_the_numbers():
    with pytest.raises(ValueError, match="prompt_tokens must be an int >= 1, got 0"):
        BenchConfig(prompt_tokens=0)
    with pytest.raises(ValueError, match="unknown strategy"):
        BenchConfig(strategy="nope")


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
