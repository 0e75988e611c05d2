"""Expert placement policies, replayed by the simulator (``simulator.py``).

Two kinds:

- *planned* policies choose the fast-tier set before each step (:meth:`Policy.before_step`); what they
  add is a background transfer, misses are served from the slow tier and not admitted:
  ``none``, ``static`` (profile), ``pin`` (pin-hot-by-count), ``spac`` (MoE-SpAc hysteresis), ``ours``
  (utility estimate -> integer program);
- *demand* caches admit every miss when it happens, evicting by their rule (:meth:`Policy.victim`):
  ``lru``, ``lfu``, ``min`` (Belady's MIN: clairvoyant eviction and bypass);
- ``belady``: the clairvoyant prefetching oracle (experts needed soonest are resident): the hit-rate bound.

Arrays are ``[n_moe_layer, n_expert]``; an expert id is the pair (i, e), i indexing MoE layers.
"""

from __future__ import annotations

import heapq
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.planning.balancer import Problem, solve, tier_costs
from spac_llamacpp.planning.budgets import fit_groups
from spac_llamacpp.planning.costmodel import CostModel, ExpertLayout
from spac_llamacpp.planning.estimators import HysteresisEstimator, Observation
from spac_llamacpp.planning.placement import PlacementPlanner
from spac_llamacpp.planning.placement_config import PlacementConfig

log = logging.getLogger(__name__)

POLICIES = ("none", "static", "lru", "lfu", "pin", "spac", "ours", "min", "belady")

_NEVER = np.iinfo(np.int64).max


@dataclass
class SimSetup:
    """What every policy may know about the run (not the future, except the oracle)."""

    tier: str
    layout: ExpertLayout
    cost: CostModel
    total_budget: int  # the tier's budget as given (flash: RAM for experts; vram: GPU memory for the model)
    budget: int  # bytes of the fast tier for experts (planning.budgets: what the tier's plan gets)
    counts: np.ndarray  # [T, L, E] per-step counts (only Belady and static-from-this-trace may read it)
    step_tokens: np.ndarray  # [T]
    config: PlacementConfig | None = None  # the tier's placement configuration (``ours``); None: its defaults
    n_slots: tuple[int, ...] | None = None  # vram: slots per layer group
    group_of_row: tuple[int, ...] | None = None  # vram: each MoE layer's group

    @property
    def size(self) -> np.ndarray:
        return self.layout.bytes_matrix

    @property
    def shape(self) -> tuple[int, int]:
        return self.layout.n_layer, self.layout.n_expert


class Policy:
    """Base class; see the module docstring."""

    name = "base"
    demand = False  # True: admits misses at access time

    def reset(self, setup: SimSetup) -> np.ndarray:
        """Start a replay; returns the initial residency (loaded before the first step, not timed)."""
        self.setup = setup
        return np.zeros(setup.shape, bool)

    def before_step(self, t: int, resident: np.ndarray) -> np.ndarray | None:
        """Planned policies: the residency wanted for step ``t`` (None: unchanged)."""
        return None

    def on_access(self, t: int, i: int, experts: np.ndarray, hits: np.ndarray) -> None:
        """Demand policies: experts of layer ``i`` used at step ``t`` (hits[k]: experts[k] was resident)."""

    def admit(self, t: int, i: int, e: int, resident: np.ndarray, protect: set[tuple[int, int]], room: bool) -> bool:
        """Demand policies: whether to keep the missed expert (i, e) (``room``: it fits without evicting)."""
        return True

    def victim(self, resident: np.ndarray, protect: set[tuple[int, int]]) -> tuple[int, int] | None:
        """Demand policies: which resident expert to evict (never one in ``protect``)."""
        raise NotImplementedError

    def after_step(self, t: int, counts: np.ndarray, n_tokens: int) -> None:
        """Observe the step's counts (all layers) after it ran."""

    def describe(self) -> str:
        return self.name

    def stats(self) -> dict:
        return {}


def _fill(order: np.ndarray, size: np.ndarray, budget: int) -> np.ndarray:
    """Residency taking flat indices in ``order`` while they fit the budget."""
    x = np.zeros(size.shape, bool)
    used = 0
    flat_size = size.ravel()
    for k in order:
        s = int(flat_size[k])
        if used + s <= budget:
            x.flat[k] = True
            used += s
    return x


