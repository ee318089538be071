"""The scope-edge command: generate, chat, serve, bench, models, rpc-server."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import types
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import flags
from .budget import Budget

if TYPE_CHECKING:  # the server needs the [server] extra: imported when serve runs
    from .server import ServerSettings

log = logging.getLogger("scope_edge")

SERVE_BUDGET = Budget(prefill=1024, decode=512)  # a conversation's, when serve is given no budget


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
    budget = flags.budget_of(args)
    given = [name for name, on in (("--prefill-budget/--decode-budget", budget is not None),
                                   ("--kv-memory", args.kv_memory is not None), ("--full-cache", args.full_cache))
             if on]
    if len(given) > 1:
        raise ValueError(f"give one of {' '.join(given)}, not several")
    if args.full_cache:
        return {"budget": None}
    if args.kv_memory is not None:
        return {"kv_memory": args.kv_memory}
    return {} if budget is None else {"budget": budget}


def _open(args: argparse.Namespace):
    from .llama import ScopeLlama

    return ScopeLlama(
        config=flags.engine_config(args),
        **_budget_args(args),
        **({} if args.strategy is None else {"strategy": args.strategy}),
        prefill_selector=args.selector,
        **({} if args.lend is None else {"lend": args.lend}),
        n_ctx=args.n_ctx,
        verbose=args.verbose,
    )


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
    settings = serve_settings(args)
    logging.getLogger("scope_edge").setLevel(logging.INFO if args.verbose else logging.WARNING)
    _server().serve(settings)
    return 0


def _server() -> types.ModuleType:
    try:
        from . import server
    except ImportError as e:
        raise RuntimeError(f"serve needs FastAPI and uvicorn ({e}); install them with: "
                           "pip install 'scope-edge[server]'") from None
    return server


def serve_settings(args: argparse.Namespace) -> ServerSettings:
    """The server.ServerSettings `scope-edge serve` runs for these parsed
    arguments (build_parser); ValueError for flags that contradict."""
    server = _server()
    from . import models
    from .policies.registry import DEFAULT_KEEP_STRUCTURE

    path = str(models.resolve_model_path(args.model))
    engine = flags.engine_config(args, model_path=path)
    budget, engine = flags.sized_budget_of(args, engine, prefill=SERVE_BUDGET.prefill, decode=SERVE_BUDGET.decode)
    # the default budget (none given) keeps the chat's structure, as ScopeLlama's does
    chosen = args.kv_memory is not None or args.prefill_budget is not None or args.decode_budget is not None
    policy_names = {name: value for name, value in (("strategy", args.strategy), ("prefill_selector", args.selector),
                                                    ("lend", args.lend)) if value is not None}
    return server.ServerSettings(
        engine=engine, model_name=args.model_name or server.model_name_of(path),
        budget=budget, **policy_names, keep_structure=DEFAULT_KEEP_STRUCTURE and not chosen, slots=args.slots,
        slot_cells=args.slot_cells, step_tokens=args.step_tokens, max_tokens=args.max_tokens,
        queue_size=args.queue_size, api_key=args.api_key or None, host=args.host, port=args.port)


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    flags.add_engine_args(p)
    flags.add_policy_args(p, full_cache=False, defaults=f" per conversation (default {SERVE_BUDGET.prefill}; "
                                                        f"decode {SERVE_BUDGET.decode})")
    s = p.add_argument_group("serving")
    s.add_argument("--model-name", default=None, help="the id clients ask for (default: the file name without .gguf)")
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


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    flags.add_engine_args(p)
    flags.add_policy_args(p, defaults=" (omit both budgets and --kv-memory for the model's default budget)")
    p.add_argument("--n-ctx", type=int, default=None, help="fixed cell count (default: sized per generation)")


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
    _add_generate_args(g)
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive multi-turn chat on stdin/stdout (/exit to quit)")
    c.add_argument("--system", default=None, help="system message")
    _add_generate_args(c)
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
