/*
 * scope_hook: observe and evict llama.cpp KV-cache cells, per sequence.
 *
 * The hook is installed as llama_context_params.cb_eval (with the hook as
 * cb_eval_user_data). While the graph runs it
 *   - maps every KV cell written to the (sequence, position) of its token,
 *     reading the K-cache write indices (input `attn_inp_k_idxs` of the
 *     SET_ROWS of the lowest full-attention layer: layer 0, unless
 *     scope_hook_swa_set_layers says otherwise);
 *   - records which cells the attention of each sequence's last token in the
 *     ubatch can see, reading the attention mask (`attn_inp_kq_mask`, src[1]
 *     of that layer's kq_soft_max-<il>);
 *   - when armed for a sequence, accumulates attention probabilities of its
 *     chosen query rows from every layer's `kq_soft_max-<il>` node into per
 *     (layer, head, cell) sums; or, with key sketches set
 *     (scope_hook_sketch_set), approximates those probabilities from the
 *     rows' queries and a low-rank sketch of every held cell's key, which
 *     works with flash attention on (no probabilities are ever computed
 *     there) as well as off.
 *
 * Sequences: a hook made by scope_hook_new(..., n_seq, kv_unified = true)
 * follows sequence ids [0, n_seq) of a context created with n_seq_max = n_seq
 * and one unified KV buffer (llama_context_params.kv_unified = true, so
 * kq_soft_max has one stream and cell indices are global). A cell belongs to
 * one sequence; the mask of a query row hides every other sequence's cells,
 * so a row's probabilities feed only its own sequence's sums. With
 * kv_unified = false the hook follows a context with one KV stream per
 * sequence instead: sequence s owns stream s, cells [s * n_cells / n_seq,
 * (s + 1) * n_cells / n_seq) of the hook's numbering (llama.cpp's write
 * indices are numbered so), each token attends over its own stream only, and
 * llama.cpp splits a batch into ubatches of equal tokens per sequence
 * (split_equal), in an order of its own: the hook places each written token
 * by its stream and its sequence's batch order. Every call that concerns one
 * sequence takes it explicitly (seq in [0, n_seq)).
 *
 * It knows nothing of eviction policies: callers read scores and cell
 * positions, decide, and call scope_hook_seq_evict.
 *
 * All tensor reads go through ggml_backend_tensor_get, so any backend works.
 * With offloaded layers the scheduler hands the device split its own copy of
 * each graph input, named "<backend>#<input>#<copy>"; the hook recognises
 * inputs by their place in the graph (the index operand of layer 0's K write,
 * the mask operand of kq_soft_max-0) and accepts the original name or such a
 * copy. Inputs are read at ask time (they are set, and copied to the device
 * split, before its nodes run), so steps without capture observe no node and
 * force no synchronisation. A captured layer costs one read on decode steps
 * (all heads of one query row are contiguous) and one read per head for a
 * window of prefill rows.
 *
 * Conventions (as llama.h): names are scope_hook_<object>_<verb>
 * (scope_hook_seq_evict, scope_hook_capture_arm), the object left out when it
 * is the hook itself (scope_hook_new, _free, _eval, _begin, _end). Every
 * function returning int32_t returns SCOPE_HOOK_OK (0), a count (>= 0) where
 * its comment says so, or a negative scope_hook_status, and
 * scope_hook_last_error() describes the latest failure. "Ranges:" states
 * what a call accepts: outside them, and for a NULL hook or a NULL required
 * pointer, it returns SCOPE_HOOK_E_ARG. Capacities count elements of the
 * output's type.
 *
 * Sources, split by concern behind the internal header scope_hook_impl.h:
 * scope_hook.c (construction, counters, errors), scope_hook_graph.c (the
 * callback, begin / end), scope_hook_map.c, scope_hook_capture.c,
 * scope_hook_sketch.c.
 */
#ifndef SCOPE_HOOK_H
#define SCOPE_HOOK_H

#include <stdbool.h>
#include <stdint.h>

