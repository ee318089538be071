"""Serving several long conversations at once, under the speed protocol
(scope_edge.protocol): aggregate decode tok/s and KV bytes of the server's
runtime (conversations decoded together, each inside its budgets) against
stock llama-cpp-python serving the same requests one at a time, and against
plain llama.cpp decoding the same sequences batched at our cells.

    python bench/server.py [--prompt 1024] [--tokens 1024] [--conversations 1 2 4] \
        [--prefill-budget 512] [--decode-budget 256] [--prefill-chunk 256] [--rounds 3] [--threads N] [--json]

Each conversation is a different logbook prompt of --prompt tokens followed by
--tokens greedy tokens (EOG masked). Columns, each once per interleaved round:
- stock in turn: one llama_cpp.Llama per request of n_ctx = prompt + tokens,
  the requests one after the other, timed in a plain greedy loop; at equal
  threads (ours' batch threads: a step of several sequences is a batch) and at
  llama-cpp-python's default threads (half the CPUs), labelled;
- ours, N together: the BatchRunner that `scope-edge serve` runs, N slots of
  one context, all N requests started at once;
- llama.cpp batched, N: one plain llama.cpp context with n_seq_max = N and
  kv_unified = false, our cells per sequence, each sequence's prompt cut to
  start at the level ours holds in steady state less half the timed steps,
  then --batched-steps steps of N tokens (greedy, EOG masked): the limit of
  this CPU at our allocation.
Stock, both K and V types and flash attention equal to ours' (--type-k,
--type-v, --flash-attn). Stock and the batched baseline run on threads that end
before ours starts: a live thread that has decoded with llama.cpp keeps an
OpenMP team, which makes ours' steps twice as slow on 2 cores
(scope_edge.runtime.batch.on_own_thread).

Aggregate decode tok/s: ours counts the tokens generated while all N
conversations decode (from the last request's first token to the first
request's end), over that time; stock: generated tokens after each request's
first, over the sum of its decode times. KV: ours (key sketches' host memory
included) against one stock context (what the timed stock held), N stock
contexts at once, and the batched baseline's N streams.
Writes bench/results/server.json and prints a table.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from scope_edge import Budget, EngineConfig, Sketch, models
from scope_edge.bench import eog_tokens, logbook_prompt, machine, save_results
from scope_edge.policies import build
from scope_edge.protocol import (LIBRARY_DEFAULT, Cache, Threads, batched_stock, ideal_fill, ratio, run_rounds,
                                 stock_greedy, summary)
from scope_edge.runtime.batch import BatchRunner, BatchSettings, on_own_thread, slot_cells_for
from scope_edge.runtime.generation import Limits
from scope_edge.runtime.model import Model
from scope_edge.runtime.sampling import Sampling

log = logging.getLogger("bench.server")
RESULTS = Path(__file__).resolve().parent / "results"
EQUAL, DEFAULT = "stock in turn, equal threads", "stock in turn, library default threads"
HELD_EVERY = 32  # generated tokens between two reads of a slot's held cells


def ours_label(n: int) -> str:
    return f"ours, {n} together"


def batched_label(n: int) -> str:
    return f"llama.cpp batched, {n}"


def stock_in_turn(path: str, prompts: list[list[int]], tokens: int, *, cache: Cache, threads: Threads) -> dict:
    """Each prompt through stock, one after the other, on a thread that ends."""
    eog = eog_tokens(path)

    def work() -> dict:
        runs = []
        for prompt in prompts:
            r = stock_greedy(path, prompt, tokens, eog=eog, cache=cache, threads=threads)
            runs.append({"kv_bytes": r["kv_bytes"], "n_ctx": r["n_ctx"], "prefill_s": len(prompt) / r["prefill_tokens_per_s"],
                         "decode_s": (tokens - 1) / r["decode_tokens_per_s"]})
        return {"requests": runs, "threads": list(threads.resolved()), "kv_bytes": runs[0]["kv_bytes"],
                "decode_tokens_per_s": len(runs) * (tokens - 1) / sum(r["decode_s"] for r in runs)}
    return on_own_thread(work)


def first_n(stock: dict, n: int, tokens: int) -> dict:
    """Stock's aggregate over its first n requests (the same requests ours serves n of)."""
    reqs = stock["requests"][:n]
    return {"decode_tokens_per_s": n * (tokens - 1) / sum(r["decode_s"] for r in reqs),
            "end_to_end_tokens_per_s": n * tokens / sum(r["prefill_s"] + r["decode_s"] for r in reqs)}


