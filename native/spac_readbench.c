/* Read-method benchmark: see spac_readbench.h. */
#define _GNU_SOURCE
#include "spac_readbench.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif

#ifndef MREMAP_DONTUNMAP
#define MREMAP_DONTUNMAP 4 /* Linux 5.7 */
#endif

#define ALIGN 4096u /* O_DIRECT granularity used here */

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int64_t cpu_now_ns(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return ((int64_t)u.ru_utime.tv_sec + u.ru_stime.tv_sec) * 1000000000LL +
           ((int64_t)u.ru_utime.tv_usec + u.ru_stime.tv_usec) * 1000LL;
}

typedef struct {
    const uint64_t *offs, *lens;
    int32_t n_ranges, n_experts, conc;
    uint64_t chunk, page, slot_bytes;
    int fd, dfd;
    uint8_t *map, *slots;
    int64_t *done_ns;
} job_t;

/* [lo, hi) of range (x, r) rounded out to ALIGN (O_DIRECT), and where its bytes land in the slot */
static void aligned(const job_t *j, int64_t k, uint64_t *lo, uint64_t *hi) {
    *lo = j->offs[k] - j->offs[k] % ALIGN;
    uint64_t end = j->offs[k] + j->lens[k];
    *hi = end + (end % ALIGN ? ALIGN - end % ALIGN : 0);
}

