/* scope_hook: the cell map (which sequence and position each KV cell holds),
 * the queries on it, and the memory operations that keep it and llama.cpp's
 * cache in step (evict, shift, truncate, clear), each verified against
 * llama.cpp afterwards. A K write (scope_hook_graph.c) fills the map. */
#include "scope_hook_impl.h"

#include <stdlib.h>
#include <string.h>

/* Index of the first of cells[0..n) that is out of range or not held by seq; -1 if none. */
int32_t first_not_held(const scope_hook * h, int32_t seq, const int32_t * cells, int32_t n) {
    for (int32_t i = 0; i < n; i++) {
        if (cells[i] < 0 || cells[i] >= h->n_cells || h->cell_seq[cells[i]] != seq) {
            return i;
        }
    }
    return -1;
}

int32_t scope_hook_seq_held(const scope_hook * h, int32_t seq, int32_t min_pos, int32_t * cells_out,
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

int32_t scope_hook_cells_get_pos(const scope_hook * h, int32_t * out, int32_t n_cells) {
    if (!h || !out || n_cells != h->n_cells) {
        return SCOPE_HOOK_E_ARG;
    }
    memcpy(out, h->cell_pos, sizeof(int32_t) * (size_t) n_cells);
    return SCOPE_HOOK_OK;
}

int32_t scope_hook_cells_get_seq(const scope_hook * h, int32_t * out, int32_t n_cells) {
    if (!h || !out || n_cells != h->n_cells) {
        return SCOPE_HOOK_E_ARG;
    }
    memcpy(out, h->cell_seq, sizeof(int32_t) * (size_t) n_cells);
    return SCOPE_HOOK_OK;
}

int32_t scope_hook_seq_visible(const scope_hook * h, int32_t seq, int32_t * out, int32_t capacity, int32_t * n_kv) {
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


int32_t scope_hook_seq_evict(scope_hook * h, struct llama_context * ctx, int32_t seq, const int32_t * positions,
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


int32_t scope_hook_seq_shift(scope_hook * h, struct llama_context * ctx, int32_t seq, int32_t p0, int32_t p1,
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


int32_t scope_hook_seq_truncate(scope_hook * h, struct llama_context * ctx, int32_t seq, int32_t p0) {
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


int32_t scope_hook_seq_clear(scope_hook * h, struct llama_context * ctx, int32_t seq) {
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
