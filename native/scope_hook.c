/* scope_hook: see scope_hook.h for the contract. */
#include "scope_hook.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml-backend.h"

#define SOFTMAX_PREFIX "kq_soft_max-"
#define K_IDXS_NAME    "attn_inp_k_idxs"
#define K_CACHE_PREFIX "cache_k_l"
#define MASK_NAME      "attn_inp_kq_mask"
#define KQ_PREFIX      "kq-"

struct scope_hook {
    int32_t n_cells;
    int32_t n_layer;
    int32_t n_head;
    int32_t n_seq;           /* sequences: ids in [0, n_seq) */
    int32_t stream_cells;    /* cells per sequence's stream (kv_unified = false); 0: one unified stream */

    int32_t * cell_pos;      /* [n_cells] position held by each cell, -1 empty */
    int32_t * cell_seq;      /* [n_cells] sequence of each cell, -1 empty */

    /* the decode in progress (between begin and end) */
    bool      in_decode;
    int32_t * batch_pos;     /* positions of the batch tokens */
    int32_t * batch_seq;     /* sequence of each batch token */
    int32_t * batch_next;    /* next batch token of the same sequence, -1 none */
    int32_t * seq_next;      /* [n_seq] streams: the sequence's first batch token not written yet, -1 none */
    int32_t * ub_rows;       /* batch index of each row of the current ubatch */
    int32_t   batch_cap;
    int32_t   batch_n;
    int32_t   written;       /* tokens whose cell was read so far */

    /* visibility: per sequence, of its last query row in the latest ubatch holding it */
    int32_t * vis_seq;       /* [n_cells] sequence whose last row sees the cell, -1 none */
    int32_t * n_visible;     /* [n_seq] */
    int32_t * seq_last;      /* [n_seq] scratch: last row of each sequence in the ubatch */
    int32_t   n_kv;

    int32_t   ub_n;          /* tokens (rows) in the current ubatch */
    int32_t   n_ubatch;      /* ubatches (layer-0 K writes) seen in this decode */
    int32_t   n_mask;        /* layer-0 attention masks read in this decode */

    /* attention capture */
    int32_t * capture_from;  /* [n_seq] capture that sequence's query rows at positions >= this; -1 off */
    int32_t   n_armed;       /* sequences whose capture is on */
    uint8_t * capture_layer; /* [n_layer] 1: layer il is captured */
    int32_t   first_layer;   /* lowest captured layer */
    uint8_t * swa_layer;     /* [n_layer] 1: a sliding-window layer, whose cells are llama.cpp's SWA cache's */
    int32_t   k_layer;       /* the lowest full-attention layer: its K write and mask are the map's */
    bool      iswa;          /* some layer is a sliding-window one (llama.cpp's iSWA memory) */
    const struct ggml_tensor * k_idxs; /* its write-index input in the latest graph */
    float   * acc;           /* [n_layer][n_head][n_cells]; a cell's sums are its sequence's */
    int32_t * rows;          /* [n_seq][n_layer] query rows summed */
    float   * scratch;
    size_t    scratch_cap;   /* floats */

    /* key sketches (scope_hook_sketch_set); sk_rank 0: scores are attention probabilities */
    int32_t   sk_rank;
    int32_t   n_head_kv;
    int32_t   head_dim;
    float     sk_scale;      /* the attention's softmax scale, checked against the graph's */
    int32_t   sk_mode;       /* enum scope_hook_score */
    float   * sk_basis;      /* [n_layer][n_head_kv][sk_rank][head_dim], keys */
    float   * sk_basis_q;    /* the same shape, queries (the keys' basis unless given) */
    double  * q_moments;     /* [n_layer][n_head_kv][head_dim][head_dim] sum of q q^T, when tracked */
    int64_t * q_count;       /* [n_layer][n_head_kv] query rows summed */
    ggml_fp16_t * sk;        /* [n_layer][n_head_kv][sk_rank][n_cells], half precision (host memory per cell);
                                cell-minor, so a query's logits over the cells are axpy sweeps */
    uint8_t * sk_valid;      /* [n_layer][n_cells] 1: the sketch is of the key the cell holds now */
    struct ggml_tensor ** k_cache; /* [n_layer] cache_k_l<il>, seen in the graph (NULL until then) */
    float   * kbuf;          /* dequantized keys / query rows / logits */
    size_t    kbuf_cap;      /* floats */
    uint8_t * raw;           /* K rows as stored */
    size_t    raw_cap;       /* bytes */
    float   * vis;           /* [n_cells] 1: the query row being scored sees the cell, else 0 */

    int64_t   n_reads;       /* tensor reads (transfers on a device) since creation */
    int64_t   bytes_read;

    int32_t   err;           /* first error met inside the callback */
    char      msg[512];
};

static int32_t fail(scope_hook * h, int32_t code, const char * fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(h->msg, sizeof(h->msg), fmt, ap);
    va_end(ap);
    return code;
}

/* Record an error met inside the callback; the first one wins. */
static bool fail_cb(scope_hook * h, int32_t code, const char * fmt, ...) {
    if (h->err == SCOPE_HOOK_OK) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(h->msg, sizeof(h->msg), fmt, ap);
        va_end(ap);
        h->err = code;
    }
    return false;
}

scope_hook * scope_hook_new(int32_t n_cells, int32_t n_layer, int32_t n_head) {
    return scope_hook_new_seqs(n_cells, n_layer, n_head, 1);
}

scope_hook * scope_hook_new_streams(int32_t n_cells, int32_t n_layer, int32_t n_head, int32_t n_seq) {
    if (n_seq <= 0 || n_cells % n_seq != 0) {
        return NULL;
    }
    scope_hook * h = scope_hook_new_seqs(n_cells, n_layer, n_head, n_seq);
    if (h) {
        h->stream_cells = n_cells / n_seq;
    }
    return h;
}

