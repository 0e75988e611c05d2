/* spac flash-tier engine: background prefetch, eviction and pinning of experts in llama.cpp's
 * memory-mapped GGUF.
 *
 * Experts stay where llama.cpp mapped them (a read-only MAP_SHARED mapping of the whole file);
 * the engine only changes which of their pages are in RAM:
 *   prefetch: madvise(WILLNEED) (readahead of exactly the expert's bytes) then
 *             madvise(MADV_POPULATE_READ), which returns once the pages are resident;
 *   evict:    munlock, madvise(MADV_DONTNEED) on our mapping, posix_fadvise(DONTNEED) on the file
 *             (drops the clean pages from the page cache once no one maps them); when mincore still finds
 *             pages of the range (a large folio straddling it), MADV_PAGEOUT and the same again;
 *   pin:      mlock (unpin: munlock).
 * Expert byte ranges are not page-aligned in general. A prefetch covers every page the expert
 * touches; an eviction drops the pages inside the expert and a boundary page only when the
 * neighbouring expert of the same tensor is neither wanted nor in use (a tensor's first and last
 * pages are shared with other tensors and never evicted).
 *
 * Threading: worker threads take moves from a bounded queue. The decoding thread enqueues
 * (spac_engine_submit) and, from the routing sensor's graph callback, reports each MoE layer's
 * selected experts (spac_engine_on_layer): those are in use until a later layer starts or the step
 * ends, and an in-use expert is never evicted (never under a running matmul). The only I/O the
 * decoding thread waits for is that of selected experts that are not resident (a miss: the matmul
 * needs them now): their reads are all submitted at once, then awaited, by the hook (SPAC_DEMAND_WAIT)
 * or, by default (SPAC_DEMAND_ASYNC), by the completer thread while the layer computes: the matmul of a
 * resident expert runs at once, a page still being read makes the matmul's page fault wait for that page
 * (spac_engine_set_demand_mode). An expert whose read is outstanding is not evicted (`demanding`). When the plan does not
 * want them they are kept until the step ends (staged), up to the staging cap in bytes
 * (spac_engine_set_staging): the tier's step-end plan decides which of them stay (no second read)
 * and evicts the others; demand loads beyond the cap are evicted again once their layer has
 * finished (transient). A newer move for the same expert supersedes an older queued one.
 *
 * Queues: evictions wait in a queue of their own that the workers serve first (memory is freed
 * before more is read); spac_engine_drain_evictions runs the queued ones on the calling thread too
 * and returns once none is queued, running, or deferred behind a running prefetch: the tier's
 * budget check measures after it. An eviction of an expert whose prefetch is running waits for the
 * prefetch (else the prefetch would fault the pages back in after the eviction).
 *
 * Prompt keep (spac_engine_set_prompt_keep, one step): in a step whose routing the plan knows
 * nothing about (the first prompt of a cold start), each MoE layer's hook swaps, one for one, planned
 * experts of the layer for selected ones the step routed more tokens to (the sensor's step counts,
 * complete for the layer when its hook runs): the newcomers are being read for the matmul anyway and
 * stay; the planned ones they displace are evicted. The number of planned experts per layer does not
 * change. The tier takes the swaps (SPAC_FLAG_KEPT / SPAC_FLAG_RELEASED) before its plan after the
 * step, which then starts from the prompt's hottest experts instead of reading them again.
 *
 * Layer admission (spac_engine_set_admission, any step after prompt keep's): a demand load that the plan
 * does not hold takes, in its layer's hook, the place of the planned expert of the layer with the lowest
 * keep rank that the layer is not using, when the newcomer ranks higher (with newcomer_floor = INFINITY
 * always: LRU's admission). The newcomer was being read for the matmul anyway and stays (no second read
 * when the step-end plan keeps it); the displaced expert is evicted. Planned bytes stay within the plan (a
 * layer's experts have equal sizes; a page more of covering spends the plan's slack). The tier takes the
 * swaps like prompt keep's (SPAC_FLAG_KEPT / SPAC_FLAG_RELEASED).
 *
 * In-use protocol. Per expert, two fields, both read and written only under the engine's mutex:
 *   in_use    set by the layer hook for the layer's selected experts, cleared when that layer has
 *             finished (the next MoE layer's hook, or spac_engine_end_step);
 *   evicting  the number of evictions running now whose page ranges touch the expert's pages: the
 *             evicted expert itself and each neighbour whose shared boundary page is dropped.
 * So an expert is idle (neither), in use, evicting, or in use and waiting (both, see 2.):
 *   1. A worker starts an eviction only when the expert, and every neighbour whose boundary page it
 *      drops, is not in use (else the move is deferred until release / the page is kept), and in
 *      the same critical section raises `evicting` of all of them; it lowers them, under the mutex
 *      again, when its system calls have returned, and wakes the hook.
 *   2. The hook, in one critical section, sets `in_use` of every selected expert (from then on no
 *      new eviction can touch them), then waits (releasing the mutex) until none of them is
 *      evicting any more: only evictions that were already running finish; they are dropping the
 *      pages, so those experts are then misses and are read back before the hook returns.
 *   3. Only after that does the hook check residency (mincore) and demand-load the misses, and it
 *      returns (the matmul runs) with every selected expert in use and none evicting.
 * The decoding thread holds the mutex only for flag updates (never across a system call); the
 * stats count the hook's waits (evict_waits) and check the invariant (evict_in_use must stay 0).
 *
 * Errors. Failed system calls are counted per kind (SPAC_ERR_*), with the errno of the first
 * failure of each kind (spac_engine_error_name names the kinds); the Python side logs each kind
 * once and reports them in stats().
 *
 * File guard (spac_engine_guard_file). The mapping is of a file that someone may truncate or
 * rewrite while it is in use; a read of a page past the new end of the file raises SIGBUS, which
 * would kill the process. With the guard on:
 *   - the file's identity (size, mtime) is recorded from our fd; spac_engine_check_file (the tier,
 *     before and after every evaluation), the layer hook (before the layer's experts are used) and
 *     any failed read compare it with fstat now;
 *   - reads that wait (MADV_POPULATE_READ: prefetches and demand loads) report a page that cannot be
 *     read as EFAULT instead of faulting; the worker's page-touching fallback runs only on kernels
 *     without POPULATE_READ (EINVAL), never on a failed read;
 *   - once the file is found shorter than mapped, the mapped pages past its end are replaced by
 *     anonymous zero pages (mmap MAP_FIXED over llama.cpp's mapping, "the fence"), so that the
 *     matmuls that read them compute on zeros instead of faulting; a SIGBUS handler (BUS_ADRERR in a
 *     guarded mapping: process-wide, installed once, other faults go to the previous handler) does the
 *     same for reads that race the truncation (llama.cpp's own threads included);
 *   - the fault is sticky: the tier refuses the evaluation that saw it and every later one (the
 *     model's output would no longer be the model's), and the workers stop moving pages.
 * Limits: only this mapping is guarded (not a second mapping of the file, nor other files); a
 * rewrite that keeps both size and mtime is not seen; see docs/robustness.md.
 */
