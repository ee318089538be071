"""Gemma 3 270M (iSWA: 15 sliding-window layers, window 512; 3 full-attention
layers) under budgets, against stock llama-cpp-python, in one run:

  1. a 1024-token prompt + 4096 greedy tokens (EOG masked): KV bytes and
     decode speed of stock (llama.cpp's default swa_full: its window cache
     as big as the full one), stock with swa_full=false (the window plus a
     ubatch, what ours allocates for the window: a stock user can pass it
     too) and ours at each --budgets pair, all decoding in this process step
     by step in turn (one step of each), so the machine's load falls on every
     side alike; --rounds rounds, the order of the sides rotated each round,
     medians with min..max, the 1-minute load read before and after;
  2. teacher-forced fidelity: the first --fidelity-tokens of stock's tokens
     fed after the prompt through the full cache (ScopeLlama(budget=None))
     and through each --fidelity-budgets pair in lockstep, top-1 agreement and
     KL per step, each cache labelled by the bytes it allocates.

    python bench/iswa.py [--prompt 1024] [--gen 4096] [--budgets 512:512 1024:512] [--rounds 3] \
        [--fidelity-budgets 512:512 768:512 768:768] [--fidelity-tokens 1024] [--speed-only]

Budgets hold at least the 512-position window (ScopeLlama refuses less: an
eviction takes a position from the window's cache too). Stock sizes its
window cache like the full one (llama.cpp's default swa_full); ours lets
llama.cpp size it to the window plus a ubatch. Writes bench/results/iswa.json
(with --speed-only; the fidelity part: iswa_fidelity.json, bench/README.md).
"""
from __future__ import annotations

import argparse
import logging
import random
import time
from pathlib import Path

from collections.abc import Iterator
from typing import Any

from tqdm import tqdm

from scope_edge import Budget, ScopeLlama, memory, models
from scope_edge.bench import budget_pairs, eog_tokens, lockstep, machine, save_results
from scope_edge.bench.columns import column, columns_table, header, ratios_table
from scope_edge.protocol import LIBRARY_DEFAULT, Cache, StockSteps, load_1m, ratio, stock_greedy

log = logging.getLogger("bench.iswa")
RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "gemma3-270m-q4_k_m"
MIB = 2**20
CITIES = "Lisbon Osaka Nairobi Hamburg Pune Oslo Cairo Lima Perth Quebec".split()
ITEMS = "lamps kettles chairs backpacks clocks drums teapots compasses".split()
STOCK, STOCK_WINDOW = "stock", "stock, swa_full=false"
STOCKS = {STOCK: Cache(), STOCK_WINDOW: Cache(swa_full=False)}


