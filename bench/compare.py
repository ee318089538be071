"""Does a re-run reproduce the stored results? Every speed ratio that a
re-run's result files and the stored ones both hold, the re-run's median
against the stored spread.

    python bench/compare.py RERUN_DIR [--stored bench/results] [--files headline.json ...] [--strict]

A re-run is `python bench/run_all.py` (or one script of it) writing into
another folder, e.g. `python bench/headline.py --out /tmp/rerun/headline.json`.
The ratios are the protocol's (a "ratios" table of median, min and max over
interleaved rounds, per file, per server conversation count or speed context)
and device.py's steady rows (vs_stock and its spread). Absolute tok/s differ
between hosts and are not compared (stock's is printed, to show how fast each
host was); ratios to stock also move with the host (how much of a step the
attention is), ours against its ideal much less.

A row's verdict: "within" when the re-run's median lies inside the stored
min..max; "overlaps" when only the two spreads overlap; "outside" otherwise.
--strict exits with 1 when any row is "outside".
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# a list of dicts is keyed by the first of these its items hold (else by position)
LIST_KEYS = ("conversations", "context", "cells")
SKIP = ("columns", "summary")  # absolute tok/s, per column and round
NOT_RATIOS = ("tokens_per_s", "bytes")  # spreads of absolute figures (server.json's per-run ones, RSS growth)


@dataclass(frozen=True)
class Row:
    file: str
    where: str  # the path inside the file, then the ratio's name
    stored: tuple[float, float, float]  # median, min, max
    rerun: tuple[float, float, float]

    @property
    def verdict(self) -> str:
        _, s_lo, s_hi = self.stored
        r_med, r_lo, r_hi = self.rerun
        if s_lo <= r_med <= s_hi:
            return "within"
        return "overlaps" if r_lo <= s_hi and s_lo <= r_hi else "outside"


def _spread(d: object) -> tuple[float, float, float] | None:
    """A spread as (median, min, max): the protocol's {median, min, max} or a
    steady row's vs_stock with its min and max."""
    if not isinstance(d, dict):
        return None
    if {"median", "min", "max"} <= d.keys():
        return float(d["median"]), float(d["min"]), float(d["max"])
    if {"vs_stock", "vs_stock_min", "vs_stock_max"} <= d.keys():
        return float(d["vs_stock"]), float(d["vs_stock_min"]), float(d["vs_stock_max"])
    return None


def ratios(node: object, where: str = "") -> Iterator[tuple[str, tuple[float, float, float]]]:
    """Every ratio in a result file: (where, (median, min, max)). Columns,
    their rounds and summaries hold absolute tok/s: skipped."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in SKIP or key.endswith(NOT_RATIOS):
                continue
            s = _spread(value)
            if s is not None:
                yield f"{where}{key}", s
            elif isinstance(value, (dict, list)):
                yield from ratios(value, where if key == "ratios" else f"{where}{key} > ")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            key = next((f"{k} {item[k]}" for k in LIST_KEYS if isinstance(item, dict) and k in item), str(i))
            yield from ratios(item, f"{where}{key} > ")


def compare(stored: dict, rerun: dict, file: str) -> list[Row]:
    """The rows both hold, in the stored file's order."""
    fresh = dict(ratios(rerun))
    return [Row(file, where, s, fresh[where]) for where, s in ratios(stored) if where in fresh]


def stock_speed(result: dict) -> float | None:
    """Stock's median decode tok/s (how fast the host was): the protocol's
    stock column at a file's top, or a server file's first run's stock in
    turn at equal threads."""
    stock = result.get("columns", {}).get("stock")
    if stock is not None:
        return stock["summary"]["decode_tokens_per_s"]["median"]
    runs = result.get("runs")
    if isinstance(runs, list) and runs and "stock in turn, equal threads" in runs[0]:
        return runs[0]["stock in turn, equal threads"]["decode_tokens_per_s"]["median"]
    return None


def table(rows: list[Row], hosts: dict[str, tuple[float, float]] | None = None) -> str:
    """The rows, then the counts; hosts: file -> stock's tok/s (stored, re-run)."""
    def f(s: tuple[float, float, float]) -> str:
        return f"{s[0]:.2f}x ({s[1]:.2f}..{s[2]:.2f})"
    out = ["| file | ratio | stored | re-run | verdict |", "|---|---|---|---|---|"]
    out += [f"| {r.file} | {r.where} | {f(r.stored)} | {f(r.rerun)} | {r.verdict} |" for r in rows]
    out += [f"\n{name}: stock decoded {a:.1f} tok/s in the stored run, {b:.1f} in the re-run"
            for name, (a, b) in (hosts or {}).items()]
    counts = {v: sum(r.verdict == v for r in rows) for v in ("within", "overlaps", "outside")}
    out.append("\n" + ", ".join(f"{n} {v}" for v, n in counts.items()) + f" of {len(rows)} ratios")
    return "\n".join(out)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rerun", type=Path, help="the folder a re-run wrote its result files into")
    ap.add_argument("--stored", type=Path, default=RESULTS)
    ap.add_argument("--files", nargs="+", default=None, help="only these file names (default: every .json in both)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a ratio falls outside the stored spread")
    return ap


def run(args: argparse.Namespace) -> tuple[list[Row], dict[str, tuple[float, float]]]:
    """The rows of every file both folders hold (or args.files), and stock's
    speed in each (file -> (stored, re-run) tok/s) where a file has it."""
    for folder in (args.rerun, args.stored):
        if not folder.is_dir():
            raise ValueError(f"{folder} is not a folder of result files")
    names = args.files or sorted(p.name for p in args.rerun.glob("*.json") if (args.stored / p.name).exists())
    rows: list[Row] = []
    hosts: dict[str, tuple[float, float]] = {}
    for name in names:
        paths = [args.stored / name, args.rerun / name]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise ValueError(f"no {name} in {', '.join(missing)}")
        stored, rerun = (json.loads(p.read_text()) for p in paths)
        rows += compare(stored, rerun, name)
        speeds = stock_speed(stored), stock_speed(rerun)
        if None not in speeds:
            hosts[name] = speeds
    return rows, hosts


def main() -> None:
    args = parser().parse_args()
    try:
        rows, hosts = run(args)
    except ValueError as e:
        sys.exit(f"compare.py: {e}")
    print(table(rows, hosts))
    sys.exit(1 if args.strict and any(r.verdict == "outside" for r in rows) else 0)


if __name__ == "__main__":
    main()