#ifndef SPAC_ENGINE_H
#define SPAC_ENGINE_H

#include <stdint.h>

#include "spac_limits.h"

typedef struct spac_engine spac_engine;

enum { SPAC_OP_PREFETCH = 1, SPAC_OP_EVICT = 2, SPAC_OP_PIN = 3, SPAC_OP_UNPIN = 4 };

/* Kinds of failure, counted separately (see spac_engine_stats.error_count). */
enum {
    SPAC_ERR_PREFETCH = 0, /* madvise(WILLNEED / POPULATE_READ) of a prefetch move */
    SPAC_ERR_DEMAND = 1,   /* madvise of a demand load or a layer-ahead read (decoding thread) */
    SPAC_ERR_EVICT = 2,    /* madvise(DONTNEED) or munlock of an eviction */
    SPAC_ERR_FADVISE = 3,  /* posix_fadvise(DONTNEED) of an eviction */
    SPAC_ERR_PIN = 4,      /* mlock of a pin move (often RLIMIT_MEMLOCK; not counted in `errors`) */
    SPAC_ERR_UNPIN = 5,    /* munlock of an unpin move */
    SPAC_ERR_SETUP = 6,    /* fdatasync / madvise(RANDOM) at start */
    SPAC_ERR_MINCORE = 7,  /* mincore of a hit check (the expert then counts as a miss) */
    SPAC_ERR_DEFER = 8,    /* the deferred list was full: an eviction of an in-use expert was dropped */
    SPAC_ERR_NOMEM = 9,    /* out of memory for scratch buffers */
    SPAC_ERR_OVERLAY = 10, /* an overlay read or its mremap (SPAC_FLASH_READ_OVERLAY; the page cache served it instead) */
    SPAC_ERR_SLOT = 11,    /* an O_DIRECT read into a slot (SPAC_FLASH_READ_SLOTS; a buffered read filled the slot) */
    SPAC_ERR_KINDS = 12
};

