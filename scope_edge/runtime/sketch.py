"""Key sketches: score cells without attention probabilities (flash attention on).

With flash attention the attention probabilities are never materialised, so
the hook cannot read them. Instead it keeps, for every held cell, each KV
head's key projected on a small basis (the sketch), and on a selection step
approximates each captured query's attention from the query's projection and
the sketches: softmax(scale * (B q) . (B k)). The policies get these scores in
place of the exact ones and run unchanged.

The basis per layer and KV head is learned from the model's own keys and
queries on a calibration text, as the cache stores them:
  "qk": the rank-r projection that best keeps q . k over the calibration's
        queries (PCA of the keys in the metric of the queries' second moment;
        the query gets its own matching projection);
  "pca": the keys' top principal directions (the low-rank keys of Loki,
        Singhania et al. 2024), used for queries too;
  "random": a random projection scaled so that its dot products are
        unbiased estimates of q . k; no calibration.
Calibrated bases are cached on disk.

Key-only scores need no query at all: "keydiff" scores a cell by how far its
sketch points from the mean of the cells held (KeyDiff, Park et al. 2025),
"knorm" by how small its norm is (Devoto et al. 2024).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import memory
from ..policies.checks import require_int
from .model import Model

log = logging.getLogger(__name__)

BASES = ("qk", "pca", "random")
SCORES = ("attention", "keydiff", "knorm")

CALIBRATION_TEXT = """\
The harbour town woke slowly. Fishing boats came in with the tide, and the market stalls opened one \
by one: bread, oranges, nets, rope, and a man who sold nothing but brass bells. Mara walked past them \
with her list. She needed twelve candles, a spool of blue thread, three pounds of flour and a map of \
the northern coast, which nobody in the town seemed to have.
"A map?" said the baker. "Ask the lighthouse keeper. He draws them himself, though he charges too much."
The lighthouse stood at the end of a long stone pier. Its keeper, an old man called Ennis, kept \
notebooks full of soundings: depths in fathoms, the bearing of every rock, the hour of each tide for \
the past forty years. He agreed to copy a map for her in exchange for help painting the lamp room.
Inventory of the lamp room, checked on the first of the month:
- paint, white: 14 tins
- brushes, wide: 6
- wicks, spare: 120
- oil, lamp grade: 38 litres
- glass panes: 9 (two cracked)
- logbooks: 52
Question 1: If the lamp burns 1.5 litres of oil a night, how many nights do 38 litres last? Answer: 25 \
nights, with half a litre left over.
Question 2: How many panes are whole? Answer: 7.
In the evening they worked by lantern light. Ennis talked about storms: the winter of the long ice, \
when the bay froze from shore to shore; the night a cargo ship lost its rudder and drifted onto the \
shoal; the summer the light failed for an hour because a gull had nested in the vent. Mara listened \
and painted, and wrote down the names of rocks and channels as he said them.
def tide_height(hour, amplitude=2.4, period=12.42):
    return amplitude * math.cos(2 * math.pi * hour / period)
