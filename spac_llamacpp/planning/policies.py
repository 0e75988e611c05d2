"""Baseline placement policies: the one implementation of each, shared by the runtime tiers and ``spac simulate``.

A tier's loop (``tiers/base.py``) asks its planner after every step for the residency to hold now; the
planner is either ours (:class:`~spac_llamacpp.planning.placement.PlacementPlanner`: utility estimator,
balancer, re-planner; the policy ``spac``) or a :class:`PolicyPlanner` around one of the baseline rules
below, with the same interface (``demand.update(obs)``, ``first_plan(prior)``, ``after_step(step)``), so
the tier's moves (flash reads and evictions, vram slot copies) are the same code for every policy and
every policy gets the tier's one budget (``planning/budgets.py``: the bytes its plan may fill).

The rules (names for ``Llama(policy=)``, ``spac-run --policy``, ``scripts/bench_policies.py``):

- ``lru`` (:class:`LRUPolicy`): per-layer LRU admission of demand (llama.cpp PR #27861's VRAM expert
  cache): every expert a step selects is admitted; each MoE layer holds an equal share of the budget in
  whole experts (:func:`layer_capacities`); the least recently used expert of the layer is evicted. The
  cache is ``reference_caches.LRUCache``, the same as ``spac eval-utility``'s. Starts empty.
- ``lfu`` (:class:`LFUPolicy`): the same with use counts (``reference_caches.LFUCache``: steps that used
  the expert; ties: the more recent).
- ``pin`` (:class:`PinPolicy`): a static hot set that fills the budget (experts by demand per byte),
  from a routing profile when one is given, else from the counts of the first :data:`PIN_WARMUP_STEPS`
  steps; it never moves after.
- ``hysteresis`` (:class:`HysteresisPolicy`): MoE-SpAc's rule as its public llama.cpp fork runs it
  (``estimators.HysteresisEstimator``'s state machine, its queue and its slot scores; see the class).

Rules that admit demand (lru, lfu: :attr:`BaselinePolicy.admits_demand`) keep what a step loaded; the
others do not admit a miss: it is served from the slow tier (flash: read, then dropped after its layer;
vram: computed on the CPU) and only their plans load experts.

Arrays are ``[n_moe_layer, n_expert]``; an expert is the pair (i, e), i indexing MoE layers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.base.sizes import format_size
from spac_llamacpp.planning.balancer import Plan
from spac_llamacpp.planning.budgets import layer_capacities
from spac_llamacpp.planning.costmodel import CostModel, ExpertLayout
from spac_llamacpp.planning.estimators import (
    VOLUME_HALF_LIFE,
    DecayedMean,
    HysteresisEstimator,
    Observation,
    beta_of,
    predicts_next_step,
)
from spac_llamacpp.planning.placement import PlacementPlanner
from spac_llamacpp.planning.placement_config import PlacementConfig
from spac_llamacpp.planning.reference_caches import DemandCache, LFUCache, LRUCache

log = logging.getLogger(__name__)

DEFAULT_POLICY = "spac"
POLICIES = ("spac", "lru", "lfu", "pin", "hysteresis")
"""The runtime policies: ``spac`` (ours, the default) and the baselines."""

PIN_WARMUP_STEPS = 16
"""Steps whose counts choose ``pin``'s hot set when no profile is given."""


def check_policy(name: Any) -> str:
    """``name`` if it is a policy, else a one-line SpacError listing the choices."""
    if name not in POLICIES:
        raise SpacError(f"unknown placement policy {name!r}; choose one of {', '.join(POLICIES)}")
    return str(name)


def fill(order: np.ndarray, size: np.ndarray, budget: int) -> np.ndarray:
    """Residency taking the flat indices of ``order`` in turn while they fit ``budget`` bytes (one that does
    not fit is skipped, a smaller later one may still fit)."""
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
# The rules


