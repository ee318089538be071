"""The speed protocol of every speed benchmark (issue #29), written once.

- Stock and ours in the same run, at equal threads (stock also at
  llama-cpp-python's default threads, labelled, when that differs), at equal
  K and V types and flash attention.
- Stock is timed in one plain greedy loop, StockSteps (stock_greedy runs it
  for a number of steps): llama_decode one token a step, EOG masked, only the
  last row's logits computed, nothing kept. The fidelity lockstep's reference
  (scope_edge.bench.lockstep.stock_reference) keeps every step's logits and is
  never timed.
- Ours generates with ignore-EOS (EOG masked); every table also has ours with
  no budget (the same runtime, budget=None) and the ideal: stock decoding in a
  context of our allocated cells filled to the level ours holds in steady
  state (the mean of the cells ours held over the second half of its decode).
- At least one round (3 by default) of every column, interleaved: round r
  runs the columns rotated left by r, so none always runs first; each figure
  is the median of its rounds with min..max, each ratio the median of its
  per-round ratios (columns of one round ran minutes apart).
- The machine's 1-minute load is read before the first round and after the last.
Fidelity is never timed in these loops (bench/headline.py --fidelity runs a
separate pass). The columns a script runs and the tables it prints are built
in one place too: scope_edge.bench.columns.
"""
from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np

from . import memory
from .checks import is_int
from .runtime.context import KV_TYPES

log = logging.getLogger(__name__)

# The cells ours holds are sampled every this many generated tokens (cheap:
# one read of the hook's positions), over the second half of its decode.
HELD_EVERY = 32


@dataclass(frozen=True, kw_only=True)
class Threads:
    """(decode, batch) threads of a column; None: llama-cpp-python's default
    (half the CPUs for one token, all of them for a batch)."""

    decode: int | None = None
    batch: int | None = None

    def resolved(self) -> tuple[int, int]:
        cpus = os.cpu_count() or 1
        return self.decode or max(cpus // 2, 1), self.batch or cpus

    def label(self) -> str:
        d, b = self.resolved()
        return f"{d} thread{'s' if d > 1 else ''}" + (f" ({b} for a batch)" if b != d else "")


LIBRARY_DEFAULT = Threads()


@dataclass(frozen=True, kw_only=True)
class Cache:
    """KV types and attention kernel: what equal KV settings means.
    swa_full: a sliding-window model's window cache as big as the full one
    (llama.cpp's default) or only the window plus a ubatch (no effect on
    other models)."""

    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = False
    swa_full: bool = True


# -- arithmetic --------------------------------------------------------------
def spread(values: Sequence[float]) -> dict[str, Any]:
    """median and min..max of one figure's rounds (and the rounds themselves)."""
    if not values:
        raise ValueError("spread needs at least one value")
    vals = [float(v) for v in values]
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "rounds": vals}


def schedule(labels: Sequence[str], rounds: int) -> list[list[str]]:
    """The order of every round: round r runs labels rotated left by r."""
    if not is_int(rounds) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    if len(set(labels)) != len(labels) or not labels:
        raise ValueError(f"column labels must be distinct and at least one, got {list(labels)}")
    n = len(labels)
    return [[labels[(r + i) % n] for i in range(n)] for r in range(rounds)]


def ratio(runs: Mapping[str, Sequence[dict]], num: str, den: str, key: str = "decode_tokens_per_s") -> dict:
    """Column num over column den, round by round, as a spread."""
    if len(runs[num]) != len(runs[den]):
        raise ValueError(f"{num} ran {len(runs[num])} rounds and {den} {len(runs[den])}: not paired")
    return spread([a[key] / b[key] for a, b in zip(runs[num], runs[den])])


def load_1m() -> float:
    return os.getloadavg()[0]


def run_rounds(columns: Mapping[str, Callable[[], dict]], rounds: int) -> dict[str, Any]:
    """Every column once per round in schedule()'s order; the load read
    before and after. Returns {"order", "load_1m", "runs": {label: [dict per round]}}."""
    order = schedule(list(columns), rounds)
    before = load_1m()
    runs: dict[str, list[dict]] = {label: [] for label in columns}
    for r, labels in enumerate(order):
        for label in labels:
            t0 = time.perf_counter()
            res = columns[label]()
            runs[label].append({**res, "round": r})
            log.info("round %d, %s: decode %.1f tok/s (%.0f s)", r, label, res["decode_tokens_per_s"],
                     time.perf_counter() - t0)
    return {"order": order, "load_1m": {"before": before, "after": load_1m()}, "runs": runs}


