"""One configuration (or several sharing a prompt) against stock, in one run:
stock timed in the protocol's plain loop (scope_edge.protocol.stock_greedy, at
ours' threads), ours, the ideal (stock at our allocated cells, filled to the
level ours holds), then the untimed fidelity lockstep. One round each: the
interleaved rounds of the protocol are bench/headline.py's; this is the
quick look `scope-edge bench` gives."""
from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Sequence

from .. import rpc
from ..llama import ScopeLlama
from ..protocol import Cache, Threads, ideal, ours_greedy, stock_greedy
from ..runtime.config import EngineConfig
from .config import BenchConfig
from .lockstep import free_running, lockstep, stock_reference
from .prompts import eog_tokens, logbook_prompt
from .results import machine, peak_rss_bytes

log = logging.getLogger(__name__)


def open_ours(cfg: BenchConfig, path: str, *, full: bool = False) -> ScopeLlama:
    """Ours under cfg, or (full) the full cache as stock runs it: K type and devices only."""
    if full:
        engine = EngineConfig(model_path=path, type_k=cfg.engine.type_k, devices=cfg.engine.devices)
        return ScopeLlama(config=engine, budget=None)
    return ScopeLlama(config=dataclasses.replace(cfg.engine, model_path=path), policy=cfg.policy())


def run_ours(cfg: BenchConfig, path: str, prompt: list[int]) -> tuple[dict, list[int]]:
    """Our generation of max_tokens (EOG masked): its stats (with
    steady_cells, the cells held in steady state) and its tokens."""
    with open_ours(cfg, path) as llm:
        res = ours_greedy(llm, prompt, cfg.max_tokens)
    return res, res.pop("tokens")


def _check_shared(cfgs: Sequence[BenchConfig]) -> None:
    keys = {(c.prompt_tokens, c.prompt_seed, c.max_tokens, c.engine.type_k, c.engine.model_path, c.engine.devices,
             c.engine.n_threads) for c in cfgs}
    if len(keys) != 1:
        raise ValueError(f"run_many needs one prompt_tokens/prompt_seed/max_tokens/type_k/model/devices/threads for "
                         f"all configs, got {sorted(map(str, keys))}")


def stock_cache(cfgs: Sequence[BenchConfig]) -> Cache:
    """Stock at ours' K and V types and kernel when every config shares them;
    else at their shared K type, V f16, flash attention off (stock's defaults)."""
    kinds = {(c.engine.type_v, c.engine.flash_attn) for c in cfgs}
    e = cfgs[0].engine
    if len(kinds) == 1:
        return Cache(type_k=e.type_k, type_v=e.type_v, flash_attn=e.flash_attn)
    return Cache(type_k=e.type_k)


def run_many(cfgs: Sequence[BenchConfig], *, progress: bool = True) -> list[dict]:
    """run_bench for configs that differ only in strategy/budgets/scoring:
    the stock run and the full-cache reference are measured once and shared;
    all compressed caches are teacher-forced in one lockstep pass."""
    if not cfgs:
        raise ValueError("run_many needs at least one BenchConfig")
    _check_shared(cfgs)
    c0 = cfgs[0]
    path = c0.model_path()
    prompt = logbook_prompt(path, c0.prompt_tokens, c0.prompt_seed)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    devices = c0.engine.devices
    for endpoint in devices.rpc_servers:  # stock offloads to llama.cpp's registered devices
        rpc.register(endpoint)
    eog, cache = eog_tokens(path), stock_cache(cfgs)
    threads = Threads(decode=c0.engine.threads()[0], batch=c0.engine.threads()[1])
    stock = stock_greedy(path, prompt, c0.max_tokens, eog=eog, cache=cache, threads=threads,
                         n_gpu_layers=devices.n_gpu_layers)
    log.info("stock: prefill %.0f tok/s, decode %.1f tok/s", stock["prefill_tokens_per_s"], stock["decode_tokens_per_s"])
    ours = [run_ours(cfg, path, prompt) for cfg in cfgs]
    ideals: dict[int, dict] = {}
    for cfg, (stats, _) in zip(cfgs, ours):
        cells = int(stats["kv_cells"])
        if cells not in ideals:
            ideals[cells] = ideal(path, prompt + stock["tokens"], cells=cells, level=stats["steady_cells"],
                                  steps=cfg.ideal_steps, eog=eog, cache=cache, threads=threads,
                                  n_gpu_layers=devices.n_gpu_layers)
    fids = fidelity(cfgs, path, prompt, stock["tokens"], [tokens for _, tokens in ours], progress=progress)
    stock.pop("tokens")
    return [_report(cfg, stock, stats, ideals[int(stats["kv_cells"])], fid, started)
            for cfg, (stats, _), fid in zip(cfgs, ours, fids)]


def fidelity(cfgs: Sequence[BenchConfig], path: str, prompt: list[int], stock_tokens: list[int],
             ours_tokens: Sequence[list[int]], *, progress: bool) -> list[dict | None]:
    """The untimed lockstep of every config that asks for fidelity, against
    stock's kept logits (a second, untimed stock run: stock_reference) or
    ScopeLlama(budget=None) teacher-forced alongside; free-running scores
    against stock's greedy tokens."""
    want = [i for i, c in enumerate(cfgs) if c.fidelity]
    fids: list[dict | None] = [None] * len(cfgs)
    if not want:
        return fids
    c0 = cfgs[0]
    full = reference = None
    if c0.reference == "stock":
        reference = stock_reference(path, prompt, c0.max_tokens, c0.engine.type_k,
                                    n_threads=c0.engine.threads()[0], n_gpu_layers=c0.engine.devices.n_gpu_layers)
        stock_tokens = reference.tokens
    else:
        full = open_ours(c0, path, full=True)
    comps = [open_ours(cfgs[i], path) for i in want]
    steps = reference.logits if reference is not None else full.teacher_force(prompt, stock_tokens)
    try:
        res, consistency = lockstep(steps, comps, prompt, stock_tokens, eog_tokens(path), progress=progress)
    finally:
        for llm in [*comps, *([full] if full else [])]:
            llm.close()
    for i, fid in zip(want, res):
        fids[i] = {**fid.as_dict(), "reference_consistency": consistency,
                   **free_running(stock_tokens, ours_tokens[i])}
    return fids


def _report(cfg: BenchConfig, stock: dict, stats: dict, ideal_run: dict, fid: dict | None, started: str) -> dict:
    return {
        "config": cfg.as_dict(),
        "stock": stock,
        "ours": stats,
        "ideal": ideal_run,
        "ratios": {
            "kv_bytes": stats["kv_bytes"] / stock["kv_bytes"],
            "decode_speedup": stats["decode_tokens_per_s"] / max(stock["decode_tokens_per_s"], 1e-9),
            "prefill_speedup": stats["prefill_tokens_per_s"] / max(stock["prefill_tokens_per_s"], 1e-9),
            "decode_vs_ideal": stats["decode_tokens_per_s"] / max(ideal_run["decode_tokens_per_s"], 1e-9),
        },
        "fidelity": fid,
        "date": started,
        "machine": machine(),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def run_bench(cfg: BenchConfig, *, progress: bool = True) -> dict:
    """Stock, ours, ideal and fidelity for one configuration: a JSON-able dict."""
    return run_many([cfg], progress=progress)[0]