class BaselinePolicy:
    """A rule that keeps a residency by itself: no utility estimate, no solver.

    It learns every step through :meth:`update` (the tier's one ``Observation`` per step: the
    :class:`~spac_llamacpp.planning.estimators.UtilityEstimator` protocol, so a tier feeds it where it
    feeds an estimator), holds the residency it wants in :attr:`resident`, and :meth:`take` hands a changed
    residency to whoever applies it. :meth:`utility` is its ranking (higher: hotter), which orders the
    moves (hottest first); it is not a demand in tokens.

    Args:
        size: ``[n_moe_layer, n_expert]`` bytes of each expert in the fast tier.
        budget: bytes the residency may fill (the tier's plan bytes).
    """

    name: ClassVar[str] = "baseline"
    admits_demand: ClassVar[bool] = False
    """Every expert a step used enters the residency (the flash tier then keeps its demand loads)."""
    admission: ClassVar[str] = "off"
    """The flash tier's layer admission that follows the rule (``tiers/flash.py``): ``always`` where every miss
    enters, ``rank`` where a miss enters over a lower-ranked entry only, ``off``."""
    uses_profile: ClassVar[bool] = False

    def __init__(self, size: np.ndarray, budget: int) -> None:
        self.size = np.asarray(size, dtype=np.int64)
        if self.size.ndim != 2:
            raise SpacError(f"expert sizes must be [layers, experts], not shape {self.size.shape}")
        self.shape = (int(self.size.shape[0]), int(self.size.shape[1]))
        self.budget = int(budget)
        self.resident = np.zeros(self.shape, bool)
        self.n_steps = 0
        self._changed = False
        self._tokens = DecayedMean((), beta_of(half_life=VOLUME_HALF_LIFE))

    # --- what the tier (or the simulator) calls -------------------------------------------------------
    def initial(self, prior: np.ndarray | None) -> np.ndarray | None:
        """The residency before the first step (None: none; the tier starts empty), from ``prior`` (a
        profile's expected demand) where the rule uses one."""
        return None

    def update(self, obs: Observation) -> None:
        """Learn from one evaluation step (its counts over all of its tokens)."""
        counts = np.asarray(obs.counts)
        if counts.shape != self.shape:
            raise SpacError(f"step counts have shape {counts.shape}, expected {self.shape}")
        self.n_steps += 1
        self._tokens.add(float(max(int(obs.n_tokens), 1)))
        new = self._step(counts, int(obs.n_tokens))
        if new is not None and not np.array_equal(new, self.resident):
            self.resident = np.asarray(new, bool).copy()
            self._changed = True

    def take(self) -> np.ndarray | None:
        """The residency wanted now if it changed since the last call, else None."""
        if not self._changed:
            return None
        self._changed = False
        return self.resident.copy()

    def utility(self) -> np.ndarray:
        """``[n_moe_layer, n_expert]`` the rule's ranking (higher: hotter; a fresh array)."""
        return np.asarray(self._rank(), dtype=np.float64).copy()

    @property
    def tokens_per_step(self) -> float:
        return max(1.0, float(self._tokens.value)) if self._tokens.seen else 1.0

    def stats(self) -> dict[str, Any]:
        return {}

    def describe(self) -> str:
        return self.name

    # --- what a rule implements -----------------------------------------------------------------------
    def _step(self, counts: np.ndarray, n_tokens: int) -> np.ndarray | None:
        """After a step: the residency wanted now (None: unchanged)."""
        raise NotImplementedError

    def _rank(self) -> np.ndarray:
        raise NotImplementedError

    def _set(self, x: np.ndarray) -> np.ndarray:
        """Make ``x`` the residency at once (an initial one)."""
        self.resident = np.asarray(x, bool).copy()
        self._changed = False
        return self.resident.copy()


class DemandCachePolicy(BaselinePolicy):
    """A per-layer demand cache of ``planning/reference_caches.py``: empty at the start, every step's
    experts may enter, each layer holds what :func:`layer_capacities` gives it out of the byte budget; after a
    step the residency is the cache's (``DemandCache.step``: the ``capacity`` best ranked of what it held
    and what the step used)."""

    admits_demand = True

    def __init__(self, size: np.ndarray, budget: int) -> None:
        super().__init__(size, budget)
        self.capacity = layer_capacities(self.size, self.budget)
        self.cache = self.make_cache(self.capacity)

    def make_cache(self, capacity: np.ndarray) -> DemandCache:
        raise NotImplementedError

    def _step(self, counts: np.ndarray, n_tokens: int) -> np.ndarray:
        self.cache.step(counts > 0)
        return self.cache.resident.copy()

    def _rank(self) -> np.ndarray:
        return getattr(self.cache, "last_use", np.zeros(self.shape))

    def describe(self) -> str:
        return f"{self.name} (per layer: {'/'.join(map(str, sorted(set(self.capacity.tolist()))))} experts)"