# --------------------------------------------------------------------------------------------------
# Planned policies


class NonePolicy(Policy):
    """Nothing in the fast tier: every expert is computed in (vram) or read from (flash) the slow tier."""

    name = "none"


class StaticPolicy(Policy):
    """A fixed placement from a routing profile (the integer program on the profile's mean utilities).

    ``profile`` is ``[T', L, E]`` counts of a profiling run; by default the replayed trace itself
    (an optimistic static placement: it knows the whole trace's frequencies).
    """

    name = "static"

    def __init__(self, profile: np.ndarray | None = None, profile_tokens: np.ndarray | None = None) -> None:
        self.profile = profile
        self.profile_tokens = profile_tokens

    def reset(self, setup: SimSetup) -> np.ndarray:
        super().reset(setup)
        counts = setup.counts if self.profile is None else self.profile
        tokens = setup.step_tokens if self.profile is None else self.profile_tokens
        if counts.shape[1:] != setup.shape:
            raise SpacError(f"the static profile has {counts.shape[1:]} (layers, experts), the trace {setup.shape}")
        u = counts.mean(axis=0) if len(counts) else np.zeros(setup.shape)
        tps = float(np.mean(tokens)) if tokens is not None and len(tokens) else 1.0
        costs = tier_costs(setup.tier, setup.cost, setup.layout, u, tps)
        prob = Problem.build(costs, setup.layout, setup.budget, None, horizon=1e12)
        self.plan = solve(prob, time_limit=5.0)
        return self.plan.x.copy()


class PinHotPolicy(Policy):
    """Pin the experts with the highest cumulative counts so far (per byte), re-ranked every ``every`` steps."""

    name = "pin"

    def __init__(self, every: int = 1) -> None:
        self.every = max(1, int(every))

    def reset(self, setup: SimSetup) -> np.ndarray:
        super().reset(setup)
        self.total = np.zeros(setup.shape, np.float64)
        self._t = 0
        return np.zeros(setup.shape, bool)

    def before_step(self, t: int, resident: np.ndarray) -> np.ndarray | None:
        if t == 0 or t % self.every:
            return None
        density = self.total / np.maximum(self.setup.size, 1)
        # ties (and zero counts) keep what is resident: no churn among equals
        key = density.ravel() + 1e-12 * resident.ravel()
        order = np.argsort(-key, kind="stable")
        order = order[self.total.ravel()[order] > 0]
        return _fill(order, self.setup.size, self.setup.budget)

    def after_step(self, t: int, counts: np.ndarray, n_tokens: int) -> None:
        self.total += counts


class SpacHysteresisPolicy(Policy):
    """MoE-SpAc's released rule: an integer state s in 0..5 per expert, updated from each window's counts c.

    ``c >= s + up`` raises s by one (up = 5), ``c < s`` lowers it by one. Experts with s above
    ``threshold`` are fetched; resident experts stay until the space is needed (lowest state evicted
    first, as MoE-SpAc's slot scores). MoE-SpAc counts over a verification batch of K+1 = 9 tokens, so
    steps are aggregated until ``window_tokens`` tokens were seen (or over ``window`` steps). The state
    machine is ``estimators.HysteresisEstimator``.
    """

    name = "spac"

    def __init__(self, top: int = 5, up: int = 5, threshold: int = 0, window_tokens: int = 9,
                 window: int | None = None) -> None:
        self.top, self.up, self.threshold = top, up, threshold
        self.window_tokens = window_tokens
        self.window = window

    def reset(self, setup: SimSetup) -> np.ndarray:
        super().reset(setup)
        self.hysteresis = HysteresisEstimator(*setup.shape, max_state=self.top, up_margin=self.up)
        self.acc = np.zeros(setup.shape, np.int64)
        self.acc_tokens = 0
        self._changed = False
        return np.zeros(setup.shape, bool)

    def after_step(self, t: int, counts: np.ndarray, n_tokens: int) -> None:
        self.acc += counts
        self.acc_tokens += n_tokens
        full = self.acc_tokens >= self.window_tokens if self.window is None else (t + 1) % self.window == 0
        if not full:
            return
        self.hysteresis.update(Observation(self.acc, self.acc_tokens))
        self.acc = np.zeros_like(self.acc)
        self.acc_tokens = 0
        self._changed = True

    @property
    def state(self) -> np.ndarray:
        return self.hysteresis.state

    def before_step(self, t: int, resident: np.ndarray) -> np.ndarray | None:
        if not self._changed:
            return None
        self._changed = False
        want = (self.state > self.threshold) | resident
        # rank: state, then already resident (no churn), then id
        key = self.state.ravel() * 2.0 + resident.ravel()
        order = np.argsort(-key, kind="stable")
        order = order[want.ravel()[order]]
        return _fill(order, self.setup.size, self.setup.budget)


