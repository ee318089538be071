"""`scope-edge serve`: an OpenAI-compatible HTTP server whose conversations
share one llama.cpp context, decoded together, each inside its own budgets.

    POST /v1/chat/completions, POST /v1/completions (plain, or SSE with "stream": true)
    GET  /v1/models, GET /health

Request fields as OpenAI's (every field a current openai client sends is
used, accepted or refused with a 400 naming it: see COMMON_USED and
docs/clients.md), structured output (response_format, llama-server's
"grammar"), logprobs and tool calls (scope_edge.openai_wire holds their shapes),
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

    settings.py  ServerSettings (EngineConfig + serving fields), the policies
    request.py   a request body -> Job, or APIError (OpenAI's error shape)
    engine.py    Engine: the BatchRunner, slot admission and queue, threads -> asyncio
    app.py       the FastAPI app, whole and streamed answers, serve()
Bodies are built by scope_edge.openai_wire.Answer (shared with scope_edge.openai).
"""
from __future__ import annotations

from .app import create_app, serve
from .engine import Engine
from .request import (CHAT_ACCEPTED, CHAT_REFUSED, CHAT_USED, COMMON_USED, COMPLETION_ACCEPTED, COMPLETION_REFUSED,
                      COMPLETION_USED, EXTENSIONS, REFUSED_WHY, SCOPE_KEYS, APIError, Job, parse)
from .settings import ServerSettings, model_name_of

__all__ = ["ServerSettings", "model_name_of", "serve", "create_app", "Engine", "APIError", "Job", "parse",
           "SCOPE_KEYS", "COMMON_USED", "EXTENSIONS", "CHAT_USED", "CHAT_ACCEPTED", "CHAT_REFUSED", "COMPLETION_USED",
           "COMPLETION_ACCEPTED", "COMPLETION_REFUSED", "REFUSED_WHY"]
