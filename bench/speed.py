"""Prefill and decode tok/s against context length: stock, ours, ideal; plus
the hook's own overhead (bench/hook_overhead.py, reused).

    python bench/speed.py [--contexts 512 1024 2048 4096] [--steps 64] \
        [--prefill-budget 1024] [--decode-budget 512] [--hook-cached 2048 7000] [--json]

For each context length L (same run, interleaved):
  stock  llama_cpp.Llama, n_ctx = L + steps: prefill L tokens, time `steps`
         greedy decodes (the cache holds L..L+steps tokens).
  ours   ScopeLlama(budget, slide): prefill the same L tokens, generate
         decode_budget + steps tokens and time the last `steps` (the decode
         cache is then full: what decoding costs in steady state at context L).
  ideal  stock in a context of our allocated cells, filled to that level
         (scope_edge.bench.run_ideal): the speed our cells allow.
Writes bench/results/speed.json and prints a table.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

from scope_edge import Budget, ScopeLlama, models
from scope_edge.bench import logbook_prompt, machine, run_ideal, run_stock, save_results

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hook_overhead  # noqa: E402  (bench/ is not a package)

log = logging.getLogger("bench.speed")
RESULTS = Path(__file__).resolve().parent / "results"


def time_ours(path: str, prompt: list[int], budget: Budget, steps: int) -> dict:
    with ScopeLlama(path, budget=budget, strategy="slide") as llm:
        stamps: list[float] = []
        last = None
        for last in llm.stream(prompt, max_tokens=budget.decode + steps, ignore_eos=True):
            stamps.append(time.perf_counter())
        assert last is not None and last.stats is not None
        tail = stamps[-steps - 1:]
        return {"prefill_tokens_per_s": last.stats.prefill_tokens_per_s,
                "decode_tokens_per_s": steps / (tail[-1] - tail[0]), "kv_cells": last.stats.kv_cells_allocated}


def table(res: dict) -> str:
    lines = [f"{'context':>7} {'stock pf':>8} {'ours pf':>8} {'stock dec':>9} {'ours dec':>8} {'ideal dec':>9} "
             f"{'ours/stock':>10}"]
    for r in res["rows"]:
        s, o, i = r["stock"], r["ours"], r["ideal"]
        lines.append(f"{r['context']:7d} {s['prefill_tokens_per_s']:8.1f} {o['prefill_tokens_per_s']:8.1f} "
                     f"{s['decode_tokens_per_s']:9.1f} {o['decode_tokens_per_s']:8.1f} {i['decode_tokens_per_s']:9.1f} "
                     f"{o['decode_tokens_per_s'] / s['decode_tokens_per_s']:10.2f}")
    for n, h in res.get("hook_overhead", {}).get("results", {}).items():
        lines.append(f"hook overhead at {n} cached: hook/stock {h['hook_vs_stock']:.3f}, "
                     f"capture/stock {h['capture_vs_stock']:.3f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prefill-budget", type=int, default=1024)
    ap.add_argument("--decode-budget", type=int, default=512)
    ap.add_argument("--hook-cached", type=int, nargs="*", default=[2048, 7000], help="hook_overhead contexts ([] skips)")
    ap.add_argument("--hook-repeats", type=int, default=3, help="hook_overhead repeats (medians)")
    ap.add_argument("--out", default=str(RESULTS / "speed.json"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    path = str(models.fetch())
    budget = Budget(prefill=args.prefill_budget, decode=args.decode_budget, recent_window=min(256, args.decode_budget))
    rows, ideals = [], {}
    for n in tqdm(args.contexts, desc="contexts"):
        prompt = logbook_prompt(path, n)
        stock = run_stock(path, prompt, args.steps, "f16")
        ours = time_ours(path, prompt, budget, args.steps)
        if ours["kv_cells"] not in ideals:
            ideals[ours["kv_cells"]] = run_ideal(path, ours["kv_cells"], prompt, args.steps, "f16")
        rows.append({"context": n, "stock": {"prefill_tokens_per_s": stock.prefill_tokens_per_s,
                                             "decode_tokens_per_s": stock.decode_tokens_per_s, "kv_cells": stock.n_ctx},
                     "ours": ours, "ideal": ideals[ours["kv_cells"]]})
        log.info("context %d: stock %.1f, ours %.1f, ideal %.1f tok/s", n, stock.decode_tokens_per_s,
                 ours["decode_tokens_per_s"], ideals[ours["kv_cells"]]["decode_tokens_per_s"])
    res = {"steps": args.steps, "budget": {"prefill": budget.prefill, "decode": budget.decode},
           "rows": rows, "machine": machine()}
    if args.hook_cached:
        res["hook_overhead"] = hook_overhead.run(args.hook_cached, args.steps, args.hook_repeats)
    save_results(args.out, res, print_json=args.json, table=table)


if __name__ == "__main__":
    main()
