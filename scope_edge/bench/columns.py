"""A speed script's columns under the protocol (scope_edge.protocol), built in
one place, and the tables every speed script prints.

Columns: builds the callables run_rounds runs, in their round-0 order: stock
at ours' threads (and, labelled, at llama-cpp-python's default threads when
those differ), ours (with no budget, and under budgets), and after each
budgeted ours its ideal (stock in a context of ours' allocated cells filled to
the level ours held in steady state, at the same K and V types and kernel).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np

from ..protocol import LIBRARY_DEFAULT, Cache, Threads, ideal, ours_greedy, ratio, stock_greedy, summary
from ..runtime.config import EngineConfig

STOCK, STOCK_DEFAULT, NONE = "stock", "stock, library default threads", "ours, no budget"


def stock_threads(n_threads: int | None) -> dict[str, Threads]:
    """Stock's columns by label: at ours' threads (n_threads for a token and
    a batch, as EngineConfig gives ours; None: the library default) and, when
    that differs, at llama-cpp-python's default threads, labelled."""
    decode, batch = EngineConfig(n_threads=n_threads).threads()
    equal = Threads(decode=decode, batch=batch)
    cols = {STOCK: equal}
    if LIBRARY_DEFAULT.resolved() != equal.resolved():
        cols[STOCK_DEFAULT] = LIBRARY_DEFAULT
    return cols


def column(label: str, runs: list[dict]) -> dict:
    """One column of a speed table: its KV, cells, threads, the spread of its
    timed keys over the rounds, and the rounds themselves."""
    first = runs[0]
    cells = first.get("kv_cells", first.get("n_ctx"))
    extra = {k: first[k] for k in ("steady_cells", "kv_cells_peak", "evicted_cells", "level", "prefilled", "steps")
             if k in first}
    decode, batch = first["threads"]
    return {"kv_bytes": first["kv_bytes"], "cells": cells, "threads": Threads(decode=decode, batch=batch).label(),
            **extra, "summary": summary(runs), "runs": runs}


def fmt(s: dict, digits: int) -> str:
    """A spread as median (min..max)."""
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}..{s['max']:.{digits}f})"


def columns_table(columns: Mapping[str, dict], stock: str = STOCK) -> list[str]:
    """Markdown rows: a column a row (KV, KV / stock's, cells, decode and
    prefill median (min..max)), the columns as column() made them."""
    base = columns[stock]["kv_bytes"]
    out = ["| column | threads | KV MiB | KV / stock | cells | decode tok/s | prefill tok/s |",
           "|---|---|---|---|---|---|---|"]
    for label, col in columns.items():
        d, p = col["summary"]["decode_tokens_per_s"], col["summary"].get("prefill_tokens_per_s")
        prefill_tps = "" if p is None else f"{p['median']:.0f}"
        out.append(f"| {label} | {col['threads']} | {col['kv_bytes'] / 2**20:.1f} | {col['kv_bytes'] / base:.1%} | "
                   f"{col['cells']:,} | {fmt(d, 1)} | {prefill_tps} |")
    return out


def ratios_table(ratios: Mapping[str, dict]) -> list[str]:
    return ["| decode ratio | median (min..max) |", "|---|---|", *(f"| {k} | {fmt(r, 2)}x |" for k, r in ratios.items())]


def header(rounds: int, load: Mapping[str, float]) -> str:
    return (f"{rounds} interleaved rounds, median (min..max); 1-min load {load['before']:.2f} before, "
            f"{load['after']:.2f} after")


