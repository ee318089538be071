"""Fidelity of every strategy at equal cells, and the score-aggregation experiments.

    python bench/fidelity.py [--prompt-tokens 512] [--max-tokens 256] \
        [--budgets 96:64 192:128 320:192] [--json]

Sweep: for each prefill:decode budget pair, every compressed strategy gets
the same cells (SCOPE: prefill + decode; streaming and h2o: their sum) and
scope_edge.bench.run_many measures it against one stock run: lockstep
teacher forcing (top-1 agreement, mean/max KL(full || compressed)), and the
free-running identical prefix and ROUGE-L. The recent window is half the
decode budget (the paper's 256 of 512). Each row's ratios.kv_bytes is the
KV bytes llama.cpp allocated over stock's; what a budget holds after the
prompt, (prefill + decode) / (prompt + generated), is less while a prompt
chunk is being prefilled.

Aggregation (at the middle budget pair, slide): how the prompt's cells are
scored from 30 layers x 9 heads: heads summed or maxed per layer; SnapKV
max-pool width 1/7/15; observation window 8/16/32; all layers or only the
upper ones; SnapKV's last-window vote vs H2O's all-prompt vote. Lockstep
metrics only.

Pooling (--pooling, issue #29): SnapKV's default pooling (a cell takes the
max over itself and the 6 cells before it) against the paper's (centred,
width 7), slide at the first budget pair, both teacher-forced against one
stock run per prompt; the paired difference over the prompts with its 95%
interval.

Writes bench/results/fidelity.json and prints tables.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
from pathlib import Path

import numpy as np

from scope_edge import Budget, ScopeLlama
from scope_edge.bench import (BenchConfig, Fidelity, Reference, budget_pairs, lockstep, logbook_prompt, machine,
                               run_many, save_results, scoring_engine, scoring_name, stock_reference)
from scope_edge.policies import Policy, SnapKV, build

log = logging.getLogger("bench.fidelity")
RESULTS = Path(__file__).resolve().parent / "results"
COMPRESSED = ["slide", "adaptive", "discontinuous", "streaming", "h2o"]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to score the prompt for slide's prefill selection."""

    name: str
    selector: str = "snapkv"
    head_reduce: str = "sum"
    kernel: int = SnapKV.kernel  # SnapKV's defaults; kernel 7, lookback 0 is the paper's pooling
    lookback: int = SnapKV.lookback
    observation_window: int = 8
    first_layer: int = 0  # layers below this do not vote


