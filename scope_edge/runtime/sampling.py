"""Sampling: llama.cpp's sampler chain, configured by one Sampling object;
a GBNF grammar (llama.cpp's grammar sampler) constrains the choice, and each
draw can report the token's log-probabilities."""
from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from dataclasses import dataclass

import llama_cpp
import numpy as np

from ..policies.checks import is_int
from .model import Model

RANDOM_SEED = llama_cpp.LLAMA_DEFAULT_SEED  # 0xFFFFFFFF: llama.cpp draws a random seed
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs
# llama_token_data {int32 id; float logit; float p}, as numpy, to fill candidate arrays without a Python loop
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
GRAMMAR_SHORTLIST = 64  # greedy under a grammar: the best tokens checked before the whole vocabulary


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
    logit_bias: (token id, bias) pairs added to the logits before everything else.
    grammar: GBNF text (start rule "root") the output must match, through
        llama.cpp's grammar sampler; scope_edge.runtime.grammar builds it from
        a JSON schema. The generation ends (end-of-generation token) only
        where the grammar is complete.
    logprobs: not a choice but a report: each draw records the chosen
        token's log-probability and this many top alternatives (0..20; None:
        off), from the log-softmax of the model's raw logits at that step,
        before logit_bias, penalties, filters, temperature and grammar.
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
    logit_bias: tuple[tuple[int, float], ...] = ()
    grammar: str | None = None
    logprobs: int | None = None

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
        if not isinstance(self.logit_bias, tuple) or any(
                not isinstance(b, tuple) or len(b) != 2 or not is_int(b[0]) or b[0] < 0 or not _number(b[1])
                for b in self.logit_bias):
            raise ValueError(f"logit_bias must be a tuple of (token id >= 0, finite bias) pairs, got {self.logit_bias!r}")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise ValueError(f"grammar must be non-empty GBNF text or None, got {self.grammar!r}")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"logprobs must be None or an int in [0, {MAX_TOP_LOGPROBS}] (top alternatives "
                             f"reported), got {self.logprobs!r}")

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