scope_hook * scope_hook_new_seqs(int32_t n_cells, int32_t n_layer, int32_t n_head, int32_t n_seq) {
    if (n_cells <= 0 || n_layer <= 0 || n_head <= 0 || n_seq <= 0 || n_seq > SCOPE_HOOK_MAX_SEQ) {
        return NULL;
    }
    scope_hook * h = calloc(1, sizeof(*h));
    if (!h) {
        return NULL;
    }
    h->n_cells = n_cells;
    h->n_layer = n_layer;
    h->n_head  = n_head;
    h->n_seq   = n_seq;
    h->cell_pos = malloc(sizeof(int32_t) * (size_t) n_cells);
    h->cell_seq = malloc(sizeof(int32_t) * (size_t) n_cells);
    h->vis_seq  = malloc(sizeof(int32_t) * (size_t) n_cells);
    h->n_visible = calloc((size_t) n_seq, sizeof(int32_t));
    h->seq_last = malloc(sizeof(int32_t) * (size_t) n_seq);
    h->seq_next = malloc(sizeof(int32_t) * (size_t) n_seq);
    h->capture_from = malloc(sizeof(int32_t) * (size_t) n_seq);
    h->acc      = calloc((size_t) n_layer * n_head * n_cells, sizeof(float));
    h->rows     = calloc((size_t) n_seq * n_layer, sizeof(int32_t));
    h->capture_layer = malloc((size_t) n_layer);
    h->swa_layer = calloc((size_t) n_layer, 1);
    h->k_cache  = calloc((size_t) n_layer, sizeof(struct ggml_tensor *));
    h->vis      = malloc(sizeof(float) * (size_t) n_cells);
    if (!h->cell_pos || !h->cell_seq || !h->vis_seq || !h->n_visible || !h->seq_last || !h->seq_next ||
        !h->capture_from ||
        !h->acc || !h->rows || !h->capture_layer || !h->swa_layer || !h->k_cache || !h->vis) {
        scope_hook_free(h);
        return NULL;
    }
    for (int32_t i = 0; i < n_cells; i++) {
        h->cell_pos[i] = -1;
        h->cell_seq[i] = -1;
        h->vis_seq[i] = -1;
    }
    for (int32_t s = 0; s < n_seq; s++) {
        h->capture_from[s] = SCOPE_HOOK_CAPTURE_OFF;
    }
    memset(h->capture_layer, 1, (size_t) n_layer);
    return h;
}

void scope_hook_free(scope_hook * h) {
    if (!h) {
        return;
    }
    free(h->cell_pos);
    free(h->cell_seq);
    free(h->batch_pos);
    free(h->batch_seq);
    free(h->batch_next);
    free(h->ub_rows);
    free(h->seq_next);
    free(h->vis_seq);
    free(h->n_visible);
    free(h->seq_last);
    free(h->capture_from);
    free(h->acc);
    free(h->rows);
    free(h->capture_layer);
    free(h->swa_layer);
    free(h->scratch);
    free(h->sk_basis);
    free(h->sk_basis_q);
    free(h->q_moments);
    free(h->q_count);
    free(h->sk);
    free(h->sk_valid);
    free(h->k_cache);
    free(h->kbuf);
    free(h->raw);
    free(h->vis);
    free(h);
}

/* A graph input by its name, or the scheduler's copy of it into a device
 * split, named "<backend>#<name>#<copy>" (ggml_backend_sched_split_graph) and
 * truncated to GGML_MAX_NAME - 1 characters. */
static bool is_input(const struct ggml_tensor * t, const char * name) {
    if (!t) {
        return false;
    }
    const char * s = ggml_get_name(t);
    if (strcmp(s, name) == 0) {
        return true;
    }
    const char * hash = strchr(s, '#');
    if (!hash) {
        return false;
    }
    const char * rest = hash + 1;
    size_t n = strlen(name), have = strlen(rest);
    if (have < n) { /* truncated: what is left must be a prefix of the name */
        return have > 0 && strlen(s) == GGML_MAX_NAME - 1 && strncmp(rest, name, have) == 0;
    }
    return strncmp(rest, name, n) == 0 && (rest[n] == '#' || rest[n] == '\0');
}

/* Layer index of a "<prefix><il>" name, or -1. */
static int parse_layer(const char * name, const char * prefix) {
    size_t n = strlen(prefix);
    if (strncmp(name, prefix, n) != 0) {
        return -1;
    }
    char * end = NULL;
    long il = strtol(name + n, &end, 10);
    if (end == name + n || (*end != '\0' && *end != ' ') || il < 0 || il > 1000000) {
        return -1;
    }
    return (int) il;
}

/* Every tensor read goes through here: backend-agnostic, and counted. */
static void read_tensor(scope_hook * h, const struct ggml_tensor * t, void * dst, size_t offset, size_t size) {
    ggml_backend_tensor_get(t, dst, offset, size);
    h->n_reads++;
    h->bytes_read += (int64_t) size;
}

static bool grow(void ** buf, size_t * cap, size_t n, size_t elem) {
    if (n <= *cap) {
        return true;
    }
    void * p = realloc(*buf, n * elem);
    if (!p) {
        return false;
    }
    *buf = p;
    *cap = n;
    return true;
}

static bool ensure_scratch(scope_hook * h, size_t n_floats) {
    if (n_floats <= h->scratch_cap) {
        return true;
    }
    float * p = realloc(h->scratch, n_floats * sizeof(float));
    if (!p) {
        return false;
    }
    h->scratch = p;
    h->scratch_cap = n_floats;
    return true;
}

/* Batch index of the ubatch row written into cell c: with one unified
 * stream ubatches take the batch in order; with streams the cell's stream
 * names the sequence, whose tokens are written in batch order. -1: none left. */
static int32_t row_token(scope_hook * h, int64_t c, int64_t i) {
    if (h->stream_cells == 0) {
        return h->written + (int32_t) i;
    }
    const int32_t s = (int32_t) (c / h->stream_cells);
    const int32_t b = h->seq_next[s];
    if (b >= 0) {
        h->seq_next[s] = h->batch_next[b];
    }
    return b;
}

/* Layer-0 K write: cell index of each ubatch token (llama.cpp's ubatch order). */
static bool on_k_write(scope_hook * h, const struct ggml_tensor * t) {
    const struct ggml_tensor * idx = t->src[1];
    if (idx->type != GGML_TYPE_I64 || idx->ne[1] != 1 || idx->ne[2] != 1 || idx->ne[3] != 1 ||
        idx->nb[0] != sizeof(int64_t) || !idx->buffer) {
        return fail_cb(h, SCOPE_HOOK_E_SHAPE, "%s: expected contiguous I64 [n_tokens] in a buffer, got type %d "
                       "ne=[%lld,%lld] nb[0]=%zu", K_IDXS_NAME, (int) idx->type, (long long) idx->ne[0],
                       (long long) idx->ne[1], idx->nb[0]);
    }
    const int64_t n = idx->ne[0];
    if (!h->in_decode || h->written + n > h->batch_n) {
        return fail_cb(h, SCOPE_HOOK_E_STATE, "%lld K writes but the batch given to begin has %d tokens (%d written)",
                       (long long) n, h->batch_n, h->written);
    }
    if (!ensure_scratch(h, (size_t) n * 2)) {
        return fail_cb(h, SCOPE_HOOK_E_NOMEM, "out of memory reading %lld write indices", (long long) n);
    }
    int64_t * cells = (int64_t *) h->scratch;
    read_tensor(h, idx, cells, 0, (size_t) n * sizeof(int64_t));
    for (int64_t i = 0; i < n; i++) {
        if (cells[i] < 0 || cells[i] >= h->n_cells) {
            return fail_cb(h, SCOPE_HOOK_E_SHAPE, "write index %lld outside the %d cells", (long long) cells[i], h->n_cells);
        }
    }
    for (int64_t i = 0; i < n; i++) {
        const int64_t c = cells[i];
        const int32_t b = row_token(h, c, i);
        if (b < 0) {
            return fail_cb(h, SCOPE_HOOK_E_STATE, "a write into cell %lld (stream %lld) but the batch has no "
                           "token left of that sequence", (long long) c, (long long) (c / h->stream_cells));
        }
        h->ub_rows[i] = b;
        h->cell_pos[c] = h->batch_pos[b];
        h->cell_seq[c] = h->batch_seq[b];
        for (int32_t lh = 0; lh < h->n_layer * h->n_head; lh++) { /* a new token's cell starts unscored */
            h->acc[(size_t) lh * h->n_cells + c] = 0.0f;
        }
        for (int32_t il = 0; h->sk_valid && il < h->n_layer; il++) { /* ... and unsketched */
            h->sk_valid[(size_t) il * h->n_cells + c] = 0;
        }
    }
    h->ub_n = (int32_t) n;
    h->written += (int32_t) n;
    h->n_ubatch++;
    return false;
}