typedef struct spac_engine_stats {
    int64_t prefetches, prefetch_bytes;  /* expert prefetches done, bytes covered */
    int64_t evictions, evict_bytes;      /* expert evictions done, bytes dropped */
    int64_t pins, unpins, pin_failures;
    int64_t superseded;                  /* queued moves replaced by a newer move of the same expert */
    int64_t deferred;                    /* evictions postponed because the expert was in use */
    int64_t demand_hits, demand_misses;  /* selected experts found resident / not resident */
    int64_t transient_evictions;         /* demand-loaded experts evicted after their layer */
    int64_t queue_full;                  /* submissions refused because the queue was full */
    int64_t errors;                      /* failures of every kind but SPAC_ERR_PIN */
    int64_t last_errno;                  /* errno of the latest failure of any kind */
    int64_t queued;                      /* moves waiting or running now */
    int64_t demand_wait_ns;              /* decoding thread's time waiting for missed experts */
    int64_t ahead_predicted;             /* layer-ahead: experts predicted for the next MoE layer */
    int64_t ahead_issued;                /* ... of those not resident, whose reads were started */
    int64_t ahead_useful;                /* ... of those, selected when that layer ran */
    int64_t evict_waits;                 /* layer hooks that waited for a running eviction of a selected expert */
    int64_t evict_in_use;                /* protocol violations seen: an expert evicted while in use (must be 0) */
    int64_t staged;                      /* demand loads kept until the step's end (within the staging cap) */
    int64_t prompt_kept;                 /* prompt keep: selected experts that took a planned one's place */
    int64_t prompt_released;             /* prompt keep: planned experts they displaced (evicted) */
    int64_t drains;                      /* spac_engine_drain_evictions calls */
    int64_t drain_ns;                    /* time spent in them */
    int64_t drained_here;                /* evictions the draining thread ran itself */
    int64_t loading_defers;              /* evictions that waited for a running prefetch of the expert */
    int64_t demand_read_ns;              /* per layer with misses: from its reads' submission until all landed */
    int64_t demand_async;                /* layers whose demand reads the completer awaited (SPAC_DEMAND_ASYNC) */
    int64_t evict_pageouts;              /* eviction ranges that needed MADV_PAGEOUT (pages left after the drop) */
    int64_t admitted;                    /* layer admission: demand loads that took a planned expert's place */
    int64_t overlay_loads;               /* SPAC_FLASH_READ_OVERLAY: tensor ranges read as overlays */
    int64_t overlay_fallbacks;           /* ... that failed and went through the page cache */
    int64_t overlay_fresh_bytes;         /* ... read into new pages (the pool had no run to recycle) */
    int64_t overlays;                    /* overlays now (spac_engine_get_stats) */
    int64_t pool_bytes;                  /* pages in the overlay pool now, free for the next read */
    int64_t slot_reads, slot_read_bytes; /* SPAC_FLASH_READ_SLOTS: tensor slices read into slots, bytes */
    int64_t slot_fallbacks;              /* ... that O_DIRECT could not read (a buffered pread did) */
    int64_t slot_spills;                 /* misses with no free slot: read through the page cache, dropped after */
    int64_t slots_held;                  /* slots holding (or loading) an expert now */
    int64_t slot_maps;                   /* id map rows written for the graph (spac_engine_on_map) */
    int64_t error_count[SPAC_ERR_KINDS]; /* failures per kind */
    int64_t error_errno[SPAC_ERR_KINDS]; /* errno of the first failure of each kind (0: none) */
} spac_engine_stats;

