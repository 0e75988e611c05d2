"""Impose a RAM limit on benchmarks by locking the rest of the machine's memory in a helper process.

:class:`MemoryLimit` starts ``python -m spac_llamacpp.native.memlimit BYTES``: the helper maps and
``mlock``s that much anonymous memory (the kernel must then evict page cache to make room, exactly
as on a machine with less RAM) and holds it until its stdin closes. The parent keeps the pipe, so
the memory is released when the ``with`` block ends, on exceptions, and even if the parent is
killed. Every process on the machine sees the same limit, so runs measured one after another
inside one ``MemoryLimit`` are constrained equally.

Safety: the amount locked is ``MemAvailable - limit``; a limit below ``min_limit`` is refused, so
the machine always keeps that much available for the benchmark and everything else. One limit at a
time per machine (an exclusive ``flock`` on :data:`LOCK_PATH` while the block runs): a second one would
measure MemAvailable already lowered by the first and lock what the first one's runs need, and both
benchmarks would then measure thrashing (seen: 0.46 tok/s where 9 is the norm).
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.base.sizes import format_size

LOCK_PATH = Path(tempfile.gettempdir()) / "spac-llamacpp-memlimit.lock"
"""Held (``flock``, exclusive) by the process whose :class:`MemoryLimit` is in force; it holds its pid."""


def mem_available() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise SpacError("/proc/meminfo has no MemAvailable; the memory limit needs Linux 3.14 or newer")


def drop_file_cache(path: str | os.PathLike[str]) -> None:
    """Drop a file's clean pages from the page cache (those no process maps)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class MemoryLimit:
    """``with MemoryLimit(limit):`` leaves about ``limit`` bytes available while the block runs.

    Args:
        limit: bytes that stay available (MemAvailable) for everything else.
        min_limit: refuse limits below this (safety margin for the machine).
        timeout: seconds to wait for the helper to lock its memory.
    """

    def __init__(self, limit: int, min_limit: int = 1 << 30, timeout: float = 300.0) -> None:
        if limit < min_limit:
            raise SpacError(f"memory limit {format_size(limit)} is below the safety floor {format_size(min_limit)}")
        self.limit = int(limit)
        self.timeout = timeout
        self.locked = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None

    def __enter__(self) -> MemoryLimit:
        self._take_lock()
        avail = mem_available()
        self.locked = avail - self.limit
        if self.locked <= 0:
            self.locked = 0
            return self  # the machine already has no more than the limit available
        self._proc = subprocess.Popen([sys.executable, "-m", "spac_llamacpp.native.memlimit", str(self.locked)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().decode().strip()  # "locked N" or nothing on failure
        if not line.startswith("locked"):
            err = self._proc.stderr.read().decode().strip() if self._proc.stderr else ""
            self._stop()
            raise SpacError(f"could not lock {format_size(self.locked)} to impose the memory limit: "
                            f"{err or 'helper exited'}")
        return self

    def _take_lock(self) -> None:
        fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SpacError(f"another RAM limit is in force on this machine (pid {holder}, lock {LOCK_PATH}): "
                            "benchmarks under a RAM limit must run one at a time; wait for it to end") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _stop(self) -> None:
        try:
            self._stop_helper()
        finally:
            self._release_lock()

    def _stop_helper(self) -> None:
        if self._proc is None:
            return
        try:
            if self._proc.stdin:
                self._proc.stdin.close()
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def describe(self) -> str:
        return (f"{format_size(self.limit)} left available by locking {format_size(self.locked)} in a helper process "
                "(mlock)")


def _hold(nbytes: int) -> int:
    """Helper process: lock ``nbytes`` of anonymous memory until stdin closes."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    t0 = time.time()
    if libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(nbytes)) != 0:
        err = ctypes.get_errno()
        print(f"mlock of {format_size(nbytes)} failed: {os.strerror(err)} (run as root or raise `ulimit -l`)",
              file=sys.stderr, flush=True)
        return 1
    print(f"locked {nbytes} in {time.time() - t0:.1f} s", flush=True)
    sys.stdin.buffer.read()  # returns at EOF: the parent closed the pipe or died
    return 0


if __name__ == "__main__":
    sys.exit(_hold(int(sys.argv[1])))
