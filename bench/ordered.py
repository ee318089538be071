"""An ordered long-output task suite (issue #17, items 2 and 3): one prompt
of records, one output that walks them in order, scored per item, at prompt
sizes 1x, 2x and 4x the prefill budget.

    python bench/ordered.py [--prompts 5] [--sizes 1 2 4] [--json] \
        [--strategies slide adaptive discontinuous streaming h2o] \
        [--prefill 256] [--decode 128] [--max-factor 2.0]

The task (an inventory): the user turn is "Inventory:" and numbered records

    1. mangoes: 92 (aisle 4, shelf E, color brown, supplier Scott, ...)

then "List the items in order with their quantity only, one per line as:
<number>. <item>: <quantity>". When the records carry extra fields (2x,
4x), a worked example comes first: three records of items not in the task
and their answer lines. Each output line needs its own record (a
different part of the prompt at each moment) and the model's own last lines
(where it is in the list). Item names are unique within a prompt, quantities
random in 2..99; prompt j of size s has seed 1000 s + j.

Why this format (full cache, greedy, 4 prompts each): bare numbered
"N. name: qty" lines copied back score ~95-100% at 256 tokens, but scaled to
512 tokens by more items (50) the model loops on one line (47%; 64% with 25
records carrying 2 extra fields). Records with several extra fields and no
example: 31% at 512 tokens, 81% at 1024 (the first line decides: "1. 95
(aisle ...", "1. 1. 1. 2.", or an invented item, then the rest follows it);
rephrasing the instruction, unnumbered "- " records, "Item N: ..." records or
the fields on a second line did no better (2-34% at 512). The worked example
lifts it to 56% at 512 and 84% at 1024 (its failure: copying the example's
answer first, after which it sometimes drifts), but it hurts the bare copy
at 256 tokens (50%, against 85% without it), so 1x has none.

Sizing: the model copies about 20 records well, so a size is reached by
making the records longer, not more numerous: the largest number of extra
fields k (aisle, shelf, color, ... up to 14) with which 16 records fit the
size (prefill budget x size tokens, chat template included), then as many
records as fit (1x: ~22 bare records; 2x: ~17 with 3 fields; 4x: ~17 with 9
fields). Fields are in the same order in every record (and the example's).

Scoring (per item, not by aligning the whole output): the output is cut into
segments (lines, and lines holding several "N." entries split there); item i
counts when it is matched, in order, to a segment that contains its name and
its quantity as words (case and punctuation ignored). The matching is the
longest common subsequence of items and segments under that test, so extra
lines, a preamble, "1. 1. pots: 91" or a copy of the whole record do not
cost, but a skipped, wrong-quantity or out-of-order item does, and a repeated
line counts once. Score = items matched / items.

Runs: for every prompt, the full cache (budget=None) and each strategy at
Budget(prefill, decode) with the default windows: SCOPE strategies (slide,
adaptive, discontinuous, SnapKV prefill) hold prefill + decode cells; the
unified baselines (streaming, h2o) share the same total. Greedy, no stop
strings; max_tokens = max-factor x the tokens of the ideal answer, the same
for every run on a prompt. "Ran past end": a run that ended with "length"
where the full cache on the same prompt ended with "stop" (end-of-generation
lost).

Diagnostics (why items are lost): for each item, the fraction of its key
tokens (the "name: quantity" of its record) held in the cache when the first
output token is sampled (after the prefill selection), and when the output
line numbered i starts. The table after the main one gives the hit rate of
items whose key tokens were all held at their line vs not, and per quarter of
the list.

Writes bench/results/ordered.json (config, machine, tasks, every run with its
text) and bench/results/ordered.png, and prints the tables.
"""
from __future__ import annotations

import argparse
import bisect
import logging
import random
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from scope_edge import Budget, ScopeLlama, Sketch, memory, models
from scope_edge.bench import SYSTEM_PROMPT, machine, save_results, scoring_fields

log = logging.getLogger("bench.ordered")
RESULTS = Path(__file__).resolve().parent / "results"
STRATEGIES = ["slide", "adaptive", "discontinuous", "streaming", "h2o"]
FULL = "full"
BASE_ITEMS = 16  # records per prompt before the fill (see Sizing)

