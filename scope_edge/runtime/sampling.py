"""Sampling: llama.cpp's sampler chain, configured by one Sampling object."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import llama_cpp
import numpy as np

from ..policies.checks import is_int
from .model import Model

RANDOM_SEED = llama_cpp.LLAMA_DEFAULT_SEED  # 0xFFFFFFFF: llama.cpp draws a random seed


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How the next token is chosen, applied in llama.cpp's order: penalties
    (over the last repeat_last_n tokens, prompt included), top_k, top_p,
    min_p, temperature, then a seeded draw. temperature 0 is greedy (the
    penalties still apply first); the defaults are greedy with every filter
    off, so a generation equals stock llama.cpp's greedy one.

    top_k: keep the k most likely tokens (0: off).
    top_p: keep the smallest set whose probability reaches p (1: off).
    min_p: drop tokens below min_p x the top token's probability (0: off).
    repeat_penalty: divide the logits of recent tokens by it (1: off).
    presence_penalty / frequency_penalty: subtract once / per occurrence (0: off).
    seed: of the draw; RANDOM_SEED (0xFFFFFFFF) lets llama.cpp pick one.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not _number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}")
        if not _number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p!r}")
        if not _number(self.min_p) or not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1) (0 disables it), got {self.min_p!r}")
        if not _number(self.repeat_penalty) or self.repeat_penalty <= 0:
            raise ValueError(f"repeat_penalty must be a number > 0 (1 disables it), got {self.repeat_penalty!r}")
        if not is_int(self.repeat_last_n) or self.repeat_last_n < 0:
            raise ValueError(f"repeat_last_n must be an int >= 0 (0 disables the penalties), got {self.repeat_last_n!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _number(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number (0 disables it), got {getattr(self, name)!r}")
        if not is_int(self.seed) or not 0 <= self.seed <= 0xFFFFFFFF:
            raise ValueError(f"seed must be an int in [0, 2**32 - 1] ({RANDOM_SEED}: random), got {self.seed!r}")

    @classmethod
    def llama_cli(cls, *, seed: int = RANDOM_SEED) -> Sampling:
        """llama.cpp's command-line defaults (temperature 0.8, top_k 40,
        top_p 0.95, min_p 0.05): what the scope-edge CLI samples with."""
        return cls(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, seed=seed)

    @property
    def penalized(self) -> bool:
        return self.repeat_last_n != 0 and (
            self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0)


GREEDY = Sampling()


class Sampler:
    """One generation's token choice from a context's logits; close() it.

    Plain greedy (temperature 0, no penalties) is an argmax over llama.cpp's
    logits, end-of-generation tokens excluded under ignore_eos: the chain's
    greedy sampler builds a candidate array of the whole vocabulary every
    step, which measured 0.15 ms a step of 25. Ties go to the lowest token
    id in both. Anything else runs llama.cpp's sampler chain."""

    def __init__(self, s: Sampling, model: Model, *, ignore_eos: bool, history: Sequence[int]) -> None:
        self._n_vocab = model.n_vocab
        self._excluded = np.asarray(model.eog_tokens() if ignore_eos else [], dtype=np.int64)
        argmax = s.temperature == 0 and not s.penalized
        self._chain = None if argmax else _chain(s, model, excluded=self._excluded, history=history)

    def draw(self, ctx: llama_cpp.llama_context_p, index: int = -1) -> int:
        """The token for the logits of batch token index (-1: the last that has them)."""
        if self._chain is not None:
            return int(llama_cpp.llama_sampler_sample(self._chain, ctx, index))
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index), shape=(self._n_vocab,))
        token = int(np.argmax(logits))
        if len(self._excluded) and token in self._excluded:
            logits = logits.copy()  # the context's logits stay as llama.cpp wrote them
            logits[self._excluded] = -np.inf
            token = int(np.argmax(logits))
        return token

    def close(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


def _chain(s: Sampling, model: Model, *, excluded: np.ndarray, history: Sequence[int]) -> llama_cpp.llama_sampler_p:
    """llama.cpp's sampler chain for s, excluded tokens biased to -inf.
    history: the tokens before the first sampled one (the prompt), which the
    penalties count."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

    def add(sampler: llama_cpp.llama_sampler_p) -> None:
        llama_cpp.llama_sampler_chain_add(chain, sampler)

    if len(excluded):
        bias = (llama_cpp.llama_logit_bias * len(excluded))(
            *[llama_cpp.llama_logit_bias(int(t), float("-inf")) for t in excluded])
        add(llama_cpp.llama_sampler_init_logit_bias(model.n_vocab, len(excluded), bias))
    if s.penalized:
        add(llama_cpp.llama_sampler_init_penalties(model.n_vocab, s.repeat_last_n, s.repeat_penalty,
                                                   s.frequency_penalty, s.presence_penalty))
        for token in history[-s.repeat_last_n:]:
            llama_cpp.llama_sampler_accept(chain, token)
    if s.temperature == 0:
        add(llama_cpp.llama_sampler_init_greedy())
        return chain
    if s.top_k > 0:
        add(llama_cpp.llama_sampler_init_top_k(s.top_k))
    if s.top_p < 1.0:
        add(llama_cpp.llama_sampler_init_top_p(s.top_p, 1))
    if s.min_p > 0.0:
        add(llama_cpp.llama_sampler_init_min_p(s.min_p, 1))
    add(llama_cpp.llama_sampler_init_temp(s.temperature))
    add(llama_cpp.llama_sampler_init_dist(s.seed))
    return chain
