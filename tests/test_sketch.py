"""Key sketches (runtime/sketch.py, issue #18): scores without attention
probabilities, so flash attention and a quantized V cache compose with
eviction. The bases on arrays first, then the hook against llama.cpp's own
exact attention, then the policies' invariants against llama.cpp's mask."""
from __future__ import annotations

import ctypes
import subprocess
import sys

import numpy as np
import pytest

from scope_edge import Budget, ScopeLlama, Sketch
from scope_edge.hook import HookError
from scope_edge.policies import build
from scope_edge.runtime.context import Context
from scope_edge.runtime.model import Model
from scope_edge.runtime.calibrate import basis_for
from scope_edge.runtime.sketch import SketchBasis, pca_basis, qk_basis, random_basis

from test_budgets import check_invariants_every_step
from test_lend import check_lending_every_step

D = 64  # the default model's head dimension
SCALE = 1 / 8


# -- bases on arrays -----------------------------------------------------------

def test_qk_basis_keeps_dot_products_exactly_at_full_rank():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((2, 3, 200, 8)) * np.linspace(0.1, 3, 8)
    queries = rng.standard_normal((2, 3, 100, 8)) * np.linspace(3, 0.1, 8)
    moments = np.einsum("lgni,lgnj->lgij", queries, queries) / 100
    bk, bq = qk_basis(keys, moments, rank=8)
    q, k = queries[1, 2, 5], keys[1, 2, 7]
    assert np.dot(bq[1, 2] @ q, bk[1, 2] @ k) == pytest.approx(np.dot(q, k), rel=1e-4)


def test_qk_basis_beats_key_pca_on_the_queries_it_was_fitted_to():
    """Keys vary most where queries do not look: key PCA keeps the wrong
    directions, the query-aware basis the right ones."""
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((1, 1, 500, 8)) * np.array([5, 5, 5, 5, 1, 1, 1, 1])
    queries = rng.standard_normal((1, 1, 500, 8)) * np.array([0.1, 0.1, 0.1, 0.1, 4, 4, 4, 4])
    moments = np.einsum("lgni,lgnj->lgij", queries, queries) / 500
    exact = queries[0, 0] @ keys[0, 0].T
    bk, bq = qk_basis(keys, moments, rank=4)
    pca = pca_basis(keys, rank=4)
    err_qk = np.abs((queries[0, 0] @ bq[0, 0].T) @ (keys[0, 0] @ bk[0, 0].T).T - exact).mean()
    err_pca = np.abs((queries[0, 0] @ pca[0, 0].T) @ (keys[0, 0] @ pca[0, 0].T).T - exact).mean()
    assert err_qk < 0.5 * err_pca


def test_pca_basis_is_orthonormal_and_random_one_unbiased():
    rng = np.random.default_rng(2)
    pca = pca_basis(rng.standard_normal((2, 3, 50, 8)), rank=4)
    assert pca.shape == (2, 3, 4, 8)
    np.testing.assert_allclose(pca[1, 2] @ pca[1, 2].T, np.eye(4), atol=1e-5)
    rand = random_basis((2, 3, 4, 8), seed=3)
    np.testing.assert_allclose(rand[1, 2] @ rand[1, 2].T, 2 * np.eye(4), atol=1e-5)  # norm^2 = head_dim / rank
    # over many draws the projected dot product averages the true one
    q, k = rng.standard_normal(8), rng.standard_normal(8)
    est = [np.dot(b @ q, b @ k) for b in random_basis((500, 1, 4, 8), seed=4)[:, 0]]
    assert np.mean(est) == pytest.approx(np.dot(q, k), abs=0.15 * np.linalg.norm(q) * np.linalg.norm(k))


@pytest.mark.parametrize("bad", [{"rank": 0}, {"rank": 2.5}, {"basis": "svd"}, {"seed": -1}, {"scores": "l2"}])
def test_sketch_rejects_bad_settings(bad):
    with pytest.raises(ValueError):
        Sketch(**bad)


