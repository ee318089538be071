/* scope_hook: graph recognition and the decode bracket. The eval callback
 * finds, in each graph llama.cpp schedules, the K write of the map's layer
 * (cells written, scope_hook_map.c), that layer's attention mask
 * (visibility), and the attention nodes a capture reads (kq_soft_max-<il>:
 * scope_hook_capture.c; flash attention or kq-<il> with sketches:
 * scope_hook_sketch.c). begin / end bracket one llama_decode and check that
 * the graph showed what the hook needs. */
#include "scope_hook_impl.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

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

int parse_layer(const char * name, const char * prefix) {
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

/* Layer of an attention node: flash attention (its K operand is a view of
 * cache_k_l<il>) or, with it off, kq-<il>; -1 for any other node. */
static int attn_layer(const struct ggml_tensor * t) {
    if (t->op == GGML_OP_FLASH_ATTN_EXT) {
        return k_cache_layer(t->src[1]);
    }
    return t->op == GGML_OP_MUL_MAT ? parse_layer(ggml_get_name(t), KQ_PREFIX) : -1;
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

int32_t scope_hook_begin(scope_hook * h, const int32_t * positions, const int32_t * seq_ids, int32_t n_tokens) {
    if (!h || !positions || n_tokens <= 0) {
        return h ? fail(h, SCOPE_HOOK_E_ARG, "begin: need a non-empty batch, got %d tokens", n_tokens) : SCOPE_HOOK_E_ARG;
    }
    if (!seq_ids) {
        return fail(h, SCOPE_HOOK_E_ARG, "begin: no sequence ids for the %d tokens", n_tokens);
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
        const int32_t s = seq_ids[i];
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
        const int32_t s = seq_ids[i];
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

int32_t scope_hook_swa_set_layers(scope_hook * h, const uint8_t * swa, int32_t n_layer) {
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
