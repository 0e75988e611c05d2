/* spac flash-tier engine: see spac_engine.h. */
#define _GNU_SOURCE
#include "spac_engine.h"

#include <errno.h>
#include <math.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21 /* Linux 5.4 */
#endif
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22 /* Linux 5.14 */
#endif

#ifndef MREMAP_DONTUNMAP
#define MREMAP_DONTUNMAP 4 /* Linux 5.7 */
#endif

#define SPAC_OVL_STRIPES 64
#define SPAC_POOL_RUNS 4096 /* free runs the overlay pool holds at most */

typedef struct {
    uint64_t off; /* file offset of expert 0 */
    uint64_t bpe; /* bytes per expert */
} tensor_t;

typedef struct {
    int32_t op, layer, expert;
    uint64_t seq;
} move_t;

#define SLOT_READ_OP 64 /* a demand read queue entry of slot mode: op = SLOT_READ_OP + tensor index */

typedef struct {
    uint64_t lo, hi; /* file offsets, page-aligned */
} range_t;

typedef struct {
    uint8_t *addr; /* page-aligned */
    uint64_t n;    /* pages */
} run_t;

typedef struct {
    int32_t target, k, n_embd, sigmoid, max_rows;
    float eps;
    const float *weight, *norm, *bias;
} predictor_t;

struct spac_engine {
    int32_t n_layer, n_expert, max_t;
    uint8_t *base;
    uint64_t size;
    int fd;
    uint64_t page;

    tensor_t *tensors;  /* [n_layer][max_t] */
    int32_t *n_tensors; /* [n_layer] */

    /* per expert [n_layer][n_expert], all guarded by mu (in_use / evicting: the protocol in spac_engine.h) */
    uint64_t *latest; /* seq of the newest accepted move */
    uint8_t *wanted, *pinned, *transient;
    uint8_t *in_use;     /* the layer's matmuls may read the expert */
    uint16_t *evicting;  /* running evictions that drop pages of the expert */
    uint8_t *staged;     /* demand-loaded this step and kept until the tier decides (spac_engine_flags) */
    uint8_t *loading;    /* a prefetch of the expert is running (its eviction waits) */
    uint16_t *demanding; /* demand reads of the expert queued or running in the completer (its eviction waits) */
    uint8_t *pending;    /* op of the newest accepted move while it is queued, deferred or running (0: none) */
    uint8_t *flag_touched, *flag_kept, *flag_released; /* SPAC_FLAG_* for the tier */
    uint64_t stage_cap, staged_bytes; /* bytes (covering pages) */
    const int32_t *counts; /* the sensor's step counts, for prompt keep */
    int32_t prompt_keep;
    float *admit_rank;     /* [n_layer][n_expert] layer admission's keep ranks (spac_engine_set_admission) */
    float admit_floor;
    int64_t admit_slack;   /* plan bytes a swap may add (covering pages) */
    int32_t admit;
    /* predicted ranks (spac_engine_set_admission_model): a layer's ranks computed in its hook from its selection */
    float *am_next;        /* [n_layer][n_expert][n_expert] rank added to expert f by selected expert x (NULL: none) */
    float *am_base;        /* [n_layer][n_expert] rank of f whatever the layer selects */
    float am_self;         /* rank added to a selected expert */
    int32_t am_on;

    move_t *q;                 /* prefetches, pins, unpins */
    int32_t cap, head, count, running;
    move_t *qe;                /* evictions, served first */
    int32_t head_e, count_e, running_evict;
    range_t *drain_ranges;     /* [max_t], for evictions run by spac_engine_drain_evictions */
    move_t *deferred;
    int32_t n_deferred, cap_deferred;
    uint64_t seq;
    int32_t cur_layer; /* decoding thread's layer in progress, -1 between steps */

    /* asynchronous demand loads (SPAC_DEMAND_ASYNC): the hook submits a layer's reads and returns; the
     * completer thread waits for them (MADV_POPULATE_READ) while the layer computes */
    int32_t demand_mode;
    move_t *dq;                 /* demand reads to complete, in submission order */
    int32_t dq_cap, dq_head, dq_count, d_running;
    int64_t *batch_t0;          /* [n_layer] when the layer's outstanding demand reads were submitted (ns) */
    int32_t *batch_left;        /* [n_layer] of them not landed yet */
    pthread_cond_t cv_demand;   /* work for the completer */
    pthread_t completer;
    int32_t completer_started;

    pthread_mutex_t mu;
    pthread_cond_t cv_work, cv_idle; /* CLOCK_MONOTONIC (timed waits) */
    pthread_cond_t cv_evicted;       /* an eviction finished (the layer hook waits for it) */
    pthread_t *threads;
    int32_t n_threads, n_started, started, stopping;

    spac_engine_stats st;

    pthread_mutex_t mc_mu; /* residency scratch */
    uint64_t ra_chunk; /* bytes per MADV_WILLNEED call (spac_engine_set_readahead) */
    unsigned char *mc;
    size_t mc_cap;
    unsigned char *hit_mc; /* hit checks (decoding thread) */
    size_t hit_cap;

    /* file guard (spac_engine_guard_file; see the header): the identity recorded at the start */
    int32_t guard_slot; /* index into g_guards, -1: unguarded */
    int64_t size0;
    struct timespec mtime0;
    int32_t fault;      /* SPAC_FILE_*, sticky (atomic) */
    int64_t size_now;   /* atomic */
    int64_t read_faults; /* atomic */

    /* overlay reads (SPAC_FLASH_READ_OVERLAY, spac_engine_set_read_method) */
    int32_t read_method;
    int dfd;               /* O_DIRECT descriptor of the file (-1: none) */
    uint8_t *ovl;          /* [n_layer][n_expert][max_t] the range's inner pages are an overlay (atomic) */
    int64_t overlays;      /* overlays now (atomic) */
    int64_t max_overlays;  /* beyond this the page cache is used (each overlay splits a mapping: max_map_count) */
    pthread_mutex_t pool_mu;
    pthread_mutex_t ovl_mu[SPAC_OVL_STRIPES];
    run_t *pool;           /* free runs of anonymous pages, recycled between evictions and loads */
    int32_t pool_n, pool_cap_n;
    uint64_t pool_pages, pool_cap_pages;

    /* MUL_MAT_ID hooks (patch 0004): expert order per layer, misses the matmul waits for */
    const void *const *topk_src; /* the sensor's topk_data (spac_engine_set_topk_source) */
    const void **layer_ids;      /* [n_layer] topk data of each layer's latest hook */
    int32_t *mm_order;           /* [n_layer][n_expert] resident first, then the misses, then the rest */
    uint8_t *arriving;           /* [n_layer][n_expert] a miss the completer has not landed yet (atomic) */
    int32_t mmid_hooked;
    pthread_mutex_t land_mu;
    pthread_cond_t cv_landed;

    /* layer-ahead prediction (decoding thread only) */
    predictor_t *pred;  /* [n_layer] by source layer; target < 0: none */
    uint8_t *issued;    /* [n_layer][n_expert]: reads started by a prediction, not yet checked */
    float *scratch_h;   /* [n_embd] */
    float *scratch_s;   /* [n_expert] */
    int32_t scratch_embd;

    /* slots (SPAC_FLASH_READ_SLOTS, spac_engine_set_slots): experts in a host pool's slots, guarded by mu */
    int32_t n_groups, max_slots;
    int32_t *group_of;    /* [n_layer] the pool group of the layer's experts, -1: none */
    uint8_t **sbase;      /* [n_layer][max_t] slot 0 of the layer's i-th tensor in the pool */
    uint64_t *sstride;    /* [n_layer][max_t] bytes from one slot to the next */
    int32_t *slot;        /* [n_layer][n_expert] the expert's slot, -1: none */
    uint8_t *sready;      /* [n_layer][n_expert] the slot holds the expert's bytes (atomic; land_mu for waits) */
    int16_t *sleft;       /* [n_layer][n_expert] tensor reads of a demand load still outstanding */
    int32_t *gslots;      /* [n_groups] slots */
    int32_t *gnfree;      /* [n_groups] free slots */
    int32_t **gfree;      /* [n_groups][gslots] stack of free slots */
    int64_t **gowner;     /* [n_groups][gslots] expert index of the slot's holder, -1: free */
    const void **pool_ids;   /* [n_layer] data of the layer's remapped pool ids (spac_engine_on_map) */
    int32_t *slot_order;  /* [n_layer][max_slots] order the pool's MUL_MAT_ID takes the slots in */
    pthread_t *readers;   /* demand readers beyond the completer */
    int32_t n_readers, readers_started;
    uint64_t bounce_bytes; /* an O_DIRECT bounce buffer: the largest page-aligned cover of a tensor slice */
    uint8_t *slot_mark;    /* [max_slots] scratch of spac_engine_on_map */
};

static inline int slots_on(const spac_engine *e) {
    return __atomic_load_n(&e->read_method, __ATOMIC_ACQUIRE) == SPAC_FLASH_READ_SLOTS;
}

static void slot_evict_locked(spac_engine *e, int32_t layer, int64_t j);
static void requeue_deferred_locked(spac_engine *e);

static inline int64_t idx(const spac_engine *e, int32_t layer, int32_t expert) {
    return (int64_t)layer * e->n_expert + expert;
}

static inline uint64_t floor_pg(const spac_engine *e, uint64_t x) { return x - x % e->page; }
static inline uint64_t ceil_pg(const spac_engine *e, uint64_t x) { return floor_pg(e, x + e->page - 1); }

/* Record a failure (caller holds mu). */
static void note_error_locked(spac_engine *e, int kind, int err) {
    if (kind < 0 || kind >= SPAC_ERR_KINDS || err == 0) {
        return;
    }
    if (kind != SPAC_ERR_PIN) {
        e->st.errors++;
    }
    e->st.last_errno = err;
    if (e->st.error_count[kind]++ == 0) {
        e->st.error_errno[kind] = err;
    }
}

/* Record the failures a move or a hook collected outside the lock: errs[kind] = first errno (caller holds mu). */
static void note_errors_locked(spac_engine *e, const int *errs) {
    for (int k = 0; k < SPAC_ERR_KINDS; k++) {
        note_error_locked(e, k, errs[k]);
    }
}

static inline void keep_first(int *errs, int kind, int err) {
    if (errs[kind] == 0) {
        errs[kind] = err;
    }
}

const char *spac_engine_error_name(int32_t kind) {
    static const char *const names[SPAC_ERR_KINDS] = {"prefetch", "demand", "evict", "fadvise", "pin",
                                                       "unpin", "setup", "mincore", "defer", "nomem", "overlay", "slot"};
    return kind >= 0 && kind < SPAC_ERR_KINDS ? names[kind] : "";
}

/* Condition variables whose timed waits use CLOCK_MONOTONIC (a wall-clock jump neither shortens nor
 * stretches a timeout). */
/* now + timeout_ms, for pthread_cond_timedwait on a CLOCK_MONOTONIC condition variable */
static struct timespec deadline_after(struct timespec now, int32_t timeout_ms) {
    struct timespec d = now;
    d.tv_sec += timeout_ms / 1000;
    d.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (d.tv_nsec >= 1000000000L) {
        d.tv_sec++;
        d.tv_nsec -= 1000000000L;
    }
    return d;
}

static void cond_init_monotonic(pthread_cond_t *cv) {
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(cv, &a);
    pthread_condattr_destroy(&a);
}

spac_engine *spac_engine_new(int32_t n_layer, int32_t n_expert, int32_t max_tensors_per_layer, uint8_t *map_base,
                             uint64_t map_size, int32_t fd, int32_t n_threads, int32_t queue_capacity) {
    if (n_layer <= 0 || n_layer > SPAC_MAX_LAYERS || n_expert <= 0 || n_expert > SPAC_MAX_EXPERTS ||
        max_tensors_per_layer <= 0 || max_tensors_per_layer > SPAC_MAX_TENSORS_PER_LAYER || map_base == NULL ||
        map_size == 0 || n_threads <= 0 || n_threads > SPAC_MAX_THREADS || queue_capacity <= 0 ||
        queue_capacity > SPAC_MAX_QUEUE) {
        return NULL;
    }
    long page = sysconf(_SC_PAGESIZE);
    if (page <= 0 || ((uintptr_t)map_base % (uintptr_t)page) != 0) {
        return NULL;
    }
    spac_engine *e = (spac_engine *)calloc(1, sizeof(*e));
    if (e == NULL) {
        return NULL;
    }
    pthread_mutex_init(&e->mu, NULL);
    pthread_mutex_init(&e->mc_mu, NULL);
    pthread_mutex_init(&e->pool_mu, NULL);
    pthread_mutex_init(&e->land_mu, NULL);
    cond_init_monotonic(&e->cv_landed);
    for (int32_t i = 0; i < SPAC_OVL_STRIPES; i++) {
        pthread_mutex_init(&e->ovl_mu[i], NULL);
    }
    cond_init_monotonic(&e->cv_work);
    cond_init_monotonic(&e->cv_idle);
    cond_init_monotonic(&e->cv_evicted);
    cond_init_monotonic(&e->cv_demand);
    const int64_t n = (int64_t)n_layer * n_expert;
    e->n_layer = n_layer;
    e->n_expert = n_expert;
    e->max_t = max_tensors_per_layer;
    e->base = map_base;
    e->size = map_size;
    e->fd = fd;
    e->page = (uint64_t)page;
    e->ra_chunk = SPAC_DEFAULT_RA_CHUNK;
    e->cap = queue_capacity;
    e->cap_deferred = queue_capacity;
    e->n_threads = n_threads;
    e->cur_layer = -1;
    e->guard_slot = -1;
    e->dfd = -1;
    e->tensors = (tensor_t *)calloc((size_t)n_layer * max_tensors_per_layer, sizeof(tensor_t));
    e->n_tensors = (int32_t *)calloc((size_t)n_layer, sizeof(int32_t));
    e->latest = (uint64_t *)calloc((size_t)n, sizeof(uint64_t));
    e->wanted = (uint8_t *)calloc((size_t)n, 1);
    e->pinned = (uint8_t *)calloc((size_t)n, 1);
    e->transient = (uint8_t *)calloc((size_t)n, 1);
    e->in_use = (uint8_t *)calloc((size_t)n, 1);
    e->evicting = (uint16_t *)calloc((size_t)n, sizeof(uint16_t));
    e->staged = (uint8_t *)calloc((size_t)n, 1);
    e->loading = (uint8_t *)calloc((size_t)n, 1);
    e->demanding = (uint16_t *)calloc((size_t)n, sizeof(uint16_t));
    e->dq_cap = (int32_t)n; /* an expert has at most one read outstanding in the usual case; full: the hook waits */
    e->dq = (move_t *)calloc((size_t)n, sizeof(move_t));
    e->batch_t0 = (int64_t *)calloc((size_t)n_layer, sizeof(int64_t));
    e->batch_left = (int32_t *)calloc((size_t)n_layer, sizeof(int32_t));
    e->demand_mode = SPAC_DEMAND_ASYNC;
    e->pending = (uint8_t *)calloc((size_t)n, 1);
    e->flag_touched = (uint8_t *)calloc((size_t)n, 1);
    e->flag_kept = (uint8_t *)calloc((size_t)n, 1);
    e->flag_released = (uint8_t *)calloc((size_t)n, 1);
    e->admit_rank = (float *)calloc((size_t)n, sizeof(float));
    e->am_base = (float *)calloc((size_t)n, sizeof(float));
    e->qe = (move_t *)calloc((size_t)queue_capacity, sizeof(move_t));
    e->drain_ranges = (range_t *)calloc((size_t)max_tensors_per_layer, sizeof(range_t));
    e->q = (move_t *)calloc((size_t)queue_capacity, sizeof(move_t));
    e->deferred = (move_t *)calloc((size_t)queue_capacity, sizeof(move_t));
    e->threads = (pthread_t *)calloc((size_t)n_threads, sizeof(pthread_t));
    e->pred = (predictor_t *)calloc((size_t)n_layer, sizeof(predictor_t));
    e->issued = (uint8_t *)calloc((size_t)n, 1);
    e->scratch_s = (float *)calloc((size_t)n_expert, sizeof(float));
    e->ovl = (uint8_t *)calloc((size_t)n * (size_t)max_tensors_per_layer, 1);
    e->layer_ids = (const void **)calloc((size_t)n_layer, sizeof(void *));
    e->mm_order = (int32_t *)calloc((size_t)n, sizeof(int32_t));
    e->arriving = (uint8_t *)calloc((size_t)n, 1);
    if (!e->ovl || !e->layer_ids || !e->mm_order || !e->arriving || !e->tensors || !e->n_tensors || !e->latest || !e->wanted || !e->pinned || !e->transient || !e->in_use ||
        !e->evicting || !e->q || !e->deferred || !e->threads || !e->pred || !e->issued || !e->scratch_s ||
        !e->staged || !e->loading || !e->pending || !e->flag_touched || !e->flag_kept || !e->flag_released ||
        !e->qe || !e->drain_ranges || !e->demanding || !e->dq || !e->batch_t0 || !e->batch_left || !e->admit_rank ||
        !e->am_base) {
        spac_engine_free(e);
        return NULL;
    }
    for (int32_t l = 0; l < n_layer; l++) {
        e->pred[l].target = -1;
    }
    return e;
}

