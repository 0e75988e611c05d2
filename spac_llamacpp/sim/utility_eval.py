"""Replay a routing trace to score utility estimators against the next steps' real demand.

Policy under test: before each step, keep the top-N experts of every MoE layer by the estimator's
utility (built from the steps before). Metrics, over all steps after the first:

- ``hit_rate``: the project's one hit rate (``planning/reference_caches.py``, ``docs/hit_rate.md``):
  the share of the step's activations (distinct layer-expert pairs the step's tokens used) whose expert
  was kept;
- ``loads_per_step``: activations not kept (each one is a transfer or a slow-path expert);
- ``moves_per_step``: experts entering the kept set between steps (prefetch traffic, i.e. churn).

Reference points: ``lru`` and ``min`` (Belady's MIN), the shared per-layer demand caches of N experts
(``reference_caches``: they start empty and admit only on a miss; MIN evicts the expert needed again
farthest ahead, the clairvoyant optimum for demand caching), and ``oracle`` (the N experts the next
step will use most: the clairvoyant bound for any top-N prefetch policy).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.observe.trace import RoutingTrace
from spac_llamacpp.planning.estimators import ESTIMATORS, Observation, UtilityEstimator, make_estimator
from spac_llamacpp.planning.reference_caches import (
    RankedCache,
    belady_min,
    count_hits,
    hit_rate,
    lru,
    need_from_counts,
    replay,
)
from spac_llamacpp.planning.utility import top_n_mask

REFERENCES = ("lru", "min", "oracle")


@dataclass
class PolicyScore:
    """How one policy did on a trace at one budget."""

    policy: str
    budget_experts: int
    hit_rate: float
    loads_per_step: float
    moves_per_step: float
    steps: int
    hits: int = 0
    activations: int = 0

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


def trace_need(trace: RoutingTrace) -> np.ndarray:
    """The trace's activations ``[n_steps, n_moe_layers, n_expert]`` (``reference_caches`` input)."""
    return need_from_counts(trace.counts[:, trace.moe_layers])


def _score(policy: str, budget: int, trace: RoutingTrace, kept_before: Iterable[np.ndarray]) -> PolicyScore:
    """Score a sequence of kept masks (kept_before[t] is the set held when step t+1 starts)."""
    layers = trace.moe_layers
    need = trace_need(trace)
    hits = total = loads = moves = 0
    prev = None
    steps = 0
    for t, kept in enumerate(kept_before, start=1):
        k = np.asarray(kept, dtype=bool)[layers]
        h, a = count_hits(need[t], k)
        hits += h
        total += a
        loads += a - h
        if prev is not None:
            moves += int((k & ~prev).sum())
        prev = k
        steps += 1
    return PolicyScore(policy, budget, hit_rate(hits, total) or 0.0, loads / max(steps, 1),
                       moves / max(steps - 1, 1), steps, hits, total)


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
    """Per step t >= 1, the hit rate of its activations against ``kept_before[t-1]`` (NaN if none)."""
    need = trace_need(trace)
    out = []
    for t, kept in enumerate(kept_before, start=1):
        r = hit_rate(*count_hits(need[t], np.asarray(kept, dtype=bool)[trace.moe_layers]))
        out.append(float("nan") if r is None else r)
    return np.array(out)


def _all_layers(trace: RoutingTrace, held: np.ndarray) -> Iterator[np.ndarray]:
    """Masks over all layers (the trace's ``counts`` rows) from MoE-layer masks ``[T, n_moe, E]``."""
    full = np.zeros(trace.counts.shape[1:], dtype=bool)
    for h in held:
        full[trace.moe_layers] = h
        yield full.copy()


def lru_kept(trace: RoutingTrace, budget: int) -> Iterator[np.ndarray]:
    """What the shared per-layer LRU of ``budget`` experts holds when each step t >= 1 starts."""
    return _all_layers(trace, lru(trace_need(trace), budget, keep_held=True).held[1:])


def min_kept(trace: RoutingTrace, budget: int) -> Iterator[np.ndarray]:
    """What Belady's MIN (the shared demand cache) of ``budget`` experts holds when each step t >= 1 starts."""
    return _all_layers(trace, belady_min(trace_need(trace), budget, keep_held=True).held[1:])


def estimator_demand_kept(trace: RoutingTrace, estimator: UtilityEstimator, budget: int) -> Iterator[np.ndarray]:
    """The estimator as a demand cache (``reference_caches.RankedCache``): after each step it keeps the
    ``budget`` experts with the highest utility among those it held and those the step used; no
    prefetch. (Belady's MIN is the bound of this setting.)"""
    need = trace_need(trace)
    obs = iter(observations(trace))

    def rank(t: int, step_need: np.ndarray) -> np.ndarray:
        estimator.update(next(obs))
        return np.asarray(estimator.utility(), dtype=np.float64)[trace.moe_layers]

    cache = RankedCache(need.shape[1], need.shape[2], budget, name=estimator.name)
    return _all_layers(trace, replay(cache, need, keep_held=True, ranks=rank).held[1:])


def oracle_kept(trace: RoutingTrace, budget: int) -> Iterator[np.ndarray]:
    """The experts the next step will use most (clairvoyant prefetch; nothing it does not use)."""
    for t in range(1, trace.n_steps):
        yield top_n_mask(trace.counts[t].astype(np.float64), budget) & (trace.counts[t] > 0)


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
    scores.append(_score("min", budget, trace, min_kept(trace, budget)))
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
    ax.set_ylabel("hit rate (activations: step x layer x expert)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "utility estimators: keep top-N by utility")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