/* Faults of the guarded file (spac_file_status.fault), the first one seen; later ones keep it. */
enum {
    SPAC_FILE_OK = 0,
    SPAC_FILE_SHRUNK = 1,     /* the file is shorter than when the guard started (truncated) */
    SPAC_FILE_MODIFIED = 2,   /* same file, but its size grew or its mtime changed (rewritten in place) */
    SPAC_FILE_READ_FAULT = 3, /* a read of the mapping failed (EFAULT: I/O error, or truncated) */
    SPAC_FILE_SIGBUS = 4      /* a thread faulted on the mapping and was answered with zero pages */
};

typedef struct spac_file_status {
    int32_t guarded;         /* spac_engine_guard_file succeeded */
    int32_t fault;           /* SPAC_FILE_* */
    int64_t size_at_start;   /* bytes, at spac_engine_guard_file */
    int64_t size_now;        /* bytes, fstat at the latest check (-1: fstat failed) */
    int64_t read_faults;     /* POPULATE_READ reads that returned EFAULT */
    int64_t sigbus_caught;   /* SIGBUS in the guarded mapping answered by the handler */
    int64_t fenced_bytes;    /* bytes of the mapping now backed by zero pages */
} spac_file_status;

/* map_base: the address of file offset 0 in llama.cpp's mapping (which may start at a later page:
 * only offsets of registered tensors are ever touched); map_size: file offset where the mapping ends;
 * fd: our own read-only fd of the same file (for posix_fadvise). Bounds: spac_limits.h (n_expert at most
 * SPAC_MAX_EXPERTS, ...). Returns NULL on bad arguments or out of memory. */
spac_engine *spac_engine_new(int32_t n_layer, int32_t n_expert, int32_t max_tensors_per_layer, uint8_t *map_base,
                             uint64_t map_size, int32_t fd, int32_t n_threads, int32_t queue_capacity);

/* Register one expert tensor of a layer: expert e is [file_offset + e*bytes_per_expert, +bytes_per_expert).
 * Returns 0, or -1 when out of bounds / too many tensors / already started. */
int32_t spac_engine_add_tensor(spac_engine *e, int32_t layer, uint64_t file_offset, uint64_t bytes_per_expert);

/* Start the workers. Returns 0 or -errno. */
int32_t spac_engine_start(spac_engine *e);

/* Queue a move. Returns 0, -1 bad arguments, -2 queue full, -3 stopped. */
int32_t spac_engine_submit(spac_engine *e, int32_t op, int32_t layer, int32_t expert);

/* Whether the plan wants (layer, expert) resident (decides boundary pages and transient evictions). */
void spac_engine_set_wanted(spac_engine *e, int32_t layer, int32_t expert, int32_t wanted);

/* Bytes of demand loads the hook may keep until the step ends (staged; covering pages counted; default 0:
 * every unplanned demand load is transient). */
void spac_engine_set_staging(spac_engine *e, uint64_t cap_bytes);

/* Prompt keep for the next step (see above): counts is the routing sensor's step counts [n_layer][n_expert]
 * (caller-owned, outlives the engine; updated by the sensor before each layer hook); on = 0 turns it off.
 * spac_engine_end_step turns it off again. */
