/* scope_hook: key sketches. Each held cell's key is projected, per layer
 * and KV head, on a low-rank basis and kept in half precision; a captured
 * query row then scores the cells it sees from those sketches (approximate
 * attention, or a key-only score), which works with flash attention on. The
 * fp16 kernels pick F16C / AVX2 at run time. Also: query moments for
 * calibration, and reading stored keys.
 * One concept: the sketch store and the scoring that reads it share one layout
 * (layer x head x cell x rank, fp16), and the SIMD kernels are that layout's
 * inner loops; split apart, each half would re-state the layout. */
#include "scope_hook_impl.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Half to float: sketches are read once per held cell per query head on every
 * scored step. The extension is built for baseline x86-64 (and other CPUs),
 * so the conversion is a table, or F16C where the CPU has it (chosen at run
 * time). Filled on the first scope_hook_sketch_set (same values on every
 * fill, so a race is benign). */
static float fp16_table[1 << 16];
static bool fp16_ready;

/* y[0..n) += a * x[0..n), x in half precision. */
static void axpy_f16_table(float * y, float a, const ggml_fp16_t * x, int32_t n) {
    for (int32_t c = 0; c < n; c++) {
        y[c] += a * fp16_table[x[c]];
    }
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
/* The same with F16C conversion and FMA, 8 cells at a time (chosen at run time). */
__attribute__((target("avx2,fma,f16c")))
static void axpy_f16_avx2(float * y, float a, const ggml_fp16_t * x, int32_t n) {
    const __m256 va = _mm256_set1_ps(a);
    int32_t c = 0;
    for (; c + 8 <= n; c += 8) {
        const __m256 vx = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (x + c)));
        _mm256_storeu_ps(y + c, _mm256_fmadd_ps(va, vx, _mm256_loadu_ps(y + c)));
    }
    for (; c < n; c++) {
        y[c] += a * fp16_table[x[c]];
    }
}
#endif

static void (*axpy_f16)(float * y, float a, const ggml_fp16_t * x, int32_t n) = axpy_f16_table;

/* An AVX2 clone of a vectorisable loop function, picked by the loader (GCC's
 * target_clones needs ifunc: Linux x86-64); elsewhere the plain build. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SCOPE_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SCOPE_VECTOR_CLONES
#endif

static void fp16_table_fill(void) {
    if (!fp16_ready) {
        for (uint32_t i = 0; i < (1u << 16); i++) {
            fp16_table[i] = ggml_fp16_to_fp32((ggml_fp16_t) i);
        }
#if defined(__GNUC__) && defined(__x86_64__)
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
            axpy_f16 = axpy_f16_avx2;
        }
#endif
        fp16_ready = true;
    }
}

/* e^x for x <= 0, to 1e-4 relative: 2^(x log2 e) split into an integer
 * power (exponent bits) and a polynomial on [0, 1). Branch-free, so the
 * softmax loops vectorise; scores need nowhere near libm's last ulp. */
static inline float exp_nonpos(float x) {
    float t = (x < -87.0f ? -87.0f : x) * 1.44269504f;
    int32_t i = (int32_t) t;
    i -= (float) i > t;                  /* floor for negative t */
    const float f = t - (float) i;       /* [0, 1) */
    const float p = 1.0f + f * (0.69314718f + f * (0.24022652f + f * (0.05550411f + f * (0.00961813f +
                    f * 0.00133336f))));
    union { int32_t i; float f; } bits = { (i + 127) << 23 };
    return p * bits.f;
}

int k_cache_layer(const struct ggml_tensor * t) {
    if (!t) {
        return -1;
    }
    const struct ggml_tensor * root = t->view_src ? t->view_src : t;
    return parse_layer(ggml_get_name(root), K_CACHE_PREFIX);
}

/* Read the K rows of cells [c0, c0 + n) of cache tensor kc (one transfer)
 * and convert them to float into out[n][kc->ne[0]]. The caller checked that
 * ggml converts kc's type. false: out of memory. */
