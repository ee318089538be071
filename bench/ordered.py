"""The ordered long-output suite (issues #17, #33): one prompt of records,
one output that walks them in order, scored per item, at prompt sizes 1x-4x
the prefill budget, on two task families, tuning and evaluation prompts apart.

    python bench/ordered.py tune       # parameters, on the tuning prompts
    python bench/ordered.py eval       # the chosen configuration and the baselines
    python bench/ordered.py report bench/results/ordered_eval.jsonl
    python bench/ordered.py report A.jsonl B.jsonl --pair scope/q8 scope/paperpool/q8  # merged, paired by prompt

--out: a .json file gets the whole run set at the end (and its runs as they
end in <out>.partial.jsonl); a .jsonl file (emptied first) gets only the runs,
one per line as each ends, and report reads either.

Families (each record's first words are the line the output needs; every
item's name and value are unique to it and needed exactly once):
  inventory: "7. mangoes: 92 (aisle 4, shelf E, ...)" -> "7. mangoes: 92"
  teams:     "7. falcons: 418 (coach Rosa, founded 1931, ...)" -> "7. falcons: 418"
The default model cannot convert between formats: asked for "<item>=<qty>",
"Order <qty> <item>" or prose price lists, the full cache scored 0-20% at 2x
and 4x (measured while building this suite), so both families are listings
of different vocabularies, values and fields. A size is reached by longer
records, not more of them (the model copies about 20 records well): the
most extra fields with which 16 records fit, then as many records as fit.
From 1 extra field on, a worked example of three records comes first.

Prompts: seed j of size s and family f is 1000 s + j (+ 50000 for teams);
evaluation seeds are 0..n-1, tuning seeds 100..100+n-1.

Scoring: the output is cut into segments (lines, split again before each
"N. "); item i counts when matched, in order, to a segment holding its name
and its value as words (longest common subsequence), so a preamble or a
repeated line does not cost, a skipped, wrong or out-of-order item does.
"Ran past end": a run that ended at max_tokens where the full cache on the
same prompt stopped.

Memory: every configuration of a run set is given the same allocation
(cells llama.cpp allocates, `kv_cells_allocated`); "kv vs stock" is those
bytes over what stock allocates for the same request (prompt + max_tokens,
padded as llama.cpp pads, f16): the full cache's own allocation.

Diagnostics: for each run, the share of each token class of the prompt
(template, example, instruction, index, name, value, fields) held after the
prefill selection, and of each item's key tokens ("name: value") held when
its output line starts.

Runs go to worker processes (--workers, one llama.cpp thread each: greedy
outputs do not depend on the thread count, and two one-thread workers get
more done on two cores than one two-thread one).
"""
from __future__ import annotations

import argparse
import bisect
import json
import logging
import multiprocessing as mp
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from scope_edge import Budget, ScopeLlama, models
from scope_edge.bench import SYSTEM_PROMPT, machine, save_results
from scope_edge.policies import (H2O, H2OPrefill, LENDERS, Policy, SnapKV, Slide, Streaming, StreamingPrefill)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from tova import tova  # noqa: E402  (the TOVA policy written on the public API)

log = logging.getLogger("bench.ordered")
RESULTS = Path(__file__).resolve().parent / "results"
FULL = "full"
BASE_ITEMS = 16  # records per prompt before the fill (see Sizing)
TUNING_SEED = 100

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
TEAMS = list(dict.fromkeys("""
falcons eagles hawks ravens owls sparrows herons swans cranes pelicans parrots robins wolves foxes bears lions
tigers panthers jaguars leopards cougars lynxes badgers otters beavers bison moose elks stags rams bulls mustangs
stallions broncos colts dolphins sharks whales orcas marlins barracudas stingrays pirates vikings knights
titans giants spartans trojans warriors rangers raiders rockets comets meteors thunder lightning storms
cyclones hurricanes tornadoes blizzards avalanches glaciers volcanoes canyons rivers oceans mountains
""".split()))
COACHES = ["Rosa", "Igor", "Lena", "Marco", "Petra", "Yuki", "Sven", "Amir", "Lucia", "Nils", "Ines", "Karl"]
TEAM_FIELDS = [
    lambda r: f"coach {r.choice(COACHES)}",
    lambda r: f"founded {r.randint(1900, 2010)}",
    lambda r: f"city {r.choice(CITIES)}",
    lambda r: f"colors {r.choice(COLORS)} and {r.choice(COLORS)}",
    lambda r: f"league {r.choice('ABCDE')}",
    lambda r: f"wins {r.randint(0, 40)}",
    lambda r: f"losses {r.randint(0, 40)}",
    lambda r: f"captain {r.choice(FIRST)} {r.choice(LAST)}",
    lambda r: f"stadium {r.choice(LAST)} Park",
    lambda r: f"mascot {r.choice(['a dog', 'a cat', 'a goat', 'a duck', 'a horse'])}",
    lambda r: f"ticket {r.randint(5, 90)} dollars",
    lambda r: f"trains on {r.choice(DAYS)}",
    lambda r: f"sponsor {r.choice(LAST)} Bank",
    lambda r: f"motto {r.choice(['never give up', 'one team', 'go fast', 'stand tall'])}",
]


