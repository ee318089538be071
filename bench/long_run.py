"""One very long generation under a fixed budget: do decode speed and memory
stay flat while the history grows (to 100,000 tokens by default)? Under the
speed protocol (scope_edge.protocol).

    python bench/long_run.py [--tokens 100000] [--window 2000] [--prompt 512] \
        [--prefill-budget 256] [--decode-budget 256] [--strategy slide] [--rounds 3] \
        [--threads N] [--stock-tokens 4096] [--json]

Columns, every one once a round, --rounds interleaved rounds, the 1-minute
load read before and after, all at ours' threads, EOG masked on every side:
  ours, S P/D      ScopeLlama(budget, strategy) streams --tokens tokens after
                   a logbook prompt (a short untimed run first, so Numba's
                   one-off compiles stay out of it). Every --window tokens it
                   records the window's decode tok/s, the resident set now and
                   at its peak, the cells held; its decode tok/s is over the
                   whole run. Positions pass the model's trained context every
                   few thousand tokens, so a long run re-indexes many times.
  ideal, S P/D     stock in a context of ours' allocated cells filled to the
                   level ours held in steady state: the speed ours' cells allow.
  stock            stock llama.cpp with the whole context, for --stock-tokens
                   tokens (a full cache cannot hold 100,000: the model's
                   trained context is far shorter), and, labelled, at
                   llama-cpp-python's default threads when those differ.
  ours, no budget  ScopeLlama(budget=None) for the same --stock-tokens.
Work or memory that grows with the history shows as falling tok/s or rising
RSS across windows (last over first window, a spread over the rounds).
Writes bench/results/long_run.json and prints a table.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path

from scope_edge import Budget, EngineConfig, ScopeLlama, models
from scope_edge.bench import eog_tokens, logbook_prompt, machine, peak_rss_bytes, save_results
from scope_edge.bench.columns import (NONE, Columns, columns_table, header, ratios_table, report,
                                      standard_ratios)
from scope_edge.policies import build
from scope_edge.protocol import Cache, run_rounds, spread

log = logging.getLogger("bench.long_run")
RESULTS = Path(__file__).resolve().parent / "results"
STATM = Path("/proc/self/statm")


def rss_bytes() -> int:
    """Resident bytes now (Linux /proc); elsewhere the peak, the best available."""
    if not STATM.exists():
        return peak_rss_bytes()
    return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def long_run(llm: ScopeLlama, prompt: list[int], *, budget: Budget, tokens: int, window: int) -> dict:
    """The long generation, windows recorded; the result a column of the protocol."""
    windows: list[dict] = []
    llm.generate(prompt, max_tokens=budget.decode + 16, ignore_eos=True)  # Numba's compiles, untimed
    last = None
    start = prev_t = 0.0
    prev_n = 1
    for n, last in enumerate(llm.stream(prompt, max_tokens=tokens, ignore_eos=True), start=1):
        now = time.perf_counter()
        if n == 1:  # the clock starts after the prefill
            start = prev_t = now
        if n % window and n != tokens:
            continue
        windows.append({"tokens": n, "tokens_per_s": (n - prev_n) / (now - prev_t), "rss_bytes": rss_bytes(),
                        "peak_rss_bytes": peak_rss_bytes(), "cells_held": len(llm.kv_positions()),
                        "cells_allocated": llm.n_ctx})
        log.info("%d tokens: %.1f tok/s, RSS %.1f MiB, %d cells held", n, windows[-1]["tokens_per_s"],
                 windows[-1]["rss_bytes"] / 2**20, windows[-1]["cells_held"])
        prev_n, prev_t = n, time.perf_counter()
    if last is None or last.stats is None:
        raise RuntimeError("the long run produced no final chunk")
    st = last.stats.as_dict()
    late = [w["cells_held"] for w in windows if w["tokens"] >= tokens // 2]
    return {**st, "decode_tokens_per_s": (tokens - 1) / (prev_t - start), "kv_bytes": st["kv_bytes_allocated"],
            "kv_cells": st["kv_cells_allocated"], "steady_cells": statistics.mean(late), "windows": windows,
            "summary": summary(windows)}


def run(args: argparse.Namespace) -> dict:
    if args.window < 1 or args.tokens < args.window:
        raise ValueError(f"need 1 <= --window <= --tokens, got window {args.window}, tokens {args.tokens}")
    path = str(models.fetch())
    budget = Budget(prefill=args.prefill_budget, decode=args.decode_budget)
    prompt = logbook_prompt(path, args.prompt)
    engine = EngineConfig(model_path=path, n_threads=args.threads)
    label = f"ours, {args.strategy} {budget.prefill}/{budget.decode}"
    cols = Columns(path, prompt, args.stock_tokens, eog=eog_tokens(path), n_threads=args.threads,
                   ideal_steps=args.ideal_steps)

    def ours_long() -> dict:
        with ScopeLlama(config=engine, policy=build(budget, strategy=args.strategy)) as llm:
            return long_run(llm, prompt, budget=budget, tokens=args.tokens, window=args.window)

    cols.stock()  # first: the ideals fill with stock's tokens
    cols.ours(NONE, lambda: ScopeLlama(config=engine, budget=None))
    cols.custom(label, ours_long, ideal_cache=Cache())
    done = run_rounds(cols.cols, args.rounds)
    longs = done["runs"][label]
    return {"protocol": {"rounds": args.rounds, "threads": list(cols.equal.resolved()),
                         "ideal_steps": args.ideal_steps, "stock_tokens": args.stock_tokens},
            "prompt_tokens": len(prompt), "tokens": args.tokens, "budget": {"prefill": budget.prefill,
                                                                            "decode": budget.decode},
            "strategy": args.strategy, "window": args.window, "long": label,
            **report(done, standard_ratios(list(cols.cols))),
            "last_over_first": spread([r["summary"]["tokens_per_s_last_over_first"] for r in longs]),
            "rss_growth_bytes": spread([r["summary"]["rss_growth_bytes"] for r in longs]),
            "position_resets": longs[0]["position_resets"], "machine": machine()}


def summary(windows: list[dict]) -> dict:
    """First window against the last: speed ratio and RSS growth."""
    first, end = windows[0], windows[-1]
    return {"tokens_per_s_last_over_first": end["tokens_per_s"] / first["tokens_per_s"],
            "rss_growth_bytes": end["rss_bytes"] - first["rss_bytes"],
            "max_cells_held": max(w["cells_held"] for w in windows)}


def table(res: dict) -> str:
    """The protocol's columns and ratios, then the first round's windows."""
    mib = 2**20
    p = res["protocol"]
    lines = [f"prompt {res['prompt_tokens']} + {res['tokens']:,} tokens ({res['strategy']}, budgets "
             f"{res['budget']['prefill']}/{res['budget']['decode']}); stock and ours with no budget: prompt + "
             f"{p['stock_tokens']:,}; {header(p['rounds'], res['load_1m'])}", "",
             *columns_table(res["columns"]), "", *ratios_table(res["ratios"]), "",
             f"{'tokens':>7} {'tok/s':>6} {'RSS MiB':>8} {'peak MiB':>8} {'cells':>6}  (round 0)"]
    for w in res["columns"][res["long"]]["runs"][0]["windows"]:
        lines.append(f"{w['tokens']:7d} {w['tokens_per_s']:6.1f} {w['rss_bytes'] / mib:8.1f} "
                     f"{w['peak_rss_bytes'] / mib:8.1f} {w['cells_held']:6d}")
    q, g = res["last_over_first"], res["rss_growth_bytes"]
    lines.append(f"last/first window tok/s {q['median']:.2f} ({q['min']:.2f}..{q['max']:.2f}), RSS growth "
                 f"{g['median'] / mib:+.1f} MiB ({g['min'] / mib:+.1f}..{g['max'] / mib:+.1f}), "
                 f"{res['position_resets']} re-indexings")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=100_000, help="tokens to generate (e.g. 20000 for a shorter run)")
    ap.add_argument("--window", type=int, default=2000, help="tokens per measured window")
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    ap.add_argument("--prefill-budget", type=int, default=256)
    ap.add_argument("--decode-budget", type=int, default=256)
    ap.add_argument("--strategy", default="slide")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every column")
    ap.add_argument("--threads", type=int, default=None, help="decode threads of ours and of stock (default: "
                    "llama-cpp-python's, half the CPUs)")
    ap.add_argument("--stock-tokens", type=int, default=4096, help="tokens stock and ours with no budget generate")
    ap.add_argument("--ideal-steps", type=int, default=256, help="timed steps of the ideal column")
    ap.add_argument("--out", default=str(RESULTS / "long_run.json"))
    ap.add_argument("--json", action="store_true")
    return ap


def main() -> None:
    args = parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    save_results(args.out, run(args), print_json=args.json, table=table)


if __name__ == "__main__":
    main()