/* First cell of batch token b's stream: its columns in the attention's
 * tensors are cells [base, base + n_kv). */
static int32_t stream_base(const scope_hook * h, int32_t b) {
    return h->stream_cells * h->batch_seq[b];
}

/* Most cells one query row can attend over: its stream's, or every cell. */
static int32_t attn_width(const scope_hook * h) {
    return h->stream_cells ? h->stream_cells : h->n_cells;
}

/* Whether an attention tensor's [n_kv, rows, n_head, n_stream] fits this
 * ubatch: rows * n_stream == its tokens, one stream per sequence (llama.cpp
 * lays out streams x rows in ubatch order; unified: one stream). */
static bool ubatch_shape(const scope_hook * h, int64_t n_kv, int64_t n_rows, int64_t n_stream) {
    return n_kv > 0 && n_kv <= attn_width(h) && n_stream >= 1 && n_rows * n_stream == h->ub_n &&
           (h->stream_cells || n_stream == 1);
}

/* Attention mask of the map's layer (m: an operand of its softmax or
 * flash-attention node): which cells each sequence's last query row in the
 * ubatch sees. */
static bool on_mask(scope_hook * h, const struct ggml_tensor * m) {
    if (h->n_mask != h->n_ubatch - 1) {
        return false; /* this ubatch's K write failed or was not seen: scope_hook_end reports that */
    }
    if (!is_input(m, MASK_NAME) || !m->buffer) {
        return fail_cb(h, SCOPE_HOOK_E_GRAPH, "layer %d's attention has no '%s' operand", h->k_layer, MASK_NAME);
    }
    const int64_t n_kv = m->ne[0], n_rows = m->ne[1];
    /* one row per ubatch token (a padded mask would put padding in the last row) */
    if (!ubatch_shape(h, n_kv, n_rows, m->ne[3]) || m->ne[2] != 1 ||
        (m->type != GGML_TYPE_F32 && m->type != GGML_TYPE_F16) || m->nb[0] != ggml_type_size(m->type)) {
        return fail_cb(h, SCOPE_HOOK_E_SHAPE, "%s: type %d ne=[%lld,%lld,%lld,%lld], expected contiguous F32/F16 "
                       "[<=%d, rows, 1, streams] with rows x streams = %d (ubatch tokens)",
                       MASK_NAME, (int) m->type, (long long) m->ne[0], (long long) m->ne[1],
                       (long long) m->ne[2], (long long) m->ne[3], attn_width(h), h->ub_n);
    }
    if (!ensure_scratch(h, (size_t) n_kv)) {
        return fail_cb(h, SCOPE_HOOK_E_NOMEM, "out of memory reading the mask");
    }
    for (int32_t s = 0; s < h->n_seq; s++) {
        h->seq_last[s] = -1;
    }
    for (int32_t r = 0; r < h->ub_n; r++) {
        h->seq_last[h->batch_seq[h->ub_rows[r]]] = r;
    }
    const size_t esz = ggml_type_size(m->type);
    for (int32_t s = 0; s < h->n_seq; s++) {
        const int32_t r = h->seq_last[s];
        if (r < 0) {
            continue; /* not in this ubatch: its visibility stays as its latest row saw it */
        }
        read_tensor(h, m, h->scratch, (size_t) (r / n_rows) * m->nb[3] + (size_t) (r % n_rows) * m->nb[1],
                    (size_t) n_kv * esz);
        for (int32_t j = 0; j < h->n_cells; j++) {
            h->vis_seq[j] = h->vis_seq[j] == s ? -1 : h->vis_seq[j];
        }
        const int32_t base = stream_base(h, h->ub_rows[r]);
        int32_t count = 0;
        for (int64_t j = 0; j < n_kv; j++) {
            float v = m->type == GGML_TYPE_F32 ? h->scratch[j] : ggml_fp16_to_fp32(((ggml_fp16_t *) h->scratch)[j]);
            if (v != -INFINITY) {
                h->vis_seq[base + j] = s; /* the mask hides other sequences' cells: a cell is seen by one sequence */
                count++;
            }
        }
        h->n_visible[s] = count;
    }
    h->n_kv = (int32_t) n_kv;
    h->n_mask++;
    return false;
}

static void add_rows(float * dst, const float * rows, int64_t n_rows, int64_t n_kv) {
    for (int64_t r = 0; r < n_rows; r++) {
        const float * src = rows + r * n_kv;
        for (int64_t j = 0; j < n_kv; j++) {
            dst[j] += src[j];
        }
    }
}

/* Whether batch row i is captured: its sequence is armed from a position <= its own. */
static bool captured_row(const scope_hook * h, int32_t i) {
    const int32_t from = h->capture_from[h->batch_seq[i]];
    return from >= 0 && h->batch_pos[i] >= from;
}

/* Add rows [first, first + n_rows) of one stream of kq_soft_max-<il> (laid
 * out [n_kv, n_tps, n_head] from byte `at`) into the sums of the cells from
 * `base`. Each read is a transfer (a round trip on RPC, a copy over PCIe):
 * when the run is all the stream's rows (decode steps) the heads are
 * contiguous and one read takes the layer; otherwise the run is read head by
 * head. A row's masked cells (other sequences', empty ones) are exactly 0, so
 * adding the whole row only feeds its own sequence's cells. */
static bool add_run(scope_hook * h, const struct ggml_tensor * t, int il, size_t at, int32_t base, int64_t first,
                    int64_t n_rows) {
    const int64_t n_kv = t->ne[0], n_tps = t->ne[1], n_head = t->ne[2];
    const bool whole = n_rows == n_tps;
    const size_t n_read = (size_t) (whole ? n_head : 1) * (size_t) (n_rows * n_kv);
    if (!ensure_scratch(h, n_read)) {
        return false;
    }
    if (whole) {
        read_tensor(h, t, h->scratch, at, n_read * sizeof(float));
    }
    for (int64_t hd = 0; hd < n_head; hd++) {
        const float * rows = h->scratch + (whole ? hd * n_rows * n_kv : 0);
        if (!whole) {
            read_tensor(h, t, h->scratch, at + hd * t->nb[2] + first * t->nb[1], n_read * sizeof(float));
        }
        add_rows(h->acc + ((size_t) il * h->n_head + hd) * h->n_cells + base, rows, n_rows, n_kv);
    }
    return true;
}

