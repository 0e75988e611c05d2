"""The planning half of a tier's control loop, shared by the runtime tiers and the simulator's ``ours`` policy.

A :class:`PlacementPlanner` is built from a :class:`~spac_llamacpp.planning.placement_config.PlacementConfig`,
the tier's expert layout, cost model and the bytes the plan may fill (``planning.budgets``). It owns the
utility estimator, the balancer and the re-planner. Its owner feeds the estimator after each step
(``planner.demand.update(...)``), then asks :meth:`PlacementPlanner.after_step` for the plan to apply now:

- step 1 without a warm start: planned synchronously at once (the prompt's routing replaces an
  uninformed start);
- later steps: offered to the re-planner (periodic or on drift), which solves in its background thread
  (or synchronously, ``background=False``); the newest finished plan not taken before is returned.

Nothing here moves an expert: the tier (or the simulator) applies the plan.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from spac_llamacpp.planning.balancer import Balancer, Plan
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

    def __init__(self, config: PlacementConfig, layout: ExpertLayout, cost: CostModel, budget: int, *,
                 resident: Callable[[], np.ndarray]) -> None:
        self.config = config
        self.layout = layout
        self.demand: UtilityEstimator = make_estimator(config.estimator, layout.n_layer, layout.n_expert,
                                                       **config.estimator_params)
        self.balancer = Balancer(layout, cost, config.tier, budget, solver=config.solver,
                                 time_limit=config.time_limit, horizon=config.horizon,
                                 transfer_steps=config.transfer_steps)
        self._resident = resident
        self._tokens_per_step = 1.0
        self.warm = False  # a residency was planned from a profile before the first step
        self.replanner = Replanner(self._plan, every=config.replan_every, drift=config.drift, resident=resident,
                                   background=config.background)

    @property
    def budget(self) -> int:
        return self.balancer.budget

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
        return self._plan(demand, None), demand

    def after_step(self, step: int) -> Plan | None:
        """After the estimator saw step ``step`` (1-based): the plan to apply now, if any."""
        u = self.demand.utility()
        self._snapshot_tokens_per_step()
        if step == 1 and not self.warm:
            # the first step (usually the prompt) replaces the uninformed start at once
            return self._plan(u, self._resident())
        self.replanner.submit(u, step)
        return self.replanner.take()

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self.replanner.wait_idle(timeout)

    def stats(self) -> dict[str, object]:
        s = self.replanner.stats
        return {"solves": s.solves, "failures": s.failures}

    def close(self) -> None:
        self.replanner.close()
