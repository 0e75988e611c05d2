"""Expert placement policies, replayed by the simulator (``simulator.py``).

Two kinds:

- *planned* policies choose the fast-tier set before each step (:meth:`Policy.before_step`); what they
  add is a background transfer, misses are served from the slow tier and not admitted:
  ``none``, ``static`` (profile), ``pin`` (a hot set fixed after 16 steps), ``hysteresis`` (MoE-SpAc's
  rule), ``ours`` (utility estimate -> integer program; also called ``spac``, its runtime name);
- *demand* caches (:class:`DemandPolicy`) are the per-layer reference caches of
  ``planning/reference_caches.py``, the same as ``spac eval-utility``'s: empty at the start, a step's
  misses may enter after it, each keeps by its rule (:meth:`DemandPolicy.demand_step`): ``lru``,
  ``lfu``, ``min`` (Belady's MIN: clairvoyant eviction and bypass);

``lru``, ``lfu``, ``pin`` and ``hysteresis`` are the rules of ``planning/policies.py``, which the runtime
tiers run (``Llama(policy=...)``); ``ours`` is the tiers' ``PlacementPlanner``.
- ``belady``: the clairvoyant prefetching oracle (experts needed soonest are resident): the hit-rate bound.

Arrays are ``[n_moe_layer, n_expert]``; an expert id is the pair (i, e), i indexing MoE layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.planning.admission import admit_step, predicted_ranks
from spac_llamacpp.planning.balancer import Problem, solve, tier_costs
from spac_llamacpp.planning.budgets import fit_groups
from spac_llamacpp.planning.costmodel import CostModel, ExpertLayout
from spac_llamacpp.planning.estimators import Observation
from spac_llamacpp.planning.placement import PlacementPlanner
from spac_llamacpp.planning.placement_config import PlacementConfig
from spac_llamacpp.planning.policies import (
    ADMISSION_FLOORS,
    DEFAULT_POLICY,
    DemandCachePolicy,
    fill,
    layer_capacities,
    make_rule,
    policy_admission,
)
from spac_llamacpp.planning.reference_caches import NEVER, DemandCache, MinCache, NextUse

log = logging.getLogger(__name__)

POLICIES = ("none", "static", "lru", "lfu", "pin", "hysteresis", "ours", "min", "belady")
ALIASES = {"spac": "ours"}
"""Other accepted names: ``spac`` is the runtime's name of ours (``Llama(policy="spac")``)."""


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
    demand = False  # True: a demand cache (``demand_step`` after each step)
    admits_demand = False  # planned policies: a step's misses stay resident until the next plan (flash)

    def reset(self, setup: SimSetup) -> np.ndarray:
        """Start a replay; returns the initial residency (loaded before the first step, not timed)."""
        self.setup = setup
        return np.zeros(setup.shape, bool)

    def before_step(self, t: int, resident: np.ndarray) -> np.ndarray | None:
        """Planned policies: the residency wanted for step ``t`` (None: unchanged)."""
        return None

    def demand_step(self, t: int, need: np.ndarray) -> np.ndarray:
        """Demand policies: after step ``t`` (activations ``need`` [L, E]), the residency kept: a
        subset of the residency before it and ``need`` (only misses enter)."""
        raise NotImplementedError

    def admit(self, t: int, need: np.ndarray, resident: np.ndarray) -> np.ndarray | None:
        """Planned policies with layer admission (flash): the residency after step ``t``'s layers took their
        misses in (``planning/admission.py``, the engine's rule; None: no admission, the simulator's
        ``admits_demand`` rule applies). Called after the step ran, before :meth:`after_step`."""
        return None

    def after_step(self, t: int, counts: np.ndarray, n_tokens: int) -> None:
        """Observe the step's counts (all layers) after it ran."""

    def describe(self) -> str:
        return self.name

    def stats(self) -> dict:
        return {}


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


