"""`scope-edge bench`: memory, speed and fidelity of one configuration against
the stock llama.cpp cache, measured in the same run.

    scope-edge bench --prompt-tokens 2048 --max-tokens 4096 --strategy slide \
        --prefill-budget 1024 --decode-budget 512 [--model PATH] [--json]

What is measured (in this order, so the shared machine's load hits all alike):
  stock  llama_cpp.Llama, n_ctx = prompt + max_tokens, same K/V types, flash
         attention off (its default, and ours); prefill with Llama.eval, then
         max_tokens greedy steps with end-of-generation tokens masked out
         (ignore-EOS). Its tokens are the reference output.
  ours   ScopeLlama(budget, strategy).generate(prompt, ignore_eos=True): the
         stats of the run, and its tokens (free-running fidelity).
  ideal  stock llama_cpp.Llama with n_ctx = our allocated cells: the decode
         speed we could reach. It cannot hold the whole run, so it prefills
         n_ctx - ideal_steps tokens and times ideal_steps greedy steps, i.e.
         decoding with the cache filled to our allocation's level, as ours
         is once its budgets are full.
  fidelity  lockstep teacher forcing: the compressed ScopeLlama is fed the
         reference tokens (teacher_force); at every step its next-token
         distribution is compared with the full cache's (top-1 agreement,
         KL(full || compressed) in float64 from log-softmax). The full
         cache's logits are the stock run's, kept (reference="stock": the
         same llama_decode calls as ScopeLlama(budget=None), which
         tests/test_bench.py checks give the same logits), or
         ScopeLlama(budget=None).teacher_force run alongside ("full").
         reference_consistency is how often the full cache's argmax equals
         the reference token (1.0: the lockstep is exactly the full cache's
         greedy run). Free-running: length of the identical prefix of ours
         vs the reference, and ROUGE-L F1 (token LCS) of the two outputs.

The prompt is a deterministic logbook of varied records inside the GGUF's own
chat template (SmolLM2 degenerates without one), cut to exactly prompt_tokens.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import logging
import os
import platform
import random
import re
import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from numba import njit
from tqdm import tqdm

from . import memory, rpc
from .budget import Budget
from .checks import is_int
from .flags import add_engine_args, add_policy_args, budget_of, engine_config
from .llama import ScopeLlama
from .protocol import greedy_masked, logits_row
from .policies import DEFAULT_LEND, Policy, build, validate_lend, validate_names
from .runtime.config import EngineConfig
from .runtime.context import KV_TYPES
from .runtime.sketch import BASES as SKETCH_BASES
from .runtime.sketch import SCORES as SKETCH_SCORES
from .runtime.sketch import Sketch
from .runtime.model import Model

log = logging.getLogger(__name__)

# The system message of every benchmark prompt. It is benchmark content, not
# template: the template comes from the GGUF (Model.render_chat). This text is
# SmolLM2's default system prompt, which the prompts of bench/results carry, so
# the default model's prompts stay token for token what those results measured.
# (llama.cpp's built-in ChatML formatter adds no default system turn.)
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# Where the body's tokens go in the rendered chat: split on, never tokenized.
_BODY_MARK = "<<scope-edge-bench-body>>"


# -- configuration -------------------------------------------------------------
@dataclass(frozen=True)
class BenchConfig:
    """One benchmark configuration: the engine (EngineConfig: model, devices,
    cache types, flash attention, scoring, chunking, ...), the policy by name
    and budgets, and the run. Windows left None take Budget's defaults,
    which fit any budget."""

    prompt_tokens: int = 2048
    prompt_seed: int = 0  # which logbook (logbook_prompt's seed)
    max_tokens: int = 4096
    strategy: str = "slide"
    prefill_selector: str | None = None
    lend: str = DEFAULT_LEND
    prefill_budget: int = 1024
    decode_budget: int = 512
    observation_window: int | None = None  # None: Budget's default
    recent_window: int | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    ideal_steps: int = 256
    fidelity: bool = True
    reference: str = "stock"

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "max_tokens", "prefill_budget", "decode_budget",
                     "observation_window", "recent_window", "ideal_steps"):
            value = getattr(self, name)
            if value is None and name.endswith("_window"):
                continue
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not is_int(self.prompt_seed) or self.prompt_seed < 0:
            raise ValueError(f"prompt_seed must be an int >= 0, got {self.prompt_seed!r}")
        if self.prompt_tokens < 64:
            raise ValueError(f"prompt_tokens must be >= 64 (the chat template and the logbook's instructions "
                             f"take 70 on the default model; chat_prompt checks the real number), got {self.prompt_tokens}")
        if self.decode_budget < 2:
            raise ValueError(f"decode_budget must be >= 2, got {self.decode_budget}")
        if not isinstance(self.engine, EngineConfig):
            raise ValueError(f"engine must be an EngineConfig, got {type(self.engine).__name__}")
        validate_names(self.strategy, self.prefill_selector)
        validate_lend(self.lend)
        if self.reference not in ("stock", "full"):
            raise ValueError(f"reference must be 'stock' (kept stock logits) or 'full' (ScopeLlama(budget=None) "
                             f"teacher-forced alongside), got {self.reference!r}")
        self.engine.check_policy(self.policy())  # raises ValueError with the numbers, or for unscorable policies

    def budget(self) -> Budget:
        return Budget(
            prefill=self.prefill_budget,
            decode=self.decode_budget,
            observation_window=self.observation_window,
            recent_window=self.recent_window,
        )

    def policy(self) -> Policy:
        return build(self.budget(), strategy=self.strategy, prefill_selector=self.prefill_selector, lend=self.lend)

    def model_path(self) -> str:
        return self.engine.path()

    def as_dict(self) -> dict[str, Any]:
        """The configuration as results record it: flat, the engine's fields
        beside the run's (scoring as sketch_rank / sketch_basis / sketch_scores,
        sketch_rank 0 for exact scores; devices as their own fields)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "engine"}
        e = self.engine
        sketch = e.scoring
        return {**fields, "model": e.model_path, "type_k": e.type_k, "type_v": e.type_v, "flash_attn": e.flash_attn,
                "sketch_rank": sketch.rank if sketch else 0, "sketch_basis": sketch.basis if sketch else "qk",
                "sketch_scores": sketch.scores if sketch else "attention", "prefill_chunk": e.prefill_chunk,
                "chunked_prefill": e.chunked_prefill, "position_limit": e.position_limit, "n_threads": e.n_threads,
                "capture_layers": None if e.capture_layers is None else list(e.capture_layers),
                **dataclasses.asdict(e.devices)}