static int read_full(int fd, uint8_t *buf, uint64_t len, uint64_t off) {
    while (len > 0) {
        ssize_t n = pread(fd, buf, len, (off_t)off);
        if (n <= 0) {
            return n == 0 ? -EIO : -errno;
        }
        buf += n;
        len -= (uint64_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

/* --- mapping methods (decoding-thread style: one thread issues everything) ----------------------- */

static int run_mapped(job_t *j, int fault) {
    int rc = 0;
    for (int32_t b0 = 0; b0 < j->n_experts && rc == 0; b0 += j->conc) {
        const int32_t b1 = b0 + j->conc < j->n_experts ? b0 + j->conc : j->n_experts;
        const int64_t t0 = now_ns();
        for (int64_t k = (int64_t)b0 * j->n_ranges; k < (int64_t)b1 * j->n_ranges; k++) {
            uint64_t lo = j->offs[k] - j->offs[k] % j->page, hi = j->offs[k] + j->lens[k];
            if (fault) {
                posix_fadvise(j->fd, (off_t)lo, (off_t)(hi - lo), POSIX_FADV_WILLNEED);
            } else {
                for (uint64_t a = lo; a < hi; a += j->chunk) {
                    uint64_t e = hi - a < j->chunk ? hi : a + j->chunk;
                    madvise(j->map + a, e - a, MADV_WILLNEED);
                }
            }
        }
        for (int32_t x = b0; x < b1; x++) {
            for (int32_t r = 0; r < j->n_ranges; r++) {
                const int64_t k = (int64_t)x * j->n_ranges + r;
                uint64_t lo = j->offs[k] - j->offs[k] % j->page, hi = j->offs[k] + j->lens[k];
                if (fault) {
                    volatile uint8_t sink = 0;
                    for (uint64_t p = lo; p < hi; p += j->page) {
                        sink ^= j->map[p];
                    }
                    (void)sink;
                } else if (madvise(j->map + lo, hi - lo, MADV_POPULATE_READ) != 0) {
                    rc = -errno;
                }
            }
            j->done_ns[x] = now_ns() - t0;
        }
    }
    return rc;
}

/* --- pread methods: conc threads, each with one expert in flight at a time -------------------------- */

typedef struct {
    job_t *j;
    int32_t tid;
    int direct; /* 1: O_DIRECT; 2: O_DIRECT, then the inner pages moved onto the mapping (OVERLAY) */
    int rc;
} worker_t;

/* Pages entirely inside range k (an OVERLAY moves only these: a boundary page belongs to two slices) */
static void inner_pages(const job_t *j, int64_t k, uint64_t *lo, uint64_t *hi) {
    *lo = j->offs[k] + (j->offs[k] % j->page ? j->page - j->offs[k] % j->page : 0);
    *hi = j->offs[k] + j->lens[k];
    *hi -= *hi % j->page;
    if (*hi < *lo) {
        *hi = *lo;
    }
}

/* Where range k's inner pages sit in its expert's slot (OVERLAY: one slot per expert; the O_DIRECT read of
 * the range's aligned cover starts at `at`) */
static uint8_t *slot_inner(const job_t *j, int64_t k, uint64_t at, uint64_t cover_lo, uint64_t inner_lo) {
    return j->slots + (uint64_t)(k / j->n_ranges) * j->slot_bytes + at + (inner_lo - cover_lo);
}

/* OVERLAY: move range k's inner pages from the slot onto the file mapping at their file offset (mremap: the
 * page tables move, no copy, and the address switches from the file's page to the slot's page, with the same
 * bytes, at once), so that code reading the mapping (a matmul) finds the bytes there without the page cache */
static int overlay_in(const job_t *j, int64_t k, uint64_t at, uint64_t cover_lo) {
    uint64_t lo, hi;
    inner_pages(j, k, &lo, &hi);
    if (hi > lo && mremap(slot_inner(j, k, at, cover_lo, lo), hi - lo, hi - lo, MREMAP_MAYMOVE | MREMAP_FIXED,
                          j->map + lo) == MAP_FAILED) {
        return -errno;
    }
    return 0;
}

static void *pread_worker(void *arg) {
    worker_t *w = (worker_t *)arg;
    job_t *j = w->j;
    uint8_t *slot = j->slots + (uint64_t)w->tid * j->slot_bytes;
    for (int32_t x = w->tid; x < j->n_experts && w->rc == 0; x += j->conc) {
        const int64_t t0 = now_ns();
        uint64_t at = 0;
        for (int32_t r = 0; r < j->n_ranges && w->rc == 0; r++) {
            const int64_t k = (int64_t)x * j->n_ranges + r;
            if (w->direct) {
                uint64_t lo, hi;
                aligned(j, k, &lo, &hi);
                if (w->direct == 2) {
                    slot = j->slots + (uint64_t)x * j->slot_bytes; /* OVERLAY: every expert its own slot */
                }
                w->rc = read_full(j->dfd, slot + at, hi - lo, lo);
                if (w->rc == 0 && w->direct == 2) {
                    w->rc = overlay_in(j, k, at, lo);
                }
                at += hi - lo;
            } else {
                w->rc = read_full(j->fd, slot + at, j->lens[k], j->offs[k]);
                at += j->lens[k];
            }
        }
        j->done_ns[x] = now_ns() - t0;
    }
    return NULL;
}

static int run_pread(job_t *j, int direct) {
    pthread_t th[64];
    worker_t ws[64];
    int32_t started = 0, rc = 0;
    for (int32_t t = 0; t < j->conc && t < 64; t++) {
        ws[t] = (worker_t){j, t, direct, 0};
        if (pthread_create(&th[t], NULL, pread_worker, &ws[t]) != 0) {
            rc = -EAGAIN; /* the started ones finish their share; the call reports the failure */
            break;
        }
        started++;
    }
    for (int32_t t = 0; t < started; t++) {
        pthread_join(th[t], NULL);
        rc = rc ? rc : ws[t].rc;
    }
    return rc;
}

/* --- io_uring, raw system calls (the UAPI header only) --------------------------------------------- */

typedef struct {
    int fd;
    unsigned *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_ptr, *cq_ptr;
    size_t sq_sz, cq_sz, sqes_sz;
} ring_t;

static int ring_init(ring_t *q, unsigned entries) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    memset(q, 0, sizeof *q);
    q->fd = (int)syscall(__NR_io_uring_setup, entries, &p);
    if (q->fd < 0) {
        return -errno;
    }
    q->sq_sz = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    q->cq_sz = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    const int single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
    if (single) {
        q->sq_sz = q->cq_sz = q->sq_sz > q->cq_sz ? q->sq_sz : q->cq_sz;
    }
    q->sq_ptr = mmap(NULL, q->sq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, q->fd, IORING_OFF_SQ_RING);
    q->cq_ptr = single ? q->sq_ptr
                       : mmap(NULL, q->cq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, q->fd,
                              IORING_OFF_CQ_RING);
    q->sqes_sz = p.sq_entries * sizeof(struct io_uring_sqe);
    q->sqes = (struct io_uring_sqe *)mmap(NULL, q->sqes_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, q->fd,
                                          IORING_OFF_SQES);
    if (q->sq_ptr == MAP_FAILED || q->cq_ptr == MAP_FAILED || q->sqes == MAP_FAILED) {
        int err = errno;
        close(q->fd);
        return -err;
    }
    uint8_t *sq = (uint8_t *)q->sq_ptr, *cq = (uint8_t *)q->cq_ptr;
    q->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    q->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    q->sq_array = (unsigned *)(sq + p.sq_off.array);
    q->cq_head = (unsigned *)(cq + p.cq_off.head);
    q->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    q->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    q->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    return 0;
}

static void ring_free(ring_t *q) {
    munmap(q->sqes, q->sqes_sz);
    if (q->cq_ptr != q->sq_ptr) {
        munmap(q->cq_ptr, q->cq_sz);
    }
    munmap(q->sq_ptr, q->sq_sz);
    close(q->fd);
}

static int run_uring(job_t *j) {
    const unsigned depth = (unsigned)(j->conc * j->n_ranges);
    unsigned entries = 1;
    while (entries < depth) {
        entries <<= 1;
    }
    ring_t q;
    int rc = ring_init(&q, entries);
    if (rc != 0) {
        return rc == -EPERM || rc == -ENOSYS ? -ENOSYS : rc;
    }
    int32_t *left = (int32_t *)calloc((size_t)j->conc, sizeof(int32_t));
    if (left == NULL) {
        ring_free(&q);
        return -ENOMEM;
    }
    for (int32_t b0 = 0; b0 < j->n_experts && rc == 0; b0 += j->conc) {
        const int32_t b1 = b0 + j->conc < j->n_experts ? b0 + j->conc : j->n_experts;
        const int64_t t0 = now_ns();
        unsigned tail = *q.sq_tail, n = 0;
        for (int32_t x = b0; x < b1; x++) {
            uint64_t at = 0;
            uint8_t *slot = j->slots + (uint64_t)(x - b0) * j->slot_bytes;
            left[x - b0] = j->n_ranges;
            for (int32_t r = 0; r < j->n_ranges; r++) {
                const int64_t k = (int64_t)x * j->n_ranges + r;
                uint64_t lo, hi;
                aligned(j, k, &lo, &hi);
                unsigned idx = tail & *q.sq_mask;
                struct io_uring_sqe *sqe = &q.sqes[idx];
                memset(sqe, 0, sizeof *sqe);
                sqe->opcode = IORING_OP_READ;
                sqe->fd = j->dfd;
                sqe->addr = (uint64_t)(uintptr_t)(slot + at);
                sqe->len = (uint32_t)(hi - lo);
                sqe->off = lo;
                sqe->user_data = (uint64_t)(x - b0);
                q.sq_array[idx] = idx;
                tail++;
                n++;
                at += hi - lo;
            }
        }
        __atomic_store_n(q.sq_tail, tail, __ATOMIC_RELEASE);
        unsigned submitted = 0, reaped = 0;
        while (rc == 0 && reaped < n) {
            int got = (int)syscall(__NR_io_uring_enter, q.fd, n - submitted, 1, IORING_ENTER_GETEVENTS, NULL, 0);
            if (got < 0) {
                if (errno == EINTR) {
                    continue;
                }
                rc = -errno;
                break;
            }
            submitted += (unsigned)got;
            unsigned head = *q.cq_head, ctail = __atomic_load_n(q.cq_tail, __ATOMIC_ACQUIRE);
            for (; head != ctail; head++) {
                struct io_uring_cqe *c = &q.cqes[head & *q.cq_mask];
                const int32_t slot = (int32_t)c->user_data;
                if (c->res < 0) {
                    rc = c->res;
                }
                if (--left[slot] == 0) {
                    j->done_ns[b0 + slot] = now_ns() - t0;
                }
                reaped++;
            }
            __atomic_store_n(q.cq_head, head, __ATOMIC_RELEASE);
        }
    }
    free(left);
    ring_free(&q);
    return rc;
}

#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21
#endif

/* OVERLAY's eviction, as the flash engine does it: each range's inner pages moved back into their slot
 * (recycled, not freed: the next read reuses them without zeroing new pages) with MREMAP_DONTUNMAP, so that the
 * mapping never has a hole another thread's mmap could take, and the file mapped over the emptied range (no page
 * cache to drop) */
static int evict_overlays(job_t *j) {
    for (int32_t x = 0; x < j->n_experts; x++) {
        uint64_t at = 0;
        for (int32_t r = 0; r < j->n_ranges; r++) {
            const int64_t k = (int64_t)x * j->n_ranges + r;
            uint64_t clo, chi, lo, hi;
            aligned(j, k, &clo, &chi);
            inner_pages(j, k, &lo, &hi);
            if (hi > lo) {
                if (mremap(j->map + lo, hi - lo, hi - lo, MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP,
                           slot_inner(j, k, at, clo, lo)) == MAP_FAILED ||
                    mmap(j->map + lo, hi - lo, PROT_READ, MAP_SHARED | MAP_FIXED, j->fd, (off_t)lo) == MAP_FAILED) {
                    return -errno;
                }
            }
            at += chi - clo;
        }
    }
    return 0;
}

/* What the flash engine's eviction does to an expert (native/spac_engine.c do_evict), over the pages inside
 * each range: the page-cache methods' cost of making room again, which slots do not have. */
static void evict_all(job_t *j) {
    for (int64_t k = 0; k < (int64_t)j->n_experts * j->n_ranges; k++) {
        uint64_t lo, hi;
        inner_pages(j, k, &lo, &hi);
        if (hi > lo) {
            madvise(j->map + lo, hi - lo, MADV_PAGEOUT);
            madvise(j->map + lo, hi - lo, MADV_DONTNEED);
            posix_fadvise(j->fd, (off_t)lo, (off_t)(hi - lo), POSIX_FADV_DONTNEED);
        }
    }
}

int32_t spac_readbench(int32_t method, const char *path, const uint64_t *offs, const uint64_t *lens,
                       int32_t n_ranges, int32_t n_experts, int32_t conc, uint64_t chunk, int64_t *done_ns,
                       int64_t *wall_ns, int64_t *cpu_ns, int64_t *evict_cpu_ns) {
    if (path == NULL || offs == NULL || lens == NULL || done_ns == NULL || wall_ns == NULL || cpu_ns == NULL ||
        evict_cpu_ns == NULL ||
        n_ranges < 1 || n_experts < 1 || conc < 1 || conc > 64 || method < SPAC_READ_MMAP || method > SPAC_READ_OVERLAY) {
        return -EINVAL;
    }
    job_t j;
    memset(&j, 0, sizeof j);
    j.offs = offs;
    j.lens = lens;
    j.n_ranges = n_ranges;
    j.n_experts = n_experts;
    j.conc = conc;
    j.page = (uint64_t)sysconf(_SC_PAGESIZE);
    j.chunk = chunk < j.page ? j.page : chunk - chunk % j.page;
    j.done_ns = done_ns;
    j.fd = open(path, O_RDONLY | O_CLOEXEC);
    j.dfd = -1;
    if (j.fd < 0) {
        return -errno;
    }
    struct stat st;
    fstat(j.fd, &st);
    int rc = 0;
    uint64_t slot = 0;
    for (int32_t x = 0; x < n_experts; x++) {
        uint64_t s = 0;
        for (int32_t r = 0; r < n_ranges; r++) {
            uint64_t lo, hi;
            aligned(&j, (int64_t)x * n_ranges + r, &lo, &hi);
            s += hi - lo;
            if (offs[(int64_t)x * n_ranges + r] + lens[(int64_t)x * n_ranges + r] > (uint64_t)st.st_size) {
                rc = -EINVAL;
            }
        }
        slot = s > slot ? s : slot;
    }
    j.slot_bytes = slot + (slot % ALIGN ? ALIGN - slot % ALIGN : 0);
    if (rc == 0 && (method == SPAC_READ_DIRECT || method == SPAC_READ_URING || method == SPAC_READ_OVERLAY)) {
        j.dfd = open(path, O_RDONLY | O_CLOEXEC | O_DIRECT);
        rc = j.dfd < 0 ? -errno : 0;
    }
    if (rc == 0 && (method == SPAC_READ_MMAP || method == SPAC_READ_FAULT || method == SPAC_READ_OVERLAY)) {
        j.map = (uint8_t *)mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, j.fd, 0);
        if (j.map == MAP_FAILED) {
            j.map = NULL;
            rc = -errno;
        } else {
            madvise(j.map, (size_t)st.st_size, MADV_RANDOM); /* as the flash tier sets its expert tensors */
        }
    }
    /* OVERLAY moves pages out of its slots: one slot per expert (the pages a real pool would recycle) */
    const uint64_t n_slots = method == SPAC_READ_OVERLAY ? (uint64_t)n_experts : (uint64_t)conc;
    if (rc == 0 && j.page != ALIGN && method == SPAC_READ_OVERLAY) {
        rc = -EINVAL; /* the slot layout assumes O_DIRECT's alignment is the page */
    }
    if (rc == 0 && method >= SPAC_READ_PREAD) { /* the slots: locked anonymous memory, touched once */
        j.slots = (uint8_t *)mmap(NULL, (size_t)(j.slot_bytes * n_slots), PROT_READ | PROT_WRITE,
                                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (j.slots == MAP_FAILED) {
            j.slots = NULL;
            rc = -errno;
        } else if (method == SPAC_READ_OVERLAY || mlock(j.slots, (size_t)(j.slot_bytes * n_slots)) != 0) {
            /* populated (OVERLAY: not locked, its pages move onto the mapping; else: not lockable) */
            memset(j.slots, 0, (size_t)(j.slot_bytes * n_slots));
        }
    }
    if (rc == 0) {
        const int64_t t0 = now_ns(), c0 = cpu_now_ns();
        switch (method) {
        case SPAC_READ_MMAP:
            rc = run_mapped(&j, 0);
            break;
        case SPAC_READ_FAULT:
            rc = run_mapped(&j, 1);
            break;
        case SPAC_READ_PREAD:
            rc = run_pread(&j, 0);
            break;
        case SPAC_READ_DIRECT:
            rc = run_pread(&j, 1);
            break;
        case SPAC_READ_OVERLAY:
            rc = run_pread(&j, 2);
            break;
        default:
            rc = run_uring(&j);
            break;
        }
        *wall_ns = now_ns() - t0;
        *cpu_ns = cpu_now_ns() - c0;
        *evict_cpu_ns = 0;
        if (rc == 0 && j.map != NULL) {
            const int64_t e0 = cpu_now_ns();
            if (method == SPAC_READ_OVERLAY) {
                rc = evict_overlays(&j);
            } else {
                evict_all(&j);
            }
            *evict_cpu_ns = cpu_now_ns() - e0;
        }
    }
    if (j.map != NULL) {
        munmap(j.map, (size_t)st.st_size);
    }
    if (j.slots != NULL) {
        munmap(j.slots, (size_t)(j.slot_bytes * n_slots));
    }
    if (j.dfd >= 0) {
        close(j.dfd);
    }
    close(j.fd);
    return rc;
}
