"""The flash tier: routed experts stream from the memory-mapped GGUF under a RAM budget.

Per evaluation step, top to bottom:

1. routing (the sensor's step counts over the step's k+1 tokens) -> the utility estimator;
2. utility -> the balancer (in the re-planner's background thread) -> a plan: which experts are
   wanted resident, within ``budget`` minus a staging reserve;
3. plan -> moves: newly unwanted experts are evicted, newly wanted ones prefetched (hottest first),
   the hottest pinned (mlock, within ``pin_fraction`` of the budget);
4. lookahead: experts this step used that the plan does not hold are prefetched for the next step
   (within a reserve of one layer's worth of experts) and dropped again if unused;
5. measurement: resident expert bytes by ``mincore`` against the budget.

During the step the native engine, called from the routing sensor's graph callback, issues demand
readahead for selected experts that are not resident and evicts them again once their layer has
finished unless the plan wants them. The budget holds at step boundaries once queued evictions
have run; within a step, demand loads may use the staging reserve.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.base.sizes import format_size
from spac_llamacpp.gguf.info import MoEModelInfo
from spac_llamacpp.native.flash_engine import FlashEngine, covering_bytes, non_expert_ranges, page_size
from spac_llamacpp.native.mapping import FileMapping
from spac_llamacpp.native.sensor import RoutingSensor
from spac_llamacpp.observe.profile import Profile, expected_demand
from spac_llamacpp.observe.routing import RoutingStep
from spac_llamacpp.planning.balancer import Balancer, Plan, staging_bytes
from spac_llamacpp.planning.calibration import machine_cost_model
from spac_llamacpp.planning.costmodel import CostModel, ExpertLayout
from spac_llamacpp.planning.estimators import Observation, make_estimator
from spac_llamacpp.planning.reference_caches import hit_rate
from spac_llamacpp.planning.replanner import Replanner

log = logging.getLogger(__name__)


def page_layout(info: MoEModelInfo) -> ExpertLayout:
    """The model's expert layout with each tensor's share rounded out to whole pages (what residency costs).

    Non-expert bytes are 0: the flash budget counts routed experts only.
    """
    cov = covering_bytes(info)
    tensors = []
    for il in info.moe_layers:
        ts = [t for t in info.layer_tensors(il) if not t.is_chunk]
        total = sum(t.bytes_per_expert for t in ts)
        extra = int(cov[il].max()) - total  # page rounding of the whole expert, spread over its tensors
        tensors.append(tuple((t.ggml_type, t.bytes_per_expert + (extra if j == 0 else 0)) for j, t in enumerate(ts)))
    return ExpertLayout(tuple(info.moe_layers), info.n_expert, tuple(tensors),
                        tuple(info.n_expert_used[il] for il in info.moe_layers), 0, str(info.path))


def read_bytes_so_far() -> int:
    """Bytes this process caused to be read from storage (``/proc/self/io``), -1 if unavailable."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


@dataclass
class FlashCounters:
    steps: int = 0
    tokens: int = 0
    plans_applied: int = 0
    budget_checks: int = 0
    over_budget_checks: int = 0  # measured at a step boundary without waiting for queued evictions
    max_resident_at_check: int = 0
    refused_moves: int = 0  # queue full
    strays_evicted: int = 0
    lookahead_prefetches: int = 0
    lookahead_used: int = 0
    history: list[int] = field(default_factory=list)  # resident bytes at each check (bounded)


