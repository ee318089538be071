"""The issue's headline configuration for every strategy, in one run.

    python bench/headline.py [--prompt-tokens 2048] [--max-tokens 4096] \
        [--prefill-budget 1024] [--decode-budget 512] [--strategies slide ...]

All strategies get the same cells (SCOPE: prefill + decode budgets; the
unified baselines streaming and h2o: their sum). The stock run and the
full-cache reference are measured once and shared (scope_edge.bench.run_many);
every compressed cache is teacher-forced in one lockstep pass.
Writes bench/results/headline.json and prints a table.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from scope_edge.bench import BenchConfig, run_many, save_results
from scope_edge.policies import STRATEGIES

RESULTS = Path(__file__).resolve().parent / "results"


def table(rows: list[dict]) -> str:
    s = rows[0]["stock"]
    out = [f"stock: KV {s['kv_bytes'] / 2**20:.1f} MiB, prefill {s['prefill_tokens_per_s']:.0f} tok/s, "
           f"decode {s['decode_tokens_per_s']:.1f} tok/s",
           f"{'strategy':14} {'KV MiB':>7} {'KV/stock':>8} {'decode':>7} {'x stock':>7} {'ideal':>6} "
           f"{'top-1':>6} {'mean KL':>8} {'max KL':>7} {'prefix':>6} {'ROUGE-L':>7}"]
    for r in rows:
        o, f, q = r["ours"], r["fidelity"], r["ratios"]
        line = (f"{r['config']['strategy']:14} {o['kv_bytes'] / 2**20:7.1f} {q['kv_bytes']:8.1%} "
                f"{o['decode_tokens_per_s']:7.1f} {q['decode_speedup']:7.2f} {r['ideal']['decode_tokens_per_s']:6.1f}")
        if f is not None:
            line += (f" {f['top1_agreement']:6.1%} {f['mean_kl']:8.4f} {f['max_kl']:7.2f} {f['identical_prefix']:6d} "
                     f"{f['rouge_l']:7.3f}")
        out.append(line)
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--prefill-budget", type=int, default=1024)
    ap.add_argument("--decode-budget", type=int, default=512)
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    ap.add_argument("--no-fidelity", action="store_true", help="memory and speed only (no lockstep pass)")
    ap.add_argument("--out", default=str(RESULTS / "headline.json"))
    ap.add_argument("--json", action="store_true", help="print one JSON array as the last line")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfgs = [BenchConfig(prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, strategy=s,
                        prefill_budget=args.prefill_budget, decode_budget=args.decode_budget,
                        fidelity=not args.no_fidelity)
            for s in args.strategies]
    rows = run_many(cfgs)
    save_results(args.out, rows, print_json=args.json, table=table)


if __name__ == "__main__":
    main()
