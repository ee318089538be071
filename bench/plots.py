"""PNG plots from the JSON in bench/results/ (written next to it).

    python bench/plots.py [--results bench/results]

memory.png    KV MiB and peak RSS vs total tokens, stock vs ours
speed.png     decode tok/s vs context length: stock, ours, ideal
fidelity.png  top-1 agreement and mean KL vs memory ratio, every strategy
fidelity_long.png  the same for a long output (bench/fidelity.py --out fidelity_long.json)
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

try:  # the bench extra (pip install 'scope-edge[bench]'); --help works without it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    plt = None

log = logging.getLogger("bench.plots")
RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20


def plot_memory(res: dict, out: Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for p in sorted({r["prompt_tokens"] for r in res["rows"]}):
        rows = sorted((r for r in res["rows"] if r["prompt_tokens"] == p), key=lambda r: r["gen"])
        x = [p + r["gen"] for r in rows]
        for kind, style in (("stock", "o-"), ("ours", "s--")):
            ax1.plot(x, [r[kind]["kv_bytes"] / MIB for r in rows], style, label=f"{kind}, prompt {p}")
            ax2.plot(x, [r[kind]["peak_rss_bytes"] / MIB for r in rows], style, label=f"{kind}, prompt {p}")
    b = res["budget"]
    ax1.set(xlabel="prompt + generated tokens", ylabel="KV cache MiB", title=f"KV allocated (budgets {b['prefill']}/{b['decode']})")
    ax2.set(xlabel="prompt + generated tokens", ylabel="peak RSS MiB", title="peak process RSS")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_speed(res: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["context"] for r in res["rows"]]
    if "protocol" in res:  # under scope_edge.protocol: every column, median with min..max
        for label, style in zip(res["rows"][0]["columns"], ("o-", "x:", "d-", "s-", "^--")):
            spreads = [r["columns"][label]["summary"]["decode_tokens_per_s"] for r in res["rows"]]
            med = [s["median"] for s in spreads]
            ax.errorbar(x, med, yerr=[[m - s["min"] for m, s in zip(med, spreads)],
                                      [s["max"] - m for m, s in zip(med, spreads)]], fmt=style, label=label,
                        capsize=3)
    else:
        for kind, style in (("stock", "o-"), ("ours", "s-"), ("ideal", "^--")):
            ax.plot(x, [r[kind]["decode_tokens_per_s"] for r in res["rows"]], style, label=kind)
    b = res["budget"]
    ax.set(xlabel="context length (tokens)", ylabel="decode tok/s",
           title=f"decode speed vs context (slide {b['prefill']}/{b['decode']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_fidelity(res: dict, out: Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for s in dict.fromkeys(r["config"]["strategy"] for r in res["sweep"]):
        rows = sorted((r for r in res["sweep"] if r["config"]["strategy"] == s), key=lambda r: r["ratios"]["kv_bytes"])
        x = [r["ratios"]["kv_bytes"] for r in rows]  # bytes llama.cpp allocated, over stock's
        ax1.plot(x, [r["fidelity"]["top1_agreement"] for r in rows], "o-", label=s)
        ax2.plot(x, [r["fidelity"]["mean_kl"] for r in rows], "o-", label=s)
    title = f"prompt {res['prompt_tokens']} + {res['max_tokens']} generated"
    ax1.set(xlabel="KV bytes allocated / stock's", ylabel="top-1 agreement with full cache", title=title)
    ax2.set(xlabel="KV bytes allocated / stock's", ylabel="mean KL(full || compressed)", title=title)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    if plt is None:
        raise SystemExit("plots.py needs matplotlib: pip install 'scope-edge[bench]'")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    d = Path(args.results)
    for name, fn in (("memory", plot_memory), ("speed", plot_speed), ("fidelity", plot_fidelity),
                     ("fidelity_long", plot_fidelity)):
        src = d / f"{name}.json"
        if not src.exists():
            log.warning("no %s: skipping %s.png", src, name)
            continue
        fn(json.loads(src.read_text()), d / f"{name}.png")
        log.info("wrote %s", d / f"{name}.png")


if __name__ == "__main__":
    main()
