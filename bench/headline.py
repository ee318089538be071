"""The headline: decode speed and KV of ours under budgets against stock, under
the speed protocol (scope_edge.protocol: same run, equal threads and KV types,
stock in a plain greedy loop, EOG masked on both, interleaved rounds, load read
before and after).

    python bench/headline.py [--prompt-tokens 2048] [--max-tokens 4096] \
        [--prefill-budget 1024] [--decode-budget 512] [--strategies slide] \
        [--rounds 3] [--threads N] [--fidelity] [--out bench/results/headline.json]

Columns, each once per round: stock (equal threads), stock at
llama-cpp-python's default threads (only when those differ), ours with no
budget (same runtime, budget=None), ours under the budgets for each strategy,
and each strategy's ideal (stock in a context of our allocated cells filled to
the level ours holds in steady state). --fidelity adds an untimed lockstep
pass after the rounds (teacher-forced top-1 and KL against stock's logits,
free-running prefix and ROUGE-L against stock's greedy tokens).
Writes --out and prints a table.
"""
from __future__ import annotations

import argparse
import datetime
import logging
from collections.abc import Callable
from pathlib import Path

from scope_edge import Budget, EngineConfig, ScopeLlama
from scope_edge.bench import eog_tokens, free_running, lockstep, logbook_prompt, machine, save_results, stock_reference
from scope_edge.policies import STRATEGIES, build
from scope_edge.protocol import (LIBRARY_DEFAULT, Cache, Threads, ideal, ours_greedy, ratio, run_rounds,
                                 stock_greedy, summary)

log = logging.getLogger("bench.headline")
RESULTS = Path(__file__).resolve().parent / "results"
STOCK, STOCK_DEFAULT, NONE = "stock", "stock, library default threads", "ours, no budget"


def ours_label(strategy: str, budget: Budget) -> str:
    return f"ours, {strategy} {budget.prefill}/{budget.decode}"


def ideal_label(strategy: str) -> str:
    return f"ideal, {strategy}"


def columns(path: str, prompt: list[int], steps: int, *, budget: Budget, strategies: list[str],
            engine: EngineConfig, ideal_steps: int, kept: dict) -> dict[str, Callable[[], dict]]:
    """The protocol's columns in their round-0 order (every ours before its
    ideal, which reads the level ours held last). kept: each column's tokens
    of its first round (the fidelity pass compares them)."""
    eog = eog_tokens(path)
    cache = Cache(type_k=engine.type_k, type_v=engine.type_v, flash_attn=engine.flash_attn)
    decode, batch = engine.threads()
    equal = Threads(decode=decode, batch=batch)
    levels: dict[str, dict] = {}

    def keep(label: str, res: dict) -> dict:
        tokens = res.pop("tokens")
        kept.setdefault(label, tokens)
        return res

    def stock(threads: Threads, label: str) -> Callable[[], dict]:
        return lambda: keep(label, stock_greedy(path, prompt, steps, eog=eog, cache=cache, threads=threads))

    def ours(strategy: str | None, label: str) -> Callable[[], dict]:
        def run() -> dict:
            policy = None if strategy is None else build(budget, strategy=strategy)
            kwargs = {"budget": None} if policy is None else {"policy": policy}
            with ScopeLlama(config=engine, **kwargs) as llm:
                res = {**keep(label, ours_greedy(llm, prompt, steps)), "threads": [decode, batch]}
            if strategy is not None:
                levels[strategy] = res
            return res
        return run

    def ideal_of(strategy: str) -> Callable[[], dict]:
        def run() -> dict:
            o = levels[strategy]
            return ideal(path, prompt + kept[STOCK], cells=o["kv_cells"], level=o["steady_cells"], steps=ideal_steps,
                         eog=eog, cache=cache, threads=equal)
        return run

    cols = {STOCK: stock(equal, STOCK)}
    if LIBRARY_DEFAULT.resolved() != equal.resolved():
        cols[STOCK_DEFAULT] = stock(LIBRARY_DEFAULT, STOCK_DEFAULT)
    cols[NONE] = ours(None, NONE)
    for s in strategies:
        cols[ours_label(s, budget)] = ours(s, ours_label(s, budget))
        cols[ideal_label(s)] = ideal_of(s)
    return cols


def ratios(runs: dict[str, list[dict]], strategies: list[str], budget: Budget) -> dict[str, dict]:
    """Decode ratios round by round: each ours and stock's default against
    stock, each budgeted ours against its ideal."""
    out = {f"{label} / {STOCK}": ratio(runs, label, STOCK) for label in runs
           if label != STOCK and not label.startswith("ideal")}
    for s in strategies:
        out[f"{ours_label(s, budget)} / {ideal_label(s)}"] = ratio(runs, ours_label(s, budget), ideal_label(s))
    return out


