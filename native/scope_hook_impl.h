/*
 * scope_hook internals, shared by the hook's source files (not installed,
 * not for callers: the public API is scope_hook.h).
 *
 * The hook is split by concern, as llama.cpp splits src/llama-*.cpp:
 *   scope_hook.c          constructor, destructor, errors, transfer counters,
 *                         the shared helpers declared below;
 *   scope_hook_map.c      the cell map: cells -> (sequence, position), held
 *                         cells, visibility queries, evict / shift / truncate /
 *                         clear and their verification against llama.cpp;
 *   scope_hook_graph.c    graph recognition (K writes, masks, attention nodes),
 *                         the eval callback, begin / end, sliding-window layers;
 *   scope_hook_capture.c  exact capture: arming, accumulating kq_soft_max rows,
 *                         gathering and reducing the sums;
 *   scope_hook_sketch.c   key sketches: fp16 / AVX2 kernels, sketch upkeep,
 *                         sketch scoring, query moments, key reads.
 *
 * Each group of fields below names the file that owns it (writes it outside
 * construction); other files only read it, except where a comment says so.
 */
#ifndef SCOPE_HOOK_IMPL_H
#define SCOPE_HOOK_IMPL_H

#include "scope_hook.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Internal functions shared between the hook's files: never exported from
 * the extension, so they cannot clash with, or be interposed by, another
 * library's symbols of the same name. */
#if defined(__GNUC__)
#define SCOPE_HOOK_INTERNAL __attribute__((visibility("hidden")))
#define SCOPE_HOOK_PRINTF(fmt, args) __attribute__((format(printf, fmt, args)))
#else
#define SCOPE_HOOK_INTERNAL
#define SCOPE_HOOK_PRINTF(fmt, args)
#endif

/* Names of llama.cpp's graph tensors (llama-graph.cpp, llama-kv-cache.cpp) that the hook recognises. */
#define SOFTMAX_PREFIX "kq_soft_max-"
#define K_IDXS_NAME    "attn_inp_k_idxs"
#define K_CACHE_PREFIX "cache_k_l"
#define MASK_NAME      "attn_inp_kq_mask"
#define KQ_PREFIX      "kq-"

struct scope_hook {
    /* dimensions (fixed at scope_hook_new) */
    int32_t n_cells;
    int32_t n_layer;
    int32_t n_head;
    int32_t n_seq;           /* sequences: ids in [0, n_seq) */
    int32_t stream_cells;    /* cells per sequence's stream (kv_unified = false); 0: one unified stream */

    /* cell map (scope_hook_map.c; a K write in scope_hook_graph.c fills cells) */
    int32_t * cell_pos;      /* [n_cells] position held by each cell, -1 empty */
    int32_t * cell_seq;      /* [n_cells] sequence of each cell, -1 empty */

    /* the decode in progress, between begin and end (scope_hook_graph.c) */
    bool      in_decode;
    int32_t * batch_pos;     /* positions of the batch tokens */
    int32_t * batch_seq;     /* sequence of each batch token */
    int32_t * batch_next;    /* next batch token of the same sequence, -1 none */
    int32_t * seq_next;      /* [n_seq] streams: the sequence's first batch token not written yet, -1 none */
    int32_t * ub_rows;       /* batch index of each row of the current ubatch */
    int32_t   batch_cap;
    int32_t   batch_n;
    int32_t   written;       /* tokens whose cell was read so far */
    int32_t   ub_n;          /* tokens (rows) in the current ubatch */
    int32_t   n_ubatch;      /* ubatches (layer-0 K writes) seen in this decode */
    int32_t   n_mask;        /* layer-0 attention masks read in this decode */

    /* layers as the graph shows them (scope_hook_graph.c) */
    uint8_t * swa_layer;     /* [n_layer] 1: a sliding-window layer, whose cells are llama.cpp's SWA cache's */
    int32_t   k_layer;       /* the lowest full-attention layer: its K write and mask are the map's */
    bool      iswa;          /* some layer is a sliding-window one (llama.cpp's iSWA memory) */
    const struct ggml_tensor * k_idxs; /* its write-index input in the latest graph */
    struct ggml_tensor ** k_cache; /* [n_layer] cache_k_l<il>, seen in the graph (NULL until then) */

    /* visibility: per sequence, of its last query row in the latest ubatch holding it
     * (scope_hook_graph.c reads the mask; scope_hook_map.c answers and clears) */
    int32_t * vis_seq;       /* [n_cells] sequence whose last row sees the cell, -1 none */
    int32_t * n_visible;     /* [n_seq] */
    int32_t * seq_last;      /* [n_seq] scratch: last row of each sequence in the ubatch */
    int32_t   n_kv;

    /* attention capture (scope_hook_capture.c; the sketch scorers add into acc and rows too) */
    int32_t * capture_from;  /* [n_seq] capture that sequence's query rows at positions >= this; -1 off */
    int32_t   n_armed;       /* sequences whose capture is on */
    int32_t * capture_heads; /* [n_seq] enum scope_hook_heads: how the sequence's sums are kept since its arm */
    uint8_t * capture_layer; /* [n_layer] 1: layer il is captured */
    int32_t   first_layer;   /* lowest captured layer */
    float   * acc;           /* [n_layer][n_head][n_cells]; a cell's sums are its sequence's (kept reduced:
                                in head 0's row); a layer's are stale while its rows count is 0 */
    int32_t * rows;          /* [n_seq][n_layer] query rows summed since the sequence's arm */
    float   * scratch;       /* tensor reads inside the callback (ensure_scratch) */
    size_t    scratch_cap;   /* floats */

