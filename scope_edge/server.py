"""`scope-edge serve`: an OpenAI-compatible HTTP server whose conversations
share one llama.cpp context, decoded together, each inside its own budgets.

    POST /v1/chat/completions, POST /v1/completions (plain, or SSE with "stream": true)
    GET  /v1/models, GET /health

Request fields as OpenAI's (every field a current openai client sends is
used, accepted or refused with a 400 naming it: see COMMON_USED and
docs/clients.md), structured output (response_format, llama-server's
"grammar"), logprobs and tool calls (scope_edge.openai holds their shapes),
plus an optional "scope" object: {"prefill_budget", "decode_budget",
"strategy", "lend", "observation_window", "recent_window"}. Every response carries "usage" and
"scope_edge" (the cache stats of the generation and its slot), so eviction is
never silent. Errors have OpenAI's shape, {"error": {"message", "type",
"param", "code"}}, and a 4xx status.

A request runs on the free slot whose cache its prompt extends (a continued
conversation prefills only its new turn), else on the least recently used
one; with every slot busy it waits in a queue of queue_size, and is refused
with 429 beyond it. A client that disconnects frees its slot at the next step.
SIGTERM cancels running requests and exits cleanly.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .budget import Budget
from .openai_wire import Answer, ChatOptions, FieldError, Tools, chat_options
from .policies import Policy, build, validate_names
from .checks import is_int
from .policies.registry import DEFAULT_LEND, DEFAULT_STRATEGY
from .runtime.batch import BatchRunner, BatchSettings, Cancelled, Item, NoFreeSlot, Request as Run, slot_cells_for
from .runtime.generation import Chunk, Limits
from .runtime.config import EngineConfig
from .runtime.model import Model
from .runtime.sampling import RANDOM_SEED, Sampling, check_grammar

log = logging.getLogger("scope_edge")

SCOPE_KEYS = {"prefill_budget", "decode_budget", "strategy", "lend", "observation_window", "recent_window"}


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """Everything `scope-edge serve` is configured with: the engine's
    configuration (EngineConfig: model, devices, cache types, scoring, ...)
    and the serving fields.

    budget / strategy / prefill_selector / lend: the default policy, by
    name; a request's "scope" may change them (a scope naming another
    strategy runs that strategy's own selector). slots: conversations decoded together. slot_cells: KV cells
    per slot (None: what the default budget needs, slot_cells_for()).
    max_tokens: when a request gives none. queue_size: requests that may wait
    for a slot. api_key: required as "Authorization: Bearer <key>" on /v1
    when set."""

    engine: EngineConfig
    model_name: str
    budget: Budget
    strategy: str = DEFAULT_STRATEGY
    prefill_selector: str | None = None
    lend: str = DEFAULT_LEND
    slots: int = 4
    slot_cells: int | None = None
    step_tokens: int | None = None
    max_tokens: int = 512
    queue_size: int = 16
    api_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000

    def __post_init__(self) -> None:
        if not isinstance(self.engine, EngineConfig):
            raise ValueError(f"engine must be an EngineConfig, got {type(self.engine).__name__}")
        validate_names(self.strategy, self.prefill_selector)
        for name in ("max_tokens", "port"):
            if not is_int(getattr(self, name)) or getattr(self, name) < (0 if name == "port" else 1):
                raise ValueError(f"{name} must be an int >= {0 if name == 'port' else 1}, got {getattr(self, name)!r}")
        if not is_int(self.queue_size) or self.queue_size < 0:
            raise ValueError(f"queue_size must be an int >= 0, got {self.queue_size!r}")
        self.engine.check_policy(self.policy())

    def policy(self, budget: Budget | None = None, strategy: str | None = None, lend: str | None = None) -> Policy:
        """The default policy, or the one a request's scope names (its
        budget, strategy, lend; the server's for what it leaves out)."""
        strategy = strategy or self.strategy
        selector = self.prefill_selector if strategy == self.strategy else None
        return build(budget or self.budget, strategy=strategy, prefill_selector=selector, lend=lend or self.lend)

    def batch_settings(self) -> BatchSettings:
        cells = self.slot_cells or slot_cells_for(self.policy(), max_tokens=self.max_tokens,
                                                  prefill_chunk=self.engine.prefill_chunk)
        return BatchSettings(slots=self.slots, slot_cells=cells, step_tokens=self.step_tokens, engine=self.engine)


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Job:
    """One parsed request: the prompt, how to generate, how to answer.

    tools: what a chat reply may call (None: nothing). logprobs: report the
    chosen tokens' log-probabilities with this many alternatives (None: no).
    include_usage: stream_options.include_usage (None: not given)."""

    chat: bool
    prompt: list[int]
    policy: Policy
    limits: Limits
    sampling: Sampling
    stream: bool
    tools: Tools | None = None
    logprobs: int | None = None
    include_usage: bool | None = None