class OursPolicy(Policy):
    """What the runtime tier does: its :class:`~spac_llamacpp.planning.placement.PlacementPlanner` (estimator ->
    ``Balancer`` through the re-planner) built from the tier's
    :class:`~spac_llamacpp.planning.placement_config.PlacementConfig`, planned synchronously.

    ``config`` defaults to the setup's (``setup.config``), else the tier's defaults; ``overrides`` change
    single fields (``estimator``, ``estimator_params``, ``replan_every``, ``horizon``, ...). As in the
    tier: a first residency from a uniform prior where the configuration plans one (flash; preloaded, not
    timed), the first step planned at once, later ones when the re-planner says so. A plan made after
    step t is applied ``1 + lag`` steps later (``lag`` models a background solve; 0: as the tier with
    ``background=False``). ``plans`` lists ``(t, residency)`` of every plan made.
    """

    name = "ours"

    def __init__(self, config: PlacementConfig | None = None, lag: int = 0, **overrides: Any) -> None:
        self.config, self.lag, self.overrides = config, int(lag), overrides

    def reset(self, setup: SimSetup) -> np.ndarray:
        super().reset(setup)
        base = self.config or setup.config or PlacementConfig.for_tier(setup.tier)
        if base.tier != setup.tier:
            raise SpacError(f"a {base.tier} placement configuration cannot plan the {setup.tier} tier")
        cfg = base.replace(**self.overrides, background=False)
        self._resident = np.zeros(setup.shape, bool)
        self.planner = PlacementPlanner(cfg, setup.layout, setup.cost, setup.budget,
                                        resident=lambda: self._resident.copy())
        self._queue: list[tuple[int, np.ndarray]] = []
        self.plans: list[tuple[int, np.ndarray]] = []
        first = self.planner.first_plan(None)
        if first is not None:
            self._resident = self._fit(first[0].x, first[1])
            self.plans.append((-1, self._resident.copy()))
        return self._resident.copy()

    def _fit(self, x: np.ndarray, utility: np.ndarray) -> np.ndarray:
        """vram: each layer group's planned experts within its slots, as the tier keeps them."""
        s = self.setup
        if s.n_slots is None or s.group_of_row is None:
            return np.asarray(x, bool).copy()
        return fit_groups(x, utility, s.n_slots, np.asarray(s.group_of_row))[0]

    def before_step(self, t: int, resident: np.ndarray) -> np.ndarray | None:
        self._resident = resident  # the residency the next plan starts from
        ready = [x for due, x in self._queue if due <= t]
        if not ready:
            return None
        self._queue = [(due, x) for due, x in self._queue if due > t]
        self._resident = ready[-1].copy()
        return ready[-1].copy()

    def after_step(self, t: int, counts: np.ndarray, n_tokens: int) -> None:
        self.planner.demand.update(counts, n_tokens)
        plan = self.planner.after_step(t + 1)
        if plan is not None:
            x = self._fit(plan.x, self.planner.demand.utility())
            self._queue.append((t + 1 + self.lag, x))
            self.plans.append((t, x.copy()))

    def describe(self) -> str:
        c = self.planner.config if hasattr(self, "planner") else (self.config or "tier defaults")
        return f"{self.name} ({c})"

    def stats(self) -> dict:
        s = self.planner.replanner.stats
        return {"solves": s.solves, "methods": dict(s.methods),
                "solve_ms_mean": 1e3 * float(np.mean(s.wall)) if s.wall else 0.0}


