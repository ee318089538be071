"""Fidelity of slide when only some layers' attention scores the cells.

    python bench/capture_layers.py [--seeds 0 1 2] [--budgets 96:64 192:128 320:192] [--json]

Offloaded, every captured layer costs one device synchronisation per
captured step (README "Offload"), so ScopeLlama captures every 4th layer
from layer 2 there (runtime.context.default_capture_layers). This measures
what that costs: teacher-forced top-1 and mean KL against the full cache
(prompt 512 + 256, the fidelity.json setting) for slide capturing every
layer, the offload default, the upper half and the upper quarter, on the
logbooks of several seeds, all compressed caches in one lockstep pass per
prompt and budget. Layer choice does not depend on the backend, so this runs
on the CPU.

Writes bench/results/capture_layers.json and prints tables.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from scope_edge import Budget, ScopeLlama, models
from scope_edge.bench import budget_pairs, lockstep, logbook_prompt, machine, save_results, stock_reference
from scope_edge.runtime.context import default_capture_layers

log = logging.getLogger("bench.capture_layers")
RESULTS = Path(__file__).resolve().parent / "results"


def layer_sets(n_layer: int) -> dict[str, list[int]]:
    return {"every layer": list(range(n_layer)),
            "offload default": default_capture_layers(n_layer, offloaded=True) or list(range(n_layer)),
            "upper half": list(range(n_layer // 2, n_layer)),
            "upper quarter": list(range(n_layer - n_layer // 4, n_layer))}


def measure(path: str, seed: int, budget: Budget, sets: dict[str, list[int]], *, prompt_tokens: int,
            max_tokens: int) -> list[dict]:
    prompt = logbook_prompt(path, prompt_tokens, seed)
    stock = stock_reference(path, prompt, max_tokens)
    llms = [ScopeLlama(path, budget=budget, strategy="slide", capture_layers=layers) for layers in sets.values()]
    try:
        eog = np.array(llms[0].model.eog_tokens(), dtype=np.int64)
        res, _ = lockstep(stock.logits, llms, prompt, stock.tokens, eog, progress=True)
    finally:
        for llm in llms:
            llm.close()
    return [{"seed": seed, "budget": f"{budget.prefill}:{budget.decode}", "layers": name, "captured": len(layers),
             **r.as_dict()} for (name, layers), r in zip(sets.items(), res)]


def means(rows: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["budget"], r["layers"]), []).append(r)
    return [{"budget": b, "layers": name, "captured": rs[0]["captured"], "prompts": len(rs),
             "top1_agreement": float(np.mean([r["top1_agreement"] for r in rs])),
             "mean_kl": float(np.mean([r["mean_kl"] for r in rs]))} for (b, name), rs in groups.items()]


def table(out: dict) -> str:
    lines = [f"{'budget':>8} {'layers':16} {'captured':>8} {'top-1':>6} {'mean KL':>8}  (mean of "
             f"{out['means'][0]['prompts']} prompts)"]
    lines += [f"{m['budget']:>8} {m['layers']:16} {m['captured']:8d} {m['top1_agreement']:6.1%} {m['mean_kl']:8.4f}"
              for m in out["means"]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--budgets", nargs="+", default=["96:64", "192:128", "320:192"], help="prefill:decode pairs")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="logbook prompts (their seeds)")
    ap.add_argument("--out", default=str(RESULTS / "capture_layers.json"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    path = str(models.fetch())
    budgets = [Budget(prefill=prefill, decode=decode, recent_window=max(1, decode // 2))
               for prefill, decode in budget_pairs(args.budgets)]
    with ScopeLlama(path, budget=None) as llm:
        sets = layer_sets(llm.model.n_layer)
    rows = []
    for seed in args.seeds:
        for budget in budgets:
            rows += measure(path, seed, budget, sets, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens)
            log.info("seed %d budget %d:%d done", seed, budget.prefill, budget.decode)
    out = {"prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "machine": machine(),
           "layer_sets": sets, "runs": rows, "means": means(rows)}
    save_results(args.out, out, print_json=args.json, table=table)


if __name__ == "__main__":
    main()
