"""A benchmark configuration (BenchConfig: the engine, the policy by name and
budgets, the run) and the scoring and budget names the scripts' flags take."""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..budget import Budget
from ..checks import is_int
from ..policies import DEFAULT_LEND, Policy, build, validate_lend, validate_names
from ..runtime.config import EngineConfig
from ..runtime.sketch import BASES as SKETCH_BASES
from ..runtime.sketch import SCORES as SKETCH_SCORES
from ..runtime.sketch import Sketch


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
                "sketch_scores": sketch.scores if sketch else "attention", "prefill_chunk": e.chunk,
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