@dataclass(frozen=True)
class Family:
    name: str
    header: str  # the line before the records
    instruction: str
    words: list[str]
    value: Callable[[random.Random], int]
    fields: list[Callable[[random.Random], str]]
    example: list[tuple[str, int]]  # the worked example's items (not in words)
    seed_offset: int


FAMILIES = {
    "inventory": Family(
        "inventory", "Inventory:",
        "List the items in order with their quantity only, one per line as: <number>. <item>: <quantity>",
        NOUNS, lambda r: r.randint(2, 99), FIELDS, [("spades", 4), ("hooks", 17), ("tiles", 35)], 0),
    "teams": Family(
        "teams", "Teams:",
        "List the teams in order with their points only, one per line as: <number>. <team>: <points>",
        TEAMS, lambda r: r.randint(100, 999), TEAM_FIELDS, [("gulls", 250), ("moths", 613), ("lambs", 108)], 50000),
}


@dataclass(frozen=True)
class Task:
    family: str
    size: int  # the prompt is about size x the prefill budget
    seed: int
    fields: int  # extra fields per record
    items: list[tuple[str, int]]  # (name, value), in order
    user: str  # the user turn

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": self.user}]

    @property
    def answer(self) -> str:
        """The ideal output (sizes max_tokens)."""
        return "\n".join(f"{i}. {name}: {value}" for i, (name, value) in enumerate(self.items, 1))


def _record(i: int, name: str, value: int, extra: list[str]) -> str:
    return f"{i}. {name}: {value}" + (f" ({', '.join(extra)})" if extra else "")


def make_task(family: Family, n_items: int, n_fields: int, seed: int, size: int = 0) -> Task:
    if n_items > len(family.words):
        raise ValueError(f"{family.name}: at most {len(family.words)} items, got {n_items}")
    rng = random.Random(seed + family.seed_offset)
    items = [(name, family.value(rng)) for name in rng.sample(family.words, n_items)]
    example = "\n".join(_record(i, name, v, [f(rng) for f in family.fields[:n_fields]])
                        for i, (name, v) in enumerate(family.example, 1))
    example_answer = "\n".join(f"{i}. {name}: {v}" for i, (name, v) in enumerate(family.example, 1))
    records = "\n".join(_record(i, name, v, [f(rng) for f in family.fields[:n_fields]])
                        for i, (name, v) in enumerate(items, 1))
    user = f"{family.header}\n{records}\n\n{family.instruction}"
    if n_fields:  # bare records are copied better without the example
        user = f"Example {family.header.lower()}\n{example}\nExample answer:\n{example_answer}\n\n{user}"
    return Task(family.name, size, seed, n_fields, items, user)


def sized_task(llm: ScopeLlama, family: Family, target: int, seed: int, size: int) -> Task:
    """The task of seed whose rendered prompt is at most target tokens."""
    def tokens(n_items: int, n_fields: int) -> int:
        return len(llm.tokenize(llm.render_chat(make_task(family, n_items, n_fields, seed).messages)))

    if tokens(BASE_ITEMS, 0) > target:
        raise ValueError(f"{BASE_ITEMS} bare records do not fit {target} tokens")
    k = 0
    while k < len(family.fields) and tokens(BASE_ITEMS, k + 1) <= target:
        k += 1
    n = BASE_ITEMS
    while n < len(family.words) and tokens(n + 1, k) <= target:
        n += 1
    return make_task(family, n, k, seed, size)


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


