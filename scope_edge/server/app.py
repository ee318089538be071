"""The HTTP layer: the FastAPI app over an Engine (routes, API key, errors
in OpenAI's shape, whole and streamed answers, a client that leaves freeing
its slot) and serve(), uvicorn with a clean SIGTERM."""
from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..openai_wire import Answer
from ..runtime.batch import Cancelled, Item, Request as Run
from ..runtime.generation import Chunk
from .engine import Engine
from .request import APIError, parse
from .settings import ServerSettings

log = logging.getLogger("scope_edge")


# -- responses --------------------------------------------------------------------
def _sse(data: Mapping[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def _failure(item: BaseException) -> APIError:
    if isinstance(item, Cancelled):
        return APIError(503, "the request was cancelled (the server is shutting down)", kind="server_error",
                        code="cancelled")
    return APIError(500, f"generation failed: {item}", kind="server_error")


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
    log.warning("serving %s on http://%s:%d/v1 (%s): %d slots x %d KV cells (%.1f MiB), default budget %d/%d %s%s",
                settings.model_name, settings.host, settings.port, where, bs.slots, bs.slot_cells,
                engine.runner.kv_bytes(bs.slots * bs.slot_cells) / 2**20, settings.budget.prefill,
                settings.budget.decode, settings.strategy, ", chat structure kept" if settings.keep_structure else "")
    config = uvicorn.Config(create_app(engine), host=settings.host, port=settings.port, log_level="warning",
                            timeout_graceful_shutdown=10, lifespan="on")
    _Server(config, engine).run()
