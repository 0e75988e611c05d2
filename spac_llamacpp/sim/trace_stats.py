"""Routing-realism statistics of a :class:`~spac_llamacpp.observe.trace.RoutingTrace`.

What an expert cache sees of a model's routing:

- **popularity skew** per MoE layer: how unevenly the expert selections spread over the experts
  (normalized entropy, share of the hottest quarter of experts, hottest/mean ratio);
- **LRU hit rate** per layer for a cache of ``c`` experts per layer: the shared reference LRU of
  ``planning/reference_caches.py`` (per layer, empty at the start, demand admission, step by step)
  and the project's one hit rate (activations: distinct (step, layer, expert); ``docs/hit_rate.md``);
- **reuse**: the fraction of a token's experts that the previous token also used (temporal locality).

A uniform random router gives hit rate ~ ``c / n_expert`` on one-token steps and reuse ~ ``k / n_expert``;
:func:`uniform_ids` draws such a trace for the same shape, to put a number next to a model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from spac_llamacpp.observe.trace import RoutingTrace
from spac_llamacpp.planning.reference_caches import lru, need_from_ids


def layer_ids(trace: RoutingTrace, decode_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [n_tokens, n_moe_layers, k], counted [n_steps] bool)`` of the MoE layers.

    ``counted`` marks the steps whose activations count towards hit rates: all steps, or with
    ``decode_only`` the one-token steps (generation), after the prompt warmed the cache.
    """
    ids = trace.ids[:, trace.moe_layers, :] if len(trace.moe_layers) else trace.ids[:, :0, :]
    counted = trace.step_n_tokens == 1 if decode_only else np.ones(trace.n_steps, dtype=bool)
    return ids, counted


def step_need(ids: np.ndarray, token_step: np.ndarray, n_steps: int, n_expert: int) -> np.ndarray:
    """Activations ``[n_steps, n_layers, n_expert]`` of per-token ``ids`` (``reference_caches`` input)."""
    return need_from_ids(ids, token_step, n_steps, n_expert)


@dataclass(frozen=True)
class Popularity:
    """Per-layer expert popularity of a trace (arrays over MoE layers)."""

    counts: np.ndarray  # [n_layers, n_expert] selections per expert
    normalized_entropy: np.ndarray  # [n_layers] H(p) / log(n_expert); 1 = perfectly even
    top_quarter_share: np.ndarray  # [n_layers] share of selections of the hottest n_expert/4 experts
    max_over_mean: np.ndarray  # [n_layers] hottest expert's count / mean count


