"""KV bytes allocated and peak process RSS, ours vs stock, over a grid of
prompt and generation lengths; every configuration in a fresh subprocess.

    python bench/memory.py [--prompts 512 2048] [--gens 512 2048 4096] \
        [--prefill-budget 1024] [--decode-budget 512] [--steps 8] [--json]

Each child loads the model, allocates the cache for prompt + gen tokens
(stock: llama_cpp.Llama with n_ctx = prompt + gen; ours: ScopeLlama under the
budgets, which sizes its context for the whole generation before prefill),
prefills the prompt and decodes `--steps` tokens, then reports
ru_maxrss. llama.cpp zeroes the KV buffer when it creates the context, so the
whole allocation is resident from the start: decoding the remaining tokens
would not raise the peak (compute buffers are reserved at creation too).
Writes bench/results/memory.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from scope_edge.bench import save_results

log = logging.getLogger("bench.memory")
RESULTS = Path(__file__).resolve().parent / "results"


def child(kind: str, prompt_tokens: int, gen: int, prefill: int, decode: int, steps: int) -> dict:
    """Runs in the subprocess: one configuration, one JSON line."""
    from scope_edge import Budget, ScopeLlama, memory, models
    from scope_edge.bench import eog_tokens, logbook_prompt, peak_rss_bytes
    from scope_edge.protocol import stock_greedy

    path = str(models.fetch())
    prompt = logbook_prompt(path, prompt_tokens)
    rss_before = peak_rss_bytes()
    if kind == "stock":
        run = stock_greedy(path, prompt, min(steps, gen), eog=eog_tokens(path), n_ctx=prompt_tokens + gen)
        cells, kv = run["n_ctx"], run["kv_bytes"]
    else:
        budget = Budget(prefill=prefill, decode=decode, recent_window=min(256, decode))
        with ScopeLlama(path, budget=budget, strategy=kind) as llm:
            for i, _ in enumerate(llm.stream(prompt, max_tokens=gen, ignore_eos=True)):
                if i + 1 >= steps:
                    break
            cells = llm.n_ctx
            kv = memory.kv_bytes(llm.geometry, cells, "f16", "f16")
    return {"kind": kind, "prompt_tokens": prompt_tokens, "gen": gen, "kv_cells": cells, "kv_bytes": kv,
            "peak_rss_bytes": peak_rss_bytes(), "rss_before_model_bytes": rss_before}


def run_child(kind: str, p: int, g: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(p), str(g), "--prefill-budget", str(args.prefill_budget),
           "--decode-budget", str(args.decode_budget), "--steps", str(args.steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(res: dict) -> str:
    mib = 2**20
    lines = [f"{'prompt':>6} {'gen':>5} {'stock KV':>9} {'ours KV':>8} {'KV %':>6} {'stock RSS':>9} {'ours RSS':>8} "
             f"{'RSS %':>6}  (MiB)"]
    for r in res["rows"]:
        s, o = r["stock"], r["ours"]
        lines.append(f"{r['prompt_tokens']:6d} {r['gen']:5d} {s['kv_bytes'] / mib:9.1f} {o['kv_bytes'] / mib:8.1f} "
                     f"{r['kv_ratio']:6.1%} {s['peak_rss_bytes'] / mib:9.1f} {o['peak_rss_bytes'] / mib:8.1f} "
                     f"{r['rss_ratio']:6.1%}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--gens", type=int, nargs="+", default=[512, 2048, 4096])
    ap.add_argument("--prefill-budget", type=int, default=1024)
    ap.add_argument("--decode-budget", type=int, default=512)
    ap.add_argument("--strategy", default="slide")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--child", nargs=3, metavar=("KIND", "PROMPT", "GEN"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS / "memory.json"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.child:
        kind, p, g = args.child
        print(json.dumps(child(kind, int(p), int(g), args.prefill_budget, args.decode_budget, args.steps)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    grid = [(p, g) for p in args.prompts for g in args.gens]
    rows = []
    for p, g in tqdm(grid, desc="memory grid"):
        stock, ours = run_child("stock", p, g, args), run_child(args.strategy, p, g, args)
        rows.append({"prompt_tokens": p, "gen": g, "stock": stock, "ours": ours,
                     "kv_ratio": ours["kv_bytes"] / stock["kv_bytes"],
                     "rss_ratio": ours["peak_rss_bytes"] / stock["peak_rss_bytes"]})
    res = {"budget": {"prefill": args.prefill_budget, "decode": args.decode_budget}, "strategy": args.strategy,
           "steps": args.steps, "rows": rows}
    save_results(args.out, res, print_json=args.json, table=table)


if __name__ == "__main__":
    main()