# -- the hook against llama.cpp's exact attention --------------------------------

@pytest.fixture(scope="module")
def model(model_path):
    with Model(model_path) as m:
        yield m


def _identity(model: Model) -> SketchBasis:
    eye = np.broadcast_to(np.eye(D, dtype=np.float32), (model.n_layer, 3, D, D))
    return SketchBasis(np.ascontiguousarray(eye), SCALE)


def _captures(model: Model, tokens: list[int], **kw) -> tuple:
    """(attention of the last 8 prompt rows, of one decode step) as the context of kw captures them."""
    ctx = Context(model, n_cells=256, n_threads=2, n_threads_batch=2, abort=ctypes.c_bool(False),
                  **{"type_k": "f16", **kw})
    try:
        n = len(tokens)
        with ctx.capturing(n - 8):
            ctx.decode(tokens, list(range(n)), want_logits=False)
        window = ctx.capture()
        with ctx.capturing(n):
            ctx.decode([tokens[0]], [n], want_logits=True)
        return window, ctx.capture()
    finally:
        ctx.close()


def _tokens(model: Model) -> list[int]:
    return model.tokenize("The lighthouse keeper wrote the depth of every channel in his notebook. " * 8)[:120]


def test_full_rank_sketch_is_the_exact_attention(model):
    """An identity basis makes the sketch path compute llama.cpp's own
    softmax(scale q.k) from the queries and the stored keys: it must agree
    with kq_soft_max, captured row for row, in every layer."""
    tokens = _tokens(model)
    exact = _captures(model, tokens)
    sketch = _captures(model, tokens, sketch=_identity(model))
    for e, s in zip(exact, sketch):
        np.testing.assert_array_equal(e.positions, s.positions)
        np.testing.assert_array_equal(e.rows, s.rows)
        np.testing.assert_allclose(s.attn, e.attn, atol=5e-3)
        np.testing.assert_allclose(s.attn.sum(-1), np.broadcast_to(s.rows[:, None], s.attn.shape[:2]).astype(float),
                                   rtol=1e-4)  # each row sums to 1


@pytest.mark.parametrize("type_k", ["f16", "q8_0"])
def test_sketch_reads_flash_attention_queries_and_stored_keys(model, type_k):
    """With flash attention on there is no kq_soft_max, but layer 0 sees the
    same inputs in both graphs: the full-rank sketch there equals the exact
    attention of a flash-attention-off context (q8_0 K is stored rotated;
    the query read from flash attention's operand is rotated alike)."""
    tokens = _tokens(model)
    exact = _captures(model, tokens, type_k=type_k)
    sketch = _captures(model, tokens, type_k=type_k, type_v=type_k, flash_attn=True, sketch=_identity(model))
    for e, s in zip(exact, sketch):
        np.testing.assert_allclose(s.attn[0], e.attn[0], atol=5e-3)
        check_rounding_only(e, s)


def check_rounding_only(exact, sketch) -> None:
    """Deeper layers differ only by flash attention's rounding, compounded
    layer by layer: in every layer and head at most a tenth of a row's
    attention lands on other cells (measured: at most 0.045)."""
    moved = 0.5 * np.abs(sketch.attn - exact.attn).sum(-1) / exact.rows[:, None]
    worst = np.unravel_index(moved.argmax(), moved.shape)
    assert moved.max() < 0.1, f"layer {worst[0]}, head {worst[1]}: {moved.max():.3f} of the attention moved"


def test_exact_capture_under_flash_attention_is_refused(model):
    tokens = _tokens(model)
    with pytest.raises(HookError, match="flash attention never computes"):
        _captures(model, tokens, flash_attn=True)


