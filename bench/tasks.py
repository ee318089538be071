"""A long-generation task suite in the LongGenBench spirit, scored by program.

    python bench/tasks.py [--items 30] [--seeds 3] [--prefill-budget 96] \
        [--decode-budget 64] [--strategies full slide ...] [--json]

Each prompt (through the chat template) is "Repeat this list:" and `--items`
lines "violin 85". One long output answers every item; each line needs a
different part of the prompt (its list line) and of the model's own earlier
output (where it is in the list, what it already wrote). Score: an item
counts when its exact line "name number" appears in the output; accuracy =
items found / items, averaged over `--seeds` prompts.

Sizing: the 135M default model, full cache, greedy, copies about a third of
a 30-item list exactly; it fails at reasoning tasks (arithmetic, JSON
conversion) and, with a long distractor before or after the list, copies the
distractor instead. So the suite is short-prompt copying, and the budgets are
set to the headline's memory ratio instead: prefill 96 + decode 64 cells for
a ~210-token prompt and 240 generated tokens (about 35% of the full cache).

"full" is the uncompressed cache (budget=None), the ceiling. Every other
strategy gets the same cells: SCOPE prefill + decode budgets; streaming and
h2o their sum. Writes bench/results/tasks.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from scope_edge import Budget, ScopeLlama, models
from scope_edge.bench import SYSTEM, machine, make_tokenizer

log = logging.getLogger("bench.tasks")
RESULTS = Path(__file__).resolve().parent / "results"
ITEMS = ["violin", "kettle", "lantern", "compass", "teapot", "drum", "clock", "umbrella", "anchor", "mirror",
         "basket", "helmet", "candle", "saddle", "trumpet", "globe", "ladder", "hammer", "rocket", "pillow",
         "blanket", "bucket", "camera", "guitar", "jacket", "kite", "lamp", "necklace", "oven", "pencil",
         "quilt", "radio", "scarf", "tractor", "vase", "wallet", "whistle", "yacht", "zipper", "banjo"]


@dataclass(frozen=True)
class Task:
    prompt: str
    answers: list[str]  # the list's lines, "violin 85"


def make_task(n_items: int, seed: int) -> Task:
    if n_items > len(ITEMS):
        raise ValueError(f"at most {len(ITEMS)} items, got {n_items}")
    rng = random.Random(seed)
    answers = [f"{item} {rng.randint(10, 99)}" for item in rng.sample(ITEMS, n_items)]
    user = "Repeat this list:\n" + "\n".join(answers)
    prompt = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
              f"<|im_start|>assistant\n")
    return Task(prompt, answers)


def score(task: Task, text: str) -> float:
    """Fraction of list lines ("violin 85") found verbatim in the output."""
    found = {" ".join(m.groups()).lower() for m in re.finditer(r"([A-Za-z]+)\s+(\d+)", text)}
    return sum(line in found for line in task.answers) / len(task.answers)


def run(strategies: list[str], n_items: int, seeds: int, prefill: int, decode: int,
        recent: int, max_tokens: int) -> dict:
    path = str(models.fetch())
    tokenize = make_tokenizer(path)
    budget = Budget(prefill=prefill, decode=decode, observation_window=8, recent_window=min(recent, decode))
    tasks = [make_task(n_items, seed) for seed in range(seeds)]
    out: dict = {"items": n_items, "seeds": seeds, "max_tokens": max_tokens,
                 "budget": {"prefill": prefill, "decode": decode, "recent": budget.recent_window},
                 "prompt_tokens": [len(tokenize(t.prompt)) for t in tasks], "machine": machine(), "results": {}}
    for strategy in strategies:
        kw = {"budget": None} if strategy == "full" else {"budget": budget, "strategy": strategy}
        accs, cells, texts = [], 0, []
        with ScopeLlama(path, **kw) as llm:
            for task in tqdm(tasks, desc=strategy, leave=False):
                c = llm.generate(task.prompt, max_tokens=max_tokens)
                accs.append(score(task, c.text))
                cells = max(cells, c.stats.kv_cells_peak)
                texts.append(c.text)
        out["results"][strategy] = {"accuracy": sum(accs) / len(accs), "per_prompt": accs,
                                    "kv_cells_peak": cells, "sample": texts[0][:400]}
        log.info("%s: accuracy %.3f (peak cells %d)", strategy, sum(accs) / len(accs), cells)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--prefill-budget", type=int, default=96)
    ap.add_argument("--decode-budget", type=int, default=64)
    ap.add_argument("--recent-window", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=240)
    ap.add_argument("--strategies", nargs="+",
                    default=["full", "slide", "adaptive", "discontinuous", "streaming", "h2o"])
    ap.add_argument("--out", default=str(RESULTS / "tasks.json"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    res = run(args.strategies, args.items, args.seeds, args.prefill_budget, args.decode_budget,
              args.recent_window, args.max_tokens)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    if args.json:
        print(json.dumps(res))
        return
    print(f"prompt tokens {res['prompt_tokens']}, budgets {res['budget']}")
    print(f"{'strategy':14} {'accuracy':>8} {'decode peak cells':>17}")
    for name, r in res["results"].items():
        print(f"{name:14} {r['accuracy']:8.1%} {r['kv_cells_peak']:17d}")


if __name__ == "__main__":
    main()
