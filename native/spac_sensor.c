/* spac routing sensor: see spac_sensor.h. */
#include "spac_sensor.h"

#include <stdlib.h>
#include <string.h>

#include "ggml-backend.h"
#include "ggml.h"

#define SPAC_TOPK_PREFIX "ffn_moe_topk-"

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
}

/* Pointer to the bytes of t readable on the host, copying device tensors into scratch. */
static const uint8_t *host_bytes(spac_sensor *s, struct ggml_tensor *t) {
    if (t->data == NULL) {
        return NULL;
    }
    /* no backend buffer: the tensor lives in a plain ggml context, i.e. host memory */
    if (t->buffer == NULL || ggml_backend_buffer_is_host(t->buffer)) {
        return (const uint8_t *)t->data;
    }
    size_t nbytes = ggml_nbytes(t);
    if (nbytes > s->scratch_size) {
        uint8_t *p = (uint8_t *)realloc(s->scratch, nbytes);
        if (p == NULL) {
            return NULL;
        }
        s->scratch = p;
        s->scratch_size = nbytes;
    }
    ggml_backend_tensor_get(t, s->scratch, 0, nbytes);
    return s->scratch;
}

/* Decode one ffn_moe_topk node: ne = [k, n_rows], rows strided by nb[1], elements by nb[0]. */
static void record_topk(spac_sensor *s, struct ggml_tensor *t, int32_t layer) {
    const int64_t k = t->ne[0];
    const int64_t rows = t->ne[1];
    if (layer < 0 || layer >= s->n_layer || t->type != GGML_TYPE_I32 || k < 1 || k > s->k_max ||
        rows < 1 || t->ne[2] != 1 || t->ne[3] != 1 || t->nb[0] < sizeof(int32_t)) {
        s->n_bad_events++;
        return;
    }
    const uint8_t *base = host_bytes(s, t);
    if (base == NULL) {
        s->n_bad_events++;
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
        s->layer_hook(s->hook_data, layer, mask);
    }
}

bool spac_sensor_cb(struct ggml_tensor *t, bool ask, void *user_data) {
    spac_sensor *s = (spac_sensor *)user_data;
    if (t == NULL || s == NULL) {
        return false;
    }
    if (ask) {
        bool user_wants = s->user_cb != NULL && s->user_cb(t, true, s->user_data);
        s->user_asked = user_wants;
        bool ours = s->enabled && spac_node_layer(t->name, SPAC_TOPK_PREFIX) >= 0;
        return user_wants || ours;
    }

    if (s->enabled) {
        int32_t layer = spac_node_layer(t->name, SPAC_TOPK_PREFIX);
        if (layer >= 0) {
            record_topk(s, t, layer);
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