    /* key sketches (scope_hook_sketch.c); sk_rank 0: scores are attention probabilities */
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
    uint8_t * sk_valid;      /* [n_layer][n_cells] 1: the sketch is of the key the cell holds now
                                (cleared by a K write and by a shift) */
    float   * kbuf;          /* dequantized keys / query rows / logits */
    size_t    kbuf_cap;      /* floats */
    uint8_t * raw;           /* K rows as stored */
    size_t    raw_cap;       /* bytes */
    float   * vis;           /* [n_cells] 1: the query row being scored sees the cell, else 0 */

    /* counters and errors (scope_hook.c) */
    int64_t   n_reads;       /* tensor reads (transfers on a device) since creation */
    int64_t   bytes_read;
    int32_t   err;           /* first error met inside the callback */
    char      msg[512];
};

/* ---- scope_hook.c: errors, reads, buffers --------------------------------- */

/* Record a failure of a call: its message, and return code. */
SCOPE_HOOK_INTERNAL int32_t fail(scope_hook * h, int32_t code, const char * fmt, ...)
    SCOPE_HOOK_PRINTF(3, 4);
/* Record an error met inside the callback (the first one wins; scope_hook_end
 * returns it). Returns false, the callback's "do not observe". */
SCOPE_HOOK_INTERNAL bool fail_cb(scope_hook * h, int32_t code, const char * fmt, ...)
    SCOPE_HOOK_PRINTF(3, 4);
/* Every tensor read goes through here: backend-agnostic, and counted. */
SCOPE_HOOK_INTERNAL void read_tensor(scope_hook * h, const struct ggml_tensor * t, void * dst, size_t offset,
                                     size_t size);
/* Grow *buf to at least n elements of elem bytes; false: out of memory (*buf unchanged). */
SCOPE_HOOK_INTERNAL bool grow(void ** buf, size_t * cap, size_t n, size_t elem);
/* h->scratch to at least n_floats floats; false: out of memory. */
SCOPE_HOOK_INTERNAL bool ensure_scratch(scope_hook * h, size_t n_floats);

/* ---- scope_hook_map.c ------------------------------------------------------ */

/* Index of the first of cells[0..n) that is out of range or not held by seq; -1 if none. */
SCOPE_HOOK_INTERNAL int32_t first_not_held(const scope_hook * h, int32_t seq, const int32_t * cells, int32_t n);

/* ---- scope_hook_graph.c ---------------------------------------------------- */

/* Layer index of a "<prefix><il>" name, or -1. */
SCOPE_HOOK_INTERNAL int parse_layer(const char * name, const char * prefix);

/* ---- scope_hook_capture.c -------------------------------------------------- */

/* Computed kq_soft_max-<il>: add the captured rows' probabilities per cell.
 * Returns true (the callback's "keep going"); errors go to fail_cb. */
SCOPE_HOOK_INTERNAL bool on_softmax(scope_hook * h, const struct ggml_tensor * t, int il);

/* ---- scope_hook_sketch.c --------------------------------------------------- */

/* Layer of a K-cache tensor or a view of one ("cache_k_l<il>"), or -1. */
SCOPE_HOOK_INTERNAL int k_cache_layer(const struct ggml_tensor * t);
/* Computed attention of layer il (flash attention, or kq-<il> without it),
 * sketch mode: score the captured rows of the ubatch from their queries. */
SCOPE_HOOK_INTERNAL bool on_sketch_attn(scope_hook * h, const struct ggml_tensor * t, int il);
/* Whether the softmax scale a node applies is the sketches', with no ALiBi or
 * soft-cap; records the error (fail_cb) if not. */
SCOPE_HOOK_INTERNAL bool check_scale(scope_hook * h, const struct ggml_tensor * t, int il);

/* ---- small helpers, inline (called per row or per node) -------------------- */

static inline bool bad_seq(const scope_hook * h, int32_t seq) {
    return seq < 0 || seq >= h->n_seq;
}

/* First cell of batch token b's stream: its columns in the attention's
 * tensors are cells [base, base + n_kv). */
static inline int32_t stream_base(const scope_hook * h, int32_t b) {
    return h->stream_cells * h->batch_seq[b];
}

/* Most cells one query row can attend over: its stream's, or every cell. */
static inline int32_t attn_width(const scope_hook * h) {
    return h->stream_cells ? h->stream_cells : h->n_cells;
}

/* Whether an attention tensor's [n_kv, rows, n_head, n_stream] fits this
 * ubatch: rows * n_stream == its tokens, one stream per sequence (llama.cpp
 * lays out streams x rows in ubatch order; unified: one stream). */
static inline bool ubatch_shape(const scope_hook * h, int64_t n_kv, int64_t n_rows, int64_t n_stream) {
    return n_kv > 0 && n_kv <= attn_width(h) && n_stream >= 1 && n_rows * n_stream == h->ub_n &&
           (h->stream_cells || n_stream == 1);
}

/* Whether batch row i is captured: its sequence is armed from a position <= its own. */
static inline bool captured_row(const scope_hook * h, int32_t i) {
    const int32_t from = h->capture_from[h->batch_seq[i]];
    return from >= 0 && h->batch_pos[i] >= from;
}

/* Sliding-window layers are never captured: their columns are the SWA cache's cells. */
static inline bool wants_layer(const scope_hook * h, int il) {
    return h->n_armed > 0 && h->capture_layer[il] && !h->swa_layer[il];
}

#endif /* SCOPE_HOOK_IMPL_H */