def test_sketches_are_the_basis_times_the_stored_keys(model):
    """What the hook keeps per cell is exactly the projection of the key
    llama.cpp stores there, also after a shift re-rotated the keys."""
    basis = basis_for(model, Sketch(rank=8, basis="random"), type_k="q8_0", flash_attn=True, n_threads=2)
    ctx = Context(model, n_cells=256, n_threads=2, n_threads_batch=2, type_k="q8_0", type_v="q8_0",
                  flash_attn=True, sketch=basis, abort=ctypes.c_bool(False))
    try:
        tokens = _tokens(model)
        ctx.decode(tokens, list(range(len(tokens))), want_logits=False)
        ctx.shift(0, len(tokens), 1000)
        with ctx.capturing(len(tokens) + 1000):  # the decode applies the shift's rotation first
            ctx.decode([tokens[0]], [len(tokens) + 1000], want_logits=True)
        positions, sketches = ctx.sketches()
        assert len(positions) == len(tokens) + 1 and positions[0] == 1000
        for layer in (0, 17, 29):
            _, keys = ctx.keys(layer)
            want = np.einsum("grd,ngd->gnr", basis.basis[layer], keys.reshape(len(positions), 3, D))
            np.testing.assert_allclose(sketches[layer], want, rtol=1e-3, atol=1e-3)  # kept in half precision
    finally:
        ctx.close()


@pytest.mark.parametrize("scores", ["keydiff", "knorm"])
def test_key_only_scores_are_computed_from_the_sketches(model, scores):
    """A key-only capture scores each held cell from its sketch alone:
    checked against the same formula on the sketches read back."""
    basis = basis_for(model, Sketch(rank=8, basis="pca", scores=scores), type_k="f16", flash_attn=True,
                      n_threads=2)
    ctx = Context(model, n_cells=256, n_threads=2, n_threads_batch=2, type_k="f16", flash_attn=True, sketch=basis,
                  abort=ctypes.c_bool(False))
    try:
        tokens = _tokens(model)
        n = len(tokens)
        ctx.decode(tokens, list(range(n)), want_logits=False)
        with ctx.capturing(n):
            ctx.decode([tokens[0]], [n], want_logits=True)
        cap = ctx.capture()
        _, sk = ctx.sketches()
    finally:
        ctx.close()
    norm = np.linalg.norm(sk, axis=-1)  # [n_layer, n_head_kv, cells]
    if scores == "keydiff":
        mean = sk.mean(axis=2, keepdims=True)
        want = 1 - (sk * mean).sum(-1) / (norm * np.linalg.norm(mean, axis=-1))
    else:
        want = norm.max(axis=2, keepdims=True) - norm
    np.testing.assert_allclose(cap.attn, np.repeat(want, 3, axis=1), rtol=1e-3, atol=1e-4)  # 3 query heads per KV head
    assert (cap.rows == 1).all()


