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
Calibrated bases are cached on disk (calibrate.py learns them; this module
holds the settings and the linear algebra, and imports no llama.cpp).

Key-only scores need no query at all: "keydiff" scores a cell by how far its
sketch points from the mean of the cells held (KeyDiff, Park et al. 2025),
"knorm" by how small its norm is (Devoto et al. 2024).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..checks import require_int

BASES = ("qk", "pca", "random")
SCORES = ("attention", "keydiff", "knorm")



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
