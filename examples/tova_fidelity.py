"""Run the TOVA example policy on the default model and measure its fidelity
against the full cache, beside the built-in strategies at the same cells.

    python examples/tova_fidelity.py [--prompt-tokens 512] [--max-tokens 256] [--cells 320]

Everything goes through public calls: the benchmark harness's prompt, stock
run and lockstep teacher forcing (scope_edge.bench), and ScopeLlama(policy=...).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tova import tova  # noqa: E402  (the example next to this file)

from scope_edge import Budget, ScopeLlama, models  # noqa: E402
from scope_edge.bench import lockstep, logbook_prompt, stock_reference  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--cells", type=int, default=320, help="cells every policy may hold (prefill + decode)")
    args = ap.parse_args()
    path = str(models.fetch())
    prompt = logbook_prompt(path, args.prompt_tokens)
    stock = stock_reference(path, prompt, args.max_tokens)
    prefill = args.cells * 3 // 5  # the README's 192:128 split of 320 cells
    budget = Budget(prefill=prefill, decode=args.cells - prefill)
    llms = {"tova (example)": ScopeLlama(path, policy=tova(total=args.cells))}
    for strategy in ("slide", "streaming", "h2o"):
        llms[strategy] = ScopeLlama(path, budget=budget, strategy=strategy)
    eog = np.array(llms["slide"].model.eog_tokens(), dtype=np.int64)
    try:
        results, _ = lockstep(stock.logits, list(llms.values()), prompt, stock.tokens, eog)
    finally:
        for llm in llms.values():
            llm.close()
    print(f"prompt {args.prompt_tokens} + {args.max_tokens} teacher-forced tokens, {args.cells} cells each "
          f"({args.cells / (args.prompt_tokens + args.max_tokens):.0%} of the full cache's cells)")
    print(f"{'policy':<16} {'top-1':>7} {'mean KL':>8}")
    for name, fid in zip(llms, results):
        d = fid.as_dict()
        print(f"{name:<16} {d['top1_agreement']:>7.1%} {d['mean_kl']:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
