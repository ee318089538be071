"""The command-line flags of every command that builds an engine
(`generate`, `chat`, `serve`, `bench`), declared once.

    add_engine_args(parser)   --model, --threads, cache types, flash attention,
                              sketches, capture layers, chunking, position
                              limit, and the devices (--n-gpu-layers, --rpc, ...)
    engine_config(args)       the EngineConfig they name
    add_policy_args(parser)   budgets, --kv-memory, windows, --strategy,
                              --selector, --lend (each command fills its own
                              defaults for what is left out)

A setting added to EngineConfig is added here once and reaches every command.
"""
from __future__ import annotations

import argparse

from . import memory
from .budget import Budget
from .devices import Devices
from .policies import LEND_RULES, PREFILL_SELECTORS, STRATEGIES
from .runtime.config import EngineConfig
from .runtime.context import KV_TYPES
from .runtime.sketch import BASES, SCORES, Sketch

CHUNKED = {"auto": None, "on": True, "off": False}


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The EngineConfig flags (engine_config() reads them back)."""
    d = EngineConfig()
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="GGUF path (default: SmolLM2-135M-Instruct Q4_1, fetched once)")
    g.add_argument("--threads", type=int, default=None,
                   help="decode threads (default: llama-cpp-python's, half the CPUs; all of them for a batch)")
    g.add_argument("--type-k", default=d.type_k, choices=sorted(KV_TYPES), help="K cache type")
    g.add_argument("--type-v", default=d.type_v, choices=sorted(KV_TYPES),
                   help="V cache type (quantized needs --flash-attn)")
    g.add_argument("--flash-attn", action="store_true",
                   help="llama.cpp's fused attention; a policy that reads scores then needs --sketch-rank")
    g.add_argument("--sketch-rank", type=int, default=0,
                   help="score cells from key sketches of this rank instead of exact attention (0: exact)")
    g.add_argument("--sketch-basis", default="qk", choices=BASES, help="sketch basis")
    g.add_argument("--sketch-scores", default="attention", choices=SCORES, help="what sketches score")
    g.add_argument("--capture-layers", type=_ints, default=None, metavar="I,J,...",
                   help="layers whose attention scores cells (default: every layer on the CPU, every 4th from "
                        "layer 2 when offloaded)")
    g.add_argument("--prefill-chunk", type=int, default=d.prefill_chunk,
                   help="prompt tokens prefilled between prefill selections (bounds the cells prefill needs; "
                        "default 256, or half the decode room of a --kv-memory or default budget, at most 256)")
    g.add_argument("--chunked-prefill", default="auto", choices=list(CHUNKED),
                   help="prefill long prompts in chunks: auto (when longer than the kept prompt + a chunk), on, off")
    g.add_argument("--position-limit", type=int, default=None,
                   help="re-index positions before they reach this (default: the model's trained context)")
    dv = p.add_argument_group("devices")
    dv.add_argument("--n-gpu-layers", type=int, default=Devices().n_gpu_layers,
                    help="layers to offload to GPUs / RPC servers (-1: every layer and the output layer)")
    dv.add_argument("--main-gpu", type=int, default=Devices().main_gpu, help="device index of the main GPU")
    dv.add_argument("--tensor-split", type=_floats, default=None, metavar="F,F,...",
                    help="share of the offloaded layers per device (default: by free memory)")
    dv.add_argument("--rpc", action="append", default=None, metavar="HOST:PORT",
                    help="llama.cpp RPC server whose device takes offloaded layers (repeatable)")


def scoring(args: argparse.Namespace) -> Sketch | None:
    if args.sketch_rank == 0:
        return None
    return Sketch(rank=args.sketch_rank, basis=args.sketch_basis, scores=args.sketch_scores)


def engine_config(args: argparse.Namespace, *, model_path: str | None = None) -> EngineConfig:
    """The EngineConfig of add_engine_args' flags (model_path: a resolved --model)."""
    devices = Devices(n_gpu_layers=args.n_gpu_layers, main_gpu=args.main_gpu, tensor_split=args.tensor_split or (),
                      rpc_servers=tuple(args.rpc or ()))
    return EngineConfig(model_path=model_path or args.model, devices=devices, n_threads=args.threads,
                        type_k=args.type_k, type_v=args.type_v, flash_attn=args.flash_attn, scoring=scoring(args),
                        capture_layers=args.capture_layers, prefill_chunk=args.prefill_chunk,
                        chunked_prefill=CHUNKED[args.chunked_prefill], position_limit=args.position_limit)


