"""The scope-edge command: generate, chat, serve, bench, models, rpc-server."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

log = logging.getLogger("scope_edge")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and cache")
    g.add_argument("--model", default=None, help="GGUF path (default: SmolLM2-135M-Instruct Q4_1, fetched once)")
    g.add_argument("--prefill-budget", type=int, default=None,
                   help="prompt cells kept (omit both budgets and --kv-memory for the model's default budget)")
    g.add_argument("--decode-budget", type=int, default=None, help="generated-token cells kept")
    _add_kv_memory_arg(g.add_argument)
    g.add_argument("--full-cache", action="store_true",
                   help="no budget: the stock llama.cpp cache, nothing evicted (budget=None)")
    g.add_argument("--observation-window", type=int, default=None,
                   help="last prompt tokens always kept (alpha2; default min(32, prefill budget))")
    g.add_argument("--recent-window", type=int, default=None,
                   help="last generated tokens always kept (beta2; default min(256, decode budget / 2))")
    g.add_argument("--strategy", default=None,
                   help="slide|adaptive|discontinuous|streaming|h2o|full (default: the package's default strategy)")
    g.add_argument("--selector", default=None, help="prefill selector: snapkv|h2o|streaming|full")
    g.add_argument("--lend", default=None,
                   help="which prompt cells borrowing the decode room go back first: accumulated|recent|passed, "
                        "or none (the paper: the decode room stays empty until the output fills it)")
    _add_cache_type_args(g.add_argument)
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--n-ctx", type=int, default=None, help="fixed cell count (default: sized per generation)")
    d = p.add_argument_group("devices")
    d.add_argument("--n-gpu-layers", type=int, default=0,
                   help="layers to offload to GPUs / RPC servers (-1: every layer and the output layer)")
    d.add_argument("--rpc", action="append", default=None, metavar="HOST:PORT",
                   help="llama.cpp RPC server whose device takes offloaded layers (repeatable)")


def _add_kv_memory_arg(add_argument: Callable[..., argparse.Action]) -> None:
    add_argument("--kv-memory", default=None, metavar="SIZE",
                 help="size the budgets by KV memory for this model and cache types, e.g. 512MiB, 1.5GiB "
                      "(instead of --prefill-budget/--decode-budget; docs/budgets.md)")


def _add_cache_type_args(add_argument: Callable[..., argparse.Action]) -> None:
    """The cache-type and scoring flags, added with a parser's or group's add_argument."""
    add_argument("--type-k", default="f16", help="K cache type: f16|q8_0|q4_0")
    add_argument("--type-v", default="f16", help="V cache type: f16|q8_0|q4_0 (quantized needs --flash-attn)")
    add_argument("--flash-attn", action="store_true",
                 help="llama.cpp's fused attention; a policy that reads scores then needs --sketch-rank")
    add_argument("--sketch-rank", type=int, default=0,
                 help="score cells from key sketches of this rank instead of exact attention (0: exact)")
    add_argument("--sketch-basis", default="qk", help="sketch basis: qk|pca|random")
    add_argument("--sketch-scores", default="attention", help="sketch scores: attention|keydiff|knorm")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    from .runtime.sampling import RANDOM_SEED, Sampling

    cli = Sampling.llama_cli()  # llama.cpp's command-line defaults, so the first run reads well
    g = p.add_argument_group("sampling (llama.cpp's CLI defaults; --temperature 0 is greedy)")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=cli.temperature)
    g.add_argument("--top-k", type=int, default=cli.top_k, help="0 disables it")
    g.add_argument("--top-p", type=float, default=cli.top_p, help="1 disables it")
    g.add_argument("--min-p", type=float, default=cli.min_p, help="0 disables it")
    g.add_argument("--repeat-penalty", type=float, default=cli.repeat_penalty, help="1 disables it")
    g.add_argument("--repeat-last-n", type=int, default=cli.repeat_last_n)
    g.add_argument("--presence-penalty", type=float, default=cli.presence_penalty)
    g.add_argument("--frequency-penalty", type=float, default=cli.frequency_penalty)
    g.add_argument("--seed", type=int, default=RANDOM_SEED, help=f"default {RANDOM_SEED}: random")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling(args: argparse.Namespace):
    from .runtime.sampling import Sampling

    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                    repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
                    presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty, seed=args.seed)


def _budget_args(args: argparse.Namespace) -> dict:
    """ScopeLlama's budget= / kv_memory= from the flags (neither: the model's default budget)."""
    given = [name for name, on in (("--prefill-budget/--decode-budget", _budget(args) is not None),
                                   ("--kv-memory", args.kv_memory is not None), ("--full-cache", args.full_cache))
             if on]
    if len(given) > 1:
        raise ValueError(f"give one of {' '.join(given)}, not several")
    if args.full_cache:
        return {"budget": None}
    if args.kv_memory is not None:
        return {"kv_memory": args.kv_memory}
    budget = _budget(args)
    return {} if budget is None else {"budget": budget}


def _budget(args: argparse.Namespace):
    from .budget import Budget

    if args.prefill_budget is None and args.decode_budget is None:
        return None
    if args.prefill_budget is None or args.decode_budget is None:
        raise ValueError("give both --prefill-budget and --decode-budget, or neither (the default budget)")
    return Budget(
        prefill=args.prefill_budget,
        decode=args.decode_budget,
        observation_window=args.observation_window,
        recent_window=args.recent_window,
    )


def _open(args: argparse.Namespace):
    from .llama import ScopeLlama

    return ScopeLlama(
        args.model,
        **_budget_args(args),
        **({} if args.strategy is None else {"strategy": args.strategy}),
        prefill_selector=args.selector,
        **({} if args.lend is None else {"lend": args.lend}),
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        type_k=args.type_k,
        type_v=args.type_v,
        flash_attn=args.flash_attn,
        scoring=_scoring(args),
        n_gpu_layers=args.n_gpu_layers,
        rpc_servers=args.rpc,
        verbose=args.verbose,
    )


def _scoring(args: argparse.Namespace):
    from .runtime.sketch import Sketch

    if args.sketch_rank == 0:
        return None
    return Sketch(rank=args.sketch_rank, basis=args.sketch_basis, scores=args.sketch_scores)


def _summary(stats) -> str:
    return (
        f"[{stats.prompt_tokens} prompt + {stats.generated_tokens} generated tokens | "
        f"KV {stats.kv_bytes_allocated / 2**20:.1f} MiB ({stats.kv_cells_allocated} cells, peak "
        f"{stats.kv_cells_peak}) vs stock {stats.stock_kv_bytes / 2**20:.1f} MiB | {_evictions(stats)} | "
        f"prefill {stats.prefill_tokens_per_s:.0f} tok/s, decode {stats.decode_tokens_per_s:.1f} tok/s]"
    )


def _evictions(stats) -> str:
    if not stats.evicted_cells:
        return "nothing evicted"
    return (f"evicted {stats.evicted_cells} cells ({stats.evicted_prefill_cells} prefill, "
            f"{stats.evicted_decode_cells} decode)")


def cmd_generate(args: argparse.Namespace) -> int:
    with _open(args) as llm:
        prompt = args.prompt
        if args.chat:
            prompt = llm.render_chat([{"role": "user", "content": args.prompt}])
        last = None
        for last in llm.stream(prompt, max_tokens=args.max_tokens, stop=args.stop, sampling=_sampling(args)):
            sys.stdout.write(last.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if last is not None and last.stats is not None:
            print(f"{_summary(last.stats)} finish={last.finish_reason}", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive chat; each turn prefills only the new message."""
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    sampling = _sampling(args)
    with _open(args) as llm:
        while True:
            if interactive:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line or line.strip() in ("/exit", "/quit"):
                return 0
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line.rstrip("\n")})
            reply, last = [], None
            for last in llm.chat(messages, max_tokens=args.max_tokens, stop=args.stop, sampling=sampling):
                reply.append(last.text)
                sys.stdout.write(last.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
            messages.append({"role": "assistant", "content": "".join(reply)})
            if last is not None and last.stats is not None:
                st = last.stats
                print(f"[turn: {st.prefilled_tokens} new prompt tokens, {st.reused_prompt_tokens} reused from "
                      f"the cache | KV {st.kv_bytes_allocated / 2**20:.1f} MiB | {_evictions(st)}]",
                      file=sys.stderr)


def cmd_models(args: argparse.Namespace) -> int:
    from . import models

    if args.action == "fetch":
        print(models.fetch(args.name))
        return 0
    for spec, path in models.list_models():
        print(f"{spec.name}\t{spec.size} B\t{path if path else '(not fetched)'}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The OpenAI-compatible server (scope_edge.server); needs the [server] extra."""
    try:
        from . import server
    except ImportError as e:
        raise RuntimeError(f"serve needs FastAPI and uvicorn ({e}); install them with: "
                           "pip install 'scope-edge[server]'") from None
    from . import memory, models
    from .budget import Budget

    path = str(models.resolve_model_path(args.model))
    if args.kv_memory is not None:
        if args.prefill_budget is not None or args.decode_budget is not None:
            raise ValueError("give either --kv-memory or --prefill-budget/--decode-budget, not both")
        budget = Budget.for_memory(args.kv_memory, memory.read_geometry(path), type_k=args.type_k, type_v=args.type_v)
    else:
        budget = Budget(prefill=1024 if args.prefill_budget is None else args.prefill_budget,
                        decode=512 if args.decode_budget is None else args.decode_budget,
                        observation_window=args.observation_window, recent_window=args.recent_window)
    settings = server.ServerSettings(
        model_path=path, model_name=args.model_name or server.model_name_of(path), budget=budget,
        **({} if args.strategy is None else {"strategy": args.strategy}), slots=args.slots,
        slot_cells=args.slot_cells, step_tokens=args.step_tokens,
        max_tokens=args.max_tokens, queue_size=args.queue_size, n_threads=args.threads, type_k=args.type_k,
        type_v=args.type_v, flash_attn=args.flash_attn, scoring=_scoring(args),
        api_key=args.api_key or None, host=args.host, port=args.port)
    logging.getLogger("scope_edge").setLevel(logging.INFO if args.verbose else logging.WARNING)
    server.serve(settings)
    return 0


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and cache")
    g.add_argument("--model", default=None, help="GGUF path (default: SmolLM2-135M-Instruct Q4_1, fetched once)")
    g.add_argument("--model-name", default=None, help="the id clients ask for (default: the file name without .gguf)")
    g.add_argument("--prefill-budget", type=int, default=None, help="prompt cells kept per conversation (default 1024)")
    g.add_argument("--decode-budget", type=int, default=None, help="generated-token cells kept (default 512)")
    g.add_argument("--kv-memory", default=None, metavar="SIZE",
                   help="size each conversation's budgets by KV memory for this model and cache types, e.g. 64MiB "
                        "(instead of --prefill-budget/--decode-budget; docs/budgets.md)")
    g.add_argument("--observation-window", type=int, default=None)
    g.add_argument("--recent-window", type=int, default=None)
    g.add_argument("--strategy", default=None,
                   help="slide|adaptive|discontinuous|streaming|h2o|full (default: the package's default strategy)")
    _add_cache_type_args(g.add_argument)
    g.add_argument("--threads", type=int, default=None)
    s = p.add_argument_group("serving")
    s.add_argument("--slots", type=int, default=4, help="conversations decoded together (default 4)")
    s.add_argument("--slot-cells", type=int, default=None,
                   help="KV cells per slot, a multiple of 256 (default: what the default budget needs)")
    s.add_argument("--step-tokens", type=int, default=None,
                   help="prompt tokens a new request adds per step (default 512 // slots)")
    s.add_argument("--max-tokens", type=int, default=512, help="when a request gives no max_tokens")
    s.add_argument("--queue-size", type=int, default=16, help="requests that may wait for a slot; more get 429")
    s.add_argument("--host", default="127.0.0.1", help="where to listen (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("SCOPE_EDGE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $SCOPE_EDGE_API_KEY, else none)")


def cmd_rpc_server(args: argparse.Namespace) -> int:
    from . import rpc

    logging.getLogger("scope_edge").setLevel(logging.INFO)
    rpc.serve(args.endpoint, n_threads=args.threads)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="scope-edge",
        description="Run GGUF models through llama.cpp with the KV cache inside SCOPE's prefill and decode budgets.",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log and debug logging")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream a completion of PROMPT to stdout")
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="send PROMPT as a user message through the model's chat template")
    _add_model_args(g)
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive multi-turn chat on stdin/stdout (/exit to quit)")
    c.add_argument("--system", default=None, help="system message")
    _add_model_args(c)
    _add_sampling_args(c)
    c.set_defaults(func=cmd_chat)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server; conversations decoded together, each "
                        "inside its budgets (needs the [server] extra)")
    _add_serve_args(sv)
    sv.set_defaults(func=cmd_serve)

    try:
        from . import bench
    except ImportError as e:  # bench needs nothing extra to import; keep the CLI usable regardless
        log.debug("bench unavailable: %s", e)
    else:
        bench.add_parser(sub)

    r = sub.add_parser("rpc-server", help="serve this machine's CPU as a llama.cpp RPC device (blocks)")
    r.add_argument("endpoint", metavar="HOST:PORT", help="where to listen; 127.0.0.1 unless the network is trusted")
    r.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    r.set_defaults(func=cmd_rpc_server)

    m = sub.add_parser("models", help="list or fetch the registry's models")
    m.add_argument("action", choices=["list", "fetch"])
    m.add_argument("name", nargs="?", default=None, help="model name (default: the default model)")
    m.set_defaults(func=cmd_models)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"scope-edge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