static bool read_keys(scope_hook * h, const struct ggml_tensor * kc, int32_t c0, int32_t n, float * out) {
    const size_t row = kc->nb[1];
    const int64_t n_embd = kc->ne[0];
    if (!grow((void **) &h->raw, &h->raw_cap, (size_t) n * row, 1)) {
        return false;
    }
    read_tensor(h, kc, h->raw, (size_t) c0 * row, (size_t) n * row);
    for (int32_t r = 0; r < n; r++) {
        const uint8_t * src = h->raw + (size_t) r * row;
        if (kc->type == GGML_TYPE_F32) {
            memcpy(out + (size_t) r * n_embd, src, (size_t) n_embd * sizeof(float));
        } else {
            ggml_get_type_traits(kc->type)->to_float(src, out + (size_t) r * n_embd, n_embd);
        }
    }
    return true;
}

/* Bring layer il's sketches of every held cell up to date: read the K rows
 * of cells written (or shifted) since, as stored (any type the cache uses),
 * in runs of consecutive cells, and project each KV head's key on the basis.
 * Reads the cache tensor directly, so it works inside the callback (after
 * the layer's K write) and between decodes alike. */
static bool sketch_layer(scope_hook * h, int il) {
    const struct ggml_tensor * kc = h->k_cache[il];
    const int64_t n_embd = (int64_t) h->n_head_kv * h->head_dim;
    if (!kc) {
        return fail_cb(h, SCOPE_HOOK_E_GRAPH, "no K write into '%s%d' was seen yet: decode before sketching",
                       K_CACHE_PREFIX, il);
    }
    const struct ggml_type_traits * tr = ggml_get_type_traits(kc->type);
    if (kc->ne[0] != n_embd || kc->ne[1] != h->n_cells || kc->ne[2] != 1 || kc->ne[3] != 1 ||
        (kc->type != GGML_TYPE_F32 && !tr->to_float)) {
        return fail_cb(h, SCOPE_HOOK_E_SHAPE, "%s%d: type %s ne=[%lld,%lld,%lld,%lld], expected [%lld, %d, 1, 1] "
                       "of a type ggml can convert to float", K_CACHE_PREFIX, il, ggml_type_name(kc->type),
                       (long long) kc->ne[0], (long long) kc->ne[1], (long long) kc->ne[2], (long long) kc->ne[3],
                       (long long) n_embd, h->n_cells);
    }
    uint8_t * valid = h->sk_valid + (size_t) il * h->n_cells;
    for (int32_t c0 = 0; c0 < h->n_cells;) {
        if (h->cell_pos[c0] < 0 || valid[c0]) {
            c0++;
            continue;
        }
        int32_t c1 = c0 + 1;
        while (c1 < h->n_cells && h->cell_pos[c1] >= 0 && !valid[c1]) {
            c1++;
        }
        if (!grow((void **) &h->kbuf, &h->kbuf_cap, (size_t) (c1 - c0) * n_embd, sizeof(float)) ||
            !read_keys(h, kc, c0, c1 - c0, h->kbuf)) {
            return fail_cb(h, SCOPE_HOOK_E_NOMEM, "out of memory reading %d K rows", c1 - c0);
        }
        for (int32_t c = c0; c < c1; c++) {
            for (int32_t g = 0; g < h->n_head_kv; g++) {
                const float * key = h->kbuf + (size_t) (c - c0) * n_embd + (size_t) g * h->head_dim;
                const size_t lg = (size_t) il * h->n_head_kv + g;
                const float * basis = h->sk_basis + lg * h->sk_rank * h->head_dim;
                ggml_fp16_t * out = h->sk + lg * h->sk_rank * h->n_cells + c;
                for (int32_t k = 0; k < h->sk_rank; k++) {
                    float dot = 0.0f;
                    for (int32_t d = 0; d < h->head_dim; d++) {
                        dot += basis[(size_t) k * h->head_dim + d] * key[d];
                    }
                    out[(size_t) k * h->n_cells] = ggml_fp32_to_fp16(dot);
                }
            }
            valid[c] = 1;
        }
        c0 = c1;
    }
    return true;
}

