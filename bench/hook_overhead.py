"""Decode speed of the native hook against stock llama-cpp-python, same run.

    python bench/hook_overhead.py [--cached 2048 7000] [--steps 64] [--repeats 3] [--json]

For each cached-context length it prefills the same random tokens and then
times `steps` single-token decodes, in four set-ups that alternate within
each repeat (the machine is shared, so only same-run ratios mean anything):
  stock    llama_cpp.Llama.eval, no callback
  bare     a stock llama_cpp.Llama's context (no callback installed) driven
           by the same decode loop as hook and capture: one llama_batch per
           step, llama_decode, a copy of the logits (isolates the hook from
           the Python overhead of the loop)
  hook     ScopeLlama(budget=None)'s context (scope_edge.runtime.context.Context):
           our hook installed, no capture (maps cells, reads the mask)
  capture  the same, capturing kq_soft_max of every layer on every step
           (`with ctx.capturing(pos):` around the decode, then ctx.capture())
Every context: N_CTX cells, llama-cpp-python's default threads (ScopeLlama
uses the same), ubatch 512, K and V f16, flash attention off.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Sequence

import llama_cpp
import numpy as np

from scope_edge import ScopeLlama, models
from scope_edge.bench import save_results
from scope_edge.runtime.context import fill_batch

log = logging.getLogger("bench.hook_overhead")
N_CTX = 8192
N_BATCH = 512
MODES = ("stock", "bare", "hook", "capture")


def _tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.RandomState(seed).randint(100, 40000, size=n).tolist()


def time_stock(path: str, prompt: list[int], steps: list[int]) -> float:
    llm = llama_cpp.Llama(path, n_ctx=N_CTX, flash_attn=False, verbose=False)
    try:
        llm.eval(prompt)
        t0 = time.perf_counter()
        for tok in steps:
            llm.eval([tok])
        return len(steps) / (time.perf_counter() - t0)
    finally:
        llm.close()


class BareContext:
    """A stock llama_cpp.Llama's context, no eval callback, with the decode()
    and logits() of scope_edge's Context minus the hook's bracketing."""

    def __init__(self, path: str) -> None:
        self.llm = llama_cpp.Llama(path, n_ctx=N_CTX, n_batch=N_BATCH, n_ubatch=N_BATCH, flash_attn=False,
                                   verbose=False)
        self.batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        self.n_vocab = self.llm.n_vocab()

    def decode(self, tokens: Sequence[int], positions: Sequence[int], *, want_logits: bool) -> None:
        fill_batch(self.batch, tokens, positions, want_logits=want_logits)
        rc = llama_cpp.llama_decode(self.llm.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with {rc}")

    def logits(self) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        self.llm.close()


def _drive(ctx, prompt: list[int], steps: list[int], *, capture: bool) -> float:
    """Prefill prompt, then time one decode (and logits copy) per step;
    capture: every step's attention rows captured and read."""
    for i in range(0, len(prompt), N_BATCH):
        chunk = prompt[i : i + N_BATCH]
        ctx.decode(chunk, range(i, i + len(chunk)), want_logits=True)
    pos = len(prompt)
    t0 = time.perf_counter()
    for tok in steps:
        if capture:
            with ctx.capturing(pos):
                ctx.decode([tok], [pos], want_logits=True)
            ctx.capture()
        else:
            ctx.decode([tok], [pos], want_logits=True)
        ctx.logits()
        pos += 1
    return len(steps) / (time.perf_counter() - t0)


def time_ours(path: str, prompt: list[int], steps: list[int], mode: str) -> float:
    if mode == "bare":
        bare = BareContext(path)
        try:
            return _drive(bare, prompt, steps, capture=False)
        finally:
            bare.close()
    with ScopeLlama(path, budget=None, n_ctx=N_CTX) as llm:  # a fixed n_ctx: the context exists from the start
        ctx = llm.context
        assert ctx is not None and ctx.n_cells == N_CTX
        return _drive(ctx, prompt, steps, capture=mode == "capture")


def run(cached: list[int], n_steps: int, repeats: int) -> dict:
    path = str(models.fetch())
    out: dict = {"n_ctx": N_CTX, "steps": n_steps, "repeats": repeats, "results": {}}
    for n in cached:
        prompt, steps = _tokens(n), _tokens(n_steps, seed=1)
        rates: dict[str, list[float]] = {m: [] for m in MODES}
        for r in range(repeats):
            for mode in rates:
                rate = time_stock(path, prompt, steps) if mode == "stock" else time_ours(path, prompt, steps, mode)
                rates[mode].append(rate)
                log.info("cached=%d repeat=%d %s: %.1f tok/s", n, r, mode, rate)
        med = {m: statistics.median(v) for m, v in rates.items()}
        out["results"][str(n)] = {
            "decode_tokens_per_s": med,
            "all": rates,
            "hook_vs_stock": med["hook"] / med["stock"],
            "capture_vs_stock": med["capture"] / med["stock"],
            "hook_vs_bare": med["hook"] / med["bare"],
            "capture_vs_bare": med["capture"] / med["bare"],
        }
    return out


def table(res: dict) -> str:
    lines = [f"{'cached':>7} {'stock':>7} {'bare':>7} {'hook':>7} {'capture':>8} {'hook/stock':>10} {'capt/stock':>10}"]
    for n, r in res["results"].items():
        d = r["decode_tokens_per_s"]
        lines.append(f"{n:>7} {d['stock']:7.1f} {d['bare']:7.1f} {d['hook']:7.1f} {d['capture']:8.1f} "
                     f"{r['hook_vs_stock']:10.3f} {r['capture_vs_stock']:10.3f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cached", type=int, nargs="+", default=[2048, 7000])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the JSON here (default: print only)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res = run(args.cached, args.steps, args.repeats)
    save_results(args.out, res, print_json=args.json, table=table)


if __name__ == "__main__":
    main()
