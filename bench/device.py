"""Decode speed with offloaded layers: stock llama.cpp and ours on the same device.

    python bench/device.py [--prompt 2048] [--tokens 2048] [--prefill-budget 1024] \
        [--decode-budget 512] [--steady-steps 128] [--steady-repeats 3] [--steady-threads N] [--server-threads 1] \
        [--skip-headline] [--json]

The device is llama.cpp's RPC backend: a server process on 127.0.0.1 serving
this machine's CPU (scope_edge.rpc.Server), every layer offloaded to it
(n_gpu_layers=-1). Weights and KV cache live in the server; every tensor the
hook reads crosses the socket, as it would cross PCIe from a GPU.

headline  prompt P + T generated (greedy, end-of-generation masked), same run:
          stock llama_cpp.Llama on the device; ours with budget=None; ours
          under budget (slide), capturing the offload default (every 4th
          layer) and every layer. Decode tok/s, ratios to stock, and the
          hook's reads and bytes per decode step and per captured step.
steady    prompt N, budget N/N (N = 512), every strategy, and ours with no
          budget ("none"): ours generates N tokens untimed (the decode cache
          fills: from then on a selection, and for slide an eviction, every
          step), then S steps interleaved one by one with stock decoding in
          a context of the same cells filled to cells - S (attention width
          identical; "none": the same cells and fill as ours), both in this
          process at the same n_threads (--steady-threads; default
          llama-cpp-python's, one decode thread on 2 CPUs), so a shared
          machine's load falls on both alike. Each side's time includes what
          it pays in Python per step (stock: llama_decode and the greedy pick in
          scope_edge.protocol.StockSteps, the one stock loop).
          On the CPU and on the device, same run; --steady-repeats rounds,
          the medians reported with the spread of the ratios.
Writes bench/results/device.json; ratios only (the machine is shared).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

from scope_edge import Budget, ScopeLlama, models, rpc
from scope_edge.bench import eog_tokens, logbook_prompt, machine, save_results
from scope_edge.protocol import StockSteps, Threads, stock_greedy
from scope_edge.policies import STRATEGIES

log = logging.getLogger("bench.device")
RESULTS = Path(__file__).resolve().parent / "results"
N_LAYER = 30  # the default model's layers


def time_ours(path: str, prompt: list[int], *, max_tokens: int, timed: int, budget: Budget | None,
              strategy: str = "slide", **options: object) -> dict:
    """Generate max_tokens (EOG ignored); decode tok/s over the last `timed`.
    options: further ScopeLlama arguments (offload, capture_layers)."""
    with ScopeLlama(path, budget=budget, strategy=strategy, **options) as llm:
        stamps: list[float] = []
        last = None
        for last in llm.stream(prompt, max_tokens=max_tokens, ignore_eos=True):
            stamps.append(time.perf_counter())
        assert last is not None and last.stats is not None
        st = last.stats
        tail = stamps[-timed - 1:]
        fed = max(st.generated_tokens - 1, 1)
        return {"decode_tokens_per_s": (len(tail) - 1) / (tail[-1] - tail[0]),
                "prefill_tokens_per_s": st.prefill_tokens_per_s, "kv_cells": st.kv_cells_allocated,
                "captured_steps": st.captured_steps, "hook_reads": st.hook_reads,
                "hook_bytes_read": st.hook_bytes_read, "reads_per_step": st.hook_reads / fed,
                "bytes_per_step": st.hook_bytes_read / fed}


def headline(path: str, endpoint: str, args: argparse.Namespace) -> dict:
    prompt = logbook_prompt(path, args.prompt)
    budget = Budget(prefill=args.prefill_budget, decode=args.decode_budget)
    device = {"rpc_servers": [endpoint], "n_gpu_layers": -1}
    stock = stock_greedy(path, prompt, args.tokens, eog=eog_tokens(path), n_gpu_layers=-1)
    full = time_ours(path, prompt, max_tokens=args.tokens, timed=args.tokens - 1, budget=None, **device)
    slide = time_ours(path, prompt, max_tokens=args.tokens, timed=args.tokens - 1, budget=budget, **device)
    every = time_ours(path, prompt, max_tokens=args.tokens, timed=args.tokens - 1, budget=budget,
                      capture_layers=range(N_LAYER), **device)
    out = {"prompt": len(prompt), "tokens": args.tokens, "budget": [budget.prefill, budget.decode],
           "stock": {"decode_tokens_per_s": stock["decode_tokens_per_s"], "kv_cells": stock["n_ctx"]},
           "full": full, "slide": slide, "slide_every_layer": every}
    for name in ("full", "slide", "slide_every_layer"):
        run = out[name]
        run["vs_stock"] = run["decode_tokens_per_s"] / stock["decode_tokens_per_s"]
        # what a captured step reads beyond the indices and mask row every step reads
        run["bytes_per_captured_step"] = (
            (run["hook_bytes_read"] - full["bytes_per_step"] * (args.tokens - 1)) / max(run["captured_steps"], 1))
        log.info("headline %s: %.1f tok/s, %.2fx stock (%.1f)", name, run["decode_tokens_per_s"], run["vs_stock"],
                 stock["decode_tokens_per_s"])
    return out


def steady_round(path: str, prompt: list[int], steps: int, budget: Budget | None, strategy: str, *,
                 n_threads: int | None, **device: object) -> dict:
    """One round: ours warmed to a full decode cache, then `steps` steps
    interleaved with stock's at the same cells. Tok/s of each side over
    those steps."""
    warm = budget.decode if budget is not None else 0
    ngl = int(device.get("n_gpu_layers", 0))
    ours_s = stock_s = 0.0
    with ScopeLlama(path, budget=budget, strategy=strategy, n_threads=n_threads, **device) as llm:
        stream = llm.stream(prompt, max_tokens=warm + steps + 1, ignore_eos=True)
        for _ in range(warm + 1):  # the last untimed step feeds nothing: the first chunk comes before any feed
            next(stream)
        cells = llm.n_ctx
        fill = cells - steps if budget is not None else len(prompt) + warm
        filler = list(prompt)
        while len(filler) < fill:
            filler += filler
        stock = StockSteps(path, filler[:fill], n_ctx=cells, eog=eog_tokens(path), threads=Threads(decode=n_threads),
                           n_gpu_layers=ngl)
        try:
            next(stock)  # the prefill, untimed
            for _ in range(steps):
                t0 = time.perf_counter()
                next(stream)
                t1 = time.perf_counter()
                next(stock)
                ours_s, stock_s = ours_s + t1 - t0, stock_s + time.perf_counter() - t1
        finally:
            stock.close()
            stream.close()
    return {"decode_tokens_per_s": steps / ours_s, "stock_same_cells_tokens_per_s": steps / stock_s,
            "kv_cells": cells}


def steady(path: str, steps: int, size: int, repeats: int, n_threads: int | None = None, **device: object) -> dict:
    """Every strategy and ours with no budget against stock at its cells,
    step-interleaved, `repeats` rounds: the median of the rounds' ratios,
    and their spread."""
    prompt = logbook_prompt(path, size)
    budget = Budget(prefill=size, decode=size)
    rounds: dict[str, list[dict]] = {}
    for _ in range(repeats):
        for strategy in (*STRATEGIES, "none"):
            run = steady_round(path, prompt, steps, None if strategy == "none" else budget,
                               "slide" if strategy == "none" else strategy, n_threads=n_threads, **device)
            run["vs_stock"] = run["decode_tokens_per_s"] / run["stock_same_cells_tokens_per_s"]
            rounds.setdefault(strategy, []).append(run)
            log.info("steady %s %s: ours %.1f, stock at %d cells %.1f tok/s (%.3fx)",
                     "device" if device.get("n_gpu_layers") else "cpu", strategy, run["decode_tokens_per_s"],
                     run["kv_cells"], run["stock_same_cells_tokens_per_s"], run["vs_stock"])
    rows = {}
    for strategy, runs in rounds.items():
        ratios = [r["vs_stock"] for r in runs]
        rows[strategy] = {"kv_cells": runs[0]["kv_cells"],
                          "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs),
                          "stock_same_cells_tokens_per_s": statistics.median(
                              r["stock_same_cells_tokens_per_s"] for r in runs),
                          "vs_stock": statistics.median(ratios), "vs_stock_min": min(ratios),
                          "vs_stock_max": max(ratios), "repeats": len(runs), "steps": steps,
                          "n_threads": n_threads}
    return rows


def table(res: dict) -> str:
    lines = []
    h = res.get("headline")
    if h:
        lines.append(f"device, {h['prompt']} + {h['tokens']}: stock {h['stock']['decode_tokens_per_s']:.1f} tok/s; "
                     + "; ".join(f"{n} {h[n]['vs_stock']:.2f}x, {h[n]['bytes_per_captured_step'] / 1e6:.2f} MB/captured step"
                                 for n in ("full", "slide", "slide_every_layer")))
    for where in ("steady_cpu", "steady_device"):
        lines.append(where + " " + " ".join(f"{s} {r['vs_stock']:.2f}x" for s, r in res[where].items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--prefill-budget", type=int, default=1024)
    ap.add_argument("--decode-budget", type=int, default=512)
    ap.add_argument("--steady-steps", type=int, default=128)
    ap.add_argument("--steady-size", type=int, default=512, help="steady prompt tokens, and both budgets")
    ap.add_argument("--steady-repeats", type=int, default=3, help="interleaved rounds; medians reported")
    ap.add_argument("--steady-threads", type=int, default=None,
                    help="decode threads of both sides (default: llama-cpp-python's, half the CPUs)")
    ap.add_argument("--server-threads", type=int, default=1,
                    help="the server's compute threads (1: it shares 2 cores with this process)")
    ap.add_argument("--skip-headline", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "device.json"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    path = str(models.fetch())
    res: dict = {"machine": machine(), "server_threads": args.server_threads}
    with rpc.Server(rpc.free_endpoint(), n_threads=args.server_threads) as server:
        rpc.register(server.endpoint)  # stock llama_cpp.Llama offloads to it too
        if not args.skip_headline:
            res["headline"] = headline(path, server.endpoint, args)
        res["steady_cpu"] = steady(path, args.steady_steps, args.steady_size, args.steady_repeats,
                                   args.steady_threads)
        res["steady_device"] = steady(path, args.steady_steps, args.steady_size, args.steady_repeats,
                                      args.steady_threads, rpc_servers=[server.endpoint], n_gpu_layers=-1)
    save_results(args.out, res, print_json=args.json, table=table)


if __name__ == "__main__":
    main()
