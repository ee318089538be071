"""Decode and prefill tok/s against context length, under the speed protocol
(scope_edge.protocol); plus the hook's own overhead (bench/hook_overhead.py, reused).

    python bench/speed.py [--contexts 512 1024 2048 4096] [--steps 64] \
        [--prefill-budget 1024] [--decode-budget 512] [--rounds 3] [--threads N] \
        [--hook-cached 2048 7000] [--json]

For each context length L, every column once a round, --rounds interleaved
rounds (rotated so none always runs first), the 1-minute load read before and
after; every column generates decode_budget + steps greedy tokens after the
same L-token prompt, EOG masked, and is timed over its last `steps` (ours'
decode cache is full by then: what decoding costs in steady state at context L):
  stock            llama_cpp.Llama of L + decode_budget + steps cells at ours'
                   threads, in the protocol's plain loop (StockSteps);
  stock, library default threads  the same at llama-cpp-python's default
                   threads (only when those differ from ours');
  ours, no budget  ScopeLlama(budget=None): the same runtime, nothing evicted;
  ours, slide P/D  ScopeLlama(budget, slide);
  ideal, slide P/D stock in a context of ours' allocated cells filled to the
                   level ours held in steady state (`steps` timed steps).
Each figure is the median of its rounds with min..max, each ratio the median of
its per-round ratios. Writes bench/results/speed.json and prints a table.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from scope_edge import Budget, EngineConfig, ScopeLlama, models
from scope_edge.bench import eog_tokens, logbook_prompt, machine, save_results
from scope_edge.bench.columns import NONE, Columns, columns_table, header, ratios_table, report, standard_ratios
from scope_edge.policies import build
from scope_edge.protocol import Cache, run_rounds

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hook_overhead  # noqa: E402  (bench/ is not a package)

log = logging.getLogger("bench.speed")
RESULTS = Path(__file__).resolve().parent / "results"


def ours_label(budget: Budget) -> str:
    return f"ours, slide {budget.prefill}/{budget.decode}"


def context_columns(path: str, prompt: list[int], *, budget: Budget, steps: int, n_threads: int | None) -> Columns:
    """The protocol's columns at one context length (see the module's docstring)."""
    engine = EngineConfig(model_path=path, n_threads=n_threads)
    cols = Columns(path, prompt, budget.decode + steps, eog=eog_tokens(path), n_threads=n_threads, timed=steps,
                   ideal_steps=steps)
    cols.stock()
    cols.ours(NONE, lambda: ScopeLlama(config=engine, budget=None))
    cols.ours(ours_label(budget), lambda: ScopeLlama(config=engine, policy=build(budget, strategy="slide")),
              ideal_cache=Cache())
    return cols


def run(args: argparse.Namespace) -> dict:
    path = str(models.fetch())
    budget = Budget(prefill=args.prefill_budget, decode=args.decode_budget, recent_window=min(256, args.decode_budget))
    rows = []
    for n in args.contexts:
        cols = context_columns(path, logbook_prompt(path, n), budget=budget, steps=args.steps, n_threads=args.threads)
        done = run_rounds(cols.cols, args.rounds)
        rows.append({"context": n, **report(done, standard_ratios(list(cols.cols)))})
    res = {"protocol": {"rounds": args.rounds, "threads": list(cols.equal.resolved()), "steps": args.steps,
                        "generated": budget.decode + args.steps},
           "budget": {"prefill": budget.prefill, "decode": budget.decode}, "rows": rows, "machine": machine()}
    if args.hook_cached:
        res["hook_overhead"] = hook_overhead.run(args.hook_cached, args.steps, args.hook_repeats)
    return res


def table(res: dict) -> str:
    p = res["protocol"]
    lines = [f"{p['generated']} tokens generated after each prompt, decode timed over the last {p['steps']}"]
    for r in res["rows"]:
        lines += ["", f"context {r['context']:,}: {header(p['rounds'], r['load_1m'])}", "",
                  *columns_table(r["columns"]), "", *ratios_table(r["ratios"])]
    for n, h in res.get("hook_overhead", {}).get("results", {}).items():
        lines.append(f"hook overhead at {n} cached: hook/stock {h['hook_vs_stock']:.3f}, "
                     f"capture/stock {h['capture_vs_stock']:.3f}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--steps", type=int, default=64, help="timed decode steps of every column")
    ap.add_argument("--prefill-budget", type=int, default=1024)
    ap.add_argument("--decode-budget", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every column")
    ap.add_argument("--threads", type=int, default=None, help="decode threads of ours and of stock (default: "
                    "llama-cpp-python's, half the CPUs)")
    ap.add_argument("--hook-cached", type=int, nargs="*", default=[2048, 7000], help="hook_overhead contexts ([] skips)")
    ap.add_argument("--hook-repeats", type=int, default=3, help="hook_overhead repeats (medians)")
    ap.add_argument("--out", default=str(RESULTS / "speed.json"))
    ap.add_argument("--json", action="store_true")
    return ap


def main() -> None:
    args = parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    save_results(args.out, run(args), print_json=args.json, table=table)


if __name__ == "__main__":
    main()