# -- parsing --------------------------------------------------------------------
# Every field of a current openai client's chat.completions.create and
# completions.create, and what is done with it. Used: read below. Accepted:
# informational (they identify the caller or an OpenAI-side cache, and change
# nothing here). Refused: answered 400 naming the field unless absent, null
# or the value given (what the field means cannot be done here). Anything
# else, but "scope" and the llama-server extensions, is an unknown field (400).
COMMON_USED = {"model", "stream", "stream_options", "n", "max_tokens", "temperature", "top_p", "seed", "stop",
               "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "scope"}
EXTENSIONS = {"top_k", "min_p", "repeat_penalty", "grammar"}  # llama-server's sampling fields
CHAT_USED = {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
             "parallel_tool_calls"}
CHAT_ACCEPTED = {"user", "metadata", "safety_identifier", "prompt_cache_key", "prompt_cache_retention"}
CHAT_REFUSED: dict[str, tuple[Any, ...]] = {
    "store": (False,), "service_tier": ("auto", "default"), "modalities": (["text"],), "audio": (),
    "prediction": (), "web_search_options": (), "functions": (), "function_call": (), "reasoning_effort": (),
    "verbosity": ()}
COMPLETION_USED = {"prompt"}
COMPLETION_ACCEPTED = {"user"}
COMPLETION_REFUSED: dict[str, tuple[Any, ...]] = {"best_of": (1,), "echo": (False,), "suffix": ("",)}
REFUSED_WHY = {
    "store": "nothing is stored here", "service_tier": "this server has one tier",
    "modalities": "this model reads and writes text only", "audio": "this model writes text only",
    "prediction": "predicted outputs are not supported", "web_search_options": "there is no web search here",
    "functions": "use 'tools' (functions is deprecated)", "function_call": "use 'tool_choice' (function_call is "
    "deprecated)", "reasoning_effort": "this model does not reason", "verbosity": "this model has no verbosity "
    "setting", "best_of": "only best_of = 1 is supported", "echo": "echo is not supported",
    "suffix": "suffix (insertion) is not supported"}


def _check_fields(body: Mapping[str, Any], *, chat: bool) -> None:
    used = COMMON_USED | EXTENSIONS | (CHAT_USED if chat else COMPLETION_USED)
    accepted = CHAT_ACCEPTED if chat else COMPLETION_ACCEPTED
    refused = CHAT_REFUSED if chat else COMPLETION_REFUSED
    for name, value in body.items():
        if name in used or name in accepted:
            continue
        if name in refused:
            if value is None or value in refused[name]:
                continue
            raise APIError(400, f"'{name}' = {value!r} is not supported: {REFUSED_WHY[name]}", param=name,
                           code="unsupported_field")
        raise APIError(400, f"unknown field '{name}'", param=name, code="unknown_field")


def _field(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and kind is not bool:
        raise APIError(400, f"'{name}' must be {getattr(kind, '__name__', kind)}, got {value!r}", param=name)
    if not isinstance(value, kind):
        raise APIError(400, f"'{name}' must be {getattr(kind, '__name__', kind)}, got {value!r}", param=name)
    return value


def _policy(body: Mapping[str, Any], settings: ServerSettings) -> Policy:
    scope = body.get("scope")
    if scope is None:
        return settings.policy()
    if not isinstance(scope, dict) or not set(scope) <= SCOPE_KEYS:
        raise APIError(400, f"'scope' must be an object with keys among {sorted(SCOPE_KEYS)}, got {scope!r}",
                       param="scope")
    b = settings.budget
    try:
        budget = Budget(prefill=scope.get("prefill_budget", b.prefill), decode=scope.get("decode_budget", b.decode),
                        observation_window=scope.get("observation_window"), recent_window=scope.get("recent_window"))
        policy = settings.policy(budget, scope.get("strategy"), scope.get("lend"))
        settings.engine.check_policy(policy)
    except ValueError as why:
        raise APIError(400, f"bad 'scope': {why}", param="scope", code="invalid_budget") from None
    return policy


def _logit_bias(body: Mapping[str, Any], n_vocab: int) -> tuple[tuple[int, float], ...]:
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    try:
        out = tuple((int(token), float(value)) for token, value in bias.items())
    except (AttributeError, TypeError, ValueError):
        out = None
    if out is None or any(not 0 <= t < n_vocab or not -100 <= v <= 100 for t, v in out):
        raise APIError(400, f"'logit_bias' must map token ids in [0, {n_vocab}) to numbers in [-100, 100], got {bias!r}",
                       param="logit_bias")
    return out


def _sampling(body: Mapping[str, Any], model: Model, *, grammar: str | None, logprobs: int | None) -> Sampling:
    cli = Sampling.llama_cli()
    if body.get("grammar") is not None:
        if grammar is not None:
            raise APIError(400, "give 'grammar' or response_format / tools, not both", param="grammar")
        grammar = _field(body, "grammar", str, None)
    try:
        return Sampling(temperature=float(_field(body, "temperature", (int, float), cli.temperature)),
                        top_k=_field(body, "top_k", int, cli.top_k),
                        top_p=float(_field(body, "top_p", (int, float), cli.top_p)),
                        min_p=float(_field(body, "min_p", (int, float), cli.min_p)),
                        repeat_penalty=float(_field(body, "repeat_penalty", (int, float), 1.0)),
                        seed=_field(body, "seed", int, RANDOM_SEED) % 2**32,
                        presence_penalty=float(_field(body, "presence_penalty", (int, float), 0.0)),
                        frequency_penalty=float(_field(body, "frequency_penalty", (int, float), 0.0)),
                        logit_bias=_logit_bias(body, model.n_vocab), grammar=grammar, logprobs=logprobs)
    except ValueError as why:
        raise APIError(400, str(why)) from None


def _limits(body: Mapping[str, Any], settings: ServerSettings) -> Limits:
    max_tokens = _field(body, "max_completion_tokens", int, None) or _field(body, "max_tokens", int, settings.max_tokens)
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else stop
    if stops is not None and (not isinstance(stops, list) or len(stops) > 4 or
                              any(not isinstance(s, str) or not s for s in stops)):
        raise APIError(400, f"'stop' must be a non-empty string or a list of up to 4 of them, got {stop!r}",
                       param="stop")
    try:
        return Limits(max_tokens=max_tokens, stop=tuple(stops or ()))
    except ValueError as why:
        raise APIError(400, str(why), param="max_tokens") from None


def _include_usage(body: Mapping[str, Any], stream: bool) -> bool | None:
    options = body.get("stream_options")
    if options is None:
        return None
    if not stream:
        raise APIError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
    if (not isinstance(options, dict) or not set(options) <= {"include_usage", "include_obfuscation"}
            or any(not isinstance(v, bool) for v in options.values())):
        raise APIError(400, "'stream_options' must be {\"include_usage\": bool, \"include_obfuscation\": bool}, "
                       f"got {options!r}", param="stream_options")
    return options.get("include_usage")


def _completion_logprobs(body: Mapping[str, Any]) -> int | None:
    n = body.get("logprobs")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 5):
        raise APIError(400, f"'logprobs' must be an int in [0, 5], got {n!r}", param="logprobs")
    return n


def _chat_options(body: Mapping[str, Any], model: Model) -> ChatOptions:
    if body.get("parallel_tool_calls") not in (None, True, False):
        raise APIError(400, f"'parallel_tool_calls' must be a boolean, got {body['parallel_tool_calls']!r}",
                       param="parallel_tool_calls")
    try:
        return chat_options(body.get("messages"), model=model, response_format=body.get("response_format"),
                            tools=body.get("tools"), tool_choice=body.get("tool_choice"),
                            logprobs=body.get("logprobs") or False, top_logprobs=body.get("top_logprobs"))
    except FieldError as why:
        raise APIError(400, str(why), param=why.param) from None
    except ValueError as why:  # the chat template cannot render these messages
        raise APIError(400, str(why), param="messages") from None


def parse(body: Any, *, chat: bool, model: Model, settings: ServerSettings) -> Job:
    """A Job from a request body, or APIError naming what is wrong."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    name = body.get("model")
    if name != settings.model_name:
        raise APIError(404, f"model {name!r} does not exist; this server serves {settings.model_name!r} "
                       "(GET /v1/models)", param="model", code="model_not_found")
    _check_fields(body, chat=chat)
    stream = _field(body, "stream", bool, False)
    if _field(body, "n", int, 1) != 1:
        raise APIError(400, "only n = 1 is supported", param="n")
    opts = _chat_options(body, model) if chat else None
    logprobs = opts.top_logprobs if opts is not None else _completion_logprobs(body)
    try:
        if opts is not None:
            text = opts.prompt
        else:
            text = body.get("prompt")
            if not isinstance(text, str) or not text:
                raise APIError(400, "'prompt' must be a non-empty string (one prompt per request)", param="prompt")
        prompt = model.tokenize(text)
    except ValueError as why:
        raise APIError(400, str(why), param="messages" if chat else "prompt") from None
    sampling = _sampling(body, model, grammar=opts.grammar if opts is not None else None, logprobs=logprobs)
    if sampling.grammar is not None:
        try:
            check_grammar(model, sampling.grammar)
        except ValueError as why:
            raise APIError(400, str(why), param="grammar") from None
    return Job(chat, prompt, _policy(body, settings), _limits(body, settings), sampling, stream,
               tools=opts.tools if opts is not None else None, logprobs=logprobs,
               include_usage=_include_usage(body, stream))


# -- responses --------------------------------------------------------------------
def _sse(data: Mapping[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def _failure(item: BaseException) -> APIError:
    if isinstance(item, Cancelled):
        return APIError(503, "the request was cancelled (the server is shutting down)", kind="server_error",
                        code="cancelled")
    return APIError(500, f"generation failed: {item}", kind="server_error")


# -- the engine ---------------------------------------------------------------------
class Engine:
    """The BatchRunner behind the HTTP layer: admission (a queue of
    queue_size, then 429) and the bridge from worker threads to asyncio."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.model = Model(settings.engine.path(), devices=settings.engine.devices)
        try:
            self.model.check_supported()
            self.runner = BatchRunner(self.model, settings.batch_settings())
        except BaseException:
            self.model.close()
            raise
        self.runner.on_free = self._slot_freed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._freed: asyncio.Event | None = None
        self.waiting = 0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run on loop (at startup)."""
        self._loop, self._freed = loop, asyncio.Event()

    def _slot_freed(self) -> None:
        if self._loop is not None and self._freed is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._freed.set)

    async def start(self, job: Job) -> tuple[int, asyncio.Queue[Item], Run]:
        """(slot, the queue of the job's items, its run) once a slot is free."""
        assert self._loop is not None and self._freed is not None  # bind() ran at startup
        loop, items = self._loop, asyncio.Queue[Item]()

        def sink(item: Item) -> None:
            loop.call_soon_threadsafe(items.put_nowait, item)

        while True:
            self._freed.clear()
            try:
                req = await asyncio.to_thread(self.runner.start, job.prompt, policy=job.policy, limits=job.limits,
                                              sampling=job.sampling, sink=sink)
                return req.slot, items, req
            except NoFreeSlot:
                if self.waiting >= self.settings.queue_size:
                    raise APIError(429, f"all {self.settings.slots} slots are busy and {self.waiting} requests "
                                   "wait; retry later", kind="rate_limit_error", code="queue_full") from None
            except ValueError as why:
                raise APIError(400, f"{why}; raise --slot-cells or ask for smaller budgets", param="scope",
                               code="invalid_budget") from None
            self.waiting += 1
            try:
                await self._freed.wait()
            finally:
                self.waiting -= 1

    def health(self) -> dict[str, Any]:
        devices = self.settings.engine.devices
        return {"status": "ok", "model": self.settings.model_name, "slots": self.settings.slots,
                "free_slots": self.runner.free_slots(), "queued": self.waiting,
                "slot_cells": self.runner.settings.slot_cells,
                "devices": {"n_gpu_layers": devices.n_gpu_layers, "rpc_servers": list(devices.rpc_servers),
                            "offloaded": devices.offloads(), "capture_layers": self.runner.capture_layers}}

    def cancel_all(self) -> None:
        self.runner.cancel_all()

    def close(self) -> None:
        self.runner.close()
        self.model.close()


# -- the app --------------------------------------------------------------------------
async def _body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as why:
        raise APIError(400, f"the request body is not valid JSON: {why}") from None


def _check_key(request: Request, settings: ServerSettings) -> None:
    if settings.api_key is None:
        return
    if request.headers.get("authorization", "") != f"Bearer {settings.api_key}":
        raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")


async def _whole(request: Request, answer: Answer, items: asyncio.Queue[Item], req: Run) -> JSONResponse:
    parts: list[Chunk] = []
    try:
        while True:
            try:
                item = await asyncio.wait_for(items.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise APIError(499, "client disconnected") from None
                continue
            if isinstance(item, BaseException):
                raise _failure(item)
            parts.append(item)
            if item.finish_reason is not None:
                return JSONResponse(answer.whole(parts))
    finally:
        req.cancel()  # a client that left frees its slot at the next step (no-op once finished)


async def _streamed(answer: Answer, items: asyncio.Queue[Item], req: Run) -> AsyncIterator[bytes]:
    try:
        first = answer.first()
        if first is not None:
            yield _sse(first)
        while True:
            item = await items.get()
            if isinstance(item, BaseException):
                yield _sse(_failure(item).body())
                return
            for body in answer.parts(item):
                yield _sse(body)
            if item.finish_reason is not None:
                yield _sse("[DONE]")
                return
    finally:
        req.cancel()  # a client that left mid-stream frees its slot at the next step (no-op once finished)


def create_app(engine: Engine) -> FastAPI:
    settings = engine.settings

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.bind(asyncio.get_running_loop())
        yield
        engine.close()

    app = FastAPI(title="scope-edge", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, str(exc)).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        err = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s", request.url.path)
        return JSONResponse(APIError(500, f"internal error: {exc}", kind="server_error").body(), status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return engine.health()

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _check_key(request, settings)
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "scope-edge"}]}

    async def complete(request: Request, *, chat: bool) -> Any:
        _check_key(request, settings)
        job = parse(await _body(request), chat=chat, model=engine.model, settings=settings)
        slot, items, req = await engine.start(job)
        answer = Answer(chat=job.chat, model=engine.model, model_name=settings.model_name, tools=job.tools,
                        logprobs=job.logprobs, include_usage=job.include_usage, extra_stats={"slot": slot})
        if job.stream:
            return StreamingResponse(_streamed(answer, items, req), media_type="text/event-stream")
        return await _whole(request, answer, items, req)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await complete(request, chat=False)

    return app


class _Server(uvicorn.Server):
    """uvicorn, with SIGTERM / SIGINT first cancelling the running generations
    (each stops at its next step), so open streams end and the exit is prompt."""

    def __init__(self, config: uvicorn.Config, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.engine.cancel_all()
        super().handle_exit(sig, frame)

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, without raising the signal again after the shutdown: a
        requested shutdown that went well exits with status 0."""
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(settings: ServerSettings) -> None:
    """Load the model and serve until SIGTERM / SIGINT."""
    engine = Engine(settings)
    bs = engine.runner.settings
    devices = settings.engine.devices
    where = (f"{devices.n_gpu_layers} layers offloaded" + (f" to {', '.join(devices.rpc_servers)}"
                                                           if devices.rpc_servers else "")
             if devices.offloads() else "the CPU")
    log.warning("serving %s on http://%s:%d/v1 (%s): %d slots x %d KV cells (%.1f MiB), default budget %d/%d %s",
                settings.model_name, settings.host, settings.port, where, bs.slots, bs.slot_cells,
                engine.runner.kv_bytes(bs.slots * bs.slot_cells) / 2**20, settings.budget.prefill,
                settings.budget.decode, settings.strategy)
    config = uvicorn.Config(create_app(engine), host=settings.host, port=settings.port, log_level="warning",
                            timeout_graceful_shutdown=10, lifespan="on")
    _Server(config, engine).run()


def model_name_of(path: str) -> str:
    """The id a model is served under: its file name without .gguf."""
    name = os.path.basename(path)
    return name[: -len(".gguf")] if name.endswith(".gguf") else name