def run_ours_together(model: Model, prompts: list[list[int]], *, tokens: int, budget: Budget, engine: EngineConfig) -> dict:
    """All prompts at once on len(prompts) slots of one context; kv_bytes
    counts the key sketches' host memory too; steady_cells: the mean cells a
    slot held over the second half of its decode."""
    policy = build(budget, strategy="slide")
    cells = slot_cells_for(policy, max_tokens=tokens, prefill_chunk=engine.chunk)
    runner = BatchRunner(model, BatchSettings(slots=len(prompts), slot_cells=cells, engine=engine))
    sketch_bytes = runner.context.n_cells * runner.sketch.bytes_per_cell if runner.sketch else 0
    stamps: dict[int, list[float]] = {i: [] for i in range(len(prompts))}  # one per generated token
    held: list[int] = []
    peaks: dict[int, int] = {}
    done = threading.Barrier(len(prompts) + 1)

    def sink_for(i: int) -> Callable[[object], None]:
        def sink(item) -> None:
            now = time.perf_counter()
            if isinstance(item, BaseException) or item.token is not None:
                stamps[i].append(now)
                n = len(stamps[i])
                if n % HELD_EVERY == 0 and n >= tokens // 2:  # between steps: the slot is not pending
                    held.append(len(runner.positions(i)))
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
        return {"slot_cells": cells, "cells": runner.context.n_cells, "threads": list(engine.threads()),
                "kv_bytes": runner.kv_bytes(runner.context.n_cells) + sketch_bytes, "sketch_bytes": sketch_bytes,
                "kv_cells_peak": max(peaks.values()), "steady_cells": sum(held) / max(len(held), 1),
                "steps": runner.batcher.steps, "first_token_s": all_from - t0,
                "decode_s": all_to - all_from, "decode_tokens": together,
                "decode_tokens_per_s": together / (all_to - all_from),
                "end_to_end_tokens_per_s": len(prompts) * tokens / (end - t0)}
    finally:
        runner.close()


