/* Routing replay: force every token's expert selection to a recorded trace's (issue 14).
 *
 * Applied in the routing sensor's graph callback, through the same probability rewrite as the cache
 * prior: when a layer's router probabilities (ffn_moe_probs-<layer>, F32 [n_expert, rows], host or
 * device) have been computed, each row whose token has a trace cell gets the trace's experts set to
 * large descending values (SPAC_REPLAY_HIGH * (k - j) for the j-th), so that the graph's top-k
 * (argsort, descending; after a model's exp_probs_b addition too) selects exactly them, in the trace's
 * order. The original probabilities are restored at the layer's ffn_moe_topk node, before llama.cpp
 * gathers the mixing weights from them: the weights are the model's own router probabilities of the
 * forced experts (renormalised where the architecture renormalises), so outputs stay finite.
 *
 * Row mapping: a ubatch's rows are its tokens in order; the caller sets the context position of the
 * evaluation's first token before each evaluation, and the callback advances it by the ubatch's rows
 * (those of its first MoE layer) whenever a layer id does not increase (next ubatch). The last layer
 * may compute only the output rows: they are the ubatch's last rows. Position p takes trace token p;
 * positions at or past the trace's end take token cycle_start + (p - n_tokens) % (n_tokens -
 * cycle_start), or none when cycle_start < 0. Forced ids of a cell that are -1 (or out of range) are
 * left to the model: a cell without any id keeps the model's own choice.
 */
#ifndef SPAC_REPLAY_H
#define SPAC_REPLAY_H

#include <stddef.h>
#include <stdint.h>

#include "spac_sensor.h"

struct ggml_tensor;

/* Value of the last forced expert of a row; the j-th of k gets SPAC_REPLAY_HIGH * (k - j). Far above
 * any probability or router logit (and any selection bias added after ffn_moe_probs), small enough that
 * k of them stay exact in float. */
#define SPAC_REPLAY_HIGH 1.0e4f

typedef struct spac_replay {
    /* the trace, caller-owned */
    const int16_t *ids;       /* [n_tokens][n_moe][k]: experts to force, best first; -1 = none */
    const int32_t *layer_moe; /* [n_layer of the sensor]: each block's index in ids' middle axis; -1 = not replayed */
    int64_t n_tokens;         /* trace tokens (> 0) */
    int32_t n_moe;            /* MoE layers of the trace */
    int32_t k;                /* ids per cell */
    int64_t cycle_start;      /* first token of the cycle past the end; < 0: positions past the end are free */

    /* row mapping, set by the caller before each evaluation */
    int64_t position;    /* context position of the current ubatch's first token */
    int64_t ubatch_rows; /* rows of the current ubatch's first MoE layer (0: none yet) */
    int32_t last_layer;  /* layer of the previous probs node (-1: none since position was set) */

    /* state, owned by the sensor (freed by spac_sensor_release) */
    float *saved;     /* original probs of the layer in progress [rows][n_expert], then one work row */
    size_t saved_cap; /* floats */
    struct ggml_tensor *saved_tensor;
    int32_t saved_layer;
    int64_t saved_rows;
    int64_t saved_first; /* position of the saved tensor's first row */

    /* statistics */
    int64_t n_rows_forced;  /* (token, layer) rows whose selection was forced */
    int64_t n_rows_free;    /* rows left to the model (no trace cell, or past the end with no cycle) */
    int64_t n_rows_wrapped; /* forced rows at positions past the trace's end (cycled) */
    int64_t n_mismatch;     /* forced rows whose top-k did not come out as the trace's (stays 0) */
    int64_t end_position;   /* one past the highest position seen */
} spac_replay;

/* Trace token of a context position (-1: none). */
int64_t spac_replay_token(const spac_replay *r, int64_t position);

/* The callback's two halves: at ffn_moe_probs-<layer>, and at ffn_moe_topk-<layer> (after recording). */
void spac_replay_apply(spac_sensor *s, struct ggml_tensor *probs, int32_t layer);
void spac_replay_restore(spac_sensor *s, struct ggml_tensor *topk, int32_t layer);

/* Frees the replay's scratch (called by spac_sensor_release). */
void spac_replay_release(spac_replay *r);

#endif
