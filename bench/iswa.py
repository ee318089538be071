"""Gemma 3 270M (iSWA: 15 sliding-window layers, window 512; 3 full-attention
layers) under budgets, against stock llama-cpp-python, in one run:

  1. a 1024-token prompt + 4096 greedy tokens (EOG masked): KV bytes of both
     caches and decode speed, stock vs ours at each --budgets pair, all of
     them decoding in this process step by step in turn (one step of stock,
     then one of each budget), so the machine's load falls on every side
     alike and the ratios hold on a shared machine;
  2. teacher-forced fidelity: the first --fidelity-tokens of stock's tokens
     fed after the prompt through the full cache (ScopeLlama(budget=None))
     and through each --fidelity-budgets pair in lockstep, top-1 agreement and
     KL per step, each cache labelled by the bytes it allocates.

    python bench/iswa.py [--prompt 1024] [--gen 4096] [--budgets 512:512 1024:512] \
        [--fidelity-budgets 512:512 768:512 768:768] [--fidelity-tokens 1024] [--speed-only]

Budgets hold at least the 512-position window (ScopeLlama refuses less: an
eviction takes a position from the window's cache too). Stock sizes its
window cache like the full one (llama.cpp's default swa_full); ours lets
llama.cpp size it to the window plus a ubatch. Writes bench/results/iswa.json.
"""
from __future__ import annotations

import argparse
import logging
import random
import time
from pathlib import Path

from tqdm import tqdm

from scope_edge import Budget, ScopeLlama, memory, models
from scope_edge.bench import budget_pairs, eog_tokens, lockstep, machine, save_results
from scope_edge.protocol import StockSteps, stock_greedy

log = logging.getLogger("bench.iswa")
RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "gemma3-270m-q4_k_m"
MIB = 2**20
CITIES = "Lisbon Osaka Nairobi Hamburg Pune Oslo Cairo Lima Perth Quebec".split()
ITEMS = "lamps kettles chairs backpacks clocks drums teapots compasses".split()


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


def interleaved(path: str, prompt: list[int], gen: int, pairs: list[tuple[int, int]]) -> tuple[dict, list[dict]]:
    """Stock (n_ctx prompt + gen) and ours at each budget pair, prefilled one
    after the other, then decoding `gen` tokens in turn, one step each.
    Returns stock's row and ours' (GenerationStats, decode tok/s over the
    interleaved steps)."""
    t0 = time.perf_counter()
    stock = StockSteps(path, prompt, n_ctx=len(prompt) + gen, eog=eog_tokens(path))
    next(stock)
    stock_prefill = len(prompt) / (time.perf_counter() - t0)
    llms = [ScopeLlama(path, budget=Budget(prefill=p, decode=d)) for p, d in pairs]
    try:
        streams = [llm.stream(prompt, max_tokens=gen, ignore_eos=True) for llm in llms]
        last = [next(s) for s in streams]  # the prefills, untimed here (GenerationStats times them)
        stock_s, ours_s = 0.0, [0.0] * len(llms)
        for _ in tqdm(range(gen - 1), desc="stock and ours, in turn", leave=False):
            t = time.perf_counter()
            next(stock)
            stock_s += time.perf_counter() - t
            for i, stream in enumerate(streams):
                t = time.perf_counter()
                last[i] = next(stream)
                ours_s[i] += time.perf_counter() - t
        geometry = memory.read_geometry(path)
        stock_row = {"n_ctx": len(prompt) + gen, "kv_bytes": memory.kv_bytes(geometry, len(prompt) + gen, "f16", "f16"),
                     "prefill_tokens_per_s": stock_prefill, "decode_tokens_per_s": (gen - 1) / stock_s}
        rows = []
        for (p, d), chunk, secs in zip(pairs, last, ours_s):
            assert chunk.stats is not None  # the last chunk of a run to max_tokens
            row = {"prefill_budget": p, "decode_budget": d, **chunk.stats.as_dict()}
            row["decode_tokens_per_s"] = (gen - 1) / secs
            row["vs_stock"] = row["decode_tokens_per_s"] / stock_row["decode_tokens_per_s"]
            rows.append(row)
        return stock_row, rows
    finally:
        stock.close()
        for llm in llms:
            llm.close()


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
    s = res["stock"]
    lines = [f"{'cache':14} {'KV MiB':>8} {'full':>7} {'window':>7} {'decode tok/s':>13} {'vs stock':>9}",
             f"{'stock':14} {s['kv_bytes'] / MIB:8.1f} {'':>7} {'':>7} {s['decode_tokens_per_s']:13.1f}"]
    for r in res["ours"]:
        lines.append(f"{r['prefill_budget']}/{r['decode_budget']:<10} {r['kv_bytes_allocated'] / MIB:8.1f} "
                     f"{r['kv_bytes_full'] / MIB:7.1f} {r['kv_bytes_swa'] / MIB:7.1f} {r['decode_tokens_per_s']:13.1f} "
                     f"{r['vs_stock']:8.2f}x")
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
    ap.add_argument("--speed-only", action="store_true", help="part 1 only (a few minutes on a quiet machine)")
    ap.add_argument("--out", default=str(RESULTS / "iswa.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    path = str(models.fetch(MODEL))
    with ScopeLlama(path) as llm:
        prompt = logbook(llm, args.prompt)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_before = machine()["loadavg_1m"]
    stock, ours = interleaved(path, prompt, args.gen, budget_pairs(args.budgets))
    log.info("stock: %.1f MiB, %.1f tok/s; ours %s", stock["kv_bytes"] / MIB, stock["decode_tokens_per_s"],
             ", ".join(f"{r['prefill_budget']}/{r['decode_budget']} {r['vs_stock']:.2f}x" for r in ours))
    res = {"model": MODEL, "started": started, "loadavg_1m_before": load_before,
           "prompt_tokens": len(prompt), "gen_tokens": args.gen, "stock": stock, "ours": ours,
           "fidelity": {"budgets": []}}
    save_results(args.out, {**res, "machine": machine()})  # saved before the long part: a shared machine
    if not args.speed_only:
        reference = stock_greedy(path, prompt, args.fidelity_tokens, eog=eog_tokens(path))["tokens"]
        res["fidelity"] = fidelity(path, prompt, reference, budget_pairs(args.fidelity_budgets))
    save_results(args.out, {**res, "machine": machine()}, table=table)


if __name__ == "__main__":
    main()
