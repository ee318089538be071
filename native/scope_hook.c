/* scope_hook: construction, errors, transfer counters and the helpers every
 * part of the hook shares. See scope_hook.h for the contract and
 * scope_hook_impl.h for how the hook is split. */
#include "scope_hook_impl.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml-backend.h"

scope_hook * scope_hook_new(int32_t n_cells, int32_t n_layer, int32_t n_head, int32_t n_seq, bool kv_unified) {
    if (n_cells <= 0 || n_layer <= 0 || n_head <= 0 || n_seq <= 0 || n_seq > SCOPE_HOOK_MAX_SEQ ||
        (!kv_unified && n_cells % n_seq != 0)) {
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
    h->stream_cells = kv_unified ? 0 : n_cells / n_seq;
    h->cell_pos = malloc(sizeof(int32_t) * (size_t) n_cells);
    h->cell_seq = malloc(sizeof(int32_t) * (size_t) n_cells);
    h->vis_seq  = malloc(sizeof(int32_t) * (size_t) n_cells);
    h->n_visible = calloc((size_t) n_seq, sizeof(int32_t));
    h->seq_last = malloc(sizeof(int32_t) * (size_t) n_seq);
    h->seq_next = malloc(sizeof(int32_t) * (size_t) n_seq);
    h->capture_from = malloc(sizeof(int32_t) * (size_t) n_seq);
    h->capture_heads = malloc(sizeof(int32_t) * (size_t) n_seq);
    h->acc      = calloc((size_t) n_layer * n_head * n_cells, sizeof(float));
    h->rows     = calloc((size_t) n_seq * n_layer, sizeof(int32_t));
    h->capture_layer = malloc((size_t) n_layer);
    h->swa_layer = calloc((size_t) n_layer, 1);
    h->k_cache  = calloc((size_t) n_layer, sizeof(struct ggml_tensor *));
    h->vis      = malloc(sizeof(float) * (size_t) n_cells);
    if (!h->cell_pos || !h->cell_seq || !h->vis_seq || !h->n_visible || !h->seq_last || !h->seq_next ||
        !h->capture_from || !h->capture_heads ||
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
        h->capture_heads[s] = SCOPE_HOOK_HEADS_EACH;
    }
    memset(h->capture_layer, 1, (size_t) n_layer);
    return h;
}

int32_t fail(scope_hook * h, int32_t code, const char * fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(h->msg, sizeof(h->msg), fmt, ap);
    va_end(ap);
    return code;
}

/* Record an error met inside the callback; the first one wins. */
bool fail_cb(scope_hook * h, int32_t code, const char * fmt, ...) {
    if (h->err == SCOPE_HOOK_OK) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(h->msg, sizeof(h->msg), fmt, ap);
        va_end(ap);
        h->err = code;
    }
    return false;
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
    free(h->capture_heads);
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

void read_tensor(scope_hook * h, const struct ggml_tensor * t, void * dst, size_t offset, size_t size) {
    ggml_backend_tensor_get(t, dst, offset, size);
    h->n_reads++;
    h->bytes_read += (int64_t) size;
}

bool grow(void ** buf, size_t * cap, size_t n, size_t elem) {
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

bool ensure_scratch(scope_hook * h, size_t n_floats) {
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

int32_t scope_hook_transfers_get(const scope_hook * h, int64_t * n_reads, int64_t * bytes) {
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
