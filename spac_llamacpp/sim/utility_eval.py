"""Replay a routing trace to score utility estimators against the next steps' real demand.

Policy under test: before each step, keep the top-N experts of every MoE layer by the estimator's
utility (built from the steps before). Metrics, over all steps after the first:

- ``hit_rate``: share of the step's token-expert selections whose expert was kept;
- ``loads_per_step``: distinct (layer, expert) pairs used by the step but not kept (each one is a
  transfer or a slow-path expert);
- ``moves_per_step``: experts entering the kept set between steps (prefetch traffic, i.e. churn).

Reference points: ``lru`` (the N most recently used experts, token by token), ``belady`` (a demand
cache of N slots per layer that evicts the expert whose next use is farthest: the clairvoyant optimum
for caching) and ``oracle`` (the N experts the next step will use most: the clairvoyant bound for
any top-N prefetch policy).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.observe.trace import RoutingTrace
from spac_llamacpp.planning.estimators import ESTIMATORS, Observation, UtilityEstimator, make_estimator
from spac_llamacpp.planning.utility import top_n_mask

REFERENCES = ("lru", "belady", "oracle")


@dataclass
class PolicyScore:
    """How one policy did on a trace at one budget."""

    policy: str
    budget_experts: int
    hit_rate: float
    loads_per_step: float
    moves_per_step: float
    steps: int

    def to_json(self) -> dict[str, float | int | str]:
        return asdict(self)


def observations(trace: RoutingTrace) -> Iterator[Observation]:
    """One observation per trace step, with true-path counts where acceptance is known."""
    starts = np.concatenate([[0], np.cumsum(trace.step_n_tokens)])
    for s in range(trace.n_steps):
        accepted_counts = None
        if trace.step_n_draft is not None and trace.step_n_draft[s] > 0 and trace.step_accepted[s] >= 0:
            ids = trace.ids[starts[s]: starts[s] + 1 + int(trace.step_accepted[s])]
            accepted_counts = _histogram(ids, trace.counts.shape[1], trace.n_expert)
        yield Observation(trace.counts[s], int(trace.step_n_tokens[s]), accepted_counts)


def _histogram(ids: np.ndarray, n_layer: int, n_expert: int) -> np.ndarray:
    out = np.zeros((n_layer, n_expert), dtype=np.int64)
    for layer in range(n_layer):
        row = ids[:, layer].ravel()
        out[layer] = np.bincount(row[row >= 0], minlength=n_expert)
    return out


def _score(policy: str, budget: int, trace: RoutingTrace, kept_before: Iterable[np.ndarray]) -> PolicyScore:
    """Score a sequence of kept masks (kept_before[t] is the set held when step t+1 starts)."""
    layers = trace.moe_layers
    hits = total = loads = moves = 0
    prev = None
    steps = 0
    for t, kept in enumerate(kept_before, start=1):
        demand = trace.counts[t][layers]
        k = kept[layers]
        hits += int((demand * k).sum())
        total += int(demand.sum())
        loads += int(((demand > 0) & ~k).sum())
        if prev is not None:
            moves += int((k & ~prev).sum())
        prev = k
        steps += 1
    return PolicyScore(policy, budget, hits / total if total else 0.0, loads / max(steps, 1),
                       moves / max(steps - 1, 1), steps)


def estimator_kept(trace: RoutingTrace, estimator: UtilityEstimator, budget: int) -> Iterator[np.ndarray]:
    """The top-``budget`` experts per layer by the estimator's utility, after each step."""
    for t, obs in enumerate(observations(trace)):
        estimator.update(obs)
        if t + 1 < trace.n_steps:
            yield top_n_mask(estimator.utility(), budget)


def score_estimator(trace: RoutingTrace, estimator: UtilityEstimator, budget: int) -> PolicyScore:
    """Hit rate of "keep the top-``budget`` by utility" against each next step's demand."""
    return _score(estimator.name, budget, trace, estimator_kept(trace, estimator, budget))


def step_hit_rates(trace: RoutingTrace, kept_before: Iterable[np.ndarray]) -> np.ndarray:
    """Per step t >= 1, the share of its expert selections found in ``kept_before[t-1]`` (NaN if none)."""
    out = []
    for t, kept in enumerate(kept_before, start=1):
        demand = trace.counts[t][trace.moe_layers]
        total = int(demand.sum())
        out.append(float((demand * kept[trace.moe_layers]).sum()) / total if total else float("nan"))
    return np.array(out)


