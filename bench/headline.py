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
from scope_edge.bench.columns import (NONE, STOCK, STOCK_DEFAULT, Columns, column, columns_table, header,
                                      ratios_table)
from scope_edge.protocol import LIBRARY_DEFAULT, Cache, ratio, run_rounds

log = logging.getLogger("bench.headline")
RESULTS = Path(__file__).resolve().parent / "results"


def ours_label(strategy: str, budget: Budget) -> str:
    return f"ours, {strategy} {budget.prefill}/{budget.decode}"


def ideal_label(strategy: str) -> str:
    return f"ideal, {strategy}"


def columns(path: str, prompt: list[int], steps: int, *, budget: Budget, strategies: list[str],
            engine: EngineConfig, ideal_steps: int, kept: dict) -> dict[str, Callable[[], dict]]:
    """The protocol's columns in their round-0 order (every ours before its
    ideal, which reads the level ours held last). kept: each column's tokens
    of its first round (the fidelity pass compares them)."""
    cache = Cache(type_k=engine.type_k, type_v=engine.type_v, flash_attn=engine.flash_attn)
    cols = Columns(path, prompt, steps, eog=eog_tokens(path), n_threads=engine.n_threads, ideal_steps=ideal_steps,
                   kept=kept)
    cols.stock(cache)
    cols.ours(NONE, lambda: ScopeLlama(config=engine, budget=None))
    for s in strategies:
        cols.ours(ours_label(s, budget), lambda s=s: ScopeLlama(config=engine, policy=build(budget, strategy=s)),
                  ideal_cache=cache, ideal_label=ideal_label(s))
    return cols.cols


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


def short_notes(res: dict) -> list[str]:
    """A line for each column of ours that generated fewer tokens than asked
    (ours with no budget stops at the model's trained context; stock runs
    past it): its ratio to stock compares different work."""
    want = res["config"]["max_tokens"]
    out = []
    for label, col in res["columns"].items():
        made = min((r["generated_tokens"] for r in col.get("runs", []) if "generated_tokens" in r), default=want)
        if made < want:
            out.append(f"\n{label} generated {made:,} of the {want:,} tokens asked (a cache without a budget stops "
                       f"at the model's trained context): its ratio to stock compares different work.")
    return out


def table(res: dict) -> str:
    """One row a column: KV, cells, decode median (min..max), x stock; the ratios below."""
    c = res["config"]
    out = [f"prompt {c['prompt_tokens']} + {c['max_tokens']} generated, budgets {c['prefill_budget']}/"
           f"{c['decode_budget']}, K {c['type_k']} V {c['type_v']}; {header(res['protocol']['rounds'], res['load_1m'])}"
           + ("; stock's threads are also llama-cpp-python's default" if STOCK_DEFAULT not in res["columns"] else ""),
           "", *columns_table(res["columns"]), "", *ratios_table(res["ratios"]), *short_notes(res)]
    for s, f in (res.get("fidelity") or {}).items():
        out.append(f"\nfidelity ({s}, separate untimed pass): top-1 {f['top1_agreement']:.1%}, mean KL "
                   f"{f['mean_kl']:.4f}, identical prefix {f['identical_prefix']}, ROUGE-L {f['rouge_l']:.3f}")
    return "\n".join(out)


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