#include "ggml.h"
#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct scope_hook scope_hook;

/* Most sequences one hook follows. */
#define SCOPE_HOOK_MAX_SEQ 256

enum scope_hook_status {
    SCOPE_HOOK_OK         =  0,
    SCOPE_HOOK_E_ARG      = -1, /* invalid argument (null, out of range) */
    SCOPE_HOOK_E_NOMEM    = -2, /* allocation failed */
    SCOPE_HOOK_E_GRAPH    = -3, /* graph is not what the hook expects (exact capture with flash attention on,
                                   renamed nodes, a scale the sketches were not set with) */
    SCOPE_HOOK_E_SHAPE    = -4, /* a tensor had an unexpected type or shape */
    SCOPE_HOOK_E_LAST_POS = -5, /* refused to evict the last position of the sequence */
    SCOPE_HOOK_E_NOT_HELD = -6, /* asked to evict a position no cell holds */
    SCOPE_HOOK_E_LLAMA    = -7, /* llama.cpp refused the memory operation */
    SCOPE_HOOK_E_STATE    = -8, /* call out of order (end without begin, ...) */
};

/* What a sketch-scored capture adds per cell (scope_hook_sketch_set's mode). */
enum scope_hook_score {
    SCOPE_HOOK_SCORE_ATTENTION = 0, /* softmax(scale * (Bq q) . (B k)): approximate attention */
    SCOPE_HOOK_SCORE_KEYDIFF   = 1, /* 1 - cos(B k, mean over the visible cells): no query needed */
    SCOPE_HOOK_SCORE_KNORM     = 2, /* max |B k| - |B k| over the visible cells: low-norm keys high */
};

/* scope_hook_capture_arm's from_pos that stops capturing. */
#define SCOPE_HOOK_CAPTURE_OFF (-1)

/* ---- construction (scope_hook.c) ------------------------------------------ */

/* Create a hook for a context of n_cells KV cells (llama_n_ctx), n_layer
 * layers and n_head query heads, following sequences [0, n_seq).
 * kv_unified: the context's llama_context_params.kv_unified; false (one KV
 * stream per sequence) needs n_cells to be a multiple of n_seq (llama.cpp
 * makes n_seq streams of a padded size each).
 * Ranges: n_cells, n_layer, n_head >= 1; n_seq in [1, SCOPE_HOOK_MAX_SEQ].
 * Returns NULL on an argument out of range or out of memory. */
scope_hook * scope_hook_new(int32_t n_cells, int32_t n_layer, int32_t n_head, int32_t n_seq, bool kv_unified);

/* Free the hook and everything it allocated. NULL: no-op. */
void scope_hook_free(scope_hook * hook);

/* ---- the decode bracket and the graph (scope_hook_graph.c) ---------------- */

/* The ggml_backend_sched_eval_callback; user_data must be the hook. Errors
 * it meets are kept and returned by scope_hook_end. */
bool scope_hook_eval(struct ggml_tensor * t, bool ask, void * user_data);

/* Before one llama_decode: positions[i] and seq_ids[i] are the position and
 * sequence of batch token i, as in the llama_batch (one sequence per token;
 * both copied). Ranges: n_tokens >= 1; seq_ids[i] in [0, n_seq); positions
 * >= 0 and increasing within each sequence; the tokens of one sequence must
 * be contiguous in the batch for end's capture check.
 * Returns SCOPE_HOOK_OK, SCOPE_HOOK_E_ARG (NULL arrays, a value out of
 * range), SCOPE_HOOK_E_NOMEM. Clears the error the previous decode left. */
int32_t scope_hook_begin(scope_hook * hook, const int32_t * positions, const int32_t * seq_ids, int32_t n_tokens);

