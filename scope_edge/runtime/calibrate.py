"""Learning a key-sketch basis (sketch.py) from the model's own keys and queries.

basis_for() gives the basis a Sketch asks for: a random one at once, or one
calibrated by decoding a fixed text in a context of the setting's K type and
flash attention, cached on disk per model file and setting. Above context.py
(it decodes), while sketch.py stays below it.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
from pathlib import Path

import numpy as np

from .. import memory
from .context import N_BATCH, Context
from .model import Model
from .sketch import Sketch, SketchBasis, pca_basis, qk_basis, random_basis

log = logging.getLogger(__name__)

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


def calibration_data(model: Model, *, type_k: str, flash_attn: bool, n_threads: int,
                     scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The calibration text's keys [n_layer, n_head_kv, n, head_dim] as a
    context of this setting stores them, and the second moment of its
    queries [n_layer, n_head_kv, head_dim, head_dim] (mean of q q^T over the
    KV head's query heads and the last QUERY_ROWS rows). The text is decoded
    at CALIBRATION_OFFSETS starting positions spread over the trained
    context: RoPE turns keys and queries with their position, so the basis
    must see far positions too."""
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
