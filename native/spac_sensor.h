/* spac routing sensor: a ggml graph-eval callback that records MoE expert selection.
 *
 * The callback watches the `ffn_moe_topk-<layer>` nodes of llama.cpp's graph (an I32 view
 * [k, n_tokens] whose rows are strided by nb[1]) and decodes the selected expert ids of every
 * token into caller-owned buffers (numpy arrays on the Python side), so reading them needs no
 * copy. All buffers are allocated by the caller and sized from the fields below; the callback
 * never writes outside them and counts whatever it had to drop.
 *
 * Threading: the callback runs on the thread that calls llama_decode. The caller reads the
 * buffers between decode calls.
 *
 * Tensors may live in host or device memory: device tensors are read (and, for the cache prior,
 * written back) with ggml_backend_tensor_get/set, which the scheduler allows inside the callback
 * (it has synchronized the backend before calling it and computes the node's consumers after).
 *
 * Errors: nodes the sensor had to skip and allocations that failed are counted per kind
 * (SPAC_SENSOR_ERR_*, with an errno-style code of the first of each kind); the Python side logs
 * each kind once and reports them in stats().
 */
#ifndef SPAC_SENSOR_H
#define SPAC_SENSOR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "spac_limits.h"

struct ggml_tensor;
struct spac_replay;

/* Kinds of sensor error (spac_sensor.error_count). */
enum {
    SPAC_SENSOR_ERR_TOPK = 0,   /* ffn_moe_topk node with an unexpected layer, type or shape: skipped (EINVAL) */
    SPAC_SENSOR_ERR_IDS = 1,    /* expert id outside [0, n_expert): dropped (ERANGE) */
    SPAC_SENSOR_ERR_PROBS = 2,  /* ffn_moe_probs node the cache prior or replay cannot use: not rewritten (EINVAL) */
    SPAC_SENSOR_ERR_HIDDEN = 3, /* l_out node the hidden hook cannot use: skipped (EINVAL) */
    SPAC_SENSOR_ERR_NOMEM = 4,  /* a scratch buffer could not be allocated (ENOMEM) */
    SPAC_SENSOR_ERR_MAP = 5,    /* a spac_pool_map row the map hook cannot use (not I32 rows in host memory) */
    SPAC_SENSOR_ERR_KINDS = 6
};

typedef bool (*spac_eval_cb)(struct ggml_tensor *t, bool ask, void *user_data);

/* Called after each decoded topk node with the layer and a mask [n_expert] of the experts that any
 * token of the ubatch selected (e.g. spac_engine_on_layer). */
typedef void (*spac_layer_hook)(void *hook_data, int32_t layer, const uint8_t *mask);

/* Called with each layer's output (l_out-<layer>, F32 [n_embd, rows], host memory): rows are
 * row_stride bytes apart (e.g. spac_engine_on_hidden, for layer-ahead prefetch). */
/* Called in the ask phase of each GET_ROWS node that reads a row of the expert pool's id maps (a view of the graph
 * input "spac_pool_map", patch 0003: rows 2*layer (pool slots) and 2*layer+1 (full tensors)), before the node is
 * computed: row points at the row's n int32 entries, ids_out at the node's output (e.g. spac_engine_on_map). */
typedef void (*spac_map_hook)(void *map_data, int32_t layer, int32_t path, int32_t *row, int32_t n, const void *ids_out);

typedef void (*spac_hidden_hook)(void *hook_data, int32_t layer, const float *rows, int64_t n_rows, int64_t n_embd,
                                 int64_t row_stride);

/* Cache-aware routing ("Cache-Prior", arXiv 2412.00099), applied in the graph callback: when a
 * layer's router probabilities (ffn_moe_probs-<layer>, F32 [n_expert, rows], host or device) have been
 * computed, and the ubatch has at most max_rows tokens (decode), each row's selection scores get
 * lambda * D added to the logits of experts that are resident or among the row's original top_j,
 * where D is the layer's running average of the logit range (max - min). The biased values are
 * written in place so that top-k selection sees them; the original probabilities are restored
 * when the layer's ffn_moe_topk node is reached, before the mixing weights are gathered, so the
 * weights come from the unbiased probabilities. */
typedef struct spac_cache_prior {
    float lambda;      /* bias strength; 0 disables */
    int32_t top_j;     /* protected original top-J experts per token */
    int32_t max_rows;  /* apply to ubatches of at most this many tokens */
    int32_t gating;    /* how probs relate to logits: 0 softmax, 1 sigmoid, 2 probs are the logits */
    float ema;         /* weight of the newest row's range in the running average */
    uint8_t *resident; /* caller-owned [n_layer][n_expert]: 1 = resident */
    float *range_avg;  /* caller-owned [n_layer]: running average of the logit range (< 0: none yet) */

    /* state, owned by the sensor (freed by spac_sensor_release) */
    float *saved;          /* original probs of the layer in progress [rows][n_expert] */
    size_t saved_cap;      /* floats */
    float *work;           /* one biased row [n_expert] */
    size_t work_cap;       /* floats */
    int32_t *orig_topk;    /* original top-k_max ids per row [rows][k_max] */
    size_t orig_cap;       /* ints */
    struct ggml_tensor *saved_tensor;
    int32_t saved_layer;
    int64_t saved_rows;

    int64_t n_rows;       /* token rows biased */
    int64_t n_selections; /* expert selections made under the bias */
    int64_t n_changed;    /* of those, experts exact routing would not have chosen */
} spac_cache_prior;