def n_lines(text: str) -> int:
    """Numbered lines ("N. " or "N) ") in an output."""
    return len(re.findall(r"(?m)^\s*\d+[.)]", text))


def matched(items: list[tuple[str, int]], text: str) -> list[bool]:
    """Which items the output gives, in order (longest common subsequence of
    items and segments, an item matching a segment that holds its name and
    value as words)."""
    segs = segments(text)
    keys = [(f" {_norm(name)} ", f" {_norm(str(value))} ") for name, value in items]
    n, m = len(keys), len(segs)
    hit = [[name in s and value in s for s in segs] for name, value in keys]
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


# -- where the prompt's tokens are -------------------------------------------------
CLASSES = ("template", "example", "instruction", "index", "name", "value", "fields")


def token_spans(llm: ScopeLlama, tokens: list[int], task: Task) -> tuple[list[list[int]], list[str]]:
    """(for each item, the prompt positions of its "name: value"; the class of
    every prompt token). Special tokens have empty pieces; records are plain text."""
    pieces = [llm.model.piece(t).decode("utf-8", errors="replace") for t in tokens]
    starts, pos = [], 0
    for p in pieces:
        starts.append(pos)
        pos += len(p)
    text = "".join(pieces)
    char_class = ["template"] * len(text)

    def mark(lo: int, hi: int, cls: str) -> None:
        char_class[lo:hi] = [cls] * (hi - lo)

    family = FAMILIES[task.family]
    body = text.find(f"\n{family.header}\n")
    user_at = text.find(task.user)
    if user_at >= 0:
        mark(user_at, body + 1, "example")
        end = user_at + len(task.user)
        mark(end - len(family.instruction), end, "instruction")
    keys, cursor = [], body
    for i, (name, value) in enumerate(task.items, 1):
        at = text.find(f"\n{i}. {name}: {value}", cursor)
        if at < 0:
            raise ValueError(f"record {i} not found in the prompt's pieces")
        line_end = text.find("\n", at + 1)
        mark(at + 1, at + len(f"\n{i}. "), "index")
        lo = at + len(f"\n{i}. ")
        mark(lo, lo + len(name), "name")
        mark(lo + len(name), lo + len(f"{name}: "), "index")
        mark(lo + len(f"{name}: "), lo + len(f"{name}: {value}"), "value")
        mark(lo + len(f"{name}: {value}"), line_end, "fields")
        hi = lo + len(f"{name}: {value}")
        first = bisect.bisect_right(starts, lo) - 1
        last = bisect.bisect_left(starts, hi) - 1
        keys.append(list(range(first, last + 1)))
        cursor = hi
    classes = [char_class[s] if p else "template" for s, p in zip(starts, pieces)]
    return keys, classes


def held_fraction(held: set[int], keys: list[list[int]]) -> list[float]:
    return [sum(p in held for p in k) / len(k) for k in keys]


def class_kept(held: set[int], classes: list[str]) -> dict[str, float]:
    out = {}
    for c in CLASSES:
        idx = [i for i, x in enumerate(classes) if x == c]
        if idx:
            out[c] = round(sum(i in held for i in idx) / len(idx), 3)
    return out


# -- configurations --------------------------------------------------------------
PREFILL, ALLOC = 256, 512  # the suite's prefill budget and every configuration's cells
WINDOW = 32  # observation window (Budget's default)


def _scope(*, lend: str | None = "passed", probe: bool = True, chunk: int = 128, recent: int = 64,
           decode: int = ALLOC - PREFILL, type_k: str = "f16", window: int = WINDOW, kernel: int = 1,
           lookback: int = 6) -> dict:
    """SCOPE slide with SnapKV prefill: `lend` the decode room to the prompt
    by that rule (None: the paper), `probe` each earlier chunk with the
    prompt's last `window` tokens, prefill in chunks of `chunk` cells (the
    probe's included), pool scores by `kernel` and `lookback` (SnapKV's)."""
    policy = Policy(prefill=SnapKV(budget=PREFILL, window=window, probe=probe, kernel=kernel, lookback=lookback),
                    decode=Slide(decode=decode, recent=recent),
                    lend=None if lend is None else LENDERS[lend](protected=window))
    return {"policy": policy, "prefill_chunk": chunk, "type_k": type_k}


