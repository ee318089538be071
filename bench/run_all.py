"""Reproduce every number and plot in bench/results/ (about an hour on 2 cores).

    python bench/run_all.py [--quick]

Runs, in order: headline.py (2048 + 4096, every strategy), fidelity.py,
tasks.py, memory.py, speed.py (with hook_overhead.py), plots.py. --quick
uses small sizes to check the pipeline end to end.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUICK = {
    "headline.py": ["--prompt-tokens", "300", "--max-tokens", "64", "--prefill-budget", "128", "--decode-budget", "64"],
    "fidelity.py": ["--prompt-tokens", "256", "--max-tokens", "64", "--budgets", "96:32", "128:64"],
    "tasks.py": ["--seeds", "1", "--strategies", "slide", "streaming"],
    "memory.py": ["--prompts", "512", "--gens", "512", "1024"],
    "speed.py": ["--contexts", "512", "1024", "--steps", "16", "--hook-cached"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    for script in ("headline.py", "fidelity.py", "tasks.py", "memory.py", "speed.py", "plots.py"):
        extra = QUICK.get(script, []) if args.quick else []
        if args.quick and script != "plots.py":
            extra = [*extra, "--out", str(HERE.parent / "bench" / "out" / script.replace(".py", ".json"))]
        print(f"== {script} {' '.join(extra)}", flush=True)
        subprocess.run([sys.executable, str(HERE / script), *extra], check=True)


if __name__ == "__main__":
    main()
