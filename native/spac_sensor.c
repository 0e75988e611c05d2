/* spac routing sensor: see spac_sensor.h. */
#include "spac_sensor.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ggml-backend.h"
#include "ggml.h"
#include "spac_replay.h"

#define SPAC_TOPK_PREFIX "ffn_moe_topk-"
#define SPAC_POOL_MAP_NAME "spac_pool_map" /* patch 0003: the expert pool's id maps, a graph input */

int32_t spac_node_layer(const char *name, const char *prefix) {
    size_t n = strlen(prefix);
    if (strncmp(name, prefix, n) != 0) {
        return -1;
    }
    const char *p = name + n;
    if (*p == '\0') {
        return -1;
    }
    int64_t v = 0;
    for (; *p; p++) {
        if (*p < '0' || *p > '9') {
            return -1; /* e.g. "ffn_moe_topk-3 (view)" or other suffixes: not ours */
        }
        v = v * 10 + (*p - '0');
        if (v > INT32_MAX) {
            return -1;
        }
    }
    return (int32_t)v;
}

int32_t spac_sensor_check_geometry(int32_t n_layer, int32_t n_expert, int32_t k_max, int32_t capacity) {
    return n_layer > 0 && n_layer <= SPAC_MAX_LAYERS && n_expert > 0 && n_expert <= SPAC_MAX_EXPERTS && k_max > 0 &&
           k_max <= n_expert && capacity > 0;
}

const char *spac_sensor_error_name(int32_t kind) {
    static const char *const names[SPAC_SENSOR_ERR_KINDS] = {"topk", "ids", "probs", "hidden", "nomem", "map"};
    return kind >= 0 && kind < SPAC_SENSOR_ERR_KINDS ? names[kind] : "";
}

static void note_error(spac_sensor *s, int kind, int code) {
    if (s->error_count[kind]++ == 0) {
        s->error_errno[kind] = code;
    }
}

/* Host-readable tensor: no backend buffer (a plain ggml context) or a host buffer. */
static bool is_host(const spac_sensor *s, const struct ggml_tensor *t) {
    if (t->buffer == NULL) {
        return true;
    }
    return !s->device_io && ggml_backend_buffer_is_host(t->buffer);
}

/* Copy n bytes at byte offset off of t to dst / from src (host memcpy or backend get/set). */
static void tensor_read(const spac_sensor *s, struct ggml_tensor *t, void *dst, size_t off, size_t n) {
    if (is_host(s, t)) {
        memcpy(dst, (const char *)t->data + off, n);
    } else {
        ggml_backend_tensor_get(t, dst, off, n);
    }
}

static void tensor_write(const spac_sensor *s, struct ggml_tensor *t, const void *src, size_t off, size_t n) {
    if (is_host(s, t)) {
        memcpy((char *)t->data + off, src, n);
    } else {
        ggml_backend_tensor_set(t, src, off, n);
    }
}

void spac_sensor_flush(spac_sensor *s) {
    if (s->ubatch_tokens > 0) {
        s->n_tokens += s->ubatch_tokens;
        s->n_ubatches++;
    }
    s->ubatch_tokens = 0;
    s->last_layer = -1;
}

void spac_sensor_release(spac_sensor *s) {
    free(s->scratch);
    s->scratch = NULL;
    s->scratch_size = 0;
    if (s->prior != NULL) {
        free(s->prior->saved);
        free(s->prior->work);
        free(s->prior->orig_topk);
        s->prior->saved = NULL;
        s->prior->work = NULL;
        s->prior->orig_topk = NULL;
        s->prior->saved_cap = s->prior->work_cap = s->prior->orig_cap = 0;
        s->prior->saved_tensor = NULL;
    }
    if (s->replay != NULL) {
        spac_replay_release(s->replay);
    }
}

/* ---------------------------------------------------------------------------------------------
 * cache-aware routing (see spac_cache_prior in the header) */

#define SPAC_PROBS_PREFIX "ffn_moe_probs-"
#define SPAC_LOUT_PREFIX "l_out-"

static const uint8_t *host_bytes(spac_sensor *s, struct ggml_tensor *t);

