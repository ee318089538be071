"""Decode speed with offloaded layers: stock llama.cpp and ours on the same device.

    python bench/device.py [--prompt 2048] [--tokens 2048] [--prefill-budget 1024] \
        [--decode-budget 512] [--rounds 3] [--ideal-steps 256] [--steady-steps 128] [--steady-repeats 3] \
        [--threads N] [--server-threads 1] [--skip-headline] [--skip-steady] [--json]

The device is llama.cpp's RPC backend: a server process on 127.0.0.1 serving
this machine's CPU (scope_edge.rpc.Server), every layer offloaded to it
(n_gpu_layers=-1). Weights and KV cache live in the server; every tensor the
hook reads crosses the socket, as it would cross PCIe from a GPU.

headline  prompt P + T generated under the speed protocol (scope_edge.protocol:
          same run, equal threads and KV types, stock in its plain greedy loop,
          EOG masked on both, --rounds interleaved rounds, load read before and
          after), every column on the device: stock (n_gpu_layers=-1); ours
          with budget=None; ours under the budgets (slide) capturing the
          offload default (every 4th layer), and its ideal (stock on the device
          in our allocated cells at our fill); ours capturing every layer.
          Also the hook's reads and bytes per decode step and per captured
          step (first round: they do not vary).
steady    prompt N, budget N/N (N = 512), every strategy, and ours with no
          budget ("none"): ours generates N tokens untimed (the decode cache
          fills: from then on a selection, and for slide an eviction, every
          step), then S steps interleaved one by one with stock decoding in
          a context of the same cells filled to cells - S (attention width
          identical; "none": the same cells and fill as ours), both in this
          process at the same n_threads (--threads; default
          llama-cpp-python's, one decode thread on 2 CPUs), so a shared
          machine's load falls on both alike. Each side's time includes what
          it pays in Python per step (stock: llama_decode and the greedy pick in
          scope_edge.protocol.StockSteps, the one stock loop).
          On the CPU and on the device, same run; --steady-repeats rounds,
          the medians reported with the spread of the ratios.
Writes bench/results/device.json and prints tables (bench/run_all.py: the
headline with --skip-steady into device.json, the steady rows with
--skip-headline into steady.json).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

from scope_edge import Budget, ScopeLlama, models, rpc
from scope_edge.bench import eog_tokens, logbook_prompt, machine, save_results
from scope_edge.bench.columns import NONE, Columns, columns_table, header, ratios_table, report, standard_ratios
from scope_edge.protocol import Cache, StockSteps, Threads, run_rounds
from scope_edge.policies import STRATEGIES

log = logging.getLogger("bench.device")
RESULTS = Path(__file__).resolve().parent / "results"
N_LAYER = 30  # the default model's layers
EVERY_LAYER = "ours, slide, every layer captured"


def slide_label(budget: Budget) -> str:
    return f"ours, slide {budget.prefill}/{budget.decode}"


def hook_costs(runs: dict[str, list[dict]], tokens: int) -> dict[str, dict]:
    """Per ours column (its first round): captured steps, tensor reads per
    decode step, and the bytes a captured step reads beyond what every step
    reads (the indices and mask row, as ours with no budget reads them)."""
    fed = max(tokens - 1, 1)
    base = runs[NONE][0]["hook_bytes_read"] / fed
    out = {}
    for label, rounds in runs.items():
        if not label.startswith("ours"):
            continue
        r = rounds[0]
        captured = r["captured_steps"]
        out[label] = {"captured_steps": captured, "reads_per_step": r["hook_reads"] / fed,
                      "bytes_per_step": r["hook_bytes_read"] / fed,
                      "bytes_per_captured_step": (r["hook_bytes_read"] - base * fed) / captured if captured else None}
    return out


def headline(path: str, endpoint: str, args: argparse.Namespace) -> dict:
    """The protocol's columns with every layer on the device."""
    prompt = logbook_prompt(path, args.prompt)
    budget = Budget(prefill=args.prefill_budget, decode=args.decode_budget)
    device = {"rpc_servers": [endpoint], "n_gpu_layers": -1}
    cols = Columns(path, prompt, args.tokens, eog=eog_tokens(path), n_threads=args.threads,
                   ideal_steps=args.ideal_steps, n_gpu_layers=-1)
    cols.stock(Cache())
    cols.ours(NONE, lambda: ScopeLlama(path, budget=None, n_threads=args.threads, **device))
    cols.ours(slide_label(budget), lambda: ScopeLlama(path, budget=budget, strategy="slide",
                                                       n_threads=args.threads, **device), ideal_cache=Cache())
    cols.ours(EVERY_LAYER, lambda: ScopeLlama(path, budget=budget, strategy="slide", n_threads=args.threads,
                                              capture_layers=range(N_LAYER), **device))
    done = run_rounds(cols.cols, args.rounds)
    return {"prompt": len(prompt), "tokens": args.tokens, "budget": [budget.prefill, budget.decode],
            "rounds": args.rounds, "threads": list(cols.equal.resolved()),
            **report(done, standard_ratios(list(cols.cols))), "hook": hook_costs(done["runs"], args.tokens)}


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


