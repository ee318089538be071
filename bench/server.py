"""Serving several long conversations at once: aggregate decode tok/s and KV
bytes of the server's runtime (conversations decoded together, each inside its
budgets) against stock llama-cpp-python serving the same requests one at a
time, in the same run. --flash-attn, --type-k, --type-v and --sketch-rank
change ours' cache (stock stays f16, flash attention off: what stock needs);
ours' KV bytes then include the key sketches' host memory. A quantized V
needs flash attention, which needs key sketches.

    python bench/server.py [--prompt 1024] [--tokens 1024] [--conversations 1 2 4] \
        [--prefill-budget 512] [--decode-budget 256] [--prefill-chunk 256] [--json]

Each conversation is a different logbook prompt of --prompt tokens followed by
--tokens greedy tokens (end-of-text ignored). Stock: one llama_cpp.Llama per
request of n_ctx = prompt + tokens (flash attention off, as ours), the
requests in turn, twice: with llama-cpp-python's default threads (half the
CPUs: what `Llama(path)` and `python -m llama_cpp.server` run) and with as
many threads as ours gives a step of several sequences (every CPU); its KV
bytes for N conversations are N full contexts (what keeping N
conversations' caches takes). Stock runs on a thread that ends before ours
starts: a live thread that has decoded with llama.cpp keeps an OpenMP worker
team, which makes ours' steps twice as slow on 2 cores (see
scope_edge.runtime.batch.on_own_thread). Ours: the BatchRunner that
`scope-edge serve` runs, N slots of one context; all N requests start at once.

Aggregate decode tok/s: ours counts the tokens generated while all N
conversations decode (from the last request's first token to the first
request's end: the other prompts' prefill pieces are outside it), over that
time; stock: generated tokens after each request's first, over the sum of
its decode times. End-to-end tok/s counts the prefill too, from the start to
the last request's end. Writes bench/results/server.json and prints a table.
"""
from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from pathlib import Path

from scope_edge import Budget, EngineConfig, Sketch, memory, models
from scope_edge.bench import logbook_prompt, machine, run_stock, save_results
from scope_edge.policies import build
from scope_edge.runtime.batch import BatchRunner, BatchSettings, on_own_thread, slot_cells_for
from scope_edge.runtime.generation import Limits
from scope_edge.runtime.model import Model
from scope_edge.runtime.sampling import Sampling

log = logging.getLogger("bench.server")
RESULTS = Path(__file__).resolve().parent / "results"


def run_stock_in_turn(path: str, prompts: list[list[int]], tokens: int, *, n_threads: int | None = None) -> list[dict]:
    """Each prompt through stock llama-cpp-python, one after the other
    (n_threads None: its default)."""
    runs = []
    for i, prompt in enumerate(prompts):
        run = run_stock(path, prompt, tokens, "f16", label=f"stock {i}", n_threads=n_threads)
        runs.append({"n_ctx": run.n_ctx, "kv_bytes": run.kv_bytes, "prefill_s": len(prompt) / run.prefill_tokens_per_s,
                     "decode_s": (tokens - 1) / run.decode_tokens_per_s, "decode_tokens_per_s": run.decode_tokens_per_s})
        log.info("stock %d (%s threads): decode %.1f tok/s", i, n_threads or "default", run.decode_tokens_per_s)
    return runs


def run_ours_together(model: Model, prompts: list[list[int]], *, tokens: int, budget: Budget,
                      prefill_chunk: int, **cache: object) -> dict:
    """All prompts at once on len(prompts) slots of one context. cache: further
    EngineConfig fields (type_k, type_v, flash_attn, scoring); kv_bytes counts the
    key sketches' host memory too."""
    policy = build(budget, strategy="slide")
    cells = slot_cells_for(policy, max_tokens=tokens, prefill_chunk=prefill_chunk)
    engine = EngineConfig(prefill_chunk=prefill_chunk, **cache)  # type: ignore[arg-type]
    runner = BatchRunner(model, BatchSettings(slots=len(prompts), slot_cells=cells, engine=engine))
    sketch_bytes = runner.context.n_cells * runner.sketch.bytes_per_cell if runner.sketch else 0
    stamps: dict[int, list[float]] = {i: [] for i in range(len(prompts))}  # one per generated token
    peaks: dict[int, int] = {}
    done = threading.Barrier(len(prompts) + 1)

    def sink_for(i: int):
        def sink(item) -> None:
            now = time.perf_counter()
            if isinstance(item, BaseException) or item.token is not None:
                stamps[i].append(now)
            if isinstance(item, BaseException) or item.finish_reason is not None:
                peaks[i] = item.stats.kv_cells_peak if not isinstance(item, BaseException) else -1
                done.wait()
        return sink

    try:
        t0 = time.perf_counter()
        for i, prompt in enumerate(prompts):
            runner.start(prompt, policy=policy, limits=Limits(max_tokens=tokens, ignore_eos=True),
                         sampling=Sampling(), sink=sink_for(i))
        done.wait()
        if min(peaks.values()) < 0:
            raise RuntimeError("a generation failed (see the log)")
        all_from = max(ts[0] for ts in stamps.values())  # every conversation decodes from here
        all_to = min(ts[-1] for ts in stamps.values())  # to here
        together = sum(sum(all_from < t <= all_to for t in ts) for ts in stamps.values())
        end = max(ts[-1] for ts in stamps.values())
        return {"slot_cells": cells, "cells": runner.context.n_cells,
                "kv_bytes": runner.kv_bytes(runner.context.n_cells) + sketch_bytes, "sketch_bytes": sketch_bytes,
                "kv_cells_peak": max(peaks.values()),
                "steps": runner.batcher.steps, "first_token_s": all_from - t0,
                "decode_s": all_to - all_from, "decode_tokens": together,
                "decode_tokens_per_s": together / (all_to - all_from),
                "end_to_end_tokens_per_s": len(prompts) * tokens / (end - t0)}
    finally:
        runner.close()


