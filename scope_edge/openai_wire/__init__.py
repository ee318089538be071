"""OpenAI's wire format: request options, response bodies, their types.

One package for both faces of scope-edge that speak OpenAI: the server
(scope_edge.server, over the batched runtime) and the functions over a
ScopeLlama (scope_edge.openai). It imports no facade and no server, so
either can use it. Internal: its names are re-exported by scope_edge.openai.

    shapes.py   the bodies' TypedDicts; FieldError (a request option refused)
    tools.py    tools / tool_choice checked, their grammar, a call read back
                (its docstring says how a call is written and constrained)
    request.py  a chat request's options: messages rendered (its docstring says
                which template, and how tools are offered), response_format,
                logprobs (ChatOptions, chat_options)
    bodies.py   Answer: every response body and stream chunk, built here only

    opts = chat_options(messages, model=model, tools=tools)
    Answer(chat=True, model=model, model_name="smollm2", tools=opts.tools)
        .first() / .parts(chunk) / .whole(chunks): the bodies for a generation's chunks
"""
from __future__ import annotations

from .bodies import Answer, ChatReply, completion_logprobs, logprob_entry, usage
from .request import ChatOptions, chat_options, prompt_messages, response_format_grammar, template_messages
from .shapes import (ChatChoice, ChatChunk, ChatChunkChoice, ChatDelta, ChatLogprobs, ChatMessage, ChatResponse,
                     CompletionChoice, CompletionLogprobs, CompletionResponse, FieldError, FinishReason,
                     FunctionCall, ResponseHead, TokenLogprob, ToolCall, ToolCallDelta, TopLogprob, Usage)
from .tools import NO_PARAMETERS, Tools, parse_tool_call, parse_tools

__all__ = ["Answer", "ChatReply", "completion_logprobs", "logprob_entry", "usage", "ChatOptions", "chat_options",
           "prompt_messages", "response_format_grammar", "template_messages", "ChatChoice", "ChatChunk",
           "ChatChunkChoice", "ChatDelta", "ChatLogprobs", "ChatMessage", "ChatResponse", "CompletionChoice",
           "CompletionLogprobs", "CompletionResponse", "FieldError", "FinishReason", "FunctionCall", "ResponseHead",
           "TokenLogprob", "ToolCall", "ToolCallDelta", "TopLogprob", "Usage", "NO_PARAMETERS", "Tools",
           "parse_tool_call", "parse_tools"]
