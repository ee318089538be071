"""Multi-turn chats past the default budget (issue #30, "structure kept"):
does keeping the chat template's markers and the system turn out of the
selection (Policy.keep_structure) help a conversation the budget compresses?

    python bench/multiturn.py tune          # tuning conversations (seeds 100..)
    python bench/multiturn.py eval          # evaluation conversations (seeds 0..)
    python bench/multiturn.py report bench/results/multiturn.jsonl

The task. A depot clerk's chat. The system message gives the depot's gate
code and office extension. Each user turn pastes a delivery log of RECORDS
records (~150 tokens) and asks one question: on log turns about the log's
first record ("Who brought the first delivery in this log?", "What did
<name> bring?"), on the rule_turns() "What is the gate code?" (third last)
and "What is the office extension?" (last), each asked once, answered from
the system message only. turns_for(1024) = 8 turns make ~1,400 tokens; the
budget (768 cells: 512 prompt, 256 output) is passed from turn 4 or 5, so
both rule questions come after evictions began.

Why at CELLS = 1,024 and not the default model's 2,048: on the shared 2-core
machine a 2,800-token conversation took 110 s per configuration with one
thread, so 20 conversations x 3 configurations did not fit the time given.
ScopeLlama(n_ctx=1024) with no policy arguments runs the default budget's
rule for 1,024 cells (policies/registry.py default_budget), the same code
path at the same ratios (a quarter of the cells for the output, the
conversation 1.8x the budget); `--cells 2048` runs the default model's own
default (16 turns, ~2,800 tokens), for a machine with the time.

Scored per turn: correct (the answer appears in the reply), stop (the reply
ends on the end-of-turn token within max_tokens and neither emits a turn
marker nor writes a turn of the user's), agree (the reply is the full
cache's, same conversation and turn). "Compressed" turns are those whose
prompt and reply pass the budget's cells in the full cache's run (before
them all three configurations are token-identical by construction).

Configurations: full (budget=None), default (ScopeLlama() with no policy
arguments), structure (the default with keep_structure=True). One worker,
one llama.cpp thread, the three configurations of a conversation in turn;
each conversation's runs are appended to the JSONL as they end.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from scope_edge import ScopeLlama, models
from scope_edge.bench import machine

log = logging.getLogger("bench.multiturn")
RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ("full", "default", "structure")
TUNING_SEED = 100
RECORDS = 7
MAX_TOKENS = 32
# The allocation the default budget is taken for (ScopeLlama(n_ctx=CELLS) with
# no policy arguments): 1,024 cells give Budget(prefill=512, decode=256), the
# default's rule at half the default model's 2,048 cells (see the module doc).
CELLS = 1024


def turns_for(cells: int) -> int:
    """Turns of a conversation: 8 per 1,024 cells (~1.8x the budget)."""
    return 8 * cells // 1024


def rule_turns(turns: int) -> dict[int, str]:
    """The turns (1-based) that ask the system message's facts, once each: the
    third last and the last, past the budget."""
    return {turns - 2: "code", turns: "extension"}

FIRST = ["Alice", "Bruno", "Carla", "David", "Elena", "Felix", "Grace", "Hugo", "Irene", "James", "Karen", "Louis",
         "Maria", "Nadia", "Oscar", "Paula", "Rosa", "Simon", "Tina", "Omar", "Vera", "Walter", "Zoe", "Anna"]
NOUNS = ("apples bananas carrots onions lemons peaches potatoes tomatoes candles pencils towels bottles spoons cups "
         "plates jars boxes nails ropes bulbs forks knives bowls pans kettles mugs buckets brooms lamps chairs").split()
CITIES = ["Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Dublin", "Lisbon", "Oslo", "Warsaw",
          "Athens"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
WORDS = ("falcon river copper maple orbit velvet cactus harbor lantern meadow pepper quartz saddle timber walnut "
         "anchor bamboo cobalt dragon ember glacier hazel island jasper kettle lemon marble nectar olive pebble").split()


@dataclass(frozen=True)
class Turn:
    user: str
    kind: str  # "log" (from this turn's log) or "rule" (from the system message)
    answer: str


@dataclass(frozen=True)
class Conversation:
    seed: int
    system: str
    turns: list[Turn]


def make_conversation(seed: int, turns: int = turns_for(CELLS)) -> Conversation:
    rng = random.Random(seed)
    code, extension = str(rng.randint(1000, 9999)), str(rng.randint(100, 999))
    system = (f"You are the clerk of the {rng.choice(CITIES)} depot. The gate code is {code}. The office extension "
              f"is {extension}. Answer each question in one short sentence.")
    rules, out = rule_turns(turns), []
    for k in range(1, turns + 1):
        records = [(p, rng.randint(2, 60), rng.choice(NOUNS)) for p in rng.sample(FIRST, RECORDS)]
        lines = [f"{p} brought {n} {noun} (truck {rng.choice('ABCDEF')}, from {rng.choice(CITIES)}, "
                 f"on {rng.choice(DAYS)})." for p, n, noun in records]
        rule = rules.get(k)
        if rule == "code":
            question, kind, answer = "What is the gate code?", "rule", code
        elif rule == "extension":
            question, kind, answer = "What is the office extension?", "rule", extension
        elif k % 2:
            question, kind, answer = "Who brought the first delivery in this log?", "log", records[0][0]
        else:
            question, kind, answer = f"What did {records[0][0]} bring?", "log", records[0][2]
        out.append(Turn(f"Delivery log {k}:\n" + "\n".join(lines) + f"\n\n{question}", kind, answer))
    return Conversation(seed, system, out)


def open_config(path: str, config: str, cells: int) -> ScopeLlama:
    """A fixed n_ctx, so a turn never finds the context too small: sized per
    generation, a context that must grow is re-created empty and the whole
    history prefilled again (runtime/cache.py), which makes a conversation
    quadratic. ScopeLlama(n_ctx=cells) with no policy arguments runs the
    default budget for those cells, whose largest allocation they are; the
    full cache gets twice as many, which hold a whole conversation."""
    if config == "full":
        return ScopeLlama(path, budget=None, n_ctx=2 * cells, n_threads=1)
    llm = ScopeLlama(path, n_ctx=cells, n_threads=1)  # the default budget, no policy arguments
    keep = config == "structure"
    if llm.policy is not None and llm.policy.keep_structure != keep:  # whatever the default
        llm.policy = dataclasses.replace(llm.policy, keep_structure=keep)  # (clears llm.budget)
    return llm


_IMITATION = re.compile(r"(^|\n)\s*(user|assistant|system)\s*(\n|:)|delivery log \d", re.IGNORECASE)


def run_conversation(llm: ScopeLlama, conv: Conversation, marker: int) -> list[dict]:
    """Every turn of conv as a chat continued on the cache; marker: the
    template's turn-opening token (a reply that emits it imitates a turn)."""
    messages = [{"role": "system", "content": conv.system}]
    out = []
    for k, turn in enumerate(conv.turns, 1):
        messages.append({"role": "user", "content": turn.user})
        t0 = time.perf_counter()
        pieces, tokens, last = [], [], None
        for last in llm.chat(messages, max_tokens=MAX_TOKENS):
            pieces.append(last.text)
            if last.token is not None:
                tokens.append(last.token)
        assert last is not None and last.stats is not None
        reply, st = "".join(pieces), last.stats
        messages.append({"role": "assistant", "content": reply})
        stop = last.finish_reason == "stop" and marker not in tokens and not _IMITATION.search(reply)
        out.append({"turn": k, "kind": turn.kind, "answer": turn.answer, "reply": reply,
                    "correct": turn.answer.lower() in reply.lower(), "stop": stop,
                    "finish_reason": last.finish_reason, "prompt_tokens": st.prompt_tokens,
                    "generated_tokens": st.generated_tokens, "kv_cells_allocated": st.kv_cells_allocated,
                    "kv_bytes_allocated": st.kv_bytes_allocated, "stock_kv_bytes": st.stock_kv_bytes, "evicted_cells": st.evicted_cells,
                    "structure_cells": st.structure_cells, "held_cells": len(llm.kv_positions()),
                    "seconds": round(time.perf_counter() - t0, 2)})
    return out