# --------------------------------------------------------------------------------------------------
# Demand caches


class LRUPolicy(Policy):
    """Least recently used, global over all layers; every miss is admitted."""

    name = "lru"
    demand = True

    def reset(self, setup: SimSetup) -> np.ndarray:
        super().reset(setup)
        self.order: OrderedDict[tuple[int, int], None] = OrderedDict()
        return np.zeros(setup.shape, bool)

    def on_access(self, t: int, i: int, experts: np.ndarray, hits: np.ndarray) -> None:
        for e in experts.tolist():
            key = (i, e)
            self.order[key] = None
            self.order.move_to_end(key)

    def victim(self, resident: np.ndarray, protect: set[tuple[int, int]]) -> tuple[int, int] | None:
        for key in self.order:
            if resident[key] and key not in protect:
                del self.order[key]
                return key
        return None


class LFUPolicy(Policy):
    """Least frequently used (cumulative activations; ties: least recent); every miss is admitted."""

    name = "lfu"
    demand = True

    def reset(self, setup: SimSetup) -> np.ndarray:
        super().reset(setup)
        self.freq = np.zeros(setup.shape, np.int64)
        self.last = np.full(setup.shape, -1, np.int64)
        self.heap: list[tuple[int, int, int, int]] = []
        self._clock = 0
        return np.zeros(setup.shape, bool)

    def on_access(self, t: int, i: int, experts: np.ndarray, hits: np.ndarray) -> None:
        for e in experts.tolist():
            self._clock += 1
            self.freq[i, e] += 1
            self.last[i, e] = self._clock
            heapq.heappush(self.heap, (int(self.freq[i, e]), self._clock, i, e))

    def victim(self, resident: np.ndarray, protect: set[tuple[int, int]]) -> tuple[int, int] | None:
        skipped = []
        found = None
        while self.heap:
            f, c, i, e = heapq.heappop(self.heap)
            if not resident[i, e] or f != self.freq[i, e] or c != self.last[i, e]:
                continue  # stale entry
            if (i, e) in protect:
                skipped.append((f, c, i, e))
                continue
            found = (i, e)
            break
        for item in skipped:
            heapq.heappush(self.heap, item)
        return found


class MinPolicy(Policy):
    """Belady's MIN for a demand cache (clairvoyant eviction): evict the expert used furthest in the
    future, and do not admit a miss used later than every resident expert (bypass). It starts with
    the experts first used, up to the budget. No demand cache gets more hits (equal expert sizes)."""

    name = "min"
    demand = True

    def reset(self, setup: SimSetup) -> np.ndarray:
        super().reset(setup)
        T, L, E = setup.counts.shape
        # access clock: (t, i) -> t * L + i; future[(i, e)] = clocks of its uses, next one last
        self.L = L
        self.future: dict[tuple[int, int], list[int]] = {}
        for t, i, e in np.argwhere(setup.counts > 0).tolist():  # sorted by t, i, e
            self.future.setdefault((i, e), []).append(t * L + i)
        for v in self.future.values():
            v.reverse()
        self.next_use = np.full(setup.shape, _NEVER, np.int64)
        for (i, e), v in self.future.items():
            self.next_use[i, e] = v[-1]
        self.heap: list[tuple[int, int, int]] = []
        first = sorted((v[-1], i, e) for (i, e), v in self.future.items())
        x = np.zeros(setup.shape, bool)
        used = 0
        for _, i, e in first:
            s = int(setup.size[i, e])
            if used + s <= setup.budget:
                x[i, e] = True
                used += s
                heapq.heappush(self.heap, (-int(self.next_use[i, e]), i, e))
        return x

    def _next_after(self, i: int, e: int, now: int) -> int:
        fut = self.future.get((i, e), [])
        for k in range(len(fut) - 1, -1, -1):
            if fut[k] > now:
                return fut[k]
        return _NEVER

    def on_access(self, t: int, i: int, experts: np.ndarray, hits: np.ndarray) -> None:
        now = t * self.L + i
        for e in experts.tolist():
            fut = self.future[(i, e)]
            while fut and fut[-1] <= now:
                fut.pop()
            nxt = fut[-1] if fut else _NEVER
            self.next_use[i, e] = nxt
            heapq.heappush(self.heap, (-int(nxt), i, e))

    def _top(self, resident: np.ndarray, protect: set[tuple[int, int]], pop: bool) -> tuple[int, int] | None:
        skipped = []
        found = None
        while self.heap:
            nn, i, e = self.heap[0]
            if not resident[i, e] or -nn != self.next_use[i, e]:
                heapq.heappop(self.heap)  # stale entry
                continue
            if (i, e) in protect:
                skipped.append(heapq.heappop(self.heap))
                continue
            found = (i, e)
            if pop:
                heapq.heappop(self.heap)
            break
        for item in skipped:
            heapq.heappush(self.heap, item)
        return found

    def admit(self, t: int, i: int, e: int, resident: np.ndarray, protect: set[tuple[int, int]], room: bool) -> bool:
        if room:
            return True
        v = self._top(resident, protect, pop=False)
        return v is not None and self._next_after(i, e, t * self.L + i) < self.next_use[v]

    def victim(self, resident: np.ndarray, protect: set[tuple[int, int]]) -> tuple[int, int] | None:
        return self._top(resident, protect, pop=True)