int32_t spac_engine_add_tensor(spac_engine *e, int32_t layer, uint64_t file_offset, uint64_t bytes_per_expert) {
    if (e == NULL || e->started || layer < 0 || layer >= e->n_layer || bytes_per_expert == 0 ||
        e->n_tensors[layer] >= e->max_t) {
        return -1;
    }
    /* the whole tensor must lie inside the mapping (overflow-safe) */
    if (file_offset > e->size || bytes_per_expert > (e->size - file_offset) / (uint64_t)e->n_expert) {
        return -1;
    }
    tensor_t *t = &e->tensors[(int64_t)layer * e->max_t + e->n_tensors[layer]++];
    t->off = file_offset;
    t->bpe = bytes_per_expert;
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * queue (callers hold mu) */

/* Evictions go to their own queue, which the workers serve first. */
static int32_t push_locked(spac_engine *e, move_t m) {
    const int evict = m.op == SPAC_OP_EVICT;
    int32_t *count = evict ? &e->count_e : &e->count;
    if (*count >= e->cap) {
        e->st.queue_full++;
        return -2;
    }
    if (evict) {
        e->qe[(e->head_e + e->count_e) % e->cap] = m;
    } else {
        e->q[(e->head + e->count) % e->cap] = m;
    }
    (*count)++;
    pthread_cond_signal(&e->cv_work);
    return 0;
}

/* The next move: an eviction when one is queued, else (unless evictions_only) a prefetch, pin or unpin. */
static int pop_locked(spac_engine *e, int evictions_only, move_t *out) {
    if (e->count_e > 0) {
        *out = e->qe[e->head_e];
        e->head_e = (e->head_e + 1) % e->cap;
        e->count_e--;
        return 1;
    }
    if (!evictions_only && e->count > 0) {
        *out = e->q[e->head];
        e->head = (e->head + 1) % e->cap;
        e->count--;
        return 1;
    }
    return 0;
}

static int32_t submit_locked(spac_engine *e, int32_t op, int32_t layer, int32_t expert) {
    const int64_t jx = idx(e, layer, expert);
    if (op == SPAC_OP_EVICT && slots_on(e) && e->slot[jx] >= 0 && !e->in_use[jx] && !e->loading[jx] &&
        !e->demanding[jx]) {
        /* an idle expert's slot is freed at once (no system call): a miss of this very layer may need it */
        e->seq++;
        e->latest[jx] = e->seq; /* queued moves of it are stale */
        e->pending[jx] = 0;
        slot_evict_locked(e, layer, jx);
        return 0;
    }
    move_t m = {op, layer, expert, e->seq + 1};
    int32_t rc = push_locked(e, m);
    if (rc == 0) {
        e->seq++;
        e->latest[idx(e, layer, expert)] = m.seq;
        e->pending[idx(e, layer, expert)] = (uint8_t)op;
    }
    return rc;
}

/* Drop every queued or deferred move of an expert (they become stale): the hook keeps it itself. */
static void supersede_locked(spac_engine *e, int32_t layer, int32_t expert) {
    e->seq++;
    e->latest[idx(e, layer, expert)] = e->seq;
    e->pending[idx(e, layer, expert)] = 0;
}

static int idle_locked(const spac_engine *e) {
    return e->count == 0 && e->count_e == 0 && e->running == 0 && e->dq_count == 0 && e->d_running == 0;
}

static void signal_idle_locked(spac_engine *e) {
    if (idle_locked(e)) {
        pthread_cond_broadcast(&e->cv_idle);
    }
}

/* ---------------------------------------------------------------------------------------------
 * file guard (see the header). The table is read by the SIGBUS handler, so its fields are only
 * accessed with atomic loads and stores; slots are taken and freed under g_guard_mu. */

enum { SPAC_MAX_GUARDS = 64 };

typedef struct {
    uintptr_t lo, hi;   /* guarded addresses [lo, hi); lo == hi: a free slot */
    uintptr_t base;     /* address of file offset 0 */
    uintptr_t fenced;   /* the lowest address backed by zero pages (hi: none) */
    int64_t caught;     /* SIGBUS answered */
    int fd;
} guard_t;

static guard_t g_guards[SPAC_MAX_GUARDS];
static pthread_mutex_t g_guard_mu = PTHREAD_MUTEX_INITIALIZER;
static struct sigaction g_prev_bus;
static int g_bus_installed;
static uintptr_t g_page;

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_ACQUIRE)
#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELEASE)

/* Replace the guarded pages from `from` (rounded down to a page, at least lo) up to what is already
 * fenced by anonymous zero pages. Async-signal-safe (mmap and atomics only). Returns 0, or -1 when
 * mmap failed. */
