"""Markdown tables from the JSON in bench/results/, for RESULTS.md and the README.

    python bench/report.py [--results bench/results]

Prints one table per results file present; the prose around them in
RESULTS.md is written by hand from these tables.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _fid(f: dict | None) -> list[str]:
    if f is None:
        return ["", "", ""]
    return [f"{f['top1_agreement']:.1%}", f"{f['mean_kl']:.4f}", f"{f['max_kl']:.2f}"]


def headline(rows: list[dict]) -> str:
    s, c = rows[0]["stock"], rows[0]["config"]
    out = [f"prompt {c['prompt_tokens']} + {c['max_tokens']} generated, budgets {c['prefill_budget']}/"
           f"{c['decode_budget']}; stock: {s['n_ctx']} cells, {s['kv_bytes'] / MIB:.1f} MiB, prefill "
           f"{s['prefill_tokens_per_s']:.0f} tok/s, decode {s['decode_tokens_per_s']:.1f} tok/s; "
           f"1-min load at start {rows[0]['machine']['loadavg_1m']:.2f}", ""]
    body = []
    for r in rows:
        o, q, i = r["ours"], r["ratios"], r["ideal"]
        body.append([r["config"]["strategy"], f"{o['kv_cells_allocated']:,}", f"{o['kv_cells_peak']:,}",
                     f"{o['kv_bytes_allocated'] / MIB:.1f}", f"{q['kv_bytes']:.1%}",
                     f"{o['prefill_tokens_per_s']:.0f}", f"{o['decode_tokens_per_s']:.1f}", f"{q['decode_speedup']:.2f}x",
                     f"{i['decode_tokens_per_s']:.1f}", *_fid(r["fidelity"])])
    out.append(_table(["strategy", "cells allocated", "cells peak", "KV MiB", "KV / stock", "prefill tok/s",
                       "decode tok/s", "decode / stock", "ideal decode tok/s", "top-1", "mean KL", "max KL"], body))
    return "\n".join(out)


def _run_name(config: dict) -> str:
    """strategy, or strategy/lend for runs made with a lend rule (older JSON has none: the paper), and
    @scoring for runs scored from key sketches or with flash attention on (bench/fidelity.py --scoring)."""
    lend = config.get("lend")
    name = config["strategy"] if lend is None or config["strategy"] in ("streaming", "h2o") else \
        f"{config['strategy']}/{lend}"
    if config.get("sketch_rank") or config.get("flash_attn"):
        rank, scores = config.get("sketch_rank", 0), config.get("sketch_scores", "attention")
        kind = config.get("sketch_basis") if scores == "attention" else scores
        name += f"@{kind}{rank}" if rank else "@exact"
        name += "+fa" if config.get("flash_attn") else ""
    return name


def fidelity(d: dict) -> str:
    out = [f"prompt {d['prompt_tokens']} + {d['max_tokens']} generated (teacher-forced top-1 / mean KL; "
           f"free-running identical prefix / ROUGE-L)", ""]
    strategies = list(dict.fromkeys(_run_name(r["config"]) for r in d.get("sweep", [])))
    budgets = list(dict.fromkeys((r["config"]["prefill_budget"], r["config"]["decode_budget"])
                                 for r in d.get("sweep", [])))
    body = []
    for p, dec in budgets:
        rows = {_run_name(r["config"]): r for r in d["sweep"]
                if (r["config"]["prefill_budget"], r["config"]["decode_budget"]) == (p, dec)}
        ratio = next(iter(rows.values()))["memory_ratio"]
        cells = [f"{rows[s]['fidelity']['top1_agreement']:.1%} / {rows[s]['fidelity']['mean_kl']:.2f} "
                 f"({rows[s]['fidelity']['identical_prefix']} / {rows[s]['fidelity']['rouge_l']:.2f})" for s in strategies]
        body.append([f"{p}:{dec}", f"{ratio:.0%}", *cells])
    if body:
        out.append(_table(["budget", "memory", *strategies], body))
    if d.get("aggregation"):
        out += ["", aggregation(d)]
    return "\n".join(out)


def fidelity_prompts(d: dict) -> str:
    """A sweep over several prompts (bench/fidelity.py --seeds): each run's
    top-1 averaged over the prompts, with its spread."""
    means = d["sweep_means"]
    runs = list(dict.fromkeys(f"{m['strategy']}@{m['scoring']}" for m in means))
    budgets = list(dict.fromkeys(m["budget"] for m in means))
    cell = {(m["budget"], f"{m['strategy']}@{m['scoring']}"):
            f"{m['top1_agreement']:.1%} ({m['top1_min']:.1%}..{m['top1_max']:.1%})" for m in means}
    return (f"prompt {d['prompt_tokens']} + {d['max_tokens']}, teacher-forced top-1, mean over "
            f"{means[0]['prompts']} prompts (min..max)\n\n"
            + _table(["budget", *runs], [[b, *[cell.get((b, r), "") for r in runs]] for b in budgets]))


def capture_layers(d: dict) -> str:
    prompts = d["means"][0]["prompts"]
    return (f"slide, prompt {d['prompt_tokens']} + {d['max_tokens']}, teacher-forced, mean of {prompts} prompts\n\n"
            + _table(["budget", "captured layers", "count", "top-1", "mean KL"],
                     [[m["budget"], m["layers"], str(m["captured"]), f"{m['top1_agreement']:.1%}",
                       f"{m['mean_kl']:.3f}"] for m in d["means"]]))


def aggregation(d: dict) -> str:
    body = [[r["variant"]["name"], *_fid(r)] for r in d["aggregation"]]
    p, dec = d["aggregation_budget"]
    return (f"aggregation, slide {p}:{dec}, prompt {d['prompt_tokens']} + {d['max_tokens']}\n\n"
            + _table(["variant", "top-1", "mean KL", "max KL"], body))


def tasks(d: dict) -> str:
    strategies = list(d["budgets"][0]["results"]) if d["budgets"] else []
    body = [[f"{b['prefill']}:{b['decode']}", f"{(b['prefill'] + b['decode']) / (sum(d['prompt_tokens']) / len(d['prompt_tokens']) + d['max_tokens']):.0%}",
             *[f"{b['results'][s]['accuracy']:.1%}" for s in strategies]] for b in d["budgets"]]
    return (f"{d['items']} items, {d['seeds']} prompts of {min(d['prompt_tokens'])}-{max(d['prompt_tokens'])} tokens, "
            f"{d['max_tokens']} generated; full cache {d['full']['accuracy']:.1%}\n\n"
            + _table(["budget", "memory", *strategies], body))


def memory(d: dict) -> str:
    body = [[str(r["prompt_tokens"]), f"{r['gen']:,}", f"{r['stock']['kv_bytes'] / MIB:.1f}",
             f"{r['ours']['kv_bytes'] / MIB:.1f}", f"{r['kv_ratio']:.0%}", f"{r['stock']['peak_rss_bytes'] / MIB:.0f}",
             f"{r['ours']['peak_rss_bytes'] / MIB:.0f}", f"{r['rss_ratio']:.0%}"] for r in d["rows"]]
    return _table(["prompt", "generated", "stock KV MiB", "ours KV MiB", "KV ratio", "stock peak RSS MiB",
                   "ours peak RSS MiB", "RSS ratio"], body)


def speed(d: dict) -> str:
    body = [[f"{r['context']:,}", f"{r['stock']['decode_tokens_per_s']:.1f}", f"{r['ours']['decode_tokens_per_s']:.1f}",
             f"{r['ideal']['decode_tokens_per_s']:.1f}",
             f"{r['ours']['decode_tokens_per_s'] / r['stock']['decode_tokens_per_s']:.2f}x"] for r in d["rows"]]
    out = [_table(["context", "stock tok/s", "ours tok/s", "ideal tok/s", "ours / stock"], body)]
    hooks = d.get("hook_overhead", {}).get("results", {})
    if hooks:
        out.append("\n" + _table(["cached", "stock tok/s", "bare", "hook", "capture", "hook / stock", "capture / stock",
                                  "all runs (stock; hook; capture)"],
                                 [[f"{int(n):,}", *[f"{h['decode_tokens_per_s'][m]:.1f}" for m in ("stock", "bare", "hook", "capture")],
                                   f"{h['hook_vs_stock']:.3f}", f"{h['capture_vs_stock']:.3f}",
                                   "; ".join(" ".join(f"{x:.1f}" for x in h["all"][m]) for m in ("stock", "hook", "capture"))]
                                  for n, h in hooks.items()]))
    return "\n".join(out)


def beyond(d: dict) -> str:
    out = []
    if "targets" in d:
        t = d["targets"]
        out.append(f"prompt {t['prompt_tokens']} + {t['max_tokens']}: stock f16 {t['stock']['kv_bytes'] / MIB:.1f} MiB, "
                   f"decode {t['stock']['decode_tokens_per_s']:.1f} tok/s\n")
        out.append(_table(["K type", "cells", "KV MiB", "KV / stock f16", "decode tok/s", "decode / stock",
                           "ideal tok/s", "decode / ideal"],
                          [[r["type_k"], f"{r['ours']['kv_cells_allocated']:,}", f"{r['ours']['kv_bytes_allocated'] / MIB:.1f}",
                            f"{r['kv_bytes_vs_stock_f16']:.1%}", f"{r['ours']['decode_tokens_per_s']:.1f}",
                            f"{r['decode_vs_stock']:.2f}x", f"{r['ideal']['decode_tokens_per_s']:.1f}",
                            f"{r['decode_vs_ideal']:.2f}"] for r in t["ours"]]))
    if "chunking" in d:
        c = d["chunking"]
        out.append(f"\nchunked vs one-shot, prompt {c['prompt_tokens']} + {c['max_tokens']}\n")
        out.append(_table(["selector", "prefill", "cells", "top-1", "mean KL", "max KL"],
                          [[r["selector"], "chunked" if r["chunked"] else "one-shot", f"{r['kv_cells_allocated']:,}",
                            *_fid(r)] for r in c["rows"]]))
    return "\n".join(out)


def device(d: dict) -> str:
    out = []
    h = d.get("headline")
    if h:
        out.append(f"every layer on the RPC device, prompt {h['prompt']} + {h['tokens']}, budgets "
                   f"{h['budget'][0]}/{h['budget'][1]}; stock on the device: {h['stock']['kv_cells']:,} cells, "
                   f"{h['stock']['decode_tokens_per_s']:.1f} tok/s\n")
        out.append(_table(["run", "cells", "decode tok/s", "vs stock", "captured steps", "reads / step",
                           "MB / captured step"],
                          [[name, f"{r['kv_cells']:,}", f"{r['decode_tokens_per_s']:.1f}", f"{r['vs_stock']:.2f}x",
                            f"{r['captured_steps']:,}", f"{r['reads_per_step']:.1f}",
                            f"{r['bytes_per_captured_step'] / 1e6:.2f}" if r["captured_steps"] else "-"]
                           for name, r in ((n, h[n]) for n in ("full", "slide", "slide_every_layer") if n in h)]))
    def ratio(r: dict) -> str:
        spread = f" ({r['vs_stock_min']:.2f}..{r['vs_stock_max']:.2f})" if r.get("repeats", 1) > 1 else ""
        return (f"{r['decode_tokens_per_s']:.1f} / {r['stock_same_cells_tokens_per_s']:.1f} = "
                f"{r['vs_stock']:.2f}x{spread}")
    rows = [[s, *[ratio(d[w][s]) for w in ("steady_cpu", "steady_device")], f"{d['steady_cpu'][s]['kv_cells']:,}"]
            for s in d["steady_cpu"]]
    repeats = next(iter(d["steady_cpu"].values())).get("repeats", 1)
    out.append("\nsteady state (decode cache full), ours / stock at the same cells"
               + (f": medians of {repeats} interleaved rounds (spread of the ratios)\n" if repeats > 1 else "\n"))
    out.append(_table(["strategy", "CPU tok/s", "RPC device tok/s", "cells"], rows))
    return "\n".join(out)


def flash(d: dict) -> str:
    out = []
    for where in ("cpu", "device"):
        if where in d:
            runs = d[where]["runs"]
            out += [f"{where}: decode tok/s, last steps", "",
                    _table(list(runs), [[f"{r['decode_tokens_per_s']:.1f}" for r in runs.values()]]), "",
                    _table(["ratio", ""], [[k, f"{v:.2f}x"] for k, v in d[where]["ratios"].items()]), ""]
    if d.get("memory"):
        out.append(_table(["4096 + 4096, K and V q8_0", "rank", "cells", "KV / stock f16", "with sketches"],
                          [[f"{r['prefill_budget']}:{r['decode_budget']}", str(r["rank"]), f"{r['cells']:,}",
                            f"{r['kv_ratio']:.1%}", f"{r['total_ratio']:.1%}"] for r in d["memory"]]))
    return "\n".join(out)


def long_run(d: dict) -> str:
    w, s = d["windows"], d["summary"]
    return (f"{d['strategy']}, budgets {d['budget']['prefill']}/{d['budget']['decode']}, {w[-1]['tokens']:,} tokens "
            f"in windows of {d['window']:,}: first window {w[0]['tokens_per_s']:.1f} tok/s, last "
            f"{w[-1]['tokens_per_s']:.1f} (x{s['tokens_per_s_last_over_first']:.2f}), slowest "
            f"{min(x['tokens_per_s'] for x in w):.1f}, fastest {max(x['tokens_per_s'] for x in w):.1f}; RSS "
            f"{w[0]['rss_bytes'] / MIB:.1f} -> {w[-1]['rss_bytes'] / MIB:.1f} MiB; at most {s['max_cells_held']} cells held")


REPORTS: dict[str, Callable] = {
    "headline.json": headline, "headline_2048.json": headline, "fidelity.json": fidelity,
    "fidelity_lend.json": fidelity, "fidelity_long.json": fidelity, "aggregation_512.json": fidelity, "aggregation_1024.json": fidelity,
    "tasks.json": tasks, "memory.json": memory, "speed.json": speed, "beyond.json": beyond,
    "device.json": device, "long_run.json": long_run, "fidelity_sketch.json": fidelity,
    "fidelity_sketch_random.json": fidelity, "fidelity_sketch_rank.json": fidelity, "flash.json": flash,
    "capture_layers.json": capture_layers, "fidelity_sketch_prompts.json": fidelity_prompts, "fidelity_sketch_rank_prompts.json": fidelity_prompts,
    "fidelity_sketch_rank24_prompts.json": fidelity_prompts,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    for name, fn in REPORTS.items():
        src = Path(args.results) / name
        if src.exists():
            print(f"### {name}\n\n{fn(json.loads(src.read_text()))}\n")


if __name__ == "__main__":
    main()
