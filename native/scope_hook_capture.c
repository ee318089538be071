/* scope_hook: exact attention capture. Armed sequences' query rows are read
 * from every captured layer's kq_soft_max-<il> and added, per (layer, head,
 * cell), into sums that gather and reduce read out per sequence. (With key
 * sketches set, scope_hook_sketch.c adds into the same sums instead.) */
#include "scope_hook_impl.h"

#include <stdlib.h>
#include <string.h>

static void add_rows(float * dst, const float * rows, int64_t n_rows, int64_t n_kv) {
    for (int64_t r = 0; r < n_rows; r++) {
        const float * src = rows + r * n_kv;
        for (int64_t j = 0; j < n_kv; j++) {
            dst[j] += src[j];
        }
    }

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

int32_t scope_hook_capture_arm(scope_hook * h, int32_t seq, int32_t from_pos) {
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


int32_t scope_hook_capture_gather(const scope_hook * h, int32_t seq, const int32_t * cells, int32_t n,
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

int32_t scope_hook_capture_reduce(const scope_hook * h, int32_t seq, const int32_t * cells, int32_t n,
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
