"""Where the calling thread's time went: on a CPU, waiting for one, or blocked (``/proc/thread-self/schedstat``).

The flash tier's per-token accounting needs the time the decoding thread waited for expert reads. With
asynchronous demand loads that wait happens inside the matmuls' page faults (and at the thread pool's
barriers while another compute thread faults), where no hook can time it; the scheduler's per-thread
counters can: ``schedstat`` gives the nanoseconds the thread ran and the nanoseconds it was runnable but
waited for a core, so wall time less both is the time it was blocked (sleeping in I/O, a futex, a fault).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

_SCHEDSTAT = "/proc/thread-self/schedstat"


@dataclass(frozen=True)
class ThreadTimes:
    """One reading: monotonic wall time, and this thread's run and run-queue times (seconds)."""

    wall: float
    run: float | None
    queued: float | None

    def blocked_since(self, earlier: ThreadTimes) -> float | None:
        """Seconds the thread was neither running nor runnable between ``earlier`` and this reading (None
        without schedstat)."""
        if self.run is None or self.queued is None or earlier.run is None or earlier.queued is None:
            return None
        return max(0.0, (self.wall - earlier.wall) - (self.run - earlier.run) - (self.queued - earlier.queued))


def thread_times() -> ThreadTimes:
    """The calling thread's times now; run and queued are None where the kernel has no schedstat (the caller
    then reports no blocked time rather than a wrong one)."""
    wall = time.perf_counter()
    try:
        with open(_SCHEDSTAT, "rb") as f:
            fields = f.read().split()
        return ThreadTimes(wall, int(fields[0]) * 1e-9, int(fields[1]) * 1e-9)
    except (OSError, ValueError, IndexError):
        return ThreadTimes(wall, None, None)
