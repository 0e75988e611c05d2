"""Demand for the balancer: expected tokens per decoding step routed to each (MoE layer, expert).

The balancer's cost model needs utilities in physical units, ``u[n_moe_layer, n_expert]`` = expected
tokens routed to (l, e) in the next step (so that expected compute and read times follow). A
:class:`DemandEstimator` sees each step's counts and says what it expects next::

    est = DecayedCounts(n_layer, n_expert, half_life=16)
    est.update(step_counts, n_tokens)     # step_counts: [n_moe_layer, n_expert] of one step
    u = est.utility()                     # [n_moe_layer, n_expert] float64, expected tokens per step

:class:`DecayedCounts` is the simple built-in one. The Speculative Utility Estimators of
``estimators.py`` (``spac``, ``decayed``, ``hysteresis``, ``fw-lru``) score experts in their own units;
:class:`FromScores` wraps any of them, rescaling each layer's scores to that layer's expected
selections per step (experts used per token x tokens per step). :func:`make_demand` builds either by name.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import numpy as np

from spac_llamacpp.base.errors import SpacError


@runtime_checkable
class DemandEstimator(Protocol):
    """Online estimate of next-step expert demand, in expected tokens per step."""

    def update(self, step_counts: np.ndarray, n_tokens: int) -> None:
        """Observe one step: ``step_counts[l, e]`` tokens of the step routed to (l, e)."""
        ...

    def utility(self) -> np.ndarray:
        """``[n_layer, n_expert]`` expected tokens per step (a fresh array)."""
        ...

    @property
    def tokens_per_step(self) -> float:
        """Expected tokens per step (1 for plain decoding, k+1 for verifying k drafts)."""
        ...


class DecayedCounts:
    """Exponentially decayed per-step counts: ``u <- (1 - a) u + a * counts``, ``a = 1 - 2**(-1/half_life)``.

    Until ``half_life`` steps have been seen, the average is normalised by the weight seen so far
    (so the first step is not shrunk towards zero).
    """

    def __init__(self, n_layer: int, n_expert: int, half_life: float = 16.0) -> None:
        if half_life <= 0:
            raise SpacError(f"half_life must be positive, not {half_life}")
        self.shape = (int(n_layer), int(n_expert))
        self.half_life = float(half_life)
        self.alpha = 1.0 - 2.0 ** (-1.0 / self.half_life)
        self._acc = np.zeros(self.shape, np.float64)
        self._tok = 0.0
        self._weight = 0.0
        self.n_steps = 0

    def update(self, step_counts: np.ndarray, n_tokens: int) -> None:
        c = np.asarray(step_counts, dtype=np.float64)
        if c.shape != self.shape:
            raise SpacError(f"step counts have shape {c.shape}, expected {self.shape}")
        a = self.alpha
        self._acc *= 1.0 - a
        self._acc += a * c
        self._tok = (1.0 - a) * self._tok + a * float(n_tokens)
        self._weight = (1.0 - a) * self._weight + a
        self.n_steps += 1

    def utility(self) -> np.ndarray:
        if self._weight <= 0:
            return np.zeros(self.shape)
        return self._acc / self._weight

    @property
    def tokens_per_step(self) -> float:
        return max(1.0, self._tok / self._weight) if self._weight > 0 else 1.0


def top_n_mask(utility: np.ndarray, n: int) -> np.ndarray:
    """Boolean mask of the n highest utilities per row (ties: lower expert id first)."""
    order = np.argsort(-utility, axis=1, kind="stable")[:, :n]
    mask = np.zeros(utility.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def utility_drift(new: np.ndarray, old: np.ndarray | None) -> float:
    """Relative L1 change ``|new - old|_1 / |old|_1`` (inf when there was no previous utility)."""
    if old is None:
        return math.inf
    denom = float(np.abs(old).sum())
    if denom <= 0:
        return math.inf if float(np.abs(new).sum()) > 0 else 0.0
    return float(np.abs(new - old).sum()) / denom


class FromScores:
    """Any ``estimators.UtilityEstimator`` as a :class:`DemandEstimator`.

    Scores are clipped at 0 and rescaled per layer to sum to ``n_expert_used[l] * tokens_per_step``:
    the estimator decides the shape of the demand, the model's top-k the amount. (Scores that are not
    roughly proportional to demand, like ``fw-lru``'s recency ranks, make poor balancer inputs.)
    """

    def __init__(self, estimator: object, n_expert_used: np.ndarray | list[int], half_life: float = 16.0) -> None:
        from spac_llamacpp.planning.estimators import Observation

        self._obs = Observation
        self.estimator = estimator
        self.k = np.asarray(n_expert_used, dtype=np.float64)
        self.name = str(getattr(estimator, "name", type(estimator).__name__))
        self._a = 1.0 - 2.0 ** (-1.0 / half_life)
        self._tok = 0.0
        self._w = 0.0

    def update(self, step_counts: np.ndarray, n_tokens: int) -> None:
        self.estimator.update(self._obs(np.asarray(step_counts), int(n_tokens)))  # type: ignore[attr-defined]
        self._tok = (1.0 - self._a) * self._tok + self._a * float(n_tokens)
        self._w = (1.0 - self._a) * self._w + self._a

    @property
    def tokens_per_step(self) -> float:
        return max(1.0, self._tok / self._w) if self._w > 0 else 1.0

    def utility(self) -> np.ndarray:
        s = np.clip(np.asarray(self.estimator.utility(), dtype=np.float64), 0.0, None)  # type: ignore[attr-defined]
        tot = s.sum(axis=1, keepdims=True)
        scale = np.divide(self.k[:, None] * self.tokens_per_step, tot, out=np.zeros_like(tot), where=tot > 0)
        return s * scale


def make_demand(name: str, n_layer: int, n_expert: int, n_expert_used: list[int] | np.ndarray,
                **params: float) -> DemandEstimator:
    """``decayed-counts`` (:class:`DecayedCounts`) or any name of ``estimators.ESTIMATORS`` (wrapped)."""
    if name == "decayed-counts":
        return DecayedCounts(n_layer, n_expert, **params)
    from spac_llamacpp.planning.estimators import make_estimator

    return FromScores(make_estimator(name, n_layer, n_expert, **params), n_expert_used)
