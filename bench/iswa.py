"""Gemma 3 270M (iSWA: 15 sliding-window layers, window 512; 3 full-attention
layers) under budgets, against stock llama-cpp-python, in one run:

  1. a 1024-token prompt + 4096 greedy tokens (EOG masked): KV bytes of both
     caches and decode speed, stock vs ours at each --budgets pair;
  2. teacher-forced fidelity: the first --fidelity-tokens of stock's tokens
     fed after the prompt through the full cache (ScopeLlama(budget=None))
     and through each --fidelity-budgets pair in lockstep, top-1 agreement and
     KL per step, each cache labelled by the bytes it allocates.

    python bench/iswa.py [--prompt 1024] [--gen 4096] [--budgets 512:512 1024:512] \
        [--fidelity-budgets 512:512 768:512 768:768] [--fidelity-tokens 1024]

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

from scope_edge import Budget, ScopeLlama, models
from scope_edge.bench import budget_pairs, eog_tokens, lockstep, machine, run_stock, save_results

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


def run_budget(path: str, prompt: list[int], gen: int, prefill: int, decode: int) -> dict:
    with ScopeLlama(path, budget=Budget(prefill=prefill, decode=decode)) as llm:
        st = llm.generate(prompt, max_tokens=gen, ignore_eos=True).stats
    return {"prefill_budget": prefill, "decode_budget": decode, **st.as_dict()}


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
    lines = [f"{'cache':14} {'KV MiB':>8} {'full':>7} {'window':>7} {'decode tok/s':>13}",
             f"{'stock':14} {s['kv_bytes'] / MIB:8.1f} {'':>7} {'':>7} {s['decode_tokens_per_s']:13.1f}"]
    for r in res["ours"]:
        lines.append(f"{r['prefill_budget']}/{r['decode_budget']:<10} {r['kv_bytes_allocated'] / MIB:8.1f} "
                     f"{r['kv_bytes_full'] / MIB:7.1f} {r['kv_bytes_swa'] / MIB:7.1f} {r['decode_tokens_per_s']:13.1f}")
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
    ap.add_argument("--out", default=str(RESULTS / "iswa.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    path = str(models.fetch(MODEL))
    with ScopeLlama(path) as llm:
        prompt = logbook(llm, args.prompt)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_before = machine()["loadavg_1m"]
    stock = run_stock(path, prompt, args.gen, "f16", progress=True)
    log.info("stock: %.1f MiB, %.1f tok/s", stock.kv_bytes / MIB, stock.decode_tokens_per_s)
    res = {"model": MODEL, "started": started, "loadavg_1m_before": load_before,
           "prompt_tokens": len(prompt), "gen_tokens": args.gen,
           "stock": {"n_ctx": stock.n_ctx, "kv_bytes": stock.kv_bytes, "prefill_tokens_per_s": stock.prefill_tokens_per_s,
                     "decode_tokens_per_s": stock.decode_tokens_per_s},
           "ours": [], "fidelity": {"budgets": []}}
    for p, d in budget_pairs(args.budgets):  # saved as each part ends: a long run on a shared machine
        res["ours"].append(run_budget(path, prompt, args.gen, p, d))
        save_results(args.out, {**res, "machine": machine()})
    res["fidelity"] = fidelity(path, prompt, stock.tokens[: args.fidelity_tokens],
                               budget_pairs(args.fidelity_budgets))
    save_results(args.out, {**res, "machine": machine()}, table=table)


if __name__ == "__main__":
    main()