/* After the llama_decode that scope_hook_begin announced. Checks that every
 * token was written, that every ubatch showed the map layer's attention
 * (kq_soft_max, or flash attention's node) with its mask and, when a
 * sequence is armed, that every captured layer gave the same rows.
 * Returns SCOPE_HOOK_OK; SCOPE_HOOK_E_ARG (NULL hook); SCOPE_HOOK_E_STATE
 * (no begin, or tokens not written: the decode failed); SCOPE_HOOK_E_GRAPH
 * (renamed nodes; exact capture with flash attention on; a flagged
 * sliding-window layer writing through the full-attention indices; a scale
 * the sketches were not set with); or the first error the callback met
 * (SCOPE_HOOK_E_SHAPE, SCOPE_HOOK_E_NOMEM, SCOPE_HOOK_E_STATE). */
int32_t scope_hook_end(scope_hook * hook);

/* Sliding-window models (llama.cpp's iSWA memory: a full-attention cache
 * and a smaller sliding-window cache behind one llama_memory): swa[n_layer]
 * flags the sliding-window layers. Their K writes and masks name their
 * inputs as the full-attention ones do, so the caller says which they are
 * (the hook checks what it can: a flagged layer writing through the
 * full-attention layer's indices is SCOPE_HOOK_E_GRAPH at end). The map,
 * visibility and evictions are then the full-attention cache's, read at its
 * lowest layer; sliding-window layers are never captured (their columns are
 * the other cache's cells). llama_memory_seq_rm / seq_add act on both caches,
 * and llama_memory_seq_pos_min answers from the sliding-window one (a suffix
 * of the positions), which evict / shift / truncate's check allows for.
 * Call before the first decode. Ranges: n_layer == the hook's; at least one
 * layer not flagged. Returns SCOPE_HOOK_OK, SCOPE_HOOK_E_ARG (NULL swa,
 * wrong count, every layer flagged, inside a decode). */
int32_t scope_hook_swa_set_layers(scope_hook * hook, const uint8_t * swa, int32_t n_layer);

/* ---- capture (scope_hook_capture.c) --------------------------------------- */

/* How a capture's sums are kept and read out per layer: every head
 * (SCOPE_HOOK_HEADS_EACH, for scope_hook_capture_gather), or only their sum
 * or maximum (scope_hook_capture_reduce). */
enum scope_hook_heads {
    SCOPE_HOOK_HEADS_EACH = -1,
    SCOPE_HOOK_HEADS_SUM  = 0,
    SCOPE_HOOK_HEADS_MAX  = 1,
};

/* Capture, in the following decodes, the attention rows of sequence seq's
 * query tokens at positions >= from_pos (0: every row), from zero sums and
 * row counts for that sequence. SCOPE_HOOK_CAPTURE_OFF stops capturing it
 * and keeps its sums readable. Sequences are armed independently. A cell's
 * sums start at 0 whenever a token is written into it.
 * heads: SCOPE_HOOK_HEADS_EACH keeps each head's sums. SUM or MAX says the
 * capture will be read with scope_hook_capture_reduce by that reduction
 * only: the callback reduces each row's heads as it reads the row and keeps
 * one sum per layer and cell (no pass over every head's sums when armed or
 * read; gather and the other reduction are then refused). A maximum of sums
 * cannot be taken row by row, so MAX takes one query row per layer and arm
 * (a decode step's): a second is SCOPE_HOOK_E_STATE at end. With key
 * sketches set every head is kept whatever heads says (reduce reduces them).
 * Ranges: seq in [0, n_seq); from_pos >= SCOPE_HOOK_CAPTURE_OFF; heads an
 * enum scope_hook_heads. Returns SCOPE_HOOK_OK, SCOPE_HOOK_E_ARG. */
int32_t scope_hook_capture_arm(scope_hook * hook, int32_t seq, int32_t from_pos, int32_t heads);

/* Capture only the layers whose flag is non-zero (layers[n_layer]; NULL:
 * every layer, the default). The sums of the other layers stay 0. Each
 * captured layer costs one synchronisation of the graph and one read per
 * step, so fewer layers are cheaper, most of all on a device. Ranges:
 * n_layer == the hook's; at least one full-attention layer flagged.
 * Returns SCOPE_HOOK_OK, SCOPE_HOOK_E_ARG. */