void spac_engine_set_prompt_keep(spac_engine *e, const int32_t *counts, int32_t on);

/* Layer admission (see above): rank [n_layer][n_expert] is the tier's keep rank of every expert (copied; a
 * planned expert with the lowest rank is displaced first, of equal ranks the highest id), newcomer_floor the
 * least rank a demand load counts with (INFINITY: every miss is admitted, as LRU does), slack_bytes the plan's unused bytes (a swap
 * whose newcomer covers more pages than the displaced expert spends them); on = 0 turns it off. Set at each
 * step boundary; returns -1 for a NULL engine or rank with on != 0. */
int32_t spac_engine_set_admission(spac_engine *e, const float *rank, float newcomer_floor, int64_t slack_bytes,
                                  int32_t on);

/* Predicted admission ranks (see "Layer admission" above): with on != 0, each MoE layer's hook replaces the
 * layer's ranks, before it admits a demand load, by the ranks they will have after this step, from what the
 * layer selected (the policy's next-step prediction, linear in the selection):
 *     rank[f] = base[layer][f] + self_rank * [f selected] + sum over selected x of next[layer][x][f]
 * so that a newcomer and the experts it may displace are compared as the policy will rank them once it has
 * seen the step (a rank from before the step undervalues the newcomer, which the step just used). next is
 * [n_layer][n_expert][n_expert] (copied; NULL keeps the one set before, or none), base [n_layer][n_expert]
 * (copied). Ranks are compared within a layer only. on = 0 turns it off (the ranks of set_admission again).
 * Returns 0, -1 for a NULL engine, a NULL base with on != 0 or a self_rank that is not finite, -2 when out of
 * memory. */
int32_t spac_engine_set_admission_model(spac_engine *e, const float *next, const float *base, float self_rank,
                                        int32_t on);

/* Per-expert flags, [n_layer][n_expert], copied into out (1/0); clear != 0 also resets them (for
 * SPAC_FLAG_STAGED: releases the staged experts, which are then neither wanted nor staged, so the tier
 * must decide about each before it clears: keep it wanted, or evict it). */
enum {
    SPAC_FLAG_STAGED = 0,      /* demand-loaded this step, kept until the tier decides */
    SPAC_FLAG_TOUCHED = 1,     /* pages possibly changed by the engine (loads, evictions) since the last clear */
    SPAC_FLAG_KEPT = 2,        /* prompt keep / layer admission: became wanted this step */
    SPAC_FLAG_RELEASED = 3,    /* prompt keep / layer admission: stopped being wanted this step (eviction queued) */
    SPAC_FLAG_PREFETCHING = 4, /* a prefetch is queued or running (the newest move of the expert) */
    SPAC_FLAG_KINDS = 5
};
int32_t spac_engine_flags(spac_engine *e, int32_t which, uint8_t *out, int32_t clear);

/* Run the queued evictions (on this thread as well as the workers') and wait until none is queued, running
 * or waiting for a running prefetch (evictions of in-use experts, deferred until the layer ends, are not
 * waited for). Returns 1 when drained, 0 on timeout or when stopping. */
int32_t spac_engine_drain_evictions(spac_engine *e, int32_t timeout_ms);

/* How the layer hook waits for its demand loads: SPAC_DEMAND_WAIT, before it returns (the layer's matmuls
 * start once every selected expert is resident); SPAC_DEMAND_ASYNC (the default), not at all: the completer
 * thread waits (MADV_POPULATE_READ), the matmuls start at once and fault on pages still in flight. Outputs are
 * the same bits either way. Returns 0, -1 on a bad mode. */
enum { SPAC_DEMAND_WAIT = 0, SPAC_DEMAND_ASYNC = 1 };
int32_t spac_engine_set_demand_mode(spac_engine *e, int32_t mode);

