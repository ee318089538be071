"""The two KV budgets of SCOPE: one for the prompt, one for the generated text."""
from __future__ import annotations

from dataclasses import dataclass

from . import memory

# Defaults chosen by measurement (bench/fidelity.py, RESULTS.md "Score
# aggregation"): a 32-token observation window votes better than the paper's 8
# on this model; half the decode budget, at most the paper's 256, stays recent.
OBSERVATION_WINDOW = 32
RECENT_WINDOW = 256

# Budgets from a cell count (Budget.for_cells): a quarter of the cells for the
# generated text, as the paper's 2048 + 512 setting; the smallest budget keeps
# one observation window of prompt and of output.
DECODE_SHARE = 4
MIN_PREFILL = OBSERVATION_WINDOW
MIN_DECODE = OBSERVATION_WINDOW


@dataclass(frozen=True, kw_only=True)
class Budget:
    """Cells the KV cache may hold, split as SCOPE splits them.

    prefill: cells kept from the prompt after prefill (alpha1 + alpha2).
    decode: cells for generated tokens (beta1 + beta2).
    observation_window: last prompt tokens always kept, and whose attention
        scores the rest of the prompt (alpha2). None (default):
        min(32, prefill).
    recent_window: last generated tokens always kept (beta2). None (default):
        min(256, decode // 2).
    Both windows are ints once the Budget exists; explicit values outside
    their range raise ValueError.
    """

    prefill: int
    decode: int
    observation_window: int | None = None
    recent_window: int | None = None

    def __post_init__(self) -> None:
        for name in ("prefill", "decode", "observation_window", "recent_window"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"Budget.{name} must be an int, got {value!r}")
        # decode >= 2: one cell is always the newest token, one must be free for the next
        if self.prefill < 1 or self.decode < 2:
            raise ValueError(
                f"Budget needs prefill >= 1 and decode >= 2 cells, got prefill={self.prefill}, "
                f"decode={self.decode}"
            )
        if self.observation_window is None:
            object.__setattr__(self, "observation_window", min(OBSERVATION_WINDOW, self.prefill))
        if self.recent_window is None:
            object.__setattr__(self, "recent_window", min(RECENT_WINDOW, self.decode // 2))
        if not 1 <= self.observation_window <= self.prefill:
            raise ValueError(
                f"Budget.observation_window must be in [1, prefill={self.prefill}], "
                f"got {self.observation_window}"
            )
        if not 1 <= self.recent_window <= self.decode:
            raise ValueError(
                f"Budget.recent_window must be in [1, decode={self.decode}], got {self.recent_window}"
            )

    @property
    def total(self) -> int:
        """Prefill plus decode cells: the unified budget of the baselines."""
        return self.prefill + self.decode

    @classmethod
    def for_cells(cls, cells: int, *, prefill_chunk: int = memory.PREFILL_CHUNK) -> Budget:
        """The budget whose largest allocation is `cells` KV cells.

        A generation allocates the larger of its decode phase (prefill +
        decode cells) and its chunked prefill's peak (prefill + prefill_chunk
        cells, for prompts longer than prefill + prefill_chunk). Rule: decode
        = the larger of cells // DECODE_SHARE and prefill_chunk (the decode
        phase uses the cells the prefill's peak allocates anyway), prefill =
        cells - decode. ValueError if that leaves less than MIN_PREFILL /
        MIN_DECODE cells."""
        decode = max(cells // DECODE_SHARE, prefill_chunk)
        prefill = cells - decode
        if prefill < MIN_PREFILL or decode < MIN_DECODE:
            raise ValueError(
                f"{cells} KV cells are too few for a budget: the smallest keeps {MIN_PREFILL} prompt cells "
                f"plus the larger of {MIN_DECODE} decode cells and a {prefill_chunk}-token prefill chunk, "
                f"{min_cells(prefill_chunk)} cells once padded to {memory.KV_CELL_PADDING}"
            )
        return cls(prefill=prefill, decode=decode)

    @classmethod
    def for_memory(cls, size: int | str, geometry: memory.KvGeometry, *, type_k: memory.KvType = "f16",
                   type_v: memory.KvType = "f16", prefill_chunk: int = memory.PREFILL_CHUNK) -> Budget:
        """The budget whose allocation fits in `size` ("512MiB", "1.5GiB" or
        bytes) for a model of this geometry (memory.read_geometry) and these
        cache types: the most cells that fit, rounded down to llama.cpp's
        padding of 256, at most the model's trained context (positions stay
        below it, so more cells are never used), split by for_cells()."""
        nbytes = memory.parse_bytes(size)
        per_cell = memory.bytes_per_cell(geometry, type_k, type_v)
        padding = memory.KV_CELL_PADDING
        cells = min(nbytes // per_cell // padding * padding, memory.padded_cells(geometry.n_ctx_train))
        need = min_cells(prefill_chunk)
        if cells < need:
            raise ValueError(
                f"kv_memory={size!r} ({nbytes:,} B) holds {nbytes // per_cell} KV cells of {per_cell:,} B "
                f"({geometry.architecture}: {geometry.n_kv_layers} layers x {geometry.n_head_kv} KV heads, "
                f"K {type_k}, V {type_v}); the smallest budget needs {need} cells = "
                f"{need * per_cell / 2**20:.1f} MiB ({MIN_PREFILL} prompt cells plus the larger of {MIN_DECODE} "
                f"decode cells and a {prefill_chunk}-token prefill chunk, padded to {padding})"
            )
        return cls.for_cells(cells, prefill_chunk=prefill_chunk)


def sized_chunk(budget: Budget) -> int:
    """The prefill chunk of a budget the library sized from cells (the
    default budget, kv_memory) when none is given: half its decode room, at
    most memory.PREFILL_CHUNK. Half, not all of it: earlier chunks then keep
    the other half, and on the ordered suite (docs/ordered.md, 4x the prefill
    budget) the whole room as the chunk kept 12-28% of the full cache's score
    where half kept 107%. Equal to PREFILL_CHUNK from 2,048 cells up."""
    return min(memory.PREFILL_CHUNK, budget.decode // 2)


def min_cells(prefill_chunk: int = memory.PREFILL_CHUNK) -> int:
    """The smallest allocation Budget.for_cells accepts, padded."""
    least = MIN_PREFILL + max(MIN_DECODE, prefill_chunk)
    return memory.padded_cells(max(least, MIN_DECODE * DECODE_SHARE))
