/* Limits shared by the native sensor and engine (and, through the cffi module, by Python:
 * lib.SPAC_MAX_EXPERTS...). One place, so that every bound (the sensor's geometry check, the
 * engine's constructor, the engine's stack array of missed experts) agrees.
 *
 * An enum rather than #defines: the cffi declarations are generated from these headers without
 * their preprocessor lines, and enum constants survive that (and can size arrays in the cdef). */
#ifndef SPAC_LIMITS_H
#define SPAC_LIMITS_H

enum {
    SPAC_MAX_EXPERTS = 1024,           /* routed experts per layer: LLAMA_MAX_EXPERTS (llama-hparams.h) */
    SPAC_MAX_LAYERS = 4096,            /* blocks in a model */
    SPAC_MAX_TENSORS_PER_LAYER = 64,   /* expert tensors (gate/up/down, chunks) of one layer */
    SPAC_MAX_THREADS = 64,             /* engine worker threads */
    SPAC_MAX_QUEUE = 1 << 24           /* engine move queue capacity */
};

#endif