def run_batched(path: str, prompts: list[list[int]], *, ours: dict, steps: int, cache: Cache, threads: Threads) -> dict:
    """Plain llama.cpp, the prompts batched at ours' cells a sequence and steady fill."""
    fill, steps = ideal_fill(ours["slot_cells"], max(ours["steady_cells"], 1.0), steps)
    cut = [(p * (fill // len(p) + 1))[:fill] for p in prompts]
    res = on_own_thread(lambda: batched_stock(path, cut, steps, cells=ours["slot_cells"], eog=eog_tokens(path),
                                              cache=cache, threads=threads))
    res.pop("tokens")
    return {**res, "level": ours["steady_cells"]}


def columns(path: str, model: Model, prompts: list[list[int]], args: argparse.Namespace, engine: EngineConfig,
            budget: Budget) -> dict[str, Callable[[], dict]]:
    """Round 0's order: stock, then for each N ours before its batched baseline (which reads ours' level)."""
    cache = Cache(type_k=engine.type_k, type_v=engine.type_v, flash_attn=engine.flash_attn)
    batch = engine.threads()[1]
    equal = Threads(decode=batch, batch=batch)  # a step of several sequences runs on the batch threads
    last: dict[int, dict] = {}
    cols = {EQUAL: lambda: stock_in_turn(path, prompts, args.tokens, cache=cache, threads=equal)}
    if LIBRARY_DEFAULT.resolved() != equal.resolved():
        cols[DEFAULT] = lambda: stock_in_turn(path, prompts, args.tokens, cache=cache, threads=LIBRARY_DEFAULT)

    def ours(n: int) -> Callable[[], dict]:
        def run() -> dict:
            last[n] = run_ours_together(model, prompts[:n], tokens=args.tokens, budget=budget, engine=engine)
            return last[n]
        return run

    for n in args.conversations:
        cols[ours_label(n)] = ours(n)
        cols[batched_label(n)] = (lambda n=n: run_batched(path, prompts[:n], ours=last[n], steps=args.batched_steps,
                                                          cache=cache, threads=Threads(decode=engine.threads()[0],
                                                                                       batch=batch)))
    return cols


def per_conversations(runs: dict[str, list[dict]], n: int, tokens: int) -> dict:
    """Ratios round by round for N conversations, and the KV comparisons."""
    o = runs[ours_label(n)]
    out: dict = {"conversations": n, "ours": summary(o, ("decode_tokens_per_s", "end_to_end_tokens_per_s"))}
    ratios = {}
    for label in (EQUAL, DEFAULT):
        if label in runs:
            stock = [first_n(s, n, tokens) for s in runs[label]]
            out[label] = summary(stock, ("decode_tokens_per_s", "end_to_end_tokens_per_s"))
            ratios[f"ours / {label}"] = ratio({"o": o, "s": stock}, "o", "s")
    out["batched"] = summary(runs[batched_label(n)])
    ratios[f"ours / {batched_label(n)}"] = ratio(runs, ours_label(n), batched_label(n))
    one = runs[EQUAL][0]["kv_bytes"]
    kv = {"ours": o[0]["kv_bytes"], "stock_held": one, "stock_at_once": n * one,
          "batched": runs[batched_label(n)][0]["kv_bytes"]}
    kv.update({f"ours / {k}": kv["ours"] / kv[k] for k in ("stock_held", "stock_at_once", "batched")})
    eq = ratios[f"ours / {EQUAL}"]["median"]
    return {**out, "ratios": ratios, "kv": kv,
            "targets": {"ours >= 0.9x batched llama.cpp": ratios[f"ours / {batched_label(n)}"]["median"] >= 0.9,
                        "ours >= 2x stock in turn at equal threads": eq >= 2.0}}


def table(res: dict) -> str:
    """Equal threads first; then llama.cpp batched, stock's default threads, KV."""
    def fmt(s: dict, d: int = 2) -> str:
        return f"{s['median']:.{d}f} ({s['min']:.{d}f}..{s['max']:.{d}f})"
    c = res["ours_cache"]
    out = [f"{res['prompt']} + {res['tokens']} tokens a conversation, budgets {res['budget'][0]}/{res['budget'][1]}, "
           f"K {c['type_k']} V {c['type_v']}{', flash attention' if c['flash_attn'] else ''}"
           f"{', rank-%d sketches' % c['sketch_rank'] if c['sketch_rank'] else ''} (stock and batched: the same types); "
           f"{res['protocol']['rounds']} interleaved rounds, median (min..max); 1-min load "
           f"{res['load_1m']['before']:.2f} before, {res['load_1m']['after']:.2f} after", "",
           "| N | ours tok/s | stock in turn, equal threads | ours / it | llama.cpp batched at our cells | ours / it | "
           "ours / stock, default threads | KV MiB ours | / one stock context (held) | / N stock contexts | / batched |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        n, q, kv = r["conversations"], r["ratios"], r["kv"]
        dflt = q.get(f"ours / {DEFAULT}")
        out.append(f"| {n} | {fmt(r['ours']['decode_tokens_per_s'], 1)} | {fmt(r[EQUAL]['decode_tokens_per_s'], 1)} | "
                   f"{fmt(q[f'ours / {EQUAL}'])}x | {fmt(r['batched']['decode_tokens_per_s'], 1)} | "
                   f"{fmt(q[f'ours / {batched_label(n)}'])}x | {'-' if dflt is None else fmt(dflt) + 'x'} | "
                   f"{kv['ours'] / 2**20:.1f} | {kv['ours / stock_held']:.1%} | {kv['ours / stock_at_once']:.1%} | "
                   f"{kv['ours / batched']:.1%} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--conversations", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--prefill-budget", type=int, default=512)
    ap.add_argument("--decode-budget", type=int, default=256)
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every column")
    ap.add_argument("--batched-steps", type=int, default=256, help="timed steps of the llama.cpp batched baseline")
    ap.add_argument("--threads", type=int, default=None, help="decode and batch threads of ours, and so of stock at "
                    "equal threads and of llama.cpp batched (default: llama-cpp-python's, half the CPUs for one "
                    "token, all of them for a batch)")
    ap.add_argument("--flash-attn", action="store_true", help="flash attention on (ours, stock and batched)")
    ap.add_argument("--type-k", default="f16", help="K cache type (ours, stock and batched)")
    ap.add_argument("--type-v", default="f16", help="V cache type (a quantized one needs --flash-attn)")
    ap.add_argument("--sketch-rank", type=int, default=0, help="ours scores from key sketches (0: exact)")
    ap.add_argument("--out", default=str(RESULTS / "server.json"))
    ap.add_argument("--json", action="store_true", help="print the results as one JSON line")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    path = str(models.fetch())
    budget = Budget(prefill=args.prefill_budget, decode=args.decode_budget)
    engine = EngineConfig(model_path=path, n_threads=args.threads, prefill_chunk=args.prefill_chunk,
                          flash_attn=args.flash_attn,
                          type_k=args.type_k, type_v=args.type_v,
                          scoring=Sketch(rank=args.sketch_rank) if args.sketch_rank else None)
    prompts = [logbook_prompt(path, args.prompt, seed=i) for i in range(max(args.conversations))]
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with Model(path) as model:
        done = run_rounds(columns(path, model, prompts, args, engine, budget), args.rounds)
    runs = done["runs"]
    res = {"protocol": {"rounds": args.rounds, "order": done["order"], "batched_steps": args.batched_steps,
                        "threads": list(engine.threads()), "library_default_threads": list(LIBRARY_DEFAULT.resolved())},
           "prompt": args.prompt, "tokens": args.tokens, "budget": [budget.prefill, budget.decode],
           "ours_cache": {"flash_attn": args.flash_attn, "type_k": args.type_k, "type_v": args.type_v,
                          "sketch_rank": args.sketch_rank},
           "prefill_chunk": args.prefill_chunk, "load_1m": done["load_1m"], "date": started, "machine": machine(),
           "runs": [per_conversations(runs, n, args.tokens) for n in args.conversations], "columns": runs}
    for r in res["runs"]:
        log.info("%d conversations: %s", r["conversations"],
                 ", ".join(f"{k} {v['median']:.2f}x" for k, v in r["ratios"].items()))
    save_results(args.out, res, print_json=args.json, table=table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
