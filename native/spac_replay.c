/* Routing replay: see spac_replay.h. */
#include "spac_replay.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ggml.h"

int64_t spac_replay_token(const spac_replay *r, int64_t position) {
    if (position < 0 || r->n_tokens <= 0) {
        return -1;
    }
    if (position < r->n_tokens) {
        return position;
    }
    if (r->cycle_start < 0 || r->cycle_start >= r->n_tokens) {
        return -1;
    }
    return r->cycle_start + (position - r->n_tokens) % (r->n_tokens - r->cycle_start);
}

/* The trace's cell of (position, layer), or NULL when it has none. */
static const int16_t *cell_of(const spac_replay *r, int64_t position, int32_t moe) {
    const int64_t tok = spac_replay_token(r, position);
    return tok < 0 ? NULL : r->ids + (tok * r->n_moe + moe) * r->k;
}

/* The distinct valid ids of a cell, in order, into out[0..k); returns how many. */
static int32_t forced_ids(const spac_replay *r, const int16_t *cell, int64_t n_expert, int32_t *out) {
    int32_t m = 0;
    for (int32_t q = 0; q < r->k; q++) {
        const int32_t e = cell[q];
        if (e < 0 || e >= n_expert) {
            continue;
        }
        int dup = 0;
        for (int32_t o = 0; o < m && !dup; o++) {
            dup = out[o] == e;
        }
        if (!dup) {
            out[m++] = e;
        }
    }
    return m;
}

void spac_replay_apply(spac_sensor *s, struct ggml_tensor *t, int32_t layer) {
    spac_replay *r = s->replay;
    r->saved_tensor = NULL;
    const int64_t n = t->ne[0], rows = t->ne[1];
    if (layer < 0 || layer >= s->n_layer || t->type != GGML_TYPE_F32 || n != s->n_expert || t->ne[2] != 1 ||
        t->ne[3] != 1 || t->nb[0] != sizeof(float) || t->data == NULL || r->ids == NULL || r->k < 1 ||
        r->k > SPAC_MAX_EXPERTS) {
        s->n_bad_events++;
        spac_sensor_note_error(s, SPAC_SENSOR_ERR_PROBS, EINVAL);
        return;
    }
    if (rows < 1) {
        return; /* e.g. a last layer without output rows in this ubatch */
    }
    /* a layer id that does not increase: the next ubatch (of this evaluation) starts */
    if (layer <= r->last_layer) {
        r->position += r->ubatch_rows;
        r->ubatch_rows = 0;
    }
    r->last_layer = layer;
    if (r->ubatch_rows == 0) {
        r->ubatch_rows = rows;
    }
    if (rows > r->ubatch_rows) { /* more rows than the ubatch's first MoE layer: cannot place them */
        spac_sensor_note_error(s, SPAC_SENSOR_ERR_PROBS, EINVAL);
        return;
    }
    const int64_t first = r->position + (r->ubatch_rows - rows); /* output rows are the ubatch's last */
    if (r->position + r->ubatch_rows > r->end_position) {
        r->end_position = r->position + r->ubatch_rows;
    }
    const int32_t moe = r->layer_moe[layer];
    if (moe < 0 || moe >= r->n_moe) {
        return;
    }
    const size_t need = (size_t)((rows + 1) * n);
    if (need > r->saved_cap) {
        float *p = (float *)realloc(r->saved, need * sizeof(float));
        if (p == NULL) {
            spac_sensor_note_error(s, SPAC_SENSOR_ERR_NOMEM, ENOMEM);
            return;
        }
        r->saved = p;
        r->saved_cap = need;
    }
    int32_t forced[SPAC_MAX_EXPERTS];
    float *row = r->saved + rows * n; /* the work row, after the saved ones */
    const size_t row_bytes = (size_t)n * sizeof(float);
    for (int64_t j = 0; j < rows; j++) {
        float *orig = r->saved + j * n;
        spac_sensor_read(s, t, orig, (size_t)(j * t->nb[1]), row_bytes);
        const int16_t *cell = cell_of(r, first + j, moe);
        const int32_t m = cell == NULL ? 0 : forced_ids(r, cell, n, forced);
        if (m == 0) {
            r->n_rows_free++;
            continue;
        }
        /* the others keep their order (a partly forced cell's remaining slots: the model's choice) */
        for (int64_t i = 0; i < n; i++) {
            const float v = orig[i];
            row[i] = isfinite(v) ? fmaxf(-0.5f * SPAC_REPLAY_HIGH, fminf(v, 0.5f * SPAC_REPLAY_HIGH))
                                 : -0.5f * SPAC_REPLAY_HIGH;
        }
        for (int32_t q = 0; q < m; q++) {
            row[forced[q]] = SPAC_REPLAY_HIGH * (float)(r->k - q);
        }
        spac_sensor_write(s, t, row, (size_t)(j * t->nb[1]), row_bytes);
        r->n_rows_forced++;
        r->n_rows_wrapped += first + j >= r->n_tokens;
    }
    r->saved_tensor = t;
    r->saved_layer = layer;
    r->saved_rows = rows;
    r->saved_first = first;
}

void spac_replay_restore(spac_sensor *s, struct ggml_tensor *topk, int32_t layer) {
    spac_replay *r = s->replay;
    struct ggml_tensor *t = r->saved_tensor;
    if (t == NULL || r->saved_layer != layer) {
        return;
    }
    r->saved_tensor = NULL;
    const int64_t n = t->ne[0], rows = r->saved_rows;
    const int32_t moe = r->layer_moe[layer];
    const uint8_t *ids = spac_sensor_host_bytes(s, topk);
    const int64_t k = topk->ne[0];
    const int check = ids != NULL && topk->type == GGML_TYPE_I32 && topk->ne[1] == rows && k >= 1;
    int32_t forced[SPAC_MAX_EXPERTS];
    for (int64_t j = 0; j < rows; j++) {
        const int16_t *cell = cell_of(r, r->saved_first + j, moe);
        const int32_t m = cell == NULL ? 0 : forced_ids(r, cell, n, forced);
        if (m == 0) {
            continue; /* not rewritten */
        }
        if (check) {
            int bad = 0;
            for (int64_t q = 0; q < k && q < m && !bad; q++) {
                int32_t id;
                memcpy(&id, ids + j * topk->nb[1] + q * topk->nb[0], sizeof(id));
                bad = id != forced[q];
            }
            r->n_mismatch += bad;
        }
        spac_sensor_write(s, t, r->saved + j * n, (size_t)(j * t->nb[1]), (size_t)n * sizeof(float));
    }
}

void spac_replay_release(spac_replay *r) {
    free(r->saved);
    r->saved = NULL;
    r->saved_cap = 0;
    r->saved_tensor = NULL;
}