NOUNS = list(dict.fromkeys("""
apples bananas carrots onions lemons peaches potatoes tomatoes oranges cherries grapes melons pears plums eggs
cookies candles pencils batteries towels bottles spoons cups plates napkins jars boxes nails ropes bulbs forks
knives bowls pans pots kettles mugs glasses buckets brooms mops sponges soaps brushes combs mirrors lamps chairs
tables desks shelves pillows blankets sheets curtains rugs baskets bags wallets belts gloves hats scarves socks
shoes boots jackets shirts skirts coats buttons needles threads scissors hammers saws drills screws bolts ladders
shovels rakes hoses seeds flowers roses tulips daisies lilies peppers beans peas lettuces cabbages radishes turnips
pumpkins cucumbers mangoes limes kiwis figs dates nuts almonds walnuts raisins muffins cakes pies donuts bagels
crackers biscuits noodles candies chocolates teabags envelopes stamps notebooks folders markers crayons erasers
rulers stickers balloons ribbons tickets coins keys locks clocks watches radios cameras phones cables chargers
speakers helmets tents kites drums flutes violins guitars trumpets
""".split()))
FIRST = ["Alice", "Bruno", "Carla", "David", "Elena", "Felix", "Grace", "Hugo", "Irene", "James", "Karen", "Louis",
         "Maria", "Nadia", "Oscar", "Paula", "Rosa", "Simon", "Tina", "Omar", "Vera", "Walter", "Zoe", "Anna"]
LAST = ["Smith", "Brown", "Garcia", "Miller", "Davis", "Lopez", "Wilson", "Moore", "Taylor", "Clark", "Lewis",
        "Walker", "Young", "King", "Scott", "Green", "Baker", "Adams", "Nelson", "Hill"]
