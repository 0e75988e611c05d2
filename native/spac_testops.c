/* Test helpers: see spac_testops.h. */
#include "spac_testops.h"

#include <string.h>

#include "ggml-cpu.h"
#include "ggml.h"

int32_t spac_test_mul_mat_id(int32_t type, int32_t n_embd, int32_t n_ff, int32_t n_expert, int32_t n_used,
                             int32_t n_tokens, const float *as_f32, const float *b, const int32_t *ids, float *out,
                             int32_t n_threads) {
    if (type < 0 || type >= GGML_TYPE_COUNT || n_embd < 1 || n_ff < 1 || n_expert < 1 || n_used < 1 ||
        n_used > n_expert || n_tokens < 1 || as_f32 == NULL || b == NULL || ids == NULL || out == NULL ||
        n_embd % ggml_blck_size((enum ggml_type)type) != 0) {
        return -1;
    }
    const size_t n_as = (size_t)n_expert * n_ff * n_embd;
    const size_t mem = ggml_row_size((enum ggml_type)type, n_embd) * n_ff * n_expert +
                       sizeof(float) * ((size_t)n_tokens * n_embd + (size_t)n_tokens * n_used * n_ff) +
                       sizeof(int32_t) * n_tokens * n_used + 64 * ggml_tensor_overhead() + ggml_graph_overhead() +
                       (1 << 20);
    struct ggml_init_params params = {mem, NULL, false};
    struct ggml_context *ctx = ggml_init(params);
    if (ctx == NULL) {
        return -1;
    }
    struct ggml_tensor *as = ggml_new_tensor_3d(ctx, (enum ggml_type)type, n_embd, n_ff, n_expert);
    struct ggml_tensor *bt = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, n_embd, 1, n_tokens);
    struct ggml_tensor *it = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, n_used, n_tokens);
    if (type == GGML_TYPE_F32) {
        memcpy(as->data, as_f32, n_as * sizeof(float));
    } else {
        ggml_quantize_chunk((enum ggml_type)type, as_f32, as->data, 0, (int64_t)n_ff * n_expert, n_embd, NULL);
    }
    memcpy(bt->data, b, sizeof(float) * (size_t)n_tokens * n_embd);
    memcpy(it->data, ids, sizeof(int32_t) * (size_t)n_tokens * n_used);
    struct ggml_tensor *res = ggml_mul_mat_id(ctx, as, bt, it); /* [n_ff, n_used, n_tokens] */
    struct ggml_cgraph *gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, res);
    /* poison the output: skipped rows must be written (zeros), not left as they were */
    for (int64_t i = 0; i < ggml_nelements(res); i++) {
        ((float *)res->data)[i] = 12345.0f;
    }
    int32_t rc = ggml_graph_compute_with_ctx(ctx, gf, n_threads) == GGML_STATUS_SUCCESS ? 0 : -1;
    if (rc == 0) {
        memcpy(out, res->data, sizeof(float) * (size_t)n_tokens * n_used * n_ff);
    }
    ggml_free(ctx);
    return rc;
}