static float to_logit(int32_t gating, float p) {
    switch (gating) {
    case 0:
        return logf(p > 1e-30f ? p : 1e-30f);
    case 1: {
        float q = p < 1e-7f ? 1e-7f : (p > 1.0f - 1e-7f ? 1.0f - 1e-7f : p);
        return logf(q / (1.0f - q));
    }
    default:
        return p;
    }
}

/* The value to write for logit z + b, given the original value p (monotone in z + b). */
static float biased_value(int32_t gating, float p, float z, float b) {
    switch (gating) {
    case 0:
        return p * expf(b);
    case 1:
        return 1.0f / (1.0f + expf(-(z + b)));
    default:
        return p + b;
    }
}

static void prior_apply(spac_sensor *s, struct ggml_tensor *t, int32_t layer) {
    spac_cache_prior *c = s->prior;
    c->saved_tensor = NULL;
    const int64_t n = t->ne[0], rows = t->ne[1];
    if (layer < 0 || layer >= s->n_layer || t->type != GGML_TYPE_F32 || n != s->n_expert || rows < 1 ||
        t->ne[2] != 1 || t->ne[3] != 1 || t->nb[0] != sizeof(float) || t->data == NULL) {
        s->n_bad_events++;
        note_error(s, SPAC_SENSOR_ERR_PROBS, EINVAL);
        return;
    }
    if (rows > c->max_rows || c->lambda == 0.0f || c->resident == NULL || c->range_avg == NULL) {
        return; /* prefill, or nothing to do */
    }
    const size_t need = (size_t)(rows * n), need_k = (size_t)(rows * s->k_max);
    if (need > c->saved_cap) {
        float *p = (float *)realloc(c->saved, need * sizeof(float));
        if (p == NULL) {
            note_error(s, SPAC_SENSOR_ERR_NOMEM, ENOMEM);
            return;
        }
        c->saved = p;
        c->saved_cap = need;
    }
    if ((size_t)n > c->work_cap) {
        float *p = (float *)realloc(c->work, (size_t)n * sizeof(float));
        if (p == NULL) {
            note_error(s, SPAC_SENSOR_ERR_NOMEM, ENOMEM);
            return;
        }
        c->work = p;
        c->work_cap = (size_t)n;
    }
    if (need_k > c->orig_cap) {
        int32_t *p = (int32_t *)realloc(c->orig_topk, need_k * sizeof(int32_t));
        if (p == NULL) {
            note_error(s, SPAC_SENSOR_ERR_NOMEM, ENOMEM);
            return;
        }
        c->orig_topk = p;
        c->orig_cap = need_k;
    }
    const uint8_t *res = c->resident + (int64_t)layer * n;
    const int32_t j_top = c->top_j < 0 ? 0 : (c->top_j > s->k_max ? s->k_max : c->top_j);
    const size_t row_bytes = (size_t)n * sizeof(float);
    float *row = c->work;
    for (int64_t r = 0; r < rows; r++) {
        float *orig = c->saved + r * n;
        int32_t *top = c->orig_topk + r * s->k_max;
        tensor_read(s, t, orig, (size_t)(r * t->nb[1]), row_bytes);
        memcpy(row, orig, row_bytes);
        /* running average of the logit range */
        float zmax = -INFINITY, zmin = INFINITY;
        for (int64_t i = 0; i < n; i++) {
            float z = to_logit(c->gating, orig[i]);
            zmax = z > zmax ? z : zmax;
            zmin = z < zmin ? z : zmin;
        }
        float range = zmax - zmin;
        if (isfinite(range)) {
            float d = c->range_avg[layer];
            c->range_avg[layer] = d < 0.0f ? range : (1.0f - c->ema) * d + c->ema * range;
        }
        /* original top-k_max ids, best first (k is small: repeated scans) */
        for (int32_t k = 0; k < s->k_max; k++) {
            int32_t best = -1;
            for (int64_t i = 0; i < n; i++) {
                int taken = 0;
                for (int32_t q = 0; q < k; q++) {
                    taken |= top[q] == i;
                }
                if (!taken && (best < 0 || orig[i] > orig[best])) {
                    best = (int32_t)i;
                }
            }
            top[k] = best;
        }
        /* capped so that p * exp(b) stays finite in float (60 logits exceed any router's range) */
        float b = c->lambda * (c->range_avg[layer] > 0.0f ? c->range_avg[layer] : 0.0f);
        b = b > 60.0f ? 60.0f : b;
        for (int64_t i = 0; i < n; i++) {
            int protect = res[i] != 0;
            for (int32_t q = 0; q < j_top && !protect; q++) {
                protect = top[q] == i;
            }
            if (protect) {
                row[i] = biased_value(c->gating, orig[i], to_logit(c->gating, orig[i]), b);
            }
        }
        tensor_write(s, t, row, (size_t)(r * t->nb[1]), row_bytes);
    }
    c->saved_tensor = t;
    c->saved_layer = layer;
    c->saved_rows = rows;
    c->n_rows += rows;
}