class LRUPolicy(DemandCachePolicy):
    """Per-layer least recently used admission of demand (llama.cpp PR #27861's design)."""

    name = "lru"
    admission = "always"  # a miss evicts the layer's least recently used entry

    def make_cache(self, capacity: np.ndarray) -> DemandCache:
        return LRUCache(*self.shape, capacity)


class LFUPolicy(DemandCachePolicy):
    """Per-layer least frequently used (steps that used the expert so far; ties: the more recent)."""

    name = "lfu"
    admission = "rank"  # a miss enters over a less used entry only

    def make_cache(self, capacity: np.ndarray) -> DemandCache:
        return LFUCache(*self.shape, capacity)

    def _rank(self) -> np.ndarray:
        return self.cache.uses  # type: ignore[attr-defined]


class PinPolicy(BaselinePolicy):
    """A static hot set: the experts with the most demand per byte that fill the budget, chosen once and never
    moved after. From ``prior`` (a routing profile's expected demand) before the first step when there is one,
    else from the summed counts of the first ``warmup_steps`` steps (until then nothing is planned: every
    expert a step uses is a miss served from the slow tier). The choice is logged."""

    name = "pin"
    uses_profile = True

    def __init__(self, size: np.ndarray, budget: int, warmup_steps: int = PIN_WARMUP_STEPS) -> None:
        super().__init__(size, budget)
        if int(warmup_steps) < 1:
            raise SpacError(f"pin: warmup_steps must be >= 1, not {warmup_steps}")
        self.warmup_steps = int(warmup_steps)
        self.total = np.zeros(self.shape, np.float64)
        self.fixed_at: int | None = None  # steps seen when the set was chosen (0: from a profile)
        self.source = ""

    def initial(self, prior: np.ndarray | None) -> np.ndarray | None:
        if prior is None:
            return None
        return self._set(self._choose(np.asarray(prior, np.float64), "the profile"))

    def _step(self, counts: np.ndarray, n_tokens: int) -> np.ndarray | None:
        if self.fixed_at is not None:
            return None
        self.total += counts
        if self.n_steps < self.warmup_steps:
            return None
        return self._choose(self.total, f"the counts of the first {self.n_steps} steps")

    def _choose(self, demand: np.ndarray, source: str) -> np.ndarray:
        if demand.shape != self.shape:
            raise SpacError(f"pin: the demand has shape {demand.shape}, expected {self.shape}")
        density = demand / np.maximum(self.size, 1)
        order = np.argsort(-density.ravel(), kind="stable")  # ties: layer, then expert order
        order = order[demand.ravel()[order] > 0]
        x = fill(order, self.size, self.budget)
        self.fixed_at, self.source = self.n_steps, source
        log.info("pin: hot set of %d experts (%s of %s) from %s, fixed from now on", int(x.sum()),
                 format_size(int(self.size[x].sum())), format_size(self.budget), source)
        return x

    def _rank(self) -> np.ndarray:
        return self.total

    def stats(self) -> dict[str, Any]:
        return {"pinned_experts": int(self.resident.sum()), "fixed_after_steps": self.fixed_at, "source": self.source}