/* Computed kq_soft_max-<il>: add the chosen rows' probabilities per cell. */
static bool on_softmax(scope_hook * h, const struct ggml_tensor * t, int il) {
    if (h->n_mask != h->n_ubatch || h->n_ubatch == 0) {
        return true; /* no K write or mask for this ubatch: scope_hook_end reports that */
    }
    const int64_t n_kv = t->ne[0], n_tps = t->ne[1], n_head = t->ne[2], n_stream = t->ne[3];
    if (t->type != GGML_TYPE_F32 || !ubatch_shape(h, n_kv, n_tps, n_stream) || n_head != h->n_head ||
        !ggml_is_contiguous(t) || !t->buffer) {
        fail_cb(h, SCOPE_HOOK_E_SHAPE, "kq_soft_max-%d: type %d ne=[%lld,%lld,%lld,%lld], expected contiguous F32 "
                "[<=%d, rows, %d, streams] with rows x streams = %d (ubatch tokens)", il, (int) t->type,
                (long long) n_kv, (long long) n_tps, (long long) n_head, (long long) n_stream, attn_width(h), h->n_head,
                h->ub_n);
        return true; /* keep computing: the error is reported by scope_hook_end */
    }
    /* per stream, rows of armed sequences at positions >= their capture_from, read run by run */
    for (int64_t st = 0; st < n_stream; st++) {
        const int32_t * rows = h->ub_rows + st * n_tps;
        const int32_t base = stream_base(h, rows[0]);
        for (int64_t r = 0; r < n_tps;) {
            if (!captured_row(h, rows[r])) {
                r++;
                continue;
            }
            int64_t end = r + 1;
            while (end < n_tps && captured_row(h, rows[end])) {
                end++;
            }
            if (!add_run(h, t, il, st * t->nb[3], base, r, end - r)) {
                fail_cb(h, SCOPE_HOOK_E_NOMEM, "out of memory reading kq_soft_max-%d", il);
                return true;
            }
            for (int64_t i = r; i < end; i++) {
                h->rows[(size_t) h->batch_seq[rows[i]] * h->n_layer + il]++;
            }
            r = end;
        }
    }
    return true;
}

/* ---- key sketches ------------------------------------------------------ */

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