def summary(runs: Sequence[dict], keys: Sequence[str] = ("decode_tokens_per_s", "prefill_tokens_per_s")) -> dict:
    """Each timed key of one column's rounds as a spread (keys a run lacks are skipped)."""
    return {k: spread([r[k] for r in runs]) for k in keys if all(k in r for r in runs)}


# -- stock -------------------------------------------------------------------
def logits_row(ctx: Any, n_vocab: int, index: int = -1) -> np.ndarray:
    """llama.cpp's logits of output row `index` (-1: the last), a view valid until the next decode."""
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index), shape=(n_vocab,))


def greedy_masked(logits: np.ndarray, eog: np.ndarray) -> int:
    """argmax with the EOG tokens masked (in place: llama.cpp overwrites the row next decode)."""
    logits[eog] = -np.inf
    return int(np.argmax(logits))


def decode_tokens(ctx: Any, tokens: Sequence[int]) -> None:
    """One llama_decode of `tokens` (logits of the last only), as a user's loop calls it."""
    arr = (llama_cpp.llama_token * len(tokens))(*tokens)
    rc = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(tokens)))
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc}")


def stock_llama(path: str, n_ctx: int, *, cache: Cache = Cache(), threads: Threads = LIBRARY_DEFAULT,
                n_gpu_layers: int = 0) -> llama_cpp.Llama:
    """A stock llama_cpp.Llama of n_ctx cells at the given KV types, kernel and threads."""
    return llama_cpp.Llama(path, n_ctx=n_ctx, type_k=KV_TYPES[cache.type_k], type_v=KV_TYPES[cache.type_v],
                           flash_attn=cache.flash_attn, swa_full=cache.swa_full, n_gpu_layers=n_gpu_layers,
                           n_threads=threads.decode, n_threads_batch=threads.batch, verbose=False)


def prefill(llm: llama_cpp.Llama, prompt: Sequence[int]) -> None:
    """The prompt in n_batch-token llama_decode calls (what Llama.eval does, without its bookkeeping)."""
    for i in range(0, len(prompt), llm.n_batch):
        decode_tokens(llm.ctx, prompt[i:i + llm.n_batch])


