"""Is ScopeLlama the batched engine with one slot? Decode speed of the two
runtimes on one sequence, same run (issue #28, "one runtime path").

    python bench/one_slot.py [--prompt 1024] [--tokens 512] [--prefill-budget 512]
                             [--decode-budget 256] [--rounds 3] [--json]

Both columns run the same policy (slide, SnapKV prefill, the default lend),
the same EngineConfig (threads, KV types) and the same greedy, EOG-masked
generation of --tokens tokens after a logbook prompt, so the decode cache
fills and then evicts every step:
  facade    ScopeLlama(config=..., policy=...): its own context, decodes on
            the caller's thread
  one slot  BatchRunner(slots=1): what `scope-edge serve` runs, its step on
            the Batcher's thread, each token handed back through a queue
Decode tok/s is timed the same way for both: generated tokens after the
first over the time from the first to the last token's arrival. Rounds are
interleaved (scope_edge.protocol.run_rounds); medians with min..max, and
the ratio one slot / facade per round.
Writes bench/results/one_slot.json.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from scope_edge import Budget, EngineConfig, ScopeLlama, models
from scope_edge.bench import logbook_prompt, machine, save_results
from scope_edge.policies import build
from scope_edge.protocol import ratio, run_rounds, summary
from scope_edge.runtime.model import Model

from server import run_ours_together  # bench/server.py: the server's runtime, N prompts on N slots

log = logging.getLogger("bench.one_slot")
RESULTS = Path(__file__).resolve().parent / "results"
FACADE, ONE_SLOT = "facade (ScopeLlama)", "one slot (BatchRunner)"


def run_facade(llm: ScopeLlama, prompt: list[int], tokens: int) -> dict:
    """One greedy generation through the facade, timed by token arrival."""
    stamps: list[float] = []
    stats = None
    for chunk in llm.stream(prompt, max_tokens=tokens, ignore_eos=True):
        if chunk.token is not None:
            stamps.append(time.perf_counter())
        stats = chunk.stats
    if stats is None or len(stamps) < 2:
        raise RuntimeError(f"the generation produced {len(stamps)} tokens, expected {tokens}")
    return {"decode_tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "kv_cells_peak": stats.kv_cells_peak, "kv_cells_allocated": stats.kv_cells_allocated}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--prefill-budget", type=int, default=512)
    ap.add_argument("--decode-budget", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "one_slot.json"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    path = str(models.fetch())
    budget = Budget(prefill=args.prefill_budget, decode=args.decode_budget)
    engine = EngineConfig.from_keywords(path)
    prompt = logbook_prompt(path, args.prompt)
    model = Model(path)
    with ScopeLlama(config=engine, policy=build(budget, strategy="slide")) as llm:
        columns = {
            FACADE: lambda: run_facade(llm, prompt, args.tokens),
            ONE_SLOT: lambda: run_ours_together(model, [prompt], tokens=args.tokens, budget=budget, engine=engine),
        }
        runs = run_rounds(columns, args.rounds)
    res = {"config": vars(args), "machine": machine(), "threads": list(engine.threads()), **runs,
           "summary": {label: summary(rs, ("decode_tokens_per_s",)) for label, rs in runs["runs"].items()},
           "one slot / facade": ratio(runs["runs"], ONE_SLOT, FACADE)}
    save_results(args.out, res, table=table, print_json=args.json)


def table(res: dict) -> str:
    s = res["summary"]
    q = res["one slot / facade"]
    fmt = lambda d: f"{d['median']:.1f} ({d['min']:.1f}..{d['max']:.1f})"  # noqa: E731
    return "\n".join([
        f"| one sequence, {res['config']['prompt']} + {res['config']['tokens']} tokens | decode tok/s, median (min..max) |",
        "|---|---|",
        f"| {FACADE} | {fmt(s[FACADE]['decode_tokens_per_s'])} |",
        f"| {ONE_SLOT} | {fmt(s[ONE_SLOT]['decode_tokens_per_s'])} |",
        f"| one slot / facade | {q['median']:.3f}x ({q['min']:.3f}..{q['max']:.3f}) |",
        f"load (1 min) before / after: {res['load_1m']['before']:.2f} / {res['load_1m']['after']:.2f}"])


if __name__ == "__main__":
    main()