# -- scoring names (bench/fidelity.py --scoring, bench/ordered.py run@scoring) ---------
KEY_ONLY = tuple(s for s in SKETCH_SCORES if s != "attention")


def scoring_engine(scoring: str, base: EngineConfig | None = None) -> EngineConfig:
    """The engine a --scoring name asks for (base's other fields kept):
    "exact", a sketch basis and its rank ("qk16", "pca16", "random16"), or a
    key-only score and its rank on the PCA basis ("keydiff16", "knorm16");
    "+fa": flash attention on."""
    name, _, fa = scoring.partition("+")
    match = re.fullmatch(r"([a-z]+)(\d+)", name)
    kind = match.group(1) if match else name
    if fa not in ("", "fa") or not (name == "exact" or (match and kind in SKETCH_BASES + KEY_ONLY)):
        raise ValueError(f"--scoring takes exact or <kind><rank> with kind in {SKETCH_BASES + KEY_ONLY}, "
                         f"optionally +fa; got {scoring!r}")
    sketch = None
    if match:
        rank = int(match.group(2))
        sketch = Sketch(rank=rank, basis="pca", scores=kind) if kind in KEY_ONLY else Sketch(rank=rank, basis=kind)
    return dataclasses.replace(base or EngineConfig(), flash_attn=fa == "fa", scoring=sketch)