class StockSteps:
    """The one stock decode loop of every speed script: a stock Llama of
    n_ctx cells; the first next() prefills `prompt` and returns the greedy
    token after it, each later next() feeds the previous token with one
    llama_decode and returns the next (greedy, EOG masked, only the last
    row's logits computed, nothing kept). One next() is one step with what
    stock pays for it in Python, so scripts that interleave stock with ours
    step by step (bench/iswa.py, bench/device.py) time the same loop as
    stock_greedy. A context manager; close() frees the context."""

    def __init__(self, path: str, prompt: Sequence[int], *, n_ctx: int, eog: np.ndarray, cache: Cache = Cache(),
                 threads: Threads = LIBRARY_DEFAULT, n_gpu_layers: int = 0) -> None:
        if not prompt:
            raise ValueError("stock needs a prompt of at least one token")
        if len(prompt) >= n_ctx:
            raise ValueError(f"a prompt of {len(prompt)} tokens leaves no cell to decode in {n_ctx}")
        self._llm = stock_llama(path, n_ctx, cache=cache, threads=threads, n_gpu_layers=n_gpu_layers)
        self._prompt: Sequence[int] | None = prompt
        self._eog, self._n_vocab, self._token = eog, self._llm.n_vocab(), -1
        self.cells = self._llm.n_ctx()

    def __iter__(self) -> StockSteps:
        return self

    def __next__(self) -> int:
        if self._prompt is not None:
            prefill(self._llm, self._prompt)
            self._prompt = None
        else:
            decode_tokens(self._llm.ctx, [self._token])
        self._token = greedy_masked(logits_row(self._llm.ctx, self._n_vocab), self._eog)
        return self._token

    def close(self) -> None:
        self._llm.close()

    def __enter__(self) -> StockSteps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stock_greedy(path: str, prompt: Sequence[int], steps: int, *, eog: np.ndarray, n_ctx: int | None = None,
                 cache: Cache = Cache(), threads: Threads = LIBRARY_DEFAULT, n_gpu_layers: int = 0,
                 timed: int | None = None) -> dict:
    """StockSteps of n_ctx (None: prompt + steps) cells run for `steps`
    greedy tokens: prefill timed apart, decode tok/s over the last `timed`
    steps that feed a token (None: all steps - 1, as ours counts)."""
    n_ctx = n_ctx or len(prompt) + steps
    if len(prompt) + steps > n_ctx:
        raise ValueError(f"prompt {len(prompt)} + {steps} steps do not fit {n_ctx} cells")
    timed = steps - 1 if timed is None else timed
    if not is_int(timed) or not 0 <= timed <= steps - 1:
        raise ValueError(f"timed must be an int in [0, {steps - 1}] (steps - 1), got {timed!r}")
    with StockSteps(path, prompt, n_ctx=n_ctx, eog=eog, cache=cache, threads=threads,
                    n_gpu_layers=n_gpu_layers) as run:
        t0 = time.perf_counter()
        tokens = [next(run)]
        prefill_s = time.perf_counter() - t0
        tokens += [next(run) for _ in range(steps - 1 - timed)]
        t0 = time.perf_counter()
        tokens += [next(run) for _ in range(timed)]
        decode_s = time.perf_counter() - t0
        cells = run.cells
    kv = memory.kv_bytes(memory.read_geometry(path), cells, cache.type_k, cache.type_v)
    return {"n_ctx": cells, "kv_bytes": kv, "threads": list(threads.resolved()), "timed_steps": timed,
            "prefill_tokens_per_s": len(prompt) / max(prefill_s, 1e-9),
            "decode_tokens_per_s": timed / max(decode_s, 1e-9) if timed else 0.0, "tokens": tokens}


def ideal_fill(cells: int, level: float, steps: int) -> tuple[int, int]:
    """(prefilled tokens, timed steps) so that `steps` decodes in `cells`
    cells average `level` filled cells: start at level - steps/2. A level
    within steps/2 of the cells (a budget held full) times the last `steps`
    cells instead, averaging a little under the level: the ideal then runs a
    little fast, never in ours' favour. (It used to cut the steps to what
    was left above the level: 2 timed steps for a full cache.)"""
    if not 1 <= level <= cells:
        raise ValueError(f"level must be in [1, {cells}] cells, got {level}")
    steps = max(1, min(steps, cells - 1))
    fill = max(1, min(round(level - steps / 2), cells - steps))
    return fill, steps


def ideal(path: str, filler: Sequence[int], *, cells: int, level: float, steps: int, eog: np.ndarray,
          cache: Cache = Cache(), threads: Threads = LIBRARY_DEFAULT, n_gpu_layers: int = 0) -> dict:
    """Stock decoding in `cells` cells at an average fill of `level`: the
    speed our allocation allows at the fill ours holds."""
    fill, steps = ideal_fill(cells, level, steps)
    filler = list(filler)
    while len(filler) < fill:
        filler += filler
    run = stock_greedy(path, filler[:fill], steps, eog=eog, n_ctx=cells, cache=cache, threads=threads,
                       n_gpu_layers=n_gpu_layers)
    run.pop("tokens")
    return {**run, "level": level, "prefilled": fill, "steps": steps}