By the end of the week the lamp room was white again and the map was finished: forty-one named \
rocks, the safe channel marked in red, the depths in small neat figures. She thanked him, packed the \
map between two boards, and set out along the coast road at dawn, north, towards the cliffs.
Dear Ennis, the map was right about everything except the second ford, which the spring floods have \
moved about a hundred yards upstream. I have marked it in pencil. The weather has been kind. Yours, Mara.
"""
CALIBRATION_OFFSETS = 4  # the text is decoded at this many offsets spread over the trained context
QUERY_ROWS = 128  # the last rows of each decode whose queries are tracked


@dataclass(frozen=True, kw_only=True)
class Sketch:
    """Score cells from key sketches instead of attention probabilities.

    rank: directions kept per layer and KV head, in [1, head_dim]; the
        sketches take n_layer * n_head_kv * rank half floats per cell.
    basis: "qk", "pca" or "random" (module docstring).
    scores: "attention" (each captured query's approximate attention), or
        the key-only "keydiff" or "knorm" (module docstring).
    seed: the random basis' seed.
    """

    rank: int = 16
    basis: str = "qk"
    scores: str = "attention"
    seed: int = 0

    def __post_init__(self) -> None:
        require_int("Sketch", "rank", self.rank, lo=1)
        if self.basis not in BASES:
            raise ValueError(f"Sketch.basis must be one of {BASES}, got {self.basis!r}")
        if self.scores not in SCORES:
            raise ValueError(f"Sketch.scores must be one of {SCORES}, got {self.scores!r}")
        require_int("Sketch", "seed", self.seed, lo=0)


@dataclass(frozen=True, eq=False)
class SketchBasis:
    """Bases ready for the hook: float32 [n_layer, n_head_kv, rank, head_dim]
    for keys and for queries (None: the keys'), the attention's softmax
    scale, and what a capture scores (Sketch.scores)."""

    basis: np.ndarray
    scale: float
    basis_q: np.ndarray | None = None
    scores: str = "attention"

    @property
    def rank(self) -> int:
        return int(self.basis.shape[2])

    @property
    def bytes_per_cell(self) -> int:
        """Host memory the hook's sketches take per cell (half precision)."""
        n_layer, n_head_kv, rank, _ = self.basis.shape
        return 2 * n_layer * n_head_kv * rank


def basis_for(model: Model, sketch: Sketch, *, type_k: str, flash_attn: bool, n_threads: int) -> SketchBasis:
    """The basis `sketch` asks for, for contexts of this model with this K
    type and flash attention setting (quantized K is stored rotated, so a
    calibrated basis is per setting)."""
    geometry = memory.read_geometry(model.path)
    if sketch.rank > geometry.head_dim_k:
        raise ValueError(f"Sketch.rank must be at most the head dimension {geometry.head_dim_k}, got {sketch.rank}")
    scale = 1.0 / math.sqrt(geometry.head_dim_k)
    shape = (geometry.n_layer, geometry.n_head_kv, sketch.rank, geometry.head_dim_k)
    if sketch.basis == "random":
        return SketchBasis(random_basis(shape, seed=sketch.seed), scale, scores=sketch.scores)
    path = _cache_path(model.path, type_k=type_k, flash_attn=flash_attn)
    if path.exists():
        with np.load(path) as f:
            keys, moments = f["keys"], f["moments"]
    else:
        keys, moments = calibration_data(model, type_k=type_k, flash_attn=flash_attn, n_threads=n_threads,
                                         scale=scale)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, keys=keys, moments=moments)
        except OSError as exc:  # a read-only home: calibrate again next time
            log.warning("could not cache the sketch calibration at %s: %s", path, exc)
    if sketch.basis == "pca":
        return SketchBasis(pca_basis(keys, sketch.rank), scale, scores=sketch.scores)
    bk, bq = qk_basis(keys, moments, sketch.rank)
    return SketchBasis(bk, scale, bq, scores=sketch.scores)


def random_basis(shape: tuple[int, int, int, int], *, seed: int) -> np.ndarray:
    """A random projection [n_layer, n_head_kv, rank, head_dim] from a seeded
    Gaussian: orthogonal rows of norm sqrt(head_dim / rank), so the projected
    dot product is an unbiased estimate of q . k (Johnson-Lindenstrauss).
    Measured: without that scaling (logits shrunk by rank / head_dim) slide
    lost 1.2 points of top-1 at 320:192."""
    n_layer, n_head_kv, rank, head_dim = shape
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n_layer, n_head_kv, head_dim, rank)))
    return np.ascontiguousarray(np.swapaxes(q, 2, 3) * np.sqrt(head_dim / rank), dtype=np.float32)


