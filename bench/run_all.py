"""Reproduce every number and plot in bench/results/ (several hours on 2 cores: the speed
scripts run 3 interleaved rounds of every column; long_run.py alone generates 3 x 20,000 tokens;
multiturn.py's 20 chats x 3 configurations at the default budget, 2,048 and 1,024 cells, about half an hour).

    python bench/run_all.py [--quick] [--results DIR] [--only NAME ...]
    python bench/compare.py DIR       # a re-run's ratios against the stored spreads

Runs, in order: headline.py (2048 + 4096, slide, 3 interleaved rounds under
scope_edge.protocol, then an untimed fidelity pass; and 2048 + 2048), fidelity.py (512 + 256 and 512 + 1024), tasks.py,
memory.py, speed.py (with hook_overhead.py at 2K and 7K), beyond.py,
device.py (an RPC device on 127.0.0.1: the headline, then the steady rows), one_slot.py (the facade against a one-slot BatchRunner), long_run.py (20,000 tokens: its stored file; the script's default is 100,000), server.py
(4 conversations served together, against stock in turn and plain llama.cpp batched, 3 interleaved
rounds; again with a q8_0 K cache, and 4 with flash attention, K and V q8_0 and key sketches), ordered.py (the ordered task suite:
tuning prompts, then the evaluation prompts of both families; SnapKV's paper pooling on the same
evaluation prompts, and teacher-forced on 20 fresh logbooks), multiturn.py (multi-turn chats at the
default budget with and without the chat structure kept, then its report), fidelity.py with today's defaults
(one prompt, then five), fidelity.py with key sketches (one prompt, then five; again with today's pooling),
capture_layers.py (fidelity of capturing fewer layers, the offload default), flash.py (flash
attention on and off, CPU and RPC device; then memory at 4096 + 4096), iswa.py (Gemma 3 270M,
fetched from PyPI: speed in 3 rounds, then teacher-forced fidelity), plots.py, then report.py
writes RESULTS.md. --quick uses small sizes to check the pipeline end to end. --only re-creates
the named result files (fidelity_long, server_q8, ...) or every file of the named scripts
(fidelity.py), then report.py.

Stored files this does not re-create: structured.json (bench/structured.py, a timing of
structured output) and ordered_tune.json (an earlier runtime's tuning, kept as the record of that
choice). Which stored files were made before today's defaults: bench/README.md.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS: list[tuple[str, list[str], list[str]]] = [  # script, full-size args, --quick args
    ("headline.py", ["--fidelity"], ["--prompt-tokens", "300", "--max-tokens", "64", "--prefill-budget", "128",
                                     "--decode-budget", "64", "--rounds", "2", "--ideal-steps", "16", "--fidelity"]),
    ("headline.py", ["--prompt-tokens", "4096", "--max-tokens", "12288", "--strategies", "slide", "discontinuous",
                     "--out", "RESULTS/goal_4096_12288.json"],  # issue #29's goal run, 3 rounds, ~45 min
     ["--prompt-tokens", "300", "--max-tokens", "32", "--prefill-budget", "128", "--decode-budget", "16",
      "--rounds", "1", "--ideal-steps", "8", "--strategies", "slide", "discontinuous"]),
    ("headline.py", ["--max-tokens", "2048", "--out", "RESULTS/headline_2048.json"],
     ["--prompt-tokens", "300", "--max-tokens", "32", "--prefill-budget", "128", "--decode-budget", "16",
      "--rounds", "2", "--ideal-steps", "8"]),
    ("fidelity.py", [], ["--prompt-tokens", "256", "--max-tokens", "64", "--budgets", "96:32", "128:64"]),
    ("fidelity.py", ["--skip-aggregation", "--max-tokens", "1024", "--budgets", "96:64", "192:128",
                     "--out", "RESULTS/fidelity_long.json"], ["--skip-aggregation", "--prompt-tokens", "256",
                                                              "--max-tokens", "32", "--budgets", "96:16"]),
    # the score aggregation at 1024 + 512 (fidelity.json holds it at 512 + 256)
    ("fidelity.py", ["--skip-sweep", "--prompt-tokens", "1024", "--max-tokens", "512", "--budgets", "256:128",
                     "--out", "RESULTS/aggregation_1024.json"],
     ["--skip-sweep", "--prompt-tokens", "256", "--max-tokens", "32", "--budgets", "96:32",
      "--out", "RESULTS/aggregation_1024.json"]),
    # the default model's default budget (1536:512 of its 2,048 cells) past the bound
    ("fidelity.py", ["--skip-aggregation", "--prompt-tokens", "3072", "--max-tokens", "512", "--budgets", "1536:512",
                     "--strategies", "slide", "--out", "RESULTS/fidelity_default.json"],
     ["--skip-aggregation", "--prompt-tokens", "600", "--max-tokens", "32", "--budgets", "256:128",
      "--strategies", "slide", "--out", "RESULTS/fidelity_default.json"]),
    ("tasks.py", [], ["--seeds", "1", "--strategies", "slide", "streaming"]),
    ("memory.py", [], ["--prompts", "512", "--gens", "512", "1024"]),
    ("speed.py", [], ["--contexts", "512", "1024", "--steps", "16", "--rounds", "2", "--hook-cached"]),
    ("beyond.py", [], ["--prompt-tokens", "600", "--max-tokens", "64", "--prefill-budget", "128", "--rounds", "2",
                       "--ideal-steps", "16",
                       "--decode-budget", "64", "--chunk-prompt", "300", "--chunk-gen", "32"]),
    ("device.py", ["--skip-steady"], ["--prompt", "300", "--tokens", "32", "--prefill-budget", "128",
                                      "--decode-budget", "64", "--rounds", "1", "--ideal-steps", "8", "--skip-steady"]),
    ("device.py", ["--skip-headline", "--out", "RESULTS/steady.json"],
     ["--skip-headline", "--steady-steps", "8", "--steady-size", "96", "--steady-repeats", "1",
      "--out", "RESULTS/steady.json"]),
    ("one_slot.py", [], ["--prompt", "128", "--tokens", "16", "--prefill-budget", "64", "--decode-budget", "16",
                         "--rounds", "1"]),
    ("long_run.py", ["--tokens", "20000"], ["--tokens", "400", "--window", "200", "--rounds", "2", "--stock-tokens", "64",
                         "--ideal-steps", "16"]),
    ("server.py", ["--conversations", "4"], ["--prompt", "256", "--tokens", "64", "--conversations", "1", "2", "--prefill-budget", "96",
                       "--decode-budget", "32", "--prefill-chunk", "64", "--rounds", "2", "--batched-steps", "16"]),
    ("server.py", ["--conversations", "4", "--type-k", "q8_0", "--out", "RESULTS/server_q8.json"],
     ["--prompt", "256", "--tokens", "64", "--conversations", "2", "--type-k", "q8_0", "--rounds", "2",
      "--batched-steps", "16"]),
    ("server.py", ["--conversations", "4", "--flash-attn", "--type-k", "q8_0", "--type-v", "q8_0", "--sketch-rank", "16",
                   "--out", "RESULTS/server_flash.json"],
     ["--prompt", "256", "--tokens", "64", "--conversations", "2", "--flash-attn", "--type-k", "q8_0", "--type-v",
      "q8_0", "--sketch-rank", "8", "--rounds", "2", "--batched-steps", "16"]),
    ("ordered.py", ["tune", "--configs", "scope/q8", "scope/chunk256/q8", "--families", "inventory", "--sizes", "3",
                    "4", "--out", "RESULTS/ordered_tune_chunk.json"],
     ["tune", "--prompts", "1", "--sizes", "3", "--configs", "scope/q8", "--families", "inventory", "--workers", "1",
      "--out", "RESULTS/ordered_tune_chunk.json"]),
    ("ordered.py", ["eval", "--out", "RESULTS/ordered_eval.jsonl"],
     ["eval", "--prompts", "1", "--sizes", "3", "--configs", "scope/q8", "--families", "teams", "--workers", "1",
      "--out", "RESULTS/ordered_eval.jsonl"]),
    ("ordered.py", ["eval", "--configs", "scope/q8", "--sizes", "3", "4", "--skip-full", "--max-factor", "3",
                    "--seeds", "0", "5", "6", "7", "8", "10", "11", "12", "13", "14", "17",
                    "--out", "RESULTS/ordered_past_end.jsonl"],
     ["eval", "--prompts", "1", "--sizes", "3", "--configs", "scope/q8", "--families", "teams", "--workers", "1",
      "--skip-full", "--max-factor", "3", "--out", "RESULTS/ordered_past_end.jsonl"]),
    ("ordered.py", ["tune", "--configs", "scope/q8", "scope/recent128/q8", "scope/nolend/q8", "scope/progress/q8", "--sizes", "3", "4",
                    "--prompts", "10", "--out", "RESULTS/ordered_tune_stops.jsonl"],
     ["tune", "--prompts", "1", "--sizes", "3", "--configs", "scope/recent128/q8", "--families", "teams",
      "--workers", "1", "--out", "RESULTS/ordered_tune_stops.jsonl"]),
    ("ordered.py", ["eval", "--configs", "default", "default/q8", "--skip-full", "--out", "RESULTS/ordered_default.jsonl"],
     ["eval", "--prompts", "1", "--sizes", "3", "--configs", "default", "--families", "teams", "--workers", "1",
      "--skip-full", "--out", "RESULTS/ordered_default.jsonl"]),
    ("ordered.py", ["eval", "--configs", "scope/paperpool/q8", "--sizes", "3", "4", "--skip-full",
                    "--out", "RESULTS/ordered_pooling.jsonl"],
     ["eval", "--prompts", "1", "--sizes", "3", "--configs", "scope/paperpool/q8", "--families", "teams",
      "--workers", "1", "--skip-full", "--out", "RESULTS/ordered_pooling.jsonl"]),
    ("fidelity.py", ["--pooling", "--prompt-tokens", "512", "--max-tokens", "128", "--budgets", "192:128", "--seeds",
                     *map(str, range(20, 40)), "--out", "RESULTS/fidelity_pooling.json"],
     ["--pooling", "--prompt-tokens", "256", "--max-tokens", "32", "--budgets", "96:32", "--seeds", "20",
      "--out", "RESULTS/fidelity_pooling.json"]),
    ("fidelity.py", ["--chunking", "--prompt-tokens", "3072", "--max-tokens", "512", "--seeds", "0", "1", "2", "3", "4",
                     "5", "6", "7", "--out", "RESULTS/fidelity_chunking.json"],
     ["--chunking", "--prompt-tokens", "2200", "--max-tokens", "16", "--seeds", "0",
      "--out", "RESULTS/fidelity_chunking.json"]),
    ("multiturn.py", ["eval", "--cells", "2048", "--configs", "structure,default,full",
                      "--out", "RESULTS/multiturn_2048.jsonl"], ["eval", "--conversations", "1"]),
    # --quick: the eval's runs went to bench/out/multiturn.json (the --out run_all adds)
    ("multiturn.py", ["report", "RESULTS/multiturn_2048.jsonl", "--summary", "RESULTS/multiturn_2048.json"],
     ["report", "RESULTS/multiturn.json"]),
    # the same at 1,024 cells (the default budget's rule there: Budget(768, 256)), where the budget is tight
    ("multiturn.py", ["eval", "--cells", "1024", "--configs", "structure,default,full",
                      "--out", "RESULTS/multiturn.jsonl"], ["eval", "--cells", "1024", "--conversations", "1"]),
    ("multiturn.py", ["report", "RESULTS/multiturn.jsonl", "--summary", "RESULTS/multiturn.json"],
     ["report", "RESULTS/multiturn.json"]),
    ("fidelity.py", ["--skip-aggregation", "--strategies", "slide", "--seeds", "0", "1", "2", "3", "4",
                     "--out", "RESULTS/fidelity_prompts.json"],
     ["--skip-aggregation", "--prompt-tokens", "256", "--max-tokens", "32", "--budgets", "96:32", "--strategies",
      "slide", "--seeds", "0", "1"]),
    ("fidelity.py", ["--skip-aggregation", "--strategies", "slide", "h2o", "--scoring", "exact", "qk16+fa", "qk8+fa",
                     "pca16+fa", "random16+fa", "keydiff16+fa", "knorm16+fa", "--out", "RESULTS/fidelity_sketch.json"],
     ["--skip-aggregation", "--prompt-tokens", "256", "--max-tokens", "32", "--budgets", "96:32", "--strategies",
      "slide", "--scoring", "exact", "qk8+fa", "keydiff8+fa"]),
    ("fidelity.py", ["--skip-aggregation", "--strategies", "slide", "--scoring", "exact", "qk16", "random16",
                     "--seeds", "0", "1", "2", "3", "4", "--out", "RESULTS/fidelity_sketch_prompts.json"],
     ["--skip-aggregation", "--prompt-tokens", "256", "--max-tokens", "32", "--budgets", "96:32", "--strategies",
      "slide", "--scoring", "exact", "qk8", "--seeds", "0", "1"]),
    ("fidelity.py", ["--skip-aggregation", "--strategies", "slide", "--scoring", "exact", "qk24",
                     "--budgets", "96:64", "192:128", "--seeds", "0", "1", "2", "3", "4",
                     "--out", "RESULTS/fidelity_sketch_rank24_prompts.json"],
     ["--skip-aggregation", "--prompt-tokens", "256", "--max-tokens", "32", "--budgets", "96:32", "--strategies",
      "slide", "--scoring", "qk24", "--seeds", "0"]),
    ("fidelity.py", ["--skip-aggregation", "--strategies", "slide", "--scoring", "exact", "qk16", "qk24",
                     "--seeds", "0", "1", "2", "3", "4", "--out", "RESULTS/fidelity_sketch_lookback_prompts.json"],
     ["--skip-aggregation", "--prompt-tokens", "256", "--max-tokens", "32", "--budgets", "96:32", "--strategies",
      "slide", "--scoring", "exact", "qk16", "--seeds", "0"]),
    ("fidelity.py", ["--skip-aggregation", "--strategies", "slide", "--scoring", "qk32", "--seeds", "0", "1", "2", "3",
                     "4", "--out", "RESULTS/fidelity_sketch_lookback_rank32_prompts.json"],
     ["--skip-aggregation", "--prompt-tokens", "256", "--max-tokens", "32", "--budgets", "96:32", "--strategies",
      "slide", "--scoring", "qk32", "--seeds", "0"]),
    ("capture_layers.py", [], ["--prompt-tokens", "256", "--max-tokens", "32", "--budgets", "96:32", "--seeds", "0"]),
    ("flash.py", ["--skip-memory"], ["--prompt", "300", "--tokens", "48", "--timed", "16", "--rounds", "2",
                                     "--prefill-budget", "128",
                                     "--decode-budget", "32", "--rank", "8", "--skip-memory"]),
    ("flash.py", ["--skip-speed", "--skip-device", "--out", "RESULTS/flash_memory.json"],
     ["--skip-speed", "--skip-device", "--ranks", "8"]),
    ("iswa.py", ["--speed-only"], ["--prompt", "600", "--gen", "48", "--budgets", "512:512", "--rounds", "1",
                                   "--speed-only"]),
    ("iswa.py", ["--gen", "1024", "--budgets", "--out", "RESULTS/iswa_fidelity.json"],
     ["--prompt", "600", "--gen", "24", "--budgets", "--fidelity-budgets", "512:512", "--fidelity-tokens", "16"]),
    ("plots.py", [], []),
]


def arguments(script: str, args: list[str], results: Path, *, quick: bool, first: bool, index: int) -> list[str]:
    """A run's arguments with RESULTS made `results`; every result file into
    `results`: a script's own default file name is <script>.json there."""
    extra = [a.replace("RESULTS", str(results)) for a in args]
    stem = script.removesuffix(".py")
    if script == "plots.py":
        return extra + ["--results", str(results)]
    if quick:  # first run of a script under its plain name (plots.py reads those)
        return extra + ["--out", str(results / (f"{stem}.json" if first else f"{stem}_{index}.json"))]
    return extra if "--out" in extra or script in ("ordered.py", "multiturn.py") else extra + [
        "--out", str(results / f"{stem}.json")]