/* Add q q^T to the query moments of (layer, KV head) lg. */
static void track_query(scope_hook * h, size_t lg, const float * q) {
    const int32_t d = h->head_dim;
    double * m = h->q_moments + lg * d * d;
    for (int32_t i = 0; i < d; i++) {
        for (int32_t j = 0; j < d; j++) {
            m[(size_t) i * d + j] += (double) q[i] * q[j];
        }
    }
    h->q_count[lg]++;
}

/* Which cells batch token b's query sees: its sequence's, at positions up
 * to its own (the causal mask llama.cpp builds for these models), as 1/0 in
 * h->vis. Returns one past the highest such cell (0: none). */
static int32_t visible_cells(scope_hook * h, int32_t b) {
    const int32_t seq = h->batch_seq[b], pos = h->batch_pos[b];
    int32_t end = 0;
    for (int32_t c = 0; c < h->n_cells; c++) {
        const bool seen = h->cell_seq[c] == seq && h->cell_pos[c] >= 0 && h->cell_pos[c] <= pos;
        h->vis[c] = seen ? 1.0f : 0.0f;
        end = seen ? c + 1 : end;
    }
    return end;
}

/* acc[c] += softmax(row)[c] over the cells with vis[c] = 1, c < n. Every
 * loop is branch-free over contiguous cells, the sum kept in 8 lanes, so the
 * compiler vectorises them (an AVX2 clone where the CPU has it). */
SCOPE_VECTOR_CLONES
static void softmax_add(float * acc, float * row, const float * vis, int32_t n) {
    float top = -INFINITY;
    for (int32_t c = 0; c < n; c++) {
        const float v = vis[c] > 0.0f ? row[c] : -INFINITY;
        top = v > top ? v : top;
    }
    float lanes[8] = {0};
    int32_t c = 0;
    for (; c < n; c++) {
        const float x = row[c] - top;
        row[c] = vis[c] * exp_nonpos(x < 0.0f ? x : 0.0f);  /* a hidden cell's logit may pass top: clamp, then 0 */
    }
    for (c = 0; c + 8 <= n; c += 8) {
        for (int32_t k = 0; k < 8; k++) {
            lanes[k] += row[c + k];
        }
    }
    float sum = 0.0f;
    for (; c < n; c++) {
        sum += row[c];
    }
    for (int32_t k = 0; k < 8; k++) {
        sum += lanes[k];
    }
    const float inv = 1.0f / sum;
    for (c = 0; c < n; c++) {
        acc[c] += row[c] * inv;
    }
}

/* Approximate attention of query row q ([n_head][head_dim]) over the cells
 * [0, n) it sees (h->vis), from the sketches, added to layer il's sums. */
static void sketch_attention(scope_hook * h, int il, const float * q, int32_t n) {
    const int32_t rank = h->sk_rank, group = h->n_head / h->n_head_kv;
    float * qp = h->kbuf;           /* [rank] */
    float * logit = h->kbuf + rank; /* [n] */
    for (int32_t hq = 0; hq < h->n_head; hq++) {
        const size_t lg = (size_t) il * h->n_head_kv + hq / group;
        const float * basis = h->sk_basis_q + lg * rank * h->head_dim;
        const float * qh = q + (size_t) hq * h->head_dim;
        if (h->q_moments) {
            track_query(h, lg, qh);
        }
        for (int32_t k = 0; k < rank; k++) {
            float dot = 0.0f;
            for (int32_t d = 0; d < h->head_dim; d++) {
                dot += basis[(size_t) k * h->head_dim + d] * qh[d];
            }
            qp[k] = dot * h->sk_scale;
        }
        memset(logit, 0, sizeof(float) * (size_t) n);
        const ggml_fp16_t * sk = h->sk + lg * rank * h->n_cells;
        for (int32_t k = 0; k < rank; k++) {
            axpy_f16(logit, qp[k], sk + (size_t) k * h->n_cells, n);
        }
        softmax_add(h->acc + ((size_t) il * h->n_head + hq) * h->n_cells, logit, h->vis, n);
    }
}