def run(seeds: list[int], out: Path, cells: int, configs: tuple[str, ...] = CONFIGS) -> None:
    """Each seed's conversation under each of configs in turn, appended to out
    as it ends (a later run with other configs or seeds appends to the same
    file; the report pairs the rows by seed)."""
    path = str(models.fetch())
    llms = {c: open_config(path, c, cells) for c in configs}
    probe = ScopeLlama(path, n_ctx=cells, n_threads=1)  # the default budget for cells, whatever configs run
    try:
        marker = probe.tokenize("<|im_start|>")[-1]
        budget = probe.budget
        if budget is None or budget.prefill + max(budget.decode, 512) != cells:
            raise RuntimeError(f"the default budget for {cells} cells is {budget}: a model other than the default one?")
        for seed in seeds:
            conv = make_conversation(seed, turns_for(cells))
            for config, llm in llms.items():
                t0 = time.perf_counter()
                turns = run_conversation(llm, conv, marker)
                row = {"config": config, "seed": seed, "cells": cells, "budget": [budget.prefill, budget.decode],
                       "machine": machine(), "seconds": round(time.perf_counter() - t0, 1), "turns": turns}
                with open(out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                log.info("seed %d %s: correct %d/%d, stop %d/%d, %d tokens, %.0f s", seed, config,
                         sum(t["correct"] for t in turns), len(turns), sum(t["stop"] for t in turns), len(turns),
                         turns[-1]["prompt_tokens"] + turns[-1]["generated_tokens"], row["seconds"])
    finally:
        probe.close()
        for llm in llms.values():
            llm.close()


# -- report ------------------------------------------------------------------
def _mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval (normal approximation)."""
    m = statistics.fmean(xs)
    return m, 1.96 * statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0


def _paired_ci(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b per conversation with its 95% interval."""
    return _mean_ci([x - y for x, y in zip(a, b)])


def load(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    seeds = [s for s in dict.fromkeys(r["seed"] for r in rows)
             if {r["config"] for r in rows if r["seed"] == s} == set(CONFIGS)]  # whole conversations only
    return [r for r in rows if r["seed"] in seeds]


def summary(rows: list[dict]) -> dict:
    """Per configuration and turn group: per-conversation means, then their
    mean with a 95% interval (conversations are the independent units)."""
    by = {(r["config"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    total = sum(rows[0]["budget"])
    out: dict = {"n_conversations": len(seeds), "budget_cells": total}
    groups = {
        "all turns": lambda t, f: True,
        "compressed turns": lambda t, f: f["prompt_tokens"] + f["generated_tokens"] > total,
        "compressed log turns": lambda t, f: f["prompt_tokens"] + f["generated_tokens"] > total and t["kind"] == "log",
        "compressed rule turns": lambda t, f: f["prompt_tokens"] + f["generated_tokens"] > total
        and t["kind"] == "rule",
    }
    for config in CONFIGS:
        res: dict = {}
        for name, keep in groups.items():
            per: dict[str, list[float]] = {"correct": [], "stop": [], "agree": []}
            for s in seeds:
                pairs = [(t, f) for t, f in zip(by[config, s]["turns"], by["full", s]["turns"]) if keep(t, f)]
                if not pairs:
                    continue
                per["correct"].append(statistics.fmean(t["correct"] for t, _ in pairs))
                per["stop"].append(statistics.fmean(t["stop"] for t, _ in pairs))
                per["agree"].append(statistics.fmean(t["reply"] == f["reply"] for t, f in pairs))
            res[name] = {k: _mean_ci(v) for k, v in per.items() if v}
            res[name]["turns"] = sum(1 for s in seeds for t, f in zip(by[config, s]["turns"], by["full", s]["turns"])
                                     if keep(t, f))
            if config != "default" and per["correct"]:
                for metric in ("correct", "stop"):
                    base = [statistics.fmean(t[metric] for t, f in zip(by["default", s]["turns"],
                                                                        by["full", s]["turns"]) if keep(t, f))
                            for s in seeds if any(keep(t, f) for t, f in zip(by[config, s]["turns"],
                                                                              by["full", s]["turns"]))]
                    res[name][f"{metric}_minus_default"] = _paired_ci(per[metric], base)
        res["kv_bytes_allocated_max"] = max(t["kv_bytes_allocated"] for s in seeds for t in by[config, s]["turns"])
        res["stock_kv_bytes_max"] = max(t["stock_kv_bytes"] for s in seeds for t in by[config, s]["turns"])
        res["evicted_cells_mean"] = statistics.fmean(sum(t["evicted_cells"] for t in by[config, s]["turns"])
                                                     for s in seeds)
        res["structure_cells_max"] = max(t["structure_cells"] for s in seeds for t in by[config, s]["turns"])
        res["conversation_tokens"] = [min(by[config, s]["turns"][-1]["prompt_tokens"] for s in seeds),
                                      max(by[config, s]["turns"][-1]["prompt_tokens"] for s in seeds)]
        out[config] = res
    return out


def table(sm: dict) -> str:
    lines = [f"{sm['n_conversations']} conversations, budget {sm['budget_cells']} cells; "
             "per-conversation means, mean ± 95% interval"]
    for group in ("all turns", "compressed turns", "compressed log turns", "compressed rule turns"):
        lines.append(f"-- {group}")
        for config in CONFIGS:
            g = sm[config][group]
            if "correct" not in g:
                continue
            d = "".join(f" | {m} - default {g[f'{m}_minus_default'][0]:+.1%} ± {g[f'{m}_minus_default'][1]:.1%}"
                        for m in ("correct", "stop") if f"{m}_minus_default" in g)
            lines.append(f"   {config:10} correct {g['correct'][0]:6.1%} ± {g['correct'][1]:5.1%} | "
                         f"stop {g['stop'][0]:6.1%} ± {g['stop'][1]:5.1%} | agree {g['agree'][0]:6.1%} ± "
                         f"{g['agree'][1]:5.1%} | {g['turns']} turns{d}")
    for config in CONFIGS:
        x = sm[config]
        lines.append(f"   {config:10} KV allocated (max) {x['kv_bytes_allocated_max'] / 2**20:.1f} MiB (stock for the "
                     f"same tokens {x['stock_kv_bytes_max'] / 2**20:.1f} MiB), evicted "
                     f"{x['evicted_cells_mean']:.0f} cells per conversation, structure cells (max) "
                     f"{x['structure_cells_max']}, last prompt {x['conversation_tokens'][0]}-"
                     f"{x['conversation_tokens'][1]} tokens")
    return "\n".join(lines)


def _configs(text: str) -> tuple[str, ...]:
    names = tuple(c.strip() for c in text.split(",") if c.strip())
    bad = [c for c in names if c not in CONFIGS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"configurations {bad or names}: valid are {', '.join(CONFIGS)}")
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["tune", "eval", "report"])
    ap.add_argument("files", nargs="*", help="report: the JSONL to summarise")
    ap.add_argument("--conversations", type=int, default=None)
    ap.add_argument("--out", default=None, help="JSONL the runs are appended to")
    ap.add_argument("--cells", type=int, default=CELLS, help="the allocation whose default budget is measured")
    ap.add_argument("--configs", type=_configs, default=CONFIGS,
                    help=f"comma-separated configurations to run, in this order (default {','.join(CONFIGS)})")
    ap.add_argument("--first-seed", type=int, default=None,
                    help="the first conversation's seed (default 0 for eval, 100 for tune): disjoint seed ranges "
                         "for parallel processes")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.mode == "report":
        sm = summary(load(Path(args.files[0])))
        print(table(sm))
        if len(args.files) > 1:
            Path(args.files[1]).write_text(json.dumps(sm, indent=1))
        return
    tuning = args.mode == "tune"
    n = args.conversations or (2 if tuning else 20)
    first = args.first_seed if args.first_seed is not None else TUNING_SEED if tuning else 0
    out = Path(args.out or RESULTS / f"multiturn_{args.mode}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    run(list(range(first, first + n)), out, args.cells, args.configs)


if __name__ == "__main__":
    main()