typedef struct spac_sensor {
    /* geometry, fixed at creation */
    int32_t n_layer;   /* blocks in the model; valid layer ids are [0, n_layer) */
    int32_t n_expert;  /* valid expert ids are [0, n_expert) */
    int32_t k_max;     /* largest experts-used-per-token of any layer */
    int32_t capacity;  /* token slots in the ids ring */

    /* caller-owned output buffers */
    int32_t *ids;          /* [capacity][n_layer][k_max]; -1 = not observed */
    int32_t *step_counts;  /* [n_layer][n_expert]; tokens that chose (layer, expert) this step */
    int64_t *total_counts; /* [n_layer][n_expert]; since creation / last reset */
    int32_t *step_layer_tokens; /* [n_layer]; token rows observed per layer this step */

    /* running state */
    int64_t n_tokens;      /* tokens recorded so far (monotonic; ring slot = index % capacity) */
    int64_t n_ubatches;    /* ubatches observed */
    int64_t n_events;      /* topk nodes decoded */
    int64_t n_bad_ids;     /* ids outside [0, n_expert): dropped */
    int64_t n_bad_events;  /* topk nodes with an unexpected layer, type or shape: skipped */
    int32_t last_layer;    /* layer of the previous event in this ubatch, -1 at a boundary */
    int32_t ubatch_tokens; /* tokens of the current ubatch (rows of its first MoE layer) */
    int32_t enabled;       /* 0: observe nothing (the callback only chains) */
    int32_t user_asked;    /* the chained callback asked for the node we are about to see */
    int64_t error_count[SPAC_SENSOR_ERR_KINDS]; /* errors per kind since creation / last reset */
    int64_t error_errno[SPAC_SENSOR_ERR_KINDS]; /* code of the first error of each kind (0: none) */
    int32_t device_io;     /* tests: access every tensor with ggml_backend_tensor_get/set, as if in
                            * device memory (needs tensors in a backend buffer) */

    /* chained user callback (may be NULL) */
    spac_eval_cb user_cb;
    void *user_data;

    /* scratch for tensors that live in device memory (not host-readable) */
    uint8_t *scratch;
    size_t scratch_size;

    /* optional per-layer hook; event_mask is caller-owned, [n_expert] */
    spac_layer_hook layer_hook;
    void *hook_data;
    uint8_t *event_mask;

    /* optional cache-aware routing (NULL: exact routing) */
    spac_cache_prior *prior;

    /* optional hook on layer outputs (asks for l_out-<layer> nodes when set) */
    spac_hidden_hook hidden_hook;
    void *hidden_data;

    /* optional routing replay (spac_replay.h; NULL: the model routes); excludes the cache prior */
    struct spac_replay *replay;

    /* data of the topk node the layer hook is being called for (the ids the layer's MUL_MAT_IDs read) */
    const void *topk_data;

    /* optional hook on the expert pool's id map rows (flash tier with slots) */
    spac_map_hook map_hook;
    void *map_data;
} spac_sensor;

/* Whether the geometry is within spac_limits.h (0 < n_layer <= SPAC_MAX_LAYERS, 0 < n_expert <=
 * SPAC_MAX_EXPERTS, 0 < k_max <= n_expert, capacity > 0): 1 or 0. */
int32_t spac_sensor_check_geometry(int32_t n_layer, int32_t n_expert, int32_t k_max, int32_t capacity);

/* Short name of a sensor error kind ("topk", ...; "" when out of range). */
const char *spac_sensor_error_name(int32_t kind);

/* The graph-eval callback; user_data must be a spac_sensor*. */
bool spac_sensor_cb(struct ggml_tensor *t, bool ask, void *user_data);

/* Close the current ubatch so the next event starts a new one (call after each llama_decode). */
void spac_sensor_flush(spac_sensor *s);

/* Frees the scratch buffer (the caller owns every other buffer). */
void spac_sensor_release(spac_sensor *s);

/* Tensor access for the rewrites (spac_replay.c): host memcpy or ggml_backend_tensor_get/set (device
 * memory, or every tensor with device_io); host_bytes copies device tensors into the sensor's scratch
 * (NULL when it cannot); note_error counts an error of a kind. */
void spac_sensor_read(const spac_sensor *s, struct ggml_tensor *t, void *dst, size_t off, size_t n);
void spac_sensor_write(const spac_sensor *s, struct ggml_tensor *t, const void *src, size_t off, size_t n);
const uint8_t *spac_sensor_host_bytes(spac_sensor *s, struct ggml_tensor *t);
void spac_sensor_note_error(spac_sensor *s, int32_t kind, int32_t code);

/* Parse "<prefix><int>" names such as "ffn_moe_topk-12"; returns -1 when the name does not match. */
int32_t spac_node_layer(const char *name, const char *prefix);

/* Name of a graph tensor ("" for NULL). */
const char *spac_tensor_name(const struct ggml_tensor *t);

/* Copy up to max_rows rows of an F32 [n_cols, rows] tensor (host or device) into dst (row-major).
 * Returns the rows copied, or -1 when the tensor is not F32 with n_cols contiguous columns. */
int64_t spac_tensor_copy_f32_rows(struct ggml_tensor *t, float *dst, int64_t max_rows, int64_t n_cols);

#endif
