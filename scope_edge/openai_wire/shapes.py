"""OpenAI's wire shapes: the TypedDicts of the response bodies, and
FieldError, the error a request option that cannot be honoured raises."""
from __future__ import annotations

from typing import Literal, TypedDict

FinishReason = Literal["stop", "length", "tool_calls"]


class FieldError(ValueError):
    """A request option that cannot be honoured; param names it (the
    server answers 400 with it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(TypedDict):
    content: list[TokenLogprob]


class CompletionLogprobs(TypedDict):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(TypedDict):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class ResponseHead(TypedDict):
    """What every response and chunk starts with."""

    id: str
    created: int
    model: str


class CompletionResponse(ResponseHead, total=False):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]
    usage: Usage
    scope_edge: dict[str, float | int]


class FunctionCall(TypedDict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(TypedDict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ToolCallDelta(ToolCall):
    index: int


class ChatMessage(TypedDict, total=False):
    role: str
    content: str | None
    tool_calls: list[ToolCall]


class ChatChoice(TypedDict):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatDelta(TypedDict, total=False):
    role: str
    content: str
    tool_calls: list[ToolCallDelta]


class ChatChunkChoice(TypedDict):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatResponse(ResponseHead, total=False):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage
    scope_edge: dict[str, float | int]


class ChatChunk(ResponseHead, total=False):
    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]
    usage: Usage
    scope_edge: dict[str, float | int]