class HysteresisPolicy(BaselinePolicy):
    """MoE-SpAc's rule, as its public llama.cpp fork (github.com/lshAlgorithm/MoE-SpAc, ``ggml-backend.cpp``)
    runs it.

    - **Utility:** an integer state s in 0..``max_state`` per expert (``estimators.HysteresisEstimator``),
      updated for every expert of every layer from each window's count c (tokens that selected it): up one
      when ``c - s >= up_margin``, down one when ``s - c >= 1``. The fork updates after every evaluation of
      a layer, i.e. per verification batch of K+1 = 9 tokens (``--draft 8``); here steps are gathered into
      windows of at least ``window_tokens`` tokens (or ``window`` steps), so that plain decoding and
      smaller drafts get the same windows (with one-token windows no count could ever reach 5).
    - **Admission:** after each window the experts with ``s >= threshold`` (the fork's constant 1) are
      queued, the highest state first (then layer and expert order, the fork's queue order); a queued
      expert already resident keeps its slot. A new one takes free space, else the slot of the resident
      expert with the lowest score below ``threshold`` (state 0: the fork's "evicted but still resident",
      lowest id first); when every resident expert scores ``>= threshold``, admission stops (the fork's
      prefetcher blocks until an eviction) and resumes at the next window.
    - An expert whose state fell to 0 stays resident (and serves hits) until its space is taken.

    Why it cannot use a large budget: an expert is admitted only after one window in which at least
    ``up_margin`` (5) of the window's tokens selected it, and stays while its count keeps up with its state.
    How many experts ever get there depends on the routing, not on the budget; once the budget holds all of
    them, more budget stays empty (the fork's balancer, which would lower the cutoff, is a TODO there: its
    threshold is the constant 1, and a state of 0 is never queued).
    """

    name = "hysteresis"

    def __init__(self, size: np.ndarray, budget: int, max_state: int = 5, up_margin: int = 5, threshold: int = 1,
                 window_tokens: int = 9, window: int | None = None) -> None:
        super().__init__(size, budget)
        if int(threshold) < 1:
            raise SpacError(f"hysteresis: threshold must be >= 1 (state 0 is never queued), not {threshold}")
        self.threshold = int(threshold)
        self.window_tokens = int(window_tokens)
        self.window = None if window is None else int(window)
        self.machine = HysteresisEstimator(*self.shape, max_state=max_state, up_margin=up_margin)
        self.acc = np.zeros(self.shape, np.int64)
        self.acc_tokens = 0
        self.acc_steps = 0
        self.windows = 0
        self.blocked = 0  # windows whose admissions stopped for want of a victim

    @property
    def state(self) -> np.ndarray:
        return self.machine.state

    def _step(self, counts: np.ndarray, n_tokens: int) -> np.ndarray | None:
        self.acc += np.asarray(counts, np.int64)
        self.acc_tokens += n_tokens
        self.acc_steps += 1
        full = self.acc_tokens >= self.window_tokens if self.window is None else self.acc_steps >= self.window
        if not full:
            return None
        self.machine.update(Observation(self.acc, self.acc_tokens))
        self.acc = np.zeros_like(self.acc)
        self.acc_tokens = self.acc_steps = 0
        self.windows += 1
        return self._admit()

    def _admit(self) -> np.ndarray:
        s = self.machine.state
        x = self.resident.copy()
        flat_size = self.size.ravel()
        used = int(flat_size[x.ravel()].sum())
        ids = np.arange(x.size)
        queued = ids[((s >= self.threshold) & ~x).ravel()]
        queued = queued[np.argsort(-s.ravel()[queued], kind="stable")]
        # victims: resident, scoring below the threshold; lowest state, then lowest id
        victims = ids[(x & (s < self.threshold)).ravel()]
        victims = list(victims[np.argsort(s.ravel()[victims], kind="stable")][::-1])  # pop() takes the first
        for k in queued:
            need = int(flat_size[k])
            while used + need > self.budget and victims:
                v = victims.pop()
                x.flat[v] = False
                used -= int(flat_size[v])
            if used + need > self.budget:
                self.blocked += 1
                break
            x.flat[k] = True
            used += need
        return x

    def _rank(self) -> np.ndarray:
        return self.machine.state

    def stats(self) -> dict[str, Any]:
        return {"windows": self.windows, "blocked_windows": self.blocked,
                "hot_experts": int((self.machine.state >= self.threshold).sum())}


RULES: dict[str, type[BaselinePolicy]] = {cls.name: cls for cls in (LRUPolicy, LFUPolicy, PinPolicy, HysteresisPolicy)}
"""The baseline rules by name."""


def make_rule(name: str, size: np.ndarray, budget: int, **params: Any) -> BaselinePolicy:
    """A baseline rule by name (``lru``, ``lfu``, ``pin``, ``hysteresis``); bad parameters are one line."""
    check_policy(name)
    if name not in RULES:
        raise SpacError(f"{name!r} is not a baseline rule; choose one of {', '.join(RULES)}")
    try:
        return RULES[name](size, budget, **params)
    except TypeError as exc:
        raise SpacError(f"policy {name!r}: {exc}") from None


# --------------------------------------------------------------------------------------------------
# The tiers' planner for a baseline rule


