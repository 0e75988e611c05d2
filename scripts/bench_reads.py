#!/usr/bin/env python3
"""How fast, and at what CPU cost, can experts be read from this disk? Each read method the flash tier could use.

At real expert sizes (default 1, 2.5, 6 and 13 MiB: Q4_K experts of small to large MoEs), with 1, 2, 4 and 8
experts in flight, from a scratch file on the chosen disk whose pages are dropped (``fdatasync`` +
``posix_fadvise(DONTNEED)``) before every measurement. An expert is three slices (gate, up, down) at different
offsets of the file, each a third of its bytes and not page-aligned, as in a GGUF (``--layout tensors``, the
default), or one contiguous span (``--layout span``). Methods (``native/spac_readbench.c``, timed in C):

- ``mmap``   the engine's demand load today: MAP_SHARED mapping with MADV_RANDOM, ``MADV_WILLNEED`` in
             ``max_sectors_kb`` pieces over the batch, then ``MADV_POPULATE_READ`` per expert;
- ``fault``  ``posix_fadvise(WILLNEED)`` over the batch (page-cache readahead), then page faults (one byte
             of every page read, as a matmul on the mapping would);
- ``pread``  ``pread`` into locked anonymous slots, one thread per expert in flight (buffered);
- ``direct`` the same with ``O_DIRECT``;
- ``uring``  io_uring ``IORING_OP_READ`` (raw system calls, no liburing) with ``O_DIRECT`` into the slots,
             the whole batch submitted at once;
- ``overlay`` ``direct`` into populated anonymous pages, then each slice's inner pages moved (``mremap``) onto a
             ``MAP_SHARED`` mapping of the file at their own offsets, where a matmul reading the model's mapping
             finds them; ``+evict`` moves them back (recycled) and maps the file there again.

Printed per size, method and concurrency (the median of ``--repeat`` measurements, each on other experts):
MiB/s, mean and 90th-percentile per-expert latency (from the start of its batch, or of its own read for the
threaded ones), CPU seconds per GiB read (the process's user + system time, every thread: what the reads take
from the cores that also compute) and, for the page-cache methods, the CPU seconds per GiB of evicting those
experts again as the engine does (``+evict``; slots are overwritten instead; ``overlay``: its own eviction).
The last line is one JSON object.
On a machine shared with other jobs, read the figures as one run's.

Example::

    python scripts/bench_reads.py --dir /tmp                # ~3 minutes; writes and removes a 1.5 GiB file
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.base.sizes import format_size, parse_size
from spac_llamacpp.native.flash_engine import readahead_chunk
from spac_llamacpp.native.memlimit import drop_file_cache
from spac_llamacpp.native.readbench import METHODS, read_experts

MiB = 1 << 20
GGUF_ALIGN = 32  # tensor data alignment in a GGUF: slices start anywhere within a page


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=tempfile.gettempdir(), help="directory on the disk to measure (scratch file)")
    p.add_argument("--sizes", default="1,2.5,6,13", help="expert sizes in MiB, comma-separated")
    p.add_argument("--conc", default="1,2,4,8", help="experts in flight, comma-separated")
    p.add_argument("--methods", default=",".join(METHODS), help="read methods, comma-separated")
    p.add_argument("--layout", choices=("tensors", "span"), default="tensors",
                   help="an expert as three slices at different offsets (a GGUF's gate/up/down) or one span")
    p.add_argument("--file-size", default="1536MiB", help="scratch file size (experts are drawn from all of it)")
    p.add_argument("--per-point", default="160MiB", help="bytes read per measurement (at least 3 batches)")
    p.add_argument("--repeat", type=int, default=3, help="measurements per point (the median is printed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default=None, help="also write the JSON result here")
    return p.parse_args()


def write_scratch(path: Path, size: int) -> None:
    """Random bytes (nothing a filesystem or device could compress or skip), synced."""
    rng = np.random.default_rng(1)
    block = 64 * MiB
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(block, left)
            f.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            left -= n
        f.flush()
        os.fsync(f.fileno())


def expert_ranges(layout: str, expert_bytes: int, file_size: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``[n, n_ranges, 2]`` (offset, length) of n distinct experts drawn at random from the file."""
    if layout == "span":
        slots = file_size // expert_bytes
        pick = rng.choice(slots, size=n, replace=False)
        return np.stack([pick * expert_bytes, np.full(n, expert_bytes)], axis=1)[:, None, :].astype(np.uint64)
    part = -(-expert_bytes // 3 // GGUF_ALIGN) * GGUF_ALIGN  # a tensor's slice, GGUF-aligned, not page-aligned
    region = file_size // 3 // part * part  # three tensors, each n_expert slices
    n_expert = (region - GGUF_ALIGN) // part
    pick = rng.choice(n_expert, size=n, replace=False)
    offs = np.stack([r * region + pick * part + GGUF_ALIGN for r in range(3)], axis=1)  # + 32: off the page grid
    return np.stack([offs, np.full_like(offs, part)], axis=2).astype(np.uint64)


def main() -> int:
    args = parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]
    concs = [int(c) for c in args.conc.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"bench_reads: unknown method {m!r}; choose from {', '.join(METHODS)}")
    file_size, per_point = parse_size(args.file_size), parse_size(args.per_point)
    directory = Path(args.dir)
    if not directory.is_dir():
        raise SystemExit(f"bench_reads: {directory} is not a directory")
    free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
    if free < file_size + (256 << 20):
        raise SystemExit(f"bench_reads: {directory} has {format_size(free)} free; the scratch file needs "
                         f"{format_size(file_size)}")
    scratch = directory / f"spac-bench-reads-{os.getpid()}.bin"
    chunk = readahead_chunk(directory)
    print(f"scratch file {scratch} ({format_size(file_size)}), layout {args.layout}, MADV_WILLNEED pieces of "
          f"{format_size(chunk)} (max_sectors_kb)", flush=True)
    rng = np.random.default_rng(args.seed)
    results = []
    t_start = time.perf_counter()
    try:
        write_scratch(scratch, file_size)
        for size_mib in sizes:
            expert_bytes = int(size_mib * MiB)
            print(f"\nexpert {size_mib:g} MiB ({'3 slices' if args.layout == 'tensors' else '1 span'}):", flush=True)
            print(f"  {'method':7s} {'conc':>4s} {'MiB/s':>8s} {'lat mean':>9s} {'lat p90':>8s} {'CPU s/GiB':>9s} "
                  f"{'+evict':>7s}")
            for method in methods:
                for conc in concs:
                    n = max(3 * conc, -(-per_point // expert_bytes))
                    n = -(-n // conc) * conc  # whole batches
                    reps = []
                    try:
                        for _ in range(max(1, args.repeat)):
                            ranges = expert_ranges(args.layout, expert_bytes, file_size, n, rng)
                            warm = expert_ranges(args.layout, expert_bytes, file_size, conc, rng)
                            drop_file_cache(scratch)
                            read_experts(method, scratch, warm, conc, chunk)  # first-call costs (mapping, threads)
                            drop_file_cache(scratch)
                            t = read_experts(method, scratch, ranges, conc, chunk)
                            gib = int(ranges[:, :, 1].sum()) / (1 << 30)
                            ms = t.done_s * 1e3
                            reps.append((gib * 1024 / t.wall_s, ms.mean(), np.percentile(ms, 90), t.cpu_s / gib,
                                         t.evict_cpu_s / gib))
                    except SpacError as exc:
                        print(f"  {method:7s} {conc:4d}  skipped: {exc}", flush=True)
                        results.append({"size_mib": size_mib, "method": method, "conc": conc, "skipped": str(exc)})
                        continue
                    med = np.median(np.array(reps), axis=0)
                    row = {"size_mib": size_mib, "method": method, "conc": conc, "experts": n, "repeats": len(reps),
                           "mib_s": float(med[0]), "latency_ms": float(med[1]), "latency_p90_ms": float(med[2]),
                           "cpu_s_per_gib": float(med[3]), "evict_cpu_s_per_gib": float(med[4]),
                           "mib_s_runs": [round(r[0], 1) for r in reps]}
                    results.append(row)
                    print(f"  {method:7s} {conc:4d} {row['mib_s']:8.0f} {row['latency_ms']:8.1f}ms "
                          f"{row['latency_p90_ms']:7.1f}ms {row['cpu_s_per_gib']:9.3f} "
                          f"{row['evict_cpu_s_per_gib']:7.3f}", flush=True)
    finally:
        scratch.unlink(missing_ok=True)
    out = {"dir": str(directory), "layout": args.layout, "file_bytes": file_size, "willneed_chunk": chunk,
           "seconds": time.perf_counter() - t_start, "results": results}
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
