/* Test helpers: run single ggml operations on the CPU backend (tests of the patched kernels). */
#ifndef SPAC_TESTOPS_H
#define SPAC_TESTOPS_H

#include <stdint.h>

/* out = MUL_MAT_ID(as, b, ids) with `as` stored as ggml type `type` (quantized from as_f32):
 *   as_f32 [n_expert][n_ff][n_embd], b [n_tokens][n_embd] (broadcast over the used slots),
 *   ids [n_tokens][n_used] (a negative id skips the slot with the patched kernels),
 *   out [n_tokens][n_used][n_ff].
 * Returns 0, or -1 on bad arguments / out of memory. */
int32_t spac_test_mul_mat_id(int32_t type, int32_t n_embd, int32_t n_ff, int32_t n_expert, int32_t n_used,
                             int32_t n_tokens, const float *as_f32, const float *b, const int32_t *ids, float *out,
                             int32_t n_threads);

#endif
