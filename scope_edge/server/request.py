"""A request body parsed into a Job (prompt, policy, limits, sampling, how
to answer), or an APIError in OpenAI's shape naming the field at fault.

COMMON_USED and its neighbours list every field a current openai client
sends and what is done with it (docs/clients.md); "scope" is our own
per-request policy object, SCOPE_KEYS its keys.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..budget import Budget
from ..openai_wire import ChatOptions, FieldError, Tools, chat_options
from ..policies import Policy
from ..runtime.generation import Limits
from ..runtime.model import Model
from ..runtime.sampling import RANDOM_SEED, Sampling, check_grammar
from .settings import ServerSettings

BUDGET_KEYS = ("prefill_budget", "decode_budget", "observation_window", "recent_window")
SCOPE_KEYS = {*BUDGET_KEYS, "strategy", "lend"}


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
        budget = None  # a scope naming no budget runs the server's, its structure setting included
        if set(scope) & set(BUDGET_KEYS):
            budget = Budget(prefill=scope.get("prefill_budget", b.prefill), decode=scope.get("decode_budget", b.decode),
                            observation_window=scope.get("observation_window"),
                            recent_window=scope.get("recent_window"))
        policy = settings.policy(budget=budget, strategy=scope.get("strategy"), lend=scope.get("lend"))
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