def logbook(llm: ScopeLlama, n_tokens: int, seed: int = 0) -> list[int]:
    """A plain-text delivery logbook of n_tokens (the base model has no chat turn)."""
    rng = random.Random(seed)
    records = (f"Record {i + 1}: {rng.randint(2, 99)} {rng.choice(ITEMS)} to {rng.choice(CITIES)}, "
               f"{rng.randint(1, 60)} kg, paid {rng.randint(10, 999)} euros." for i in range(n_tokens // 12))
    text = "Delivery logbook of the northern depot.\n\n" + "\n".join(records)
    tokens = llm.tokenize(text)
    if len(tokens) < n_tokens:
        raise ValueError(f"the logbook has {len(tokens)} tokens, fewer than {n_tokens}")
    return tokens[:n_tokens]


def ours_label(pair: tuple[int, int]) -> str:
    return f"ours, {pair[0]}/{pair[1]}"


def stock_row(path: str, cells: int, cache: Cache) -> dict:
    full, window = memory.kv_bytes_split(memory.read_geometry(path), cells, swa_full=cache.swa_full)
    return {"kv_cells": cells, "kv_bytes": full + window, "kv_bytes_full": full, "kv_bytes_swa": window}


def interleaved(path: str, prompt: list[int], gen: int, pairs: list[tuple[int, int]], shift: int = 0) -> dict:
    """One round: each stock (STOCKS) and ours at each budget pair prefilled
    one after the other, then `gen` tokens decoded in turn, one step each,
    the sides' order rotated left by `shift`. Returns each side's row by
    label: KV bytes (full-attention and window caches), decode tok/s over
    the interleaved steps, and ours' GenerationStats."""
    sides: dict[str, Iterator] = {}
    rows: dict[str, dict] = {}
    opened: list = []  # closed in reverse: streams before their ScopeLlama
    try:
        for label, cache in STOCKS.items():
            t0 = time.perf_counter()
            stock = StockSteps(path, prompt, n_ctx=len(prompt) + gen, eog=eog_tokens(path), cache=cache)
            opened.append(stock)
            next(stock)
            rows[label] = {**stock_row(path, stock.cells, cache),
                           "prefill_tokens_per_s": len(prompt) / (time.perf_counter() - t0)}
            sides[label] = stock
        for pair in pairs:
            llm = ScopeLlama(path, budget=Budget(prefill=pair[0], decode=pair[1]))
            opened.append(llm)
            stream = llm.stream(prompt, max_tokens=gen, ignore_eos=True)
            opened.append(stream)
            next(stream)  # the prefill, timed by GenerationStats
            sides[ours_label(pair)] = stream
        order = list(sides)[shift % len(sides):] + list(sides)[:shift % len(sides)]
        secs = dict.fromkeys(order, 0.0)
        last: dict[str, Any] = {}
        for _ in tqdm(range(gen - 1), desc="every side, in turn", leave=False):
            for label in order:
                t = time.perf_counter()
                last[label] = next(sides[label])
                secs[label] += time.perf_counter() - t
        for pair in pairs:
            st = last[ours_label(pair)].stats  # the last chunk of a run to max_tokens carries them
            rows[ours_label(pair)] = {"prefill_budget": pair[0], "decode_budget": pair[1], **st.as_dict(),
                                      "kv_bytes": st.kv_bytes_allocated, "kv_cells": st.kv_cells_allocated}
        for label in order:
            rows[label].update(decode_tokens_per_s=(gen - 1) / secs[label], threads=list(LIBRARY_DEFAULT.resolved()))
        return rows
    finally:
        for thing in reversed(opened):
            thing.close()


def speed(path: str, prompt: list[int], gen: int, pairs: list[tuple[int, int]], rounds: int) -> dict:
    """`rounds` interleaved rounds: every side's spread, and per-round ratios
    of each ours to both stocks and of stock swa_full=false to stock."""
    before = load_1m()
    runs: dict[str, list[dict]] = {}
    for r in range(rounds):
        for label, row in interleaved(path, prompt, gen, pairs, shift=r).items():
            runs.setdefault(label, []).append({**row, "round": r})
        log.info("round %d: %s", r, ", ".join(f"{k} {v[-1]['decode_tokens_per_s']:.1f}" for k, v in runs.items()))
    after = load_1m()
    pairs_named = {f"{o} / {s}": (o, s) for o in map(ours_label, pairs) for s in STOCKS}
    pairs_named[f"{STOCK_WINDOW} / {STOCK}"] = (STOCK_WINDOW, STOCK)
    return {"protocol": {"rounds": rounds, "threads": list(LIBRARY_DEFAULT.resolved())},
            "load_1m": {"before": before, "after": after},
            "columns": {label: {**column(label, rs), "kv_bytes_full": rs[0]["kv_bytes_full"],
                                "kv_bytes_swa": rs[0]["kv_bytes_swa"]} for label, rs in runs.items()},
            "ratios": {name: ratio(runs, num, den) for name, (num, den) in pairs_named.items()}}


def fidelity(path: str, prompt: list[int], reference: list[int], pairs: list[tuple[int, int]]) -> dict:
    full = ScopeLlama(path, budget=None)
    caches = [ScopeLlama(path, budget=Budget(prefill=p, decode=d)) for p, d in pairs]
    try:
        fids, consistency = lockstep(full.teacher_force(prompt, reference), caches, prompt, reference,
                                     eog_tokens(path), progress=True)
        rows = []
        for (p, d), llm, fid in zip(pairs, caches, fids):
            st = llm.generate(prompt, max_tokens=len(reference), ignore_eos=True).stats  # its allocation
            rows.append({"prefill_budget": p, "decode_budget": d, "kv_bytes_allocated": st.kv_bytes_allocated,
                         "kv_bytes_full": st.kv_bytes_full, "kv_bytes_swa": st.kv_bytes_swa,
                         "label": f"{p}/{d}: {st.kv_bytes_allocated / MIB:.1f} MiB", **fid.as_dict()})
        return {"reference_consistency": consistency, "steps": len(reference), "budgets": rows}
    finally:
        full.close()
        for llm in caches:
            llm.close()


def table(res: dict) -> str:
    lines = [] if "columns" not in res else [f"prompt {res['prompt_tokens']} + {res['gen_tokens']} generated, every side stepped in turn; "
             f"{header(res['protocol']['rounds'], res['load_1m'])}", "", *columns_table(res["columns"]), "",
             "| column | full-attention cache MiB | window cache MiB |", "|---|---|---|",
             *(f"| {label} | {c['kv_bytes_full'] / MIB:.1f} | {c['kv_bytes_swa'] / MIB:.1f} |"
               for label, c in res["columns"].items()), "", *ratios_table(res["ratios"])]
    for r in res["fidelity"]["budgets"]:
        lines.append(f"teacher-forced top-1 {r['label']}: {r['top1_agreement']:.1%} (mean KL {r['mean_kl']:.3f})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--gen", type=int, default=4096)
    ap.add_argument("--budgets", nargs="*", default=["512:512", "1024:512"],
                    help="speed and memory pairs; none: fidelity only (stock still runs for the reference)")
    ap.add_argument("--fidelity-budgets", nargs="+", default=["512:512", "768:512", "768:768"])
    ap.add_argument("--fidelity-tokens", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the speed part")
    ap.add_argument("--speed-only", action="store_true", help="part 1 only (about 6 minutes a round on a quiet machine)")
    ap.add_argument("--out", default=str(RESULTS / "iswa.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    path = str(models.fetch(MODEL))
    with ScopeLlama(path) as llm:
        prompt = logbook(llm, args.prompt)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    pairs = budget_pairs(args.budgets)
    res = {"model": MODEL, "started": started, "prompt_tokens": len(prompt), "gen_tokens": args.gen,
           **(speed(path, prompt, args.gen, pairs, args.rounds) if pairs else {}), "fidelity": {"budgets": []}}
    save_results(args.out, {**res, "machine": machine()})  # saved before the long part: a shared machine
    if not args.speed_only:
        reference = stock_greedy(path, prompt, args.fidelity_tokens, eog=eog_tokens(path))["tokens"]
        res["fidelity"] = fidelity(path, prompt, reference, budget_pairs(args.fidelity_budgets))
    save_results(args.out, {**res, "machine": machine()}, table=table)


if __name__ == "__main__":
    main()