int32_t scope_hook_capture_set_layers(scope_hook * hook, const uint8_t * layers, int32_t n_layer);

/* Gather sequence seq's accumulated sums of cells[0..n), laid out
 * [n_layer][n_head][n], into out. rows_out (n_layer entries, may be NULL)
 * receives the number of the sequence's query rows summed per layer.
 * Ranges: seq in [0, n_seq); n >= 0; each cell in [0, n_cells) and held by
 * seq; capacity >= n_layer * n_head * n. Returns SCOPE_HOOK_OK,
 * SCOPE_HOOK_E_ARG (no message). */
int32_t scope_hook_capture_gather(const scope_hook * hook, int32_t seq, const int32_t * cells, int32_t n,
                                  float * out, int64_t capacity, int32_t * rows_out);

/* scope_hook_capture_gather with the heads reduced: out is laid out
 * [n_layer][n], each entry the sum (reduce SCOPE_HOOK_HEADS_SUM) or the
 * maximum (SCOPE_HOOK_HEADS_MAX) over the layer's heads of the cell's sums.
 * A ninth of the floats written for a policy that reduces heads anyway.
 * Ranges: as gather, with capacity >= n_layer * n, reduce SUM or MAX, and
 * the capture armed with SCOPE_HOOK_HEADS_EACH or that reduction. Returns
 * SCOPE_HOOK_OK, SCOPE_HOOK_E_ARG, SCOPE_HOOK_E_NOMEM (no message). */
int32_t scope_hook_capture_reduce(const scope_hook * hook, int32_t seq, const int32_t * cells, int32_t n,
                                  int32_t reduce, float * out, int64_t capacity, int32_t * rows_out);

/* ---- the cell map (scope_hook_map.c) -------------------------------------- */

/* Copy the position held by each cell (-1: empty) into out[n_cells].
 * Ranges: n_cells == the hook's. Returns SCOPE_HOOK_OK, SCOPE_HOOK_E_ARG. */
int32_t scope_hook_cells_get_pos(const scope_hook * hook, int32_t * out, int32_t n_cells);
/* Copy the sequence of each cell (-1: empty) into out[n_cells].
 * Ranges: n_cells == the hook's. Returns SCOPE_HOOK_OK, SCOPE_HOOK_E_ARG. */
int32_t scope_hook_cells_get_seq(const scope_hook * hook, int32_t * out, int32_t n_cells);

/* The cells sequence seq holds at positions >= min_pos, in position order:
 * their indices into cells_out and their positions into pos_out (both
 * capacity entries). What a capture is gathered over, without a sort in the
 * caller. Ranges: seq in [0, n_seq); capacity >= the cells found.
 * Returns how many (>= 0), SCOPE_HOOK_E_ARG, SCOPE_HOOK_E_NOMEM. */
int32_t scope_hook_seq_held(const scope_hook * hook, int32_t seq, int32_t min_pos, int32_t * cells_out,
                            int32_t * pos_out, int32_t capacity);

/* Cells visible to sequence seq's last query row in the latest ubatch that
 * held the sequence, per llama.cpp's attention mask. Writes up to capacity
 * cell indices (ascending) to out (may be NULL), the attention width of the
 * latest ubatch to *n_kv (may be NULL). Ranges: seq in [0, n_seq);
 * capacity >= 0. Returns the count (>= 0; may exceed capacity),
 * SCOPE_HOOK_E_ARG. */
int32_t scope_hook_seq_visible(const scope_hook * hook, int32_t seq, int32_t * out, int32_t capacity,
                               int32_t * n_kv);

