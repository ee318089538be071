"""Decode speed of the native hook against stock llama-cpp-python, same run.

    python bench/hook_overhead.py [--cached 2048 7000] [--steps 64] [--repeats 3] [--json]

For each cached-context length it prefills the same random tokens and then
times `steps` single-token decodes, in four set-ups that alternate within
each repeat (the machine is shared, so only same-run ratios mean anything):
  stock    llama_cpp.Llama.eval, no callback
  bare     our decode driver, no callback installed (isolates Python overhead)
  hook     our hook installed, no capture (maps cells, reads the mask)
  capture  our hook capturing kq_soft_max of every layer on every step
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import llama_cpp
import numpy as np

from scope_edge import ScopeLlama, models

log = logging.getLogger("bench.hook_overhead")
N_CTX = 8192


def _tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.RandomState(seed).randint(100, 40000, size=n).tolist()


def time_stock(path: str, prompt: list[int], steps: list[int]) -> float:
    llm = llama_cpp.Llama(path, n_ctx=N_CTX, verbose=False)
    try:
        llm.eval(prompt)
        t0 = time.perf_counter()
        for tok in steps:
            llm.eval([tok])
        return len(steps) / (time.perf_counter() - t0)
    finally:
        llm.close()


def time_ours(path: str, prompt: list[int], steps: list[int], mode: str) -> float:
    with ScopeLlama(path, n_ctx=N_CTX) as llm:
        ctx = llm._ctx
        if mode == "bare":  # same driver, llama.cpp without our callback
            llama_cpp.llama_free(ctx.ptr)
            params = llama_cpp.llama_context_default_params()
            params.n_ctx, params.n_batch, params.n_ubatch = N_CTX, 512, 512
            params.n_threads, params.n_threads_batch = llm._n_threads, llm._n_threads_batch
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            ctx.ptr = llama_cpp.llama_init_from_model(llm._model.ptr, params)
            ctx.hook.begin = ctx.hook.end = lambda *a: None  # nothing to bracket
        for i in range(0, len(prompt), 512):
            chunk = prompt[i : i + 512]
            ctx.decode(chunk, range(i, i + len(chunk)), want_logits=True)
        pos = len(prompt)
        t0 = time.perf_counter()
        for tok in steps:
            if mode == "capture":
                ctx.hook.arm(pos)
            ctx.decode([tok], [pos], want_logits=True)
            if mode == "capture":
                ctx.hook.capture()
            ctx.logits()
            pos += 1
        rate = len(steps) / (time.perf_counter() - t0)
        if mode == "capture":
            ctx.hook.arm(None)
        return rate


def run(cached: list[int], n_steps: int, repeats: int) -> dict:
    path = str(models.fetch())
    out: dict = {"n_ctx": N_CTX, "steps": n_steps, "repeats": repeats, "results": {}}
    for n in cached:
        prompt, steps = _tokens(n), _tokens(n_steps, seed=1)
        rates: dict[str, list[float]] = {m: [] for m in ("stock", "bare", "hook", "capture")}
        for r in range(repeats):
            for mode in rates:
                rate = time_stock(path, prompt, steps) if mode == "stock" else time_ours(path, prompt, steps, mode)
                rates[mode].append(rate)
                log.info("cached=%d repeat=%d %s: %.1f tok/s", n, r, mode, rate)
        med = {m: statistics.median(v) for m, v in rates.items()}
        out["results"][str(n)] = {
            "decode_tokens_per_s": med,
            "all": rates,
            "hook_vs_stock": med["hook"] / med["stock"],
            "capture_vs_stock": med["capture"] / med["stock"],
            "hook_vs_bare": med["hook"] / med["bare"],
            "capture_vs_bare": med["capture"] / med["bare"],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cached", type=int, nargs="+", default=[2048, 7000])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res = run(args.cached, args.steps, args.repeats)
    if args.json:
        print(json.dumps(res))
        return
    print(f"{'cached':>7} {'stock':>7} {'bare':>7} {'hook':>7} {'capture':>8} {'hook/stock':>10} {'capt/stock':>10}")
    for n, r in res["results"].items():
        d = r["decode_tokens_per_s"]
        print(f"{n:>7} {d['stock']:7.1f} {d['bare']:7.1f} {d['hook']:7.1f} {d['capture']:8.1f} "
              f"{r['hook_vs_stock']:10.3f} {r['capture_vs_stock']:10.3f}")


if __name__ == "__main__":
    main()
