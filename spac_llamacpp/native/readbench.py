"""Timed reads of expert-shaped byte ranges by each read method (``native/spac_readbench.c``).

``scripts/bench_reads.py`` drives it to compare how the flash tier could bring experts into memory: its
current ``MADV_WILLNEED`` + ``MADV_POPULATE_READ`` on a shared mapping, page-cache readahead followed by
page faults, ``pread`` into locked slots (buffered or ``O_DIRECT``) and io_uring (``O_DIRECT``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.native import module as native

METHODS = {"mmap": 0, "fault": 1, "pread": 2, "direct": 3, "uring": 4, "overlay": 5}  # SPAC_READ_* (spac_readbench.h)


@dataclass(frozen=True)
class ReadTiming:
    """One call: ``done_s[x]`` seconds until expert x was complete (from its batch's start, or its own read's),
    the call's wall seconds and the process's CPU seconds (user + system, every thread); ``evict_cpu_s``: the
    CPU seconds of evicting the experts again as the flash engine does (page-cache methods; 0 for slots)."""

    done_s: np.ndarray
    wall_s: float
    cpu_s: float
    evict_cpu_s: float


def read_experts(method: str, path: str | os.PathLike[str], ranges: np.ndarray, conc: int,
                 chunk: int = 128 << 10) -> ReadTiming:
    """Read ``ranges`` (uint64 ``[n_experts, n_ranges, 2]``: offset, length of each expert's slices) of ``path``,
    ``conc`` experts in flight at a time, with ``method`` (:data:`METHODS`); ``chunk``: bytes per
    ``MADV_WILLNEED`` call (``mmap``). The caller drops the file's pages first. A method the kernel does not
    offer (io_uring disabled) is a SpacError naming it."""
    if method not in METHODS:
        raise SpacError(f"unknown read method {method!r}; choose one of {', '.join(METHODS)}")
    r = np.ascontiguousarray(ranges, dtype=np.uint64)
    if r.ndim != 3 or r.shape[2] != 2 or r.shape[0] < 1 or r.shape[1] < 1:
        raise SpacError(f"ranges must be [n_experts, n_ranges, 2], not {r.shape}")
    mod = native.load()
    ffi, lib = mod.ffi, mod.lib
    offs = np.ascontiguousarray(r[:, :, 0].ravel())
    lens = np.ascontiguousarray(r[:, :, 1].ravel())
    done = np.zeros(r.shape[0], np.int64)
    wall, cpu, evict = ffi.new("int64_t *"), ffi.new("int64_t *"), ffi.new("int64_t *")
    rc = lib.spac_readbench(METHODS[method], os.fsencode(path), ffi.cast("uint64_t *", ffi.from_buffer(offs)),
                            ffi.cast("uint64_t *", ffi.from_buffer(lens)), r.shape[1], r.shape[0], int(conc),
                            int(chunk), ffi.cast("int64_t *", ffi.from_buffer(done)), wall, cpu, evict)
    if rc != 0:
        raise SpacError(f"read method {method} failed on {path}: {os.strerror(-rc)}")
    return ReadTiming(done / 1e9, wall[0] / 1e9, cpu[0] / 1e9, evict[0] / 1e9)