def popularity(ids: np.ndarray, n_expert: int) -> Popularity:
    """Popularity statistics of ``ids`` [n_tokens, n_layers, k] (negative ids are ignored)."""
    n_layers = ids.shape[1]
    counts = np.zeros((n_layers, n_expert), dtype=np.int64)
    for layer in range(n_layers):
        sel = ids[:, layer, :].ravel()
        counts[layer] = np.bincount(sel[sel >= 0], minlength=n_expert)[:n_expert]
    totals = counts.sum(1, keepdims=True)
    p = counts / np.maximum(totals, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(1) / np.log(n_expert)
    quarter = max(1, n_expert // 4)
    top = np.sort(counts, axis=1)[:, ::-1][:, :quarter].sum(1) / np.maximum(totals[:, 0], 1)
    mean = np.maximum(totals[:, 0] / n_expert, 1e-12)
    return Popularity(counts, ent, top, counts.max(1) / mean)


def lru_curve(need: np.ndarray, counted: np.ndarray, capacities: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Hit rates of the shared per-layer LRU (``reference_caches.lru``) over activations ``need``
    [n_steps, n_layers, n_expert], counting the steps with ``counted``: ``(per layer [len(capacities),
    n_layers], all layers together [len(capacities)])`` (NaN where nothing was counted)."""
    per_layer = np.zeros((len(capacities), need.shape[1]))
    pooled = np.zeros(len(capacities))
    for i, c in enumerate(capacities):
        r = lru(need, c, counted)
        per_layer[i] = r.per_layer_hit_rate()
        rate = r.hit_rate
        pooled[i] = np.nan if rate is None else rate
    return per_layer, pooled


def reuse_rate(ids: np.ndarray) -> np.ndarray:
    """Per layer, the mean fraction of a token's experts also used by the previous token."""
    n, n_layers, k = ids.shape
    out = np.zeros(n_layers)
    if n < 2:
        return out
    for layer in range(n_layers):
        a, b = ids[1:, layer, :], ids[:-1, layer, :]
        valid = (a >= 0).all(1) & (b >= 0).all(1)
        shared = (a[:, :, None] == b[:, None, :]).any(2).sum(1)
        out[layer] = shared[valid].mean() / k if valid.any() else float("nan")
    return out


def uniform_ids(n_tokens: int, n_layers: int, k: int, n_expert: int, seed: int = 0) -> np.ndarray:
    """A uniform random router's ids [n_tokens, n_layers, k]: k distinct experts per token and layer."""
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((n_tokens, n_layers, n_expert)), axis=2)[:, :, :k].astype(np.int16)


@dataclass(frozen=True)
class RealismReport:
    """Summary over layers (means) of one trace, with the uniform-router reference."""

    n_tokens: int
    n_counted: int  # tokens of the counted steps
    n_counted_steps: int
    n_layers: int
    n_expert: int
    k: int
    popularity: Popularity
    capacities: tuple[int, ...]
    hit_rate: np.ndarray  # [len(capacities), n_layers] per layer
    pooled_hit_rate: np.ndarray  # [len(capacities)] all layers together (hits / activations)
    uniform_hit_rate: np.ndarray  # [len(capacities)] all layers together, uniform random router
    reuse: np.ndarray  # [n_layers]

    def to_json(self) -> dict[str, object]:
        """Plain numbers: LRU hit rates of all layers together (hits / activations), per-layer arrays."""
        p = self.popularity
        return {
            "tokens": self.n_tokens,
            "counted_tokens": self.n_counted,
            "counted_steps": self.n_counted_steps,
            "moe_layers": self.n_layers,
            "n_expert": self.n_expert,
            "k": self.k,
            "normalized_entropy": _rounded(p.normalized_entropy),
            "top_quarter_share": _rounded(p.top_quarter_share),
            "max_over_mean": _rounded(p.max_over_mean),
            "reuse": _rounded(self.reuse),
            "reuse_uniform": round(self.k / self.n_expert, 4),
            "lru": {
                str(c): {"hit_rate": round(float(self.pooled_hit_rate[i]), 4),
                         "per_layer": _rounded(self.hit_rate[i]),
                         "uniform": round(float(self.uniform_hit_rate[i]), 4)}
                for i, c in enumerate(self.capacities)
            },
        }


def _rounded(a: np.ndarray) -> list[float]:
    return [round(float(x), 4) for x in a]


def realism_report(trace: RoutingTrace, capacities: Sequence[int] | None = None,
                   decode_only: bool = False, seed: int = 0) -> RealismReport:
    """Popularity, LRU hit-rate curve (default: every capacity 1..n_expert-1) and reuse of ``trace``."""
    ids, counted = layer_ids(trace, decode_only)
    n_expert = trace.n_expert
    k = ids.shape[2]
    caps = tuple(capacities) if capacities is not None else tuple(range(1, n_expert))
    uni = uniform_ids(len(ids), ids.shape[1], k, n_expert, seed)
    per_layer, pooled = lru_curve(step_need(ids, trace.token_step, trace.n_steps, n_expert), counted, caps)
    _, uniform = lru_curve(step_need(uni, trace.token_step, trace.n_steps, n_expert), counted, caps)
    return RealismReport(
        n_tokens=len(ids),
        n_counted=int(trace.step_n_tokens[counted].sum()),
        n_counted_steps=int(counted.sum()),
        n_layers=ids.shape[1],
        n_expert=n_expert,
        k=k,
        popularity=popularity(ids, n_expert),
        capacities=caps,
        hit_rate=per_layer,
        pooled_hit_rate=pooled,
        uniform_hit_rate=uniform,
        reuse=reuse_rate(ids),
    )