def add_policy_args(p: argparse.ArgumentParser, *, full_cache: bool = True, defaults: str = "") -> None:
    """The policy flags, all defaulting to None (not given); defaults: what
    the command uses for left-out budgets, for the help."""
    g = p.add_argument_group("policy")
    g.add_argument("--prefill-budget", type=int, default=None, help=f"prompt cells kept{defaults}")
    g.add_argument("--decode-budget", type=int, default=None, help="generated-token cells kept")
    g.add_argument("--kv-memory", default=None, metavar="SIZE",
                   help="size the budgets by KV memory for this model and cache types, e.g. 512MiB, 1.5GiB "
                        "(instead of --prefill-budget/--decode-budget; docs/budgets.md)")
    if full_cache:
        g.add_argument("--full-cache", action="store_true",
                       help="no budget: the stock llama.cpp cache, nothing evicted (budget=None)")
    g.add_argument("--observation-window", type=int, default=None,
                   help="last prompt tokens always kept (alpha2; default min(32, prefill budget))")
    g.add_argument("--recent-window", type=int, default=None,
                   help="last generated tokens always kept (beta2; default min(256, decode budget / 2))")
    g.add_argument("--strategy", default=None, choices=STRATEGIES, help="decode strategy (default: slide)")
    g.add_argument("--selector", default=None, choices=PREFILL_SELECTORS,
                   help="prefill selector (default: snapkv, or a baseline's own)")
    g.add_argument("--lend", default=None, choices=LEND_RULES,
                   help="which prompt cells borrowing the decode room go back first "
                        "(none: the paper, the decode room stays empty until the output fills it)")


def sized_budget_of(args: argparse.Namespace, engine: EngineConfig, *, prefill: int,
                    decode: int) -> tuple[Budget | None, EngineConfig]:
    """The budget of --kv-memory (EngineConfig.budget_for_memory, for the
    engine's model and cache types) or else of the budget flags (budget_of,
    with the command's defaults), and the engine configuration it runs with."""
    if args.kv_memory is None:
        return budget_of(args, prefill=prefill, decode=decode), engine
    if args.prefill_budget is not None or args.decode_budget is not None:
        raise ValueError("give either --kv-memory or --prefill-budget/--decode-budget, not both")
    _refuse_windows(args, "--kv-memory")
    return engine.budget_for_memory(args.kv_memory, memory.read_geometry(engine.path()))


def _refuse_windows(args: argparse.Namespace, budget: str) -> None:
    """The windows shape a budget the flags give; a sized budget has its own, no budget none."""
    given = [flag for flag, value in (("--observation-window", args.observation_window),
                                      ("--recent-window", args.recent_window)) if value is not None]
    if given:
        raise ValueError(f"{' and '.join(given)} set the windows of a budget given by --prefill-budget and "
                         f"--decode-budget, and would be dropped with {budget}: give both budgets, or drop "
                         f"{' and '.join(given)}")


def budget_of(args: argparse.Namespace, *, prefill: int | None = None, decode: int | None = None) -> Budget | None:
    """The Budget of --prefill-budget / --decode-budget and the windows
    (prefill / decode: the command's defaults for left-out budgets; None:
    both must be given or neither, which gives None)."""
    pb = args.prefill_budget if args.prefill_budget is not None else prefill
    db = args.decode_budget if args.decode_budget is not None else decode
    if pb is None and db is None:
        _refuse_windows(args, "--kv-memory, --full-cache or the default budget")
        return None
    if pb is None or db is None:
        raise ValueError("give both --prefill-budget and --decode-budget, or neither (the default budget)")
    return Budget(prefill=pb, decode=db, observation_window=args.observation_window,
                  recent_window=args.recent_window)
