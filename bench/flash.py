"""Flash attention on, scores from key sketches (issue #18): speed and memory.

    python bench/flash.py [--prompt 2048] [--tokens 1024] [--timed 512] \
        [--prefill-budget 1024] [--decode-budget 512] [--rank 16] [--skip-speed] \
        [--skip-device] [--skip-memory] [--json]

speed    prompt P + T generated (greedy, end-of-generation ignored), slide
         under the budgets, decode tok/s over the last `timed` steps (the
         decode cache full: a selection and an eviction every step), same run:
           stock, flash attention off / on (K and V f16), on with K and V q8_0;
           ours, exact scores with flash attention off (today's path);
           ours, sketch scores with flash attention off / on (f16), on (q8_0).
         The issue's target: sketch with flash attention on >= exact with it off.
         On the CPU, then with every layer on an RPC device on 127.0.0.1.
memory   prompt 4096 + 4096 with K and V q8_0 and flash attention on: the KV
         bytes allocated plus the sketches' bytes (cells x bytes per cell),
         against stock's f16 cache for 8192 tokens, at several budgets.
Writes bench/results/flash.json; ratios only (the machine is shared).
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import llama_cpp
import numpy as np

from device import time_ours
from scope_edge import Budget, ScopeLlama, Sketch, memory, models, rpc
from scope_edge.bench import eog_tokens, logbook_prompt, machine, save_results
from scope_edge.runtime.context import KV_TYPES

log = logging.getLogger("bench.flash")
RESULTS = Path(__file__).resolve().parent / "results"

STOCK = {"stock fa off": dict(flash_attn=False, type_kv="f16"),
         "stock fa on": dict(flash_attn=True, type_kv="f16"),
         "stock fa on q8_0": dict(flash_attn=True, type_kv="q8_0")}


def ours_runs(rank: int) -> dict[str, dict]:
    sketch = Sketch(rank=rank)
    return {"exact fa off": {},
            "sketch fa off": dict(scoring=sketch),
            "sketch fa on": dict(scoring=sketch, flash_attn=True),
            "sketch fa on q8_0": dict(scoring=sketch, flash_attn=True, type_k="q8_0", type_v="q8_0")}


def time_stock(path: str, prompt: list[int], *, max_tokens: int, timed: int, flash_attn: bool, type_kv: str,
               n_gpu_layers: int = 0) -> dict:
    """Stock llama_cpp.Llama (n_ctx = prompt + max_tokens): decode tok/s over the last `timed` greedy steps."""
    llm = llama_cpp.Llama(path, n_ctx=len(prompt) + max_tokens, flash_attn=flash_attn, type_k=KV_TYPES[type_kv],
                          type_v=KV_TYPES[type_kv], n_gpu_layers=n_gpu_layers, verbose=False)
    eog = eog_tokens(path)  # masked, as ours ignores end-of-generation: both decode every step
    try:
        llm.eval(prompt)
        stamps = []
        for _ in range(max_tokens - 1):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
            logits[eog] = -np.inf
            llm.eval([int(logits.argmax())])
            stamps.append(time.perf_counter())
        tail = stamps[-timed - 1:]
        return {"decode_tokens_per_s": (len(tail) - 1) / (tail[-1] - tail[0])}
    finally:
        llm.close()


def speed(path: str, args: argparse.Namespace, **device: object) -> dict:
    prompt = logbook_prompt(path, args.prompt)
    budget = Budget(prefill=args.prefill_budget, decode=args.decode_budget)
    n_gpu = int(device.get("n_gpu_layers", 0))  # type: ignore[call-overload]
    runs: dict[str, dict] = {}
    for name, kw in STOCK.items():
        runs[name] = time_stock(path, prompt, max_tokens=args.tokens, timed=args.timed, n_gpu_layers=n_gpu, **kw)
        log.info("%s: %.1f tok/s", name, runs[name]["decode_tokens_per_s"])
    for name, kw in ours_runs(args.rank).items():
        runs[name] = time_ours(path, prompt, max_tokens=args.tokens, timed=args.timed, budget=budget, **kw,
                               **device)
        log.info("%s: %.1f tok/s", name, runs[name]["decode_tokens_per_s"])
    tps = {k: v["decode_tokens_per_s"] for k, v in runs.items()}
    return {"runs": runs, "ratios": {
        "sketch fa on / exact fa off": tps["sketch fa on"] / tps["exact fa off"],
        "sketch fa on q8_0 / exact fa off": tps["sketch fa on q8_0"] / tps["exact fa off"],
        "sketch fa off / exact fa off": tps["sketch fa off"] / tps["exact fa off"],
        "stock fa on / stock fa off": tps["stock fa on"] / tps["stock fa off"],
        "sketch fa on / stock fa on": tps["sketch fa on"] / tps["stock fa on"],
        "exact fa off / stock fa off": tps["exact fa off"] / tps["stock fa off"],
        "sketch fa on q8_0 / stock fa on q8_0": tps["sketch fa on q8_0"] / tps["stock fa on q8_0"],
    }}


# (prefill budget, decode budget, prefill chunk): the chunked prefill's peak
# (kept prompt + a chunk) sets the allocation when it passes the decode phase's.
MEMORY_BUDGETS = [(1024, 512, 512), (1024, 256, 512), (768, 256, 512), (768, 256, 256)]


def memory_rows(path: str, ranks: list[int], budgets: list[tuple[int, int, int]]) -> list[dict]:
    """4096 + 4096, K and V q8_0, flash attention on: the allocation of a real
    start (the context exists once the first token streams), sketches at their size."""
    prompt = logbook_prompt(path, 4096)
    geometry = memory.read_geometry(path)
    stock = memory.kv_bytes(geometry, 8192, "f16", "f16")
    rows = []
    for prefill, decode, chunk in budgets:
        for rank in ranks:
            with ScopeLlama(path, budget=Budget(prefill=prefill, decode=decode), flash_attn=True, type_k="q8_0",
                            type_v="q8_0", scoring=Sketch(rank=rank), prefill_chunk=chunk) as llm:
                stream = llm.stream(prompt, max_tokens=4096, ignore_eos=True)
                next(stream)
                stream.close()
                assert llm.sketch is not None
                cells = llm.n_ctx
                kv, sketches = memory.kv_bytes(geometry, cells, "q8_0", "q8_0"), cells * llm.sketch.bytes_per_cell
            rows.append({"prefill_budget": prefill, "decode_budget": decode, "prefill_chunk": chunk, "rank": rank,
                         "cells": cells,
                         "kv_bytes": kv, "sketch_bytes": sketches, "stock_f16_bytes": stock,
                         "kv_ratio": kv / stock, "total_ratio": (kv + sketches) / stock})
            log.info("%d:%d chunk %d rank %d: KV %.1f%%, with sketches %.1f%% of stock f16", prefill, decode,
                     chunk, rank, 100 * kv / stock, 100 * (kv + sketches) / stock)
    return rows


def table(res: dict) -> str:
    lines = []
    for where in ("cpu", "device"):
        if where in res:
            lines.append(f"{where}: " + ", ".join(f"{k} {v['decode_tokens_per_s']:.1f}"
                                                   for k, v in res[where]["runs"].items()))
            lines += [f"  {k}: {v:.2f}x" for k, v in res[where]["ratios"].items()]
    for r in res.get("memory", []):
        lines.append(f"4096+4096 {r['prefill_budget']}:{r['decode_budget']} chunk {r.get('prefill_chunk', 512)} "
                     f"rank {r['rank']}: {r['cells']} cells, "
                     f"KV {r['kv_ratio']:.1%}, with sketches {r['total_ratio']:.1%} of stock f16")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--timed", type=int, default=512)
    ap.add_argument("--prefill-budget", type=int, default=1024)
    ap.add_argument("--decode-budget", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16, help="the sketches' rank in the speed runs")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 24, 32], help="sketch ranks in the memory rows")
    ap.add_argument("--server-threads", type=int, default=1)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-device", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "flash.json"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    path = str(models.fetch())
    res: dict = {"machine": machine(), "settings": vars(args)}
    if not args.skip_speed:
        res["cpu"] = speed(path, args)
        save_results(args.out, res)  # each part lands as it ends
    if not args.skip_memory:
        res["memory"] = memory_rows(path, args.ranks, MEMORY_BUDGETS)
        save_results(args.out, res)
    if not args.skip_device:  # last: a registered RPC server stays in llama.cpp's device list after it stops
        with rpc.Server(rpc.free_endpoint(), n_threads=args.server_threads) as server:
            rpc.register(server.endpoint)  # stock llama_cpp.Llama offloads to it too
            res["device"] = speed(path, args, rpc_servers=[server.endpoint], n_gpu_layers=-1)
    save_results(args.out, res, print_json=args.json, table=table)


if __name__ == "__main__":
    main()