class RulePolicy(Policy):
    """A baseline rule of ``planning/policies.py`` (the one implementation the runtime tiers run too) as a
    planned policy: it learns each step after it ran (:meth:`after_step`), and what it then wants is loaded
    (background transfers) before the next step (:meth:`before_step`); its misses are not admitted.
    ``plans`` lists ``(t, residency)`` after every step."""

    rule_name = ""

    def __init__(self, **params: Any) -> None:
        self.params = params

    def reset(self, setup: SimSetup) -> np.ndarray:
        super().reset(setup)
        self.rule = make_rule(self.rule_name, setup.size, setup.budget, **self.params)
        self.plans: list[tuple[int, np.ndarray]] = []  # (t, the residency wanted after step t)
        first = self.rule.initial(None)
        return np.zeros(setup.shape, bool) if first is None else first

    def before_step(self, t: int, resident: np.ndarray) -> np.ndarray | None:
        return self.rule.take()

    def after_step(self, t: int, counts: np.ndarray, n_tokens: int) -> None:
        self.rule.update(Observation(counts, n_tokens))
        self.plans.append((t, self.rule.resident.copy()))

    def describe(self) -> str:
        return self.rule.describe() if hasattr(self, "rule") else self.name

    def stats(self) -> dict:
        return self.rule.stats() if hasattr(self, "rule") else {}


class PinHotPolicy(RulePolicy):
    """``planning.policies.PinPolicy``: the experts with the most counts per byte in the first 16 steps
    (``warmup_steps``), fixed from then on."""

    name = rule_name = "pin"


class HysteresisPolicy(RulePolicy):
    """``planning.policies.HysteresisPolicy``: MoE-SpAc's released rule (integer state 0..5 per expert,
    windows of 9 tokens, admission into free space or over state-0 residents only)."""

    name = rule_name = "hysteresis"

    @property
    def state(self) -> np.ndarray:
        return self.rule.state  # type: ignore[attr-defined]