def batched_stock(path: str, prompts: Sequence[Sequence[int]], steps: int, *, cells: int, eog: np.ndarray,
                  cache: Cache = Cache(), threads: Threads = LIBRARY_DEFAULT) -> dict:
    """Plain llama.cpp decoding len(prompts) sequences together: one context,
    n_seq_max = len(prompts), kv_unified = false (a stream of `cells` cells a
    sequence), each prompt prefilled into its sequence, then `steps` steps of
    one llama_decode carrying the next token of every sequence (greedy, EOG
    masked). Aggregate tok/s counts the steps after the first; tokens: each
    sequence's greedy tokens."""
    n = len(prompts)
    if any(len(p) + steps > cells for p in prompts):
        raise ValueError(f"prompts of {[len(p) for p in prompts]} tokens + {steps} steps exceed {cells} cells")
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(path.encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    p = llama_cpp.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max, p.kv_unified = cells * n, 512, 512, n, False
    p.n_threads, p.n_threads_batch = threads.resolved()
    p.type_k, p.type_v = KV_TYPES[cache.type_k], KV_TYPES[cache.type_v]
    p.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if cache.flash_attn
                         else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    ctx = llama_cpp.llama_init_from_model(model, p)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    try:
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {n} x {cells} cells")

        def decode(items: Sequence[tuple[int, int, int, bool]]) -> None:
            for i, (tok, pos, seq, want) in enumerate(items):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, want
                batch.seq_id[i][0] = seq
            batch.n_tokens = len(items)
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")

        t0 = time.perf_counter()
        last = []
        for seq, prompt in enumerate(prompts):
            for i in range(0, len(prompt), 512):
                piece = prompt[i:i + 512]
                decode([(t, i + j, seq, i + j == len(prompt) - 1) for j, t in enumerate(piece)])
            last.append(greedy_masked(logits_row(ctx, n_vocab), eog))
        prefill_s = time.perf_counter() - t0
        pos = [len(pr) for pr in prompts]
        tokens = [[t] for t in last]
        t0 = time.perf_counter()
        for step in range(steps - 1):
            decode([(last[s], pos[s] + step, s, True) for s in range(n)])
            last = [greedy_masked(logits_row(ctx, n_vocab, s), eog) for s in range(n)]
            for s, t in enumerate(last):
                tokens[s].append(t)
        decode_s = time.perf_counter() - t0
    finally:
        llama_cpp.llama_batch_free(batch)
        if ctx:
            llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    kv = memory.kv_bytes(memory.read_geometry(path), cells * n, cache.type_k, cache.type_v)
    return {"sequences": n, "cells_per_sequence": cells, "kv_bytes": kv, "threads": list(threads.resolved()),
            "steps": steps, "prefilled": [len(pr) for pr in prompts],
            "prefill_tokens_per_s": sum(pos) / max(prefill_s, 1e-9),
            "decode_tokens_per_s": n * (steps - 1) / max(decode_s, 1e-9), "tokens": tokens}


# -- ours --------------------------------------------------------------------
def steady_level(samples: Sequence[tuple[int, int]], generated: int) -> float:
    """Mean cells held over the second half of the decode: samples are
    (generated index, cells held) pairs."""
    late = [held for i, held in samples if i >= generated // 2]
    if not late:
        raise ValueError(f"no sample of the held cells in the second half of {generated} generated tokens")
    return float(np.mean(late))


def ours_greedy(llm: Any, prompt: Sequence[int], steps: int, *, timed: int | None = None) -> dict:
    """llm (a ScopeLlama) generates `steps` tokens after prompt, EOG masked
    (ignore-EOS); its stats, tokens, and the steady-state level of its cells.
    timed: decode tok/s over the last `timed` steps only (the wall clock
    between the arrival of token steps - timed and of the last), as
    stock_greedy(timed=) counts them; None: the run's stats."""
    if timed is not None and (not is_int(timed) or not 1 <= timed <= steps - 1):
        raise ValueError(f"timed must be an int in [1, {steps - 1}] (steps - 1) or None, got {timed!r}")
    tokens: list[int] = []
    samples: list[tuple[int, int]] = []
    stats = None
    start = end = 0.0
    for chunk in llm.stream(list(prompt), max_tokens=steps, ignore_eos=True):
        if chunk.token is not None:
            tokens.append(chunk.token)
            if timed is not None and len(tokens) in (steps - timed, steps):
                start, end = (time.perf_counter(), 0.0) if len(tokens) == steps - timed else (start, time.perf_counter())
            if len(tokens) % HELD_EVERY == 0 and len(tokens) >= steps // 2:
                samples.append((len(tokens), len(llm.kv_positions())))
        stats = chunk.stats
    if stats is None:
        raise RuntimeError("the generation produced no chunk")
    s = stats.as_dict()
    if timed is not None:
        s.update(decode_tokens_per_s=timed / max(end - start, 1e-9), timed_steps=timed)
    return {**s, "kv_bytes": s["kv_bytes_allocated"], "kv_cells": s["kv_cells_allocated"], "tokens": tokens,
            "steady_cells": steady_level(samples, steps) if samples else float(s["kv_cells_peak"])}