def headline_table(h: dict) -> list[str]:
    out = [f"every layer on the RPC device, prompt {h['prompt']} + {h['tokens']}, budgets {h['budget'][0]}/"
           f"{h['budget'][1]}; {header(h['rounds'], h['load_1m'])}", "", *columns_table(h["columns"]), "",
           *ratios_table(h["ratios"]), "", "| hook (first round) | captured steps | reads / step | MB / captured step |",
           "|---|---|---|---|"]
    for label, c in h["hook"].items():
        mb = "-" if c["bytes_per_captured_step"] is None else f"{c['bytes_per_captured_step'] / 1e6:.2f}"
        out.append(f"| {label} | {c['captured_steps']:,} | {c['reads_per_step']:.1f} | {mb} |")
    return out


def steady_table(res: dict) -> list[str]:
    def cell(r: dict) -> str:
        spread = f" ({r['vs_stock_min']:.2f}..{r['vs_stock_max']:.2f})" if r.get("repeats", 1) > 1 else ""
        return (f"{r['decode_tokens_per_s']:.1f} / {r['stock_same_cells_tokens_per_s']:.1f} = "
                f"{r['vs_stock']:.2f}x{spread}")
    cpu = res["steady_cpu"]
    repeats = next(iter(cpu.values())).get("repeats", 1)
    out = [f"steady state (decode cache full), ours / stock at the same cells, stepped in turn: medians of "
           f"{repeats} rounds (spread of the ratios)", "", "| strategy | CPU tok/s | RPC device tok/s | cells |",
           "|---|---|---|---|"]
    out += [f"| {s} | {cell(r)} | {cell(res['steady_device'][s])} | {r['kv_cells']:,} |" for s, r in cpu.items()]
    return out


def table(res: dict) -> str:
    h = res.get("headline")
    return "\n".join([*(headline_table(h) + [""] if h else []), *(steady_table(res) if "steady_cpu" in res else [])])


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--prefill-budget", type=int, default=1024)
    ap.add_argument("--decode-budget", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the headline's columns")
    ap.add_argument("--ideal-steps", type=int, default=256, help="timed steps of the headline's ideal")
    ap.add_argument("--steady-steps", type=int, default=128)
    ap.add_argument("--steady-size", type=int, default=512, help="steady prompt tokens, and both budgets")
    ap.add_argument("--steady-repeats", type=int, default=3, help="interleaved rounds; medians reported")
    ap.add_argument("--threads", type=int, default=None,
                    help="decode threads of ours and stock, headline and steady (default: llama-cpp-python's, "
                         "half the CPUs)")
    ap.add_argument("--server-threads", type=int, default=1,
                    help="the server's compute threads (1: it shares 2 cores with this process)")
    ap.add_argument("--skip-headline", action="store_true")
    ap.add_argument("--skip-steady", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "device.json"))
    ap.add_argument("--json", action="store_true")
    return ap


def run(args: argparse.Namespace) -> dict:
    path = str(models.fetch())
    res: dict = {"machine": machine(), "server_threads": args.server_threads}
    with rpc.Server(rpc.free_endpoint(), n_threads=args.server_threads) as server:
        rpc.register(server.endpoint)  # stock llama_cpp.Llama offloads to it too
        if not args.skip_headline:
            res["headline"] = headline(path, server.endpoint, args)
        if not args.skip_steady:
            res["steady_cpu"] = steady(path, args.steady_steps, args.steady_size, args.steady_repeats,
                                       args.threads)
            res["steady_device"] = steady(path, args.steady_steps, args.steady_size, args.steady_repeats,
                                          args.threads, rpc_servers=[server.endpoint], n_gpu_layers=-1)
    return res


def main() -> None:
    args = parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    save_results(args.out, run(args), print_json=args.json, table=table)


if __name__ == "__main__":
    main()