class OursPolicy(Policy):
    """What the runtime tier does: its :class:`~spac_llamacpp.planning.placement.PlacementPlanner` (estimator ->
    ``Balancer`` through the re-planner) built from the tier's
    :class:`~spac_llamacpp.planning.placement_config.PlacementConfig`, planned synchronously.

    ``config`` defaults to the setup's (``setup.config``), else the tier's defaults; ``overrides`` change
    single fields (``estimator``, ``estimator_params``, ``replan_every``, ``horizon``, ...). As in the
    tier: a first residency from a uniform prior where the configuration plans one (flash; preloaded, not
    timed), the first step planned at once, later ones when the re-planner says so. A plan made after
    step t is applied ``1 + lag`` steps later (``lag`` models a background solve; 0: as the tier with
    ``background=False``). ``plans`` lists ``(t, residency)`` of every plan made. With the configuration's
    ``admit_demand`` (:attr:`admits_demand`, flash) a step's misses enter by the tier's layer admission
    (:meth:`admit`: ``admission``, default the tier's, ``planning.policies.policy_admission``; the engine's rule,
    ``planning/admission.py``) and the plan after the step starts from the residency that made; with
    ``admission="off"`` they stay resident until the next plan (the simulator keeps them without a charge: their
    read was the miss).
    """

    name = "ours"

    def __init__(self, config: PlacementConfig | None = None, lag: int = 0, admission: str | None = None,
                 **overrides: Any) -> None:
        self.config, self.lag, self.overrides = config, int(lag), overrides
        if admission is not None and admission not in ADMISSION_FLOORS:
            raise SpacError(f"admission must be one of {', '.join(ADMISSION_FLOORS)}, not {admission!r}")
        self._admission = admission

    def reset(self, setup: SimSetup) -> np.ndarray:
        super().reset(setup)
        base = self.config or setup.config or PlacementConfig.for_tier(setup.tier)
        if base.tier != setup.tier:
            raise SpacError(f"a {base.tier} placement configuration cannot plan the {setup.tier} tier")
        cfg = base.replace(**self.overrides, background=False)
        self._resident = np.zeros(setup.shape, bool)
        self.planner = PlacementPlanner(cfg, setup.layout, setup.cost, setup.budget,
                                        resident=lambda: self._resident.copy())
        self.admits_demand = self.planner.admits_demand
        # the flash tier's layer admission (tiers/flash.py): the engine's rule, replayed by planning/admission.py
        default = policy_admission(DEFAULT_POLICY, cfg)
        self.admission = "off" if setup.tier != "flash" or default == "off" else (self._admission or default)
        self.admitted = 0
        self._in_memory: np.ndarray | None = None
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
        # the residency the next plan starts from is the plan applied last (``resident`` may also hold the
        # previous step's admitted misses, which the simulator drops when no plan keeps them)
        ready = [x for due, x in self._queue if due <= t]
        if not ready:
            return None
        self._queue = [(due, x) for due, x in self._queue if due > t]
        self._resident = ready[-1].copy()
        return ready[-1].copy()

    def admit(self, t: int, need: np.ndarray, resident: np.ndarray) -> np.ndarray | None:
        if self.admission == "off" or (t == 0 and not self.planner.warm):
            return None  # (the first step of a cold start: the tier's prompt keep, which the plan after it replaces)
        est = self.planner.demand
        if self.admission == "predict":
            base, self_weight = est.next_step_model()  # type: ignore[attr-defined]
            layers, sources, rows = est.next_rows()  # type: ignore[attr-defined]
            table = np.zeros((*self.setup.shape, self.setup.shape[1]))
            table[layers, sources] = rows

            def ranks(i: int, selected: np.ndarray) -> np.ndarray:
                return predicted_ranks(base[i], self_weight, table[i], selected)
        else:
            utility = est.utility()

            def ranks(i: int, selected: np.ndarray) -> np.ndarray:
                return utility[i]
        held, n = admit_step(resident, need, ranks, ADMISSION_FLOORS[self.admission])
        self.admitted += n
        self._resident = held.copy()
        self._in_memory = need & held  # the misses not admitted were dropped after their layer
        return held

    def after_step(self, t: int, counts: np.ndarray, n_tokens: int) -> None:
        self.planner.demand.update(Observation(counts, n_tokens))
        used, self._in_memory = (counts > 0 if self._in_memory is None else self._in_memory), None
        plan = self.planner.after_step(t + 1, used)
        if plan is not None:
            x = self._fit(plan.x, self.planner.demand.utility())
            self._queue.append((t + 1 + self.lag, x))
            self.plans.append((t, x.copy()))

    def describe(self) -> str:
        c = self.planner.config if hasattr(self, "planner") else (self.config or "tier defaults")
        return f"{self.name} ({c})"

    def stats(self) -> dict:
        s = self.planner.replanner.stats
        return {"solves": s.solves, "methods": dict(s.methods), "solve_ms_mean": s.summary()["solve_ms_mean"],
                "admission": self.admission, "admitted": self.admitted}


# --------------------------------------------------------------------------------------------------
# Demand caches


class DemandPolicy(Policy):
    """A per-layer demand rule of ``planning/policies.py`` (``DemandCachePolicy``: the reference caches of
    ``planning/reference_caches.py``, the same as ``spac eval-utility``'s and the runtime tiers'): empty at the
    start, every step's misses may enter, each layer holds what :func:`layer_capacities` gives it out of the
    byte budget. ``plans`` lists ``(t, residency)`` after every step."""

    demand = True

    def new_rule(self, setup: SimSetup) -> DemandCachePolicy:
        rule = make_rule(self.name, setup.size, setup.budget)
        assert isinstance(rule, DemandCachePolicy)
        return rule

    def reset(self, setup: SimSetup) -> np.ndarray:
        super().reset(setup)
        self.rule = self.new_rule(setup)
        self.capacity = self.rule.capacity
        self.plans: list[tuple[int, np.ndarray]] = []
        return self.rule.resident.copy()

    def demand_step(self, t: int, need: np.ndarray) -> np.ndarray:
        """After step ``t`` (activations ``need`` [L, E]): the residency the cache keeps."""
        self.rule.update(Observation(np.asarray(need, np.int64), int(self.setup.step_tokens[t])))
        self.plans.append((t, self.rule.resident.copy()))
        return self.rule.resident

    def describe(self) -> str:
        return self.rule.describe() if hasattr(self, "rule") else self.name


