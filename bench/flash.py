"""Flash attention on, scores from key sketches (issue #18): speed and memory.

    python bench/flash.py [--prompt 2048] [--tokens 1024] [--timed 512] \
        [--prefill-budget 1024] [--decode-budget 512] [--rank 16] [--rounds 3] [--threads N] \
        [--skip-speed] [--skip-device] [--skip-memory] [--json]

speed    Under the speed protocol (scope_edge.protocol): every column once a
         round, --rounds interleaved rounds, the 1-minute load read before
         and after; every column generates T greedy tokens after the same
         P-token prompt with end-of-generation tokens masked (stock in the
         protocol's plain loop, StockSteps; ours with ignore-EOS), at ours'
         threads, timed over the last `timed` steps (ours' decode cache full:
         a selection and an eviction every step):
           stock with flash attention off (K and V f16; also at
           llama-cpp-python's default threads, labelled, when those differ),
           on (f16), on with K and V q8_0;
           ours with no budget (flash attention off);
           ours under the budgets (slide), exact scores with flash attention
           off (today's path), sketch scores with it off, on (f16), on (q8_0);
           the ideal of exact-off, sketch-on and sketch-on-q8_0: stock at the
           same K/V types and kernel in a context of ours' allocated cells,
           filled to the level ours held.
         The issue's target: sketch with flash attention on >= exact with it off.
         On the CPU, then with every layer on an RPC device on 127.0.0.1.
memory   prompt 4096 + 4096 with K and V q8_0 and flash attention on: the KV
         bytes allocated plus the sketches' bytes (cells x bytes per cell),
         against stock's f16 cache for 8192 tokens, at several budgets.
Writes bench/results/flash.json and prints tables.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from scope_edge import Budget, ScopeLlama, Sketch, memory, models, rpc
from scope_edge.bench import eog_tokens, logbook_prompt, machine, save_results
from scope_edge.bench.columns import (NONE, Columns, columns_table, header, ratios_table, report,
                                      standard_ratios)
from scope_edge.protocol import Cache, run_rounds

log = logging.getLogger("bench.flash")
RESULTS = Path(__file__).resolve().parent / "results"

# stock's caches by label suffix ("stock" + suffix)
STOCK = {"": Cache(), ", fa on": Cache(flash_attn=True),
         ", fa on q8_0": Cache(type_k="q8_0", type_v="q8_0", flash_attn=True)}
# the ratios beyond every ours over stock and over its ideal: (numerator, denominator) columns
PAIRS = [("ours, sketch fa on", "ours, exact fa off"), ("ours, sketch fa on q8_0", "ours, exact fa off"),
         ("ours, sketch fa off", "ours, exact fa off"), ("stock, fa on", "stock"),
         ("ours, sketch fa on", "stock, fa on"), ("ours, sketch fa on q8_0", "stock, fa on q8_0")]
RATIOS = {f"{num} / {den}": (num, den) for num, den in PAIRS}


def ours_runs(rank: int) -> dict[str, tuple[dict, Cache | None]]:
    """label: (ScopeLlama options, the ideal's cache or None for no ideal)."""
    sketch = Sketch(rank=rank)
    q8 = dict(type_k="q8_0", type_v="q8_0")
    return {"ours, exact fa off": ({}, Cache()),
            "ours, sketch fa off": (dict(scoring=sketch), None),
            "ours, sketch fa on": (dict(scoring=sketch, flash_attn=True), Cache(flash_attn=True)),
            "ours, sketch fa on q8_0": (dict(scoring=sketch, flash_attn=True, **q8), Cache(flash_attn=True, **q8))}


def speed_columns(path: str, args: argparse.Namespace, **device: object) -> Columns:
    prompt = logbook_prompt(path, args.prompt)
    budget = Budget(prefill=args.prefill_budget, decode=args.decode_budget)
    n_gpu = int(device.get("n_gpu_layers", 0))  # type: ignore[call-overload]
    cols = Columns(path, prompt, args.tokens, eog=eog_tokens(path), n_threads=args.threads, timed=args.timed,
                   ideal_steps=args.timed, n_gpu_layers=n_gpu)
    for suffix, cache in STOCK.items():
        cols.stock(cache, suffix, library_default=not suffix)
    cols.ours(NONE, lambda: ScopeLlama(path, budget=None, n_threads=args.threads, **device))
    for label, (options, ideal_cache) in ours_runs(args.rank).items():
        cols.ours(label, lambda o=options: ScopeLlama(path, budget=budget, strategy="slide", n_threads=args.threads,
                                                      **o, **device), ideal_cache=ideal_cache)
    return cols


def speed(path: str, args: argparse.Namespace, **device: object) -> dict:
    cols = speed_columns(path, args, **device)
    done = run_rounds(cols.cols, args.rounds)
    return {"threads": list(cols.equal.resolved()), **report(done, {**standard_ratios(list(cols.cols)), **RATIOS})}


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
    s = res["settings"]
    for where in ("cpu", "device"):
        if where in res:
            r = res[where]
            lines += [f"{where}: prompt {s['prompt']} + {s['tokens']}, decode timed over the last {s['timed']}; "
                      f"{header(s['rounds'], r['load_1m'])}", "", *columns_table(r["columns"]), "",
                      *ratios_table(r["ratios"]), ""]
    for r in res.get("memory", []):
        lines.append(f"4096+4096 {r['prefill_budget']}:{r['decode_budget']} chunk {r.get('prefill_chunk', 512)} "
                     f"rank {r['rank']}: {r['cells']} cells, "
                     f"KV {r['kv_ratio']:.1%}, with sketches {r['total_ratio']:.1%} of stock f16")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--timed", type=int, default=512)
    ap.add_argument("--prefill-budget", type=int, default=1024)
    ap.add_argument("--decode-budget", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16, help="the sketches' rank in the speed runs")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 24, 32], help="sketch ranks in the memory rows")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every column")
    ap.add_argument("--threads", type=int, default=None, help="decode threads of ours and of stock (default: "
                    "llama-cpp-python's, half the CPUs)")
    ap.add_argument("--server-threads", type=int, default=1)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-device", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "flash.json"))
    ap.add_argument("--json", action="store_true")
    return ap


def run(args: argparse.Namespace) -> dict:
    """Every part asked for; each lands in args.out as it ends (args.out None: no file)."""
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
    return res


def main() -> None:
    args = parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    save_results(args.out, run(args), print_json=args.json, table=table)


if __name__ == "__main__":
    main()
