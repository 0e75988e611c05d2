/* Read-method benchmark (scripts/bench_reads.py): how fast, and at what CPU cost, experts of a file can be
 * brought into memory by each way the flash tier could read them.
 *
 * One call reads n_experts experts, conc at a time (a batch: all its reads in flight together, as a layer's
 * misses are), from a file whose pages the caller has dropped. An expert is n_ranges byte ranges
 * (offs[x * n_ranges + r], lens[...]): the expert's slice of each of its tensors, at different offsets, as in
 * a GGUF. Methods (SPAC_READ_*):
 *   MMAP      the engine's demand load today: a fresh MAP_SHARED mapping of the file with MADV_RANDOM;
 *             MADV_WILLNEED in `chunk`-byte pieces over every range of the batch, then MADV_POPULATE_READ
 *             per expert (which waits for the reads and maps the pages);
 *   FAULT     posix_fadvise(WILLNEED) over every range of the batch (reads into the page cache, no wait),
 *             then one byte of every page touched in order, as a matmul reading the mapping would (minor
 *             page faults that wait for the reads);
 *   PREAD     conc threads, each reading one expert at a time (so conc are in flight), pread of each range
 *             into the thread's slot of a locked anonymous buffer (buffered I/O: through the page cache,
 *             copied out);
 *   DIRECT    the same with O_DIRECT (ranges rounded out to 4 KiB; the cache is bypassed, DMA into the slot);
 *   URING     io_uring (raw system calls: no liburing), IORING_OP_READ of every range of the batch into the
 *             slots from the O_DIRECT descriptor, submitted together, then every completion reaped;
 *   OVERLAY   DIRECT into one populated anonymous slot per expert, then each range's inner pages (those
 *             entirely inside the slice) moved by mremap onto a MAP_SHARED mapping of the file at their own
 *             offsets: the bytes end up where a matmul reading the model's mapping looks, without the page
 *             cache (the way the flash engine could use O_DIRECT without the pool path); its eviction moves
 *             the pages back into their slots (recycled, not freed) and maps the file there again.
 * done_ns[x]: time from the start of expert x's batch (PREAD, DIRECT: of its own read) until the expert was
 * complete; wall_ns and cpu_ns
 * (getrusage of the whole process: user + system, every thread) cover the reads; evict_cpu_ns (MMAP, FAULT; 0 for
 * PREAD, DIRECT, URING) the CPU of then evicting the experts as the flash engine does (MADV_PAGEOUT, MADV_DONTNEED,
 * posix_fadvise(DONTNEED)): the page cache's cost of making room again, which slots do not have; for OVERLAY,
 * of moving the pages back and mapping the file again.
 * Returns 0, or -errno (-ENOSYS: io_uring not available). */
#ifndef SPAC_READBENCH_H
#define SPAC_READBENCH_H

#include <stdint.h>

enum { SPAC_READ_MMAP = 0, SPAC_READ_FAULT = 1, SPAC_READ_PREAD = 2, SPAC_READ_DIRECT = 3, SPAC_READ_URING = 4,
       SPAC_READ_OVERLAY = 5 };

int32_t spac_readbench(int32_t method, const char *path, const uint64_t *offs, const uint64_t *lens,
                       int32_t n_ranges, int32_t n_experts, int32_t conc, uint64_t chunk, int64_t *done_ns,
                       int64_t *wall_ns, int64_t *cpu_ns, int64_t *evict_cpu_ns);

#endif