/* How experts are read. SPAC_FLASH_READ_PAGECACHE (the default): readahead and MADV_POPULATE_READ on the mapping,
 * eviction drops the pages from the page cache. SPAC_FLASH_READ_OVERLAY: an expert's inner pages in each tensor
 * (those entirely inside its slice) are read with O_DIRECT into anonymous pages that mremap moves onto the
 * mapping at their own address (the same bytes where the matmul reads them, no page cache); boundary pages stay
 * on the page-cache path; eviction moves the pages into a pool of at most pool_cap_bytes (recycled by the next
 * read) and maps the file there again. Demand loads are then awaited by the hook (the completer's page-fault
 * wait needs the page cache). Overlays stop at half of vm.max_map_count (each splits a mapping; beyond, the
 * page cache). Returns 0, or -errno (e.g. -EINVAL: the file system refuses O_DIRECT; nothing changed). */
enum { SPAC_FLASH_READ_PAGECACHE = 0, SPAC_FLASH_READ_OVERLAY = 1, SPAC_FLASH_READ_SLOTS = 2 };
int32_t spac_engine_set_read_method(spac_engine *e, int32_t method, uint64_t pool_cap_bytes);

/* SPAC_FLASH_READ_SLOTS: experts are kept in the slots of a host expert pool (patch 0003 configured on_host;
 * patch 0005 gives its tensors' addresses) instead of the page cache. Set before spac_engine_start.
 *   n_groups, n_slots[g]: the pool's groups and their slots; group_of_layer[l] (-1: no routed experts);
 *   bases[l * max_t + i], strides[l * max_t + i]: where the layer's i-th registered tensor has slot 0 and the
 *   bytes from one slot to the next (at least the tensor's bytes per expert);
 *   n_readers: threads that complete demand reads (each O_DIRECT pread of one tensor slice: several in flight).
 * A read is O_DIRECT into an aligned bounce buffer, then copied into the slot (a buffered pread where the file
 * system refuses O_DIRECT, with the range dropped from the page cache after it); an eviction frees the slot (no
 * system call); a prefetch takes a free slot (it waits, deferred, while none is free). A miss takes a free slot
 * after layer admission or prompt keep freed its victim's; with none free it is read through the page cache and
 * evicted after its layer (slot_spills). The layer's id maps (the pool's graph input) are written by
 * spac_engine_on_map, which the sensor calls for each layer's map rows before the graph reads them; the matmul
 * of the pool path waits for slots still being read (spac_engine_mmid_wait, so the MUL_MAT_ID hooks of patch
 * 0004 must be installed for SPAC_DEMAND_ASYNC; in SPAC_DEMAND_WAIT the layer hook waits). Returns 0, -EINVAL
 * (bad arguments, started already), -ENOMEM. */
int32_t spac_engine_set_slots(spac_engine *e, int32_t n_groups, const int32_t *n_slots, const int32_t *group_of_layer,
                              uint8_t *const *bases, const uint64_t *strides, int32_t n_readers);

/* Sensor hook (decoding thread, in the graph callback's ask phase, before the graph reads it): write layer
 * `layer`'s id map row for `path` 0 (the pool's: slot of each expert, -1 not in a slot) or 1 (the full tensors':
 * the expert's own id when it is not in a slot, else -1) into row[0..n); ids_out: the data of the remapped ids
 * the pool's MUL_MAT_ID will read (what spac_engine_mmid_order / _wait answer for). */
void spac_engine_on_map(void *engine, int32_t layer, int32_t path, int32_t *row, int32_t n, const void *ids_out);

/* The slot holding or loading (layer, expert): >= 0, -1 none, -2 bad arguments or no slots. */
int32_t spac_engine_slot_of(spac_engine *e, int32_t layer, int32_t expert);

/* Map the file again wherever an overlay is (their pages are freed), e.g. before the engine goes while the
 * model stays. Only while llama.cpp's mapping exists: after the model is freed, its munmap has already taken
 * the overlays with it, and mapping the file at those addresses would clobber whatever is there now. Call
 * after spac_engine_stop. Returns the overlays released. */