class BeladyPolicy(Policy):
    """Clairvoyant prefetching oracle: just before each step it loads the step's experts that are not
    resident, evicting those whose next use is furthest away (Belady's rule), and it starts with the
    experts first used. Every step's experts are resident whenever they fit, so with equal expert
    sizes no policy gets more hits, and it moves as few bytes as Belady's MIN; transfers are planned
    (background) ones."""

    name = "belady"

    def reset(self, setup: SimSetup) -> np.ndarray:
        super().reset(setup)
        T, L, E = setup.counts.shape
        self.L = L
        self.uses: dict[tuple[int, int], list[int]] = {}
        for t, i, e in np.argwhere(setup.counts > 0).tolist():
            self.uses.setdefault((i, e), []).append(t * L + i)
        for v in self.uses.values():
            v.reverse()
        self.next_use = np.full(setup.shape, _NEVER, np.int64)
        for (i, e), v in self.uses.items():
            self.next_use[i, e] = v[-1]
        nu = self.next_use.ravel()
        order = np.argsort(nu, kind="stable")
        return _fill(order[nu[order] < _NEVER], setup.size, setup.budget)

    def before_step(self, t: int, resident: np.ndarray) -> np.ndarray | None:
        need = self.setup.counts[t] > 0
        if not (need & ~resident).any():
            return None
        size, budget = self.setup.size, self.setup.budget
        x = resident.copy()
        used = int(size[x].sum())
        # needed experts in order of use (layer order); evict the furthest-used of the others
        for flat in np.flatnonzero(need.ravel() & ~resident.ravel()):
            i, e = divmod(int(flat), need.shape[1])
            s = int(size[i, e])
            while used + s > budget:
                cand = np.where(x & ~need, self.next_use, -1)
                v = int(np.argmax(cand))
                if cand.flat[v] < 0:
                    break
                x.flat[v] = False
                used -= int(size.flat[v])
            if used + s <= budget:
                x[i, e] = True
                used += s
        return x

    def after_step(self, t: int, counts: np.ndarray, n_tokens: int) -> None:
        for i, e in np.argwhere(counts > 0).tolist():
            fut = self.uses[(i, e)]
            fut.pop()
            self.next_use[i, e] = fut[-1] if fut else _NEVER


def make_policy(name: str, **kw: object) -> Policy:
    """A fresh policy by name (see :data:`POLICIES`)."""
    classes = {
        "none": NonePolicy,
        "static": StaticPolicy,
        "lru": LRUPolicy,
        "lfu": LFUPolicy,
        "pin": PinHotPolicy,
        "spac": SpacHysteresisPolicy,
        "ours": OursPolicy,
        "min": MinPolicy,
        "belady": BeladyPolicy,
    }
    if name not in classes:
        raise SpacError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return classes[name](**kw)  # type: ignore[arg-type]


__all__ = ["POLICIES", "Policy", "SimSetup", "make_policy"]