class PolicyPlanner:
    """A baseline rule behind the interface the tiers use of :class:`PlacementPlanner`: ``demand`` (fed once
    per step), ``first_plan``, ``after_step``, ``budget``, ``warm``, ``stats``, ``close``.

    ``config`` is the tier's placement configuration (kept for its statistics; a baseline uses none of
    its estimator, solver or re-planning fields)."""

    balancer = None
    replanner = None

    def __init__(self, rule: BaselinePolicy, config: PlacementConfig) -> None:
        self.rule = rule
        self.config = config
        self.demand = rule  # the tier's Observation per step goes to the rule
        self.warm = False
        self.admits_demand = rule.admits_demand

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def budget(self) -> int:
        return self.rule.budget

    def _plan(self, x: np.ndarray, step: int) -> Plan:
        return Plan(np.asarray(x, bool).copy(), 0.0, self.rule.name, "policy", step=step,
                    info={"bytes": int(self.rule.size[x].sum())})

    def first_plan(self, prior: np.ndarray | None = None) -> tuple[Plan, np.ndarray] | None:
        if prior is not None and not self.rule.uses_profile:
            log.warning("policy %s starts empty and does not use the profile", self.rule.name)
            prior = None
        x = self.rule.initial(prior)
        if x is None:
            return None
        self.warm = prior is not None
        return self._plan(x, 0), self.rule.utility()

    def after_step(self, step: int, used: np.ndarray | None = None) -> Plan | None:
        # ``used`` (the step's experts) is already in the rule's state: it saw the step's counts
        x = self.rule.take()
        if x is None and self.admits_demand:  # the tier's layer admission may have moved away from it in the step
            x = self.rule.resident.copy()
        return None if x is None else self._plan(x, step)

    def wait_idle(self, timeout: float | None = None) -> bool:
        return True

    def stats(self) -> dict[str, Any]:
        return {"solves": 0, "failures": 0, "policy": self.rule.describe(), **self.rule.stats()}

    def close(self) -> None:
        return None


ADMISSION_FLOORS = {"off": -np.inf, "always": np.inf, "rank": -np.inf, "predict": -np.inf}
"""The least rank a miss counts with in each layer admission (``tiers/flash.py``, ``planning/admission.py``):
``always`` admits every miss (LRU's rule); ``predict`` is ``rank`` with the ranks predicted at the hook."""

OUR_ADMISSION = "predict"
"""Ours' layer admission: a miss takes the place of the layer's planned expert that the estimator, having seen the
step, ranks lowest, when it ranks higher itself (the hook predicts those ranks from the step's selection:
``tiers/flash.py``, docs/flash.md "Predicted admission"); ``always`` (LRU's rule) with an estimator that has no
next-step model."""


def policy_admission(policy: str, config: PlacementConfig) -> str:
    """The flash tier's default layer admission for ``policy`` (``tiers/flash.py``), before its planner is built:
    ours :data:`OUR_ADMISSION` when ``config.admit_demand``, a baseline its rule's; ``off`` for a policy that does
    not admit demand."""
    check_policy(policy)
    if policy == DEFAULT_POLICY:
        if not config.admit_demand:
            return "off"
        return OUR_ADMISSION if predicts_next_step(config.estimator) else "always"
    rule = RULES[policy]
    return rule.admission if rule.admits_demand else "off"


def make_planner(policy: str, config: PlacementConfig, layout: ExpertLayout, cost: CostModel, budget: int, *,
                 resident: Callable[[], np.ndarray], params: dict[str, Any] | None = None,
                 ) -> PlacementPlanner | PolicyPlanner:
    """The planner of ``policy`` for a tier: ours (``spac``, :class:`PlacementPlanner` from ``config``) or a
    :class:`PolicyPlanner` around a baseline rule (``params``: its keyword arguments) with ``budget`` bytes.
    ``resident``: the residency the tier holds (ours plans from it; a baseline rule keeps its own, which the
    tier applies as made)."""
    check_policy(policy)
    if policy == DEFAULT_POLICY:
        if params:
            raise SpacError(f"policy 'spac' takes its options from the placement configuration, not policy_params "
                            f"({', '.join(sorted(params))})")
        return PlacementPlanner(config, layout, cost, budget, resident=resident)
    return PolicyPlanner(make_rule(policy, layout.bytes_matrix, budget, **(params or {})), config)


__all__ = [
    "ADMISSION_FLOORS",
    "DEFAULT_POLICY",
    "policy_admission",
    "PIN_WARMUP_STEPS",
    "POLICIES",
    "BaselinePolicy",
    "DemandCachePolicy",
    "HysteresisPolicy",
    "LFUPolicy",
    "LRUPolicy",
    "PinPolicy",
    "PolicyPlanner",
    "check_policy",
    "fill",
    "layer_capacities",
    "make_planner",
    "make_rule",
]
