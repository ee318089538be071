"""The "beyond the paper" numbers: a long run under a fixed budget, quantized K,
and chunked vs one-shot prefill selection.

    python bench/beyond.py [--prompt-tokens 4096] [--max-tokens 4096] \
        [--prefill-budget 1024] [--decode-budget 512] [--rounds 3] [--threads N] \
        [--skip-targets] [--skip-chunking]

targets   Under the speed protocol (scope_edge.protocol): every column once a
          round, --rounds interleaved rounds, the 1-minute load read before and
          after, each column generating max_tokens greedy tokens after the same
          prompt, EOG masked, at ours' threads:
            stock (K f16; and at llama-cpp-python's default threads, labelled,
            when those differ), stock with K q8_0 (equal KV types for ours' q8_0),
            ours with no budget, ours (slide) with K f16 and with K q8_0, each
            followed by its ideal (stock in a context of ours' allocated cells
            filled to the level ours held in steady state, same K type).
          Reports KV bytes against stock f16 and decode ratios (medians of the
          per-round ratios, min..max) against stock, stock at the same K type,
          and the ideal.
chunking  Prompts that fit both ways (--chunk-prompt tokens, default 2048,
          into prefill + decode = 1536 cells only when chunked): the same
          selector chunked (512-token chunks, a selection after each) and
          one-shot (the whole prompt in one context, one selection), SnapKV
          and H2O, teacher-forced in one untimed lockstep against stock's kept
          logits (scope_edge.bench.stock_reference).

Writes bench/results/beyond.json and prints tables.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from scope_edge import Budget, EngineConfig, ScopeLlama
from scope_edge.bench import eog_tokens, lockstep, logbook_prompt, machine, save_results, stock_reference
from scope_edge.bench.columns import (NONE, STOCK, Columns, columns_table, header, ratios_table, report,
                                      standard_ratios)
from scope_edge.policies import build
from scope_edge.protocol import Cache, run_rounds

log = logging.getLogger("bench.beyond")
RESULTS = Path(__file__).resolve().parent / "results"
STOCK_Q8 = "stock, K q8_0"


def ours_label(type_k: str, budget: Budget) -> str:
    return f"ours, slide {budget.prefill}/{budget.decode} K {type_k}"


def target_columns(path: str, prompt: list[int], *, steps: int, budget: Budget, n_threads: int | None,
                   ideal_steps: int) -> Columns:
    cols = Columns(path, prompt, steps, eog=eog_tokens(path), n_threads=n_threads, ideal_steps=ideal_steps)
    cols.stock()
    cols.stock(Cache(type_k="q8_0"), suffix=", K q8_0", library_default=False)
    f16 = EngineConfig(model_path=path, n_threads=n_threads)
    cols.ours(NONE, lambda: ScopeLlama(config=f16, budget=None))
    for type_k in ("f16", "q8_0"):
        engine = EngineConfig(model_path=path, n_threads=n_threads, type_k=type_k)
        cols.ours(ours_label(type_k, budget),
                  lambda e=engine: ScopeLlama(config=e, policy=build(budget, strategy="slide")),
                  ideal_cache=Cache(type_k=type_k))
    return cols


def targets(args: argparse.Namespace) -> dict:
    path = EngineConfig().path()
    budget = Budget(prefill=args.prefill_budget, decode=args.decode_budget)
    cols = target_columns(path, logbook_prompt(path, args.prompt_tokens), steps=args.max_tokens, budget=budget,
                          n_threads=args.threads, ideal_steps=args.ideal_steps)
    done = run_rounds(cols.cols, args.rounds)
    ratios = standard_ratios(list(cols.cols))
    ratios[f"{ours_label('q8_0', budget)} / {STOCK_Q8}"] = (ours_label("q8_0", budget), STOCK_Q8)
    res = report(done, ratios)
    stock_f16 = res["columns"][STOCK]["kv_bytes"]
    return {"protocol": {"rounds": args.rounds, "threads": list(cols.equal.resolved()), "ideal_steps": args.ideal_steps},
            "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
            "budget": {"prefill": budget.prefill, "decode": budget.decode}, **res,
            "kv_vs_stock_f16": {k: c["kv_bytes"] / stock_f16 for k, c in res["columns"].items()
                                if k.startswith("ours")}}


def chunking(args: argparse.Namespace) -> dict:
    budget = Budget(prefill=args.prefill_budget, decode=args.decode_budget)
    path = EngineConfig().path()
    prompt = logbook_prompt(path, args.chunk_prompt)
    stock = stock_reference(path, prompt, args.chunk_gen)
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
        lines += [f"prompt {t['prompt_tokens']} + {t['max_tokens']}, budgets {t['budget']['prefill']}/"
                  f"{t['budget']['decode']}; {header(t['protocol']['rounds'], t['load_1m'])}", "",
                  *columns_table(t["columns"]), "", *ratios_table(t["ratios"]), ""]
    if "chunking" in out:
        for r in out["chunking"]["rows"]:
            lines.append(f"  {r['selector']:7} {'chunked' if r['chunked'] else 'one-shot':9} cells "
                         f"{r['kv_cells_allocated']}: top-1 {r['top1_agreement']:.1%}, mean KL {r['mean_kl']:.4f}, "
                         f"max KL {r['max_kl']:.2f}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--prefill-budget", type=int, default=1024)
    ap.add_argument("--decode-budget", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every column")
    ap.add_argument("--threads", type=int, default=None, help="decode threads of ours and of stock (default: "
                    "llama-cpp-python's, half the CPUs)")
    ap.add_argument("--ideal-steps", type=int, default=256, help="timed steps of the ideal columns")
    ap.add_argument("--chunk-prompt", type=int, default=2048)
    ap.add_argument("--chunk-gen", type=int, default=512)
    ap.add_argument("--skip-targets", action="store_true")
    ap.add_argument("--skip-chunking", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "beyond.json"))
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return ap


def run(args: argparse.Namespace) -> dict:
    out: dict = {"machine": machine()}
    if not args.skip_targets:
        out["targets"] = targets(args)
    if not args.skip_chunking:
        out["chunking"] = chunking(args)
    return out


def main() -> None:
    args = parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    save_results(args.out, run(args), print_json=args.json, table=table)


if __name__ == "__main__":
    main()