CITIES = ["Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Dublin", "Lisbon", "Oslo", "Warsaw",
          "Athens", "Cairo", "Tokyo", "Sydney", "Toronto", "Boston", "Chicago", "Denver", "Seattle", "Lima", "Delhi"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "grey", "brown", "orange", "purple", "pink", "silver"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
# The extra fields of a record, in order; a size uses the first k.
FIELDS = [
    lambda r: f"aisle {r.randint(1, 9)}",
    lambda r: f"shelf {r.choice('ABCDEF')}",
    lambda r: f"color {r.choice(COLORS)}",
    lambda r: f"supplier {r.choice(LAST)}",
    lambda r: f"from {r.choice(CITIES)}",
    lambda r: f"checked by {r.choice(FIRST)}",
    lambda r: f"on {r.choice(DAYS)}",
    lambda r: f"price {r.randint(2, 99)} dollars",
    lambda r: f"weight {r.randint(1, 30)} kg",
    lambda r: f"box size {r.choice(['small', 'medium', 'large'])}",
    lambda r: f"label {r.choice('ABCDEFGHJK')}{r.randint(100, 999)}",
    lambda r: f"packed by {r.choice(FIRST)} {r.choice(LAST)}",
    lambda r: f"status {r.choice(['new', 'used', 'sold', 'open', 'closed'])}",
    lambda r: f"note {r.choice(['fragile', 'keep dry', 'heavy', 'urgent', 'handle with care'])}",
]
# A worked example before the inventory (names not in NOUNS): without it the
# model often starts with "1. 95 (aisle ...", "1. 1. 1. 2." or an invented item.
EXAMPLE = [("spades", 4), ("hooks", 17), ("tiles", 35)]
HEADER = "Inventory:"
INSTRUCTION = "List the items in order with their quantity only, one per line as: <number>. <item>: <quantity>"


@dataclass(frozen=True)
class Task:
    size: int  # the prompt is about size x the prefill budget
    seed: int
    fields: int  # extra fields per record
    items: list[tuple[str, int]]  # (name, quantity), in order
    user: str  # the user turn
    messages: list[dict[str, str]] = field(default_factory=list)

    @property
    def answer(self) -> str:
        """The ideal output (sizes max_tokens)."""
        return "\n".join(f"{i}. {name}: {qty}" for i, (name, qty) in enumerate(self.items, 1))


def _record(i: int, name: str, qty: int, extra: list[str]) -> str:
    return f"{i}. {name}: {qty}" + (f" ({', '.join(extra)})" if extra else "")


def make_task(n_items: int, n_fields: int, seed: int, size: int = 0) -> Task:
    if n_items > len(NOUNS):
        raise ValueError(f"at most {len(NOUNS)} items, got {n_items}")
    rng = random.Random(seed)
    items = [(name, rng.randint(2, 99)) for name in rng.sample(NOUNS, n_items)]
    example = "\n".join(_record(i, name, qty, [f(rng) for f in FIELDS[:n_fields]])
                         for i, (name, qty) in enumerate(EXAMPLE, 1))
    example_answer = "\n".join(f"{i}. {name}: {qty}" for i, (name, qty) in enumerate(EXAMPLE, 1))
    records = "\n".join(_record(i, name, qty, [f(rng) for f in FIELDS[:n_fields]])
                         for i, (name, qty) in enumerate(items, 1))
    user = f"{HEADER}\n{records}\n\n{INSTRUCTION}"
    if n_fields:  # bare records are copied better without the example (see "Why this format")
        user = f"Example inventory:\n{example}\nExample answer:\n{example_answer}\n\n{user}"
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
    return Task(size, seed, n_fields, items, user, messages)


def sized_task(llm: ScopeLlama, target: int, seed: int, size: int) -> Task:
    """The task of seed whose rendered prompt is at most target tokens (see Sizing)."""
    def tokens(n_items: int, n_fields: int) -> int:
        return len(llm.tokenize(llm.render_chat(make_task(n_items, n_fields, seed).messages)))

    if tokens(BASE_ITEMS, 0) > target:
        raise ValueError(f"{BASE_ITEMS} bare records do not fit {target} tokens")
    k = 0
    while k < len(FIELDS) and tokens(BASE_ITEMS, k + 1) <= target:
        k += 1
    n = BASE_ITEMS
    while n < len(NOUNS) and tokens(n + 1, k) <= target:
        n += 1
    return make_task(n, k, seed, size)


# -- scoring -------------------------------------------------------------------
def _norm(s: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", s.lower()))


def segments(text: str) -> list[str]:
    """Output lines (normalized), a line holding several "N." entries split there."""
    out = []
    for line in text.splitlines():
        for part in re.split(r"(?<=\S)\s+(?=\d+[.)]\s)", line):
            if _norm(part):
                out.append(f" {_norm(part)} ")
    return out


def matched(items: list[tuple[str, int]], text: str) -> list[bool]:
    """Which items the output gives, in order (longest common subsequence of
    items and segments, an item matching a segment that holds its name and
    quantity as words)."""
    segs = segments(text)
    keys = [(f" {_norm(name)} ", f" {qty} ") for name, qty in items]
    n, m = len(keys), len(segs)
    hit = [[name in s and qty in s for s in segs] for name, qty in keys]
    dp = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            dp[i][j] = dp[i + 1][j + 1] + 1 if hit[i][j] else max(dp[i + 1][j], dp[i][j + 1])
    out, i, j = [False] * n, 0, 0
    while i < n and j < m:
        if hit[i][j]:  # taking a possible match is optimal for any match relation
            out[i] = True
            i, j = i + 1, j + 1
        elif dp[i + 1][j] >= dp[i][j + 1]:
            i += 1
        else:
            j += 1
    return out


# -- where each item's key tokens are ---------------------------------------------
def key_positions(llm: ScopeLlama, tokens: list[int], task: Task) -> list[list[int]]:
    """For each item, the prompt positions of the tokens spelling "name: quantity"
    in its record. Special tokens have empty pieces; the record lines are plain text."""
    pieces = [llm.model.piece(t).decode("utf-8", errors="replace") for t in tokens]
    starts, pos = [], 0
    for p in pieces:
        starts.append(pos)
        pos += len(p)
    text = "".join(pieces)
    out, cursor = [], text.find(f"\n{HEADER}\n")
    for i, (name, qty) in enumerate(task.items, 1):
        at = text.find(f"\n{i}. {name}: {qty}", cursor)
        if at < 0:
            raise ValueError(f"record {i} not found in the prompt's pieces")
        lo = at + len(f"\n{i}. ")
        hi = lo + len(f"{name}: {qty}")
        first = bisect.bisect_right(starts, lo) - 1
        last = bisect.bisect_left(starts, hi) - 1
        out.append(list(range(first, last + 1)))
        cursor = hi
    return out


def held_fraction(held: set[int], keys: list[list[int]]) -> list[float]:
    return [sum(p in held for p in k) / len(k) for k in keys]


# -- runs ------------------------------------------------------------------------
def run_one(llm: ScopeLlama, task: Task, tokens: list[int], keys: list[list[int]], max_tokens: int, *,
            bytes_per_cell: int) -> dict:
    """One greedy generation, streamed to see which key tokens the cache holds
    at the first output token and as each numbered output line starts.
    bytes_per_cell: KV bytes of one cell in llm's cache types."""
    t0 = time.perf_counter()
    pieces: list[str] = []
    kept_start: list[float] | None = None
    at_line: list[float | None] = [None] * len(task.items)
    new_line = True  # the next chunk is the first of an output line
    pending = False  # the current line's number is not known yet
    snap: set[int] = set()
    line_from = 0
    last = None
    for last in llm.stream(tokens, max_tokens=max_tokens):
        if kept_start is None:
            kept_start = held_fraction(set(llm.kv_positions().tolist()), keys)
        if new_line:
            # the cache as the line begins (its first token sampled, not yet fed)
            snap, line_from, pending, new_line = set(llm.kv_positions().tolist()), sum(map(len, pieces)), True, False
        pieces.append(last.text)
        if pending:
            tail = "".join(pieces)[line_from:].lstrip()
            if m := re.match(r"(\d+)[.)]", tail):
                i = int(m.group(1)) - 1
                if 0 <= i < len(at_line) and at_line[i] is None:
                    at_line[i] = held_fraction(snap, [keys[i]])[0]
                pending = False
            elif len(tail) >= 4 or (tail and not tail[0].isdigit()):
                pending = False
        if "\n" in last.text:
            new_line = True
    assert last is not None and last.stats is not None and last.finish_reason is not None
    text = "".join(pieces)
    hits = matched(task.items, text)
    st = last.stats
    return {"score": sum(hits) / len(hits), "items_hit": [int(h) for h in hits], "n_items": len(hits),
            "generated_tokens": st.generated_tokens, "finish_reason": last.finish_reason,
            "kv_cells_allocated": st.kv_cells_allocated, "kv_cells_peak": st.kv_cells_peak,
            "kv_bytes_peak": st.kv_cells_peak * bytes_per_cell, "key_kept_start": [round(x, 3) for x in kept_start or []],
            "key_held_at_line": [None if x is None else round(x, 3) for x in at_line],
            "seconds": round(time.perf_counter() - t0, 2), "text": text}


def variant(name: str) -> dict[str, object]:
    """ScopeLlama's short-form arguments for a run name
    "strategy[+selector][/lend][@scoring]", e.g. "slide", "slide/none" (the
    paper), "slide+h2o/passed", "slide@qk16+fa" (scoring as bench/fidelity.py's
    --scoring: key sketches of rank 16, flash attention on)."""
    name, _, scoring = name.partition("@")
    rest, _, lend = name.partition("/")
    strategy, _, selector = rest.partition("+")
    options: dict[str, object] = {"strategy": strategy, **({"prefill_selector": selector} if selector else {}),
                                  **({"lend": lend} if lend else {})}
    if scoring:
        fields = scoring_fields(scoring)
        options["flash_attn"] = fields["flash_attn"]
        if fields.get("sketch_rank"):
            options["scoring"] = Sketch(rank=fields["sketch_rank"], basis=fields["sketch_basis"],
                                        scores=fields.get("sketch_scores", "attention"))
    return options


def run(sizes: list[int], n_prompts: int, strategies: list[str], prefill: int, decode: int,
        max_factor: float, type_k: str = "f16") -> dict:
    """type_k: the compressed runs' K cache type (the full cache stays f16, as stock)."""
    path = str(models.fetch())
    budget = Budget(prefill=prefill, decode=decode)
    geometry = memory.read_geometry(path)
    full_cell, our_cell = memory.bytes_per_cell(geometry, "f16", "f16"), memory.bytes_per_cell(geometry, type_k, "f16")
    t_start = time.perf_counter()
    tasks: list[dict] = []
    runs: list[dict] = []
    with ScopeLlama(path, budget=None) as full:  # the full cache; also tokenizes for everyone
        for size in sizes:
            for seed in range(n_prompts):  # the records of prompt `seed` of each size differ
                task = sized_task(full, prefill * size, 1000 * size + seed, size)
                tokens = full.tokenize(full.render_chat(task.messages))
                answer_tokens = len(full.tokenize(task.answer))
                tasks.append({"size": size, "seed": seed, "task": task, "tokens": tokens,
                              "keys": key_positions(full, tokens, task),
                              "max_tokens": max(32, round(max_factor * answer_tokens))})
        log.info("%d prompts: %s", len(tasks), ", ".join(
            f"{t['size']}x/{t['seed']}: {len(t['tokens'])} tok, {len(t['task'].items)} items, "
            f"{t['task'].fields} fields" for t in tasks))
        for t in tasks:
            r = run_one(full, t["task"], t["tokens"], t["keys"], t["max_tokens"], bytes_per_cell=full_cell)
            t["full"] = r
            runs.append({"strategy": FULL, "size": t["size"], "seed": t["seed"], **r})
            log.info("full %dx seed %d: score %.2f, %d tokens, %s, %.0f s", t["size"], t["seed"], r["score"],
                     r["generated_tokens"], r["finish_reason"], r["seconds"])
    for strategy in strategies:
        with ScopeLlama(path, budget=budget, type_k=type_k, **variant(strategy)) as llm:
            for t in tasks:
                r = run_one(llm, t["task"], t["tokens"], t["keys"], t["max_tokens"], bytes_per_cell=our_cell)
                r["ran_past_end"] = r["finish_reason"] == "length" and t["full"]["finish_reason"] == "stop"
                r["memory_vs_full"] = r["kv_bytes_peak"] / t["full"]["kv_bytes_peak"]
                r["full_kv_cells_allocated"] = t["full"]["kv_cells_allocated"]
                runs.append({"strategy": strategy, "size": t["size"], "seed": t["seed"], **r})
                log.info("%s %dx seed %d: score %.2f (full %.2f), %d tokens, %s%s, cells %d/%d, %.0f s (%.0f min in)",
                         strategy, t["size"], t["seed"], r["score"], t["full"]["score"], r["generated_tokens"],
                         r["finish_reason"], " RAN PAST END" if r["ran_past_end"] else "", r["kv_cells_allocated"],
                         t["full"]["kv_cells_allocated"], r["seconds"], (time.perf_counter() - t_start) / 60)
    return {
        "config": {"prefill": budget.prefill, "decode": budget.decode, "total": budget.total,
                   "observation_window": budget.observation_window, "recent_window": budget.recent_window,
                   "sizes": sizes, "prompts": n_prompts, "strategies": [FULL, *strategies],
                   "max_factor": max_factor, "type_k": type_k, "base_items": BASE_ITEMS, "example": EXAMPLE, "instruction": INSTRUCTION,
                   "system": SYSTEM_PROMPT, "model": Path(path).name, "greedy": True},
        "machine": machine(),
        "runtime_s": round(time.perf_counter() - t_start, 1),
        "tasks": [{"size": t["size"], "seed": t["seed"], "prompt_tokens": len(t["tokens"]),
                   "n_items": len(t["task"].items), "fields": t["task"].fields, "max_tokens": t["max_tokens"],
                   "items": t["task"].items, "user": t["task"].user} for t in tasks],
        "runs": runs,
    }


# -- report ----------------------------------------------------------------------
def _stats(xs: list[float]) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else (float("nan"), 0.0)


def summary(res: dict) -> dict:
    """(strategy, size) -> mean, std, ran past end, n."""
    out = {}
    for s in res["config"]["strategies"]:
        for size in res["config"]["sizes"]:
            rs = [r for r in res["runs"] if r["strategy"] == s and r["size"] == size]
            mean, std = _stats([r["score"] for r in rs])
            out[s, size] = {"mean": mean, "std": std, "n": len(rs),
                            "past_end": sum(bool(r.get("ran_past_end")) for r in rs),
                            "length": sum(r["finish_reason"] == "length" for r in rs),
                            "cells": max((r["kv_cells_allocated"] for r in rs), default=0),
                            "peak": max((r["kv_cells_peak"] for r in rs), default=0),
                            "memory": 1.0 if s == FULL else (  # None: results from before it was recorded
                                statistics.fmean(r["memory_vs_full"] for r in rs)
                                if rs and all("memory_vs_full" in r for r in rs) else None)}
    return out


def table(res: dict) -> str:
    cfg, sm = res["config"], summary(res)
    sizes = cfg["sizes"]
    ptok = {size: [t["prompt_tokens"] for t in res["tasks"] if t["size"] == size] for size in sizes}
    lines = [f"ordered inventory task, budget {cfg['prefill']}:{cfg['decode']} (recent {cfg['recent_window']}), "
             f"{cfg['prompts']} prompts per size, runtime {res['runtime_s'] / 60:.1f} min",
             "prompt tokens: " + "; ".join(f"{s}x {min(ptok[s])}-{max(ptok[s])}" for s in sizes),
             "per-item score, mean ± std over prompts [ran past end / runs ending at max_tokens]",
             f"{'strategy':14}" + "".join(f"{f'{s}x':>22}" for s in sizes)
             + f"  KV cells allocated:peak (max); peak KV bytes / full's (K {cfg.get('type_k', 'f16')})"]
    for s in cfg["strategies"]:
        row = f"{s:14}"
        for size in sizes:
            c = sm[s, size]
            flag = f"[{c['past_end']}/{c['length']}]" if s != FULL else f"[-/{c['length']}]"
            row += f"{c['mean']:>10.1%} ± {c['std']:>5.1%} {flag:>5}"
        row += "  " + " ".join(f"{sm[s, size]['cells']}:{sm[s, size]['peak']}" for size in sizes)
        row += "; " + " ".join("-" if sm[s, size]["memory"] is None else f"{sm[s, size]['memory']:.0%}" for size in sizes)
        lines.append(row)
    totals = {s: sum(sm[s, size]["past_end"] for size in sizes) for s in cfg["strategies"] if s != FULL}
    lines.append("ran past end (length where the full cache stopped), all sizes: "
                 + ", ".join(f"{s} {n}" for s, n in totals.items()))
    lines += ["", "why items are lost: item hit rate when its key tokens were all held as its output line "
              "started / not all held (items with such a line); hit rate by quarter of the list; key tokens "
              "held after the prefill selection, by quarter"]
    for size in sizes:
        for s in cfg["strategies"]:
            rs = [r for r in res["runs"] if r["strategy"] == s and r["size"] == size]
            held = [h for r in rs for h, k in zip(r["items_hit"], r["key_held_at_line"]) if k is not None and k >= 1]
            lost = [h for r in rs for h, k in zip(r["items_hit"], r["key_held_at_line"]) if k is not None and k < 1]
            quarters, kept = [], []
            for q in range(4):
                hq, kq = [], []
                for r in rs:
                    n = r["n_items"]
                    idx = range(q * n // 4, (q + 1) * n // 4)
                    hq += [r["items_hit"][i] for i in idx]
                    kq += [r["key_kept_start"][i] for i in idx]
                quarters.append(statistics.fmean(hq) if hq else float("nan"))
                kept.append(statistics.fmean(kq) if kq else float("nan"))
            fmt = lambda xs: f"{statistics.fmean(xs):.0%} of {len(xs):3d}" if xs else "    -     "
            lines.append(f"{size}x {s:14} held {fmt(held)} | not {fmt(lost)} | by quarter "
                         + " ".join(f"{x:4.0%}" for x in quarters) + " | kept at start "
                         + " ".join(f"{x:4.0%}" for x in kept))
    return "\n".join(lines)


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, sm = res["config"], summary(res)
    sizes = cfg["sizes"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    n = len(cfg["strategies"])
    for k, s in enumerate(cfg["strategies"]):
        x = [i + (k - (n - 1) / 2) * 0.06 for i in range(len(sizes))]
        ax.errorbar(x, [sm[s, size]["mean"] for size in sizes], yerr=[sm[s, size]["std"] for size in sizes],
                    marker="o", capsize=3, label=s, linestyle="--" if s == FULL else "-",
                    color="black" if s == FULL else None)
    ptok = {size: round(statistics.fmean(t["prompt_tokens"] for t in res["tasks"] if t["size"] == size))
            for size in sizes}
    ax.set_xticks(range(len(sizes)), [f"{s}x\n(~{ptok[s]} tok)" for s in sizes])
    ax.set(xlabel=f"prompt size (x prefill budget {cfg['prefill']})", ylabel="per-item score",
           ylim=(0, 1.05), title=f"Ordered inventory task, {cfg['prefill']}:{cfg['decode']} cells "
                                 f"(mean ± std, {cfg['prompts']} prompts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=5, help="prompts (seeds) per size")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4], help="prompt sizes, x the prefill budget")
    ap.add_argument("--strategies", nargs="+", default=STRATEGIES,
                    help='runs, each "strategy[+selector][/lend][@scoring]", e.g. slide+h2o/passed; slide/none is '
                         'the paper; slide@qk16+fa scores with key sketches under flash attention')
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--max-factor", type=float, default=2.0, help="max_tokens = this x the ideal answer's tokens")
    ap.add_argument("--type-k", default="f16", help="K cache type of the compressed runs (the full cache stays f16)")
    ap.add_argument("--out", default=str(RESULTS / "ordered.json"))
    ap.add_argument("--plot", default=str(RESULTS / "ordered.png"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    res = run(args.sizes, args.prompts, args.strategies, args.prefill, args.decode, args.max_factor, args.type_k)
    save_results(args.out, res, print_json=args.json, table=table)
    if args.plot:
        plot(res, Path(args.plot))
        log.info("wrote %s", args.plot)


if __name__ == "__main__":
    main()
