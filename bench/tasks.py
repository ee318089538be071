"""A long-generation task suite in the LongGenBench spirit, scored by program.

    python bench/tasks.py [--items 30] [--seeds 5] [--budgets 96:64 224:64] \
        [--strategies slide ...] [--json]

Each prompt (through the chat template) is "Repeat this list:" and `--items`
lines "violin 85". One long output answers every item; each line needs a
different part of the prompt (its list line) and of the model's own earlier
output (where it is in the list, what it already wrote). Score: an item
counts when its exact line "name number" appears in the output; accuracy =
items found / items, averaged over `--seeds` prompts.

Sizing: the 135M default model, full cache, greedy, copies about a third of
a 30-item list exactly; it fails at reasoning tasks (arithmetic, JSON
conversion) and, with a long distractor before or after the list, copies the
distractor instead. So the suite is short-prompt copying, at two budget
points for a ~210-token prompt and 240 generated tokens: 96:64 (about 35% of
the full cache's cells held; every cache must drop list lines) and 224:64
(about 64%; SCOPE's prefill budget holds the whole list, the unified
baselines must give list cells up to the growing output). What llama.cpp
allocates is reported apart (kv_ratio: KV bytes / stock's for the same
request, prompt + max_tokens, padded to 256 cells as llama.cpp does): at
these sizes 96:64 allocates half of it and 224:64 all of it.

The uncompressed cache (budget=None) is the ceiling. Every strategy gets
the same cells: SCOPE prefill + decode budgets; streaming and
h2o their sum. Writes bench/results/tasks.json and prints a table.
"""
from __future__ import annotations

import argparse
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from scope_edge import Budget, ScopeLlama, memory, models
from scope_edge.bench import SYSTEM_PROMPT, budget_pairs, machine, save_results, vocabulary

log = logging.getLogger("bench.tasks")
RESULTS = Path(__file__).resolve().parent / "results"
ITEMS = ["violin", "kettle", "lantern", "compass", "teapot", "drum", "clock", "umbrella", "anchor", "mirror",
         "basket", "helmet", "candle", "saddle", "trumpet", "globe", "ladder", "hammer", "rocket", "pillow",
         "blanket", "bucket", "camera", "guitar", "jacket", "kite", "lamp", "necklace", "oven", "pencil",
         "quilt", "radio", "scarf", "tractor", "vase", "wallet", "whistle", "yacht", "zipper", "banjo"]


@dataclass(frozen=True)
class Task:
    messages: list[dict[str, str]]  # the system and user turns, rendered by the GGUF's chat template
    answers: list[str]  # the list's lines, "violin 85"


def make_task(n_items: int, seed: int) -> Task:
    if n_items > len(ITEMS):
        raise ValueError(f"at most {len(ITEMS)} items, got {n_items}")
    rng = random.Random(seed)
    answers = [f"{item} {rng.randint(10, 99)}" for item in rng.sample(ITEMS, n_items)]
    user = "Repeat this list:\n" + "\n".join(answers)
    return Task([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}], answers)


def score(task: Task, text: str) -> float:
    """Fraction of list lines ("violin 85") found verbatim in the output."""
    found = {" ".join(m.groups()).lower() for m in re.finditer(r"([A-Za-z]+)\s+(\d+)", text)}
    return sum(line in found for line in task.answers) / len(task.answers)


def accuracy(path: str, tasks: list[Task], prompts: list[str], max_tokens: int, **kw) -> dict:
    """Mean accuracy of one cache configuration (ScopeLlama keywords) over
    tasks, each prompted with its rendered chat (each from an empty cache)."""
    accs, cells, kv_ratio, texts = [], 0, 0.0, []
    geometry = memory.read_geometry(path)
    with ScopeLlama(path, **kw) as llm:
        for task, prompt in tqdm(list(zip(tasks, prompts)), desc=kw.get("strategy", "full"), leave=False):
            c = llm.generate(prompt, max_tokens=max_tokens)
            accs.append(score(task, c.text))
            cells = max(cells, c.stats.kv_cells_peak)
            # stock allocates for the request (prompt + max_tokens), not for the tokens an early stop used
            stock = memory.kv_bytes(geometry, memory.padded_cells(c.stats.prompt_tokens + max_tokens))
            kv_ratio = max(kv_ratio, c.stats.kv_bytes_allocated / stock)
            texts.append(c.text)
    # kv_ratio: the most KV bytes llama.cpp allocated for a prompt, over stock's for the same request
    return {"accuracy": sum(accs) / len(accs), "per_prompt": accs, "kv_cells_peak": cells, "kv_ratio": kv_ratio,
            "sample": texts[0][:400]}


def run(strategies: list[str], n_items: int, seeds: int, budgets: list[tuple[int, int]],
        recent: int, max_tokens: int) -> dict:
    path = str(models.fetch())
    tasks = [make_task(n_items, seed) for seed in range(seeds)]
    with vocabulary(path) as vocab:
        prompts = [vocab.render_chat(t.messages) for t in tasks]
        prompt_tokens = [len(vocab.tokenize(p)) for p in prompts]  # as ScopeLlama.generate tokenizes them
    out: dict = {"items": n_items, "seeds": seeds, "max_tokens": max_tokens,
                 "prompt_tokens": prompt_tokens, "machine": machine(),
                 "full": accuracy(path, tasks, prompts, max_tokens, budget=None), "budgets": []}
    log.info("full cache: accuracy %.3f", out["full"]["accuracy"])
    for prefill, decode in budgets:
        budget = Budget(prefill=prefill, decode=decode, recent_window=min(recent, decode))
        row: dict = {"prefill": prefill, "decode": decode, "recent": budget.recent_window, "results": {}}
        for strategy in strategies:
            row["results"][strategy] = r = accuracy(path, tasks, prompts, max_tokens, budget=budget,
                                                    strategy=strategy)
            log.info("%d:%d %s: accuracy %.3f (peak cells %d)", prefill, decode, strategy, r["accuracy"],
                     r["kv_cells_peak"])
        out["budgets"].append(row)
    return out


def table(res: dict) -> str:
    lines = [f"prompt tokens {res['prompt_tokens']}; full cache accuracy {res['full']['accuracy']:.1%}",
             f"{'budget':>8} {'strategy':14} {'accuracy':>8} {'peak cells':>10} {'KV bytes / stock':>16}"]
    for row in res["budgets"]:
        for name, r in row["results"].items():
            lines.append(f"{row['prefill']:>4}:{row['decode']:<3} {name:14} {r['accuracy']:8.1%} "
                         f"{r['kv_cells_peak']:10d} {r['kv_ratio']:16.1%}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--budgets", nargs="+", default=["96:64", "224:64"], help="prefill:decode pairs")
    ap.add_argument("--recent-window", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=240)
    ap.add_argument("--strategies", nargs="+", default=["slide", "adaptive", "discontinuous", "streaming", "h2o"])
    ap.add_argument("--out", default=str(RESULTS / "tasks.json"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    budgets = budget_pairs(args.budgets)
    res = run(args.strategies, args.items, args.seeds, budgets, args.recent_window, args.max_tokens)
    save_results(args.out, res, print_json=args.json, table=table)


if __name__ == "__main__":
    main()