def _unified(name: str, type_k: str = "f16") -> dict:
    """A unified baseline: prompt and output share `total` cells, and the
    prefill's chunks land on the total - 1 kept, so total + chunk = ALLOC
    (the largest total whose chunks still move the prompt along)."""
    recent, chunk = 64, 64
    total = ALLOC - chunk
    if name == "h2o":
        policy = Policy(prefill=H2OPrefill(recent=recent), decode=H2O(total=total, recent=recent))
    elif name == "streaming":
        policy = Policy(prefill=StreamingPrefill(), decode=Streaming(total=total))
    else:
        policy = tova(total)
    return {"policy": policy, "prefill_chunk": chunk, "type_k": type_k}


# name -> ScopeLlama arguments. "slide" is the runtime before #33 at this
# allocation (no probe, a chunk that leaves no room above the prefill budget).
CONFIGS: dict[str, Callable[[], dict]] = {
    FULL: lambda: {"budget": None},
    "full/q8": lambda: {"budget": None, "type_k": "q8_0"},  # the K type alone: the floor of any q8_0 row
    "slide": lambda: _scope(probe=False, chunk=ALLOC - PREFILL),
    "slide/none": lambda: _scope(lend=None, probe=False, chunk=ALLOC - PREFILL),
    "scope": lambda: _scope(),
    "scope/noprobe": lambda: _scope(probe=False),
    "scope/chunk192": lambda: _scope(chunk=192),
    "scope/chunk96": lambda: _scope(chunk=96),
    "scope/progress": lambda: _scope(lend="progress"),
    "scope/accumulated": lambda: _scope(lend="accumulated"),
    "scope/recent": lambda: _scope(lend="recent"),
    "scope/recent128": lambda: _scope(recent=128),
    "scope/q8": lambda: _scope(type_k="q8_0"),
    # ScopeLlama(n_ctx=ALLOC) with no policy arguments: the default budget for these cells (Budget(256, 256)),
    # its strategy, lend, probe and chunk (half the decode room: 128), and the chat structure kept (#30)
    "default": lambda: {"n_ctx": ALLOC},
    "default/q8": lambda: {"n_ctx": ALLOC, "type_k": "q8_0"},
    "scope/paperpool/q8": lambda: _scope(type_k="q8_0", kernel=7, lookback=0),  # SnapKV's paper pooling (#29)
    "scope/chunk256/q8": lambda: _scope(chunk=256, type_k="q8_0"),  # the default's shape: chunk = decode room
    "scope/recent128/q8": lambda: _scope(recent=128, type_k="q8_0"),
    "scope/nolend/q8": lambda: _scope(lend=None, type_k="q8_0"),
    "scope/progress/q8": lambda: _scope(lend="progress", type_k="q8_0"),
    "scope/window64": lambda: _scope(window=64),
    "scope/window16": lambda: _scope(window=16),
    "scope/lookback12": lambda: _scope(lookback=12),
    "slide/q8": lambda: _scope(probe=False, chunk=ALLOC - PREFILL, type_k="q8_0"),
    "h2o/q8": lambda: _unified("h2o", "q8_0"),
    "streaming/q8": lambda: _unified("streaming", "q8_0"),
    "tova/q8": lambda: _unified("tova", "q8_0"),
    "h2o": lambda: _unified("h2o"),
    "streaming": lambda: _unified("streaming"),
    "tova": lambda: _unified("tova"),
}
TUNE = ["scope", "scope/noprobe", "scope/chunk192", "scope/progress", "scope/accumulated", "scope/recent",
        "scope/q8"]
EVAL = ["scope/q8", "slide/q8", "h2o/q8", "streaming/q8", "tova/q8", "full/q8"]  # full/q8: the K type's floor
BASELINES = {"h2o", "streaming", "tova", "h2o/q8", "streaming/q8", "tova/q8"}  # run at the compressed sizes only


