"""The benchmark prompts: a deterministic delivery logbook inside the GGUF's
own chat template (SmolLM2 degenerates without one), cut to an exact token
count; the vocabulary and end-of-generation tokens the stock loops mask."""
from __future__ import annotations

import functools
import logging
import random

import numpy as np

from ..runtime.model import Model

# The system message of every benchmark prompt. It is benchmark content, not
# template: the template comes from the GGUF (Model.render_chat). This text is
# SmolLM2's default system prompt, which the prompts of bench/results carry, so
# the default model's prompts stay token for token what those results measured.
# (llama.cpp's built-in ChatML formatter adds no default system turn.)
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# Where the body's tokens go in the rendered chat: split on, never tokenized.
_BODY_MARK = "<<scope-edge-bench-body>>"


_NAMES = ["Maria", "Kenji", "Amara", "Lukas", "Priya", "Tomás", "Ingrid", "Omar", "Chen", "Fatima",
          "Diego", "Sofia", "Yusuf", "Elena", "Kwame", "Hana", "Pavel", "Lucia", "Arjun", "Nora"]
_CITIES = ["Lisbon", "Osaka", "Nairobi", "Hamburg", "Pune", "Bogotá", "Oslo", "Cairo", "Chengdu",
           "Tunis", "Quito", "Turin", "Izmir", "Kraków", "Accra", "Sapporo", "Brno", "Seville"]
_ITEMS = ["violins", "bicycles", "lanterns", "kettles", "telescopes", "umbrellas", "typewriters",
          "backpacks", "clocks", "drums", "microscopes", "teapots", "skateboards", "compasses"]
_WAYS = ["by train", "by bicycle courier", "by cargo ship", "on foot", "by van", "by air freight"]
_NOTES = ["the box was slightly damaged", "the customer paid in cash", "delivery was two days late",
          "a thank-you note came back", "the invoice had a typo", "it rained all day",
          "the recipient asked for a discount", "everything arrived in perfect order"]


def _record(i: int, rng: random.Random) -> str:
    return (f"Record {i}: {rng.choice(_NAMES)} from {rng.choice(_CITIES)} ordered {rng.randint(2, 99)} "
            f"{rng.choice(_ITEMS)}; the parcel weighed {rng.randint(1, 60)} kg, went {rng.choice(_WAYS)}, "
            f"and {rng.choice(_NOTES)}.")


def vocabulary(model_path: str) -> Model:
    """The GGUF's vocabulary and chat template without its weights
    (Model(vocab_only=True)); close it, or use it as a context manager.
    llama.cpp's log is silenced as ScopeLlama(verbose=False) silences it."""
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama_cpp's log callback reads this level
    return Model(str(model_path), vocab_only=True)


@functools.lru_cache(maxsize=8)
def _eog(model_path: str) -> tuple[int, ...]:
    with vocabulary(model_path) as vocab:
        return tuple(vocab.eog_tokens())


def eog_tokens(model_path: str) -> np.ndarray:
    """The model's end-of-generation token ids (the stock runs mask them:
    same GGUF, same vocabulary)."""
    return np.array(_eog(str(model_path)), dtype=np.int64)


def chat_prompt(vocab: Model, user_head: str, body: str, user_tail: str, n_tokens: int, *,
                system: str | None = SYSTEM_PROMPT) -> list[int]:
    """Token ids of exactly n_tokens: a system message (None: none) and the
    user message user_head + body + user_tail through the GGUF's chat
    template, the assistant's turn opened. The body's tokens are cut (or the
    body repeated) to fit. vocab: a Model (vocabulary() is enough)."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": user_head + _BODY_MARK + user_tail})
    rendered = vocab.render_chat(messages)
    if rendered.count(_BODY_MARK) != 1:
        raise ValueError(f"the chat template did not keep the user message intact: {rendered!r}")
    before, after = rendered.split(_BODY_MARK)
    head = vocab.tokenize(before, add_special=True)  # BOS if the model wants one, as ScopeLlama.chat
    tail = vocab.tokenize(after, add_special=False)
    room = n_tokens - len(head) - len(tail)
    if room < 1:
        raise ValueError(f"a prompt of {n_tokens} tokens cannot hold the template ({len(head) + len(tail)} tokens)")
    ids = vocab.tokenize(body, add_special=False)
    if not ids:
        raise ValueError("the prompt body has no tokens")
    while len(ids) < room:
        ids = ids + ids
    return head + ids[:room] + tail


def logbook_prompt(model_path: str, n_tokens: int, seed: int = 0, *,
                   system: str | None = SYSTEM_PROMPT) -> list[int]:
    """The benchmark prompt: a delivery logbook the model is asked to go through."""
    rng = random.Random(seed)
    n_records = max(8, n_tokens // 30)
    body = "\n".join(_record(i + 1, rng) for i in range(n_records))
    with vocabulary(model_path) as vocab:
        return chat_prompt(
            vocab,
            "Here is a delivery logbook.\n\n",
            body,
            "\n\nGo through the logbook record by record. For each record write one line with the customer, "
            "the city, the number of items and what happened.",
            n_tokens,
            system=system,
        )