class LRUPolicy(DemandPolicy):
    """Least recently used (``planning.policies.LRUPolicy``: ``reference_caches.LRUCache``), per layer."""

    name = "lru"


class LFUPolicy(DemandPolicy):
    """Least frequently used (``planning.policies.LFUPolicy``: ``reference_caches.LFUCache``: steps that used
    it; ties: the more recent), per layer."""

    name = "lfu"


class _MinRule(DemandCachePolicy):
    name = "min"

    def __init__(self, size: np.ndarray, budget: int, need: np.ndarray) -> None:
        self._need = need
        super().__init__(size, budget)

    def make_cache(self, capacity: np.ndarray) -> DemandCache:
        return MinCache(self._need, capacity)


class MinPolicy(DemandPolicy):
    """Belady's MIN for a demand cache (``reference_caches.MinCache``: clairvoyant eviction and bypass),
    per layer, starting empty: no demand cache of the same capacities gets more hits."""

    name = "min"

    def new_rule(self, setup: SimSetup) -> DemandCachePolicy:
        return _MinRule(setup.size, setup.budget, setup.counts > 0)


class BeladyPolicy(Policy):
    """Clairvoyant prefetching oracle: just before each step it loads the step's experts that are not
    resident, evicting those whose next use is furthest away (Belady's rule, the next uses of
    ``reference_caches.NextUse``), and it starts with the experts first used. Every step's experts are
    resident whenever they fit, so with equal expert sizes no policy gets more hits (planned ones
    included); transfers are planned (background) ones. Global over the layers (one byte budget)."""

    name = "belady"

    def reset(self, setup: SimSetup) -> np.ndarray:
        super().reset(setup)
        self.next = NextUse(setup.counts > 0)
        nu = self.next.now.ravel()
        order = np.argsort(nu, kind="stable")
        return fill(order[nu[order] < NEVER], setup.size, setup.budget)

    def before_step(self, t: int, resident: np.ndarray) -> np.ndarray | None:
        need = self.setup.counts[t] > 0
        if not (need & ~resident).any():
            return None
        size, budget = self.setup.size, self.setup.budget
        x = resident.copy()
        used = int(size[x].sum())
        next_use = self.next.now  # step t's own experts have next use t: never candidates below
        # needed experts in order of use (layer order); evict the furthest-used of the others
        for flat in np.flatnonzero(need.ravel() & ~resident.ravel()):
            i, e = divmod(int(flat), need.shape[1])
            s = int(size[i, e])
            while used + s > budget:
                cand = np.where(x & ~need, next_use, -1)
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
        self.next.advance()


def make_policy(name: str, **kw: object) -> Policy:
    """A fresh policy by name (see :data:`POLICIES` and :data:`ALIASES`)."""
    classes = {
        "none": NonePolicy,
        "static": StaticPolicy,
        "lru": LRUPolicy,
        "lfu": LFUPolicy,
        "pin": PinHotPolicy,
        "hysteresis": HysteresisPolicy,
        "ours": OursPolicy,
        "min": MinPolicy,
        "belady": BeladyPolicy,
    }
    name = ALIASES.get(name, name)
    if name not in classes:
        raise SpacError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)} (or spac: ours)")
    return classes[name](**kw)  # type: ignore[arg-type]


__all__ = ["ALIASES", "POLICIES", "Policy", "SimSetup", "layer_capacities", "make_policy"]