def pca_basis(keys: np.ndarray, rank: int) -> np.ndarray:
    """Top `rank` principal directions of keys [n_layer, n_head_kv, n,
    head_dim], as [n_layer, n_head_kv, rank, head_dim]. Centred: a query's
    dot product with the keys' mean is the same for every cell, so it cancels
    in the softmax; what the basis must keep is how keys differ."""
    centred = keys.astype(np.float64) - keys.mean(axis=2, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return np.ascontiguousarray(vt[:, :, :rank, :], dtype=np.float32)


def qk_basis(keys: np.ndarray, moments: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Key and query projections [n_layer, n_head_kv, rank, head_dim] whose
    sketches' dot product best keeps q . k: with the queries' second moment
    S = L L^T, the error E[(q . (k - k_r))^2] is the keys' residual in the
    metric S, so take the PCA of L^T k and map back: Bk = U^T L^T, Bq = U^T L^-1
    (then Bq q . Bk k = q^T L^-T U U^T L^T k, which is q . k at full rank)."""
    d = keys.shape[-1]
    ridge = 1e-6 * np.trace(moments, axis1=2, axis2=3)[..., None, None] / d
    chol = np.linalg.cholesky(moments + ridge * np.eye(d))  # [n_layer, n_head_kv, d, d], lower
    centred = keys.astype(np.float64) - keys.mean(axis=2, keepdims=True)
    _, _, vt = np.linalg.svd(centred @ chol, full_matrices=False)  # rows of (L^T k)^T = k^T L
    u_t = vt[:, :, :rank, :]
    bk = u_t @ np.swapaxes(chol, 2, 3)
    bq = u_t @ np.linalg.inv(chol)
    return np.ascontiguousarray(bk, dtype=np.float32), np.ascontiguousarray(bq, dtype=np.float32)


def calibration_data(model: Model, *, type_k: str, flash_attn: bool, n_threads: int,
                     scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The calibration text's keys [n_layer, n_head_kv, n, head_dim] as a
    context of this setting stores them, and the second moment of its
    queries [n_layer, n_head_kv, head_dim, head_dim] (mean of q q^T over the
    KV head's query heads and the last QUERY_ROWS rows). The text is decoded
    at CALIBRATION_OFFSETS starting positions spread over the trained
    context: RoPE turns keys and queries with their position, so the basis
    must see far positions too."""
    from .context import N_BATCH, Context  # context.py imports this module

    geometry = memory.read_geometry(model.path)
    n_head_kv, d = geometry.n_head_kv, geometry.head_dim_k
    tokens = model.tokenize(CALIBRATION_TEXT)[:N_BATCH]
    n = len(tokens)
    span = max(model.n_ctx_train - n, 0)
    offsets = [span * i // CALIBRATION_OFFSETS for i in range(CALIBRATION_OFFSETS)]
    log.info("calibrating key sketches on %d tokens at offsets %s", n, offsets)
    identity = np.broadcast_to(np.eye(d, dtype=np.float32), (model.n_layer, n_head_kv, d, d))
    ctx = Context(model, n_cells=max(n, 256), n_threads=n_threads, n_threads_batch=n_threads, type_k=type_k,
                  type_v="f16", flash_attn=flash_attn, abort=ctypes.c_bool(False),
                  sketch=SketchBasis(np.ascontiguousarray(identity), scale))
    keys = []
    try:
        ctx.track_queries(True)
        for offset in offsets:
            ctx.clear()
            with ctx.capturing(offset + n - QUERY_ROWS):
                ctx.decode(tokens, list(range(offset, offset + n)), want_logits=False)
            keys.append(np.stack([ctx.keys(il)[1] for il in range(model.n_layer)]))
        moments, counts = ctx.query_moments()
    finally:
        ctx.close()
    k = np.concatenate(keys, axis=1)  # [n_layer, cells, n_head_kv * d]
    k = k.reshape(model.n_layer, k.shape[1], n_head_kv, d).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(k), moments / np.maximum(counts, 1)[..., None, None]


def _cache_path(model_path: str, *, type_k: str, flash_attn: bool) -> Path:
    """Where the calibration data of this model file and setting is kept."""
    stat = os.stat(model_path)
    key = (f"{os.path.abspath(model_path)}|{stat.st_size}|{stat.st_mtime_ns}|{CALIBRATION_TEXT}|"
           f"{CALIBRATION_OFFSETS}|{QUERY_ROWS}")
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scope-edge" / "sketch"
    return root / f"{digest}-{type_k}-fa{int(flash_attn)}.npz"
