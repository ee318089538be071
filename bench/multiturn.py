"""Multi-turn chats past the default budget (issue #30, "structure kept"):
does keeping the chat template's markers and the system turn out of the
selection (Policy.keep_structure) help a conversation the budget compresses?

    python bench/multiturn.py tune          # tuning conversations (seeds 100..)
    python bench/multiturn.py eval          # evaluation conversations (seeds 0..)
    python bench/multiturn.py report bench/results/multiturn.jsonl --summary bench/results/multiturn.json

The task. A depot clerk's chat. The system message gives the depot's gate
code and office extension. Each user turn pastes a delivery log of RECORDS
records (~150 tokens) and asks one question: on log turns about the log's
first record ("Who brought the first delivery in this log?", "What did
<name> bring?"), on the rule_turns() "What is the gate code?" (third last)
and "What is the office extension?" (last), each asked once, answered from
the system message only. turns_for(cells) = 8 turns per 1,024 cells.

--cells 2048 is the default model's own default budget (Budget(1536, 512)):
16 turns, ~2,800 tokens, the budget passed from turn 11 or 12.
CELLS = 1,024 (ScopeLlama(n_ctx=1024) with no policy arguments: the default
budget's rule for 1,024 cells, policies/registry.py default_budget) is the
smaller run of 8 turns, ~1,400 tokens, where the budget is tight relative
to the conversation.

Scored per turn: correct (the answer appears in the reply), stop (the reply
ends on the end-of-turn token within max_tokens and neither emits a turn
marker nor writes a turn of the user's), agree (the reply is the full
cache's, same conversation and turn). "Compressed" turns are those whose
prompt and reply pass the budget's cells in the full cache's run (the
default's where the full cache did not run; see _compressed).

Configurations: full (budget=None), default (ScopeLlama() with no policy
arguments, keep_structure=False), structure (the default as it is, with
keep_structure=True). Each conversation starts on an empty cache. One
llama.cpp thread; --configs chooses the configurations and their order,
--first-seed / --conversations the seeds, so two processes can run disjoint
seeds; each conversation's run is appended to the JSONL as it ends, and
report reads any number of such files.
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
        # the first turn starts an empty cache, so no conversation depends on the one before (chat()
        # would reuse only the shared prefix's cells evicted before it ended: the same answer, docs/budgets.md)
        replies = llm.chat(messages, max_tokens=MAX_TOKENS) if k > 1 else \
            llm.stream(llm.render_chat(messages), max_tokens=MAX_TOKENS, resume=False)
        for last in replies:
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
        if budget is None or budget.total != cells:
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


def load(*paths: Path) -> list[dict]:
    """The runs of the JSONL files (one per process, say), the last of a
    configuration and seed where one was run twice."""
    rows = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rows[r["config"], r["seed"]] = r
    return list(rows.values())


def _compressed(turn: dict, total: int) -> bool:
    """Prompt and reply past the budget's cells (read on the full cache's
    run where there is one, else on the default's: the runs differ by a few
    tokens a turn before the budget is reached, where llama.cpp's numerics
    for contexts of different sizes part at a near tie)."""
    return turn["prompt_tokens"] + turn["generated_tokens"] > total


def summary(rows: list[dict]) -> dict:
    """Per configuration and turn group: per-conversation means, then their
    mean with a 95% interval (conversations are the independent units). The
    decision pair (default, structure) over every conversation both ran; the
    full cache, and agreement with it, over those it also ran."""
    by = {(r["config"], r["seed"]): r for r in rows}
    seeds = sorted(s for s in {r["seed"] for r in rows} if ("default", s) in by and ("structure", s) in by)
    if not seeds:
        raise ValueError("no conversation has both the default and the structure run")
    with_full = [s for s in seeds if ("full", s) in by]
    total = sum(by["default", seeds[0]]["budget"])
    out: dict = {"n_conversations": len(seeds), "n_with_full": len(with_full), "seeds": seeds,
                 "budget_cells": total, "cells": by["default", seeds[0]]["cells"]}
    kinds = {"all turns": None, "compressed turns": None, "compressed log turns": "log",
             "compressed rule turns": "rule"}

    def turns(config: str, s: int, group: str) -> list[dict]:
        """config's turns of conversation s in group, each with the full cache's reply (or None)."""
        full = by["full", s]["turns"] if ("full", s) in by else [None] * len(by["default", s]["turns"])
        ref = by["full" if ("full", s) in by else "default", s]["turns"]
        return [{**t, "full_reply": f and f["reply"]} for t, d, f in zip(by[config, s]["turns"], ref, full)
                if group == "all turns" or _compressed(d, total) and kinds[group] in (None, t["kind"])]

    for config in CONFIGS:
        mine = with_full if config == "full" else seeds
        if not mine:
            continue
        res: dict = {"n_conversations": len(mine)}
        for group in kinds:
            per: dict[str, list[float]] = {"correct": [], "stop": [], "agree": []}
            base: dict[str, list[float]] = {"correct": [], "stop": []}
            for s in mine:
                ts = turns(config, s, group)
                if not ts:
                    continue
                per["correct"].append(statistics.fmean(t["correct"] for t in ts))
                per["stop"].append(statistics.fmean(t["stop"] for t in ts))
                if s in with_full:
                    per["agree"].append(statistics.fmean(t["reply"] == t["full_reply"] for t in ts))
                for metric in base:
                    base[metric].append(statistics.fmean(t[metric] for t in turns("default", s, group)))
            res[group] = {k: _mean_ci(v) for k, v in per.items() if v}
            res[group]["turns"] = sum(len(turns(config, s, group)) for s in mine)
            if config != "default" and per["correct"]:
                for metric in base:
                    res[group][f"{metric}_minus_default"] = _paired_ci(per[metric], base[metric])
        every = [t for s in mine for t in by[config, s]["turns"]]
        res["kv_bytes_allocated_max"] = max(t["kv_bytes_allocated"] for t in every)
        res["stock_kv_bytes_max"] = max(t["stock_kv_bytes"] for t in every)
        res["evicted_cells_mean"] = statistics.fmean(sum(t["evicted_cells"] for t in by[config, s]["turns"])
                                                     for s in mine)
        res["structure_cells_max"] = max(t["structure_cells"] for t in every)
        res["conversation_tokens"] = [min(by[config, s]["turns"][-1]["prompt_tokens"] for s in mine),
                                      max(by[config, s]["turns"][-1]["prompt_tokens"] for s in mine)]
        res["seconds_mean"] = statistics.fmean(by[config, s]["seconds"] for s in mine)
        out[config] = res
    return out


def table(sm: dict) -> str:
    lines = [f"{sm['n_conversations']} conversations ({sm['n_with_full']} with the full cache), {sm['cells']} cells, "
             f"budget {sm['budget_cells']} cells; per-conversation means, mean ± 95% interval"]
    configs = [c for c in CONFIGS if c in sm]
    for group in ("all turns", "compressed turns", "compressed log turns", "compressed rule turns"):
        lines.append(f"-- {group}")
        for config in configs:
            g = sm[config][group]
            if "correct" not in g:
                continue
            d = "".join(f" | {m} - default {g[f'{m}_minus_default'][0]:+.1%} ± {g[f'{m}_minus_default'][1]:.1%}"
                        for m in ("correct", "stop") if f"{m}_minus_default" in g)
            agree = f"agree {g['agree'][0]:6.1%} ± {g['agree'][1]:5.1%}" if "agree" in g else "agree   n/a"
            lines.append(f"   {config:10} correct {g['correct'][0]:6.1%} ± {g['correct'][1]:5.1%} | "
                         f"stop {g['stop'][0]:6.1%} ± {g['stop'][1]:5.1%} | {agree} | {g['turns']} turns{d}")
    for config in configs:
        x = sm[config]
        lines.append(f"   {config:10} {x['n_conversations']} conversations, KV allocated (max) "
                     f"{x['kv_bytes_allocated_max'] / 2**20:.1f} MiB (stock for the same tokens "
                     f"{x['stock_kv_bytes_max'] / 2**20:.1f} MiB), evicted {x['evicted_cells_mean']:.0f} cells per "
                     f"conversation, structure cells (max) {x['structure_cells_max']}, last prompt "
                     f"{x['conversation_tokens'][0]}-{x['conversation_tokens'][1]} tokens, "
                     f"{x['seconds_mean']:.0f} s a conversation")
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
    ap.add_argument("files", nargs="*", help="report: the JSONL files to summarise (one per process, say)")
    ap.add_argument("--summary", default=None, help="report: the JSON the summary is written to")
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
        if not args.files:
            ap.error("report needs the JSONL files to summarise")
        sm = summary(load(*map(Path, args.files)))
        print(table(sm))
        if args.summary:
            Path(args.summary).write_text(json.dumps(sm, indent=1))
        return
    tuning = args.mode == "tune"
    n = args.conversations or (2 if tuning else 20)
    first = args.first_seed if args.first_seed is not None else TUNING_SEED if tuning else 0
    out = Path(args.out or RESULTS / f"multiturn_{args.mode}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    run(list(range(first, first + n)), out, args.cells, args.configs)


if __name__ == "__main__":
    main()
