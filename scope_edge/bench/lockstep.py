"""The fidelity lockstep: the compressed caches teacher-forced on a reference
run and compared with the full cache's next-token distributions step by step
(top-1 agreement, KL(full || compressed) in float64), and the free-running
scores (identical prefix, ROUGE-L over token ids).

stock_reference is stock's second path, apart from the one timed stock loop
(scope_edge.protocol.StockSteps): it keeps every step's logits, which the
lockstep reads, and is never timed (a logits buffer of steps x vocabulary
floats would slow the loop it sits in).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from numba import njit
from tqdm import tqdm

from .. import memory
from ..llama import ScopeLlama
from ..protocol import Cache, Threads, decode_tokens, greedy_masked, logits_row, prefill, stock_llama
from .prompts import eog_tokens


@dataclass
class Reference:
    """Stock's greedy tokens (EOG masked) and the logits of every step
    (float32 [steps, n_vocab]), and the cells and KV bytes it allocated."""

    n_ctx: int
    kv_bytes: int
    tokens: list[int]
    logits: np.ndarray


def stock_reference(path: str, prompt: Sequence[int], steps: int, type_k: str = "f16", *, n_threads: int | None = None,
                    n_gpu_layers: int = 0) -> Reference:
    """Stock (n_ctx = prompt + steps, K type_k, V f16) decoding `steps`
    greedy tokens after prompt, keeping each step's logits: the lockstep's
    full-cache reference. Untimed: speed comes from protocol.stock_greedy.
    Memory: steps x n_vocab float32 (800 MB for 4096 steps of a 49K vocabulary)."""
    eog = eog_tokens(path)
    cache = Cache(type_k=type_k)
    llm = stock_llama(path, len(prompt) + steps, cache=cache, threads=Threads(decode=n_threads),
                      n_gpu_layers=n_gpu_layers)
    try:
        n_vocab = llm.n_vocab()
        kept = np.empty((steps, n_vocab), dtype=np.float32)
        prefill(llm, prompt)
        tokens: list[int] = []
        for step in range(steps):
            if step:
                decode_tokens(llm.ctx, tokens[-1:])
            row = logits_row(llm.ctx, n_vocab)
            kept[step] = row
            tokens.append(greedy_masked(row, eog))  # masks llama.cpp's row, after the copy into kept
        cells = llm.n_ctx()
    finally:
        llm.close()
    kv = memory.kv_bytes(memory.read_geometry(path), cells, cache.type_k, cache.type_v)
    return Reference(n_ctx=cells, kv_bytes=kv, tokens=tokens, logits=kept)


@dataclass
class Fidelity:
    """Running lockstep statistics of one compressed cache against the full one."""

    steps: int = 0
    top1_agree: int = 0
    kl_sum: float = 0.0
    kl_max: float = 0.0
    first_disagreement: int = -1

    def add(self, full_logp: np.ndarray, comp_logits: np.ndarray) -> None:
        comp_logp = log_softmax(comp_logits)
        kl = float(np.sum(np.exp(full_logp) * (full_logp - comp_logp)))
        kl = max(kl, 0.0)  # exact KL is >= 0; float64 rounding can give -1e-17
        agree = int(np.argmax(full_logp)) == int(np.argmax(comp_logp))
        if not agree and self.first_disagreement < 0:
            self.first_disagreement = self.steps
        self.steps += 1
        self.top1_agree += agree
        self.kl_sum += kl
        self.kl_max = max(self.kl_max, kl)

    def as_dict(self) -> dict[str, float | int]:
        n = max(self.steps, 1)
        return {"steps": self.steps, "top1_agreement": self.top1_agree / n, "mean_kl": self.kl_sum / n,
                "max_kl": self.kl_max, "first_disagreement": self.first_disagreement}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def lockstep(full_logits_steps: Iterable[np.ndarray], compressed: Sequence[ScopeLlama], prompt: list[int],
             reference: list[int], eog: np.ndarray, *, progress: bool = False) -> tuple[list[Fidelity], float]:
    """Teacher-force `reference` after `prompt` through every compressed
    cache at once and compare each step's distribution with the full cache's
    (full_logits_steps: the stock run's kept logits, or
    ScopeLlama(budget=None).teacher_force(prompt, reference)).
    Returns one Fidelity per compressed cache and reference_consistency (how
    often the full cache's argmax, EOG masked, is the reference token)."""
    streams: list[Iterator[np.ndarray]] = [llm.teacher_force(prompt, reference) for llm in compressed]
    results = [Fidelity() for _ in compressed]
    consistent = 0
    bar = tqdm(total=len(reference), desc="fidelity", disable=not progress, leave=False)
    for step, full_logits in enumerate(full_logits_steps):
        consistent += greedy_masked(full_logits.copy(), eog) == reference[step]  # full_logits is read again below
        full_logp = log_softmax(full_logits)
        for fid, stream in zip(results, streams):
            fid.add(full_logp, next(stream))
        bar.update(1)
    bar.close()
    for stream in streams:
        for _ in stream:  # finish each generator so its ScopeLlama is free again
            pass
    return results, consistent / max(len(reference), 1)


@njit(cache=True)
def _lcs_length(a: np.ndarray, b: np.ndarray) -> int:
    prev = np.zeros(b.shape[0] + 1, dtype=np.int32)
    cur = np.zeros(b.shape[0] + 1, dtype=np.int32)
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            if a[i] == b[j]:
                cur[j + 1] = prev[j] + 1
            else:
                cur[j + 1] = max(prev[j + 1], cur[j])
        prev, cur = cur, prev
    return int(prev[b.shape[0]])


def free_running(reference: Sequence[int], ours: Sequence[int]) -> dict[str, float | int]:
    """identical_prefix: tokens until the first difference; rouge_l: F1 of
    the longest common token subsequence (ROUGE-L over token ids)."""
    prefix = 0
    for a, b in zip(reference, ours):
        if a != b:
            break
        prefix += 1
    lcs = _lcs_length(np.asarray(reference, dtype=np.int64), np.asarray(ours, dtype=np.int64))
    p = lcs / max(len(ours), 1)
    r = lcs / max(len(reference), 1)
    return {"identical_prefix": prefix, "rouge_l": 2 * p * r / (p + r) if lcs else 0.0}