/* Key-only scores of the cells [0, n) the row sees (h->vis), per KV head,
 * added to layer il's sums for each of its query heads (no query is read):
 *   KEYDIFF: 1 - cos(sketch, mean sketch of the visible cells): distinct
 *            keys score high (KeyDiff, Park et al. 2025);
 *   KNORM:   max norm - norm: low-norm keys score high (Devoto et al. 2024).
 * Each captured row adds them once, like a row of attention. */
static void sketch_key_scores(scope_hook * h, int il, int32_t n) {
    const int32_t rank = h->sk_rank, group = h->n_head / h->n_head_kv;
    float * mean = h->kbuf;                /* [rank] */
    float * norm = h->kbuf + rank;         /* [n] */
    float * dot = h->kbuf + rank + n;      /* [n] */
    float n_vis = 0.0f;
    for (int32_t c = 0; c < n; c++) {
        n_vis += h->vis[c];
    }
    for (int32_t g = 0; g < h->n_head_kv; g++) {
        const size_t lg = (size_t) il * h->n_head_kv + g;
        const ggml_fp16_t * sk = h->sk + lg * rank * h->n_cells;
        memset(norm, 0, sizeof(float) * (size_t) n);
        memset(dot, 0, sizeof(float) * (size_t) n);
        float mean_norm = 0.0f;
        for (int32_t k = 0; k < rank; k++) {
            const ggml_fp16_t * col = sk + (size_t) k * h->n_cells;
            float m = 0.0f;
            for (int32_t c = 0; c < n; c++) {
                m += h->vis[c] * fp16_table[col[c]];
            }
            mean[k] = m / n_vis;
            mean_norm += mean[k] * mean[k];
            for (int32_t c = 0; c < n; c++) {
                const float v = fp16_table[col[c]];
                norm[c] += v * v;
                dot[c] += v * mean[k];
            }
        }
        mean_norm = sqrtf(mean_norm);
        float top = 0.0f;
        for (int32_t c = 0; c < n; c++) {
            norm[c] = sqrtf(norm[c]);
            top = h->vis[c] > 0.0f && norm[c] > top ? norm[c] : top;
        }
        for (int32_t i = 0; i < group; i++) {
            float * acc = h->acc + ((size_t) il * h->n_head + g * group + i) * h->n_cells;
            for (int32_t c = 0; c < n; c++) {
                const float score = h->sk_mode == SCOPE_HOOK_SCORE_KEYDIFF
                    ? 1.0f - dot[c] / fmaxf(norm[c] * mean_norm, 1e-20f) : top - norm[c];
                acc[c] += h->vis[c] * score;
            }
        }
    }
}

/* Score captured batch row b of layer il (q: its query, [n_head][head_dim]). */
static void sketch_row(scope_hook * h, int il, const float * q, int32_t b) {
    const int32_t n = visible_cells(h, b);
    if (n == 0) {
        return;
    }
    if (h->sk_mode == SCOPE_HOOK_SCORE_ATTENTION) {
        sketch_attention(h, il, q, n);
    } else {
        sketch_key_scores(h, il, n);
    }
}