class FlashTier:
    """Keeps the routed experts resident in RAM within ``budget`` bytes, following the balancer.

    Args:
        info: model header.
        mapping: llama.cpp's mapping of the file.
        sensor: the model's routing sensor (the engine hooks into its callback).
        budget: bytes of RAM for routed experts (non-expert weights are counted separately).
        estimator: utility estimator name (see ``spac_llamacpp.planning.estimators.make_estimator``).
        solver: balancer solver (``greedy`` / ``highs`` / ``cbc`` / ``auto``).
        replan_every: steps between periodic re-plans; ``drift``: relative change of the utilities
            that triggers an earlier one.
        horizon: steps over which the balancer amortises a move (shorter: fewer swaps).
        threads: engine worker threads.
        pin_fraction: share of the budget locked with mlock for the hottest experts (0: no pinning).
        lock_non_experts: mlock the non-expert weights (attention, norms, routers, shared experts,
            embeddings), which every token reads: under memory pressure the kernel would otherwise
            evict them as readily as cold experts. Falls back (logged) when mlock is not permitted.
        lookahead: prefetch this step's unplanned experts for the next step.
        layer_ahead: as soon as layer l's output exists, apply the next MoE layer's pre-FFN norm and
            router to it and start reading the predicted experts that are not resident (decode steps
            only). Off by default: on the benchmark model it cut the wait for misses by a quarter but
            cost 5% decode speed overall (docs/flash.md).
        check_every: measure residency (and sweep strays) every this many steps (0: never; ``stats()``
            always measures). mincore over the expert tensors costs ~7 ms per 2 GiB of experts, 5-8% of a
            step at 8-10 tok/s, so not every step by default.
        cost: cost model (default: this machine's cached calibration, else nominal costs).
        background: plan in a background thread (False: synchronously, deterministic).
        profile: a saved routing profile (``spac profile``, a path or :class:`~spac_llamacpp.observe.profile.Profile`)
            to plan the first residency from, instead of from nothing and then the prompt.
    """

    def __init__(
        self,
        info: MoEModelInfo,
        mapping: FileMapping,
        sensor: RoutingSensor,
        budget: int,
        *,
        estimator: str = "spac",
        solver: str = "greedy",
        replan_every: int = 16,
        drift: float = 0.5,
        horizon: float = 8.0,
        threads: int = 2,
        pin_fraction: float = 0.0,
        lock_non_experts: bool = True,
        lookahead: bool = True,
        layer_ahead: bool = False,
        check_every: int = 4,
        cost: CostModel | None = None,
        background: bool = True,
        profile: str | os.PathLike[str] | Profile | None = None,
    ) -> None:
        self.info = info
        self.budget = int(budget)
        self.layout = page_layout(info)
        self.staging = staging_bytes(self.layout)
        self.lookahead_reserve = self.staging if lookahead else 0
        smallest = int(self.layout.expert_bytes.min())
        need = self.staging + self.lookahead_reserve + smallest
        if self.budget < need:
            raise SpacError(
                f"budget {format_size(self.budget)} is too small for the flash tier of {info.path.name}: it needs "
                f"{format_size(self.staging)} for one layer's on-demand experts"
                + (f", {format_size(self.lookahead_reserve)} for lookahead" if lookahead else "")
                + f" and {format_size(smallest)} for one resident expert; give at least {format_size(need)} "
                f"({need} bytes)"
            )
        if cost is None:
            cost = machine_cost_model(info.path)
        log.info("flash tier: budget %s, cost model %s", format_size(self.budget), cost.source or "given")
        # a short amortisation horizon makes the plan keep residents unless a swap clearly pays: each
        # move is a read that competes with the demand loads of the next steps
        self.balancer = Balancer(self.layout, cost, "flash", self.budget - self.lookahead_reserve, solver=solver,
                                 time_limit=1.0, horizon=horizon)
        self.rows = np.asarray(info.moe_layers, dtype=np.int64)
        shape = (len(self.rows), info.n_expert)
        self.sizes = self.layout.bytes_matrix
        self.demand = make_estimator(estimator, shape[0], shape[1])
        self.wanted = np.zeros(shape, bool)  # the plan (lookahead experts not included)
        self.pinned = np.zeros(shape, bool)
        self.look = np.zeros(shape, bool)
        self._just_dropped = np.zeros(shape, bool)  # evictions queued since the last budget check
        self.pin_budget = int(max(0.0, min(1.0, pin_fraction)) * self.balancer.budget)
        self.lookahead = lookahead
        self.check_every = int(check_every)
        self.counters = FlashCounters()
        # a tensor's edge pages are shared with other data and never evicted: not a stray
        n_tensors = np.array([len(ts) for ts in self.layout.tensors], dtype=np.int64)[:, None]
        self._stray_slack = 2 * page_size() * n_tensors
        self.read_bytes_at_start = read_bytes_so_far()

        self.engine = FlashEngine(info, mapping, threads=threads)
        self.non_expert_locked = 0
        try:
            if lock_non_experts:
                self._lock_non_experts()
            self.engine.attach(sensor)
            if layer_ahead:
                self._set_predictors()
            # llama.cpp populated the whole file at load: trim to an initial plan (from the profile, else
            # uniform; the prompt's routing then replaces the latter at once)
            self.warm = profile is not None
            first = self.balancer.plan(expected_demand(profile, info, self.layout.n_expert_used))
            self._apply(first, initial=True)
            self.replanner = Replanner(self.balancer.plan, every=replan_every, drift=drift,
                                       resident=lambda: self.wanted.copy(), background=background)
        except BaseException:
            self.engine.close()
            raise

    def _lock_non_experts(self) -> None:
        for offset, length in non_expert_ranges(self.info):
            rc = self.engine.lock_range(offset, length)
            if rc != 0:
                import os

                log.warning("flash tier: could not mlock the non-expert weights (%s); the kernel may evict them "
                            "under memory pressure (run as root or raise `ulimit -l`)", os.strerror(-rc))
                for done_off, done_len in non_expert_ranges(self.info):
                    if done_off >= offset:
                        break
                    self.engine.lock_range(done_off, done_len, lock=False)
                self.non_expert_locked = 0
                return
            self.non_expert_locked += length

    def _set_predictors(self) -> None:
        from spac_llamacpp.observe.lookahead import RouterSet

        try:
            routers = RouterSet.from_gguf(self.info)
        except SpacError as exc:
            log.warning("flash tier: no layer-ahead prefetch (%s)", exc)
            return
        for block in self.info.moe_layers:
            if block == 0:
                continue
            r = routers.routers[block]
            self.engine.set_predictor(block - 1, block, r.weight, r.norm, r.bias, r.sigmoid, r.k, routers.eps)

    # --- the per-step data path -------------------------------------------------------------------
    def on_step(self, step: RoutingStep | None, accepted_counts: np.ndarray | None = None) -> None:
        """After an evaluation step: release in-use experts, learn, re-plan, move, measure.

        ``accepted_counts`` (``[block, expert]``, a verification step): the selections of the step's tokens
        on the true path (``estimators.Observation``); ``Llama`` calls this once the target has sampled them.
        """
        self.engine.end_step()
        if step is None:
            return
        c = self.counters
        c.steps += 1
        c.tokens += step.n_tokens
        counts = step.counts[self.rows]
        if self.look.any():
            c.lookahead_used += int((self.look & (counts > 0)).sum())
        accepted = None if accepted_counts is None else accepted_counts[self.rows]
        self.demand.update(Observation(counts, step.n_tokens, accepted))
        if c.steps == 1 and not self.warm:
            # the first step (usually the prompt) replaces the uninformed initial plan at once
            plan = self.balancer.plan(self.demand.utility(), self.wanted)
        else:
            self.replanner.submit(self.demand.utility(), c.steps)
            plan = self.replanner.take()
        if plan is not None:
            self._apply(plan)
        if self.lookahead:
            self._prefetch_next(counts)
        if self.check_every and c.steps % self.check_every == 0:
            self._check_budget(used=counts > 0)

    def _apply(self, plan: Plan, initial: bool = False) -> None:
        x = np.asarray(plan.x, bool)
        drop = (self.wanted | initial) & ~x & ~self.look
        add = x & ~self.wanted
        u = self.demand.utility()
        for i, e in zip(*np.nonzero(drop), strict=True):
            self.engine.set_wanted(self.rows[i], e, False)
            self._submit("evict", i, e)
        self._just_dropped |= drop
        self.pinned &= x
        order = np.argsort(-u[add], kind="stable")
        for i, e in np.transpose(np.nonzero(add))[order]:
            self.engine.set_wanted(self.rows[i], e, True)
            self._submit("prefetch", i, e)
        self.wanted = x
        self.look &= ~x
        self.counters.plans_applied += 1
        if self.pin_budget > 0:
            self._repin(u)

    def _repin(self, u: np.ndarray) -> None:
        idx = np.argsort(-np.where(self.wanted, u, -np.inf), axis=None, kind="stable")
        sizes = self.sizes.ravel()[idx]
        keep = idx[(np.cumsum(sizes) <= self.pin_budget) & self.wanted.ravel()[idx]]
        target = np.zeros(self.wanted.size, bool)
        target[keep] = True
        target = target.reshape(self.wanted.shape)
        for i, e in zip(*np.nonzero(target & ~self.pinned), strict=True):
            self._submit("pin", i, e)
        for i, e in zip(*np.nonzero(self.pinned & ~target), strict=True):
            self._submit("unpin", i, e)
        self.pinned = target

    def _prefetch_next(self, counts: np.ndarray) -> None:
        """Prefetch the experts this step used that the plan does not hold (they are likely used again)."""
        candidates = (counts > 0) & ~self.wanted
        order = np.argsort(-counts, axis=None, kind="stable")
        flat = candidates.ravel()[order]
        picked = order[flat][np.cumsum(self.sizes.ravel()[order][flat]) <= self.lookahead_reserve]
        new = np.zeros(self.wanted.size, bool)
        new[picked] = True
        new = new.reshape(self.wanted.shape)
        gone = self.look & ~new & ~self.wanted
        for i, e in zip(*np.nonzero(gone), strict=True):
            self.engine.set_wanted(self.rows[i], e, False)
            self._submit("evict", i, e)
        self._just_dropped |= gone
        for i, e in zip(*np.nonzero(new & ~self.look), strict=True):
            self.engine.set_wanted(self.rows[i], e, True)
            self._submit("prefetch", i, e)
            self.counters.lookahead_prefetches += 1
        self.look = new

    def _submit(self, op: str, i: int, e: int) -> None:
        if not self.engine.submit(op, int(self.rows[i]), int(e)):
            self.counters.refused_moves += 1

    def _check_budget(self, used: np.ndarray | None = None) -> int:
        """Measure residency; evict strays (resident, yet neither planned nor looked ahead).

        Strays come from races the engine cannot see (a plan's eviction running just before a layer
        faults the expert back in) and from pages the kernel read on its own.
        """
        resident, frac = self.residency()
        c = self.counters
        # not strays (yet): experts whose eviction was queued since the last check, by the plan or (for
        # the experts this step used) by the engine after their layer
        stray = (frac * self.sizes > self._stray_slack) & ~self.wanted & ~self.look & ~self._just_dropped
        if used is not None:
            stray &= ~used
        for i, e in zip(*np.nonzero(stray), strict=True):
            self._submit("evict", i, e)
        c.strays_evicted += int(stray.sum())
        self._just_dropped[:] = False
        c.budget_checks += 1
        c.max_resident_at_check = max(c.max_resident_at_check, resident)
        if resident > self.budget:
            c.over_budget_checks += 1
        if len(c.history) < 100_000:
            c.history.append(resident)
        return resident

    # --- reporting --------------------------------------------------------------------------------
    def residency(self) -> tuple[int, np.ndarray]:
        """(resident expert bytes, ``[n_moe_layer, n_expert]`` resident fraction), measured now."""
        total, frac = self.engine.residency(per_expert=True)
        assert frac is not None
        return total, frac[self.rows]

    def stats(self, settle: float = 0.0) -> dict[str, Any]:
        """Budget, measured residency and counters; ``settle`` seconds to wait for queued moves first."""
        if settle > 0:
            self.engine.wait_idle(settle)
        resident, frac = self.residency()
        eng = self.engine.stats()
        c = self.counters
        looked = eng["demand_hits"] + eng["demand_misses"]
        rb = read_bytes_so_far()
        return {
            "tier": "flash",
            "budget_bytes": self.budget,
            "resident_expert_bytes": resident,
            "resident_experts": int((frac > 0.5).sum()),
            "planned_experts": int(self.wanted.sum()),
            "planned_bytes": int(self.sizes[self.wanted].sum()),
            "pinned_experts": int(self.pinned.sum()),
            "expert_bytes_total": int(self.layout.total_expert_bytes),
            "non_expert_bytes": int(self.info.non_expert_bytes),
            "non_expert_locked_bytes": self.non_expert_locked,
            "staging_bytes": self.staging,
            "lookahead_reserve_bytes": self.lookahead_reserve,
            "hit_rate": hit_rate(eng["demand_hits"], looked),  # per layer evaluation: docs/hit_rate.md
            "steps": c.steps,
            "tokens": c.tokens,
            "plans_applied": c.plans_applied,
            "budget_checks": c.budget_checks,
            "over_budget_checks": c.over_budget_checks,
            "max_resident_at_check": c.max_resident_at_check,
            "lookahead_prefetches": c.lookahead_prefetches,
            "lookahead_used": c.lookahead_used,
            "refused_moves": c.refused_moves,
            "strays_evicted": c.strays_evicted,
            "read_bytes": rb - self.read_bytes_at_start if rb >= 0 and self.read_bytes_at_start >= 0 else None,
            "engine": eng,
            "engine_errors": self.engine.errors(),  # {kind: {count, errno, message}}, each kind logged once
            "replanner": {"solves": self.replanner.stats.solves, "failures": self.replanner.stats.failures},
        }

    def close(self) -> None:
        """Stop the re-planner and the engine's threads (idempotent)."""
        replanner = getattr(self, "replanner", None)
        if replanner is not None:
            replanner.close()
        self.engine.close()