int64_t spac_engine_release_overlays(spac_engine *e);

/* The MUL_MAT_ID hooks of the patched ggml-cpu (patch 0004, ggml_cpu_spac_set_mmid_hooks; user = the engine):
 * spac_engine_mmid_order gives layer `cur_layer`'s experts in the order resident first, then its misses in the
 * order of their reads; spac_engine_mmid_wait returns once a miss handed to the completer has landed (at most
 * SPAC_MMID_WAIT_MS, after which the matmul reads through the page cache: the same bytes). Both answer only
 * for the ids of the layer the hook last saw (ids_data == the sensor's topk_data, spac_engine_set_topk_source),
 * and otherwise leave id order and do not wait. With overlay reads and SPAC_DEMAND_ASYNC, once
 * spac_engine_set_mmid_hooked(e, 1) says the hooks are installed, the hook hands the misses to the completer
 * and returns: the resident experts compute while the misses are read. */
#define SPAC_MMID_WAIT_MS 10000
int32_t spac_engine_mmid_order(void *user, const void *ids_data, int32_t n_as, int32_t *order);
void spac_engine_mmid_wait(void *user, const void *ids_data, int32_t expert);
void spac_engine_set_topk_source(spac_engine *e, const void *const *topk_data);
void spac_engine_set_mmid_hooked(spac_engine *e, int32_t on);

/* Routing sensor hook (decoding thread): layer `layer` selected the experts with mask[x] != 0 (mask has
 * n_expert entries). Marks them in use, waits for running evictions of them, loads the misses. */
void spac_engine_on_layer(void *engine, int32_t layer, const uint8_t *mask);

/* End of an evaluation step: nothing is in use any more; deferred and transient evictions are queued; staged
 * demand loads stay (the tier decides about them, then clears SPAC_FLAG_STAGED); prompt keep turns off. */
void spac_engine_end_step(spac_engine *e);

/* Wait until no move is queued or running. Returns 1 when idle, 0 on timeout. */
int32_t spac_engine_wait_idle(spac_engine *e, int32_t timeout_ms);

/* Bytes per MADV_WILLNEED call (rounded down to pages, at least one page; default
 * SPAC_DEFAULT_RA_CHUNK): at most the device's readahead limit, max(read_ahead_kb, max_sectors_kb), since
 * the kernel reads no more than that per call and leaves the rest of a larger range to page faults. */
#define SPAC_DEFAULT_RA_CHUNK (128 * 1024)
void spac_engine_set_readahead(spac_engine *e, uint64_t chunk_bytes);

/* Resident expert bytes (mincore, each byte counted once); frac (may be NULL) receives per expert
 * the resident fraction of its bytes, [n_layer][n_expert]. Returns -1 on error. */
int64_t spac_engine_residency(spac_engine *e, float *frac);

/* The same for the layers l0 <= l < l1 only (a partial sweep: its cost is that of their pages): frac
 * rows and resident[l] (may be NULL; [n_layer], resident expert bytes per layer) are written for those
 * layers only. Returns their resident expert bytes, -1 on error or a bad range. */
int64_t spac_engine_residency_layers(spac_engine *e, int32_t l0, int32_t l1, float *frac, int64_t *resident);

/* Exact resident bytes of every expert of the layers l0 <= l < l1 (mincore; a page shared by two experts
 * counts for each the bytes that are its own), into per_expert rows [n_layer][n_expert] (the other rows are
 * not written). Returns their sum, -1 on error or a bad range. */
int64_t spac_engine_residency_bytes(spac_engine *e, int32_t l0, int32_t l1, int64_t *per_expert);

/* The same for n listed experts (layers[i], experts[i]) into out[i]. Returns their sum, -1 on error. */
int64_t spac_engine_residency_experts(spac_engine *e, int32_t n, const int32_t *layers, const int32_t *experts,
                                      int64_t *out);

