/* scope_hook: exact attention capture. Armed sequences' query rows are read
 * from every captured layer's kq_soft_max-<il> and added, per (layer, head,
 * cell), into sums that gather and reduce read out per sequence. (With key
 * sketches set, scope_hook_sketch.c adds into the same sums instead.) */
#include "scope_hook_impl.h"

#include <stdlib.h>
#include <string.h>

/* dst[j] (=, when fresh, else +=) the sum of rows[r][j] over the n_rows rows. */
static void add_rows(float * dst, const float * rows, int64_t n_rows, int64_t n_kv, bool fresh) {
    for (int64_t r = 0; r < n_rows; r++) {
        const float * src = rows + r * n_kv;
        if (fresh && r == 0) {
            memcpy(dst, src, sizeof(float) * (size_t) n_kv);
            continue;
        }
        for (int64_t j = 0; j < n_kv; j++) {
            dst[j] += src[j];
        }
    }
}

/* One query row's heads (n_head rows of n_kv, head_stride floats apart)
 * reduced by `heads` into dst (=, when fresh, else +=). Heads in order, as
 * scope_hook_capture_reduce takes them: the same floats for one row. */
static void add_reduced(float * dst, const float * row, int64_t n_head, int64_t n_kv, size_t head_stride,
                        int32_t heads, bool fresh) {
    for (int64_t j = 0; j < n_kv; j++) {
        float v = row[j];
        for (int64_t hd = 1; hd < n_head; hd++) {
            const float x = row[(size_t) hd * head_stride + j];
            v = heads == SCOPE_HOOK_HEADS_MAX ? (x > v ? x : v) : v + x;
        }
        dst[j] = fresh ? v : dst[j] + v;
    }
}

/* Whether a sequence's rows cover every cell it may hold, the others'
 * columns being theirs alone: its own stream, or the only sequence (and the
 * exact path: the sketch scorers add into zeroed sums). Then a layer's first
 * row after arm overwrites the sums instead of adding to zeroed ones, and
 * arm zeroes nothing. */
static bool own_columns(const scope_hook * h) {
    return h->sk_rank == 0 && (h->n_seq == 1 || h->stream_cells > 0);
}

/* Add rows [first, first + n_rows) of one stream of kq_soft_max-<il> (laid
 * out [n_kv, n_tps, n_head] from byte `at`) into sequence seq's sums of the
 * cells from `base`. Each read is a transfer (a round trip on RPC, a copy
 * over PCIe): when the run is all the stream's rows (decode steps) the heads
 * are contiguous and one read takes the layer; otherwise the run is read
 * head by head. A row's masked cells (other sequences', empty ones) are
 * exactly 0, so adding the whole row only feeds its own sequence's cells.
 * Sums armed reduced (capture_heads) live in the layer's head-0 row. */
static bool add_run(scope_hook * h, const struct ggml_tensor * t, int il, size_t at, int32_t seq, int32_t base,
                    int64_t first, int64_t n_rows) {
    const int64_t n_kv = t->ne[0], n_tps = t->ne[1], n_head = t->ne[2];
    const int32_t heads = h->capture_heads[seq];
    const bool first_rows = h->rows[(size_t) seq * h->n_layer + il] == 0;
    if (heads == SCOPE_HOOK_HEADS_MAX && (n_rows > 1 || !first_rows)) {
        fail_cb(h, SCOPE_HOOK_E_STATE, "sequence %d, armed to keep the heads' maximum, gave a second query row in "
                "layer %d: a maximum of sums needs every head kept", seq, il);
        return true;
    }
    const bool fresh = first_rows && own_columns(h), whole = n_rows == n_tps;
    /* every head's rows [n_head][n_rows][n_kv] at once to reduce them, else one head's at a time */
    const bool all_heads = whole || heads != SCOPE_HOOK_HEADS_EACH;
    const size_t run = (size_t) (n_rows * n_kv);
    if (!ensure_scratch(h, (all_heads ? (size_t) n_head : 1) * run)) {
        return false;
    }
    for (int64_t hd = 0; all_heads && hd < (whole ? 1 : n_head); hd++) {
        read_tensor(h, t, h->scratch + hd * run, at + (whole ? 0 : hd * t->nb[2] + first * t->nb[1]),
                    (whole ? (size_t) n_head : 1) * run * sizeof(float));
    }
    float * layer = h->acc + (size_t) il * h->n_head * h->n_cells + base;
    if (heads != SCOPE_HOOK_HEADS_EACH) {
        for (int64_t r = 0; r < n_rows; r++) {
            add_reduced(layer, h->scratch + r * n_kv, n_head, n_kv, run, heads, fresh && r == 0);
        }
        return true;
    }
    for (int64_t hd = 0; hd < n_head; hd++) {
        if (!all_heads) {
            read_tensor(h, t, h->scratch, at + hd * t->nb[2] + first * t->nb[1], run * sizeof(float));
        }
        add_rows(layer + (size_t) hd * h->n_cells, h->scratch + (all_heads ? hd * run : 0), n_rows, n_kv, fresh);
    }
    return true;
}

