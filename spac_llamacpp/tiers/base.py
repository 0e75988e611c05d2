"""The control loop every tier runs; a tier only says how a plan becomes moves.

Per evaluation step (:meth:`TierController.on_step`, called from ``Llama.eval``)::

    step begins        tier hook (flash: release the experts the step had in use)
    observe            tier hook: what the step's routing says about the current residency (hits)
    learn              the step's counts -> the utility estimator       (the one place a tier feeds it)
    plan               the planner's after_step: ours (PlacementPlanner: at once after the first step, else the
                       re-planner) or a baseline policy's (planning/policies.py: lru, lfu, pin, hysteresis)
    move               the tier's moves from the old plan to the new one (abstract: flash reads and
                       evictions, vram slot copies and evictions)
    step ends          tier hook (flash: lookahead prefetch, residency check)

What is shared: the cost model (this machine's calibration unless given), the planner built from one
:class:`~spac_llamacpp.planning.placement_config.PlacementConfig` (estimator, balancer, re-planner: the
simulator's ``ours`` policy builds the same one) or, with ``policy=`` another than ``spac``, a baseline rule
of ``planning/policies.py`` behind the same interface (the simulator runs the same rules), the first plan
(synchronous, from a profile or a uniform prior), the common statistics, shutdown, and an optional per-step
record of what the tier saw and planned (``record=True``: the simulator-equals-runtime test replays it).
Every policy plans in the same bytes (the tier's budget, ``planning/budgets.py``) and its plans become
moves through the same :meth:`TierController._move`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from spac_llamacpp.base.threadclock import ThreadTimes, thread_times
from spac_llamacpp.gguf.info import MoEModelInfo
from spac_llamacpp.observe.profile import Profile, expected_demand
from spac_llamacpp.observe.routing import RoutingStep
from spac_llamacpp.planning.balancer import Plan
from spac_llamacpp.planning.calibration import machine_cost_model
from spac_llamacpp.planning.costmodel import CostModel, ExpertLayout
from spac_llamacpp.planning.estimators import Observation
from spac_llamacpp.planning.placement_config import PlacementConfig
from spac_llamacpp.planning.policies import DEFAULT_POLICY, check_policy, make_planner

log = logging.getLogger(__name__)

ProfileArg = str | os.PathLike[str] | Profile | None


LOOP_PHASES = ("observe", "learn", "plan", "move", "step_ends")


@dataclass
class TierCounters:
    steps: int = 0
    tokens: int = 0
    plans_applied: int = 0
    # decoding-thread seconds spent in each phase of on_step (LOOP_PHASES), summed over the steps
    loop_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOOP_PHASES, 0.0))
    # of which the decoding thread ran (its CPU seconds, system time included): the rest waited for a core or I/O
    loop_cpu_seconds: float = 0.0
    # llama.cpp's evaluations (Llama.eval around the model's eval), per kind ("decode": one token or a
    # verification of drafts; "prompt": any other)
    evals: dict[str, EvalTimes] = field(default_factory=lambda: {"prompt": EvalTimes(), "decode": EvalTimes()})


@dataclass
class EvalTimes:
    """Evaluations of one kind: tokens, wall seconds, seconds the decoding thread was blocked in them
    (base/threadclock.py; None where the kernel cannot tell), and seconds of the tier's reads for them
    (:meth:`TierController._read_seconds`, e.g. the flash tier's demand loads)."""

    count: int = 0
    tokens: int = 0
    seconds: float = 0.0
    blocked_seconds: float | None = 0.0
    read_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LoopOptions:
    """The shared loop's options, as a tier takes them (``flash_options`` / ``vram_options``).

    ``config``: the placement configuration (default: the tier's, :meth:`PlacementConfig.flash` /
    :meth:`PlacementConfig.vram`); any of its fields may also be given alone (``estimator``, ``solver``,
    ``replan_every``, ``drift``, ``horizon``, ``background``, ...) and overrides it. ``cost``: the cost
    model (default: this machine's cached calibration, else nominal costs). ``profile``: a saved routing
    profile (``spac profile``; a path or :class:`~spac_llamacpp.observe.profile.Profile`) to plan the
    first residency from. ``record``: keep a :class:`StepRecord` per step in ``records``. ``policy``: who
    plans (``planning.policies.POLICIES``: ``spac``, ours, the default, or a baseline: ``lru``, ``lfu``,
    ``pin``, ``hysteresis``), ``policy_params`` a baseline rule's keyword arguments.
    """

    config: PlacementConfig
    cost: CostModel | None = None
    profile: ProfileArg = None
    record: bool = False
    policy: str = DEFAULT_POLICY
    policy_params: dict[str, Any] | None = None

    @classmethod
    def parse(cls, default: PlacementConfig, config: PlacementConfig | None = None, cost: CostModel | None = None,
              profile: ProfileArg = None, record: bool = False, policy: str | None = None,
              policy_params: dict[str, Any] | None = None, **placement: Any) -> LoopOptions:
        """Unknown names are a one-line SpacError (checked before the tier sets anything up)."""
        name = check_policy(DEFAULT_POLICY if policy is None else policy)
        return cls((config or default).replace(**placement), cost, profile, bool(record), name,
                   dict(policy_params) if policy_params else None)


@dataclass(frozen=True)
class StepRecord:
    """One step as a tier saw it (``record=True``)."""

    step: int  # 1-based
    counts: np.ndarray  # [n_moe_layer, n_expert] tokens of the step routed to each expert
    n_tokens: int
    plan: np.ndarray | None  # the residency of the plan made after this step (None: no new plan)
    wanted: np.ndarray  # the residency the tier holds after the step's moves


class TierController(ABC):
    """The shared loop; subclasses implement :meth:`_move` and may override the step hooks.

    Subclasses set up their own machinery, then call :meth:`_start` last (inside a ``try`` that calls
    :meth:`close` on failure).
    """

    name: ClassVar[str] = ""
    counters: TierCounters

    def _start(self, info: MoEModelInfo, layout: ExpertLayout, plan_budget: int, options: LoopOptions) -> None:
        """Build the planner (``plan_budget`` bytes for experts) and apply the first plan, if any."""
        self.info = info
        self.layout = layout
        self.config = config = options.config
        self.rows = np.asarray(info.moe_layers, dtype=np.int64)
        self.sizes = layout.bytes_matrix
        if not hasattr(self, "wanted"):
            self.wanted = np.zeros((layout.n_layer, layout.n_expert), bool)
        self.cost = options.cost if options.cost is not None else machine_cost_model(info.path)
        self.records: list[StepRecord] | None = [] if options.record else None
        self.policy = options.policy
        self.planner = make_planner(options.policy, config, layout, self.cost, plan_budget,
                                    resident=lambda: self.wanted.copy(), params=options.policy_params)
        self.demand = self.planner.demand
        self.balancer = self.planner.balancer  # None for a baseline policy
        self.replanner = self.planner.replanner
        profile = options.profile
        prior = expected_demand(profile, info, layout.n_expert_used) if profile is not None else None
        first = self.planner.first_plan(prior)
        # the plan made before the first step (None: none), as made; ``records`` hold the later ones
        self.initial_plan: np.ndarray | None = None
        if first is not None:
            self.initial_plan = np.asarray(first[0].x, bool).copy()
            self._place(first[0], first[1], initial=True)

    @property
    def warm(self) -> bool:
        """Whether the first residency came from a profile."""
        return self.planner.warm

    # --- the per-step loop ------------------------------------------------------------------------
    _eval_start: tuple[ThreadTimes, float] | None = None

    def eval_begins(self) -> None:
        """``Llama.eval`` is about to run the model on the decoding thread (times it: ``eval_ends``)."""
        self._eval_start = (thread_times(), self._read_seconds())

    def eval_ends(self, n_tokens: int, decode: bool) -> float | None:
        """The model's evaluation of ``n_tokens`` tokens has returned (or raised); ``decode``: one token or a
        verification of drafts, else a prompt. Returns its wall seconds (None without ``eval_begins``)."""
        if self._eval_start is None:
            return None
        (start, read0), self._eval_start = self._eval_start, None
        now = thread_times()
        t = self.counters.evals["decode" if decode else "prompt"]
        t.count += 1
        t.tokens += int(n_tokens)
        t.seconds += now.wall - start.wall
        t.read_seconds += self._read_seconds() - read0
        blocked = now.blocked_since(start)
        t.blocked_seconds = None if blocked is None or t.blocked_seconds is None else t.blocked_seconds + blocked
        return now.wall - start.wall

    def _read_seconds(self) -> float:
        """Seconds of reads the tier's evaluations caused so far (a running total; default none)."""
        return 0.0

    def on_step(self, step: RoutingStep | None, accepted_counts: np.ndarray | None = None) -> None:
        """After an evaluation step: observe, learn, re-plan, move.

        ``accepted_counts`` (``[block, expert]``, a verification step): the selections of the step's tokens
        on the true path (``estimators.Observation``); ``Llama`` calls this once the target has sampled them.
        """
        self._step_begins()
        if step is None:
            return
        c = self.counters
        c.steps += 1
        c.tokens += step.n_tokens
        clock, spent = time.perf_counter, c.loop_seconds
        t0, cpu0 = clock(), time.thread_time()
        counts = step.counts[self.rows]
        self._observe(counts)
        t1 = clock()
        accepted = None if accepted_counts is None else accepted_counts[self.rows]
        self.demand.update(Observation(counts, step.n_tokens, accepted))  # the one place a tier feeds its estimator
        t2 = clock()
        plan = self.planner.after_step(c.steps, self._in_memory(counts))  # admitted where the config says
        t3 = clock()
        if plan is not None:
            self._place(plan, self.demand.utility())
        t4 = clock()
        self._step_ends(counts)
        t5 = clock()
        c.loop_cpu_seconds += time.thread_time() - cpu0
        for name, dt in zip(LOOP_PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            spent[name] += dt
        if self.records is not None:
            self.records.append(StepRecord(c.steps, counts.copy(), int(step.n_tokens),
                                           None if plan is None else np.asarray(plan.x, bool).copy(),
                                           self.wanted.copy()))

    def _place(self, plan: Plan, utility: np.ndarray, initial: bool = False) -> None:
        self.wanted = self._move(np.asarray(plan.x, bool), utility, initial)
        self.counters.plans_applied += 1

    @abstractmethod
    def _move(self, x: np.ndarray, utility: np.ndarray, initial: bool) -> np.ndarray:
        """Move from ``self.wanted`` to the plan ``x`` (hottest by ``utility`` first); returns the residency
        now wanted (``x``, or less where the tier could not place everything). ``initial``: before the first
        step."""

    def _step_begins(self) -> None:
        """Before anything else, also for a step without routing."""
        return None

    def check_source(self) -> None:
        """Raise a one-line SpacError when what the tier serves experts from has gone bad (the flash tier: the
        GGUF changed under its mapping); ``Llama.eval`` asks before and after every evaluation."""
        return None

    def _observe(self, counts: np.ndarray) -> None:
        """The step's counts, before the estimator and the plan see them."""
        return None

    def _step_ends(self, counts: np.ndarray) -> None:
        """After the moves."""
        return None

    def _in_memory(self, counts: np.ndarray) -> np.ndarray:
        """The step's experts that are in the fast tier after it, which a plan that admits demand may keep with no
        move (``PlacementPlanner.after_step``); default: every expert the step used."""
        return counts > 0

    # --- reporting and shutdown -------------------------------------------------------------------
    def stats(self, settle: float = 0.0) -> dict[str, Any]:
        """Common keys, then the tier's; ``settle`` seconds (any true value) to let queued moves finish first."""
        if settle:
            self._settle(settle)
        c = self.counters
        out: dict[str, Any] = {
            "tier": self.name,
            "policy": self.policy,
            "plan_budget_bytes": int(self.planner.budget),
            "planned_experts": int(self.wanted.sum()),
            "planned_bytes": int(self.sizes[self.wanted].sum()),
            "expert_bytes_total": int(self.layout.total_expert_bytes),
            "non_expert_bytes": int(self.info.non_expert_bytes),
            "steps": c.steps,
            "tokens": c.tokens,
            "plans_applied": c.plans_applied,
            "loop_seconds": dict(c.loop_seconds),  # decoding-thread time per phase of the loop, all steps
            "loop_cpu_seconds": c.loop_cpu_seconds,  # of which it ran on a core
            "replanner": self.planner.stats(),
            "placement": self.config.to_json(),
        }
        out.update(self._tier_stats())
        return out

    def _settle(self, seconds: float) -> None:
        """Wait for queued moves (``stats(settle=...)``)."""
        return None

    @abstractmethod
    def _tier_stats(self) -> dict[str, Any]:
        """The tier's own statistics."""

    def close(self) -> None:
        """Stop the re-planner, then the tier's machinery (idempotent; safe on a half-built tier)."""
        planner = getattr(self, "planner", None)
        if planner is not None:
            planner.close()
        self._release()

    @abstractmethod
    def _release(self) -> None:
        """Stop the tier's own machinery (idempotent; attributes may be missing on a half-built tier)."""
