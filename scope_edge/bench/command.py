"""`scope-edge bench`: memory, speed and fidelity of one configuration against
the stock llama.cpp cache, measured in the same run.

    scope-edge bench --prompt-tokens 2048 --max-tokens 4096 --strategy slide \
        --prefill-budget 1024 --decode-budget 512 [--model PATH] [--json]

What is measured (in this order, one round each; bench/headline.py runs the
full speed protocol, scope_edge.protocol, with interleaved rounds):
  stock  llama_cpp.Llama, n_ctx = prompt + max_tokens, at ours' threads, K and
         V types and flash attention, in the protocol's plain greedy loop:
         llama_decode one token a step, end-of-generation tokens masked
         (ignore-EOS), nothing kept. Its tokens are the reference output.
  ours   ScopeLlama(budget, strategy) generating max_tokens, EOG masked: the
         stats of the run, and its tokens (free-running fidelity).
  ideal  stock llama_cpp.Llama with n_ctx = our allocated cells, filled so
         that its timed ideal_steps average the cells ours held in steady
         state: the decode speed our allocation allows.
  fidelity  untimed lockstep teacher forcing: the compressed ScopeLlama is
         fed the reference tokens (teacher_force); at every step its
         next-token distribution is compared with the full cache's (top-1
         agreement, KL(full || compressed) in float64 from log-softmax). The
         full cache's logits come from a second, untimed stock run keeping
         them (reference="stock": the same llama_decode calls as
         ScopeLlama(budget=None), which tests/test_bench.py checks give the
         same logits), or ScopeLlama(budget=None).teacher_force run alongside
         ("full"). reference_consistency is how often the full cache's argmax
         equals the reference token (1.0: the lockstep is exactly the full
         cache's greedy run). Free-running: length of the identical prefix of
         ours vs the reference, and ROUGE-L F1 (token LCS) of the two outputs.

The prompt is a deterministic logbook of varied records inside the GGUF's own
chat template (SmolLM2 degenerates without one), cut to exactly prompt_tokens.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..flags import add_engine_args, add_policy_args, engine_config, sized_budget_of
from .config import BenchConfig, scoring_name
from .run import run_bench


# -- CLI -----------------------------------------------------------------------
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `bench` on the scope-edge command's subparsers (what
    ArgumentParser.add_subparsers() returned)."""
    p = subparsers.add_parser("bench", help="memory, speed and fidelity against the stock llama.cpp cache",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=main)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="generated tokens (EOS ignored)")
    add_engine_args(p)
    add_policy_args(p, full_cache=False, defaults=f" (default {d.prefill_budget}; decode {d.decode_budget}; "
                                                  f"strategy {d.strategy}, lend {d.lend})")
    p.add_argument("--ideal-steps", type=int, default=d.ideal_steps, help="timed decode steps of the ideal run")
    p.add_argument("--no-fidelity", action="store_true", help="skip the lockstep fidelity pass")
    p.add_argument("--reference", default="stock", choices=["stock", "full"],
                   help="full-cache logits for the lockstep: a second, untimed stock run keeping them (fast, "
                        "steps x vocab floats of RAM) or ScopeLlama(budget=None) teacher-forced alongside (slow, no RAM)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    d = BenchConfig()
    budget, engine = sized_budget_of(args, engine_config(args), prefill=d.prefill_budget, decode=d.decode_budget)
    return BenchConfig(
        prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, strategy=args.strategy or d.strategy,
        prefill_selector=args.selector, lend=args.lend or d.lend, prefill_budget=budget.prefill,
        decode_budget=budget.decode, observation_window=args.observation_window, recent_window=args.recent_window,
        engine=engine, ideal_steps=args.ideal_steps, fidelity=not args.no_fidelity, reference=args.reference,
    )


def format_table(res: dict) -> str:
    s, o, i, r, f = res["stock"], res["ours"], res["ideal"], res["ratios"], res["fidelity"]
    c = res["config"]
    mib = 2**20
    lines = [
        f"scope-edge bench: prompt {c['prompt_tokens']} + {c['max_tokens']} generated, strategy {c['strategy']} (lend {c['lend']}), "
        f"budgets {c['prefill_budget']}/{c['decode_budget']}, K {c['type_k']}, V {c['type_v']}"
        f"{', flash attention' if c['flash_attn'] else ''}{', ' + scoring_name(c) if c['sketch_rank'] else ''}",
        f"{'':8} {'KV MiB':>8} {'cells':>6} {'prefill tok/s':>14} {'decode tok/s':>13}",
        f"{'stock':8} {s['kv_bytes'] / mib:8.1f} {s['n_ctx']:6d} {s['prefill_tokens_per_s']:14.1f} {s['decode_tokens_per_s']:13.1f}",
        f"{'ours':8} {o['kv_bytes'] / mib:8.1f} {o['kv_cells']:6d} {o['prefill_tokens_per_s']:14.1f} {o['decode_tokens_per_s']:13.1f}",
        f"{'ideal':8} {'':8} {i['n_ctx']:6d} {'':14} {i['decode_tokens_per_s']:13.1f}",
        f"ours/stock: KV {r['kv_bytes']:.1%}, decode x{r['decode_speedup']:.2f}, prefill x{r['prefill_speedup']:.2f}; "
        f"ours/ideal decode {r['decode_vs_ideal']:.1%}",
    ]
    if f:
        lines.append(
            f"fidelity over {f['steps']} steps: top-1 {f['top1_agreement']:.1%}, KL mean {f['mean_kl']:.4f} "
            f"max {f['max_kl']:.3f}; free-running identical prefix {f['identical_prefix']}, "
            f"ROUGE-L {f['rouge_l']:.3f} (reference consistency {f['reference_consistency']:.1%})"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    res = run_bench(cfg, progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps(res))
    else:
        print(format_table(res))
    return 0


