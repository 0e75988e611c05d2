"""Online re-planning off the decoding thread.

The decoding thread calls :meth:`Replanner.submit` after each step with the estimator's utilities
(cheap: a drift check and, when due, a copy under a lock) and picks up the newest finished plan with
:meth:`Replanner.latest` / :meth:`Replanner.take`. It never waits for the solver: a background thread
solves, and requests that arrive while it is busy are coalesced (only the newest utilities are kept).

A re-plan is requested every ``every`` steps, or earlier when the utilities have drifted by more than
``drift`` (relative L1) since the last request. With ``share`` set, each plan gets a time limit of
``share * every * (measured time between steps)``, so that re-planning stays a bounded share of the
decode time (the balancer keeps the greedy or current plan when the MILP has no time left).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from spac_llamacpp.planning.balancer import Plan
from spac_llamacpp.planning.utility import utility_drift

log = logging.getLogger(__name__)

PlanFn = Callable[..., Plan]  # plan_fn(utility, resident[, time_limit=...]) -> Plan


@dataclass
class ReplannerStats:
    submitted: int = 0
    requested: int = 0
    coalesced: int = 0  # requests replaced by a newer one before the solver got to them
    solves: int = 0
    failures: int = 0
    wall: list[float] = field(default_factory=list)  # seconds per solve
    cpu: list[float] = field(default_factory=list)  # CPU seconds per solve (solver subprocess included)
    submit_seconds: float = 0.0  # time the decoding thread spent in submit()
    methods: dict[str, int] = field(default_factory=dict)

    @property
    def solve_seconds(self) -> float:
        """Wall seconds of all solves (in the background thread, or in ``submit`` when synchronous)."""
        return float(sum(self.wall))

    @property
    def solve_cpu_seconds(self) -> float:
        """CPU seconds of all solves: what re-planning took from the cores decoding runs on."""
        return float(sum(self.cpu))

    def summary(self) -> dict[str, float | int]:
        """Totals and per-solve means and maximum (milliseconds) for a tier's ``stats()["replanner"]``."""
        n = max(self.solves, 1)
        return {"solves": self.solves, "failures": self.failures, "requested": self.requested,
                "coalesced": self.coalesced, "solve_seconds": self.solve_seconds,
                "solve_cpu_seconds": self.solve_cpu_seconds, "solve_ms_mean": 1e3 * self.solve_seconds / n,
                "solve_cpu_ms_mean": 1e3 * self.solve_cpu_seconds / n,
                "solve_ms_max": 1e3 * max(self.wall, default=0.0), "submit_seconds": self.submit_seconds}


class Replanner:
    """Runs ``plan_fn(utility, resident) -> Plan`` in a background thread when a re-plan is due.

    Args:
        plan_fn: e.g. ``Balancer.plan``.
        every: re-plan at least every ``every`` submitted steps.
        drift: ... or when the utilities drifted by this relative L1 distance since the last request.
        resident: callable giving the current residency (default: the latest plan, assumed applied).
        background: False solves synchronously inside :meth:`submit` (deterministic; for simulation).
        share: cap each plan's time limit at this share of the decode time between periodic re-plans
            (``plan_fn`` must then accept ``time_limit=``); ``min_time_limit`` is the floor of that cap.
        clock: seconds for the time between steps (default ``time.perf_counter``; a simulation or a
            test passes its own).
    """

    def __init__(
        self,
        plan_fn: PlanFn,
        *,
        every: int = 32,
        drift: float = 0.25,
        resident: Callable[[], np.ndarray | None] | None = None,
        background: bool = True,
        share: float | None = None,
        min_time_limit: float = 0.05,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if every < 1:
            raise ValueError("every must be >= 1")
        self.plan_fn = plan_fn
        self.every = int(every)
        self.drift = float(drift)
        self._resident_fn = resident
        self.background = background
        self.share = share
        self.min_time_limit = min_time_limit
        self.clock = clock
        self.step_seconds: float | None = None  # EMA of the (clock) time between submits
        self._last_submit: float | None = None
        self.stats = ReplannerStats()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: tuple[np.ndarray, int, float | None] | None = None
        self._busy = False
        self._closed = False
        self._latest: Plan | None = None
        self._taken: Plan | None = None
        self._last_request_u: np.ndarray | None = None
        self._last_request_step = -(10**9)
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name="spac-replanner", daemon=True)
            self._thread.start()

    # -- decoding thread ------------------------------------------------------------------------------
    def submit(self, utility: np.ndarray, step: int) -> bool:
        """Offer the utilities after ``step``; returns True when this requested a re-plan. Never blocks on a solve."""
        t0 = self.clock()
        if self._last_submit is not None:
            dt = t0 - self._last_submit
            self.step_seconds = dt if self.step_seconds is None else 0.9 * self.step_seconds + 0.1 * dt
        self._last_submit = t0
        self.stats.submitted += 1
        due = step - self._last_request_step >= self.every or (
            self.drift > 0 and utility_drift(utility, self._last_request_u) > self.drift
        )
        if due:
            u = np.array(utility, dtype=np.float64, copy=True)
            self._last_request_u = u
            self._last_request_step = step
            self.stats.requested += 1
            limit = self.time_limit()
            if self.background:
                with self._lock:
                    if self._pending is not None:
                        self.stats.coalesced += 1
                    self._pending = (u, step, limit)
                    self._wake.notify_all()
            else:
                self.stats.submit_seconds += self.clock() - t0
                self._solve(u, step, limit)
                return True
        self.stats.submit_seconds += self.clock() - t0
        return due

    def time_limit(self) -> float | None:
        """The time limit the next plan gets (None: the planner's own), see ``share``."""
        if self.share is None or self.step_seconds is None:
            return None
        return max(self.min_time_limit, self.share * self.every * self.step_seconds)

    def latest(self) -> Plan | None:
        """The newest finished plan (None before the first)."""
        return self._latest

    def take(self) -> Plan | None:
        """The newest finished plan if it was not taken before, else None."""
        with self._lock:
            p = self._latest
            if p is None or p is self._taken:
                return None
            self._taken = p
            return p

    # -- solver thread ----------------------------------------------------------------------------------
    def _solve(self, u: np.ndarray, step: int, limit: float | None = None) -> None:
        resident = self._resident_fn() if self._resident_fn else (self._latest.x if self._latest else None)
        try:
            plan = self.plan_fn(u, resident) if limit is None else self.plan_fn(u, resident, time_limit=limit)
        except Exception:  # noqa: BLE001 - keep decoding with the old plan
            self.stats.failures += 1
            log.exception("replanner: planning failed; keeping the previous plan")
            return
        plan.step = step
        self.stats.solves += 1
        self.stats.wall.append(plan.seconds)
        self.stats.cpu.append(plan.cpu_seconds)
        self.stats.methods[plan.method] = self.stats.methods.get(plan.method, 0) + 1
        with self._lock:
            self._latest = plan

    def _run(self) -> None:
        while True:
            with self._lock:
                while self._pending is None and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                u, step, limit = self._pending  # type: ignore[misc]
                self._pending = None
                self._busy = True
            try:
                self._solve(u, step, limit)
            finally:
                with self._lock:
                    self._busy = False
                    self._wake.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no request is pending or running (for tests and benchmarks, not for decoding)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._pending is not None or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._wake.wait(left)
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> Replanner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