bool on_sketch_attn(scope_hook * h, const struct ggml_tensor * t, int il) {
    /* with flash attention off, layer 0's mask is read after kq-0 (at kq_soft_max-0) */
    if (h->n_ubatch == 0 || h->n_mask < h->n_ubatch - 1) {
        return true; /* no K write or mask for this ubatch: scope_hook_end reports that */
    }
    const struct ggml_tensor * q = t->op == GGML_OP_FLASH_ATTN_EXT ? t->src[0] : t->src[1];
    const size_t head = (size_t) h->head_dim * sizeof(float);
    /* a permuted view [head_dim, rows, n_head, streams] of a contiguous [head_dim, n_head, n_tokens]:
     * ubatch row r is at r * nb[1] */
    if (q->type != GGML_TYPE_F32 || q->ne[0] != h->head_dim || q->ne[1] * q->ne[3] != h->ub_n ||
        q->ne[2] != h->n_head || q->nb[0] != sizeof(float) || q->nb[2] != head || q->nb[1] != head * h->n_head ||
        q->nb[3] != q->nb[1] * (size_t) q->ne[1] || !q->buffer) {
        fail_cb(h, SCOPE_HOOK_E_SHAPE, "query of layer %d: type %s ne=[%lld,%lld,%lld,%lld] nb=[%zu,%zu,%zu,%zu], "
                "expected F32 [%d, rows, %d, streams] with rows x streams = %d and the heads of a token "
                "contiguous", il, ggml_type_name(q->type), (long long) q->ne[0], (long long) q->ne[1],
                (long long) q->ne[2], (long long) q->ne[3], q->nb[0], q->nb[1], q->nb[2], q->nb[3], h->head_dim,
                h->n_head, h->ub_n);
        return true;
    }
    if (!sketch_layer(h, il)) {
        return true;
    }
    const size_t n_row = (size_t) h->n_head * h->head_dim;
    for (int32_t r = 0; r < h->ub_n;) {
        if (!captured_row(h, h->ub_rows[r])) {
            r++;
            continue;
        }
        int32_t end = r + 1;
        while (end < h->ub_n && captured_row(h, h->ub_rows[end])) {
            end++;
        }
        const size_t n = (size_t) (end - r) * n_row;
        if (!ensure_scratch(h, n) ||
            !grow((void **) &h->kbuf, &h->kbuf_cap, (size_t) h->sk_rank + 2 * (size_t) h->n_cells, sizeof(float))) {
            fail_cb(h, SCOPE_HOOK_E_NOMEM, "out of memory reading the queries of layer %d", il);
            return true;
        }
        read_tensor(h, q, h->scratch, (size_t) r * q->nb[1], n * sizeof(float));
        for (int32_t i = r; i < end; i++) {
            sketch_row(h, il, h->scratch + (size_t) (i - r) * n_row, h->ub_rows[i]);
            h->rows[(size_t) h->batch_seq[h->ub_rows[i]] * h->n_layer + il]++;
        }
        r = end;
    }
    return true;
}

/* Whether the softmax scale a node applies (op_params[0]) is the sketches',
 * with no ALiBi or soft-cap; records the error if not. */
bool check_scale(scope_hook * h, const struct ggml_tensor * t, int il) {
    float params[3] = {0};
    memcpy(params, t->op_params, t->op == GGML_OP_FLASH_ATTN_EXT ? 3 * sizeof(float) : 2 * sizeof(float));
    if (params[1] != 0.0f || params[2] != 0.0f) {
        return fail_cb(h, SCOPE_HOOK_E_GRAPH, "layer %d's attention uses ALiBi or a logit soft-cap (max_bias %g, "
                       "softcap %g): key sketches do not model those", il, params[1], params[2]);
    }
    if (fabsf(params[0] - h->sk_scale) > 1e-6f * fabsf(h->sk_scale)) {
        return fail_cb(h, SCOPE_HOOK_E_GRAPH, "layer %d's attention scale is %g but the sketches were set with %g",
                       il, params[0], h->sk_scale);
    }
    return true;
}