/* At the layer's topk: count changed selections, then put the unbiased probabilities back. */
static void prior_restore(spac_sensor *s, struct ggml_tensor *topk, int32_t layer) {
    spac_cache_prior *c = s->prior;
    struct ggml_tensor *t = c->saved_tensor;
    if (t == NULL || c->saved_layer != layer) {
        return;
    }
    const int64_t n = t->ne[0], rows = c->saved_rows;
    const uint8_t *ids = host_bytes(s, topk);
    const int64_t k = topk->ne[0];
    if (ids != NULL && topk->type == GGML_TYPE_I32 && topk->ne[1] == rows && k <= s->k_max) {
        for (int64_t r = 0; r < rows; r++) {
            const int32_t *top = c->orig_topk + r * s->k_max;
            for (int64_t q = 0; q < k; q++) {
                int32_t id;
                memcpy(&id, ids + r * topk->nb[1] + q * topk->nb[0], sizeof(id));
                int in = 0;
                for (int64_t o = 0; o < k; o++) {
                    in |= top[o] == id;
                }
                c->n_selections++;
                c->n_changed += !in;
            }
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        tensor_write(s, t, c->saved + r * n, (size_t)(r * t->nb[1]), (size_t)n * sizeof(float));
    }
    c->saved_tensor = NULL;
}

/* Pointer to the bytes of t readable on the host, copying device tensors into scratch. */
static const uint8_t *host_bytes(spac_sensor *s, struct ggml_tensor *t) {
    if (t->data == NULL) {
        return NULL;
    }
    /* no backend buffer: the tensor lives in a plain ggml context, i.e. host memory */
    if (is_host(s, t)) {
        return (const uint8_t *)t->data;
    }
    size_t nbytes = ggml_nbytes(t);
    if (nbytes > s->scratch_size) {
        uint8_t *p = (uint8_t *)realloc(s->scratch, nbytes);
        if (p == NULL) {
            note_error(s, SPAC_SENSOR_ERR_NOMEM, ENOMEM);
            return NULL;
        }
        s->scratch = p;
        s->scratch_size = nbytes;
    }
    ggml_backend_tensor_get(t, s->scratch, 0, nbytes);
    return s->scratch;
}

void spac_sensor_read(const spac_sensor *s, struct ggml_tensor *t, void *dst, size_t off, size_t n) {
    tensor_read(s, t, dst, off, n);
}

void spac_sensor_write(const spac_sensor *s, struct ggml_tensor *t, const void *src, size_t off, size_t n) {
    tensor_write(s, t, src, off, n);
}

const uint8_t *spac_sensor_host_bytes(spac_sensor *s, struct ggml_tensor *t) {
    return host_bytes(s, t);
}

void spac_sensor_note_error(spac_sensor *s, int32_t kind, int32_t code) {
    if (kind >= 0 && kind < SPAC_SENSOR_ERR_KINDS) {
        note_error(s, kind, code);
    }
}

/* Decode one ffn_moe_topk node: ne = [k, n_rows], rows strided by nb[1], elements by nb[0]. */
static void record_topk(spac_sensor *s, struct ggml_tensor *t, int32_t layer) {
    const int64_t k = t->ne[0];
    const int64_t rows = t->ne[1];
    if (layer < 0 || layer >= s->n_layer || t->type != GGML_TYPE_I32 || k < 1 || k > s->k_max ||
        rows < 1 || t->ne[2] != 1 || t->ne[3] != 1 || t->nb[0] < sizeof(int32_t)) {
        s->n_bad_events++;
        note_error(s, SPAC_SENSOR_ERR_TOPK, EINVAL);
        return;
    }
    const uint8_t *base = host_bytes(s, t);
    if (base == NULL) {
        s->n_bad_events++;
        note_error(s, SPAC_SENSOR_ERR_TOPK, t->data == NULL ? EINVAL : ENOMEM);
        return;
    }

    /* A layer id that does not increase means llama.cpp started the next ubatch. */
    if (layer <= s->last_layer) {
        spac_sensor_flush(s);
    }
    if (s->ubatch_tokens == 0) {
        s->ubatch_tokens = (int32_t)rows;
    } else if (rows > s->ubatch_tokens) {
        /* More rows than the ubatch's first MoE layer had: cannot place them; skip. */
        s->n_bad_events++;
        note_error(s, SPAC_SENSOR_ERR_TOPK, EINVAL);
        return;
    }
    s->last_layer = layer;
    s->n_events++;

    /* The last layer may compute only the output rows; they are the ubatch's last rows
     * (logits for the final token, or for all tokens). */
    const int64_t first_token = s->n_tokens + (s->ubatch_tokens - rows);
    const int64_t ring_stride = (int64_t)s->n_layer * s->k_max;
    int32_t *counts = s->step_counts + (int64_t)layer * s->n_expert;
    int64_t *totals = s->total_counts + (int64_t)layer * s->n_expert;
    uint8_t *mask = s->layer_hook != NULL ? s->event_mask : NULL;
    if (mask != NULL) {
        memset(mask, 0, (size_t)s->n_expert);
    }

    for (int64_t j = 0; j < rows; j++) {
        const uint8_t *row = base + j * t->nb[1];
        int32_t *slot = s->ids + ((first_token + j) % s->capacity) * ring_stride + (int64_t)layer * s->k_max;
        for (int64_t i = 0; i < s->k_max; i++) {
            int32_t id = -1;
            if (i < k) {
                memcpy(&id, row + i * t->nb[0], sizeof(id));
                if (id < 0 || id >= s->n_expert) {
                    s->n_bad_ids++;
                    note_error(s, SPAC_SENSOR_ERR_IDS, ERANGE);
                    id = -1;
                } else {
                    counts[id]++;
                    totals[id]++;
                    if (mask != NULL) {
                        mask[id] = 1;
                    }
                }
            }
            slot[i] = id;
        }
    }
    s->step_layer_tokens[layer] += (int32_t)rows;
    if (mask != NULL) {
        s->topk_data = t->data;
        s->layer_hook(s->hook_data, layer, mask);
    }
}

/* A GET_ROWS node reading a row of the pool's id maps (a view of "spac_pool_map", [1, n_expert, 2 * n_layer]):
 * hand the row to the map hook before the node is computed. Nodes of other shapes are counted and left alone. */
static void map_rows(spac_sensor *s, struct ggml_tensor *t) {
    struct ggml_tensor *row = t->src[0];
    if (row == NULL || row->view_src == NULL || strcmp(row->view_src->name, SPAC_POOL_MAP_NAME) != 0) {
        return;
    }
    const struct ggml_tensor *m = row->view_src;
    const uint8_t *m0 = (const uint8_t *)m->data, *r0 = (const uint8_t *)row->data;
    if (m->type != GGML_TYPE_I32 || m0 == NULL || r0 == NULL || t->data == NULL || m->ne[0] != 1 ||
        m->ne[1] != s->n_expert || m->nb[1] != sizeof(int32_t) || m->nb[2] == 0 || row->ne[1] != s->n_expert ||
        row->nb[1] != sizeof(int32_t) || r0 < m0 || !is_host(s, m)) {
        note_error(s, SPAC_SENSOR_ERR_MAP, EINVAL);
        return;
    }
    const size_t off = (size_t)(r0 - m0);
    const int64_t r = (int64_t)(off / m->nb[2]);
    if (off % m->nb[2] != 0 || r >= m->ne[2] || r / 2 >= s->n_layer) {
        note_error(s, SPAC_SENSOR_ERR_MAP, EINVAL);
        return;
    }
    s->map_hook(s->map_data, (int32_t)(r / 2), (int32_t)(r % 2), (int32_t *)row->data, s->n_expert, t->data);
}

bool spac_sensor_cb(struct ggml_tensor *t, bool ask, void *user_data) {
    spac_sensor *s = (spac_sensor *)user_data;
    if (t == NULL || s == NULL) {
        return false;
    }
    if (ask) {
        if (s->map_hook != NULL && t->op == GGML_OP_GET_ROWS) {
            map_rows(s, t); /* asked before any node of its range is computed: the row is read after this */
        }
        bool user_wants = s->user_cb != NULL && s->user_cb(t, true, s->user_data);
        s->user_asked = user_wants;
        bool rewrite = (s->prior != NULL && s->prior->lambda != 0.0f) || s->replay != NULL;
        bool ours = s->enabled && (spac_node_layer(t->name, SPAC_TOPK_PREFIX) >= 0 ||
                                   (rewrite && spac_node_layer(t->name, SPAC_PROBS_PREFIX) >= 0) ||
                                   (s->hidden_hook != NULL && spac_node_layer(t->name, SPAC_LOUT_PREFIX) >= 0));
        return user_wants || ours;
    }

    if (s->enabled) {
        int32_t layer = spac_node_layer(t->name, SPAC_TOPK_PREFIX);
        if (layer >= 0) {
            record_topk(s, t, layer);
            if (s->replay != NULL) {
                spac_replay_restore(s, t, layer);
            } else if (s->prior != NULL) {
                prior_restore(s, t, layer);
            }
        } else if (s->replay != NULL && (layer = spac_node_layer(t->name, SPAC_PROBS_PREFIX)) >= 0) {
            spac_replay_apply(s, t, layer);
        } else if (s->prior != NULL && s->prior->lambda != 0.0f &&
                   (layer = spac_node_layer(t->name, SPAC_PROBS_PREFIX)) >= 0) {
            prior_apply(s, t, layer);
        } else if (s->hidden_hook != NULL && (layer = spac_node_layer(t->name, SPAC_LOUT_PREFIX)) >= 0) {
            /* host memory only: the hook (layer-ahead prefetch of the CPU-only flash tier) reads rows in place */
            if (layer < s->n_layer && t->type == GGML_TYPE_F32 && t->ne[2] == 1 && t->ne[3] == 1 &&
                t->nb[0] == sizeof(float) && t->data != NULL && is_host(s, t)) {
                s->hidden_hook(s->hidden_data, layer, (const float *)t->data, t->ne[1], t->ne[0], (int64_t)t->nb[1]);
            } else {
                note_error(s, SPAC_SENSOR_ERR_HIDDEN, EINVAL);
            }
        }
    }
    if (s->user_asked) {
        s->user_asked = 0;
        return s->user_cb(t, false, s->user_data);
    }
    return true;
}

const char *spac_tensor_name(const struct ggml_tensor *t) {
    return t == NULL ? "" : t->name;
}

int64_t spac_tensor_copy_f32_rows(struct ggml_tensor *t, float *dst, int64_t max_rows, int64_t n_cols) {
    if (t == NULL || dst == NULL || t->type != GGML_TYPE_F32 || t->ne[0] != n_cols || t->ne[2] != 1 ||
        t->ne[3] != 1 || t->nb[0] != sizeof(float) || t->data == NULL) {
        return -1;
    }
    int64_t rows = t->ne[1] < max_rows ? t->ne[1] : max_rows;
    const size_t row_bytes = (size_t)n_cols * sizeof(float);
    bool host = t->buffer == NULL || ggml_backend_buffer_is_host(t->buffer);
    for (int64_t j = 0; j < rows; j++) {
        if (host) {
            memcpy(dst + j * n_cols, (const uint8_t *)t->data + j * t->nb[1], row_bytes);
        } else {
            ggml_backend_tensor_get(t, dst + j * n_cols, j * t->nb[1], row_bytes);
        }
    }
    return rows;
}