# -- runs ------------------------------------------------------------------------
def run_one(llm: ScopeLlama, task: Task, tokens: list[int], max_tokens: int) -> dict:
    """One greedy generation, streamed to see which prompt tokens the cache
    holds after the prefill selection and as each numbered output line starts."""
    keys, classes = token_spans(llm, tokens, task)
    t0 = time.perf_counter()
    pieces: list[str] = []
    kept: set[int] | None = None
    at_line: list[float | None] = [None] * len(task.items)
    new_line, pending, line_from = True, False, 0
    snap: set[int] = set()
    last = None
    for last in llm.stream(tokens, max_tokens=max_tokens):
        if kept is None:
            kept = set(llm.kv_positions().tolist())
        if new_line:  # the cache as the line begins (its first token sampled, not yet fed)
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
    if last is None or last.stats is None or last.finish_reason is None:
        raise RuntimeError("the stream ended without its final chunk")
    text = "".join(pieces)
    hits = matched(task.items, text)
    st = last.stats
    kept = kept or set()
    return {"score": sum(hits) / len(hits), "items_hit": [int(h) for h in hits], "n_items": len(hits),
            "generated_tokens": st.generated_tokens, "finish_reason": last.finish_reason,
            "kv_cells_allocated": st.kv_cells_allocated, "kv_bytes_allocated": st.kv_bytes_allocated,
            "kv_cells_peak": st.kv_cells_peak, "prefill_cells_peak": st.prefill_cells_peak,
            "key_kept_start": [round(x, 3) for x in held_fraction(kept, keys)],
            "key_held_at_line": [None if x is None else round(x, 3) for x in at_line],
            "class_kept": class_kept(kept, classes),
            "seconds": round(time.perf_counter() - t0, 2), "text": text}


@dataclass(frozen=True)
class Job:
    config: str
    family: str
    size: int
    seed: int


def _work(args: tuple[str, list[Job], float, str]) -> list[dict]:
    """A worker: one ScopeLlama per configuration, every job of it in turn;
    each run is also appended to `partial` (JSON lines) as it ends."""
    path, jobs, max_factor, partial = args
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = []
    by_config: dict[str, list[Job]] = {}
    for job in jobs:
        by_config.setdefault(job.config, []).append(job)
    for config, js in by_config.items():
        with ScopeLlama(path, n_threads=1, **CONFIGS[config]()) as llm:
            for job in js:
                task = sized_task(llm, FAMILIES[job.family], PREFILL * job.size, 1000 * job.size + job.seed, job.size)
                tokens = llm.tokenize(llm.render_chat(task.messages))
                max_tokens = max(32, round(max_factor * len(llm.tokenize(task.answer))))
                r = run_one(llm, task, tokens, max_tokens)
                out.append({"config": config, "family": job.family, "size": job.size, "seed": job.seed,
                            "prompt_tokens": len(tokens), "n_fields": task.fields, "max_tokens": max_tokens, **r})
                with open(partial, "a") as f:
                    f.write(json.dumps(out[-1]) + "\n")
                log.info("%s %s %dx seed %d: %.2f, %d tokens, %s, %d cells, %.0f s", config, job.family, job.size,
                         job.seed, r["score"], r["generated_tokens"], r["finish_reason"], r["kv_cells_allocated"],
                         r["seconds"])
    return out


def run(configs: list[str], families: list[str], sizes: list[int], seeds: list[int], *, workers: int,
        max_factor: float, partial: str, full: bool = True) -> dict:
    path = str(models.fetch())
    jobs = [Job(c, f, s, seed) for c in [FULL, *configs] if full or c != FULL for f in families for s in sizes
            for seed in seeds if not (c in BASELINES and s < 3)]
    # Round-robin by job, so each worker gets a share of every configuration.
    shares = [(path, jobs[w::workers], max_factor, partial) for w in range(workers)]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(workers) as pool:
        runs = [r for part in pool.map(_work, shares) for r in part]
    return {"config": {"prefill": PREFILL, "allocated_cells": ALLOC, "window": WINDOW, "configs": [FULL, *configs],
                       "families": families, "sizes": sizes, "seeds": seeds, "max_factor": max_factor,
                       "system": SYSTEM_PROMPT, "model": Path(path).name, "greedy": True},
            "machine": machine(), "runtime_s": round(time.perf_counter() - t0, 1), "runs": runs}