int32_t scope_hook_sketch_set(scope_hook * h, int32_t n_head_kv, int32_t head_dim, int32_t rank,
                              const float * basis, const float * basis_q, float scale, int32_t mode) {
    if (!h) {
        return SCOPE_HOOK_E_ARG;
    }
    if (h->n_armed > 0) { /* arm chose how the sums are kept for the scorer it saw */
        return fail(h, SCOPE_HOOK_E_STATE, "sketch_set: %d sequences are capturing; set sketches between captures",
                    h->n_armed);
    }
    if (rank == 0) {
        h->sk_rank = 0;
        return SCOPE_HOOK_OK;
    }
    if (n_head_kv <= 0 || h->n_head % n_head_kv != 0 || head_dim <= 0 || rank < 0 || rank > head_dim ||
        !basis || !(scale > 0.0f) || !isfinite(scale) ||
        mode < SCOPE_HOOK_SCORE_ATTENTION || mode > SCOPE_HOOK_SCORE_KNORM) {
        return fail(h, SCOPE_HOOK_E_ARG, "sketch_set: need n_head_kv dividing %d (got %d), head_dim > 0 (got %d), "
                    "rank in [0, head_dim] (got %d), a basis, a finite scale > 0 (got %g) and a score mode (got %d)",
                    h->n_head, n_head_kv, head_dim, rank, scale, mode);
    }
    const size_t n_basis = (size_t) h->n_layer * n_head_kv * rank * head_dim;
    const size_t n_sk = (size_t) h->n_layer * n_head_kv * h->n_cells * rank;
    fp16_table_fill();
    float * b = malloc(n_basis * sizeof(float));
    float * bq = malloc(n_basis * sizeof(float));
    ggml_fp16_t * sk = malloc(n_sk * sizeof(ggml_fp16_t));
    uint8_t * valid = calloc((size_t) h->n_layer * h->n_cells, 1);
    if (!b || !bq || !sk || !valid) {
        free(b);
        free(bq);
        free(sk);
        free(valid);
        return fail(h, SCOPE_HOOK_E_NOMEM, "sketch_set: out of memory for %zu sketch floats", n_sk);
    }
    memcpy(b, basis, n_basis * sizeof(float));
    memcpy(bq, basis_q ? basis_q : basis, n_basis * sizeof(float));
    free(h->sk_basis);
    free(h->sk_basis_q);
    free(h->sk);
    free(h->sk_valid);
    h->sk_basis = b;
    h->sk_basis_q = bq;
    h->sk = sk;
    h->sk_valid = valid;
    h->n_head_kv = n_head_kv;
    h->head_dim = head_dim;
    h->sk_rank = rank;
    h->sk_scale = scale;
    h->sk_mode = mode;
    return SCOPE_HOOK_OK;
}

int32_t scope_hook_sketch_track_queries(scope_hook * h, int32_t on) {
    if (!h || (on && h->sk_rank == 0)) {
        return h ? fail(h, SCOPE_HOOK_E_ARG, "sketch_track_queries: set sketches first") : SCOPE_HOOK_E_ARG;
    }
    free(h->q_moments);
    free(h->q_count);
    h->q_moments = NULL;
    h->q_count = NULL;
    if (!on) {
        return SCOPE_HOOK_OK;
    }
    const size_t n_lg = (size_t) h->n_layer * h->n_head_kv;
    h->q_moments = calloc(n_lg * h->head_dim * h->head_dim, sizeof(double));
    h->q_count = calloc(n_lg, sizeof(int64_t));
    if (!h->q_moments || !h->q_count) {
        scope_hook_sketch_track_queries(h, 0);
        return fail(h, SCOPE_HOOK_E_NOMEM, "sketch_track_queries: out of memory");
    }
    return SCOPE_HOOK_OK;
}

int32_t scope_hook_sketch_get_moments(const scope_hook * h, double * out, int64_t capacity, int64_t * counts) {
    const size_t n_lg = h ? (size_t) h->n_layer * h->n_head_kv : 0;
    if (!h || !h->q_moments || !out || !counts || capacity < (int64_t) (n_lg * h->head_dim * h->head_dim)) {
        return SCOPE_HOOK_E_ARG;
    }
    memcpy(out, h->q_moments, n_lg * h->head_dim * h->head_dim * sizeof(double));
    memcpy(counts, h->q_count, n_lg * sizeof(int64_t));
    return SCOPE_HOOK_OK;
}

/* Outside the callback, an error of sketch_layer is the call's. */
static int32_t take_error(scope_hook * h) {
    const int32_t rc = h->err;
    h->err = SCOPE_HOOK_OK;
    return rc;
}