class Columns:
    """The columns of one protocol run over one prompt: every column generates
    `steps` tokens after `prompt` (EOG masked) and times the last `timed`
    (None: all but the first). kept (filled in): each column's tokens of its first round.
    n_threads: ours' threads (EngineConfig.n_threads), which stock gets too."""

    def __init__(self, path: str, prompt: Sequence[int], steps: int, *, eog: np.ndarray, n_threads: int | None,
                 timed: int | None = None, ideal_steps: int = 256, n_gpu_layers: int = 0,
                 kept: dict[str, list[int]] | None = None) -> None:
        self.path, self.prompt, self.steps, self.eog, self.timed = path, list(prompt), steps, eog, timed
        self.ideal_steps, self.n_gpu_layers = ideal_steps, n_gpu_layers
        self.threads = stock_threads(n_threads)
        self.equal = self.threads[STOCK]
        self.cols: dict[str, Callable[[], dict]] = {}
        self.kept = {} if kept is None else kept
        self._ours: dict[str, dict] = {}

    def _keep(self, label: str, res: dict) -> dict:
        self.kept.setdefault(label, res.pop("tokens", []))
        return res

    def stock(self, cache: Cache = Cache(), suffix: str = "", *, library_default: bool = True) -> None:
        """Stock at equal threads ("stock{suffix}") and, when it differs and
        library_default, at the library's default threads."""
        for label, threads in self.threads.items():
            if label != STOCK and not library_default:
                continue
            self.add(label + suffix, lambda t=threads, lab=label + suffix: self._keep(lab, stock_greedy(
                self.path, self.prompt, self.steps, eog=self.eog, cache=cache, threads=t, timed=self.timed,
                n_gpu_layers=self.n_gpu_layers)))

    def ours(self, label: str, open_llm: Callable[[], AbstractContextManager[Any]], *, ideal_cache: Cache | None = None,
             ideal_label: str | None = None) -> None:
        """Ours (open_llm: a ScopeLlama to generate with, closed after); with
        ideal_cache, its ideal right after it (label ideal_label, default
        "ideal, " + label without its "ours, ")."""
        def run() -> dict:
            with open_llm() as llm:
                return ours_greedy(llm, self.prompt, self.steps, timed=self.timed)
        self.custom(label, run, ideal_cache=ideal_cache, ideal_label=ideal_label)

    def custom(self, label: str, run: Callable[[], dict], *, ideal_cache: Cache | None = None,
               ideal_label: str | None = None) -> None:
        """A column of ours that runs its own loop: run() returns its result
        with kv_bytes, kv_cells and steady_cells (and tokens, kept); its
        threads are stock's equal ones. With ideal_cache, its ideal after it."""
        def wrapped() -> dict:
            res = self._keep(label, run())
            res["threads"] = list(self.equal.resolved())
            self._ours[label] = res
            return res
        self.add(label, wrapped)
        if ideal_cache is not None:
            self.add(ideal_label or "ideal, " + label.removeprefix("ours, "), lambda: self._ideal(label, ideal_cache))

    def _ideal(self, of: str, cache: Cache) -> dict:
        o = self._ours[of]
        filler = self.prompt + self.kept.get(STOCK, [])
        return ideal(self.path, filler, cells=o["kv_cells"], level=o["steady_cells"], steps=self.ideal_steps,
                     eog=self.eog, cache=cache, threads=self.equal, n_gpu_layers=self.n_gpu_layers)

    def add(self, label: str, run: Callable[[], dict]) -> None:
        """Any column: run() returns a dict with decode_tokens_per_s, kv_bytes and threads."""
        if label in self.cols:
            raise ValueError(f"two columns labelled {label!r}")
        self.cols[label] = run


def report(done: dict, ratios: Mapping[str, tuple[str, str]]) -> dict:
    """run_rounds' output as a result: the load, the order, every column
    summarised, and the named ratios (name: (numerator, denominator) labels)."""
    runs = done["runs"]
    return {"load_1m": done["load_1m"], "order": done["order"],
            "columns": {label: column(label, r) for label, r in runs.items()},
            "ratios": {name: ratio(runs, num, den) for name, (num, den) in ratios.items()}}


def standard_ratios(labels: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Every ours and stock's default-threads column over stock, each ours over its ideal."""
    out = {f"{lab} / {STOCK}": (lab, STOCK) for lab in labels
           if lab != STOCK and not lab.startswith("ideal") and (lab.startswith("ours") or lab == STOCK_DEFAULT)}
    for lab in labels:
        if lab.startswith("ideal, ") and f"ours, {lab.removeprefix('ideal, ')}" in labels:
            ours = f"ours, {lab.removeprefix('ideal, ')}"
            out[f"{ours} / {lab}"] = (ours, lab)
    return out
