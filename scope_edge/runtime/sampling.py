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

from ..checks import is_int
from .model import Model

RANDOM_SEED = llama_cpp.LLAMA_DEFAULT_SEED  # 0xFFFFFFFF: llama.cpp draws a random seed
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs
# llama_token_data {int32 id; float logit; float p}, as numpy, to fill candidate arrays without a Python loop
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
GRAMMAR_SHORTLISTS = (64, 1024)  # greedy under a grammar: the best tokens checked before the whole vocabulary


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


def logits_view(ptr: ctypes._Pointer, row: type[ctypes.Array]) -> np.ndarray:
    """The float32 logits row at ptr (llama_get_logits_ith's), without a
    copy: row is c_float * n_vocab. np.ctypeslib.as_array builds its array
    type on every call, a few microseconds of every decode step."""
    return np.frombuffer(row.from_address(ctypes.addressof(ptr.contents)), dtype=np.float32)


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

    Under a grammar the chain is split: its filters (bias, penalties, top_k,
    top_p, min_p, temperature), then the pick (greedy or the seeded draw).
    The grammar sampler costs about 2 us per candidate token inside a JSON
    string (0.15 s over SmolLM2's 49K tokens), so it sees as few as it can:
    greedy takes the best token the grammar allows, searching the filtered
    logits in order (the argmax, then the best GRAMMAR_SHORTLISTS, then all),
    which is exact. A draw is checked first (as llama.cpp's common sampler
    does); if the grammar rejects it, the grammar filters the candidates the
    filters kept (top_k's 40, say) and the pick draws again among those it
    allows, an exact draw from the filtered distribution restricted to the
    grammar. Only when it allows none of them does the grammar see the whole
    vocabulary, in llama.cpp's order (grammar, filters, draw). After a draw,
    `logprobs` holds the token's TokenLogprobs if Sampling.logprobs asked."""

    def __init__(self, s: Sampling, model: Model, *, ignore_eos: bool, history: Sequence[int]) -> None:
        self._n_vocab = model.n_vocab
        self._row = ctypes.c_float * model.n_vocab
        self._excluded = np.asarray(model.eog_tokens() if ignore_eos else [], dtype=np.int64)
        self._excluded_set = frozenset(self._excluded.tolist())  # a set's `in`, not an array's compare, per token
        out = [t for t, _ in s.logit_bias if t >= model.n_vocab]
        if out:
            raise ValueError(f"logit_bias token ids {out[:5]} are outside the vocabulary [0, {model.n_vocab})")
        if s.grammar is not None and ignore_eos:
            raise ValueError("a grammar ends the generation with an end-of-generation token; it cannot run "
                             "with ignore_eos")
        self._n_top = s.logprobs
        self.logprobs: TokenLogprobs | None = None
        self._chain = self._filters = self._pick = None
        self._grammar = None if s.grammar is None else compile_grammar(model, s.grammar)
        try:
            if self._grammar is None:
                argmax = s.temperature == 0 and not s.penalized and not s.logit_bias
                self._chain = None if argmax else _chain(s, model, excluded=self._excluded, history=history)
            else:
                self._filters = _chain(s, model, excluded=self._excluded, history=history, pick=False)
                if llama_cpp.llama_sampler_chain_n(self._filters) == 0:
                    llama_cpp.llama_sampler_free(self._filters)
                    self._filters = None
                self._pick = None if s.temperature == 0 else llama_cpp.llama_sampler_init_dist(s.seed)
        except BaseException:
            self.close()
            raise
        self._ids = np.arange(self._n_vocab if self._grammar is not None else 0, dtype=np.int32)
        self._all = np.zeros(len(self._ids), dtype=TOKEN_DATA)  # reused each step; samplers reorder it
        if self._grammar is not None:
            self._first, single = model.first_bytes()
            self._byte_values = np.flatnonzero(single >= 0)
            self._byte_tokens = single[self._byte_values]
            self._eog = np.zeros(self._n_vocab, dtype=bool)
            self._eog[model.eog_tokens()] = True

    def draw(self, ctx: llama_cpp.llama_context_p, index: int = -1) -> int:
        """The token for the logits of batch token index (-1: the last that has them)."""
        logits = logits_view(llama_cpp.llama_get_logits_ith(ctx, index), self._row)
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
        if token in self._excluded_set:
            logits = logits.copy()  # the context's logits stay as llama.cpp wrote them
            logits[self._excluded] = -np.inf
            token = int(np.argmax(logits))
        return token

    def _constrained(self, logits: np.ndarray) -> int:
        """The choice under the grammar, accepted by the grammar and the filters."""
        assert self._grammar is not None  # draw() calls it only with one
        if self._filters is not None:
            data = self._full(logits)
            n = self._apply(self._filters, data)[1]
            ids, scores = data["id"][:n].copy(), data["logit"][:n].copy()
        else:
            ids, scores = self._ids, logits
        token = self._best_allowed(ids, scores) if self._pick is None else self._draw_allowed(ids, scores, logits)
        if self._filters is not None:
            llama_cpp.llama_sampler_accept(self._filters, token)
        llama_cpp.llama_sampler_accept(self._grammar, token)
        return token

    def _full(self, logits: np.ndarray) -> np.ndarray:
        data = self._all
        data["id"], data["logit"], data["p"] = self._ids, logits, 0.0
        return data

    def _apply(self, sampler: llama_cpp.llama_sampler_p, data: np.ndarray) -> tuple[int, int]:
        """llama_sampler_apply over a TOKEN_DATA array (changed in place):
        the selected index and the candidates left (the first ones)."""
        cur = llama_cpp.llama_token_data_array(data=data.ctypes.data_as(llama_cpp.llama_token_data_p),
                                               size=len(data), selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(cur))
        return int(cur.selected), int(cur.size)

    def _allowed(self, tokens: np.ndarray) -> np.ndarray:
        """Which of tokens the grammar accepts next."""
        data = np.zeros(len(tokens), dtype=TOKEN_DATA)
        data["id"] = tokens
        self._apply(self._grammar, data)
        return data["logit"] != -np.inf

    def _allowed_among(self, ids: np.ndarray) -> np.ndarray:
        """_allowed(ids) for many ids: only tokens whose first byte the
        grammar allows next (as a one-byte token) are checked, and end tokens.
        A byte without a one-byte token is let through."""
        byte_ok = np.ones(256, dtype=bool)
        byte_ok[self._byte_values] = self._allowed(self._byte_tokens)
        first = self._first[ids]
        maybe = np.where(first >= 0, byte_ok[first], False) | self._eog[ids]
        ok = np.zeros(len(ids), dtype=bool)
        if maybe.any():
            ok[maybe] = self._allowed(ids[maybe])
        return ok

    def _best_allowed(self, ids: np.ndarray, scores: np.ndarray) -> int:
        """The best-scoring of ids the grammar allows."""
        best = int(np.argmax(scores))
        if self._allowed(ids[best : best + 1])[0]:
            return int(ids[best])
        for k in GRAMMAR_SHORTLISTS:
            if k >= len(ids):
                break
            top = np.argpartition(-scores, k - 1)[:k]
            top = top[np.lexsort((ids[top], -scores[top]))]
            ok = self._allowed(ids[top])
            if ok.any():
                return int(ids[top[np.argmax(ok)]])
        ok = self._allowed_among(ids)
        if not ok.any():
            raise RuntimeError("the grammar allows no token here (a grammar that cannot continue or end)")
        return int(ids[np.argmax(np.where(ok, scores, -np.inf))])

    def _draw_allowed(self, ids: np.ndarray, scores: np.ndarray, logits: np.ndarray) -> int:
        """A draw among the filtered candidates the grammar allows."""
        cand = np.zeros(len(ids), dtype=TOKEN_DATA)
        cand["id"], cand["logit"] = ids, scores
        token = int(cand["id"][self._apply(self._pick, cand)[0]])
        if self._allowed(np.array([token]))[0]:
            return token
        ok = self._allowed_among(cand["id"])
        if ok.any():
            cand["logit"][~ok] = -np.inf
            return int(cand["id"][self._apply(self._pick, cand)[0]])
        data = self._full(logits)
        ok = self._allowed_among(self._ids)
        if not ok.any():
            raise RuntimeError("the grammar allows no token here (a grammar that cannot continue or end)")
        data["logit"][~ok] = -np.inf
        n = len(data)
        if self._filters is not None:
            n = self._apply(self._filters, data)[1]
        return int(data["id"][self._apply(self._pick, data[:n])[0]])

    def close(self) -> None:
        for name in ("_chain", "_filters", "_pick", "_grammar"):
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


def _chain(s: Sampling, model: Model, *, excluded: np.ndarray, history: Sequence[int],
           pick: bool = True) -> llama_cpp.llama_sampler_p:
    """llama.cpp's sampler chain for s, excluded tokens biased to -inf.
    history: the tokens before the first sampled one (the prompt), which the
    penalties count. pick False: the filters only (no greedy or draw at the end)."""
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
        if pick:
            add(llama_cpp.llama_sampler_init_greedy())
        return chain
    if s.top_k > 0:
        add(llama_cpp.llama_sampler_init_top_k(s.top_k))
    if s.top_p < 1.0:
        add(llama_cpp.llama_sampler_init_top_p(s.top_p, 1))
    if s.min_p > 0.0:
        add(llama_cpp.llama_sampler_init_min_p(s.min_p, 1))
    add(llama_cpp.llama_sampler_init_temp(s.temperature))
    if pick:
        add(llama_cpp.llama_sampler_init_dist(s.seed))
    return chain