/* Evict positions[0..n) of sequence seq with llama_memory_seq_rm, coalesced
 * into runs. Refuses (changing nothing) if any position is not held or is
 * the highest held position. *n_freed (may be NULL) receives the number of
 * cells freed. If llama.cpp refuses a run partway (SCOPE_HOOK_E_LLAMA), the
 * map drops the runs already removed, so it still describes the cache.
 *
 * evict, shift and truncate check afterwards that llama.cpp's lowest and
 * highest position of the sequence (llama_memory_seq_pos_min/max) are the
 * map's, and return SCOPE_HOOK_E_LLAMA if not: the cache was changed behind
 * the hook's back and the map must be cleared. Other sequences' cells are
 * never touched.
 * Ranges: seq in [0, n_seq); n >= 0. Returns SCOPE_HOOK_OK,
 * SCOPE_HOOK_E_ARG, SCOPE_HOOK_E_NOMEM, SCOPE_HOOK_E_LAST_POS,
 * SCOPE_HOOK_E_NOT_HELD, SCOPE_HOOK_E_LLAMA. */
int32_t scope_hook_seq_evict(scope_hook * hook, struct llama_context * ctx, int32_t seq,
                             const int32_t * positions, int32_t n, int32_t * n_freed);

/* Shift positions [p0, p1) of sequence seq by delta (llama_memory_seq_add,
 * which re-rotates K). Positions shifted below 0 are removed by llama.cpp;
 * the map follows, and the shifted cells' sketches are redone.
 * Ranges: seq in [0, n_seq); 0 <= p0 <= p1; p1 - 1 + delta <= INT32_MAX - 1.
 * Returns SCOPE_HOOK_OK, SCOPE_HOOK_E_ARG, SCOPE_HOOK_E_LLAMA (the memory
 * cannot shift, or the check above failed). */
int32_t scope_hook_seq_shift(scope_hook * hook, struct llama_context * ctx, int32_t seq,
                             int32_t p0, int32_t p1, int32_t delta);

/* Remove every position >= p0 of sequence seq (the last one included), as
 * when a continued conversation diverges from what the cache holds.
 * Ranges: seq in [0, n_seq); p0 >= 0. Returns SCOPE_HOOK_OK,
 * SCOPE_HOOK_E_ARG, SCOPE_HOOK_E_LLAMA. */
int32_t scope_hook_seq_truncate(scope_hook * hook, struct llama_context * ctx, int32_t seq, int32_t p0);

/* Clear sequence seq's cells, in llama.cpp and in the map, and its
 * visibility. Ranges: seq in [0, n_seq). Returns SCOPE_HOOK_OK,
 * SCOPE_HOOK_E_ARG (no message). */
int32_t scope_hook_seq_clear(scope_hook * hook, struct llama_context * ctx, int32_t seq);

/* ---- key sketches (scope_hook_sketch.c) ----------------------------------- */

/* Score cells without attention probabilities.
 *
 * basis: [n_layer][n_head_kv][rank][head_dim] floats (copied), rows of a
 * projection of the keys per layer and KV head (e.g. the top principal
 * directions of the model's keys as the cache stores them); basis_q: the same
 * shape, the queries' projection (NULL: basis), so that (Bq q) . (B k)
 * approximates q . k. scale: the attention's softmax scale (usually
 * 1/sqrt(head_dim)); the graph's own (flash attention's or the softmax's op
 * parameter) must equal it, and ALiBi or a logit soft-cap is refused
 * (SCOPE_HOOK_E_GRAPH at end). mode: an enum scope_hook_score.
 *
 * Once set, a capture observes each captured layer's attention node
 * (flash attention's, or kq-<il> with it off) instead of kq_soft_max; there it
 * sketches every held cell not sketched yet (reading its stored K row:
 * a cell is read once while it holds a token, and again after a shift
 * re-rotates it) and adds, per query head, softmax(scale * (Bq q) . (B k_c))
 * over the cells the row sees (its sequence's, at positions up to its own)
 * into the same sums scope_hook_capture_gather reads (mode
 * SCOPE_HOOK_SCORE_ATTENTION; the key-only modes add their per-cell key score
 * instead). With rank = head_dim and an orthonormal basis this is the exact
 * attention, up to rounding. Sketches are kept in half precision:
 * n_layer * n_head_kv * rank * 2 bytes per cell. Resets every sketch.
 *
 * Ranges: rank 0 (everything else ignored) returns to exact attention
 * probabilities; otherwise n_head_kv >= 1 dividing n_head (grouped-query
 * heads share their KV head's sketches), head_dim >= 1, rank in
 * [1, head_dim], basis not NULL, scale finite and > 0; no sequence armed
 * (its arm chose how its sums are kept for the scorer then set).
 * Returns SCOPE_HOOK_OK, SCOPE_HOOK_E_ARG, SCOPE_HOOK_E_STATE (armed),
 * SCOPE_HOOK_E_NOMEM. */