# -- report ----------------------------------------------------------------------
def _mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval (normal approximation)."""
    if not xs:
        return float("nan"), 0.0
    m = statistics.fmean(xs)
    return m, 1.96 * statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0


def summary(res: dict) -> dict:
    """(config, family, size) -> mean score with its 95% interval, the paired
    ratio to the full cache, KV vs stock, stops and runs past the end."""
    full = {(r["family"], r["size"], r["seed"]): r for r in res["runs"] if r["config"] == FULL}
    out = {}
    for c in res["config"]["configs"]:
        for f in res["config"]["families"]:
            for s in res["config"]["sizes"]:
                rs = [r for r in res["runs"] if (r["config"], r["family"], r["size"]) == (c, f, s)
                      and (r["family"], r["size"], r["seed"]) in full]  # a --skip-full file alone: no rows
                if not rs:
                    continue
                fr = [full[r["family"], r["size"], r["seed"]] for r in rs]
                mean, ci = _mean_ci([r["score"] for r in rs])
                full_mean = statistics.fmean(x["score"] for x in fr)
                stopped = [x for x in fr if x["finish_reason"] == "stop"]
                out[c, f, s] = {
                    "mean": mean, "ci95": ci, "n": len(rs), "full_mean": full_mean,
                    "vs_full": mean / full_mean if full_mean else float("nan"),
                    "kv_vs_stock": statistics.fmean(r["kv_bytes_allocated"] / x["kv_bytes_allocated"]
                                                    for r, x in zip(rs, fr)),
                    "cells": max(r["kv_cells_allocated"] for r in rs),
                    "past_end": sum(r["finish_reason"] == "length" and x["finish_reason"] == "stop"
                                    for r, x in zip(rs, fr)),
                    "stops_with_full": (sum(r["finish_reason"] == "stop" for r, x in zip(rs, fr)
                                            if x["finish_reason"] == "stop") / len(stopped)) if stopped else None,
                    # where the full cache stopped right after its last item, not after a run of repeats
                    "full_stops_on_time": sum(n_lines(x["text"]) <= x["n_items"] for x in stopped),
                    "full_stops": len(stopped),
                }
    return out


def table(res: dict) -> str:
    cfg, sm = res["config"], summary(res)
    lines = [f"ordered suite: prefill budget {cfg['prefill']}, every configuration in {cfg['allocated_cells']} cells, "
             f"seeds {cfg['seeds'][0]}..{cfg['seeds'][-1]}, runtime {res['runtime_s'] / 60:.1f} min",
             "per-item score: mean ± 95% interval | ratio of means to the full cache | KV bytes allocated / stock's "
             "| stops where the full cache stops | ran past its end"]
    for f in cfg["families"]:
        for s in cfg["sizes"]:
            ptok = [r["prompt_tokens"] for r in res["runs"] if r["family"] == f and r["size"] == s]
            lines.append(f"-- {f} {s}x (prompts {min(ptok)}-{max(ptok)} tokens)")
            for c in cfg["configs"]:
                if (c, f, s) not in sm:
                    continue
                x = sm[c, f, s]
                stops = "-" if x["stops_with_full"] is None else f"{x['stops_with_full']:.0%}"
                lines.append(f"   {c:20} {x['mean']:6.1%} ± {x['ci95']:5.1%} | {x['vs_full']:6.1%} | "
                             f"{x['kv_vs_stock']:6.1%} ({x['cells']} cells) | {stops:>4} | {x['past_end']}/{x['n']}")
                if c == FULL:
                    lines[-1] += (f" | stopped on {x['full_stops']} of {x['n']}, {x['full_stops_on_time']} of them "
                                  "right after the last item")
    lines += ["", "prompt token classes held after the prefill selection (mean share), compressed sizes:"]
    for c in cfg["configs"]:
        if c == FULL:
            continue
        rs = [r for r in res["runs"] if r["config"] == c and r["size"] >= 3]
        if rs:
            means = {k: statistics.fmean(r["class_kept"].get(k, 0.0) for r in rs if k in r["class_kept"])
                     for k in CLASSES if any(k in r["class_kept"] for r in rs)}
            lines.append(f"   {c:20} " + " ".join(f"{k} {v:4.0%}" for k, v in means.items()))
    return "\n".join(lines)


def paired(res: dict, a: str, b: str) -> str:
    """a against b on the prompts both ran: each one's mean, its ratio of
    means to the full cache, and the paired difference a - b of per-item
    scores with its 95% interval."""
    score = {(r["config"], r["family"], r["size"], r["seed"]): r["score"] for r in res["runs"]}
    lines = [f"paired: {a} - {b}, per-item score (points), mean ± 95% interval over the prompts both ran"]
    for f in res["config"]["families"]:
        for s in res["config"]["sizes"]:
            seeds = sorted(k[3] for k in score if k[:3] == (a, f, s) and (b, f, s, k[3]) in score
                           and (FULL, f, s, k[3]) in score)
            if not seeds:
                continue
            full = statistics.fmean(score[FULL, f, s, j] for j in seeds)
            ma, mb = (statistics.fmean(score[c, f, s, j] for j in seeds) for c in (a, b))
            d, ci = _mean_ci([100 * (score[a, f, s, j] - score[b, f, s, j]) for j in seeds])
            lines.append(f"   {f} {s}x, {len(seeds)} prompts: {a} {ma:.1%} ({ma / full:.1%} of full), {b} {mb:.1%} "
                         f"({mb / full:.1%} of full), full {full:.1%}; {a} - {b} {d:+.1f} ± {ci:.1f} points")
    return "\n".join(lines)


def load(path: Path) -> dict:
    """A result file, or the runs a stopped run appended to its .partial.jsonl."""
    if path.suffix != ".jsonl":
        return json.loads(path.read_text())
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # A job run again (a resumed run set) counts once: its last run.
    runs = list({(r["config"], r["family"], r["size"], r["seed"]): r for r in runs}.values())
    configs = list(dict.fromkeys(r["config"] for r in runs))
    return {"config": {"prefill": PREFILL, "allocated_cells": ALLOC, "window": WINDOW,
                       "configs": [FULL, *(c for c in configs if c != FULL)],
                       "families": list(dict.fromkeys(r["family"] for r in runs)),
                       "sizes": sorted({r["size"] for r in runs}), "seeds": sorted({r["seed"] for r in runs})},
            "runtime_s": 0.0, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["tune", "eval", "report"])
    ap.add_argument("files", nargs="*", help="report: result files to merge and print")
    ap.add_argument("--configs", nargs="+", choices=sorted(set(CONFIGS) - {FULL}))
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--prompts", type=int, default=None, help="prompts per family and size")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="these seeds instead of --prompts")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-factor", type=float, default=1.5, help="max_tokens = this x the ideal answer's tokens")
    ap.add_argument("--out", default=None)
    ap.add_argument("--pair", nargs=2, metavar=("A", "B"), help="report: also A against B, paired by prompt")
    ap.add_argument("--skip-full", action="store_true",
                    help="do not run the full cache (another run set holds it; report merges them)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.mode == "report":
        parts = [load(Path(p)) for p in args.files]
        res = parts[0]
        for p in parts[1:]:
            res["runs"] += [r for r in p["runs"] if r["config"] != FULL]
            res["config"]["configs"] += [c for c in p["config"]["configs"] if c not in res["config"]["configs"]]
            res["runtime_s"] += p["runtime_s"]
        # a job in several files counts once: the last file's run
        res["runs"] = list({(r["config"], r["family"], r["size"], r["seed"]): r for r in res["runs"]}.values())
        print(table(res))
        if args.pair:
            print(paired(res, *args.pair))
        return
    tuning = args.mode == "tune"
    n = args.prompts or (5 if tuning else 20)
    seeds = args.seeds or ([TUNING_SEED + j for j in range(n)] if tuning else list(range(n)))
    sizes = args.sizes or ([3, 4] if tuning else [1, 2, 3, 4])
    out = Path(args.out or RESULTS / f"ordered_{args.mode}.json")
    lines_only = out.suffix == ".jsonl"
    partial = out if lines_only else out.with_suffix(".partial.jsonl")
    if lines_only:
        partial.write_text("")
    res = run(args.configs or (TUNE if tuning else EVAL), args.families, sizes, seeds, workers=args.workers,
              max_factor=args.max_factor, partial=str(partial), full=not args.skip_full)
    if lines_only:
        print(table(load(out)))
    else:
        save_results(str(out), res, table=table)


if __name__ == "__main__":
    main()