bool on_softmax(scope_hook * h, const struct ggml_tensor * t, int il) {
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
    /* per stream, rows of armed sequences at positions >= their capture_from, read run by run (a run is one
     * sequence's: its sums are kept as it was armed) */
    for (int64_t st = 0; st < n_stream; st++) {
        const int32_t * rows = h->ub_rows + st * n_tps;
        const int32_t base = stream_base(h, rows[0]);
        for (int64_t r = 0; r < n_tps;) {
            if (!captured_row(h, rows[r])) {
                r++;
                continue;
            }
            const int32_t seq = h->batch_seq[rows[r]];
            int64_t end = r + 1;
            while (end < n_tps && captured_row(h, rows[end]) && h->batch_seq[rows[end]] == seq) {
                end++;
            }
            if (!add_run(h, t, il, st * t->nb[3], seq, base, r, end - r)) {
                fail_cb(h, SCOPE_HOOK_E_NOMEM, "out of memory reading kq_soft_max-%d", il);
                return true;
            }
            h->rows[(size_t) seq * h->n_layer + il] += (int32_t) (end - r);
            r = end;
        }
    }
    return true;
}

int32_t scope_hook_capture_set_layers(scope_hook * h, const uint8_t * layers, int32_t n_layer) {
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

int32_t scope_hook_capture_arm(scope_hook * h, int32_t seq, int32_t from_pos, int32_t heads) {
    if (!h || from_pos < SCOPE_HOOK_CAPTURE_OFF || bad_seq(h, seq) || heads < SCOPE_HOOK_HEADS_EACH ||
        heads > SCOPE_HOOK_HEADS_MAX) {
        return h ? fail(h, SCOPE_HOOK_E_ARG, "capture_arm: sequence %d (of %d), from_pos %d (>= -1), heads %d "
                        "(-1, 0 or 1)", seq, h->n_seq, from_pos, heads) : SCOPE_HOOK_E_ARG;
    }
    h->n_armed += (from_pos >= 0) - (h->capture_from[seq] >= 0);
    h->capture_from[seq] = from_pos;
    if (from_pos == SCOPE_HOOK_CAPTURE_OFF) {
        return SCOPE_HOOK_OK; /* keep what was captured readable */
    }
    h->capture_heads[seq] = h->sk_rank > 0 ? SCOPE_HOOK_HEADS_EACH : heads;
    /* A layer with no row summed reads as zeros, and on its own columns a
     * first row overwrites (add_run): the row counts are all arm resets. */
    memset(h->rows + (size_t) seq * h->n_layer, 0, sizeof(int32_t) * (size_t) h->n_layer);
    if (own_columns(h)) {
        return SCOPE_HOOK_OK;
    }
    if (h->n_seq == 1) {
        memset(h->acc, 0, sizeof(float) * (size_t) h->n_layer * h->n_head * h->n_cells);
        return SCOPE_HOOK_OK;
    }
    /* row by row: a cell-major walk strides n_cells floats per write (0.6 ms at 1,024 cells) */
    for (int32_t lh = 0; lh < h->n_layer * h->n_head; lh++) {
        float * row = h->acc + (size_t) lh * h->n_cells;
        for (int32_t c = 0; c < h->n_cells; c++) {
            row[c] = h->cell_seq[c] == seq ? 0.0f : row[c];
        }
    }
    return SCOPE_HOOK_OK;
}

/* The sums of layer il that sequence seq's capture summed rows into (NULL: none, they read as zeros). */
static const float * layer_sums(const scope_hook * h, int32_t seq, int32_t il) {
    return h->rows[(size_t) seq * h->n_layer + il] ? h->acc + (size_t) il * h->n_head * h->n_cells : NULL;
}

int32_t scope_hook_capture_gather(const scope_hook * h, int32_t seq, const int32_t * cells, int32_t n,
                                  float * out, int64_t capacity, int32_t * rows_out) {
    if (!h || bad_seq(h, seq) || n < 0 || (n > 0 && (!cells || !out)) ||
        capacity < (int64_t) h->n_layer * h->n_head * n || h->capture_heads[seq] != SCOPE_HOOK_HEADS_EACH) {
        return SCOPE_HOOK_E_ARG;
    }
    if (first_not_held(h, seq, cells, n) >= 0) {
        return SCOPE_HOOK_E_ARG;
    }
    for (int32_t il = 0; il < h->n_layer; il++) {
        const float * sums = layer_sums(h, seq, il);
        for (int32_t hd = 0; hd < h->n_head; hd++) {
            const float * src = sums ? sums + (size_t) hd * h->n_cells : NULL;
            float * dst = out + ((size_t) il * h->n_head + hd) * n;
            for (int32_t i = 0; i < n; i++) {
                dst[i] = src ? src[cells[i]] : 0.0f;
            }
        }
    }
    if (rows_out) {
        memcpy(rows_out, h->rows + (size_t) seq * h->n_layer, sizeof(int32_t) * (size_t) h->n_layer);
    }
    return SCOPE_HOOK_OK;
}

/* Layer sums of every head reduced into row[n_cells] (heads in order). */
static void reduce_heads(const scope_hook * h, const float * sums, int32_t reduce, float * row) {
    memcpy(row, sums, sizeof(float) * (size_t) h->n_cells);
    for (int32_t hd = 1; hd < h->n_head; hd++) {
        const float * head = sums + (size_t) hd * h->n_cells;
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
}

int32_t scope_hook_capture_reduce(const scope_hook * h, int32_t seq, const int32_t * cells, int32_t n,
                                  int32_t reduce, float * out, int64_t capacity, int32_t * rows_out) {
    if (!h || bad_seq(h, seq) || n < 0 || (n > 0 && (!cells || !out)) || capacity < (int64_t) h->n_layer * n ||
        (reduce != SCOPE_HOOK_HEADS_SUM && reduce != SCOPE_HOOK_HEADS_MAX)) {
        return SCOPE_HOOK_E_ARG;
    }
    const int32_t kept = h->capture_heads[seq];
    if ((kept != SCOPE_HOOK_HEADS_EACH && kept != reduce) || first_not_held(h, seq, cells, n) >= 0) {
        return SCOPE_HOOK_E_ARG;
    }
    /* Sums of every head: reduce each layer's heads along the rows
     * (contiguous, vectorisable), then gather the n cells from the one
     * reduced row, a ninth of the scattered reads of reducing after the
     * gather. Sums armed reduced are that row already. */
    float * row = kept == SCOPE_HOOK_HEADS_EACH ? malloc(sizeof(float) * (size_t) h->n_cells) : NULL;
    if (kept == SCOPE_HOOK_HEADS_EACH && !row) {
        return SCOPE_HOOK_E_NOMEM;
    }
    for (int32_t il = 0; il < h->n_layer; il++) {
        const float * sums = layer_sums(h, seq, il);
        if (sums && row) {
            reduce_heads(h, sums, reduce, row);
        }
        const float * src = row ? row : sums;
        float * dst = out + (size_t) il * n;
        for (int32_t i = 0; i < n; i++) {
            dst[i] = sums ? src[cells[i]] : 0.0f;
        }
    }
    free(row);
    if (rows_out) {
        memcpy(rows_out, h->rows + (size_t) seq * h->n_layer, sizeof(int32_t) * (size_t) h->n_layer);
    }
    return SCOPE_HOOK_OK;
}