int32_t scope_hook_sketch_set(scope_hook * hook, int32_t n_head_kv, int32_t head_dim, int32_t rank,
                              const float * basis, const float * basis_q, float scale, int32_t mode);

/* Track the second moments of the captured queries (sum of q q^T per layer
 * and KV head, over its query heads), from zero (on != 0), or stop (0).
 * Calibration runs a capture with an identity basis to learn a query-aware
 * one. Ranges: on != 0 needs sketches set. Returns SCOPE_HOOK_OK,
 * SCOPE_HOOK_E_ARG, SCOPE_HOOK_E_NOMEM. */
int32_t scope_hook_sketch_track_queries(scope_hook * hook, int32_t on);

/* The tracked moments, [n_layer][n_head_kv][head_dim][head_dim] doubles into
 * out, and the rows summed into counts[n_layer][n_head_kv]. Ranges: capacity
 * >= n_layer * n_head_kv * head_dim^2. Returns SCOPE_HOOK_OK,
 * SCOPE_HOOK_E_ARG (not tracking, NULL, capacity; no message). */
int32_t scope_hook_sketch_get_moments(const scope_hook * hook, double * out, int64_t capacity, int64_t * counts);

/* The sketches of cells[0..n) (held by seq), brought up to date first, laid
 * out [n_layer][n_head_kv][n][rank] in out (as floats). Between decodes.
 * Ranges: seq in [0, n_seq); n >= 0; capacity >= n_layer * n_head_kv * n *
 * rank. Returns SCOPE_HOOK_OK, SCOPE_HOOK_E_ARG (no sketches set, a cell not
 * of seq, capacity), or the error of reading K (SCOPE_HOOK_E_GRAPH before
 * any decode, SCOPE_HOOK_E_SHAPE, SCOPE_HOOK_E_NOMEM). */
int32_t scope_hook_sketch_gather(scope_hook * hook, int32_t seq, const int32_t * cells, int32_t n, float * out,
                                 int64_t capacity);

/* Layer il's keys of held cells[0..n) (of any sequence) as the attention
 * reads them (stored, converted to float; after RoPE), [n][n_embd_k] in out.
 * Between decodes, once a decode has shown the hook the K cache. Ranges: il
 * in [0, n_layer); n >= 0; capacity >= n * n_embd_k. Returns SCOPE_HOOK_OK,
 * SCOPE_HOOK_E_ARG, SCOPE_HOOK_E_STATE (no decode yet), SCOPE_HOOK_E_NOMEM. */
int32_t scope_hook_keys_read(scope_hook * hook, int32_t il, const int32_t * cells, int32_t n, float * out,
                             int64_t capacity);

/* ---- counters and errors (scope_hook.c) ----------------------------------- */

/* Tensor reads the callback made since the hook was created, and their
 * bytes: on a device each read is a transfer to the host. Returns
 * SCOPE_HOOK_OK, SCOPE_HOOK_E_ARG (NULL). */
int32_t scope_hook_transfers_get(const scope_hook * hook, int64_t * n_reads, int64_t * bytes);

/* Message of the latest failure ("" if none; "null hook" for NULL). Valid
 * until the next call. Calls whose return codes say "no message" leave it as
 * it was. */
const char * scope_hook_last_error(const scope_hook * hook);

#ifdef __cplusplus
}
#endif

#endif /* SCOPE_HOOK_H */