def fidelity_pass(path: str, prompt: list[int], steps: int, *, budget: Budget, strategies: list[str],
                  engine: EngineConfig, kept: dict) -> dict[str, dict]:
    """Untimed: stock again keeping every step's logits, every strategy
    teacher-forced against them; free-running against stock's tokens."""
    stock = stock_reference(path, prompt, steps, engine.type_k)
    comps = [ScopeLlama(config=engine, policy=build(budget, strategy=s)) for s in strategies]
    try:
        res, consistency = lockstep(stock.logits, comps, prompt, stock.tokens, eog_tokens(path))
    finally:
        for llm in comps:
            llm.close()
    return {s: {**fid.as_dict(), "reference_consistency": consistency,
                **free_running(stock.tokens, kept[ours_label(s, budget)])} for s, fid in zip(strategies, res)}


def table(res: dict) -> str:
    """One row a column: KV, cells, decode median (min..max), x stock; the ratios below."""
    c, stock = res["config"], res["columns"][STOCK]
    out = [f"prompt {c['prompt_tokens']} + {c['max_tokens']} generated, budgets {c['prefill_budget']}/"
           f"{c['decode_budget']}, K {c['type_k']} V {c['type_v']}; {res['protocol']['rounds']} interleaved rounds, "
           f"median (min..max); 1-min load {res['load_1m']['before']:.2f} before, {res['load_1m']['after']:.2f} after"
           + ("; stock's threads are also llama-cpp-python's default" if STOCK_DEFAULT not in res["columns"] else ""),
           "", "| column | threads | KV MiB | KV / stock | cells | decode tok/s | prefill tok/s |", "|---|---|---|---|---|---|---|"]
    for label, col in res["columns"].items():
        d, p = col["summary"]["decode_tokens_per_s"], col["summary"]["prefill_tokens_per_s"]
        out.append(f"| {label} | {col['threads']} | {col['kv_bytes'] / 2**20:.1f} | "
                   f"{col['kv_bytes'] / stock['kv_bytes']:.1%} | {col['cells']:,} | {_fmt(d, 1)} | {p['median']:.0f} |")
    out += ["", "| decode ratio | median (min..max) |", "|---|---|"]
    out += [f"| {name} | {_fmt(r, 2)}x |" for name, r in res["ratios"].items()]
    for s, f in (res.get("fidelity") or {}).items():
        out.append(f"\nfidelity ({s}, separate untimed pass): top-1 {f['top1_agreement']:.1%}, mean KL "
                   f"{f['mean_kl']:.4f}, identical prefix {f['identical_prefix']}, ROUGE-L {f['rouge_l']:.3f}")
    return "\n".join(out)


def _fmt(s: dict, digits: int) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}..{s['max']:.{digits}f})"


def column(label: str, runs: list[dict]) -> dict:
    first = runs[0]
    cells = first.get("kv_cells", first.get("n_ctx"))
    extra = {k: first[k] for k in ("steady_cells", "kv_cells_peak", "evicted_cells", "level", "prefilled", "steps")
             if k in first}
    decode, batch = first["threads"]
    return {"kv_bytes": first["kv_bytes"], "cells": cells, "threads": Threads(decode=decode, batch=batch).label(),
            **extra, "summary": summary(runs), "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--prefill-budget", type=int, default=1024)
    ap.add_argument("--decode-budget", type=int, default=512)
    ap.add_argument("--strategies", nargs="+", default=["slide"], choices=STRATEGIES)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every column")
    ap.add_argument("--threads", type=int, default=None, help="decode threads of ours and of stock (default: "
                    "llama-cpp-python's, half the CPUs)")
    ap.add_argument("--type-k", default="f16", help="K cache type of both")
    ap.add_argument("--ideal-steps", type=int, default=256, help="timed steps of the ideal column")
    ap.add_argument("--fidelity", action="store_true", help="an untimed lockstep pass after the rounds")
    ap.add_argument("--out", default=str(RESULTS / "headline.json"))
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    engine = EngineConfig(n_threads=args.threads, type_k=args.type_k)
    path = engine.path()
    engine = EngineConfig(model_path=path, n_threads=args.threads, type_k=args.type_k)
    budget = Budget(prefill=args.prefill_budget, decode=args.decode_budget)
    prompt = logbook_prompt(path, args.prompt_tokens)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    kept: dict[str, list[int]] = {}
    cols = columns(path, prompt, args.max_tokens, budget=budget, strategies=args.strategies, engine=engine,
                   ideal_steps=args.ideal_steps, kept=kept)
    done = run_rounds(cols, args.rounds)
    runs = done["runs"]
    res = {"protocol": {"rounds": args.rounds, "order": done["order"], "ideal_steps": args.ideal_steps,
                        "threads": list(engine.threads()), "library_default_threads": list(LIBRARY_DEFAULT.resolved())},
           "config": {"prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                      "prefill_budget": budget.prefill, "decode_budget": budget.decode, "strategies": args.strategies,
                      "type_k": engine.type_k, "type_v": engine.type_v, "flash_attn": engine.flash_attn,
                      "model": path},
           "load_1m": done["load_1m"], "date": started, "machine": machine(),
           "columns": {label: column(label, r) for label, r in runs.items()},
           "ratios": ratios(runs, args.strategies, budget), "fidelity": None}
    if args.fidelity:
        res["fidelity"] = fidelity_pass(path, prompt, args.max_tokens, budget=budget, strategies=args.strategies,
                                        engine=engine, kept=kept)
    save_results(args.out, res, print_json=args.json, table=table)


if __name__ == "__main__":
    main()
