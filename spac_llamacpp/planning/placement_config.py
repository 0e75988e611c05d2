"""How a tier plans, as one object: the runtime tiers and ``spac simulate --policy ours`` build from it.

A :class:`PlacementConfig` names the utility estimator, the balancer's solver and amortisation horizon,
when the re-planner re-plans, what it takes as tokens per step and whether a residency is planned before
the first step. :meth:`PlacementConfig.flash` and :meth:`PlacementConfig.vram` are the tiers' defaults
(``flash_options`` / ``vram_options`` override single fields); the simulator replays a trace with the
same configuration, so what it reports for ``ours`` is what the tier would do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from spac_llamacpp.base.errors import SpacError

VRAM_ESTIMATOR_PARAMS: Mapping[str, float] = {"w_next": 0.25, "w_fast": 1.0, "w_slow": 1.0, "beta_fast": 0.8}
"""The ``spac`` estimator's weights in the vram tier (:meth:`PlacementConfig.vram`)."""


@dataclass(frozen=True)
class PlacementConfig:
    """Estimator -> balancer -> re-planner settings of one tier.

    Attributes:
        tier: ``"flash"`` or ``"vram"``: the balancer's cost model (serial read-then-compute, or GPU and CPU
            in parallel).
        estimator: utility estimator name (``spac_llamacpp.planning.estimators.make_estimator``), with
            ``estimator_params`` (e.g. ``{"half_life": 8}`` for ``decayed-counts``).
        solver: balancer solver (``greedy`` / ``highs`` / ``cbc`` / ``auto``), ``time_limit`` seconds per plan.
        horizon: steps over which the balancer amortises a move (shorter: fewer swaps).
        replan_every: steps between periodic re-plans; ``drift``: relative L1 change of the utilities that
            triggers an earlier one.
        tokens_per_step: the balancer's tokens per step (for each expert's activation probability): None
            takes the estimator's running mean (k+1 with speculative decoding), a number fixes it.
        transfer_steps: vram only: copies of one plan must hide under this many steps of compute (None: no cap).
        initial_plan: plan a residency before the first step (from a profile when given, else from a uniform
            prior); the first step's routing then replaces an uninformed one at once. Without a profile and
            with this off, the first plan follows the first step.
        admit_demand: flash only: the experts a step read on demand (its misses) stay resident until the plan
            made after that step says which of them to keep, so the plan keeps any of them without a read
            (LRU's free admission); the ones it drops, and all of them when no plan follows the step, are
            evicted. The balancer sees them as resident (no load cost). In the vram tier a miss is computed on
            the CPU and brings nothing into the pool, so there is nothing to admit for free.
        layer_caps: each MoE layer's plan holds at most its equal share of the budget in whole experts
            (``planning.budgets.layer_capacities``, LRU's per-layer capacities). With layer admission a layer keeps
            the number of experts its plan gave it (a miss takes a planned expert's place): a plan made from one
            prompt's utilities can leave a layer with none (the benchmark model's last layer, at 12.5%), which
            then never hits.
        background: solve in the re-planner's background thread (False: synchronously at the step boundary,
            deterministic, what the simulator does; the flash default, since its plans are due after every step).
    """

    tier: str
    estimator: str = "spac"
    estimator_params: Mapping[str, float] = field(default_factory=dict)
    solver: str = "greedy"
    time_limit: float = 1.0
    horizon: float = 8.0
    replan_every: int = 16
    drift: float = 0.5
    tokens_per_step: float | None = None
    transfer_steps: float | None = None
    initial_plan: bool = True
    admit_demand: bool = False
    layer_caps: bool = False
    background: bool = True

    def __post_init__(self) -> None:
        if self.tier not in ("flash", "vram"):
            raise SpacError(f"unknown tier {self.tier!r}; choose 'flash' or 'vram'")
        if int(self.replan_every) < 1:
            raise SpacError(f"replan_every must be >= 1, not {self.replan_every}")
        if self.horizon <= 0:
            raise SpacError(f"horizon must be positive, not {self.horizon}")
        if self.admit_demand and self.tier != "flash":
            raise SpacError("admit_demand is a flash-tier option: a vram miss is computed on the CPU and loads nothing "
                            "into the pool")
        object.__setattr__(self, "estimator_params", dict(self.estimator_params))

    @classmethod
    def flash(cls, **overrides: Any) -> PlacementConfig:
        """The flash tier's defaults. A step's misses are admitted (``admit_demand``) by layer admission in their
        layers' hooks (``tiers/flash.py``; ours: predicted admission, the estimator's ranks after the step), so
        the plan is made after the first step, at the re-planner's first request and then every 64 steps: re-
        planned after every step, the balancer moved experts between layers on small utility differences (39.6
        prefetches per token on the benchmark model at 12.5% against LRU's 1.3, 0.73x its tok/s; docs/flash.md
        "Predicted admission"). Each layer's plan holds at most its equal share of the budget (``layer_caps``).
        A short amortisation horizon (4 steps): a prefetch is a read that competes with the demand loads. The
        mapping holds the whole file at load, so a first residency is planned at once (and trimmed to). Planned
        synchronously at the step boundary (``background=False``): a greedy plan costs about half a millisecond at
        the benchmark model's shape (28 x 64 experts), and a plan from a background thread is applied one step
        late."""
        return cls(tier="flash", horizon=4.0, initial_plan=True, replan_every=64, drift=0.0,
                   admit_demand=True, layer_caps=True, background=False).replace(**overrides)

    @classmethod
    def vram(cls, **overrides: Any) -> PlacementConfig:
        """The VRAM tier's defaults: a long horizon (a copy runs on the copy engine, beside the compute); the
        pool starts empty and the prompt's routing fills it. The estimator leans on smooth demand (fast and
        slow decayed averages) with a quarter weight of the next-step transitions: a copy costs as much as
        several CPU computations of a small expert, and the flash tier's sharp per-step prediction churns
        the pool (docs/utility.md, "Held-out evaluation")."""
        return cls(tier="vram", horizon=64.0, initial_plan=False,
                   estimator_params=VRAM_ESTIMATOR_PARAMS).replace(**overrides)

    @classmethod
    def for_tier(cls, tier: str, **overrides: Any) -> PlacementConfig:
        """The defaults of ``tier`` with ``overrides``."""
        if tier == "flash":
            return cls.flash(**overrides)
        if tier == "vram":
            return cls.vram(**overrides)
        raise SpacError(f"unknown tier {tier!r}; choose 'flash' or 'vram'")

    def replace(self, **overrides: Any) -> PlacementConfig:
        """A copy with some fields changed; an unknown field is a one-line SpacError. Another ``estimator``
        without ``estimator_params`` starts from that estimator's own defaults."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise SpacError(f"unknown placement option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                            f"choose from {', '.join(sorted(names - {'tier'}))}")
        if "tier" in overrides and overrides["tier"] != self.tier:
            raise SpacError(f"a {self.tier} configuration cannot become a {overrides['tier']} one")
        if overrides.get("estimator", self.estimator) != self.estimator and "estimator_params" not in overrides:
            overrides = {**overrides, "estimator_params": {}}  # parameters belong to the estimator they were for
        return dataclasses.replace(self, **overrides) if overrides else self

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["estimator_params"] = dict(self.estimator_params)
        return out