def budget_pairs(values: Sequence[str]) -> list[tuple[int, int]]:
    """Benchmark scripts' --budgets: "prefill:decode" strings as int pairs."""
    pairs = []
    for value in values:
        prefill, sep, decode = value.partition(":")
        if not (sep and prefill.isdigit() and decode.isdigit()):
            raise ValueError(f"--budgets takes prefill:decode pairs of ints (e.g. 192:128), got {value!r}")
        pairs.append((int(prefill), int(decode)))
    return pairs


def scoring_name(config: dict) -> str:
    rank = config.get("sketch_rank", 0)
    scores = config.get("sketch_scores", "attention")
    name = "exact" if not rank else f"{config['sketch_basis'] if scores == 'attention' else scores}{rank}"
    return name + ("+fa" if config.get("flash_attn") else "")


# -- prompt ----------------------------------------------------------------
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


# -- measurements ------------------------------------------------------------
def _stock_logits(llm: llama_cpp.Llama) -> np.ndarray:
    return logits_row(llm.ctx, llm.n_vocab())


def _open_stock(path: str, n_ctx: int, type_k: str, n_gpu_layers: int = 0,
                n_threads: int | None = None) -> llama_cpp.Llama:
    return llama_cpp.Llama(path, n_ctx=n_ctx, type_k=KV_TYPES[type_k], type_v=llama_cpp.GGML_TYPE_F16,
                           flash_attn=False, n_gpu_layers=n_gpu_layers, n_threads=n_threads, verbose=False)


@dataclass
class StockRun:
    """The stock cache's numbers and its greedy tokens."""

    n_ctx: int
    kv_bytes: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    tokens: list[int]
    logits: np.ndarray | None = None  # float32 [steps, n_vocab] when kept


def run_stock(path: str, prompt: list[int], steps: int, type_k: str, *, progress: bool = False,
              label: str = "stock", keep_logits: bool = False, n_ctx: int | None = None,
              n_gpu_layers: int = 0, n_threads: int | None = None) -> StockRun:
    """Prefill `prompt` into a stock Llama of n_ctx = prompt + steps, then
    decode `steps` greedy tokens (EOG masked). Times prefill and decode apart.
    Decode time counts the steps that feed a token (steps - 1), as ours does.
    keep_logits keeps each step's logits (steps x n_vocab float32: 800 MB
    for 4096 steps of a 49K vocabulary), the lockstep's reference. n_ctx:
    allocate more cells than the run uses (memory benchmarks). n_gpu_layers:
    offload to llama.cpp's default devices (RPC servers: rpc.register).
    n_threads: decode threads (None: llama-cpp-python's default, half the
    CPUs)."""
    n_ctx = max(n_ctx or 0, len(prompt) + steps)
    eog = eog_tokens(path)
    llm = _open_stock(path, n_ctx, type_k, n_gpu_layers, n_threads)
    try:
        kept = np.empty((steps, llm.n_vocab()), dtype=np.float32) if keep_logits else None
        t0 = time.perf_counter()
        llm.eval(prompt)
        prefill_s = time.perf_counter() - t0
        tokens: list[int] = []
        t0 = time.perf_counter()
        for step in tqdm(range(steps), desc=label, disable=not progress, leave=False):
            if step:
                llm.eval([tokens[-1]])
            logits = _stock_logits(llm)
            if kept is not None:
                kept[step] = logits
            tokens.append(greedy_masked(logits, eog))  # after the copy into kept: masking in place is safe
        decode_s = time.perf_counter() - t0
        geometry = memory.read_geometry(path)
        return StockRun(
            n_ctx=llm.n_ctx(),
            kv_bytes=memory.kv_bytes(geometry, llm.n_ctx(), type_k, "f16"),
            prefill_tokens_per_s=len(prompt) / max(prefill_s, 1e-9),
            decode_tokens_per_s=(steps - 1) / max(decode_s, 1e-9) if steps > 1 else 0.0,
            tokens=tokens,
            logits=kept,
        )
    finally:
        llm.close()


