"""One very long generation under a fixed budget: do decode speed and memory
stay flat while the history grows (to 100,000 tokens by default)?

    python bench/long_run.py [--tokens 100000] [--window 2000] [--prompt 512] \
        [--prefill-budget 256] [--decode-budget 256] [--strategy slide] [--json]

One ScopeLlama(budget, strategy) streams `--tokens` tokens after a logbook
prompt, ignoring end-of-text. Every `--window` tokens it records the window's
decode tok/s, the resident set now and at its peak, the cells held and the
position re-indexings so far (positions pass the model's trained context every
few thousand tokens, so a long run re-indexes many times). Work or memory that
grows with the history shows as falling tok/s or rising RSS across windows.
Writes bench/results/long_run.json and prints a table.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from scope_edge import Budget, ScopeLlama, models
from scope_edge.bench import logbook_prompt, machine, peak_rss_bytes, save_results

log = logging.getLogger("bench.long_run")
RESULTS = Path(__file__).resolve().parent / "results"
STATM = Path("/proc/self/statm")


def rss_bytes() -> int:
    """Resident bytes now (Linux /proc); elsewhere the peak, the best available."""
    if not STATM.exists():
        return peak_rss_bytes()
    return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run(path: str, prompt: list[int], *, budget: Budget, strategy: str, tokens: int, window: int) -> dict:
    windows: list[dict] = []
    with ScopeLlama(path, budget=budget, strategy=strategy) as llm:
        # a short run first, so Numba's one-off compiles stay out of the first window
        llm.generate(prompt, max_tokens=budget.decode + 16, ignore_eos=True)
        last = None
        for n, last in enumerate(llm.stream(prompt, max_tokens=tokens, ignore_eos=True), start=1):
            now = time.perf_counter()
            if n == 1:  # the clock starts after the prefill
                prev_n, prev_t = n, now
            if n % window and n != tokens:
                continue
            windows.append({"tokens": n, "tokens_per_s": (n - prev_n) / (now - prev_t), "rss_bytes": rss_bytes(),
                            "peak_rss_bytes": peak_rss_bytes(), "cells_held": len(llm.kv_positions()),
                            "cells_allocated": llm.n_ctx})
            log.info("%d tokens: %.1f tok/s, RSS %.1f MiB, %d cells held", n, windows[-1]["tokens_per_s"],
                     windows[-1]["rss_bytes"] / 2**20, windows[-1]["cells_held"])
            prev_n, prev_t = n, time.perf_counter()
        assert last is not None and last.stats is not None
        return {"windows": windows, "stats": last.stats.as_dict()}


def summary(windows: list[dict]) -> dict:
    """First full window against the last: speed ratio and RSS growth."""
    first, end = windows[0], windows[-1]
    return {"tokens_per_s_last_over_first": end["tokens_per_s"] / first["tokens_per_s"],
            "rss_growth_bytes": end["rss_bytes"] - first["rss_bytes"],
            "max_cells_held": max(w["cells_held"] for w in windows)}


def table(res: dict) -> str:
    mib = 2**20
    lines = [f"{'tokens':>7} {'tok/s':>6} {'RSS MiB':>8} {'peak MiB':>8} {'cells':>6}"]
    for w in res["windows"]:
        lines.append(f"{w['tokens']:7d} {w['tokens_per_s']:6.1f} {w['rss_bytes'] / mib:8.1f} "
                     f"{w['peak_rss_bytes'] / mib:8.1f} {w['cells_held']:6d}")
    s = res["summary"]
    lines.append(f"last/first window tok/s {s['tokens_per_s_last_over_first']:.2f}, "
                 f"RSS growth {s['rss_growth_bytes'] / mib:+.1f} MiB, {res['stats']['position_resets']} re-indexings, "
                 f"at most {s['max_cells_held']} cells held")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=100_000, help="tokens to generate (e.g. 20000 for a shorter run)")
    ap.add_argument("--window", type=int, default=2000, help="tokens per measured window")
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    ap.add_argument("--prefill-budget", type=int, default=256)
    ap.add_argument("--decode-budget", type=int, default=256)
    ap.add_argument("--strategy", default="slide")
    ap.add_argument("--out", default=str(RESULTS / "long_run.json"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.window < 1 or args.tokens < args.window:
        raise ValueError(f"need 1 <= --window <= --tokens, got window {args.window}, tokens {args.tokens}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    path = str(models.fetch())
    budget = Budget(prefill=args.prefill_budget, decode=args.decode_budget)
    prompt = logbook_prompt(path, args.prompt)
    res = run(path, prompt, budget=budget, strategy=args.strategy, tokens=args.tokens, window=args.window)
    res.update(prompt_tokens=len(prompt), budget={"prefill": budget.prefill, "decode": budget.decode},
               strategy=args.strategy, window=args.window, summary=summary(res["windows"]), machine=machine())
    save_results(args.out, res, print_json=args.json, table=table)


if __name__ == "__main__":
    main()