static int fence_from(guard_t *g, uintptr_t from) {
    uintptr_t lo = LOAD(g->lo), hi = LOAD(g->hi);
    from -= from % g_page;
    if (from < lo) {
        from = lo;
    }
    for (;;) {
        uintptr_t fenced = LOAD(g->fenced);
        if (from >= fenced || from >= hi) {
            return 0;
        }
        void *p = mmap((void *)from, fenced - from, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        if (p == MAP_FAILED) {
            return -1;
        }
        if (__atomic_compare_exchange_n(&g->fenced, &fenced, from, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            return 0;
        }
    }
}

/* The first page the file cannot back any more: the page after its end (a partial last page reads as
 * zeros past the end, it does not fault). */
static uintptr_t end_page(const guard_t *g, int64_t size) {
    uintptr_t end = LOAD(g->base) + (uintptr_t)size;
    return end + (end % g_page ? g_page - end % g_page : 0);
}

static void bus_handler(int sig, siginfo_t *si, void *uc) {
    int saved = errno;
    uintptr_t a = (uintptr_t)si->si_addr;
    if (si->si_code == BUS_ADRERR) { /* a page of a file mapping past the end of its file */
        for (int i = 0; i < SPAC_MAX_GUARDS; i++) {
            guard_t *g = &g_guards[i];
            uintptr_t lo = LOAD(g->lo), hi = LOAD(g->hi);
            if (lo < hi && a >= lo && a < hi) {
                uintptr_t from = a;
                struct stat st;
                if (fstat(LOAD(g->fd), &st) == 0 && end_page(g, st.st_size) < from) {
                    from = end_page(g, st.st_size); /* every page past the end, not only this one */
                }
                if (fence_from(g, from) == 0) {
                    __atomic_add_fetch(&g->caught, 1, __ATOMIC_ACQ_REL);
                    errno = saved;
                    return; /* the access is retried and reads a zero page */
                }
            }
        }
    }
    /* not ours: what would have happened without us (sa_handler and sa_sigaction share storage) */
    if (g_prev_bus.sa_handler != SIG_DFL && g_prev_bus.sa_handler != SIG_IGN) {
        if (g_prev_bus.sa_flags & SA_SIGINFO) {
            g_prev_bus.sa_sigaction(sig, si, uc);
        } else {
            g_prev_bus.sa_handler(sig);
        }
    } else { /* default (a synchronous SIGBUS cannot be ignored): die of it, as without us */
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigaction(sig, &dfl, NULL);
        raise(sig); /* delivered on return (blocked in the handler): the default action */
    }
    errno = saved;
}

static int faulted(spac_engine *e) {
    return LOAD(e->fault) != SPAC_FILE_OK || (e->guard_slot >= 0 && LOAD(g_guards[e->guard_slot].caught) > 0);
}

static void set_fault(spac_engine *e, int32_t fault) {
    int32_t none = SPAC_FILE_OK;
    __atomic_compare_exchange_n(&e->fault, &none, fault, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* fstat the file, record a fault, fence a shrunk file's tail. Any thread. Returns the fault. */
static int32_t check_file_now(spac_engine *e) {
    if (e->guard_slot < 0) {
        return SPAC_FILE_OK;
    }
    guard_t *g = &g_guards[e->guard_slot];
    struct stat st;
    if (fstat(e->fd, &st) != 0) {
        STORE(e->size_now, (int64_t)-1);
    } else {
        STORE(e->size_now, (int64_t)st.st_size);
        if ((int64_t)st.st_size < e->size0) {
            set_fault(e, SPAC_FILE_SHRUNK);
            fence_from(g, end_page(g, st.st_size));
        } else if ((int64_t)st.st_size != e->size0 || st.st_mtim.tv_sec != e->mtime0.tv_sec ||
                   st.st_mtim.tv_nsec != e->mtime0.tv_nsec) {
            set_fault(e, SPAC_FILE_MODIFIED);
        }
    }
    if (LOAD(g->caught) > 0) {
        set_fault(e, SPAC_FILE_SIGBUS);
    }
    return LOAD(e->fault);
}

/* A read that waits returned EFAULT: the file may have shrunk under it. */
static void on_read_fault(spac_engine *e) {
    __atomic_add_fetch(&e->read_faults, 1, __ATOMIC_ACQ_REL);
    if (check_file_now(e) == SPAC_FILE_OK) {
        set_fault(e, SPAC_FILE_READ_FAULT);
    }
}

int32_t spac_engine_guard_file(spac_engine *e, uint64_t map_lo, uint64_t map_hi) {
    long page = sysconf(_SC_PAGESIZE);
    if (e == NULL || e->fd < 0 || e->guard_slot >= 0 || page <= 0 || map_lo >= map_hi || map_hi > e->size ||
        map_lo % (uint64_t)page) {
        return -EINVAL;
    }
    map_hi += map_hi % (uint64_t)page ? (uint64_t)page - map_hi % (uint64_t)page : 0; /* the mapping's last page */
    struct stat st;
    if (fstat(e->fd, &st) != 0) {
        return -errno;
    }
    pthread_mutex_lock(&g_guard_mu);
    if (!g_bus_installed) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = bus_handler;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        g_page = (uintptr_t)page;
        if (sigaction(SIGBUS, &sa, &g_prev_bus) != 0) {
            int err = errno;
            pthread_mutex_unlock(&g_guard_mu);
            return -err;
        }
        g_bus_installed = 1;
    }
    int slot = -1;
    for (int i = 0; i < SPAC_MAX_GUARDS && slot < 0; i++) {
        if (LOAD(g_guards[i].lo) == LOAD(g_guards[i].hi)) {
            slot = i;
        }
    }
    if (slot >= 0) {
        guard_t *g = &g_guards[slot];
        uintptr_t base = (uintptr_t)e->base;
        STORE(g->lo, (uintptr_t)0); /* stays free (lo == hi) until every field is set */
        STORE(g->hi, (uintptr_t)0);
        STORE(g->base, base);
        STORE(g->fd, e->fd);
        STORE(g->caught, (int64_t)0);
        STORE(g->fenced, base + (uintptr_t)map_hi);
        STORE(g->hi, base + (uintptr_t)map_hi);
        STORE(g->lo, base + (uintptr_t)map_lo);
        e->size0 = (int64_t)st.st_size;
        e->mtime0 = st.st_mtim;
        STORE(e->size_now, (int64_t)st.st_size);
        e->guard_slot = slot;
    }
    pthread_mutex_unlock(&g_guard_mu);
    return slot >= 0 ? 0 : -ENOSPC;
}

int32_t spac_engine_check_file(spac_engine *e, spac_file_status *out) {
    if (e == NULL) {
        return SPAC_FILE_OK;
    }
    int32_t fault = check_file_now(e);
    if (out != NULL) {
        memset(out, 0, sizeof *out);
        out->guarded = e->guard_slot >= 0;
        out->fault = fault;
        out->size_at_start = e->guard_slot >= 0 ? e->size0 : -1;
        out->size_now = LOAD(e->size_now);
        out->read_faults = LOAD(e->read_faults);
        if (e->guard_slot >= 0) {
            const guard_t *g = &g_guards[e->guard_slot];
            out->sigbus_caught = LOAD(g->caught);
            out->fenced_bytes = (int64_t)(LOAD(g->hi) - LOAD(g->fenced));
        }
    }
    return fault;
}

static void unguard(spac_engine *e) {
    if (e->guard_slot < 0) {
        return;
    }
    pthread_mutex_lock(&g_guard_mu);
    guard_t *g = &g_guards[e->guard_slot];
    STORE(g->lo, (uintptr_t)0);
    STORE(g->hi, (uintptr_t)0);
    e->guard_slot = -1;
    pthread_mutex_unlock(&g_guard_mu);
}

/* ---------------------------------------------------------------------------------------------
 * the moves themselves (workers; no lock held during system calls) */

/* Pages that an expert touches in tensor t. */
static range_t covering(const spac_engine *e, const tensor_t *t, int32_t expert) {
    uint64_t s = t->off + (uint64_t)expert * t->bpe;
    range_t r = {floor_pg(e, s), ceil_pg(e, s + t->bpe)};
    if (r.hi > e->size) {
        r.hi = floor_pg(e, e->size) + (e->size % e->page ? e->page : 0);
    }
    return r;
}

/* madvise every page the expert touches, tensor by tensor (decoding thread: demand and lookahead).
 * Failures go to errs[SPAC_ERR_DEMAND] (EINVAL of POPULATE_READ: an old kernel, the matmul faults the
 * pages in instead). */
/* MADV_WILLNEED over [lo, hi) in pieces of at most ra_chunk bytes. One call reads at most the device's
 * readahead limit, max(read_ahead_kb, max_sectors_kb) (the kernel's force_page_cache_ra caps it, silently):
 * what lies beyond would be left to MADV_POPULATE_READ, i.e. to page faults, which read one page at a time
 * in a MADV_RANDOM mapping (a 32 MiB Mixtral expert tensor: 9 MiB/s instead of 730 MiB/s). */
static int willneed(const spac_engine *e, uint64_t lo, uint64_t hi) {
    int rc = 0;
    for (uint64_t a = lo; a < hi; a += e->ra_chunk) {
        uint64_t b = hi - a < e->ra_chunk ? hi : a + e->ra_chunk;
        if (madvise(e->base + a, b - a, MADV_WILLNEED) != 0) {
            rc = -1;
        }
    }
    return rc;
}

static void advise_expert(spac_engine *e, int32_t layer, int32_t expert, int advice, int *errs) {
    for (int32_t i = 0; i < e->n_tensors[layer]; i++) {
        range_t r = covering(e, &e->tensors[(int64_t)layer * e->max_t + i], expert);
        if (r.hi <= r.lo) {
            continue;
        }
        int rc = advice == MADV_WILLNEED ? willneed(e, r.lo, r.hi) : madvise(e->base + r.lo, r.hi - r.lo, advice);
        if (rc != 0 && !(advice == MADV_POPULATE_READ && errno == EINVAL)) {
            int err = errno;
            keep_first(errs, SPAC_ERR_DEMAND, err);
            if (advice == MADV_POPULATE_READ && err == EFAULT) {
                on_read_fault(e); /* fences a shrunk file's tail before the matmul reads it */
            }
        }
    }
}

/* Pages entirely inside the expert in tensor t (may be empty). */
static range_t inner(const spac_engine *e, const tensor_t *t, int32_t expert) {
    uint64_t s = t->off + (uint64_t)expert * t->bpe;
    range_t r = {ceil_pg(e, s), floor_pg(e, s + t->bpe)};
    if (r.hi < r.lo) {
        r.hi = r.lo;
    }
    return r;
}

/* ---------------------------------------------------------------------------------------------
 * overlay reads (SPAC_FLASH_READ_OVERLAY): an expert's inner pages in a tensor (those entirely inside its slice)
 * are read with O_DIRECT into anonymous pages, which mremap then moves onto llama.cpp's mapping at the
 * slice's own address: the matmul reads the same bytes at the same address, and the page cache is not
 * involved (no page-cache insertion to pay for on the read, no page-cache drop on the eviction; the CPU
 * per byte is a third to a sixth: flash.md "Read method"). Boundary pages are shared with a neighbouring
 * expert or other data and stay on the page-cache path. The switch is atomic for a concurrent reader: the
 * address maps the file's page (read through the page cache if touched) until mremap replaces it with the
 * anonymous page holding the same bytes; eviction maps the file back the same way. Pages moved out on an
 * eviction are kept in a small pool for the next read (fresh pages cost zeroing and page faults). */

static uint8_t *pool_take(spac_engine *e, uint64_t n) {
    pthread_mutex_lock(&e->pool_mu);
    for (int pass = 0; pass < 2; pass++) { /* an exact run first, else the head of a longer one */
        for (int32_t i = 0; i < e->pool_n; i++) {
            run_t *r = &e->pool[i];
            if (pass == 0 ? r->n == n : r->n > n) {
                uint8_t *a = r->addr;
                if (r->n == n) {
                    *r = e->pool[--e->pool_n];
                } else {
                    r->addr += n * e->page;
                    r->n -= n;
                }
                e->pool_pages -= n;
                pthread_mutex_unlock(&e->pool_mu);
                return a;
            }
        }
    }
    pthread_mutex_unlock(&e->pool_mu);
    void *a = mmap(NULL, (size_t)(n * e->page), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
                   -1, 0);
    if (a == MAP_FAILED) {
        return NULL;
    }
    __atomic_add_fetch(&e->st.overlay_fresh_bytes, (int64_t)(n * e->page), __ATOMIC_RELAXED);
    return (uint8_t *)a;
}

/* Whether the pool has room for n more pages (then an eviction moves its overlay's pages out into it). */
static int pool_has_room(spac_engine *e, uint64_t n) {
    pthread_mutex_lock(&e->pool_mu);
    int ok = e->pool_n < e->pool_cap_n && e->pool_pages + n <= e->pool_cap_pages;
    pthread_mutex_unlock(&e->pool_mu);
    return ok;
}

static void pool_put(spac_engine *e, uint8_t *a, uint64_t n) {
    pthread_mutex_lock(&e->pool_mu);
    if (e->pool_n < e->pool_cap_n && e->pool_pages + n <= e->pool_cap_pages) {
        e->pool[e->pool_n++] = (run_t){a, n};
        e->pool_pages += n;
        a = NULL;
    }
    pthread_mutex_unlock(&e->pool_mu);
    if (a != NULL) {
        munmap(a, (size_t)(n * e->page));
    }
}

static int pread_full(int fd, uint8_t *buf, uint64_t len, uint64_t off) {
    while (len > 0) {
        ssize_t got = pread(fd, buf, len, (off_t)off);
        if (got <= 0) {
            return got == 0 ? EIO : errno; /* 0: the file ends early (shrunk) */
        }
        buf += got;
        len -= (uint64_t)got;
        off += (uint64_t)got;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * slots (SPAC_FLASH_READ_SLOTS; see spac_engine_set_slots in the header). Callers of *_locked hold mu. */

static __thread uint8_t *tls_bounce; /* the calling thread's O_DIRECT bounce buffer (page-aligned) */
static __thread uint64_t tls_bounce_cap;

static void bounce_release(void) {
    free(tls_bounce);
    tls_bounce = NULL;
    tls_bounce_cap = 0;
}

static uint8_t *bounce_for(const spac_engine *e) {
    if (tls_bounce_cap < e->bounce_bytes) {
        bounce_release();
        void *p = NULL;
        if (posix_memalign(&p, (size_t)e->page, (size_t)e->bounce_bytes) != 0) {
            return NULL;
        }
        tls_bounce = (uint8_t *)p;
        tls_bounce_cap = e->bounce_bytes;
    }
    return tls_bounce;
}

/* Bytes of the expert's data in all its tensors (what its slot holds). */
static uint64_t expert_bytes(const spac_engine *e, int32_t layer) {
    uint64_t b = 0;
    for (int32_t i = 0; i < e->n_tensors[layer]; i++) {
        b += e->tensors[(int64_t)layer * e->max_t + i].bpe;
    }
    return b;
}

static int32_t slot_take_locked(spac_engine *e, int32_t layer, int64_t j) {
    const int32_t g = e->group_of[layer];
    if (g < 0 || e->gnfree[g] == 0) {
        return -1;
    }
    const int32_t s = e->gfree[g][--e->gnfree[g]];
    e->slot[j] = s;
    e->gowner[g][s] = j;
    __atomic_store_n(&e->sready[j], 0, __ATOMIC_RELEASE);
    e->st.slots_held++;
    return s;
}

static void slot_release_locked(spac_engine *e, int32_t layer, int64_t j) {
    const int32_t s = e->slot[j], g = e->group_of[layer];
    if (s < 0 || g < 0) {
        return;
    }
    __atomic_store_n(&e->sready[j], 0, __ATOMIC_RELEASE);
    e->slot[j] = -1;
    e->gowner[g][s] = -1;
    e->gfree[g][e->gnfree[g]++] = s;
    e->st.slots_held--;
}

/* The eviction of an idle expert in slot mode: its slot is free again (no system call). */
static void slot_evict_locked(spac_engine *e, int32_t layer, int64_t j) {
    slot_release_locked(e, layer, j);
    e->pinned[j] = 0;
    e->transient[j] = 0;
    e->flag_touched[j] = 1;
    e->st.evictions++;
    e->st.evict_bytes += (int64_t)expert_bytes(e, layer);
    requeue_deferred_locked(e); /* a prefetch that waited for a free slot */
}

/* Wait until (while the expert still has a slot) the slot holds its bytes, or the engine stops. */
static void slot_wait_ready(spac_engine *e, int64_t j) {
    if (__atomic_load_n(&e->sready[j], __ATOMIC_ACQUIRE)) {
        return;
    }
    pthread_mutex_lock(&e->land_mu);
    while (!__atomic_load_n(&e->sready[j], __ATOMIC_ACQUIRE) && __atomic_load_n(&e->slot[j], __ATOMIC_ACQUIRE) >= 0 &&
           !__atomic_load_n(&e->stopping, __ATOMIC_ACQUIRE)) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        const struct timespec dl = deadline_after(now, 100);
        pthread_cond_timedwait(&e->cv_landed, &e->land_mu, &dl);
    }
    pthread_mutex_unlock(&e->land_mu);
}

/* The slot holds the expert's bytes now: wake the matmul or hook waiting for it. */
static void slot_landed(spac_engine *e, int64_t j) {
    pthread_mutex_lock(&e->land_mu);
    __atomic_store_n(&e->sready[j], 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&e->cv_landed);
    pthread_mutex_unlock(&e->land_mu);
}

/* O_DIRECT read of [lo, lo + len) (page-aligned) into buf; at least `need` bytes must come (the file may end
 * within the last page). Returns 0 or an errno. */
static int pread_direct(int fd, uint8_t *buf, uint64_t len, uint64_t off, uint64_t need) {
    uint64_t got = 0;
    while (got < need) {
        ssize_t n = pread(fd, buf + got, len - got, (off_t)(off + got));
        if (n <= 0) {
            return n == 0 ? EIO : errno;
        }
        got += (uint64_t)n;
        if (got < need && got % 512 != 0) {
            return EIO; /* a short read before the end: the rest would be unaligned */
        }
    }
    return 0;
}

/* Read tensor i of (layer, expert) into slot s (which nobody computes from until it is marked ready). Returns
 * the bytes read; when O_DIRECT fails (or the file system refuses it) a buffered pread fills the slot and its pages
 * are dropped from the page cache again; when that fails too (the file changed: the guard's fault makes the tier
 * refuse the evaluation), the slot gets zeros. */
static uint64_t slot_read_tensor(spac_engine *e, int32_t layer, int32_t expert, int32_t i, int32_t s, int *errs,
                                 int64_t *fallbacks) {
    const int64_t ti = (int64_t)layer * e->max_t + i;
    const tensor_t *t = &e->tensors[ti];
    const uint64_t off = t->off + (uint64_t)expert * t->bpe, n = t->bpe;
    uint8_t *dst = e->sbase[ti] + (uint64_t)s * e->sstride[ti];
    int rc = EBADF;
    uint8_t *bounce = e->dfd >= 0 ? bounce_for(e) : NULL;
    if (bounce != NULL) {
        const uint64_t lo = floor_pg(e, off), hi = ceil_pg(e, off + n);
        rc = pread_direct(e->dfd, bounce, hi - lo, lo, off + n - lo);
        if (rc == 0) {
            memcpy(dst, bounce + (off - lo), (size_t)n);
            return n;
        }
        keep_first(errs, SPAC_ERR_SLOT, rc);
    } else if (e->dfd >= 0) {
        keep_first(errs, SPAC_ERR_NOMEM, ENOMEM);
    }
    /* a buffered read (no O_DIRECT here), then its pages out of the page cache again */
    (*fallbacks)++;
    if (e->fd >= 0 && !faulted(e) && pread_full(e->fd, dst, n, off) == 0) {
        posix_fadvise(e->fd, (off_t)floor_pg(e, off), (off_t)(ceil_pg(e, off + n) - floor_pg(e, off)),
                      POSIX_FADV_DONTNEED);
        return n;
    }
    keep_first(errs, SPAC_ERR_DEMAND, EIO);
    on_read_fault(e);
    memset(dst, 0, (size_t)n);
    return 0;
}

/* Every tensor of (layer, expert) into slot s; returns the bytes read. */
static int64_t slot_read_expert(spac_engine *e, int32_t layer, int32_t expert, int32_t s, int *errs,
                                int64_t *fallbacks) {
    int64_t bytes = 0;
    for (int32_t i = 0; i < e->n_tensors[layer]; i++) {
        bytes += (int64_t)slot_read_tensor(e, layer, expert, i, s, errs, fallbacks);
    }
    return bytes;
}

/* A prefetch in slot mode (a worker, holding mu on entry and exit): into a free slot; deferred while the expert
 * is in use (a layer computes it from where the hook found it) or no slot is free. */
static void slot_prefetch_locked(spac_engine *e, move_t m, int64_t j) {
    if (e->slot[j] >= 0) { /* already held (or being read) */
        if (e->latest[j] == m.seq) {
            e->pending[j] = 0;
        }
        signal_idle_locked(e);
        return;
    }
    if (e->in_use[j] || slot_take_locked(e, m.layer, j) < 0) {
        if (e->n_deferred < e->cap_deferred) {
            e->deferred[e->n_deferred++] = m;
            e->st.deferred++;
        } else {
            note_error_locked(e, SPAC_ERR_DEFER, ENOSPC);
            e->pending[j] = 0;
        }
        signal_idle_locked(e);
        return;
    }
    const int32_t s = e->slot[j];
    e->loading[j] = 1;
    e->running++;
    pthread_mutex_unlock(&e->mu);
    int errs[SPAC_ERR_KINDS] = {0};
    int64_t fallbacks = 0;
    const int64_t bytes = slot_read_expert(e, m.layer, m.expert, s, errs, &fallbacks);
    slot_landed(e, j);
    pthread_mutex_lock(&e->mu);
    e->loading[j] = 0;
    e->running--;
    if (e->latest[j] == m.seq) {
        e->pending[j] = 0;
    }
    e->flag_touched[j] = 1;
    e->st.prefetches++;
    e->st.prefetch_bytes += bytes;
    e->st.slot_reads += e->n_tensors[m.layer];
    e->st.slot_read_bytes += bytes;
    e->st.slot_fallbacks += fallbacks;
    requeue_deferred_locked(e); /* an eviction that waited for this prefetch */
    pthread_cond_broadcast(&e->cv_evicted);
    note_errors_locked(e, errs);
    signal_idle_locked(e);
}

static inline uint8_t *ovl_flag(spac_engine *e, int32_t layer, int32_t expert, int32_t i) {
    return &e->ovl[idx(e, layer, expert) * e->max_t + i];
}

/* A range's overlay changes (in, out) under one of SPAC_OVL_STRIPES locks, so that a prefetch and an eviction or
 * a demand load of the same expert cannot interleave their mremap and mmap calls. */
static inline pthread_mutex_t *ovl_lock(spac_engine *e, int32_t layer, int32_t expert) {
    return &e->ovl_mu[(uint64_t)idx(e, layer, expert) % SPAC_OVL_STRIPES];
}

/* Overlay the inner pages of (layer, expert) in tensor i. Returns the bytes read, 0 when there was nothing
 * to do (no inner page, already an overlay), -1 when the caller must use the page cache instead (overlays
 * off or at their limit, or a failure: errno in *err). */
static int64_t overlay_in(spac_engine *e, int32_t layer, int32_t expert, int32_t i, int *err) {
    const range_t in = inner(e, &e->tensors[(int64_t)layer * e->max_t + i], expert);
    uint8_t *flag = ovl_flag(e, layer, expert, i);
    if (in.hi <= in.lo || __atomic_load_n(flag, __ATOMIC_ACQUIRE)) {
        return 0;
    }
    if (__atomic_load_n(&e->read_method, __ATOMIC_ACQUIRE) != SPAC_FLASH_READ_OVERLAY || e->dfd < 0 ||
        __atomic_load_n(&e->overlays, __ATOMIC_RELAXED) >= e->max_overlays) {
        return -1;
    }
    const uint64_t len = in.hi - in.lo, n = len / e->page;
    pthread_mutex_t *mu = ovl_lock(e, layer, expert);
    pthread_mutex_lock(mu);
    if (__atomic_load_n(flag, __ATOMIC_ACQUIRE)) { /* another thread got there first */
        pthread_mutex_unlock(mu);
        return 0;
    }
    uint8_t *buf = pool_take(e, n);
    int rc = buf == NULL ? ENOMEM : pread_full(e->dfd, buf, len, in.lo);
    if (rc == 0 && mremap(buf, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, e->base + in.lo) == MAP_FAILED) {
        rc = errno;
    }
    if (rc != 0) {
        pthread_mutex_unlock(mu);
        if (buf != NULL) {
            pool_put(e, buf, n);
        }
        *err = rc;
        __atomic_add_fetch(&e->st.overlay_fallbacks, 1, __ATOMIC_RELAXED);
        return -1;
    }
    /* copies of these pages the page cache may hold (a matmul that got there first, an earlier page-cache
     * load) are nobody's now: drop them, or they would take RAM that no residency check sees */
    if (e->fd >= 0) {
        posix_fadvise(e->fd, (off_t)in.lo, (off_t)len, POSIX_FADV_DONTNEED);
    }
    __atomic_store_n(flag, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(mu);
    __atomic_add_fetch(&e->overlays, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&e->st.overlay_loads, 1, __ATOMIC_RELAXED);
    return (int64_t)len;
}

/* Give the overlay of (layer, expert) in tensor i back: its pages move into the pool (or are freed when it is
 * full) and the file is mapped there again, with the tier's MADV_RANDOM. Returns 1 if there was one, 0 if
 * not, -1 on a failure (errno in *err; the overlay stays, with its correct bytes). */
static int overlay_out(spac_engine *e, int32_t layer, int32_t expert, int32_t i, int *err) {
    uint8_t *flag = ovl_flag(e, layer, expert, i);
    if (!__atomic_load_n(flag, __ATOMIC_ACQUIRE)) {
        return 0;
    }
    const range_t in = inner(e, &e->tensors[(int64_t)layer * e->max_t + i], expert);
    const uint64_t len = in.hi - in.lo, n = len / e->page;
    uint8_t *at = e->base + in.lo;
    pthread_mutex_t *mu = ovl_lock(e, layer, expert);
    pthread_mutex_lock(mu);
    if (!__atomic_load_n(flag, __ATOMIC_ACQUIRE)) {
        pthread_mutex_unlock(mu);
        return 0;
    }
    /* Never a hole in llama.cpp's mapping, not even for a moment: any mmap(NULL) in the process (another
     * thread's, malloc's) could be placed in it, and the file mapping below would then clobber that. So the
     * pages move out with MREMAP_DONTUNMAP (the range stays mapped, empty: nobody reads an expert being
     * evicted) and the file is mapped over it, which replaces a mapping in one step. */
    if (pool_has_room(e, n)) {
        void *dst = mremap(at, len, len, MREMAP_MAYMOVE | MREMAP_DONTUNMAP, NULL);
        if (dst != MAP_FAILED) {
            pool_put(e, (uint8_t *)dst, n);
        } /* else (e.g. a kernel before 5.7): the file mapping below frees the pages instead */
    }
    if (mmap(at, (size_t)len, PROT_READ, MAP_SHARED | MAP_FIXED, e->fd, (off_t)in.lo) == MAP_FAILED) {
        *err = errno;
        pthread_mutex_unlock(mu);
        return -1;
    }
    madvise(at, (size_t)len, MADV_RANDOM);
    __atomic_store_n(flag, 0, __ATOMIC_RELEASE);
    pthread_mutex_unlock(mu);
    __atomic_sub_fetch(&e->overlays, 1, __ATOMIC_RELAXED);
    return 1;
}

/* MADV_POPULATE_READ over r (waits for the reads and maps the pages). Returns 0, or -1 after a read failure
 * (EFAULT: the file may have shrunk; the caller must not touch the pages). Old kernels without it (EINVAL,
 * Linux < 5.14): every page touched instead. */
static int populate(spac_engine *e, range_t r, int kind, int *errs) {
    if (r.hi <= r.lo || madvise(e->base + r.lo, r.hi - r.lo, MADV_POPULATE_READ) == 0) {
        return 0;
    }
    int err = errno;
    if (err != EINVAL) {
        keep_first(errs, kind, err);
        if (err == EFAULT) {
            on_read_fault(e);
            return -1;
        }
    } else if (check_file_now(e) == SPAC_FILE_OK) {
        volatile uint8_t sink = 0;
        for (uint64_t p = r.lo; p < r.hi; p += e->page) {
            sink ^= e->base[p];
        }
        (void)sink;
    }
    return 0;
}

/* The parts of tensor i's covering pages of `expert` that the page cache serves when its inner pages are an
 * overlay (the boundary pages, or all of it when no page is inside); returns how many (0-2). */
static int32_t boundary_parts(const spac_engine *e, int32_t layer, int32_t expert, int32_t i, range_t *out) {
    const tensor_t *t = &e->tensors[(int64_t)layer * e->max_t + i];
    const range_t cov = covering(e, t, expert), in = inner(e, t, expert);
    int32_t n = 0;
    if (cov.hi <= cov.lo) {
        return 0;
    }
    if (in.hi <= in.lo) {
        out[n++] = cov;
        return n;
    }
    if (cov.lo < in.lo) {
        out[n++] = (range_t){cov.lo, in.lo};
    }
    if (in.hi < cov.hi) {
        out[n++] = (range_t){in.hi, cov.hi};
    }
    return n;
}

/* Read experts xs[0..n) of a layer for the matmul with overlays (SPAC_FLASH_READ_OVERLAY): readahead of every boundary
 * page first (the page cache reads them while the overlays are read), then the overlays, one range at a time
 * (a range that cannot be one goes through the page cache), then the boundary pages awaited and mapped.
 * Returns the bytes covered; failures go to errs[kind]. */
static int64_t load_overlaid(spac_engine *e, int32_t layer, const int32_t *xs, int32_t n, int kind, int *errs) {
    range_t parts[2];
    int64_t bytes = 0;
    for (int32_t m = 0; m < n; m++) {
        for (int32_t i = 0; i < e->n_tensors[layer]; i++) {
            const int32_t np = boundary_parts(e, layer, xs[m], i, parts);
            for (int32_t p = 0; p < np; p++) {
                if (willneed(e, parts[p].lo, parts[p].hi) != 0) {
                    keep_first(errs, kind, errno);
                }
            }
        }
    }
    for (int32_t m = 0; m < n; m++) {
        for (int32_t i = 0; i < e->n_tensors[layer]; i++) {
            int err = 0;
            const int64_t got = overlay_in(e, layer, xs[m], i, &err);
            if (err != 0) {
                keep_first(errs, SPAC_ERR_OVERLAY, err);
            }
            if (got < 0) { /* the page cache instead */
                const range_t in = inner(e, &e->tensors[(int64_t)layer * e->max_t + i], xs[m]);
                if (willneed(e, in.lo, in.hi) != 0) {
                    keep_first(errs, kind, errno);
                }
                if (populate(e, in, kind, errs) != 0) {
                    return bytes;
                }
                bytes += (int64_t)(in.hi - in.lo);
            } else {
                bytes += got;
            }
        }
    }
    for (int32_t m = 0; m < n; m++) {
        for (int32_t i = 0; i < e->n_tensors[layer]; i++) {
            const int32_t np = boundary_parts(e, layer, xs[m], i, parts);
            for (int32_t p = 0; p < np; p++) {
                if (populate(e, parts[p], kind, errs) != 0) {
                    return bytes;
                }
                bytes += (int64_t)(parts[p].hi - parts[p].lo);
            }
        }
    }
    return bytes;
}

static void do_prefetch(spac_engine *e, int32_t layer, int32_t expert, int64_t *bytes, int *errs) {
    if (__atomic_load_n(&e->read_method, __ATOMIC_ACQUIRE) == SPAC_FLASH_READ_OVERLAY) {
        *bytes += load_overlaid(e, layer, &expert, 1, SPAC_ERR_PREFETCH, errs);
        return;
    }
    for (int32_t i = 0; i < e->n_tensors[layer]; i++) {
        range_t r = covering(e, &e->tensors[(int64_t)layer * e->max_t + i], expert);
        if (r.hi <= r.lo) {
            continue;
        }
        /* readahead of exactly this range, then wait for it (and map it); a failed read (EFAULT: the file may
         * have shrunk): never touch the pages */
        if (willneed(e, r.lo, r.hi) != 0) {
            keep_first(errs, SPAC_ERR_PREFETCH, errno);
        }
        if (populate(e, r, SPAC_ERR_PREFETCH, errs) != 0) {
            return;
        }
        *bytes += (int64_t)(r.hi - r.lo);
    }
}

static void do_pin(spac_engine *e, int32_t layer, int32_t expert, int pin, int *errs) {
    for (int32_t i = 0; i < e->n_tensors[layer]; i++) {
        range_t r = inner(e, &e->tensors[(int64_t)layer * e->max_t + i], expert);
        if (r.hi <= r.lo) {
            continue;
        }
        int rc = pin ? mlock(e->base + r.lo, r.hi - r.lo) : munlock(e->base + r.lo, r.hi - r.lo);
        if (rc != 0) {
            keep_first(errs, pin ? SPAC_ERR_PIN : SPAC_ERR_UNPIN, errno);
        }
    }
}

/* Eviction range of an expert in tensor t: its inner pages plus each boundary page whose other
 * expert is neither wanted, in use nor staged (flags read by the caller under the lock). */
static range_t evict_range(const spac_engine *e, const tensor_t *t, int32_t expert, int left_free, int right_free) {
    range_t in = inner(e, t, expert);
    range_t cov = covering(e, t, expert);
    range_t r = in;
    if (in.hi <= in.lo) { /* no page inside the expert: start empty between its boundary pages */
        r.lo = r.hi = in.lo;
    }
    if (cov.lo < in.lo && left_free) {
        r.lo = cov.lo;
    }
    if (cov.hi > in.hi && right_free) {
        r.hi = cov.hi;
    }
    if (r.hi < r.lo) {
        r.hi = r.lo;
    }
    return r;
}

/* Whether the experts sharing a boundary page with `expert` (same tensor) are all free to drop. */
static int neighbours_free(const spac_engine *e, const tensor_t *t, int32_t layer, int32_t expert, int right) {
    uint64_t s = t->off + (uint64_t)expert * t->bpe;
    uint64_t page_start = right ? floor_pg(e, s + t->bpe - 1) : floor_pg(e, s);
    uint64_t page_end = page_start + e->page;
    int32_t lo = page_start <= t->off ? 0 : (int32_t)((page_start - t->off) / t->bpe);
    uint64_t last = page_end - 1;
    uint64_t tend = t->off + (uint64_t)e->n_expert * t->bpe;
    /* the page reaches outside the tensor: shared with other data, keep it */
    if (page_start < t->off || page_end > tend) {
        return 0;
    }
    int32_t hi = (int32_t)((last - t->off) / t->bpe);
    for (int32_t x = lo; x <= hi && x < e->n_expert; x++) {
        if (x == expert) {
            continue;
        }
        int64_t j = idx(e, layer, x);
        if (e->wanted[j] || e->in_use[j] || e->staged[j] || e->demanding[j]) {
            return 0;
        }
    }
    return 1;
}

/* Whether any page of [lo, hi) is still in the page cache (mincore in pieces of a stack buffer; a failure
 * counts as yes, so that the caller takes the thorough path). */
static int any_resident(const spac_engine *e, uint64_t lo, uint64_t hi) {
    unsigned char v[4096];
    for (uint64_t a = lo; a < hi;) {
        uint64_t n = (hi - a) / e->page;
        n = n > sizeof v ? sizeof v : n;
        if (n == 0 || mincore(e->base + a, n * e->page, v) != 0) {
            return 1;
        }
        for (uint64_t i = 0; i < n; i++) {
            if (v[i] & 1) {
                return 1;
            }
        }
        a += n * e->page;
    }
    return 0;
}

/* Unmap the range from our mapping and drop its pages from the page cache. */
static void drop_pages(spac_engine *e, range_t r, int *errs) {
    if (madvise(e->base + r.lo, r.hi - r.lo, MADV_DONTNEED) != 0) {
        keep_first(errs, SPAC_ERR_EVICT, errno);
    }
    if (e->fd >= 0) {
        int rc = posix_fadvise(e->fd, (off_t)r.lo, (off_t)(r.hi - r.lo), POSIX_FADV_DONTNEED);
        if (rc != 0) {
            keep_first(errs, SPAC_ERR_FADVISE, rc);
        }
    }
}

static void do_evict(spac_engine *e, int32_t layer, int32_t expert, const range_t *ranges, int32_t n, int unpin,
                     int64_t *bytes, int64_t *pageouts, int *errs) {
    for (int32_t i = 0; i < n; i++) {
        range_t r = ranges[i];
        if (r.hi <= r.lo) {
            continue;
        }
        if (unpin && munlock(e->base + r.lo, r.hi - r.lo) != 0) {
            keep_first(errs, SPAC_ERR_EVICT, errno);
        }
        *bytes += (int64_t)(r.hi - r.lo);
        int err = 0;
        const int out = expert >= 0 ? overlay_out(e, layer, expert, i, &err) : 0;
        if (out < 0) {
            keep_first(errs, SPAC_ERR_OVERLAY, err);
        }
        range_t parts[2] = {r, r};
        int32_t np = 1;
        if (out == 1) { /* the inner pages went with the overlay: the page cache holds the rest of r (r, an
                         * evict_range, holds the inner pages and at most the boundary pages beside them) */
            const range_t in = inner(e, &e->tensors[(int64_t)layer * e->max_t + i], expert);
            np = 0;
            if (r.lo < in.lo) {
                parts[np++] = (range_t){r.lo, in.lo};
            }
            if (in.hi < r.hi) {
                parts[np++] = (range_t){in.hi, r.hi};
            }
        }
        for (int32_t p = 0; p < np; p++) {
            /* DONTNEED + fadvise drop the engine's own reads (single pages); a large folio that straddles the
             * range (the load's, or pages mapped elsewhere) survives them. Only then MADV_PAGEOUT, which splits
             * such folios, and the drop again: PAGEOUT costs 4x the rest (0.25 vs 0.06 s of CPU per GiB here) */
            drop_pages(e, parts[p], errs);
            if (any_resident(e, parts[p].lo, parts[p].hi)) {
                (*pageouts)++;
                madvise(e->base + parts[p].lo, parts[p].hi - parts[p].lo, MADV_PAGEOUT);
                drop_pages(e, parts[p], errs);
            }
        }
    }
}

/* The experts [*lo, *hi] whose pages the eviction ranges of `expert` touch (the expert and the
 * neighbours sharing a dropped boundary page; contiguous, since every range contains the expert). */
static void evicted_span(const spac_engine *e, int32_t layer, int32_t expert, const range_t *ranges, int32_t n,
                         int32_t *lo, int32_t *hi) {
    *lo = *hi = expert;
    for (int32_t i = 0; i < n; i++) {
        const tensor_t *t = &e->tensors[(int64_t)layer * e->max_t + i];
        range_t r = ranges[i];
        if (r.hi <= r.lo) {
            continue;
        }
        int32_t a = r.lo <= t->off ? 0 : (int32_t)((r.lo - t->off) / t->bpe);
        int32_t b = (int32_t)((r.hi - 1 - t->off) / t->bpe);
        b = b < e->n_expert ? b : e->n_expert - 1;
        *lo = a < *lo ? a : *lo;
        *hi = b > *hi ? b : *hi;
    }
}

/* Move deferred moves whose expert is free again (neither in use nor being prefetched) back to their
 * queue; stale ones are dropped. Caller holds mu. */
static void requeue_deferred_locked(spac_engine *e) {
    int32_t keep = 0;
    for (int32_t i = 0; i < e->n_deferred; i++) {
        move_t m = e->deferred[i];
        int64_t j = idx(e, m.layer, m.expert);
        if (m.seq != e->latest[j]) {
            e->st.superseded++;
        } else if (e->in_use[j] || e->loading[j] || e->demanding[j] || e->stopping || push_locked(e, m) != 0) {
            e->deferred[keep++] = m;
        }
    }
    e->n_deferred = keep;
}

/* Run one move that was just taken from a queue (caller holds mu; it is released during the system
 * calls): stale moves are dropped, an eviction of an expert in use or being prefetched is deferred. */
static void exec_move_locked(spac_engine *e, move_t m, range_t *ranges) {
    const int64_t j = idx(e, m.layer, m.expert);
    if (m.seq != e->latest[j]) {
        e->st.superseded++;
        signal_idle_locked(e);
        return;
    }
    if (m.op == SPAC_OP_PREFETCH && slots_on(e)) {
        slot_prefetch_locked(e, m, j);
        return;
    }
    /* protocol, rule 1: an in-use expert is not evicted; the move waits for its release. Nor is one whose
     * prefetch or demand read is running: its POPULATE_READ would read the pages back after the eviction. */
    if (m.op == SPAC_OP_EVICT && (e->in_use[j] || e->loading[j] || e->demanding[j])) {
        if (e->n_deferred < e->cap_deferred) {
            e->deferred[e->n_deferred++] = m;
            e->st.deferred++;
            e->st.loading_defers += !e->in_use[j];
        } else {
            note_error_locked(e, SPAC_ERR_DEFER, ENOSPC);
            e->pending[j] = 0;
        }
        signal_idle_locked(e);
        return;
    }
    if (slots_on(e) && (m.op == SPAC_OP_PIN || m.op == SPAC_OP_UNPIN || (m.op == SPAC_OP_EVICT && e->slot[j] >= 0))) {
        /* a slot is freed, not dropped from the page cache: no system call; a pin is only recorded (the pool's
         * anonymous memory is not locked: not done yet) */
        if (m.op == SPAC_OP_EVICT) {
            slot_evict_locked(e, m.layer, j);
        } else {
            e->pinned[j] = m.op == SPAC_OP_PIN;
            e->st.pins += m.op == SPAC_OP_PIN;
            e->st.unpins += m.op == SPAC_OP_UNPIN;
        }
        if (e->latest[j] == m.seq) {
            e->pending[j] = 0;
        }
        pthread_cond_broadcast(&e->cv_evicted);
        signal_idle_locked(e);
        return;
    }
    int errs[SPAC_ERR_KINDS] = {0};
    int32_t nr = 0, span_lo = 0, span_hi = -1;
    int unpin = 0;
    if (m.op == SPAC_OP_EVICT && ranges != NULL) {
        for (int32_t i = 0; i < e->n_tensors[m.layer]; i++) {
            const tensor_t *t = &e->tensors[(int64_t)m.layer * e->max_t + i];
            ranges[nr++] = evict_range(e, t, m.expert, neighbours_free(e, t, m.layer, m.expert, 0),
                                       neighbours_free(e, t, m.layer, m.expert, 1));
        }
        unpin = e->pinned[j];
        e->pinned[j] = 0;
        e->transient[j] = 0;
        /* still under the lock that checked in_use: from here until the system calls have returned,
         * the hook sees these experts as evicting */
        evicted_span(e, m.layer, m.expert, ranges, nr, &span_lo, &span_hi);
        for (int32_t x = span_lo; x <= span_hi; x++) {
            int64_t k = idx(e, m.layer, x);
            e->st.evict_in_use += e->in_use[k]; /* cannot happen: checked above / by neighbours_free */
            e->evicting[k]++;
        }
        e->running_evict++;
    }
    if (m.op == SPAC_OP_PREFETCH) {
        e->loading[j] = 1;
    }
    e->running++;
    pthread_mutex_unlock(&e->mu);

    int64_t bytes = 0, pageouts = 0;
    switch (faulted(e) ? 0 : m.op) { /* a changed file: no more page moves */
    case SPAC_OP_PREFETCH:
        do_prefetch(e, m.layer, m.expert, &bytes, errs);
        break;
    case SPAC_OP_EVICT:
        if (ranges == NULL) {
            errs[SPAC_ERR_NOMEM] = ENOMEM;
        } else {
            do_evict(e, m.layer, m.expert, ranges, nr, unpin, &bytes, &pageouts, errs);
        }
        break;
    case SPAC_OP_PIN:
    case SPAC_OP_UNPIN:
        do_pin(e, m.layer, m.expert, m.op == SPAC_OP_PIN, errs);
        break;
    default:
        break;
    }

    pthread_mutex_lock(&e->mu);
    e->running--;
    if (m.op == SPAC_OP_EVICT && ranges != NULL) {
        e->running_evict--;
    }
    if (span_hi >= span_lo) {
        for (int32_t x = span_lo; x <= span_hi; x++) {
            e->evicting[idx(e, m.layer, x)]--;
            e->flag_touched[idx(e, m.layer, x)] = 1; /* boundary pages of neighbours may have gone too */
        }
    }
    if (e->latest[j] == m.seq) {
        e->pending[j] = 0;
    }
    switch (m.op) {
    case SPAC_OP_PREFETCH:
        e->loading[j] = 0;
        e->flag_touched[j] = 1;
        e->st.prefetches++;
        e->st.prefetch_bytes += bytes;
        requeue_deferred_locked(e); /* an eviction that waited for this prefetch */
        break;
    case SPAC_OP_EVICT:
        e->st.evictions++;
        e->st.evict_bytes += bytes;
        e->st.evict_pageouts += pageouts;
        break;
    case SPAC_OP_PIN:
        if (errs[SPAC_ERR_PIN]) {
            e->st.pin_failures++;
        } else {
            e->st.pins++;
            e->pinned[j] = 1;
        }
        break;
    case SPAC_OP_UNPIN:
        e->st.unpins++;
        e->pinned[j] = 0;
        break;
    }
    pthread_cond_broadcast(&e->cv_evicted); /* the hook and drains wait for evictions (and prefetches) to end */
    note_errors_locked(e, errs);
    signal_idle_locked(e);
}

static void *worker(void *arg) {
    spac_engine *e = (spac_engine *)arg;
    range_t *ranges = (range_t *)calloc((size_t)e->max_t, sizeof(range_t));
    pthread_mutex_lock(&e->mu);
    for (;;) {
        move_t m;
        while (!e->stopping && e->count == 0 && e->count_e == 0) {
            pthread_cond_wait(&e->cv_work, &e->mu);
        }
        if (e->stopping) {
            break;
        }
        if (pop_locked(e, 0, &m)) {
            exec_move_locked(e, m, ranges);
        }
    }
    pthread_mutex_unlock(&e->mu);
    free(ranges);
    bounce_release();
    return NULL;
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* A miss handed to the completer has landed (or will not be read): wake the matmul waiting for it. */
static void land(spac_engine *e, int64_t j) {
    if (__atomic_load_n(&e->arriving[j], __ATOMIC_ACQUIRE)) {
        pthread_mutex_lock(&e->land_mu);
        __atomic_store_n(&e->arriving[j], 0, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&e->cv_landed);
        pthread_mutex_unlock(&e->land_mu);
    }
}

/* The completer (SPAC_DEMAND_ASYNC): waits for the demand reads the layer hook submitted, one expert at a
 * time in submission order, while the decoding thread computes. MADV_POPULATE_READ returns once the pages
 * are resident (and maps them, so the matmul finds more of them mapped); an expert whose pages the matmul
 * faults in first costs it a walk over present pages. Until its wait has returned, the expert's eviction is
 * deferred (`demanding`), since the wait would read dropped pages back. */
static void *completer(void *arg) {
    spac_engine *e = (spac_engine *)arg;
    pthread_mutex_lock(&e->mu);
    for (;;) {
        while (!e->stopping && e->dq_count == 0) {
            pthread_cond_wait(&e->cv_demand, &e->mu);
        }
        if (e->stopping) {
            break;
        }
        move_t m = e->dq[e->dq_head];
        e->dq_head = (e->dq_head + 1) % e->dq_cap;
        e->dq_count--;
        e->d_running++;
        const int64_t j = idx(e, m.layer, m.expert);
        if (m.op >= SLOT_READ_OP) { /* one tensor of a demand load into its slot (fixed while demanding) */
            const int32_t s = e->slot[j];
            pthread_mutex_unlock(&e->mu);
            int errs[SPAC_ERR_KINDS] = {0};
            int64_t fallbacks = 0;
            const uint64_t bytes = s >= 0 ? slot_read_tensor(e, m.layer, m.expert, m.op - SLOT_READ_OP, s, errs,
                                                             &fallbacks) : 0;
            const int64_t t = now_ns();
            pthread_mutex_lock(&e->mu);
            e->d_running--;
            e->st.slot_reads++;
            e->st.slot_read_bytes += (int64_t)bytes;
            e->st.slot_fallbacks += fallbacks;
            if (--e->sleft[j] <= 0) {
                e->sleft[j] = 0;
                e->demanding[j]--;
                e->flag_touched[j] = 1;
                slot_landed(e, j);
            }
            if (--e->batch_left[m.layer] == 0) {
                e->st.demand_read_ns += t - e->batch_t0[m.layer];
            }
            note_errors_locked(e, errs);
            requeue_deferred_locked(e);
            pthread_cond_broadcast(&e->cv_evicted);
            signal_idle_locked(e);
            continue;
        }
        pthread_mutex_unlock(&e->mu);
        int errs[SPAC_ERR_KINDS] = {0};
        if (faulted(e)) {
            /* a changed file: no reads (a matmul waiting for the expert faults on the guard's zero pages) */
        } else if (__atomic_load_n(&e->arriving[j], __ATOMIC_ACQUIRE)) { /* an overlay read the matmul waits for */
            load_overlaid(e, m.layer, &m.expert, 1, SPAC_ERR_DEMAND, errs);
        } else {
            advise_expert(e, m.layer, m.expert, MADV_POPULATE_READ, errs);
        }
        land(e, j);
        const int64_t t = now_ns();
        pthread_mutex_lock(&e->mu);
        e->d_running--;
        e->demanding[j]--;
        e->flag_touched[j] = 1;
        if (--e->batch_left[m.layer] == 0) {
            e->st.demand_read_ns += t - e->batch_t0[m.layer];
        }
        note_errors_locked(e, errs);
        requeue_deferred_locked(e); /* evictions that waited for this read */
        pthread_cond_broadcast(&e->cv_evicted);
        signal_idle_locked(e);
    }
    pthread_mutex_unlock(&e->mu);
    bounce_release();
    return NULL;
}

int32_t spac_engine_set_demand_mode(spac_engine *e, int32_t mode) {
    if (e == NULL || (mode != SPAC_DEMAND_WAIT && mode != SPAC_DEMAND_ASYNC)) {
        return -1;
    }
    pthread_mutex_lock(&e->mu);
    e->demand_mode = mode;
    pthread_mutex_unlock(&e->mu);
    return 0;
}

int32_t spac_engine_start(spac_engine *e) {
    if (e == NULL) {
        return -EINVAL;
    }
    pthread_mutex_lock(&e->mu);
    if (e->started) {
        pthread_mutex_unlock(&e->mu);
        return 0;
    }
    e->started = 1;
    pthread_mutex_unlock(&e->mu);
    int errs[SPAC_ERR_KINDS] = {0};
    /* pages of a freshly written model file are dirty and cannot be dropped until written back */
    if (e->fd >= 0 && fdatasync(e->fd) != 0 && errno != EINVAL && errno != EROFS) {
        keep_first(errs, SPAC_ERR_SETUP, errno);
    }
    /* no read-around on faults in expert tensors: the kernel's readahead window (often MBs) would pull
     * in neighbouring experts that nobody asked for; the engine reads exact ranges itself. The edge pages
     * that a tensor shares with other data are included: a fault there (the other data's first or last
     * bytes) would read around into the experts too. */
    for (int32_t l = 0; l < e->n_layer; l++) {
        for (int32_t i = 0; i < e->n_tensors[l]; i++) {
            const tensor_t *t = &e->tensors[(int64_t)l * e->max_t + i];
            uint64_t lo = floor_pg(e, t->off), hi = ceil_pg(e, t->off + (uint64_t)e->n_expert * t->bpe);
            hi = hi < ceil_pg(e, e->size) ? hi : ceil_pg(e, e->size);
            if (hi > lo && madvise(e->base + lo, hi - lo, MADV_RANDOM) != 0) {
                keep_first(errs, SPAC_ERR_SETUP, errno);
            }
        }
    }
    pthread_mutex_lock(&e->mu);
    note_errors_locked(e, errs);
    pthread_mutex_unlock(&e->mu);
    /* n_started is read by wait_idle and stop under the lock (the new workers block on it until we are done) */
    int rc = 0;
    pthread_mutex_lock(&e->mu);
    for (int32_t i = 0; i < e->n_threads && rc == 0; i++) {
        rc = pthread_create(&e->threads[i], NULL, worker, e);
        e->n_started += rc == 0;
    }
    if (rc == 0) {
        rc = pthread_create(&e->completer, NULL, completer, e);
        e->completer_started = rc == 0;
    }
    for (int32_t i = 0; i < e->n_readers && rc == 0; i++) { /* slot mode: more demand reads in flight */
        rc = pthread_create(&e->readers[i], NULL, completer, e);
        e->readers_started += rc == 0;
    }
    pthread_mutex_unlock(&e->mu);
    if (rc != 0) {
        spac_engine_stop(e);
        return -rc;
    }
    return 0;
}

int32_t spac_engine_submit(spac_engine *e, int32_t op, int32_t layer, int32_t expert) {
    if (e == NULL || op < SPAC_OP_PREFETCH || op > SPAC_OP_UNPIN || layer < 0 || layer >= e->n_layer || expert < 0 ||
        expert >= e->n_expert || e->n_tensors[layer] == 0) {
        return -1;
    }
    pthread_mutex_lock(&e->mu);
    int32_t rc = e->stopping ? -3 : submit_locked(e, op, layer, expert);
    pthread_mutex_unlock(&e->mu);
    return rc;
}

void spac_engine_set_wanted(spac_engine *e, int32_t layer, int32_t expert, int32_t wanted) {
    if (e == NULL || layer < 0 || layer >= e->n_layer || expert < 0 || expert >= e->n_expert) {
        return;
    }
    pthread_mutex_lock(&e->mu);
    e->wanted[idx(e, layer, expert)] = wanted ? 1 : 0;
    pthread_mutex_unlock(&e->mu);
}

/* A layer's matmuls are done: release its experts, queue transient evictions and deferred moves. */
static void finish_layer_locked(spac_engine *e, int32_t layer) {
    if (layer < 0 || layer >= e->n_layer) {
        return;
    }
    for (int32_t x = 0; x < e->n_expert; x++) {
        int64_t j = idx(e, layer, x);
        e->in_use[j] = 0;
        if (e->transient[j]) {
            e->transient[j] = 0;
            /* slot mode: a miss read through the page cache (no free slot) leaves it even when planned */
            const int spilled = slots_on(e) && e->slot[j] < 0;
            if ((!e->wanted[j] || spilled) && !e->stopping && submit_locked(e, SPAC_OP_EVICT, layer, x) == 0) {
                e->st.transient_evictions++;
            }
        }
    }
    requeue_deferred_locked(e);
}

/* A scratch vector of at least n bytes in *buf (capacity *cap), grown as needed; 0 when out of memory. */
static int reserve_scratch(unsigned char **buf, size_t *cap, size_t n) {
    if (n > *cap) {
        unsigned char *p = (unsigned char *)realloc(*buf, n);
        if (p == NULL) {
            return 0;
        }
        *buf = p;
        *cap = n;
    }
    return 1;
}

/* Whether every page of the expert is resident (one mincore per tensor range, into the caller's
 * scratch vector *buf of *cap bytes). A partly resident expert counts as a miss: left to page
 * faults, its missing pages would be read one at a time. A failure counts as a miss, too (errs). */
static int resident_whole(spac_engine *e, int32_t layer, int32_t expert, unsigned char **buf, size_t *cap,
                          int *errs) {
    for (int32_t i = 0; i < e->n_tensors[layer]; i++) {
        range_t r = covering(e, &e->tensors[(int64_t)layer * e->max_t + i], expert);
        size_t n = (size_t)((r.hi - r.lo) / e->page);
        if (n == 0) {
            continue;
        }
        if (!reserve_scratch(buf, cap, n)) {
            keep_first(errs, SPAC_ERR_NOMEM, ENOMEM);
            return 0;
        }
        if (mincore(e->base + r.lo, r.hi - r.lo, *buf) != 0) {
            keep_first(errs, SPAC_ERR_MINCORE, errno);
            return 0;
        }
        for (size_t j = 0; j < n; j++) {
            if (!((*buf)[j] & 1)) {
                return 0;
            }
        }
    }
    return 1;
}

int32_t spac_engine_expert_resident(spac_engine *e, int32_t layer, int32_t expert) {
    if (e == NULL || layer < 0 || layer >= e->n_layer || expert < 0 || expert >= e->n_expert) {
        return -1;
    }
    int errs[SPAC_ERR_KINDS] = {0};
    pthread_mutex_lock(&e->mc_mu);
    int r = resident_whole(e, layer, expert, &e->mc, &e->mc_cap, errs);
    pthread_mutex_unlock(&e->mc_mu);
    return r;
}

/* Bytes of the pages an expert touches (what keeping it resident costs). */
static uint64_t cover_bytes(const spac_engine *e, int32_t layer, int32_t expert) {
    uint64_t b = 0;
    for (int32_t i = 0; i < e->n_tensors[layer]; i++) {
        range_t r = covering(e, &e->tensors[(int64_t)layer * e->max_t + i], expert);
        b += r.hi > r.lo ? r.hi - r.lo : 0;
    }
    return b;
}

static int cmp_desc_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x < y) - (x > y);
}

/* An expert becomes wanted by the engine's own decision (prompt keep, layer admission): flagged for the
 * tier, no longer staged or transient. Caller holds mu. */
static void swap_in_locked(spac_engine *e, int32_t layer, int32_t x) {
    const int64_t j = idx(e, layer, x);
    e->wanted[j] = 1;
    e->flag_touched[j] = 1;
    if (e->flag_released[j]) { /* released earlier in this step: planned again */
        e->flag_released[j] = 0;
    } else {
        e->flag_kept[j] = 1;
    }
    if (e->staged[j]) { /* kept by an earlier ubatch's staging: now planned, no longer staged */
        e->staged[j] = 0;
        e->staged_bytes -= cover_bytes(e, layer, x);
    }
    e->transient[j] = 0;
}

/* A planned expert stops being wanted by the engine's own decision and is evicted (deferred by the worker
 * while in use). Caller holds mu. */
static void swap_out_locked(spac_engine *e, int32_t layer, int32_t x) {
    const int64_t j = idx(e, layer, x);
    e->wanted[j] = 0;
    e->flag_touched[j] = 1;
    if (e->flag_kept[j]) {
        e->flag_kept[j] = 0;
    } else {
        e->flag_released[j] = 1;
    }
    if (!e->stopping) {
        submit_locked(e, SPAC_OP_EVICT, layer, x);
    }
}

/* Prompt keep (see the header), for one layer whose selections of this step are all counted: the
 * layer's planned experts are replaced, one for one, by the experts with the most tokens of the step,
 * a planned expert winning ties (it needs no read). A newcomer always has tokens (it is selected:
 * being read for this layer's matmul anyway), so no read is added; a displaced expert is evicted
 * (once its layer is done if it is in use). Caller holds mu. */
static void prompt_swap_locked(spac_engine *e, int32_t layer) {
    const int32_t n = e->n_expert;
    const int32_t *c = e->counts + (int64_t)layer * n;
    int64_t key[SPAC_MAX_EXPERTS];
    int32_t n_held = 0, n_key = 0;
    for (int32_t x = 0; x < n; x++) {
        const int64_t j = idx(e, layer, x);
        n_held += e->wanted[j] != 0;
        if (e->wanted[j] || c[x] > 0) { /* (tokens, planned, lower id first) in one sortable key */
            int64_t tokens = c[x] > 0 ? c[x] : 0;
            key[n_key++] = (tokens << 32) | ((int64_t)(e->wanted[j] != 0) << 31) | (int64_t)(SPAC_MAX_EXPERTS - 1 - x);
        }
    }
    if (n_held == 0) {
        return;
    }
    qsort(key, (size_t)n_key, sizeof(int64_t), cmp_desc_i64);
    uint8_t keep[SPAC_MAX_EXPERTS];
    memset(keep, 0, (size_t)n);
    for (int32_t i = 0; i < n_held && i < n_key; i++) {
        keep[SPAC_MAX_EXPERTS - 1 - (int32_t)(key[i] & 0x7fffffff)] = 1;
    }
    for (int32_t x = 0; x < n; x++) {
        const int64_t j = idx(e, layer, x);
        if (keep[x] && !e->wanted[j]) {
            swap_in_locked(e, layer, x);
            e->st.prompt_kept++;
        } else if (!keep[x] && e->wanted[j]) {
            swap_out_locked(e, layer, x);
            e->st.prompt_released++;
        }
    }
}

/* Predicted ranks (see the header): the layer's admission ranks after this step, from the experts it selected
 * (sel, n_sel of them): base + self for a selected expert + the sum over selected x of next[x][f]. Caller
 * holds mu; the model arrays are the engine's own copies (spac_engine_set_admission_model). */
static void predict_ranks_locked(spac_engine *e, int32_t layer, const int32_t *sel, int32_t n_sel) {
    const int32_t n = e->n_expert;
    float *r = e->admit_rank + (int64_t)layer * n;
    memcpy(r, e->am_base + (int64_t)layer * n, (size_t)n * sizeof(float));
    for (int32_t m = 0; m < n_sel; m++) {
        r[sel[m]] += e->am_self;
        if (e->am_next != NULL) {
            const float *row = e->am_next + ((int64_t)layer * n + sel[m]) * n;
            for (int32_t f = 0; f < n; f++) {
                r[f] += row[f];
            }
        }
    }
}

/* Layer admission (see the header) of one demand load x of `layer` that the plan does not hold: 1 when it
 * took a planned expert's place. Caller holds mu. */
static int admit_locked(spac_engine *e, int32_t layer, int32_t x) {
    const int64_t jx = idx(e, layer, x);
    const float mine = e->admit_rank[jx] > e->admit_floor ? e->admit_rank[jx] : e->admit_floor;
    int32_t victim = -1;
    for (int32_t v = 0; v < e->n_expert; v++) {
        const int64_t j = idx(e, layer, v);
        /* not one this layer is using, not pinned, not one a read is still landing for */
        if (!e->wanted[j] || e->in_use[j] || e->pinned[j] || e->demanding[j]) {
            continue;
        }
        /* of equal ranks the highest id: the policies keep lower ids first (reference_caches.DemandCache), and
         * a victim other than the rule's would be read back by the rule's plan after the step */
        if (victim < 0 || e->admit_rank[j] <= e->admit_rank[idx(e, layer, victim)]) {
            victim = v;
        }
    }
    if (victim < 0 || !(e->admit_rank[idx(e, layer, victim)] < mine)) {
        return 0;
    }
    const int64_t more = (int64_t)cover_bytes(e, layer, x) - (int64_t)cover_bytes(e, layer, victim);
    if (more > e->admit_slack) {
        return 0;
    }
    e->admit_slack -= more;
    swap_in_locked(e, layer, x);
    e->admit_rank[jx] = mine; /* ranks as what it now is: just used */
    swap_out_locked(e, layer, victim);
    e->st.admitted++;
    return 1;
}
/* What becomes of a layer's misses (caller holds mu): prompt keep's and layer admission's swaps (the displaced
 * experts' evictions are queued, or in slot mode done at once when idle), then each miss the plan does not hold
 * is staged (kept to the step's end within the staging cap) or transient (evicted once its layer has finished). */
static void decide_misses_locked(spac_engine *e, int32_t layer, const int32_t *sel, int32_t n_sel,
                                 const int32_t *misses, int32_t n_miss) {
    if (e->prompt_keep && e->counts != NULL) {
        prompt_swap_locked(e, layer);
    }
    if (e->admit && e->am_on && !e->prompt_keep && n_miss > 0) {
        predict_ranks_locked(e, layer, sel, n_sel);
    }
    for (int32_t m = 0; m < n_miss; m++) {
        int64_t j = idx(e, layer, misses[m]);
        e->flag_touched[j] = 1;
        if (e->wanted[j] || e->staged[j]) {
            continue;
        }
        if (e->admit && !e->prompt_keep && admit_locked(e, layer, misses[m])) {
            supersede_locked(e, layer, misses[m]); /* a queued eviction (the plan dropped it) is stale now */
            continue;
        }
        /* kept until the step ends while the staging cap allows (the step-end plan decides; no second
         * read when it wants the expert), else evicted once this layer has finished */
        uint64_t b = cover_bytes(e, layer, misses[m]);
        if (e->staged_bytes + b <= e->stage_cap) {
            e->staged[j] = 1;
            e->staged_bytes += b;
            e->st.staged++;
            supersede_locked(e, layer, misses[m]); /* a queued eviction (the plan dropped it) is stale now */
        } else {
            e->transient[j] = 1;
        }
    }
}

/* The layer hook in slot mode, after the in-use marks (see spac_engine_on_layer): hits are experts whose slot holds
 * them; misses get a slot, after layer admission or prompt keep freed their victims' (one for one), and their
 * tensors are read by the demand readers, several in flight; with no slot free a miss is read through the page
 * cache here and dropped after its layer. In SPAC_DEMAND_ASYNC the pool's MUL_MAT_ID waits for each slot still
 * being read (spac_engine_mmid_wait); else this hook waits for them all. */
static void on_layer_slots(spac_engine *e, int32_t layer, const int32_t *sel, int32_t n_sel, int file_ok) {
    int32_t misses[SPAC_MAX_EXPERTS] = {0}, spill[SPAC_MAX_EXPERTS], sync_reads[SPAC_MAX_EXPERTS];
    int32_t n_miss = 0, n_spill = 0, n_sync = 0, n_arriving = 0;
    int64_t hits = 0;
    int errs[SPAC_ERR_KINDS] = {0};
    const int64_t t0 = now_ns();
    const int32_t nt = e->n_tensors[layer];
    pthread_mutex_lock(&e->mu);
    if (e->cur_layer >= 0 && e->cur_layer != layer) {
        finish_layer_locked(e, e->cur_layer); /* frees the previous layer's transient slots first */
    }
    e->cur_layer = layer;
    for (int32_t m = 0; m < n_sel; m++) {
        const int64_t j = idx(e, layer, sel[m]);
        if (e->slot[j] < 0) {
            misses[n_miss++] = sel[m];
        } else if (__atomic_load_n(&e->sready[j], __ATOMIC_ACQUIRE)) {
            hits++;
        } else {
            n_arriving++; /* a prefetch or an earlier ubatch's read is landing it */
        }
    }
    decide_misses_locked(e, layer, sel, n_sel, misses, n_miss);
    const int queued = e->completer_started && !e->stopping && e->dq_count + n_miss * nt <= e->dq_cap;
    int32_t items = 0;
    for (int32_t m = 0; m < n_miss; m++) {
        const int64_t j = idx(e, layer, misses[m]);
        e->flag_touched[j] = 1;
        if (!file_ok || slot_take_locked(e, layer, j) < 0) {
            spill[n_spill++] = misses[m];
            e->transient[j] = 1; /* its pages go after the layer, planned or not (finish_layer_locked) */
            if (e->staged[j]) {  /* nothing is kept to the step's end */
                e->staged[j] = 0;
                e->staged_bytes -= cover_bytes(e, layer, misses[m]);
            }
            continue;
        }
        e->demanding[j]++;
        if (!queued) {
            sync_reads[n_sync++] = misses[m];
            continue;
        }
        e->sleft[j] = (int16_t)nt;
        for (int32_t i = 0; i < nt; i++) { /* tensor by tensor: the gate and up matmuls come before the down one */
            e->dq[(e->dq_head + e->dq_count) % e->dq_cap] = (move_t){SLOT_READ_OP + i, layer, misses[m], 0};
            e->dq_count++;
            items++;
        }
    }
    if (items > 0) {
        if (e->batch_left[layer] == 0) {
            e->batch_t0[layer] = t0;
        }
        e->batch_left[layer] += items;
        e->st.demand_async++;
        pthread_cond_broadcast(&e->cv_demand);
    }
    e->st.demand_hits += hits;
    e->st.demand_misses += n_miss + n_arriving;
    e->st.slot_spills += n_spill;
    const int async = e->demand_mode == SPAC_DEMAND_ASYNC && __atomic_load_n(&e->mmid_hooked, __ATOMIC_ACQUIRE);
    pthread_mutex_unlock(&e->mu);

    for (int32_t q = 0; q < n_sync; q++) { /* no room in the readers' queue (or no readers): read here */
        const int64_t j = idx(e, layer, sync_reads[q]);
        int64_t fallbacks = 0;
        const int64_t bytes = slot_read_expert(e, layer, sync_reads[q], e->slot[j], errs, &fallbacks);
        pthread_mutex_lock(&e->mu);
        e->demanding[j]--;
        e->st.slot_reads += nt;
        e->st.slot_read_bytes += bytes;
        e->st.slot_fallbacks += fallbacks;
        slot_landed(e, j);
        requeue_deferred_locked(e);
        pthread_mutex_unlock(&e->mu);
    }
    if (n_spill > 0 && file_ok) { /* the page cache's demand load: all readahead first, then the waits */
        for (int32_t q = 0; q < n_spill; q++) {
            advise_expert(e, layer, spill[q], MADV_WILLNEED, errs);
        }
        for (int32_t q = 0; q < n_spill; q++) {
            advise_expert(e, layer, spill[q], MADV_POPULATE_READ, errs);
        }
    }
    if (!async && n_miss + n_arriving > 0) { /* the matmul cannot wait per slot: every selected slot lands first */
        for (int32_t m = 0; m < n_sel; m++) {
            slot_wait_ready(e, idx(e, layer, sel[m]));
        }
    }
    const int64_t t1 = now_ns();
    pthread_mutex_lock(&e->mu);
    e->st.demand_wait_ns += t1 - t0;
    if (!async && n_miss + n_arriving > 0) {
        e->st.demand_read_ns += t1 - t0;
    }
    note_errors_locked(e, errs);
    pthread_mutex_unlock(&e->mu);
}

void spac_engine_on_layer(void *engine, int32_t layer, const uint8_t *mask) {
    spac_engine *e = (spac_engine *)engine;
    if (e == NULL || mask == NULL || layer < 0 || layer >= e->n_layer || e->n_tensors[layer] == 0) {
        return;
    }
    int32_t sel[SPAC_MAX_EXPERTS], misses[SPAC_MAX_EXPERTS]; /* n_expert <= SPAC_MAX_EXPERTS (spac_engine_new) */
    int32_t n_sel = 0, n_miss = 0;
    for (int32_t x = 0; x < e->n_expert; x++) {
        if (mask[x]) {
            sel[n_sel++] = x;
        }
    }
    /* protocol, rule 2: mark in use, then let evictions that were already running finish */
    pthread_mutex_lock(&e->mu);
    for (int32_t m = 0; m < n_sel; m++) {
        e->in_use[idx(e, layer, sel[m])] = 1;
    }
    for (int waited = 0;;) {
        int busy = 0;
        for (int32_t m = 0; m < n_sel && !busy; m++) {
            busy = e->evicting[idx(e, layer, sel[m])] != 0;
        }
        if (!busy) {
            break;
        }
        if (!waited) {
            e->st.evict_waits++;
            waited = 1;
        }
        pthread_cond_wait(&e->cv_evicted, &e->mu);
    }
    pthread_mutex_unlock(&e->mu);

    /* the file guard: a file shrunk since the last look gets its tail fenced now, before this layer's
     * matmuls read it (one fstat) */
    const int file_ok = e->guard_slot < 0 || check_file_now(e) == SPAC_FILE_OK;
    if (slots_on(e)) {
        on_layer_slots(e, layer, sel, n_sel, file_ok);
        return;
    }

    /* rule 3: nothing can drop these experts' pages now; what is not resident is a miss */
    int errs[SPAC_ERR_KINDS] = {0};
    int64_t hits = 0, useful = 0;
    for (int32_t m = 0; m < n_sel; m++) {
        useful += e->issued[idx(e, layer, sel[m])];
        if (resident_whole(e, layer, sel[m], &e->hit_mc, &e->hit_cap, errs)) {
            hits++;
        } else {
            misses[n_miss++] = sel[m];
        }
    }
    /* the order the patched MUL_MAT_ID takes the layer's experts in: resident first, the misses in the order of
     * their reads (the completer's), the rest (not selected: no rows) after them; only for the hooks that read
     * it (before t0: not part of the demand wait) */
    if (__atomic_load_n(&e->mmid_hooked, __ATOMIC_ACQUIRE)) {
        int32_t *ord = e->mm_order + (int64_t)layer * e->n_expert, n_ord = 0;
        for (int32_t m = 0, q = 0; m < n_sel; m++) {
            if (q < n_miss && misses[q] == sel[m]) {
                q++;
            } else {
                ord[n_ord++] = sel[m];
            }
        }
        for (int32_t q = 0; q < n_miss; q++) {
            ord[n_ord++] = misses[q];
        }
        for (int32_t x = 0, m = 0; x < e->n_expert; x++) {
            if (m < n_sel && sel[m] == x) {
                m++;
            } else {
                ord[n_ord++] = x;
            }
        }
        e->layer_ids[layer] = e->topk_src != NULL ? *e->topk_src : NULL;
    }
    /* Demand load of exactly the missing experts, which the matmul about to run needs: submit the reads of
     * all of them at once (parallel I/O), tensor by tensor (the matmuls read the gate and up tensors of
     * every expert before the down tensor). Left to page faults, each page would be read on its own (expert
     * tensors are MADV_RANDOM: no read-around). SPAC_DEMAND_WAIT then waits for them here; SPAC_DEMAND_ASYNC
     * hands the wait to the completer and returns: the layer's matmuls compute the resident experts while
     * the reads land, and a page not read yet makes the matmul wait in its page fault for exactly that page. */
    const int64_t t0 = now_ns();
    int async = 0;
    const int overlay = __atomic_load_n(&e->read_method, __ATOMIC_ACQUIRE) == SPAC_FLASH_READ_OVERLAY;
    if (n_miss > 0 && file_ok) {
        if (!overlay) {
            for (int32_t i = 0; i < e->n_tensors[layer]; i++) {
                const tensor_t *t = &e->tensors[(int64_t)layer * e->max_t + i];
                for (int32_t m = 0; m < n_miss; m++) {
                    range_t r = covering(e, t, misses[m]);
                    if (r.hi > r.lo && willneed(e, r.lo, r.hi) != 0) {
                        keep_first(errs, SPAC_ERR_DEMAND, errno);
                    }
                }
            }
        }
        /* Overlays: until its mremap a missing range is the file's, and a matmul reaching it first would read it
         * through the page cache, one page per fault. So the completer reads them only where the patched
         * MUL_MAT_ID's hooks make the matmul compute the resident experts first and wait for each miss
         * (spac_engine_mmid_wait); without them the hook reads and waits here. */
        pthread_mutex_lock(&e->mu);
        async = e->demand_mode == SPAC_DEMAND_ASYNC && e->completer_started && !e->stopping &&
                e->dq_count + n_miss <= e->dq_cap &&
                (!overlay || (__atomic_load_n(&e->mmid_hooked, __ATOMIC_ACQUIRE) && e->layer_ids[layer] != NULL));
        if (async) {
            for (int32_t m = 0; m < n_miss; m++) {
                const int64_t j = idx(e, layer, misses[m]);
                if (overlay) {
                    __atomic_store_n(&e->arriving[j], 1, __ATOMIC_RELEASE); /* the completer overlays it */
                }
                e->dq[(e->dq_head + e->dq_count) % e->dq_cap] = (move_t){0, layer, misses[m], 0};
                e->dq_count++;
                e->demanding[j]++;
            }
            if (e->batch_left[layer] == 0) {
                e->batch_t0[layer] = t0;
            }
            e->batch_left[layer] += n_miss;
            e->st.demand_async++;
            pthread_cond_signal(&e->cv_demand);
        }
        pthread_mutex_unlock(&e->mu);
        if (!async && overlay) {
            load_overlaid(e, layer, misses, n_miss, SPAC_ERR_DEMAND, errs);
        } else if (!async) {
            for (int32_t m = 0; m < n_miss; m++) {
                advise_expert(e, layer, misses[m], MADV_POPULATE_READ, errs);
            }
        }
    }
    const int64_t t1 = now_ns();
    pthread_mutex_lock(&e->mu);
    e->st.demand_wait_ns += t1 - t0;
    if (n_miss > 0 && !async) {
        e->st.demand_read_ns += t1 - t0;
    }
    note_errors_locked(e, errs);
    if (e->cur_layer >= 0 && e->cur_layer != layer) {
        finish_layer_locked(e, e->cur_layer);
        /* finishing cleared in_use only for the previous layer; ours stay marked */
    }
    e->cur_layer = layer;
    memset(e->issued + (int64_t)layer * e->n_expert, 0, (size_t)e->n_expert);
    e->st.demand_hits += hits;
    e->st.ahead_useful += useful;
    e->st.demand_misses += n_miss;
    for (int32_t m = 0; m < n_sel; m++) {
        /* the invariant the matmul relies on (rules 1-2 make this impossible) */
        int64_t j = idx(e, layer, sel[m]);
        e->st.evict_in_use += !e->in_use[j] || e->evicting[j] != 0;
    }
    decide_misses_locked(e, layer, sel, n_sel, misses, n_miss);
    pthread_mutex_unlock(&e->mu);
}

void spac_engine_end_step(spac_engine *e) {
    if (e == NULL) {
        return;
    }
    pthread_mutex_lock(&e->mu);
    for (int32_t l = 0; l < e->n_layer; l++) {
        finish_layer_locked(e, l);
    }
    e->cur_layer = -1;
    e->prompt_keep = 0;
    pthread_mutex_unlock(&e->mu);
}

void spac_engine_set_staging(spac_engine *e, uint64_t cap_bytes) {
    if (e != NULL) {
        pthread_mutex_lock(&e->mu);
        e->stage_cap = cap_bytes;
        pthread_mutex_unlock(&e->mu);
    }
}

void spac_engine_set_prompt_keep(spac_engine *e, const int32_t *counts, int32_t on) {
    if (e != NULL) {
        pthread_mutex_lock(&e->mu);
        e->counts = counts;
        e->prompt_keep = on && counts != NULL;
        pthread_mutex_unlock(&e->mu);
    }
}

int32_t spac_engine_set_admission(spac_engine *e, const float *rank, float newcomer_floor, int64_t slack_bytes,
                                  int32_t on) {
    if (e == NULL || (on && rank == NULL)) {
        return -1;
    }
    pthread_mutex_lock(&e->mu);
    if (on) {
        memcpy(e->admit_rank, rank, (size_t)e->n_layer * (size_t)e->n_expert * sizeof(float));
    }
    e->admit_floor = newcomer_floor;
    e->admit_slack = slack_bytes > 0 ? slack_bytes : 0;
    e->admit = on != 0;
    pthread_mutex_unlock(&e->mu);
    return 0;
}

int32_t spac_engine_set_admission_model(spac_engine *e, const float *next, const float *base, float self_rank,
                                        int32_t on) {
    if (e == NULL || (on && base == NULL) || !isfinite(self_rank)) {
        return -1;
    }
    const size_t n = (size_t)e->n_layer * (size_t)e->n_expert;
    float *copy = NULL;
    if (on && next != NULL) {
        copy = (float *)malloc(n * (size_t)e->n_expert * sizeof(float));
        if (copy == NULL) {
            return -2;
        }
        memcpy(copy, next, n * (size_t)e->n_expert * sizeof(float));
    }
    pthread_mutex_lock(&e->mu);
    if (on) {
        memcpy(e->am_base, base, n * sizeof(float));
        if (copy != NULL) { /* (next == NULL keeps the one set before) */
            free(e->am_next);
            e->am_next = copy;
        }
        e->am_self = self_rank;
    }
    e->am_on = on != 0;
    pthread_mutex_unlock(&e->mu);
    return 0;
}

int32_t spac_engine_flags(spac_engine *e, int32_t which, uint8_t *out, int32_t clear) {
    if (e == NULL || which < 0 || which >= SPAC_FLAG_KINDS) {
        return -1;
    }
    const int64_t n = (int64_t)e->n_layer * e->n_expert;
    pthread_mutex_lock(&e->mu);
    uint8_t *f = which == SPAC_FLAG_STAGED ? e->staged : which == SPAC_FLAG_TOUCHED ? e->flag_touched
               : which == SPAC_FLAG_KEPT ? e->flag_kept : which == SPAC_FLAG_RELEASED ? e->flag_released : NULL;
    for (int64_t j = 0; j < n; j++) {
        uint8_t v = f != NULL ? f[j] : e->pending[j] == SPAC_OP_PREFETCH;
        if (out != NULL) {
            out[j] = v != 0;
        }
    }
    if (clear && f != NULL) {
        memset(f, 0, (size_t)n);
        if (which == SPAC_FLAG_STAGED) {
            e->staged_bytes = 0;
        }
    }
    pthread_mutex_unlock(&e->mu);
    return 0;
}

/* Evictions deferred only because a prefetch of the expert is running (they run once it ends). */
static int32_t loading_deferred_locked(const spac_engine *e) {
    int32_t n = 0;
    for (int32_t i = 0; i < e->n_deferred; i++) {
        const move_t *m = &e->deferred[i];
        const int64_t j = idx(e, m->layer, m->expert);
        n += m->op == SPAC_OP_EVICT && m->seq == e->latest[j] && !e->in_use[j];
    }
    return n;
}

int32_t spac_engine_drain_evictions(spac_engine *e, int32_t timeout_ms) {
    if (e == NULL) {
        return 1;
    }
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    const struct timespec deadline = deadline_after(t0, timeout_ms);
    pthread_mutex_lock(&e->mu);
    int rc = 0;
    for (;;) {
        move_t m;
        if (e->stopping) {
            break;
        }
        if (pop_locked(e, 1, &m)) { /* help the workers: run the queued evictions here too */
            e->st.drained_here++;
            exec_move_locked(e, m, e->drain_ranges);
            continue;
        }
        if ((e->running_evict == 0 && loading_deferred_locked(e) == 0) || rc == ETIMEDOUT) {
            break;
        }
        rc = pthread_cond_timedwait(&e->cv_evicted, &e->mu, &deadline);
    }
    const int32_t drained = !e->stopping && e->count_e == 0 && e->running_evict == 0 && loading_deferred_locked(e) == 0;
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    e->st.drains++;
    e->st.drain_ns += (int64_t)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec);
    pthread_mutex_unlock(&e->mu);
    return drained;
}

int32_t spac_engine_wait_idle(spac_engine *e, int32_t timeout_ms) {
    if (e == NULL) {
        return 1;
    }
    struct timespec now; /* cv_idle waits on CLOCK_MONOTONIC (cond_init_monotonic) */
    clock_gettime(CLOCK_MONOTONIC, &now);
    const struct timespec deadline = deadline_after(now, timeout_ms);
    pthread_mutex_lock(&e->mu);
    int rc = 0;
    while (!idle_locked(e) && !e->stopping && e->n_started > 0 && rc != ETIMEDOUT) {
        rc = pthread_cond_timedwait(&e->cv_idle, &e->mu, &deadline);
    }
    int idle = idle_locked(e);
    pthread_mutex_unlock(&e->mu);
    return idle;
}

void spac_engine_set_readahead(spac_engine *e, uint64_t chunk_bytes) {
    if (e != NULL) {
        uint64_t c = floor_pg(e, chunk_bytes);
        e->ra_chunk = c < e->page ? e->page : c;
    }
}

int64_t spac_engine_residency(spac_engine *e, float *frac) {
    return e == NULL ? -1 : spac_engine_residency_layers(e, 0, e->n_layer, frac, NULL);
}

/* spac_engine_residency_layers and spac_engine_residency_bytes: per_expert (may be NULL) gets exact bytes. */
static int64_t measure_layers(spac_engine *e, int32_t l0, int32_t l1, float *frac, int64_t *resident,
                              int64_t *per_expert) {
    if (e == NULL || l0 < 0 || l1 > e->n_layer || l0 > l1) {
        return -1;
    }
    pthread_mutex_lock(&e->mc_mu);
    int64_t total = 0;
    int64_t *per = NULL;
    if (frac != NULL || per_expert != NULL) {
        per = (int64_t *)calloc((size_t)e->n_expert, sizeof(int64_t));
        if (per == NULL) {
            pthread_mutex_unlock(&e->mc_mu);
            return -1;
        }
    }
    for (int32_t l = l0; l < l1 && total >= 0; l++) {
        uint64_t layer_bytes = 0;
        int64_t before = total;
        if (per != NULL) {
            memset(per, 0, sizeof(int64_t) * (size_t)e->n_expert);
        }
        for (int32_t i = 0; i < e->n_tensors[l]; i++) {
            const tensor_t *t = &e->tensors[(int64_t)l * e->max_t + i];
            uint64_t ts = t->off, te = t->off + (uint64_t)e->n_expert * t->bpe;
            uint64_t lo = floor_pg(e, ts), hi = ceil_pg(e, te);
            size_t n_pages = (size_t)((hi - lo) / e->page);
            if (!reserve_scratch(&e->mc, &e->mc_cap, n_pages)) {
                total = -1;
                break;
            }
            if (mincore(e->base + lo, hi - lo, e->mc) != 0) {
                total = -1;
                break;
            }
            layer_bytes += (uint64_t)e->n_expert * t->bpe;
            for (size_t p = 0; p < n_pages; p++) {
                if (!(e->mc[p] & 1)) {
                    continue;
                }
                uint64_t ps = lo + p * e->page, pe = ps + e->page;
                uint64_t a = ps > ts ? ps : ts, b = pe < te ? pe : te;
                if (b <= a) {
                    continue;
                }
                total += (int64_t)(b - a);
                if (per != NULL) {
                    for (int64_t x = (int64_t)((a - ts) / t->bpe); x <= (int64_t)((b - 1 - ts) / t->bpe); x++) {
                        uint64_t xs = ts + (uint64_t)x * t->bpe, xe = xs + t->bpe;
                        uint64_t oa = a > xs ? a : xs, ob = b < xe ? b : xe;
                        if (x < e->n_expert && ob > oa) {
                            per[x] += (int64_t)(ob - oa);
                        }
                    }
                }
            }
        }
        if (total >= 0 && slots_on(e) && e->group_of[l] >= 0) { /* slot mode: what the slots hold, too */
            const int64_t xb = (int64_t)expert_bytes(e, l);
            pthread_mutex_lock(&e->mu);
            for (int32_t x = 0; x < e->n_expert; x++) {
                if (e->slot[idx(e, l, x)] >= 0) {
                    total += xb;
                    if (per != NULL) {
                        per[x] += xb;
                    }
                }
            }
            pthread_mutex_unlock(&e->mu);
        }
        if (resident != NULL && total >= 0) {
            resident[l] = total - before;
        }
        if (frac != NULL && total >= 0) {
            for (int32_t x = 0; x < e->n_expert; x++) {
                frac[idx(e, l, x)] = layer_bytes ? (float)per[x] * (float)e->n_expert / (float)layer_bytes : 0.0f;
            }
        }
        if (per_expert != NULL && total >= 0) {
            memcpy(per_expert + idx(e, l, 0), per, sizeof(int64_t) * (size_t)e->n_expert);
        }
    }
    free(per);
    pthread_mutex_unlock(&e->mc_mu);
    return total;
}

int64_t spac_engine_residency_layers(spac_engine *e, int32_t l0, int32_t l1, float *frac, int64_t *resident) {
    return measure_layers(e, l0, l1, frac, resident, NULL);
}

int64_t spac_engine_residency_bytes(spac_engine *e, int32_t l0, int32_t l1, int64_t *per_expert) {
    return per_expert == NULL ? -1 : measure_layers(e, l0, l1, NULL, NULL, per_expert);
}

int64_t spac_engine_residency_experts(spac_engine *e, int32_t n, const int32_t *layers, const int32_t *experts,
                                      int64_t *out) {
    if (e == NULL || n < 0 || (n > 0 && (layers == NULL || experts == NULL || out == NULL))) {
        return -1;
    }
    pthread_mutex_lock(&e->mc_mu);
    int64_t total = 0;
    for (int32_t i = 0; i < n && total >= 0; i++) {
        const int32_t l = layers[i], x = experts[i];
        if (l < 0 || l >= e->n_layer || x < 0 || x >= e->n_expert) {
            total = -1;
            break;
        }
        int64_t bytes = 0;
        for (int32_t k = 0; k < e->n_tensors[l]; k++) {
            const tensor_t *t = &e->tensors[(int64_t)l * e->max_t + k];
            const uint64_t xs = t->off + (uint64_t)x * t->bpe, xe = xs + t->bpe;
            range_t r = covering(e, t, x);
            size_t n_pages = (size_t)((r.hi - r.lo) / e->page);
            if (!reserve_scratch(&e->mc, &e->mc_cap, n_pages)) {
                total = -1;
                break;
            }
            if (n_pages == 0) {
                continue;
            }
            if (mincore(e->base + r.lo, r.hi - r.lo, e->mc) != 0) {
                total = -1;
                break;
            }
            for (size_t q = 0; q < n_pages; q++) {
                if (e->mc[q] & 1) {
                    uint64_t ps = r.lo + q * e->page, pe = ps + e->page;
                    uint64_t a = ps > xs ? ps : xs, b = pe < xe ? pe : xe;
                    bytes += b > a ? (int64_t)(b - a) : 0;
                }
            }
        }
        if (total >= 0 && slots_on(e) && e->group_of[l] >= 0) {
            pthread_mutex_lock(&e->mu);
            bytes += e->slot[idx(e, l, x)] >= 0 ? (int64_t)expert_bytes(e, l) : 0;
            pthread_mutex_unlock(&e->mu);
        }
        if (total >= 0) {
            out[i] = bytes;
            total += bytes;
        }
    }
    pthread_mutex_unlock(&e->mc_mu);
    return total;
}

int32_t spac_engine_set_predictor(spac_engine *e, int32_t source, int32_t target, const float *weight,
                                  const float *norm, const float *bias, int32_t sigmoid, int32_t k, int32_t n_embd,
                                  float eps, int32_t max_rows) {
    if (e == NULL || source < 0 || source >= e->n_layer || target < 0 || target >= e->n_layer ||
        e->n_tensors[target] == 0 || weight == NULL || norm == NULL || k < 1 || k > e->n_expert || n_embd < 1 ||
        max_rows < 1) {
        return -1;
    }
    if (n_embd > e->scratch_embd) {
        float *p = (float *)realloc(e->scratch_h, (size_t)n_embd * sizeof(float));
        if (p == NULL) {
            return -1;
        }
        e->scratch_h = p;
        e->scratch_embd = n_embd;
    }
    predictor_t *p = &e->pred[source];
    p->target = target;
    p->k = k;
    p->n_embd = n_embd;
    p->sigmoid = sigmoid;
    p->max_rows = max_rows;
    p->eps = eps;
    p->weight = weight;
    p->norm = norm;
    p->bias = bias;
    return 0;
}

void spac_engine_on_hidden(void *engine, int32_t layer, const float *rows, int64_t n_rows, int64_t n_embd,
                           int64_t row_stride) {
    spac_engine *e = (spac_engine *)engine;
    if (e == NULL || rows == NULL || layer < 0 || layer >= e->n_layer) {
        return;
    }
    const predictor_t *p = &e->pred[layer];
    if (p->target < 0 || n_embd != p->n_embd || n_rows < 1 || n_rows > p->max_rows) {
        return; /* no predictor, or a prompt batch (which loads most experts anyway) */
    }
    const int32_t n = e->n_expert, t = p->target;
    uint8_t *issued = e->issued + (int64_t)t * n;
    int64_t predicted = 0, started = 0;
    int errs[SPAC_ERR_KINDS] = {0};
    for (int64_t r = 0; r < n_rows; r++) {
        const float *x = (const float *)((const char *)rows + r * row_stride);
        double ss = 0.0;
        for (int32_t i = 0; i < n_embd; i++) {
            ss += (double)x[i] * x[i];
        }
        const float scale = 1.0f / sqrtf((float)(ss / n_embd) + p->eps);
        for (int32_t i = 0; i < n_embd; i++) {
            e->scratch_h[i] = x[i] * scale * p->norm[i];
        }
        for (int32_t x2 = 0; x2 < n; x2++) {
            const float *w = p->weight + (int64_t)x2 * n_embd;
            float acc = 0.0f;
            for (int32_t i = 0; i < n_embd; i++) {
                acc += w[i] * e->scratch_h[i];
            }
            if (p->bias != NULL) {
                acc = (p->sigmoid ? 1.0f / (1.0f + expf(-acc)) : acc) + p->bias[x2];
            }
            e->scratch_s[x2] = acc;
        }
        for (int32_t q = 0; q < p->k; q++) { /* top-k by repeated scans (k is small) */
            int32_t best = -1;
            for (int32_t x2 = 0; x2 < n; x2++) {
                if (e->scratch_s[x2] > -INFINITY && (best < 0 || e->scratch_s[x2] > e->scratch_s[best])) {
                    best = x2;
                }
            }
            if (best < 0) {
                break;
            }
            e->scratch_s[best] = -INFINITY;
            predicted++;
            if (!issued[best] && !resident_whole(e, t, best, &e->hit_mc, &e->hit_cap, errs)) {
                issued[best] = 1;
                started++;
                advise_expert(e, t, best, MADV_WILLNEED, errs); /* started, not awaited */
            }
        }
    }
    pthread_mutex_lock(&e->mu);
    note_errors_locked(e, errs);
    e->st.ahead_predicted += predicted;
    e->st.ahead_issued += started;
    for (int32_t x2 = 0; x2 < n && started > 0; x2++) {
        /* read for one layer only, unless the plan wants them: evicted after that layer like misses */
        if (issued[x2] && !e->wanted[(int64_t)t * n + x2]) {
            e->transient[(int64_t)t * n + x2] = 1;
        }
    }
    pthread_mutex_unlock(&e->mu);
}

int32_t spac_engine_lock_range(spac_engine *e, uint64_t file_offset, uint64_t length, int32_t lock) {
    if (e == NULL || length == 0 || file_offset > e->size || length > e->size - file_offset) {
        return -EINVAL;
    }
    uint64_t lo = ceil_pg(e, file_offset), hi = floor_pg(e, file_offset + length);
    if (hi <= lo) {
        return 0;
    }
    /* read exactly the range first: mlock's page faults would read around (this range is not MADV_RANDOM),
     * into the neighbouring experts, in large folios that the lock then pins */
    if (lock) {
        willneed(e, lo, hi);
    }
    int rc = lock ? mlock(e->base + lo, hi - lo) : munlock(e->base + lo, hi - lo);
    return rc == 0 ? 0 : -errno;
}

int32_t spac_engine_read_range(spac_engine *e, uint64_t file_offset, uint64_t length) {
    if (e == NULL || length == 0 || file_offset > e->size || length > e->size - file_offset) {
        return -EINVAL;
    }
    uint64_t lo = floor_pg(e, file_offset), hi = ceil_pg(e, file_offset + length);
    hi = hi < ceil_pg(e, e->size) ? hi : ceil_pg(e, e->size);
    int rc = willneed(e, lo, hi);
    if (madvise(e->base + lo, hi - lo, MADV_POPULATE_READ) != 0 && errno != EINVAL) {
        rc = -1;
    }
    return rc == 0 ? 0 : -errno;
}

int64_t spac_engine_reset_experts(spac_engine *e, uint64_t map_lo) {
    if (e == NULL) {
        return -EINVAL;
    }
    /* the largest page-cache folio (PMD-sized: 512 page-table entries), capped */
    uint64_t w = e->page * (e->page / 8);
    w = w > ((uint64_t)32 << 20) ? (uint64_t)32 << 20 : w;
    const uint64_t lo_lim = ceil_pg(e, map_lo), hi_lim = floor_pg(e, e->size);
    int errs[SPAC_ERR_KINDS] = {0};
    int64_t dropped = 0, pageouts = 0;
    for (int32_t l = 0; l < e->n_layer; l++) {
        for (int32_t i = 0; i < e->n_tensors[l]; i++) {
            const tensor_t *t = &e->tensors[(int64_t)l * e->max_t + i];
            const uint64_t te = t->off + (uint64_t)e->n_expert * t->bpe;
            uint64_t a = t->off - t->off % w, b = te + (te % w ? w - te % w : 0);
            a = a < lo_lim ? lo_lim : a;
            b = b > hi_lim ? hi_lim : b;
            if (b > a) {
                range_t r = {a, b};
                do_evict(e, l, -1, &r, 1, 0, &dropped, &pageouts, errs); /* -1: not one expert's */
            }
        }
    }
    pthread_mutex_lock(&e->mu);
    note_errors_locked(e, errs);
    e->st.evict_pageouts += pageouts;
    pthread_mutex_unlock(&e->mu);
    return dropped;
}

void spac_engine_get_stats(spac_engine *e, spac_engine_stats *out) {
    if (e == NULL || out == NULL) {
        return;
    }
    pthread_mutex_lock(&e->mu);
    *out = e->st;
    out->queued = e->count + e->count_e + e->running + e->n_deferred;
    pthread_mutex_unlock(&e->mu);
    out->overlay_loads = __atomic_load_n(&e->st.overlay_loads, __ATOMIC_RELAXED);
    out->overlay_fallbacks = __atomic_load_n(&e->st.overlay_fallbacks, __ATOMIC_RELAXED);
    out->overlay_fresh_bytes = __atomic_load_n(&e->st.overlay_fresh_bytes, __ATOMIC_RELAXED);
    out->overlays = __atomic_load_n(&e->overlays, __ATOMIC_RELAXED);
    pthread_mutex_lock(&e->pool_mu);
    out->pool_bytes = (int64_t)(e->pool_pages * e->page);
    pthread_mutex_unlock(&e->pool_mu);
}

/* vm.max_map_count, or the kernel's default when it cannot be read */
static int64_t max_map_count(void) {
    int64_t v = 65530;
    FILE *f = fopen("/proc/sys/vm/max_map_count", "r");
    if (f != NULL) {
        long long x = 0;
        if (fscanf(f, "%lld", &x) == 1 && x > 0) {
            v = (int64_t)x;
        }
        fclose(f);
    }
    return v;
}

int32_t spac_engine_set_read_method(spac_engine *e, int32_t method, uint64_t pool_cap_bytes) {
    if (e == NULL || (method != SPAC_FLASH_READ_PAGECACHE && method != SPAC_FLASH_READ_OVERLAY)) {
        return -EINVAL;
    }
    if (method == SPAC_FLASH_READ_OVERLAY) {
        if (e->fd < 0) {
            return -EBADF;
        }
        pthread_mutex_lock(&e->pool_mu);
        int rc = 0;
        if (e->pool == NULL) {
            e->pool = (run_t *)calloc(SPAC_POOL_RUNS, sizeof(run_t));
            rc = e->pool == NULL ? -ENOMEM : 0;
            e->pool_cap_n = e->pool == NULL ? 0 : SPAC_POOL_RUNS;
        }
        if (rc == 0 && e->dfd < 0) {
            char path[64];
            snprintf(path, sizeof path, "/proc/self/fd/%d", e->fd); /* our descriptor again, with O_DIRECT */
            int d = open(path, O_RDONLY | O_CLOEXEC | O_DIRECT);
            if (d < 0) {
                rc = -errno;
            } else {
                e->dfd = d;
            }
        }
        e->pool_cap_pages = pool_cap_bytes / e->page;
        pthread_mutex_unlock(&e->pool_mu);
        if (rc != 0) {
            return rc;
        }
        /* each overlay splits a mapping into up to three; keep clear of the limit with room for everything else */
        const int64_t lim = (max_map_count() - 16384) / 2;
        e->max_overlays = lim > 0 ? lim : 0;
    }
    __atomic_store_n(&e->read_method, method, __ATOMIC_RELEASE);
    return 0;
}

int64_t spac_engine_release_overlays(spac_engine *e) {
    if (e == NULL || e->ovl == NULL) {
        return 0;
    }
    int64_t n = 0;
    for (int32_t l = 0; l < e->n_layer; l++) {
        for (int32_t x = 0; x < e->n_expert; x++) {
            for (int32_t i = 0; i < e->n_tensors[l]; i++) {
                int err = 0;
                n += overlay_out(e, l, x, i, &err) == 1;
            }
        }
    }
    return n;
}

void spac_engine_stop(spac_engine *e) {
    if (e == NULL) {
        return;
    }
    pthread_mutex_lock(&e->mu);
    e->stopping = 1;
    e->count = 0;
    e->count_e = 0;
    e->n_deferred = 0;
    e->dq_count = 0;
    pthread_cond_broadcast(&e->cv_work);
    pthread_cond_broadcast(&e->cv_idle);
    pthread_cond_broadcast(&e->cv_demand);
    int32_t n = e->n_started, c = e->completer_started, r = e->readers_started;
    e->n_started = 0;
    e->completer_started = 0;
    e->readers_started = 0;
    pthread_mutex_unlock(&e->mu);
    for (int32_t i = 0; i < n; i++) {
        pthread_join(e->threads[i], NULL);
    }
    if (c) {
        pthread_join(e->completer, NULL);
    }
    for (int32_t i = 0; i < r; i++) {
        pthread_join(e->readers[i], NULL);
    }
    pthread_mutex_lock(&e->land_mu); /* slot waits end on stopping */
    pthread_cond_broadcast(&e->cv_landed);
    pthread_mutex_unlock(&e->land_mu);
    /* misses the completer will not read now: nobody may wait for them */
    for (int64_t j = 0; j < (int64_t)e->n_layer * e->n_expert; j++) {
        land(e, j);
    }
}

void spac_engine_free(spac_engine *e) {
    if (e == NULL) {
        return;
    }
    spac_engine_stop(e);
    unguard(e);
    free(e->tensors);
    free(e->n_tensors);
    free(e->latest);
    free(e->wanted);
    free(e->pinned);
    free(e->transient);
    free(e->in_use);
    free(e->evicting);
    free(e->staged);
    free(e->admit_rank);
    free(e->am_base);
    free(e->am_next);
    free(e->loading);
    free(e->demanding);
    free(e->dq);
    free(e->batch_t0);
    free(e->batch_left);
    free(e->pending);
    free(e->flag_touched);
    free(e->flag_kept);
    free(e->flag_released);
    free(e->qe);
    free(e->drain_ranges);
    if (e->pool != NULL) { /* our own pages: the runs are in no mapping of llama.cpp's */
        for (int32_t i = 0; i < e->pool_n; i++) {
            munmap(e->pool[i].addr, (size_t)(e->pool[i].n * e->page));
        }
        free(e->pool);
    }
    free(e->ovl);
    if (e->gfree != NULL) {
        for (int32_t g = 0; g < e->n_groups; g++) {
            free(e->gfree[g]);
        }
    }
    if (e->gowner != NULL) {
        for (int32_t g = 0; g < e->n_groups; g++) {
            free(e->gowner[g]);
        }
    }
    free(e->gfree);
    free(e->gowner);
    free(e->gslots);
    free(e->gnfree);
    free(e->group_of);
    free(e->sbase);
    free(e->sstride);
    free(e->slot);
    free(e->sready);
    free(e->sleft);
    free(e->pool_ids);
    free(e->slot_order);
    free(e->slot_mark);
    free(e->readers);
    free(e->layer_ids);
    free(e->mm_order);
    free(e->arriving);
    if (e->dfd >= 0) {
        close(e->dfd);
    }
    free(e->q);
    free(e->deferred);
    free(e->threads);
    free(e->mc);
    free(e->hit_mc);
    free(e->pred);
    free(e->issued);
    free(e->scratch_h);
    free(e->scratch_s);
    pthread_mutex_destroy(&e->mu);
    pthread_mutex_destroy(&e->mc_mu);
    pthread_cond_destroy(&e->cv_work);
    pthread_cond_destroy(&e->cv_idle);
    pthread_cond_destroy(&e->cv_evicted);
    pthread_cond_destroy(&e->cv_demand);
    free(e);
}

/* ---------------------------------------------------------------------------------------------
 * MUL_MAT_ID hooks (patch 0004) */

void spac_engine_set_topk_source(spac_engine *e, const void *const *topk_data) {
    if (e != NULL) {
        pthread_mutex_lock(&e->mu);
        e->topk_src = topk_data;
        pthread_mutex_unlock(&e->mu);
    }
}

void spac_engine_set_mmid_hooked(spac_engine *e, int32_t on) {
    if (e != NULL) {
        __atomic_store_n(&e->mmid_hooked, on != 0, __ATOMIC_RELEASE); /* read by the layer hook without mu */
    }
}

/* The layer whose MUL_MAT_IDs are computing now, if ids_data are its ids (else -1: not ours to answer). The
 * hook wrote cur_layer and the layer's order before the graph's compute threads were released to run them. */
static int32_t mmid_layer(const spac_engine *e, const void *ids_data) {
    const int32_t l = __atomic_load_n(&e->cur_layer, __ATOMIC_ACQUIRE);
    return l >= 0 && l < e->n_layer && ids_data != NULL && e->layer_ids[l] == ids_data ? l : -1;
}

/* Slot mode: the layer whose pool MUL_MAT_IDs are computing now, if ids_data are its remapped pool ids. */
static int32_t mmid_slot_layer(const spac_engine *e, const void *ids_data) {
    const int32_t l = __atomic_load_n(&e->cur_layer, __ATOMIC_ACQUIRE);
    return l >= 0 && l < e->n_layer && ids_data != NULL && e->pool_ids[l] == ids_data && e->group_of[l] >= 0 ? l : -1;
}

int32_t spac_engine_mmid_order(void *user, const void *ids_data, int32_t n_as, int32_t *order) {
    const spac_engine *e = (const spac_engine *)user;
    if (e != NULL && order != NULL && slots_on(e)) {
        const int32_t l = mmid_slot_layer(e, ids_data);
        if (l < 0 || n_as != e->gslots[e->group_of[l]]) {
            return 0;
        }
        memcpy(order, e->slot_order + (int64_t)l * e->max_slots, (size_t)n_as * sizeof(int32_t));
        return n_as;
    }
    if (e == NULL || order == NULL || n_as != e->n_expert) {
        return 0;
    }
    const int32_t l = mmid_layer(e, ids_data);
    if (l < 0) {
        return 0;
    }
    memcpy(order, e->mm_order + (int64_t)l * e->n_expert, (size_t)n_as * sizeof(int32_t));
    return n_as;
}

/* Slot mode: the pool's MUL_MAT_ID is about to compute slot s of layer l: wait until its read has landed (no
 * time limit: the slot's bytes are what the matmul reads; a failed read fills it from the page cache). */
static void mmid_wait_slot(spac_engine *e, int32_t l, int32_t s) {
    const int32_t g = e->group_of[l];
    if (s < 0 || s >= e->gslots[g]) {
        return;
    }
    const int64_t j = __atomic_load_n(&e->gowner[g][s], __ATOMIC_ACQUIRE);
    if (j >= 0) {
        slot_wait_ready(e, j);
    }
}

void spac_engine_mmid_wait(void *user, const void *ids_data, int32_t expert) {
    spac_engine *e = (spac_engine *)user;
    if (e != NULL && slots_on(e)) {
        const int32_t l = mmid_slot_layer(e, ids_data);
        if (l >= 0) {
            mmid_wait_slot(e, l, expert);
        }
        return;
    }
    if (e == NULL || expert < 0 || expert >= e->n_expert) {
        return;
    }
    const int32_t l = mmid_layer(e, ids_data);
    if (l < 0) {
        return;
    }
    uint8_t *a = &e->arriving[idx(e, l, expert)];
    if (!__atomic_load_n(a, __ATOMIC_ACQUIRE)) {
        return;
    }
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    const struct timespec dl = deadline_after(now, SPAC_MMID_WAIT_MS);
    pthread_mutex_lock(&e->land_mu);
    while (__atomic_load_n(a, __ATOMIC_ACQUIRE)) {
        if (pthread_cond_timedwait(&e->cv_landed, &e->land_mu, &dl) == ETIMEDOUT) {
            break; /* the matmul reads through the page cache instead: the same bytes */
        }
    }
    pthread_mutex_unlock(&e->land_mu);
}

/* ---------------------------------------------------------------------------------------------
 * slot mode: set-up and the id maps (see spac_engine_set_slots in the header) */

int32_t spac_engine_set_slots(spac_engine *e, int32_t n_groups, const int32_t *n_slots, const int32_t *group_of_layer,
                              uint8_t *const *bases, const uint64_t *strides, int32_t n_readers) {
    if (e == NULL || e->started || e->gslots != NULL || n_groups <= 0 || n_groups > SPAC_MAX_LAYERS ||
        n_slots == NULL || group_of_layer == NULL || bases == NULL || strides == NULL || n_readers < 0 ||
        n_readers > SPAC_MAX_THREADS) {
        return -EINVAL;
    }
    int32_t max_slots = 1;
    for (int32_t g = 0; g < n_groups; g++) {
        if (n_slots[g] < 0 || n_slots[g] > SPAC_MAX_LAYERS * SPAC_MAX_EXPERTS) {
            return -EINVAL;
        }
        max_slots = n_slots[g] > max_slots ? n_slots[g] : max_slots;
    }
    uint64_t bounce = e->page;
    for (int32_t l = 0; l < e->n_layer; l++) {
        if (e->n_tensors[l] == 0) {
            continue;
        }
        const int32_t g = group_of_layer[l];
        if (g < 0 || g >= n_groups) {
            return -EINVAL;
        }
        for (int32_t i = 0; i < e->n_tensors[l]; i++) {
            const int64_t ti = (int64_t)l * e->max_t + i;
            if ((n_slots[g] > 0 && bases[ti] == NULL) || strides[ti] < e->tensors[ti].bpe) {
                return -EINVAL;
            }
            const uint64_t cover = ceil_pg(e, e->tensors[ti].bpe) + e->page; /* an unaligned slice: one page more */
            bounce = cover > bounce ? cover : bounce;
        }
    }
    const int64_t n = (int64_t)e->n_layer * e->n_expert, nt = (int64_t)e->n_layer * e->max_t;
    e->n_groups = n_groups;
    e->max_slots = max_slots;
    e->bounce_bytes = bounce;
    e->group_of = (int32_t *)malloc((size_t)e->n_layer * sizeof(int32_t));
    e->sbase = (uint8_t **)calloc((size_t)nt, sizeof(uint8_t *));
    e->sstride = (uint64_t *)calloc((size_t)nt, sizeof(uint64_t));
    e->slot = (int32_t *)malloc((size_t)n * sizeof(int32_t));
    e->sready = (uint8_t *)calloc((size_t)n, 1);
    e->sleft = (int16_t *)calloc((size_t)n, sizeof(int16_t));
    e->gslots = (int32_t *)calloc((size_t)n_groups, sizeof(int32_t));
    e->gnfree = (int32_t *)calloc((size_t)n_groups, sizeof(int32_t));
    e->gfree = (int32_t **)calloc((size_t)n_groups, sizeof(int32_t *));
    e->gowner = (int64_t **)calloc((size_t)n_groups, sizeof(int64_t *));
    e->pool_ids = (const void **)calloc((size_t)e->n_layer, sizeof(void *));
    e->slot_order = (int32_t *)calloc((size_t)e->n_layer * (size_t)max_slots, sizeof(int32_t));
    e->slot_mark = (uint8_t *)calloc((size_t)max_slots, 1);
    e->readers = (pthread_t *)calloc((size_t)(n_readers > 0 ? n_readers : 1), sizeof(pthread_t));
    move_t *dq = (move_t *)calloc((size_t)(n * e->max_t), sizeof(move_t)); /* a read per tensor */
    int ok = e->group_of && e->sbase && e->sstride && e->slot && e->sready && e->sleft && e->gslots && e->gnfree &&
             e->gfree && e->gowner && e->pool_ids && e->slot_order && e->slot_mark && e->readers && dq;
    for (int32_t g = 0; g < n_groups && ok; g++) {
        e->gfree[g] = (int32_t *)malloc((size_t)(n_slots[g] > 0 ? n_slots[g] : 1) * sizeof(int32_t));
        e->gowner[g] = (int64_t *)malloc((size_t)(n_slots[g] > 0 ? n_slots[g] : 1) * sizeof(int64_t));
        ok = e->gfree[g] != NULL && e->gowner[g] != NULL;
        if (ok) {
            e->gslots[g] = n_slots[g];
            e->gnfree[g] = n_slots[g];
            for (int32_t q = 0; q < n_slots[g]; q++) {
                e->gfree[g][q] = n_slots[g] - 1 - q; /* slot 0 is taken first */
                e->gowner[g][q] = -1;
            }
        }
    }
    if (!ok) {
        free(dq);
        return -ENOMEM; /* the arrays are freed with the engine; read_method stays */
    }
    for (int32_t l = 0; l < e->n_layer; l++) {
        e->group_of[l] = e->n_tensors[l] > 0 ? group_of_layer[l] : -1;
    }
    memcpy(e->sbase, bases, (size_t)nt * sizeof(uint8_t *));
    memcpy(e->sstride, strides, (size_t)nt * sizeof(uint64_t));
    for (int64_t j = 0; j < n; j++) {
        e->slot[j] = -1;
    }
    pthread_mutex_lock(&e->mu);
    free(e->dq);
    e->dq = dq;
    e->dq_cap = (int32_t)(n * e->max_t);
    e->dq_head = e->dq_count = 0;
    e->n_readers = n_readers;
    pthread_mutex_unlock(&e->mu);
    int rc = 0;
    if (e->dfd < 0 && e->fd >= 0) {
        char path[64];
        snprintf(path, sizeof path, "/proc/self/fd/%d", e->fd); /* our descriptor again, with O_DIRECT */
        e->dfd = open(path, O_RDONLY | O_CLOEXEC | O_DIRECT);
        rc = e->dfd < 0 ? 1 : 0; /* no O_DIRECT here: buffered reads (slot_fallbacks) */
    }
    __atomic_store_n(&e->read_method, SPAC_FLASH_READ_SLOTS, __ATOMIC_RELEASE);
    return rc;
}

int32_t spac_engine_slot_of(spac_engine *e, int32_t layer, int32_t expert) {
    if (e == NULL || !slots_on(e) || layer < 0 || layer >= e->n_layer || expert < 0 || expert >= e->n_expert) {
        return -2;
    }
    pthread_mutex_lock(&e->mu);
    const int32_t s = e->slot[idx(e, layer, expert)];
    pthread_mutex_unlock(&e->mu);
    return s;
}

void spac_engine_on_map(void *engine, int32_t layer, int32_t path, int32_t *row, int32_t n, const void *ids_out) {
    spac_engine *e = (spac_engine *)engine;
    if (e == NULL || row == NULL || !slots_on(e) || layer < 0 || layer >= e->n_layer || n != e->n_expert ||
        (path != 0 && path != 1)) {
        return;
    }
    const int32_t g = e->group_of[layer];
    pthread_mutex_lock(&e->mu);
    /* the layer's selected experts keep their slots until it has finished (in use: no eviction, no prefetch), so
     * both rows agree on them: each is computed by exactly one path */
    for (int32_t x = 0; x < n; x++) {
        const int32_t s = g >= 0 ? e->slot[idx(e, layer, x)] : -1;
        row[x] = path == 0 ? s : (s >= 0 ? -1 : x);
    }
    e->st.slot_maps++;
    if (path == 0 && g >= 0) {
        /* the order the pool's matmul takes the slots in: the selected ones that hold their expert, then those
         * still being read (each waited for just before its rows), then the rest (no rows) */
        e->pool_ids[layer] = ids_out;
        int32_t *ord = e->slot_order + (int64_t)layer * e->max_slots, n_ord = 0;
        const int32_t n_s = e->gslots[g];
        for (int pass = 0; pass < 2; pass++) {
            for (int32_t x = 0; x < n; x++) {
                const int64_t j = idx(e, layer, x);
                const int32_t s = e->slot[j];
                if (s >= 0 && s < n_s && e->in_use[j] && !e->slot_mark[s] &&
                    (pass == 1 || __atomic_load_n(&e->sready[j], __ATOMIC_ACQUIRE))) {
                    ord[n_ord++] = s;
                    e->slot_mark[s] = 1;
                }
            }
        }
        for (int32_t s = 0; s < n_s; s++) {
            if (!e->slot_mark[s]) {
                ord[n_ord++] = s;
            }
            e->slot_mark[s] = 0;
        }
    }
    pthread_mutex_unlock(&e->mu);
}
