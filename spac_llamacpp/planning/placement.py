"""The planning half of a tier's control loop, shared by the runtime tiers and the simulator's ``ours`` policy.

A :class:`PlacementPlanner` is built from a :class:`~spac_llamacpp.planning.placement_config.PlacementConfig`,
the tier's expert layout, cost model and the bytes the plan may fill (``planning.budgets``). It owns the
utility estimator, the balancer and the re-planner. Its owner feeds the estimator after each step
(``planner.demand.update(...)``), then asks :meth:`PlacementPlanner.after_step` for the plan to apply now:

- step 1 without a warm start: planned synchronously at once (the prompt's routing replaces an
  uninformed start);
- later steps: offered to the re-planner (periodic or on drift), which solves in its background thread
  (or synchronously, ``background=False``); the newest finished plan not taken before is returned.

With ``config.admit_demand`` (flash) the owner passes the step's used experts (``after_step(step,
used)``): the plan made after the step starts from the applied residency plus those (the misses were
read on demand and are still in memory), so keeping one costs no read; the owner evicts the ones the
plan leaves out, and all of them when no plan follows the step (:attr:`PlacementPlanner.admits_demand`).

Nothing here moves an expert: the tier (or the simulator) applies the plan.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from spac_llamacpp.planning.balancer import Balancer, Plan, Problem, tier_costs
from spac_llamacpp.planning.budgets import layer_capacities
from spac_llamacpp.planning.costmodel import CostModel, ExpertLayout
from spac_llamacpp.planning.estimators import UtilityEstimator, make_estimator
from spac_llamacpp.planning.placement_config import PlacementConfig
from spac_llamacpp.planning.replanner import Replanner


def uniform_demand(layout: ExpertLayout) -> np.ndarray:
    """``[n_moe_layer, n_expert]`` expected selections per token with no knowledge: k / E everywhere, less a
    tie-break of one part in 10^9 per expert id, so that a plan made from it spreads over the layers (experts
    0, 1, ... of every layer in turn) instead of filling the first layers (every expert ties; the flash
    tier's prompt keep then has planned experts to swap in every layer)."""
    n = max(layout.n_expert, 1)
    share = np.full((layout.n_layer, layout.n_expert), 1.0 / n) * (1.0 - 1e-9 * np.arange(layout.n_expert) / n)
    return share * np.asarray(layout.n_expert_used, dtype=np.float64)[:, None]


class PlacementPlanner:
    """Estimator, balancer and re-planner of one tier, built from one configuration.

    Args:
        config: the tier's placement configuration.
        layout: the expert layout the tier plans with (``planning.budgets.tier_layout``).
        cost: the cost model.
        budget: bytes the plan may fill (``FlashBudget.plan_bytes`` / ``VramBudget.pool_bytes``).
        resident: the residency the next plan starts from (the tier's applied plan).
    """

    name = "spac"  # the policy name (``planning/policies.py`` has the baselines behind the same interface)
    admits_demand = False  # a miss enters only when a plan places it

    def __init__(self, config: PlacementConfig, layout: ExpertLayout, cost: CostModel, budget: int, *,
                 resident: Callable[[], np.ndarray]) -> None:
        self.config = config
        self.layout = layout
        self.demand: UtilityEstimator = make_estimator(config.estimator, layout.n_layer, layout.n_expert,
                                                       **config.estimator_params)
        caps = layer_capacities(layout.bytes_matrix, budget) if config.layer_caps else None
        self.balancer = Balancer(layout, cost, config.tier, budget, solver=config.solver,
                                 time_limit=config.time_limit, horizon=config.horizon, max_per_layer=caps,
                                 transfer_steps=config.transfer_steps)
        self._resident = resident
        self.admits_demand = bool(config.admit_demand)
        self._admitted: np.ndarray | None = None  # the last step's used experts, while a plan from it is due
        self._tokens_per_step = 1.0
        self.warm = False  # a residency was planned from a profile before the first step
        # plans made outside the re-planner (the first plan, the first step's) and the steps between a
        # re-plan's request and the step its plan was taken at (0 when synchronous)
        self._direct = {"plans": 0, "seconds": 0.0, "cpu_seconds": 0.0}
        self._taken = {"plans": 0, "lag_steps": 0}
        self.replanner = Replanner(self._plan, every=config.replan_every, drift=config.drift,
                                   resident=self._plan_resident, background=config.background)

    @property
    def budget(self) -> int:
        return self.balancer.budget

    def _plan_resident(self) -> np.ndarray:
        """The residency a plan starts from: the applied one, plus the admitted demand loads."""
        r = np.asarray(self._resident(), bool)
        return r | self._admitted if self._admitted is not None else r

    def _plan(self, utility: np.ndarray, resident: np.ndarray | None, time_limit: float | None = None) -> Plan:
        # tokens per step as of the request (read by the solver thread; a float, set on the decoding thread)
        self.balancer.tokens_per_step = self._tokens_per_step
        return self.balancer.plan(utility, resident, time_limit)

    def _snapshot_tokens_per_step(self) -> None:
        tps = self.config.tokens_per_step
        self._tokens_per_step = float(self.demand.tokens_per_step if tps is None else tps)

    def first_plan(self, prior: np.ndarray | None = None) -> tuple[Plan, np.ndarray] | None:
        """The plan before the first step and the demand it was made from: from ``prior`` (a profile's
        expected demand; a warm start), else from a uniform prior when the configuration asks for an initial
        plan, else None."""
        if prior is None and not self.config.initial_plan:
            return None
        self.warm = prior is not None
        demand = np.asarray(prior, dtype=np.float64) if prior is not None else uniform_demand(self.layout)
        self._snapshot_tokens_per_step()
        return self._direct_plan(demand, None), demand

    def _direct_plan(self, utility: np.ndarray, resident: np.ndarray | None) -> Plan:
        plan = self._plan(utility, resident)
        d = self._direct
        d["plans"] += 1
        d["seconds"] += plan.seconds
        d["cpu_seconds"] += plan.cpu_seconds
        return plan

    def after_step(self, step: int, used: np.ndarray | None = None) -> Plan | None:
        """After the estimator saw step ``step`` (1-based): the plan to apply now, if any. ``used``
        (``[n_moe_layer, n_expert]``, > 0 where the step used the expert): with ``admits_demand``, these are in
        memory now and the plan may keep them without a read."""
        self._admitted = (np.asarray(used) > 0) if self.admits_demand and used is not None else None
        u = self.demand.utility()
        self._snapshot_tokens_per_step()
        if step == 1 and not self.warm:
            # the first step (usually the prompt) replaces the uninformed start at once
            return self._direct_plan(u, self._plan_resident())
        self.replanner.submit(u, step)
        plan = self.replanner.take()
        if plan is not None:
            self._taken["plans"] += 1
            self._taken["lag_steps"] += step - plan.step
        return plan

    def step_seconds(self, n_tokens: Sequence[int]) -> list[float]:
        """Modelled expert seconds of one evaluation of each ``n`` in ``n_tokens`` tokens at the applied
        residency: the estimator's per-token demand scaled to n tokens, each expert used with probability
        ``1 - (1 - q)**n`` (tokens routed independently: an upper bound on the union of a verify batch, whose
        tokens share experts more than that) and costed as the balancer costs it (flash: compute, plus the read
        of a miss; vram: the per-layer max of GPU and CPU parts). The draft length controller's step cost
        (``speculation.drafts.AdaptiveDraftLength``): more tokens per step bring more distinct experts."""
        tps = max(float(self.demand.tokens_per_step), 1.0)
        per_token = np.asarray(self.demand.utility(), np.float64) / tps
        if not per_token.any():  # nothing learnt yet: every expert equally likely
            per_token = uniform_demand(self.layout)
        resident = np.asarray(self._resident(), bool)
        out = []
        for n in n_tokens:
            n = max(int(n), 1)
            costs = tier_costs(self.config.tier, self.balancer.cost, self.layout, per_token * n, n)
            out.append(Problem.build(costs, self.layout, self.budget, resident).step_time(resident))
        return out

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self.replanner.wait_idle(timeout)

    def stats(self) -> dict[str, object]:
        """The re-planner's solves (counts, wall and CPU seconds in all, per solve), the plans made outside it
        (``direct_*``: before and after the first step, on the decoding thread) and ``lag_steps_mean``: steps
        between a re-plan's request and the step its plan was applied after (0 when synchronous)."""
        d, t = self._direct, self._taken
        return {**self.replanner.stats.summary(), "background": self.replanner.background,
                "direct_plans": d["plans"], "direct_seconds": d["seconds"], "direct_cpu_seconds": d["cpu_seconds"],
                "plans_taken": t["plans"], "lag_steps_mean": t["lag_steps"] / t["plans"] if t["plans"] else 0.0}

    def close(self) -> None:
        self.replanner.close()