/* Layer-ahead prediction: when layer `source` has produced its output x (spac_engine_on_hidden),
 * predict the experts of MoE block `target` as top-k of weight . (rmsnorm(x) * norm) (+ bias on the
 * selection scores, after a sigmoid if `sigmoid`), and start reads (MADV_WILLNEED, no wait) of the
 * predicted experts that are not resident. The arrays are caller-owned and must outlive the engine:
 * weight [n_expert][n_embd], norm [n_embd], bias [n_expert] or NULL. Returns 0 or -1 (bad arguments). */
int32_t spac_engine_set_predictor(spac_engine *e, int32_t source, int32_t target, const float *weight,
                                  const float *norm, const float *bias, int32_t sigmoid, int32_t k, int32_t n_embd,
                                  float eps, int32_t max_rows);

/* Routing sensor hook (decoding thread): layer `layer`'s output rows. */
void spac_engine_on_hidden(void *engine, int32_t layer, const float *rows, int64_t n_rows, int64_t n_embd,
                           int64_t row_stride);

/* mlock (lock != 0) or munlock the whole pages inside [file_offset, file_offset + length), e.g. the
 * non-expert weights. Returns 0 or -errno. */
int32_t spac_engine_lock_range(spac_engine *e, uint64_t file_offset, uint64_t length, int32_t lock);

/* Before the first evaluation (nothing in use), before spac_engine_lock_range: drop every page of the expert
 * tensors, and of the largest-folio-sized window (2 MiB with 4 KiB pages) around their ends, within
 * [map_lo, map_size) (map_lo: where the tensor data starts). llama.cpp's load reads the file in large folios that span several experts; an expert's
 * eviction cannot drop a folio that reaches beyond it (posix_fadvise skips it, MADV_PAGEOUT splits only one
 * it finds mapped and unlocked), so unplanned experts that share a folio with a planned or in-use one, the
 * never-evicted edge page or the locked non-expert data beside a tensor would stay resident whatever the
 * plan. The engine's own reads (WILLNEED + POPULATE_READ) bring pages in as single pages. The other data
 * in the windows must be read again exactly (spac_engine_read_range) before anything faults on it: a fault
 * outside the expert tensors reads around, into them. Returns the bytes dropped, or -errno. */
int64_t spac_engine_reset_experts(spac_engine *e, uint64_t map_lo);

/* Read the pages a file range touches exactly (MADV_WILLNEED in readahead-sized pieces, then
 * MADV_POPULATE_READ, which waits), so that no page fault in it reads around it. Returns 0 or -errno. */
int32_t spac_engine_read_range(spac_engine *e, uint64_t file_offset, uint64_t length);

void spac_engine_get_stats(spac_engine *e, spac_engine_stats *out);

/* Short name of an error kind ("evict", "fadvise", ...; "" when out of range). */
const char *spac_engine_error_name(int32_t kind);

/* Whether every page of the expert is resident now (mincore): 1, 0, or -1 on bad arguments. */
int32_t spac_engine_expert_resident(spac_engine *e, int32_t layer, int32_t expert);

/* Guard the mapping [map_lo, map_hi) (file offsets: exactly llama.cpp's mapping; map_lo page-aligned,
 * map_hi at most map_size, rounded up to the mapping's last page) against
 * the file changing under it (see the file guard above). Records the file's identity from fd now.
 * Returns 0, or -errno (fstat / sigaction failed, -ENOSPC: too many guarded engines, -EINVAL). */
int32_t spac_engine_guard_file(spac_engine *e, uint64_t map_lo, uint64_t map_hi);

/* fstat the file now and compare it with the recorded identity (fences a shrunk file's tail); fills out
 * (may be NULL) and returns its fault (SPAC_FILE_*; 0 when unguarded). Any thread. */
int32_t spac_engine_check_file(spac_engine *e, spac_file_status *out);

/* Stop and join the workers (queued moves are dropped); idempotent. */
void spac_engine_stop(spac_engine *e);

/* Stop, then free. */
void spac_engine_free(spac_engine *e);

#endif