def test_calibration_is_cached_and_reused(model, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = basis_for(model, Sketch(rank=8), type_k="f16", flash_attn=True, n_threads=2)
    assert len(list(tmp_path.rglob("*.npz"))) == 1
    again = basis_for(model, Sketch(rank=8), type_k="f16", flash_attn=True, n_threads=2)
    np.testing.assert_array_equal(first.basis, again.basis)
    np.testing.assert_array_equal(first.basis_q, again.basis_q)
    wider = basis_for(model, Sketch(rank=16), type_k="f16", flash_attn=True, n_threads=2)  # same calibration
    assert wider.basis.shape == (model.n_layer, 3, 16, D) and len(list(tmp_path.rglob("*.npz"))) == 1
    assert first.bytes_per_cell == 2 * model.n_layer * 3 * 8


# -- the policies on sketch scores, against llama.cpp's mask ----------------------

SKETCHED = {"flash_attn": True, "type_k": "q8_0", "type_v": "q8_0", "scoring": Sketch(rank=8)}


@pytest.mark.parametrize("strategy,selector", [("slide", "snapkv"), ("discontinuous", "h2o"), ("h2o", None)])
def test_budget_invariants_every_step_with_sketches(model_path, strategy, selector):
    check_invariants_every_step(model_path, strategy, selector, **SKETCHED)


def test_key_only_scores_keep_the_budget_every_step(model_path):
    check_invariants_every_step(model_path, "slide", "snapkv", flash_attn=True,
                                scoring=Sketch(rank=8, basis="pca", scores="keydiff"))


def test_lending_every_step_with_sketches(model_path):
    check_lending_every_step(model_path, "adaptive", "passed", **SKETCHED)


def test_flash_attention_full_cache_matches_stock(model_path):
    """No policy, flash attention on, q8_0 V: token for token what stock
    llama.cpp generates with the same settings."""
    import llama_cpp

    stock = llama_cpp.Llama(model_path, n_ctx=512, flash_attn=True, type_k=llama_cpp.GGML_TYPE_Q8_0,
                            type_v=llama_cpp.GGML_TYPE_Q8_0, verbose=False)
    try:
        prompt = stock.tokenize(b"Once upon a time, in a quiet harbour town,")
        want = []
        for tok in stock.generate(prompt, temp=0.0, top_k=1):
            want.append(tok)
            if len(want) == 40:
                break
    finally:
        stock.close()
    with ScopeLlama(model_path, budget=None, flash_attn=True, type_k="q8_0", type_v="q8_0") as llm:
        got = llm.generate(prompt, max_tokens=40, ignore_eos=True)
    assert got.tokens == want


def test_streaming_needs_no_scores_under_flash_attention(model_path):
    b = Budget(prefill=64, decode=32, observation_window=8, recent_window=8)
    with ScopeLlama(model_path, budget=b, strategy="streaming", flash_attn=True, type_v="q4_0") as llm:
        out = llm.generate("Tell me about lighthouses. " * 20, max_tokens=60, ignore_eos=True)
        assert len(out.tokens) == 60 and len(llm.kv_positions()) <= b.total


def test_bad_flash_attention_settings_are_refused_with_the_fix(model_path):
    b = Budget(prefill=64, decode=32)
    with pytest.raises(ValueError, match="flash attention never computes.*scoring=Sketch"):
        ScopeLlama(model_path, budget=b, flash_attn=True)
    with pytest.raises(ValueError, match="quantizes the V cache only with flash attention"):
        ScopeLlama(model_path, budget=None, type_v="q8_0")
    with pytest.raises(ValueError, match="scoring must be None"):
        ScopeLlama(model_path, budget=b, scoring="sketch")
    with pytest.raises(ValueError, match="at most the head dimension 64"):
        ScopeLlama(model_path, budget=b, scoring=Sketch(rank=65))
    with ScopeLlama(model_path, budget=None, flash_attn=True) as llm:  # the full cache reads no scores
        with pytest.raises(ValueError, match="flash attention never computes"):
            llm.policy = build(b)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scope_edge.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_generates_with_flash_attention_and_sketches(model_path):
    budget = ["--prefill-budget", "64", "--decode-budget", "16", "--recent-window", "8", "--temperature", "0"]
    prompt = "List ten birds and where they live. " * 6
    gen = _cli("generate", prompt, "--model", model_path, "--max-tokens", "24", "--flash-attn", "--type-k", "q8_0",
               "--type-v", "q8_0", "--sketch-rank", "8", *budget)
    assert gen.returncode == 0, gen.stderr
    with ScopeLlama(model_path, budget=Budget(prefill=64, decode=16, recent_window=8), flash_attn=True,
                    type_k="q8_0", type_v="q8_0", scoring=Sketch(rank=8)) as llm:
        assert gen.stdout == llm.generate(prompt, max_tokens=24).text + "\n"
    refused = _cli("generate", prompt, "--model", model_path, "--max-tokens", "4", "--flash-attn", *budget)
    assert refused.returncode != 0 and "scoring=Sketch" in refused.stderr
