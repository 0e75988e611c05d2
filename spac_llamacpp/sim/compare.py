"""Ours next to LRU and MIN at shares of the experts: ``spac eval-utility``'s hit rate and ``spac simulate``'s time.

For one trace and each share s of the experts (12.5%, 25%, 50% by default), two measurements:

- **prefetch hit rate** (``spac eval-utility``, ``sim/utility_eval.py``): before each step keep the top
  ``N = round(s x experts per layer)`` experts of every MoE layer by the ``spac`` estimator's utility, against
  the shared per-layer LRU and Belady MIN demand caches of N experts;
- **modelled time** (``spac simulate``, ``sim/simulator.py``) in one tier (flash by default): ``ours`` (the
  tier's own planning loop with its default :class:`~spac_llamacpp.planning.placement_config.PlacementConfig`),
  ``lru`` and ``min`` in the same bytes. The budget is given so that the plan holds ``s`` of the routed expert
  bytes: flash, that share plus the tier's reserves (``planning.budgets.flash_budget_for_plan``);
  vram, the pool is that share (``budgets.vram_budget_for_pool`` with a model; without one the budget is the
  pool).

``ratio`` is ours / LRU (modelled time; below 1 is faster).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.base.sizes import format_size
from spac_llamacpp.gguf.info import MoEModelInfo
from spac_llamacpp.observe.trace import RoutingTrace
from spac_llamacpp.planning import budgets
from spac_llamacpp.planning.costmodel import CostModel, ExpertLayout
from spac_llamacpp.sim import utility_eval
from spac_llamacpp.sim.simulator import make_setup, simulate

DEFAULT_SHARES = (0.125, 0.25, 0.5)
POLICIES = ("ours", "lru", "min")


@dataclass
class ShareRow:
    """One trace at one share of the experts."""

    trace: str
    share: float
    experts_per_layer: int  # eval-utility's N
    budget: int  # the tier budget given to the simulator
    plan_bytes: int  # what its plan (and every policy) fills
    eu_hit: dict[str, float]  # eval-utility hit rate: spac (ours), lru, min
    sim_hit: dict[str, float]  # simulate hit rate: ours, lru, min
    ms_per_token: dict[str, float]  # simulate modelled ms/token: ours, lru, min

    @property
    def ratio(self) -> float:
        """Ours' modelled time over LRU's."""
        lru = self.ms_per_token["lru"]
        return self.ms_per_token["ours"] / lru if lru else math.nan

    def to_json(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def parse_share(text: str | float) -> float:
    """``12.5%``, ``12.5`` or ``0.125`` as a share in (0, 1]; a one-line SpacError otherwise."""
    raw = str(text).strip()
    try:
        value = float(raw.rstrip("%"))
    except ValueError:
        raise SpacError(f"invalid share {text!r}; give a percentage of the experts such as 12.5%") from None
    share = value / 100 if raw.endswith("%") or value > 1 else value
    if not 0 < share <= 1:
        raise SpacError(f"share {text!r} must be above 0% and at most 100% of the experts")
    return share


def tier_budget_for_share(tier: str, share: float, info: MoEModelInfo | ExpertLayout) -> int:
    """The tier budget whose plan holds ``share`` of the routed expert bytes (see the module docstring)."""
    layout = info if isinstance(info, ExpertLayout) else budgets.tier_layout(tier, info)
    expert_bytes = int(layout.bytes_matrix.sum())
    want = max(int(layout.expert_bytes.min()), int(expert_bytes * share))
    if tier == "flash":
        # a trace's recorded sizes have no file offsets, hence no edge pages (as make_setup plans it)
        return budgets.flash_budget_for_plan(want, layout, edge_pages=not isinstance(info, ExpertLayout))
    if isinstance(info, ExpertLayout):
        return want
    fixed = budgets.vram_fixed_parts(info, budgets.DEFAULT_N_CTX, budgets.DEFAULT_COMPUTE_RESERVE)
    return budgets.vram_budget_for_pool(want, **fixed)


def compare_shares(trace: RoutingTrace, info: MoEModelInfo | ExpertLayout, cost: CostModel, *, tier: str = "flash",
                   shares: Iterable[float] = DEFAULT_SHARES, name: str = "trace") -> list[ShareRow]:
    """:class:`ShareRow` per share: eval-utility hit rates and simulated time of ours, LRU and MIN."""
    rows = []
    n_layer, n_expert = trace.counts.shape[1:]
    for share in shares:
        n = min(n_expert, max(1, round(share * n_expert)))
        scores = {s.policy: s.hit_rate for s in utility_eval.evaluate(trace, n, estimators=["spac"])}
        eu = {"ours": scores["spac"], "lru": scores["lru"], "min": scores["min"]}
        budget = tier_budget_for_share(tier, share, info)
        setup = make_setup(trace, tier, budget, cost, info)
        results = {p: simulate(trace, p, setup) for p in POLICIES}
        rows.append(ShareRow(name, share, n, budget, setup.budget, eu,
                             {p: r.hit_rate for p, r in results.items()},
                             {p: r.ms_per_token for p, r in results.items()}))
    return rows


def format_rows(rows: list[ShareRow]) -> str:
    """A table: per trace and share, hit rates (eval-utility and simulate) and modelled ms/token."""
    header = ("trace", "share", "N/layer", "plan", "EU ours", "EU lru", "EU min", "sim ours", "sim lru", "sim min",
              "ms/tok ours", "ms/tok lru", "ms/tok min", "ours/lru")
    body = [(r.trace, f"{100 * r.share:g}%", str(r.experts_per_layer), format_size(r.plan_bytes),
             *(f"{r.eu_hit[p]:.3f}" for p in POLICIES), *(f"{r.sim_hit[p]:.3f}" for p in POLICIES),
             *(f"{r.ms_per_token[p]:.2f}" for p in POLICIES), f"{r.ratio:.3f}") for r in rows]
    widths = [max(len(x[k]) for x in [header, *body]) for k in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if k == 0 else '>'}{w}}}" for k, w in enumerate(widths))
    return "\n".join([fmt.format(*header), "  ".join("-" * w for w in widths), *(fmt.format(*b) for b in body)])