/* Layer of a K-cache tensor or a view of one ("cache_k_l<il>"), or -1. */
static int k_cache_layer(const struct ggml_tensor * t) {
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

/* Computed attention of layer il (flash attention, or kq-<il> without it),
 * sketch mode: score the captured rows of the ubatch from their queries. */
static bool on_sketch_attn(scope_hook * h, const struct ggml_tensor * t, int il) {
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
static bool check_scale(scope_hook * h, const struct ggml_tensor * t, int il) {
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

/* ---- the callback -------------------------------------------------------- */

/* Layer of an attention node: flash attention (its K operand is a view of
 * cache_k_l<il>) or, with it off, kq-<il>; -1 for any other node. */
static int attn_layer(const struct ggml_tensor * t) {
    if (t->op == GGML_OP_FLASH_ATTN_EXT) {
        return k_cache_layer(t->src[1]);
    }
    return t->op == GGML_OP_MUL_MAT ? parse_layer(ggml_get_name(t), KQ_PREFIX) : -1;
}

/* Sliding-window layers are never captured: their columns are the SWA cache's cells. */
static bool wants_layer(const scope_hook * h, int il) {
    return h->n_armed > 0 && h->capture_layer[il] && !h->swa_layer[il];
}

/* A K write (SET_ROWS into cache_k_l<il>) at ask time. The map follows the
 * lowest full-attention layer's: llama.cpp's iSWA memory gives the
 * sliding-window layers a cache of their own, written through an index
 * input of the same name (so names cannot tell them apart), and a
 * sliding-window layer sharing that layer's index tensor means the layer
 * flags do not describe this graph. */
static bool on_k_cache(scope_hook * h, const struct ggml_tensor * t, int il) {
    /* k_idxs is this graph's only for the layers after k_layer (graph order is layer order) */
    if (h->swa_layer[il]) {
        if (il > h->k_layer && t->src[1] == h->k_idxs) {
            return fail_cb(h, SCOPE_HOOK_E_GRAPH, "layer %d is flagged sliding-window but writes its K through "
                           "the full-attention layer %d's indices: the layer flags do not match llama.cpp's caches",
                           il, h->k_layer);
        }
        return false;
    }
    h->k_cache[il] = t->src[2]; /* the cache tensor itself: it outlives the graph */
    if (il != h->k_layer || !is_input(t->src[1], K_IDXS_NAME)) {
        return false;
    }
    h->k_idxs = t->src[1];
    return on_k_write(h, t);
}

bool scope_hook_eval(struct ggml_tensor * t, bool ask, void * user_data) {
    scope_hook * h = user_data;
    if (!h || !t) {
        return false;
    }
    if (!ask) {
        if (h->sk_rank > 0) {
            int il = attn_layer(t);
            return il >= 0 && il < h->n_layer ? on_sketch_attn(h, t, il) : true;
        }
        int il = parse_layer(ggml_get_name(t), SOFTMAX_PREFIX);
        return il >= 0 && il < h->n_layer ? on_softmax(h, t, il) : true;
    }
    if (t->op == GGML_OP_SET_ROWS) {
        const int il = t->src[2] ? parse_layer(ggml_get_name(t->src[2]), K_CACHE_PREFIX) : -1;
        return il >= 0 && il < h->n_layer ? on_k_cache(h, t, il) : false;
    }
    const bool fattn = t->op == GGML_OP_FLASH_ATTN_EXT;
    const bool softmax = t->op == GGML_OP_SOFT_MAX;
    if (!fattn && !softmax && !(h->sk_rank > 0 && t->op == GGML_OP_MUL_MAT)) {
        return false;
    }
    int il = softmax ? parse_layer(ggml_get_name(t), SOFTMAX_PREFIX) : attn_layer(t);
    if (il < 0) {
        return false;
    }
    if (il >= h->n_layer) {
        return fail_cb(h, SCOPE_HOOK_E_GRAPH, "attention of layer %d but the model has %d layers", il, h->n_layer);
    }
    if (il == h->k_layer && (fattn || softmax)) {
        on_mask(h, t->src[fattn ? 3 : 1]);
    }
    if (h->sk_rank > 0) {
        if ((fattn || softmax) && !h->swa_layer[il] && !check_scale(h, t, il)) {
            return false;
        }
        return !softmax && wants_layer(h, il);
    }
    return softmax && wants_layer(h, il);
}

static bool bad_seq(const scope_hook * h, int32_t seq) {
    return seq < 0 || seq >= h->n_seq;
}

/* Index of the first of cells[0..n) that is out of range or not held by seq; -1 if none. */
static int32_t first_not_held(const scope_hook * h, int32_t seq, const int32_t * cells, int32_t n) {
    for (int32_t i = 0; i < n; i++) {
        if (cells[i] < 0 || cells[i] >= h->n_cells || h->cell_seq[cells[i]] != seq) {
            return i;
        }
    }
    return -1;
}

int32_t scope_hook_begin(scope_hook * h, const int32_t * positions, int32_t n_tokens) {
    return scope_hook_begin_seqs(h, positions, NULL, n_tokens);
}

int32_t scope_hook_begin_seqs(scope_hook * h, const int32_t * positions, const int32_t * seq_ids, int32_t n_tokens) {
    if (!h || !positions || n_tokens <= 0) {
        return h ? fail(h, SCOPE_HOOK_E_ARG, "begin: need a non-empty batch, got %d tokens", n_tokens) : SCOPE_HOOK_E_ARG;
    }
    if (n_tokens > h->batch_cap) {
        int32_t ** bufs[] = {&h->batch_pos, &h->batch_seq, &h->batch_next, &h->ub_rows};
        for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) {
            int32_t * p = realloc(*bufs[i], sizeof(int32_t) * (size_t) n_tokens);
            if (!p) {
                return fail(h, SCOPE_HOOK_E_NOMEM, "begin: out of memory for %d positions", n_tokens);
            }
            *bufs[i] = p;
        }
        h->batch_cap = n_tokens;
    }
    for (int32_t s = 0; s < h->n_seq; s++) {
        h->seq_last[s] = -1; /* last position seen per sequence */
    }
    for (int32_t i = 0; i < n_tokens; i++) {
        const int32_t s = seq_ids ? seq_ids[i] : 0;
        if (bad_seq(h, s)) {
            return fail(h, SCOPE_HOOK_E_ARG, "begin: token %d has sequence %d, outside [0, %d)", i, s, h->n_seq);
        }
        if (positions[i] < 0 || positions[i] <= h->seq_last[s]) {
            return fail(h, SCOPE_HOOK_E_ARG, "begin: positions must be >= 0 and increasing; token %d has %d after "
                        "%d (within sequence %d)", i, positions[i], h->seq_last[s], s);
        }
        h->seq_last[s] = positions[i];
    }
    memcpy(h->batch_pos, positions, sizeof(int32_t) * (size_t) n_tokens);
    for (int32_t s = 0; s < h->n_seq; s++) {
        h->seq_next[s] = -1;
    }
    for (int32_t i = n_tokens - 1; i >= 0; i--) { /* each sequence's tokens as a list, in batch order */
        const int32_t s = seq_ids ? seq_ids[i] : 0;
        h->batch_seq[i] = s;
        h->batch_next[i] = h->seq_next[s];
        h->seq_next[s] = i;
    }
    h->batch_n = n_tokens;
    h->written = 0;
    h->ub_n = 0;
    h->n_ubatch = 0;
    h->n_mask = 0;
    h->in_decode = true;
    h->err = SCOPE_HOOK_OK;
    h->msg[0] = '\0';
    return SCOPE_HOOK_OK;
}

/* Every captured layer of sequence s summed the same number of rows, and some. */
static int32_t check_rows(scope_hook * h, int32_t s) {
    const int32_t * rows = h->rows + (size_t) s * h->n_layer;
    const int32_t want = rows[h->first_layer];
    for (int32_t il = 0; il < h->n_layer; il++) {
        if (wants_layer(h, il) && (rows[il] == 0 || rows[il] != want)) {
            return fail(h, SCOPE_HOOK_E_GRAPH, "layer %d gave %d captured rows (layer %d: %d) of sequence %d: %s",
                        il, rows[il], h->first_layer, want, s, h->sk_rank > 0
                        ? "key sketches need the standard attention graph (flash attention's node or kq-<il>)"
                        : "exact attention capture reads kq_soft_max, which flash attention never computes: turn "
                          "flash attention off or score with key sketches");
        }
    }
    return SCOPE_HOOK_OK;
}

int32_t scope_hook_end(scope_hook * h) {
    if (!h) {
        return SCOPE_HOOK_E_ARG;
    }
    if (!h->in_decode) {
        return fail(h, SCOPE_HOOK_E_STATE, "end without begin");
    }
    h->in_decode = false;
    if (h->err != SCOPE_HOOK_OK) {
        return h->err;
    }
    if (h->written == 0) {
        return fail(h, SCOPE_HOOK_E_GRAPH, "no '%s' write into '%s%d' was seen (the lowest full-attention "
                    "layer's): the graph is not a KV-cached attention graph this hook understands", K_IDXS_NAME,
                    K_CACHE_PREFIX, h->k_layer);
    }
    if (h->written != h->batch_n) {
        return fail(h, SCOPE_HOOK_E_STATE, "%d of %d batch tokens were written to the cache (decode failed?)",
                    h->written, h->batch_n);
    }
    if (h->n_mask != h->n_ubatch) {
        return fail(h, SCOPE_HOOK_E_GRAPH, "layer %d's attention with its '%s' operand was seen in %d of %d "
                    "ubatches: llama.cpp renamed its attention nodes; the hook needs the standard attention graph",
                    h->k_layer, MASK_NAME, h->n_mask, h->n_ubatch);
    }
    for (int32_t i = 0; i < h->batch_n; i++) {
        const bool last_of_seq = i == h->batch_n - 1 || h->batch_seq[i + 1] != h->batch_seq[i];
        const int32_t rc = last_of_seq && captured_row(h, i) ? check_rows(h, h->batch_seq[i]) : SCOPE_HOOK_OK;
        if (rc != SCOPE_HOOK_OK) {
            return rc;
        }
    }
    return SCOPE_HOOK_OK;
}

int32_t scope_hook_capture_layers(scope_hook * h, const uint8_t * layers, int32_t n_layer) {
    if (!h || n_layer != h->n_layer) {
        return h ? fail(h, SCOPE_HOOK_E_ARG, "capture_layers: %d flags for %d layers", n_layer, h->n_layer)
                 : SCOPE_HOOK_E_ARG;
    }
    int32_t first = -1;
    for (int32_t il = n_layer - 1; il >= 0; il--) {
        first = (!layers || layers[il]) && !h->swa_layer[il] ? il : first;
    }
    if (first < 0) {
        return fail(h, SCOPE_HOOK_E_ARG, "capture_layers: no full-attention layer chosen (sliding-window layers "
                    "are never captured)");
    }
    for (int32_t il = 0; il < n_layer; il++) {
        h->capture_layer[il] = layers ? layers[il] != 0 : 1;
    }
    h->first_layer = first;
    return SCOPE_HOOK_OK;
}

int32_t scope_hook_swa_layers(scope_hook * h, const uint8_t * swa, int32_t n_layer) {
    if (!h || !swa || n_layer != h->n_layer || h->in_decode) {
        return h ? fail(h, SCOPE_HOOK_E_ARG, "swa_layers: %d flags for %d layers, or inside a decode", n_layer,
                        h->n_layer) : SCOPE_HOOK_E_ARG;
    }
    int32_t k_layer = -1;
    for (int32_t il = n_layer - 1; il >= 0; il--) {
        k_layer = swa[il] ? k_layer : il;
    }
    if (k_layer < 0) {
        return fail(h, SCOPE_HOOK_E_ARG, "swa_layers: every layer is a sliding-window layer; the hook maps the "
                    "cells of a full-attention layer");
    }
    for (int32_t il = 0; il < n_layer; il++) {
        h->swa_layer[il] = swa[il] != 0;
        h->k_cache[il] = swa[il] ? NULL : h->k_cache[il];
    }
    h->k_layer = k_layer;
    h->k_idxs = NULL;
    h->iswa = false;
    for (int32_t il = 0; il < n_layer; il++) {
        h->iswa = h->iswa || swa[il];
    }
    if (h->swa_layer[h->first_layer]) { /* the default (every layer) starts at the first full-attention one */
        h->first_layer = k_layer;
    }
    return SCOPE_HOOK_OK;
}

int32_t scope_hook_capture_arm(scope_hook * h, int32_t from_pos) {
    return scope_hook_capture_arm_seq(h, 0, from_pos);
}

int32_t scope_hook_capture_arm_seq(scope_hook * h, int32_t seq, int32_t from_pos) {
    if (!h || from_pos < SCOPE_HOOK_CAPTURE_OFF || bad_seq(h, seq)) {
        return h ? fail(h, SCOPE_HOOK_E_ARG, "capture_arm: sequence %d (of %d), from_pos %d (>= -1)", seq, h->n_seq,
                        from_pos) : SCOPE_HOOK_E_ARG;
    }
    h->n_armed += (from_pos >= 0) - (h->capture_from[seq] >= 0);
    h->capture_from[seq] = from_pos;
    if (from_pos == SCOPE_HOOK_CAPTURE_OFF) {
        return SCOPE_HOOK_OK; /* keep what was captured readable */
    }
    /* row by row: arm runs before every captured step, and a cell-major
     * walk strides n_cells floats per write (0.6 ms at 1,024 cells) */
    if (h->n_seq == 1) { /* empty cells are zeroed when written anyway */
        memset(h->acc, 0, sizeof(float) * (size_t) h->n_layer * h->n_head * h->n_cells);
    } else {
        for (int32_t lh = 0; lh < h->n_layer * h->n_head; lh++) {
            float * row = h->acc + (size_t) lh * h->n_cells;
            for (int32_t c = 0; c < h->n_cells; c++) {
                row[c] = h->cell_seq[c] == seq ? 0.0f : row[c];
            }
        }
    }
    memset(h->rows + (size_t) seq * h->n_layer, 0, sizeof(int32_t) * (size_t) h->n_layer);
    return SCOPE_HOOK_OK;
}

int32_t scope_hook_capture_gather(const scope_hook * h, const int32_t * cells, int32_t n, float * out,
                                  int64_t capacity, int32_t * rows_out) {
    return scope_hook_capture_gather_seq(h, 0, cells, n, out, capacity, rows_out);
}

int32_t scope_hook_capture_gather_seq(const scope_hook * h, int32_t seq, const int32_t * cells, int32_t n,
                                      float * out, int64_t capacity, int32_t * rows_out) {
    if (!h || bad_seq(h, seq) || n < 0 || (n > 0 && (!cells || !out)) ||
        capacity < (int64_t) h->n_layer * h->n_head * n) {
        return SCOPE_HOOK_E_ARG;
    }
    if (first_not_held(h, seq, cells, n) >= 0) {
        return SCOPE_HOOK_E_ARG;
    }
    for (int32_t lh = 0; lh < h->n_layer * h->n_head; lh++) {
        const float * src = h->acc + (size_t) lh * h->n_cells;
        float * dst = out + (size_t) lh * n;
        for (int32_t i = 0; i < n; i++) {
            dst[i] = src[cells[i]];
        }
    }
    if (rows_out) {
        memcpy(rows_out, h->rows + (size_t) seq * h->n_layer, sizeof(int32_t) * (size_t) h->n_layer);
    }
    return SCOPE_HOOK_OK;
}

int32_t scope_hook_capture_reduce_seq(const scope_hook * h, int32_t seq, const int32_t * cells, int32_t n,
                                      int32_t reduce, float * out, int64_t capacity, int32_t * rows_out) {
    if (!h || bad_seq(h, seq) || n < 0 || (n > 0 && (!cells || !out)) || capacity < (int64_t) h->n_layer * n ||
        (reduce != SCOPE_HOOK_HEADS_SUM && reduce != SCOPE_HOOK_HEADS_MAX)) {
        return SCOPE_HOOK_E_ARG;
    }
    if (first_not_held(h, seq, cells, n) >= 0) {
        return SCOPE_HOOK_E_ARG;
    }
    /* Reduce each layer's heads along the rows (contiguous, vectorisable),
     * then gather the n cells from the one reduced row: a ninth of the
     * scattered reads of reducing after the gather. */
    float * row = malloc(sizeof(float) * (size_t) h->n_cells);
    if (!row) {
        return SCOPE_HOOK_E_NOMEM;
    }
    for (int32_t il = 0; il < h->n_layer; il++) {
        const float * src = h->acc + (size_t) il * h->n_head * h->n_cells;
        memcpy(row, src, sizeof(float) * (size_t) h->n_cells);
        for (int32_t hd = 1; hd < h->n_head; hd++) {
            const float * head = src + (size_t) hd * h->n_cells;
            if (reduce == SCOPE_HOOK_HEADS_MAX) {
                for (int32_t c = 0; c < h->n_cells; c++) {
                    row[c] = head[c] > row[c] ? head[c] : row[c];
                }
            } else {
                for (int32_t c = 0; c < h->n_cells; c++) {
                    row[c] += head[c];
                }
            }
        }
        float * dst = out + (size_t) il * n;
        for (int32_t i = 0; i < n; i++) {
            dst[i] = row[cells[i]];
        }
    }
    free(row);
    if (rows_out) {
        memcpy(rows_out, h->rows + (size_t) seq * h->n_layer, sizeof(int32_t) * (size_t) h->n_layer);
    }
    return SCOPE_HOOK_OK;
}

int32_t scope_hook_held_seq(const scope_hook * h, int32_t seq, int32_t min_pos, int32_t * cells_out,
                            int32_t * pos_out, int32_t capacity) {
    if (!h || bad_seq(h, seq) || capacity < 0 || (capacity > 0 && (!cells_out || !pos_out))) {
        return SCOPE_HOOK_E_ARG;
    }
    /* Positions are unique within a sequence and >= 0: an LSD radix sort of
     * the cells by position, 8 bits a pass, as many passes as the largest
     * position needs (two below 65,536). */
    int32_t n = 0, max_pos = 0;
    for (int32_t c = 0; c < h->n_cells; c++) {
        if (h->cell_seq[c] == seq && h->cell_pos[c] >= min_pos) {
            if (n == capacity) {
                return SCOPE_HOOK_E_ARG;
            }
            cells_out[n++] = c;
            max_pos = h->cell_pos[c] > max_pos ? h->cell_pos[c] : max_pos;
        }
    }
    int32_t * tmp = malloc(sizeof(int32_t) * (size_t) (n > 0 ? n : 1));
    if (!tmp) {
        return SCOPE_HOOK_E_NOMEM;
    }
    int32_t * src = cells_out, * dst = tmp;
    for (int shift = 0; shift < 32 && (max_pos >> shift) > 0; shift += 8) {
        int32_t count[257] = {0};
        for (int32_t i = 0; i < n; i++) {
            count[((h->cell_pos[src[i]] >> shift) & 0xff) + 1]++;
        }
        for (int b = 0; b < 256; b++) {
            count[b + 1] += count[b];
        }
        for (int32_t i = 0; i < n; i++) {
            dst[count[(h->cell_pos[src[i]] >> shift) & 0xff]++] = src[i];
        }
        int32_t * t = src; src = dst; dst = t;
    }
    if (src != cells_out) {
        memcpy(cells_out, src, sizeof(int32_t) * (size_t) n);
    }
    free(tmp);
    for (int32_t i = 0; i < n; i++) {
        pos_out[i] = h->cell_pos[cells_out[i]];
    }
    return n;
}

int32_t scope_hook_cells(const scope_hook * h, int32_t * out, int32_t n_cells) {
    if (!h || !out || n_cells != h->n_cells) {
        return SCOPE_HOOK_E_ARG;
    }
    memcpy(out, h->cell_pos, sizeof(int32_t) * (size_t) n_cells);
    return SCOPE_HOOK_OK;
}

int32_t scope_hook_cell_seqs(const scope_hook * h, int32_t * out, int32_t n_cells) {
    if (!h || !out || n_cells != h->n_cells) {
        return SCOPE_HOOK_E_ARG;
    }
    memcpy(out, h->cell_seq, sizeof(int32_t) * (size_t) n_cells);
    return SCOPE_HOOK_OK;
}

int32_t scope_hook_visible(const scope_hook * h, int32_t * out, int32_t capacity, int32_t * n_kv) {
    return scope_hook_visible_seq(h, 0, out, capacity, n_kv);
}

int32_t scope_hook_visible_seq(const scope_hook * h, int32_t seq, int32_t * out, int32_t capacity, int32_t * n_kv) {
    if (!h || capacity < 0 || bad_seq(h, seq)) {
        return SCOPE_HOOK_E_ARG;
    }
    if (out) {
        int32_t k = 0;
        for (int32_t j = 0; j < h->n_cells && k < capacity; j++) {
            if (h->vis_seq[j] == seq) {
                out[k++] = j;
            }
        }
    }
    if (n_kv) {
        *n_kv = h->n_kv;
    }
    return h->n_visible[seq];
}

/* After a memory operation: llama.cpp's lowest and highest position of
 * sequence seq must be the map's, or the map no longer describes the cache. */
static int32_t verify(scope_hook * h, struct llama_context * ctx, int32_t seq, const char * op) {
    int32_t lo = -1, hi = -1;
    for (int32_t i = 0; i < h->n_cells; i++) {
        int32_t p = h->cell_pos[i];
        if (p >= 0 && h->cell_seq[i] == seq) {
            lo = lo < 0 || p < lo ? p : lo;
            hi = p > hi ? p : hi;
        }
    }
    llama_memory_t mem = llama_get_memory(ctx);
    const llama_pos got_lo = llama_memory_seq_pos_min(mem, seq), got_hi = llama_memory_seq_pos_max(mem, seq);
    /* llama.cpp's iSWA memory answers from its SWA cache, which holds a suffix of the full-attention cache's
     * positions (it overwrites the ones that left the window): its lowest may be above the map's */
    if (got_hi != hi || (h->iswa ? got_lo < lo || (lo < 0) != (got_lo < 0) : got_lo != lo)) {
        return fail(h, SCOPE_HOOK_E_LLAMA, "%s: llama.cpp holds positions [%d, %d] of sequence %d but the map "
                    "holds [%d, %d]; the cell map no longer matches the cache (clear it)", op, got_lo, got_hi, seq,
                    lo, hi);
    }
    return SCOPE_HOOK_OK;
}

static int cmp_i32(const void * a, const void * b) {
    int32_t x = *(const int32_t *) a, y = *(const int32_t *) b;
    return (x > y) - (x < y);
}

/* The held position of cell i if it belongs to seq, else -1. */
static int32_t pos_in(const scope_hook * h, int32_t i, int32_t seq) {
    return h->cell_seq[i] == seq ? h->cell_pos[i] : -1;
}

int32_t scope_hook_evict(scope_hook * h, struct llama_context * ctx, const int32_t * positions, int32_t n,
                         int32_t * n_freed) {
    return scope_hook_evict_seq(h, ctx, 0, positions, n, n_freed);
}

int32_t scope_hook_evict_seq(scope_hook * h, struct llama_context * ctx, int32_t seq, const int32_t * positions,
                             int32_t n, int32_t * n_freed) {
    if (!h || !ctx || n < 0 || (n > 0 && !positions) || bad_seq(h, seq)) {
        return h ? fail(h, SCOPE_HOOK_E_ARG, "evict: bad arguments (sequence %d of %d, n=%d)", seq, h->n_seq, n)
                 : SCOPE_HOOK_E_ARG;
    }
    if (n_freed) {
        *n_freed = 0;
    }
    if (n == 0) {
        return SCOPE_HOOK_OK;
    }
    int32_t * sorted = malloc(sizeof(int32_t) * (size_t) n);
    if (!sorted) {
        return fail(h, SCOPE_HOOK_E_NOMEM, "evict: out of memory");
    }
    memcpy(sorted, positions, sizeof(int32_t) * (size_t) n);
    qsort(sorted, (size_t) n, sizeof(int32_t), cmp_i32);

    /* every position must be held by the sequence; its highest held one must stay */
    int32_t pos_max = -1, held = 0;
    for (int32_t i = 0; i < h->n_cells; i++) {
        if (pos_in(h, i, seq) > pos_max) {
            pos_max = pos_in(h, i, seq);
        }
    }
    for (int32_t i = 0; i < h->n_cells; i++) {
        int32_t p = pos_in(h, i, seq);
        if (p >= 0 && bsearch(&p, sorted, (size_t) n, sizeof(int32_t), cmp_i32)) {
            held++;
        }
    }
    int32_t n_unique = n > 0 ? 1 : 0;
    for (int32_t i = 1; i < n; i++) {
        n_unique += sorted[i] != sorted[i - 1];
    }
    int32_t rc = SCOPE_HOOK_OK;
    if (sorted[n - 1] == pos_max) {
        rc = fail(h, SCOPE_HOOK_E_LAST_POS, "evict: refusing to evict position %d, the last of sequence %d "
                  "(the next token must follow it)", pos_max, seq);
    } else if (held != n_unique) {
        rc = fail(h, SCOPE_HOOK_E_NOT_HELD, "evict: %d of the %d positions asked for are not held by any cell of "
                  "sequence %d", n_unique - held, n_unique, seq);
    }
    llama_memory_t mem = llama_get_memory(ctx);
    int32_t n_done = 0; /* sorted[0..n_done) are gone from llama.cpp */
    for (int32_t i = 0; rc == SCOPE_HOOK_OK && i < n;) {
        int32_t j = i;
        while (j + 1 < n && sorted[j + 1] <= sorted[j] + 1) {
            j++;
        }
        if (!llama_memory_seq_rm(mem, seq, sorted[i], sorted[j] + 1)) {
            rc = fail(h, SCOPE_HOOK_E_LLAMA, "evict: llama_memory_seq_rm(%d, %d, %d) failed after %d of %d "
                      "positions were removed (the map follows what was)", seq, sorted[i], sorted[j] + 1, n_done, n);
        } else {
            n_done = j + 1;
        }
        i = j + 1;
    }
    /* the map drops what llama.cpp dropped, even when a later run failed */
    int32_t freed = 0;
    for (int32_t i = 0; n_done > 0 && i < h->n_cells; i++) {
        int32_t p = pos_in(h, i, seq);
        if (p >= 0 && bsearch(&p, sorted, (size_t) n_done, sizeof(int32_t), cmp_i32)) {
            h->cell_pos[i] = -1;
            h->cell_seq[i] = -1;
            freed++;
        }
    }
    if (n_freed) {
        *n_freed = freed;
    }
    if (n_done > 0 && rc == SCOPE_HOOK_OK) {
        rc = verify(h, ctx, seq, "evict");
    }
    free(sorted);
    return rc;
}

int32_t scope_hook_shift(scope_hook * h, struct llama_context * ctx, int32_t p0, int32_t p1, int32_t delta) {
    return scope_hook_shift_seq(h, ctx, 0, p0, p1, delta);
}

int32_t scope_hook_shift_seq(scope_hook * h, struct llama_context * ctx, int32_t seq, int32_t p0, int32_t p1,
                             int32_t delta) {
    if (!h || !ctx || p0 < 0 || p1 < p0 || bad_seq(h, seq)) {
        return h ? fail(h, SCOPE_HOOK_E_ARG, "shift: bad range [%d, %d) or sequence %d (of %d)", p0, p1, seq,
                        h->n_seq) : SCOPE_HOOK_E_ARG;
    }
    if ((int64_t) p1 - 1 + delta > INT32_MAX - 1) {
        return fail(h, SCOPE_HOOK_E_ARG, "shift: positions up to %d + %d would pass the int32 range", p1 - 1, delta);
    }
    llama_memory_t mem = llama_get_memory(ctx);
    if (!llama_memory_can_shift(mem)) {
        return fail(h, SCOPE_HOOK_E_LLAMA, "shift: this model's memory cannot shift positions");
    }
    llama_memory_seq_add(mem, seq, p0, p1, delta);
    for (int32_t i = 0; i < h->n_cells; i++) {
        int32_t p = pos_in(h, i, seq);
        if (p >= p0 && p < p1) {
            const bool gone = (int64_t) p + delta < 0;
            h->cell_pos[i] = gone ? -1 : p + delta;
            h->cell_seq[i] = gone ? -1 : seq;
            for (int32_t il = 0; h->sk_valid && il < h->n_layer; il++) { /* K was re-rotated */
                h->sk_valid[(size_t) il * h->n_cells + i] = 0;
            }
        }
    }
    return verify(h, ctx, seq, "shift");
}

int32_t scope_hook_truncate(scope_hook * h, struct llama_context * ctx, int32_t p0) {
    return scope_hook_truncate_seq(h, ctx, 0, p0);
}

int32_t scope_hook_truncate_seq(scope_hook * h, struct llama_context * ctx, int32_t seq, int32_t p0) {
    if (!h || !ctx || p0 < 0 || bad_seq(h, seq)) {
        return h ? fail(h, SCOPE_HOOK_E_ARG, "truncate: bad position %d or sequence %d (of %d)", p0, seq, h->n_seq)
                 : SCOPE_HOOK_E_ARG;
    }
    if (!llama_memory_seq_rm(llama_get_memory(ctx), seq, p0, -1)) {
        return fail(h, SCOPE_HOOK_E_LLAMA, "truncate: llama_memory_seq_rm(%d, %d, -1) failed", seq, p0);
    }
    for (int32_t i = 0; i < h->n_cells; i++) {
        if (pos_in(h, i, seq) >= p0) {
            h->cell_pos[i] = -1;
            h->cell_seq[i] = -1;
        }
    }
    return verify(h, ctx, seq, "truncate");
}

int32_t scope_hook_clear(scope_hook * h, struct llama_context * ctx) {
    return scope_hook_clear_seq(h, ctx, 0);
}

int32_t scope_hook_clear_seq(scope_hook * h, struct llama_context * ctx, int32_t seq) {
    if (!h || !ctx || bad_seq(h, seq)) {
        return SCOPE_HOOK_E_ARG;
    }
    llama_memory_seq_rm(llama_get_memory(ctx), seq, -1, -1);
    for (int32_t i = 0; i < h->n_cells; i++) {
        if (h->cell_seq[i] == seq) {
            h->cell_pos[i] = -1;
            h->cell_seq[i] = -1;
        }
        h->vis_seq[i] = h->vis_seq[i] == seq ? -1 : h->vis_seq[i];
    }
    h->n_visible[seq] = 0;
    if (h->n_seq == 1) {
        h->n_kv = 0;
    }
    return SCOPE_HOOK_OK;
}

int32_t scope_hook_sketch_set(scope_hook * h, int32_t n_head_kv, int32_t head_dim, int32_t rank,
                              const float * basis, const float * basis_q, float scale, int32_t mode) {
    if (!h) {
        return SCOPE_HOOK_E_ARG;
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

int32_t scope_hook_sketch_query_moments(const scope_hook * h, double * out, int64_t capacity, int64_t * counts) {
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

int32_t scope_hook_sketch_gather_seq(scope_hook * h, int32_t seq, const int32_t * cells, int32_t n, float * out,
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

int32_t scope_hook_keys(scope_hook * h, int32_t il, const int32_t * cells, int32_t n, float * out,
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

int32_t scope_hook_transfers(const scope_hook * h, int64_t * n_reads, int64_t * bytes) {
    if (!h || !n_reads || !bytes) {
        return SCOPE_HOOK_E_ARG;
    }
    *n_reads = h->n_reads;
    *bytes = h->bytes_read;
    return SCOPE_HOOK_OK;
}

const char * scope_hook_last_error(const scope_hook * h) {
    return h ? h->msg : "null hook";
}