def table(res: dict) -> str:
    rows = ["| conversations | stock decode tok/s (in turn) | ours decode tok/s (together) | ours / stock | "
            "ours / stock on ours' threads | stock end-to-end tok/s | ours end-to-end tok/s | stock KV MiB | "
            "ours KV MiB | KV ours / stock |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        same = r.get("decode_speedup_same_threads")
        rows.append(f"| {r['conversations']} | {r['stock_decode_tokens_per_s']:.1f} | {r['ours']['decode_tokens_per_s']:.1f} "
                    f"| {r['decode_speedup']:.2f}x | {'-' if same is None else f'{same:.2f}x'} | "
                    f"{r['stock_end_to_end_tokens_per_s']:.1f} | "
                    f"{r['ours']['end_to_end_tokens_per_s']:.1f} | {r['stock_kv_bytes'] / 2**20:.1f} | "
                    f"{r['ours']['kv_bytes'] / 2**20:.1f} | {r['kv_ratio']:.1%} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--conversations", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--prefill-budget", type=int, default=512)
    ap.add_argument("--decode-budget", type=int, default=256)
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--flash-attn", action="store_true", help="ours with flash attention on")
    ap.add_argument("--type-k", default="f16", help="ours' K cache type (stock stays f16)")
    ap.add_argument("--type-v", default="f16", help="ours' V cache type (a quantized one needs --flash-attn)")
    ap.add_argument("--sketch-rank", type=int, default=0, help="ours scores from key sketches (0: exact)")
    ap.add_argument("--out", default=str(RESULTS / "server.json"))
    ap.add_argument("--json", action="store_true", help="print the results as one JSON line")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    path = str(models.fetch())
    budget = Budget(prefill=args.prefill_budget, decode=args.decode_budget)
    n_max = max(args.conversations)
    prompts = [logbook_prompt(path, args.prompt, seed=i) for i in range(n_max)]
    started = machine()
    batch_threads = os.cpu_count() or 1  # what BatchSettings gives a step of several sequences
    # On threads that end: a live thread that has decoded keeps an OpenMP team
    # that slows ours' steps (runtime.batch.on_own_thread).
    stock = on_own_thread(lambda: run_stock_in_turn(path, prompts, args.tokens))
    stock_threads = on_own_thread(lambda: run_stock_in_turn(path, prompts, args.tokens, n_threads=batch_threads))
    runs = []
    with Model(path) as model:
        for n in args.conversations:
            ours = run_ours_together(model, prompts[:n], tokens=args.tokens, budget=budget,
                                     prefill_chunk=args.prefill_chunk, flash_attn=args.flash_attn,
                                     type_k=args.type_k, type_v=args.type_v,
                                     scoring=Sketch(rank=args.sketch_rank) if args.sketch_rank else None)
            rates = {key: n * (args.tokens - 1) / sum(s["decode_s"] for s in runs_[:n])
                     for key, runs_ in (("default", stock), ("threads", stock_threads))}
            stock_kv = sum(s["kv_bytes"] for s in stock[:n])
            runs.append({"conversations": n, "ours": ours, "stock_decode_tokens_per_s": rates["default"],
                         "stock_threads_decode_tokens_per_s": rates["threads"],
                         "stock_end_to_end_tokens_per_s": n * args.tokens / sum(s["prefill_s"] + s["decode_s"]
                                                                                 for s in stock[:n]),
                         "stock_kv_bytes": stock_kv, "decode_speedup": ours["decode_tokens_per_s"] / rates["default"],
                         "decode_speedup_same_threads": ours["decode_tokens_per_s"] / rates["threads"],
                         "kv_ratio": ours["kv_bytes"] / stock_kv})
            log.info("%d conversations: ours %.1f tok/s vs stock %.1f (%.2fx), stock on %d threads %.1f (%.2fx); "
                     "KV %.1f%%", n, ours["decode_tokens_per_s"], rates["default"], runs[-1]["decode_speedup"],
                     batch_threads, rates["threads"], runs[-1]["decode_speedup_same_threads"],
                     100 * runs[-1]["kv_ratio"])
    res = {"prompt": args.prompt, "tokens": args.tokens, "budget": [budget.prefill, budget.decode],
           "ours_cache": {"flash_attn": args.flash_attn, "type_k": args.type_k, "type_v": args.type_v,
                          "sketch_rank": args.sketch_rank},
           "prefill_chunk": args.prefill_chunk, "stock": stock, "stock_threads": stock_threads,
           "batch_threads": batch_threads, "runs": runs, "machine_at_start": started,
           "bytes_per_cell": memory.kv_bytes(memory.read_geometry(path), 1, "f16", "f16")}
    save_results(args.out, res, print_json=args.json, table=table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