VARIANTS = [
    Variant("snapkv sum w8 (paper)", kernel=7, lookback=0),
    Variant("snapkv max w8", head_reduce="max"),
    Variant("snapkv sum w32", observation_window=32),
    Variant("snapkv max w32 (default)", head_reduce="max", observation_window=32),
    Variant("snapkv max w16", head_reduce="max", observation_window=16),
    Variant("snapkv max w32 pool 7 centred (paper)", head_reduce="max", observation_window=32, kernel=7, lookback=0),
    Variant("snapkv max w32 pool 15", head_reduce="max", observation_window=32, kernel=15, lookback=0),
    Variant("snapkv max w32 pool 1", head_reduce="max", observation_window=32, kernel=1, lookback=0),
    Variant("snapkv max w32 layers 2+", head_reduce="max", observation_window=32, first_layer=2),
    Variant("snapkv max w32 upper half", head_reduce="max", observation_window=32, first_layer=15),
    Variant("h2o sum", selector="h2o"),
    Variant("h2o max", selector="h2o", head_reduce="max"),
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerSnapKV(SnapKV):
    """SnapKV whose vote skips the first `first_layer` layers (experiment only)."""

    first_layer: int = 0

    def score(self, positions: np.ndarray, attn: np.ndarray) -> np.ndarray:
        return super().score(positions, np.asarray(attn)[self.first_layer:])


def variant_policy(v: Variant, prefill: int, decode: int) -> Policy:
    """slide under budgets prefill:decode with v's prefill scoring. Layer
    subsets are not a named option, so a SnapKV variant gets LayerSnapKV
    with the same budget and window."""
    budget = Budget(prefill=prefill, decode=decode, observation_window=v.observation_window,
                    recent_window=max(1, decode // 2))
    policy = build(budget, strategy="slide", prefill_selector=v.selector, head_reduce=v.head_reduce)
    if not isinstance(policy.prefill, SnapKV):
        return policy
    # every other setting (budget, probe, the lend rule) is the shipped policy's
    snap = {f.name: getattr(policy.prefill, f.name) for f in dataclasses.fields(policy.prefill) if f.init}
    return dataclasses.replace(policy, prefill=LayerSnapKV(**{**snap, "kernel": v.kernel, "lookback": v.lookback,
                                                              "head_reduce": v.head_reduce,
                                                              "first_layer": v.first_layer}))


def variant_llm(path: str, v: Variant, prefill: int, decode: int) -> ScopeLlama:
    return ScopeLlama(path, policy=variant_policy(v, prefill, decode))


def sweep(prompt_tokens: int, max_tokens: int, budgets: list[tuple[int, int]], strategies: list[str],
          scorings: list[str], seeds: list[int]) -> list[dict]:
    """strategies: names, or "strategy/lend" for a SCOPE strategy under a
    lend rule; each runs under every scoring of scorings (scoring_engine),
    on the logbook of every seed."""
    rows = []
    for seed, (prefill, decode) in itertools.product(seeds, budgets):
        cfgs = [BenchConfig(prompt_tokens=prompt_tokens, prompt_seed=seed, max_tokens=max_tokens,
                            strategy=s.partition("/")[0],
                            **({"lend": s.partition("/")[2]} if "/" in s else {}), prefill_budget=prefill,
                            decode_budget=decode, recent_window=max(1, decode // 2), ideal_steps=64,
                            engine=scoring_engine(sc))
                for s in strategies for sc in scorings]
        for r in run_many(cfgs):
            rows.append(r)
            f = r["fidelity"]
            log.info("seed %d budget %d:%d %s/%s %s: top-1 %.3f, KL %.4f", seed, prefill, decode, r["config"]["strategy"],
                     r["config"]["lend"], scoring_name(r["config"]), f["top1_agreement"], f["mean_kl"])
    return rows


def aggregation(prompt_tokens: int, max_tokens: int, prefill: int, decode: int) -> list[dict]:
    cfg = BenchConfig(prompt_tokens=prompt_tokens, max_tokens=max_tokens, prefill_budget=prefill, decode_budget=decode)
    path = cfg.model_path()
    prompt = logbook_prompt(path, prompt_tokens)
    stock = stock_reference(path, prompt, max_tokens)
    res = lockstep_closing(stock, [variant_llm(path, v, prefill, decode) for v in VARIANTS], prompt)
    return [{"variant": dataclasses.asdict(v), **r.as_dict()} for v, r in zip(VARIANTS, res)]


def lockstep_closing(stock: Reference, llms: list[ScopeLlama], prompt: list[int]) -> list[Fidelity]:
    """Teacher-force stock's tokens through every llm against its logits, then close them."""
    eog = np.array(llms[0].model.eog_tokens(), dtype=np.int64)
    try:
        return lockstep(stock.logits, llms, prompt, stock.tokens, eog, progress=True)[0]
    finally:
        for llm in llms:
            llm.close()


# (label, probe, prefill_chunk): the default policy's prefill as before #33
# (no probe, chunks of 512), with the probe, and with chunks of half the
# decode room (the shape the ordered suite chose).
CHUNKINGS = [("no probe, chunk 512", False, 512), ("probe, chunk 512", True, 512), ("probe, chunk 256", True, 256)]


def chunking(prompt_tokens: int, max_tokens: int, seeds: list[int]) -> list[dict]:
    """The default budget's chunked prefill, teacher-forced against stock:
    each CHUNKINGS variant of ScopeLlama(path)'s own policy, per prompt."""
    path = BenchConfig(prompt_tokens=prompt_tokens, max_tokens=max_tokens).model_path()
    with ScopeLlama(path) as default:
        policy = default.policy
    if policy is None:
        raise ValueError(f"{path} gets no default budget (its context is small): nothing to compare")
    rows = []
    for seed in seeds:
        prompt = logbook_prompt(path, prompt_tokens, seed)
        # One thread each: results do not depend on it, and ggml's spinning
        # threads crawl on a loaded 2-core machine.
        stock = stock_reference(path, prompt, max_tokens, n_threads=1)
        llms = [ScopeLlama(path, policy=dataclasses.replace(policy, prefill=dataclasses.replace(policy.prefill,
                                                                                                  probe=probe)),
                           prefill_chunk=chunk, n_threads=1) for _, probe, chunk in CHUNKINGS]
        res = lockstep_closing(stock, llms, prompt)
        for (label, probe, chunk), r in zip(CHUNKINGS, res):
            rows.append({"seed": seed, "variant": label, "probe": probe, "prefill_chunk": chunk, **r.as_dict()})
            log.info("seed %d %s: top-1 %.3f, KL %.4f", seed, label, rows[-1]["top1_agreement"], rows[-1]["mean_kl"])
    return rows


# (label, kernel, lookback): SnapKV's default pooling (looks back 6 cells)
# and the paper's (centred, width 7); issue #29 re-measures the choice on
# prompts it was not tuned on.
POOLINGS = [("lookback 6 (default)", SnapKV.kernel, SnapKV.lookback), ("kernel 7 centred (paper)", 7, 0)]


def pooling(prompt_tokens: int, max_tokens: int, prefill: int, decode: int, seeds: list[int]) -> list[dict]:
    """slide (the sweep's policy at prefill:decode) under each POOLINGS
    variant, teacher-forced against one stock run per prompt, so the two
    poolings are compared on the same tokens."""
    cfg = BenchConfig(prompt_tokens=prompt_tokens, max_tokens=max_tokens, prefill_budget=prefill,
                      decode_budget=decode, recent_window=max(1, decode // 2))
    path, policy = cfg.model_path(), cfg.policy()
    engine = dataclasses.replace(cfg.engine, model_path=path, n_threads=1)  # one thread: see chunking()
    rows = []
    for seed in seeds:
        prompt = logbook_prompt(path, prompt_tokens, seed)
        stock = run_stock(path, prompt, max_tokens, "f16", keep_logits=True, n_threads=1)
        llms = [ScopeLlama(config=engine, policy=dataclasses.replace(
            policy, prefill=dataclasses.replace(policy.prefill, kernel=kernel, lookback=lookback)))
            for _, kernel, lookback in POOLINGS]
        res = lockstep_closing(stock, llms, prompt)
        for (label, kernel, lookback), r in zip(POOLINGS, res):
            rows.append({"seed": seed, "budget": f"{prefill}:{decode}", "variant": label, "kernel": kernel,
                         "lookback": lookback, **r.as_dict()})
            log.info("seed %d %s: top-1 %.3f, KL %.4f", seed, label, rows[-1]["top1_agreement"], rows[-1]["mean_kl"])
    return rows


def _mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval (normal approximation)."""
    return float(np.mean(xs)), (1.96 * float(np.std(xs, ddof=1)) / len(xs) ** 0.5 if len(xs) > 1 else 0.0)


def pooling_table(rows: list[dict]) -> list[str]:
    """Each pooling's mean top-1 and KL over the prompts, and the paired
    difference (default minus paper) with its 95% interval."""
    by = {(r["seed"], r["variant"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    (a, *_), (b, *_) = POOLINGS
    seeds = [s for s in seeds if (s, a) in by and (s, b) in by]
    lines = [f"pooling, {len(seeds)} prompts (seeds {seeds[0]}..{seeds[-1]}): mean ± 95% interval"]
    for key, scale, digits, unit in (("top1_agreement", 100, 2, " points"), ("mean_kl", 1, 4, "")):
        for v in (a, b):
            m, ci = _mean_ci([by[s, v][key] * scale for s in seeds])
            lines.append(f"   {key:15} {v:26} {m:8.{digits}f} ± {ci:.{digits}f}{unit}")
        m, ci = _mean_ci([(by[s, a][key] - by[s, b][key]) * scale for s in seeds])
        lines.append(f"   {key:15} {'default - paper':26} {m:+8.{digits}f} ± {ci:.{digits}f}{unit} (paired)")
    return lines


def _sweep_key(r: dict) -> tuple:
    c = r["config"]
    return c["prefill_budget"], c["decode_budget"], c["strategy"] + "/" + c.get("lend", "none"), scoring_name(c)


def means(rows: list[dict]) -> list[dict]:
    """Top-1 and mean KL averaged over the prompts (seeds) of each budget,
    strategy and scoring."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(_sweep_key(r), []).append(r["fidelity"])
    return [{"budget": f"{k[0]}:{k[1]}", "strategy": k[2], "scoring": k[3], "prompts": len(fs),
             "top1_agreement": float(np.mean([f["top1_agreement"] for f in fs])),
             "top1_min": float(min(f["top1_agreement"] for f in fs)),
             "top1_max": float(max(f["top1_agreement"] for f in fs)),
             "mean_kl": float(np.mean([f["mean_kl"] for f in fs]))} for k, fs in groups.items()]


def table(out: dict) -> str:
    lines = []
    if out.get("sweep"):
        lines.append(f"{'seed':>4} {'budget':>8} {'KV':>5} {'strategy':18} {'scoring':12} {'top-1':>6} {'mean KL':>8} "
                     f"{'max KL':>7} {'prefix':>6} {'ROUGE-L':>7}")
    for r in out.get("sweep", []):
        c, f = r["config"], r["fidelity"]
        lines.append(f"{c.get('prompt_seed', 0):>4} {c['prefill_budget']:>4}:{c['decode_budget']:<3} {r['ratios']['kv_bytes']:5.0%} "
                     f"{c['strategy'] + '/' + c.get('lend', 'none'):18} {scoring_name(c):12} "
                     f"{f['top1_agreement']:6.1%} {f['mean_kl']:8.4f} {f['max_kl']:7.2f} {f['identical_prefix']:6d} "
                     f"{f['rouge_l']:7.3f}")
    if len({r["config"].get("prompt_seed", 0) for r in out.get("sweep", [])}) > 1:
        lines.append("mean over prompts (min..max)")
        for m in out["sweep_means"]:
            lines.append(f"{m['budget']:>9} {m['strategy']:18} {m['scoring']:12} {m['top1_agreement']:6.1%} "
                         f"({m['top1_min']:.1%}..{m['top1_max']:.1%}) KL {m['mean_kl']:.4f}, {m['prompts']} prompts")
    if out.get("pooling"):
        lines += pooling_table(out["pooling"])
    for r in out.get("chunking", []):
        lines.append(f"seed {r['seed']} {r['variant']:22} top-1 {r['top1_agreement']:6.1%} mean KL {r['mean_kl']:.4f}")
    for r in out.get("aggregation", []):
        lines.append(f"{r['variant']['name']:24} top-1 {r['top1_agreement']:6.1%} mean KL {r['mean_kl']:.4f} "
                     f"max KL {r['max_kl']:.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--budgets", nargs="+", default=["96:64", "192:128", "320:192"], help="prefill:decode pairs")
    ap.add_argument("--strategies", nargs="+", default=COMPRESSED,
                    help='sweep runs: names, or "strategy/lend" (e.g. slide/passed; slide/none is the paper)')
    ap.add_argument("--scoring", nargs="+", default=["exact"],
                    help="how cells are scored: exact, or a sketch basis and rank (qk16, pca16, random16); "
                         "+fa: flash attention on")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="logbook prompts to run (their seeds)")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-aggregation", action="store_true")
    ap.add_argument("--chunking", action="store_true", help="only the default budget's prefill chunking variants")
    ap.add_argument("--pooling", action="store_true",
                    help="only SnapKV's default pooling against the paper's, slide at the first budget pair")
    ap.add_argument("--out", default=str(RESULTS / "fidelity.json"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    budgets = budget_pairs(args.budgets)
    out: dict = {"prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "machine": machine()}
    if args.chunking:
        out["chunking"] = chunking(args.prompt_tokens, args.max_tokens, args.seeds)
        save_results(args.out, out, print_json=args.json, table=table)
        return
    if args.pooling:
        out["pooling"] = pooling(args.prompt_tokens, args.max_tokens, *budgets[0], args.seeds)
        save_results(args.out, out, print_json=args.json, table=table)
        return
    if not args.skip_sweep:
        out["sweep"] = sweep(args.prompt_tokens, args.max_tokens, budgets, args.strategies,
                             args.scoring, args.seeds)
        out["sweep_means"] = means(out["sweep"])
    if not args.skip_aggregation:
        mid = budgets[len(budgets) // 2]
        out["aggregation_budget"] = list(mid)
        out["aggregation"] = aggregation(args.prompt_tokens, args.max_tokens, *mid)
    save_results(args.out, out, print_json=args.json, table=table)


if __name__ == "__main__":
    main()
