"""Per-step work between decodes at steady state, ours against stock.

    python bench/step_overhead.py [--strategy slide] [--size 512] [--steps 64] [--profile] [--no-stock]

Ours runs under budget size/size with the decode cache full (for slide a
selection and an eviction every step; --strategy none: no budget), stepped
in turn with stock decoding in a context of the same cells, as
bench/device.py's steady mode (--no-stock: ours alone). Both sides'
llama_decode calls are timed, so each step splits into the decode and the
work around it (Python, the hook's arm / capture / evict); the medians of
that split are what this prints, as JSON on stdout. --profile: cProfile of
ours' timed steps, top functions by own time. A measurement aid for a shared
machine: the main thread's CPU time between decodes says more than tok/s.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import logging
import pstats
import statistics
import sys
import time

import llama_cpp
import llama_cpp.llama_cpp as llama_cpp_lib

from scope_edge import Budget, ScopeLlama, models
from scope_edge.bench import logbook_prompt, stock_steps


class DecodeClock:
    """Wraps llama_decode (both bindings: scope_edge's and llama_cpp.Llama's)
    and sums the wall seconds, and this thread's CPU seconds, inside it."""

    def __init__(self) -> None:
        self.seconds = self.cpu = 0.0
        self._orig = llama_cpp.llama_decode

    def _timed(self, ctx, batch):  # noqa: ANN001, ANN202 - the ctypes binding's signature
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return self._orig(ctx, batch)
        finally:
            self.seconds += time.perf_counter() - t0
            self.cpu += time.thread_time() - c0

    def now(self) -> tuple[float, float, float, float]:
        return time.perf_counter(), time.thread_time(), self.seconds, self.cpu

    def __enter__(self) -> DecodeClock:
        llama_cpp.llama_decode = llama_cpp_lib.llama_decode = self._timed
        return self

    def __exit__(self, *exc: object) -> None:
        llama_cpp.llama_decode = llama_cpp_lib.llama_decode = self._orig


def split(before: tuple[float, float, float, float], after: tuple[float, float, float, float]) -> tuple[float, ...]:
    """(step wall, decode wall, between wall, between CPU of this thread) of one step."""
    wall, cpu, dec, dec_cpu = (b - a for a, b in zip(before, after))
    return wall, dec, wall - dec, cpu - dec_cpu


def run(path: str, *, strategy: str, size: int, steps: int, profile: bool, stock: bool) -> dict:
    prompt = logbook_prompt(path, size)
    budget = None if strategy == "none" else Budget(prefill=size, decode=size)
    ours: list[tuple[float, ...]] = []
    theirs: list[tuple[float, ...]] = []
    prof = cProfile.Profile() if profile else None
    warm = size if budget is not None else 0
    with ScopeLlama(path, budget=budget, strategy="slide" if budget is None else strategy) as llm:
        stream = llm.stream(prompt, max_tokens=warm + steps + 1, ignore_eos=True)
        for _ in range(warm + 1):
            next(stream)
        fill = llm.n_ctx - steps if budget is not None else len(prompt) + warm
        filler = list(prompt)
        while len(filler) < fill:
            filler += filler
        ref = stock_steps(path, llm.n_ctx, filler[:fill]) if stock else None
        sides = ((ours, stream, prof), (theirs, ref, None)) if ref is not None else ((ours, stream, prof),)
        try:
            if ref is not None:
                next(ref)
            with DecodeClock() as clock:
                for _ in range(steps):
                    for side, it, p in sides:
                        before = clock.now()
                        if p is not None:
                            p.enable()
                        next(it)
                        if p is not None:
                            p.disable()
                        side.append(split(before, clock.now()))
        finally:
            if ref is not None:
                ref.close()
            stream.close()
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)

    def summary(side: list[tuple[float, ...]]) -> dict:
        cols = list(zip(*side))
        out = {k: round(statistics.median(c) * 1e6, 1)
               for k, c in zip(("step_us", "decode_us", "between_us", "between_cpu_us"), cols)}
        # a loaded machine's preemptions inflate even CPU time (cold caches): the quiet steps' too
        out["between_cpu_p10_us"] = round(statistics.quantiles(cols[3], n=10)[0] * 1e6, 1)
        return out

    out = {"strategy": strategy, "size": size, "steps": steps, "ours": summary(ours)}
    if theirs:
        out["stock"] = summary(theirs)
        out["step_ratio"] = sum(s[0] for s in theirs) / sum(s[0] for s in ours)  # ours speed / stock speed
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategy", default="slide")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-stock", action="store_true", help="ours only (half the CPU)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    res = run(str(models.fetch()), strategy=args.strategy, size=args.size, steps=args.steps,
              profile=args.profile, stock=not args.no_stock)
    sys.stdout.write(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