@dataclass(frozen=True)
class TokenLogprobs:
    """A drawn token's log-probability and the top alternatives
    (token id, log-probability), best first: log-softmax of the step's raw logits."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def token_logprobs(logits: np.ndarray, token: int, n_top: int) -> TokenLogprobs:
    """TokenLogprobs of token among logits (float32 [n_vocab]), in float64."""
    x = logits.astype(np.float64)
    lse = x.max() + math.log(np.exp(x - x.max()).sum())
    top: tuple[tuple[int, float], ...] = ()
    if n_top:
        best = np.argpartition(-x, n_top - 1)[:n_top]
        best = best[np.lexsort((best, -x[best]))]  # by logit, ties to the lower id
        top = tuple((int(t), float(x[t] - lse)) for t in best)
    return TokenLogprobs(int(token), float(x[token] - lse), top)


class Sampler:
    """One generation's token choice from a context's logits; close() it.

    Plain greedy (temperature 0, no penalties, no bias) is an argmax over
    llama.cpp's logits, end-of-generation tokens excluded under ignore_eos:
    the chain's greedy sampler builds a candidate array of the whole
    vocabulary every step, which measured 0.15 ms a step of 25. Ties go to
    the lowest token id in both. Anything else runs llama.cpp's sampler chain.

    A grammar is checked as llama.cpp's common sampler does: the
    unconstrained choice first, and only if the grammar rejects it a draw
    with the grammar applied (to all 49K tokens of SmolLM2 it measured
    4.5 ms). Greedy checks the GRAMMAR_SHORTLIST best tokens before the
    whole vocabulary: the best allowed token is the first allowed one in
    logit order, so the choice is exact. After a draw, `logprobs` holds the
    token's TokenLogprobs if Sampling.logprobs asked for them."""

    def __init__(self, s: Sampling, model: Model, *, ignore_eos: bool, history: Sequence[int]) -> None:
        self._n_vocab = model.n_vocab
        self._excluded = np.asarray(model.eog_tokens() if ignore_eos else [], dtype=np.int64)
        out = [t for t, _ in s.logit_bias if t >= model.n_vocab]
        if out:
            raise ValueError(f"logit_bias token ids {out[:5]} are outside the vocabulary [0, {model.n_vocab})")
        if s.grammar is not None and ignore_eos:
            raise ValueError("a grammar ends the generation with an end-of-generation token; it cannot run "
                             "with ignore_eos")
        self._n_top = s.logprobs
        self.logprobs: TokenLogprobs | None = None
        self._grammar = None if s.grammar is None else compile_grammar(model, s.grammar)
        argmax = s.temperature == 0 and not s.penalized and not s.logit_bias
        try:
            self._chain = None if argmax else _chain(s, model, excluded=self._excluded, history=history)
        except BaseException:
            self.close()
            raise
        self._ids = np.arange(self._n_vocab if self._grammar is not None else 0, dtype=np.int32)
        self._all = np.zeros(len(self._ids), dtype=TOKEN_DATA)  # reused each step; the chain reorders it

    def draw(self, ctx: llama_cpp.llama_context_p, index: int = -1) -> int:
        """The token for the logits of batch token index (-1: the last that has them)."""
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index), shape=(self._n_vocab,))
        if self._grammar is not None:
            token = self._constrained(logits)
        elif self._chain is not None:
            token = int(llama_cpp.llama_sampler_sample(self._chain, ctx, index))
        else:
            token = self._argmax(logits)
        if self._n_top is not None:
            self.logprobs = token_logprobs(logits, token, self._n_top)
        return token

    def _argmax(self, logits: np.ndarray) -> int:
        token = int(np.argmax(logits))
        if len(self._excluded) and token in self._excluded:
            logits = logits.copy()  # the context's logits stay as llama.cpp wrote them
            logits[self._excluded] = -np.inf
            token = int(np.argmax(logits))
        return token

    def _constrained(self, logits: np.ndarray) -> int:
        """The choice under the grammar, accepted by the grammar (and the chain)."""
        assert self._grammar is not None  # draw() calls it only with one
        if self._chain is None:
            token = self._argmax(logits)
            if not self._allowed(np.array([token]), logits)[0]:
                token = self._best_allowed(logits)
        else:
            token = self._apply_chain(logits, grammar_first=False)
            if not self._allowed(np.array([token]), logits)[0]:
                token = self._apply_chain(logits, grammar_first=True)
            llama_cpp.llama_sampler_accept(self._chain, token)
        llama_cpp.llama_sampler_accept(self._grammar, token)
        return token

    def _apply(self, sampler: llama_cpp.llama_sampler_p, data: np.ndarray) -> int:
        """llama_sampler_apply over a TOKEN_DATA array (changed in place); the selected index."""
        cur = llama_cpp.llama_token_data_array(data=data.ctypes.data_as(llama_cpp.llama_token_data_p),
                                               size=len(data), selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(cur))
        return int(cur.selected)

    def _allowed(self, tokens: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """Which of tokens the grammar accepts next."""
        data = np.zeros(len(tokens), dtype=TOKEN_DATA)
        data["id"], data["logit"] = tokens, logits[tokens]
        self._apply(self._grammar, data)
        return data["logit"] != -np.inf

    def _best_allowed(self, logits: np.ndarray) -> int:
        short = np.argpartition(-logits, GRAMMAR_SHORTLIST - 1)[:GRAMMAR_SHORTLIST]
        short = short[np.lexsort((short, -logits[short]))]
        ok = self._allowed(short, logits)
        if ok.any():
            return int(short[np.argmax(ok)])
        ok = self._allowed(self._ids, logits)
        if not ok.any():
            raise RuntimeError("the grammar allows no token here (a grammar that cannot continue or end)")
        return int(np.argmax(np.where(ok, logits, -np.inf)))

    def _apply_chain(self, logits: np.ndarray, *, grammar_first: bool) -> int:
        data = self._all
        data["id"], data["logit"], data["p"] = self._ids, logits, 0.0
        if grammar_first:
            self._apply(self._grammar, data)
            if not (data["logit"] != -np.inf).any():
                raise RuntimeError("the grammar allows no token here (a grammar that cannot continue or end)")
        return int(data["id"][self._apply(self._chain, data)])

    def close(self) -> None:
        for name in ("_chain", "_grammar"):
            sampler = getattr(self, name, None)
            if sampler is not None:
                llama_cpp.llama_sampler_free(sampler)
                setattr(self, name, None)


def compile_grammar(model: Model, grammar: str) -> llama_cpp.llama_sampler_p:
    """llama.cpp's grammar sampler for GBNF text over model's vocabulary
    (ValueError if llama.cpp cannot parse it); llama_sampler_free it."""
    sampler = llama_cpp.llama_sampler_init_grammar(model.vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        raise ValueError("llama.cpp could not parse the grammar (GBNF with a 'root' rule); its log says where")
    return sampler


def check_grammar(model: Model, grammar: str) -> None:
    """ValueError if llama.cpp cannot parse grammar."""
    llama_cpp.llama_sampler_free(compile_grammar(model, grammar))


def _chain(s: Sampling, model: Model, *, excluded: np.ndarray, history: Sequence[int]) -> llama_cpp.llama_sampler_p:
    """llama.cpp's sampler chain for s, excluded tokens biased to -inf.
    history: the tokens before the first sampled one (the prompt), which the
    penalties count."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

    def add(sampler: llama_cpp.llama_sampler_p) -> None:
        llama_cpp.llama_sampler_chain_add(chain, sampler)

    biases = [*s.logit_bias, *((int(t), float("-inf")) for t in excluded)]
    if biases:
        bias = (llama_cpp.llama_logit_bias * len(biases))(*[llama_cpp.llama_logit_bias(t, b) for t, b in biases])
        add(llama_cpp.llama_sampler_init_logit_bias(model.n_vocab, len(biases), bias))
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
