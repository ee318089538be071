"""The "beyond the paper" numbers: long runs under a fixed budget, quantized K,
and chunked vs one-shot prefill selection.

    python bench/beyond.py [--prompt-tokens 4096] [--max-tokens 4096] \
        [--prefill-budget 1024] [--decode-budget 512] [--skip-targets] [--skip-chunking]

targets   One stock f16 run of prompt + max_tokens, then ours (slide) with K
          f16 and with K q8_0, each with its ideal (stock decoding in a
          context of our allocated cells, same K type). Reports our KV bytes
          against stock f16, decode speed against stock and against ideal.
chunking  Prompts that fit both ways (--chunk-prompt tokens, default 2048,
          into prefill + decode = 1536 cells only when chunked): the same
          selector chunked (512-token chunks, a selection after each) and
          one-shot (the whole prompt in one context, one selection), SnapKV
          and H2O, teacher-forced in one lockstep against the stock run.

Writes bench/results/beyond.json and prints tables.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import numpy as np

from scope_edge import Budget, ScopeLlama
from scope_edge.bench import (BenchConfig, lockstep, logbook_prompt, machine, run_ideal, run_ours,
                              run_stock, save_results)

log = logging.getLogger("bench.beyond")
RESULTS = Path(__file__).resolve().parent / "results"


def targets(args: argparse.Namespace) -> dict:
    base = BenchConfig(prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                       prefill_budget=args.prefill_budget, decode_budget=args.decode_budget, fidelity=False)
    path = base.model_path()
    prompt = logbook_prompt(path, args.prompt_tokens)
    stock = run_stock(path, prompt, args.max_tokens, "f16", progress=True)
    log.info("stock f16: KV %.1f MiB, decode %.1f tok/s", stock.kv_bytes / 2**20, stock.decode_tokens_per_s)
    rows = []
    for type_k in ("f16", "q8_0"):
        cfg = dataclasses.replace(base, engine=dataclasses.replace(base.engine, type_k=type_k))
        stats, _ = run_ours(cfg, path, prompt, progress=True)
        ideal = run_ideal(path, int(stats["kv_cells_allocated"]), prompt + stock.tokens, cfg.ideal_steps, type_k)
        row = {
            "type_k": type_k,
            "ours": stats,
            "ideal": ideal,
            "kv_bytes_vs_stock_f16": stats["kv_bytes_allocated"] / stock.kv_bytes,
            "decode_vs_stock": stats["decode_tokens_per_s"] / stock.decode_tokens_per_s,
            "decode_vs_ideal": stats["decode_tokens_per_s"] / ideal["decode_tokens_per_s"],
        }
        log.info("ours K %s: KV %.1f%% of stock f16, decode %.2fx stock, %.2f of ideal", type_k,
                 100 * row["kv_bytes_vs_stock_f16"], row["decode_vs_stock"], row["decode_vs_ideal"])
        rows.append(row)
    stock_d = {k: v for k, v in stock.__dict__.items() if k not in ("tokens", "logits")}
    return {"prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "stock": stock_d, "ours": rows}


def chunking(args: argparse.Namespace) -> dict:
    budget = Budget(prefill=args.prefill_budget, decode=args.decode_budget)
    path = BenchConfig().model_path()
    prompt = logbook_prompt(path, args.chunk_prompt)
    stock = run_stock(path, prompt, args.chunk_gen, "f16", progress=True, keep_logits=True)
    variants = [(sel, chunked) for sel in ("snapkv", "h2o") for chunked in (True, False)]
    llms = [ScopeLlama(path, budget=budget, strategy="slide", prefill_selector=sel, chunked_prefill=chunked)
            for sel, chunked in variants]
    eog = np.array(llms[0].model.eog_tokens(), dtype=np.int64)
    try:
        res, _ = lockstep(stock.logits, llms, prompt, stock.tokens, eog, progress=True)
        cells = [llm.n_ctx for llm in llms]
    finally:
        for llm in llms:
            llm.close()
    rows = [{"selector": sel, "chunked": chunked, "kv_cells_allocated": n, **r.as_dict()}
            for (sel, chunked), n, r in zip(variants, cells, res)]
    return {"prompt_tokens": args.chunk_prompt, "max_tokens": args.chunk_gen, "rows": rows}


def table(out: dict) -> str:
    lines = []
    if "targets" in out:
        t = out["targets"]
        lines.append(f"prompt {t['prompt_tokens']} + {t['max_tokens']}: stock f16 KV "
                     f"{t['stock']['kv_bytes'] / 2**20:.1f} MiB, decode {t['stock']['decode_tokens_per_s']:.1f} tok/s")
        for r in t["ours"]:
            lines.append(f"  K {r['type_k']:5} KV {r['ours']['kv_bytes_allocated'] / 2**20:6.1f} MiB "
                         f"({r['kv_bytes_vs_stock_f16']:.1%} of stock f16), decode "
                         f"{r['ours']['decode_tokens_per_s']:.1f} tok/s = {r['decode_vs_stock']:.2f}x stock, "
                         f"{r['decode_vs_ideal']:.2f} of ideal ({r['ideal']['decode_tokens_per_s']:.1f})")
    if "chunking" in out:
        for r in out["chunking"]["rows"]:
            lines.append(f"  {r['selector']:7} {'chunked' if r['chunked'] else 'one-shot':9} cells "
                         f"{r['kv_cells_allocated']}: top-1 {r['top1_agreement']:.1%}, mean KL {r['mean_kl']:.4f}, "
                         f"max KL {r['max_kl']:.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--prefill-budget", type=int, default=1024)
    ap.add_argument("--decode-budget", type=int, default=512)
    ap.add_argument("--chunk-prompt", type=int, default=2048)
    ap.add_argument("--chunk-gen", type=int, default=512)
    ap.add_argument("--skip-targets", action="store_true")
    ap.add_argument("--skip-chunking", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "beyond.json"))
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out: dict = {"machine": machine()}
    if not args.skip_targets:
        out["targets"] = targets(args)
    if not args.skip_chunking:
        out["chunking"] = chunking(args)
    save_results(args.out, out, print_json=args.json, table=table)


if __name__ == "__main__":
    main()