def stock_steps(path: str, n_ctx: int, filler: Sequence[int], type_k: str = "f16", *, n_gpu_layers: int = 0,
                n_threads: int | None = None) -> Iterator[int]:
    """Stock llama_cpp.Llama of n_ctx cells with `filler` prefilled. The
    first next() returns the greedy token after the prefill (EOG masked);
    each later next() decodes the previous token and returns the next: one
    decode step, what stock pays for it in Python included. An interleaved
    comparison times these step by step against ours in the same process,
    so both sides run under the same load. Close the generator to free the
    context."""
    eog = eog_tokens(path)
    llm = _open_stock(path, n_ctx, type_k, n_gpu_layers, n_threads)
    try:
        llm.eval(list(filler))
        token = greedy_masked(_stock_logits(llm), eog)
        while True:
            yield token
            llm.eval([token])
            token = greedy_masked(_stock_logits(llm), eog)
    finally:
        llm.close()


def run_ideal(path: str, n_ctx: int, filler: Sequence[int], steps: int, type_k: str,
              n_gpu_layers: int = 0) -> dict[str, float | int]:
    """Stock decoding in a context of n_ctx cells filled to n_ctx - steps
    before `steps` timed greedy steps: the speed our allocation allows."""
    steps = max(1, min(steps, n_ctx // 2))
    n_prefill = n_ctx - steps
    filler = list(filler)
    while len(filler) < n_prefill:
        filler = filler + filler
    run = run_stock(path, filler[:n_prefill], steps, type_k, n_gpu_layers=n_gpu_layers)
    return {"n_ctx": run.n_ctx, "prefilled": n_prefill, "steps": steps,
            "prefill_tokens_per_s": run.prefill_tokens_per_s, "decode_tokens_per_s": run.decode_tokens_per_s}


def open_ours(cfg: BenchConfig, path: str, *, full: bool = False) -> ScopeLlama:
    """Ours under cfg, or (full) the full cache as stock runs it: K type and devices only."""
    if full:
        engine = EngineConfig(model_path=path, type_k=cfg.engine.type_k, devices=cfg.engine.devices)
        return ScopeLlama(config=engine, budget=None)
    return ScopeLlama(config=dataclasses.replace(cfg.engine, model_path=path), policy=cfg.policy())


def run_ours(cfg: BenchConfig, path: str, prompt: list[int], *, progress: bool = False) -> tuple[dict, list[int]]:
    """Our generation of max_tokens (ignore-EOS): its stats and tokens."""
    tokens: list[int] = []
    stats = None
    with open_ours(cfg, path) as llm:
        bar = tqdm(total=cfg.max_tokens, desc=f"ours {cfg.strategy}", disable=not progress, leave=False)
        for chunk in llm.stream(prompt, max_tokens=cfg.max_tokens, ignore_eos=True):
            if chunk.token is not None:
                tokens.append(chunk.token)
            bar.update(1)
            stats = chunk.stats
        bar.close()
    assert stats is not None
    return stats.as_dict(), tokens


# -- fidelity --------------------------------------------------------------------
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


# -- the whole run ---------------------------------------------------------------
def machine() -> dict[str, str | int | float]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count() or 1, "python": platform.python_version(),
            "llama_cpp_python": llama_cpp.__version__, "loadavg_1m": os.getloadavg()[0]}


def _check_shared(cfgs: Sequence[BenchConfig]) -> None:
    keys = {(c.prompt_tokens, c.prompt_seed, c.max_tokens, c.engine.type_k, c.engine.model_path, c.engine.devices)
            for c in cfgs}
    if len(keys) != 1:
        raise ValueError(f"run_many needs one prompt_tokens/prompt_seed/max_tokens/type_k/model/devices for all configs, "
                         f"got {sorted(map(str, keys))}")


def run_many(cfgs: Sequence[BenchConfig], *, progress: bool = True) -> list[dict]:
    """run_bench for configs that differ only in strategy/budgets: the stock
    run and the full-cache reference are measured once and shared; all
    compressed caches are teacher-forced in one lockstep pass."""
    if not cfgs:
        raise ValueError("run_many needs at least one BenchConfig")
    _check_shared(cfgs)
    c0 = cfgs[0]
    path = c0.model_path()
    prompt = logbook_prompt(path, c0.prompt_tokens, c0.prompt_seed)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    want = [i for i, c in enumerate(cfgs) if c.fidelity]
    keep_logits = bool(want) and c0.reference == "stock"
    devices = c0.engine.devices
    for endpoint in devices.rpc_servers:  # stock offloads to llama.cpp's registered devices
        rpc.register(endpoint)
    type_k, n_gpu_layers = c0.engine.type_k, devices.n_gpu_layers
    stock = run_stock(path, prompt, c0.max_tokens, type_k, progress=progress, keep_logits=keep_logits,
                      n_gpu_layers=n_gpu_layers)
    log.info("stock: prefill %.0f tok/s, decode %.1f tok/s", stock.prefill_tokens_per_s, stock.decode_tokens_per_s)
    ours = [run_ours(cfg, path, prompt, progress=progress) for cfg in cfgs]
    ideals: dict[int, dict] = {}
    for cfg, (stats, _) in zip(cfgs, ours):
        cells = int(stats["kv_cells_allocated"])
        if cells not in ideals:
            ideals[cells] = run_ideal(path, cells, prompt + stock.tokens, cfg.ideal_steps, type_k, n_gpu_layers)
    fids: list[dict | None] = [None] * len(cfgs)
    if want:
        full = None if keep_logits else open_ours(c0, path, full=True)
        comps = [open_ours(cfgs[i], path) for i in want]
        eog = np.array(comps[0].model.eog_tokens(), dtype=np.int64)
        reference = stock.logits if full is None else full.teacher_force(prompt, stock.tokens)
        try:
            res, consistency = lockstep(reference, comps, prompt, stock.tokens, eog, progress=progress)
        finally:
            for llm in [*comps, *([full] if full else [])]:
                llm.close()
        stock.logits = None
        for i, fid in zip(want, res):
            fids[i] = {**fid.as_dict(), "reference_consistency": consistency,
                       **free_running(stock.tokens, ours[i][1])}
    return [_report(cfg, stock, stats, ideals[int(stats["kv_cells_allocated"])], fid, started)
            for cfg, (stats, _), fid in zip(cfgs, ours, fids)]


def _report(cfg: BenchConfig, stock: StockRun, stats: dict, ideal: dict, fid: dict | None, started: str) -> dict:
    stock_d = {k: v for k, v in dataclasses.asdict(stock).items() if k != "tokens"}
    ours_d = {"kv_bytes": stats["kv_bytes_allocated"], "kv_cells": stats["kv_cells_allocated"], **stats}
    return {
        "config": cfg.as_dict(),
        "stock": stock_d,
        "ours": ours_d,
        "ideal": ideal,
        "ratios": {
            "kv_bytes": ours_d["kv_bytes"] / stock.kv_bytes,
            "decode_speedup": ours_d["decode_tokens_per_s"] / max(stock.decode_tokens_per_s, 1e-9),
            "prefill_speedup": ours_d["prefill_tokens_per_s"] / max(stock.prefill_tokens_per_s, 1e-9),
            "decode_vs_ideal": ours_d["decode_tokens_per_s"] / max(ideal["decode_tokens_per_s"], 1e-9),
        },
        "fidelity": fid,
        "date": started,
        "machine": machine(),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def run_bench(cfg: BenchConfig, *, progress: bool = True) -> dict:
    """Stock, ours, ideal and fidelity for one configuration: a JSON-able dict."""
    return run_many([cfg], progress=progress)[0]


def peak_rss_bytes() -> int:
    """This process's peak resident set (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def save_results(out: str | os.PathLike[str] | None, data: Any, *, print_json: bool = False,
                 table: Callable[[Any], str] | None = None) -> Path | None:
    """The benchmark scripts' ending: write data to out as indented JSON (its
    folder created; None: no file), then print it as one JSON line
    (print_json: the last line of stdout, for scripts that parse it) or else
    as table(data), if given. Returns the path written."""
    path = None
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1))
    if print_json:
        print(json.dumps(data))
    elif table is not None:
        print(table(data))
    return path


# -- CLI -----------------------------------------------------------------------
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `bench` on the scope-edge command's subparsers (what
    ArgumentParser.add_subparsers() returned)."""
    p = subparsers.add_parser("bench", help="memory, speed and fidelity against the stock llama.cpp cache",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=main)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="generated tokens (EOS ignored)")
    add_engine_args(p)
    add_policy_args(p, full_cache=False, defaults=f" (default {d.prefill_budget}; decode {d.decode_budget}; "
                                                  f"strategy {d.strategy}, lend {d.lend})")
    p.add_argument("--ideal-steps", type=int, default=d.ideal_steps, help="timed decode steps of the ideal run")
    p.add_argument("--no-fidelity", action="store_true", help="skip the lockstep fidelity pass")
    p.add_argument("--reference", default="stock", choices=["stock", "full"],
                   help="full-cache logits for the lockstep: kept from the stock run (fast, steps x vocab "
                        "floats of RAM) or ScopeLlama(budget=None) teacher-forced alongside (slow, no RAM)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    d = BenchConfig()
    engine = engine_config(args)
    if args.kv_memory is not None:
        if args.prefill_budget is not None or args.decode_budget is not None:
            raise ValueError("give either --kv-memory or --prefill-budget/--decode-budget, not both")
        geometry = memory.read_geometry(engine.path())
        budget = Budget.for_memory(args.kv_memory, geometry, type_k=engine.type_k, type_v=engine.type_v,
                                   prefill_chunk=engine.prefill_chunk)
    else:
        budget = budget_of(args, prefill=d.prefill_budget, decode=d.decode_budget)
    return BenchConfig(
        prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, strategy=args.strategy or d.strategy,
        prefill_selector=args.selector, lend=args.lend or d.lend, prefill_budget=budget.prefill,
        decode_budget=budget.decode, observation_window=args.observation_window, recent_window=args.recent_window,
        engine=engine, ideal_steps=args.ideal_steps, fidelity=not args.no_fidelity, reference=args.reference,
    )


def format_table(res: dict) -> str:
    s, o, i, r, f = res["stock"], res["ours"], res["ideal"], res["ratios"], res["fidelity"]
    c = res["config"]
    mib = 2**20
    lines = [
        f"scope-edge bench: prompt {c['prompt_tokens']} + {c['max_tokens']} generated, strategy {c['strategy']} (lend {c['lend']}), "
        f"budgets {c['prefill_budget']}/{c['decode_budget']}, K {c['type_k']}, V {c['type_v']}"
        f"{', flash attention' if c['flash_attn'] else ''}{', ' + scoring_name(c) if c['sketch_rank'] else ''}",
        f"{'':8} {'KV MiB':>8} {'cells':>6} {'prefill tok/s':>14} {'decode tok/s':>13}",
        f"{'stock':8} {s['kv_bytes'] / mib:8.1f} {s['n_ctx']:6d} {s['prefill_tokens_per_s']:14.1f} {s['decode_tokens_per_s']:13.1f}",
        f"{'ours':8} {o['kv_bytes'] / mib:8.1f} {o['kv_cells']:6d} {o['prefill_tokens_per_s']:14.1f} {o['decode_tokens_per_s']:13.1f}",
        f"{'ideal':8} {'':8} {i['n_ctx']:6d} {'':14} {i['decode_tokens_per_s']:13.1f}",
        f"ours/stock: KV {r['kv_bytes']:.1%}, decode x{r['decode_speedup']:.2f}, prefill x{r['prefill_speedup']:.2f}; "
        f"ours/ideal decode {r['decode_vs_ideal']:.1%}",
    ]
    if f:
        lines.append(
            f"fidelity over {f['steps']} steps: top-1 {f['top1_agreement']:.1%}, KL mean {f['mean_kl']:.4f} "
            f"max {f['max_kl']:.3f}; free-running identical prefix {f['identical_prefix']}, "
            f"ROUGE-L {f['rouge_l']:.3f} (reference consistency {f['reference_consistency']:.1%})"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    res = run_bench(cfg, progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps(res))
    else:
        print(format_table(res))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m scope_edge.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        sys.exit(main(parser.parse_args()))
    except ValueError as e:
        print(f"scope-edge bench: error: {e}", file=sys.stderr)
        sys.exit(2)