def lru_kept(trace: RoutingTrace, budget: int) -> Iterator[np.ndarray]:
    """The N most recently used experts per layer, access by access (token, then top-k slot), after each step."""
    n_layer, n_expert = trace.counts.shape[1:]
    k = trace.ids.shape[2]
    last = np.full((n_layer, n_expert), -1.0)
    starts = np.concatenate([[0], np.cumsum(trace.step_n_tokens)])
    for s in range(trace.n_steps - 1):
        block = trace.ids[starts[s]: starts[s + 1]]  # [tokens, layers, k]
        for i in range(block.shape[0]):
            clock = (starts[s] + i) * k + np.arange(k)
            for layer in range(n_layer):
                row = block[i, layer]
                last[layer, row[row >= 0]] = clock[row >= 0]
        yield top_n_mask(last, budget)


def belady_kept(trace: RoutingTrace, budget: int) -> Iterator[np.ndarray]:
    """Demand caching with farthest-next-use eviction, per layer, at step granularity."""
    n_layer, n_expert = trace.counts.shape[1:]
    used = trace.counts > 0  # [steps, layers, experts]
    big = trace.n_steps + 1
    # next_use[t, l, e]: first step > t that uses (l, e)
    next_use = np.full(used.shape, big, dtype=np.int64)
    nxt = np.full((n_layer, n_expert), big, dtype=np.int64)
    for t in range(trace.n_steps - 1, -1, -1):
        next_use[t] = nxt
        nxt = np.where(used[t], t, nxt)
    cache = np.zeros((n_layer, n_expert), dtype=bool)
    for t in range(trace.n_steps - 1):
        cache |= used[t]
        over = cache.sum(axis=1) - budget
        for layer in np.nonzero(over > 0)[0]:
            members = np.nonzero(cache[layer])[0]
            far = members[np.argsort(-next_use[t, layer, members], kind="stable")[: over[layer]]]
            cache[layer, far] = False
        yield cache.copy()


def oracle_kept(trace: RoutingTrace, budget: int) -> Iterator[np.ndarray]:
    """The experts the next step will use most (clairvoyant prefetch)."""
    for t in range(1, trace.n_steps):
        yield top_n_mask(trace.counts[t].astype(np.float64), budget)


def evaluate(trace: RoutingTrace, budget: int, estimators: Iterable[str] | None = None) -> list[PolicyScore]:
    """Scores of every estimator and reference policy at one budget (experts per layer)."""
    n_layer, n_expert = trace.counts.shape[1:]
    if not 1 <= budget <= n_expert:
        raise SpacError(f"--budget-experts must be between 1 and the {n_expert} experts per layer, not {budget}")
    if trace.n_steps < 2:
        raise SpacError("the trace has fewer than 2 steps; record more tokens with `spac trace -n`")
    scores = [score_estimator(trace, make_estimator(name, n_layer, n_expert), budget)
              for name in (estimators or ESTIMATORS)]
    scores.append(_score("lru", budget, trace, lru_kept(trace, budget)))
    scores.append(_score("belady", budget, trace, belady_kept(trace, budget)))
    scores.append(_score("oracle", budget, trace, oracle_kept(trace, budget)))
    return scores


def sweep(trace: RoutingTrace, budgets: Iterable[int]) -> dict[int, list[PolicyScore]]:
    """:func:`evaluate` at several budgets."""
    return {b: evaluate(trace, b) for b in budgets}


def plot_sweep(results: dict[int, list[PolicyScore]], path: str, title: str = "") -> None:
    """Hit rate vs budget, one line per policy (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(results)
    policies = [s.policy for s in results[budgets[0]]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in policies:
        rates = [next(s.hit_rate for s in results[b] if s.policy == p) for b in budgets]
        style = "--" if p in REFERENCES else "-"
        ax.plot(budgets, rates, style, marker="o", markersize=3, label=p)
    ax.set_xlabel("experts kept per layer (budget)")
    ax.set_ylabel("hit rate (token-expert selections)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "utility estimators: keep top-N by utility")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