int32_t scope_hook_sketch_gather(scope_hook * h, int32_t seq, const int32_t * cells, int32_t n, float * out,
                                 int64_t capacity) {
    if (!h || bad_seq(h, seq) || n < 0 || (n > 0 && (!cells || !out)) || h->sk_rank == 0 || h->in_decode ||
        capacity < (int64_t) h->n_layer * h->n_head_kv * n * h->sk_rank) {
        return h ? fail(h, SCOPE_HOOK_E_ARG, "sketch_gather: sketches not set, inside a decode, or bad arguments "
                        "(sequence %d, n=%d, capacity %lld)", seq, n, (long long) capacity) : SCOPE_HOOK_E_ARG;
    }
    const int32_t bad = first_not_held(h, seq, cells, n);
    if (bad >= 0) {
        return fail(h, SCOPE_HOOK_E_ARG, "sketch_gather: cell %d is not held by sequence %d", cells[bad], seq);
    }
    h->err = SCOPE_HOOK_OK;
    for (int32_t il = 0; il < h->n_layer; il++) {
        if (!h->swa_layer[il] && !sketch_layer(h, il)) {
            return take_error(h);
        }
    }
    const int32_t rank = h->sk_rank;
    for (int32_t lg = 0; lg < h->n_layer * h->n_head_kv; lg++) {
        for (int32_t i = 0; i < n; i++) {
            const ggml_fp16_t * src = h->sk + (size_t) lg * rank * h->n_cells + cells[i];
            for (int32_t k = 0; k < rank; k++) {
                out[((size_t) lg * n + i) * rank + k] = fp16_table[src[(size_t) k * h->n_cells]];
            }
        }
    }
    return SCOPE_HOOK_OK;
}

int32_t scope_hook_keys_read(scope_hook * h, int32_t il, const int32_t * cells, int32_t n, float * out,
                             int64_t capacity) {
    if (!h || il < 0 || il >= h->n_layer || n < 0 || (n > 0 && (!cells || !out)) || h->in_decode) {
        return h ? fail(h, SCOPE_HOOK_E_ARG, "keys: layer %d (of %d), n=%d, or inside a decode", il, h->n_layer, n)
                 : SCOPE_HOOK_E_ARG;
    }
    const struct ggml_tensor * kc = h->k_cache[il];
    if (!kc) {
        return fail(h, SCOPE_HOOK_E_STATE, "keys: no K write into '%s%d' was seen yet: decode first",
                    K_CACHE_PREFIX, il);
    }
    const int64_t n_embd = kc->ne[0];
    const struct ggml_type_traits * tr = ggml_get_type_traits(kc->type);
    if (capacity < n_embd * n || kc->ne[1] != h->n_cells || (kc->type != GGML_TYPE_F32 && !tr->to_float)) {
        return fail(h, SCOPE_HOOK_E_ARG, "keys: capacity %lld for %d rows of %lld, or a K cache of %lld cells "
                    "(hook: %d) and type %s", (long long) capacity, n, (long long) n_embd, (long long) kc->ne[1],
                    h->n_cells, ggml_type_name(kc->type));
    }
    for (int32_t i = 0; i < n; i++) {
        if (cells[i] < 0 || cells[i] >= h->n_cells || h->cell_pos[cells[i]] < 0) {
            return fail(h, SCOPE_HOOK_E_ARG, "keys: cell %d is not held", cells[i]);
        }
    }
    for (int32_t i = 0; i < n;) { /* one read per run of consecutive cells */
        int32_t j = i + 1;
        while (j < n && cells[j] == cells[j - 1] + 1) {
            j++;
        }
        if (!read_keys(h, kc, cells[i], j - i, out + (size_t) i * n_embd)) {
            return fail(h, SCOPE_HOOK_E_NOMEM, "keys: out of memory for %d rows", j - i);
        }
        i = j;
    }
    return SCOPE_HOOK_OK;
}