def result_name(script: str, args: list[str]) -> str:
    """The stem of the file a run writes: its --out, else the script's."""
    outs = [a for a in args if a.startswith("RESULTS/")]
    return Path(outs[0]).stem if outs else script.removesuffix(".py")


def selected(only: list[str] | None) -> list[tuple[str, list[str], list[str]]]:
    """RUNS whose result file or script --only names (all of them without
    --only); a name that matches nothing is refused with the names there are."""
    if not only:
        return RUNS
    known = {result_name(s, full) for s, full, _ in RUNS} | {s for s, _, _ in RUNS}
    unknown = [n for n in only if n not in known]
    if unknown:
        raise SystemExit(f"--only {' '.join(unknown)}: no such result file or script; "
                         f"choose from {', '.join(sorted(known))}")
    return [r for r in RUNS if r[0] in only or result_name(r[0], r[1]) in only]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--results", type=Path, default=None,
                    help="write every result file here (default: bench/results/, or bench/out/ with --quick); "
                         "then `python bench/compare.py DIR` places them against the stored ones")
    ap.add_argument("--only", nargs="+", metavar="NAME",
                    help="only these result files (their stems: fidelity_long, server_q8) or scripts (fidelity.py)")
    args = ap.parse_args()
    runs = selected(args.only)
    results = args.results or (HERE / "out" if args.quick else HERE / "results")
    results.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for i, (script, full, quick) in enumerate(runs):
        extra = arguments(script, quick if args.quick else full, results, quick=args.quick,
                          first=script not in seen, index=i)
        seen.add(script)
        print(f"== {script} {' '.join(extra)}", flush=True)
        subprocess.run([sys.executable, str(HERE / script), *extra], check=True)
    subprocess.run([sys.executable, str(HERE / "report.py"), "--results", str(results),
                    "--out", str(results / "RESULTS.md")], check=True)


if __name__ == "__main__":
    main()
