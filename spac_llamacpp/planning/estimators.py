"""Speculative Utility Estimators: per-(layer, expert) utility from frequency maps.

Every estimator consumes one :class:`Observation` per evaluation step (the counts of the step's
tokens, and for a verification step which tokens the target accepted) and returns a utility array
``[n_layer, n_expert]``: higher means "keep this expert in fast memory". The balancer consumes it;
``spac eval-utility`` compares estimators on recorded traces.

Implementations:

- :class:`HysteresisEstimator`: MoE-SpAc's released rule (integer state 0..5 per expert, up one level
  when the step count >= state + 5, down one when count < state).
- :class:`DecayedAverage`: exponentially decayed per-token demand (inertia against noise).
- :class:`FrequencyWeightedLRU`: recency first, frequency to break ties.
- :class:`SpacEstimator` (ours): two time scales (a fast and a slow decayed demand) plus the last
  step's routing, where tokens the target rejected count less than tokens on the true path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from spac_llamacpp.base.errors import SpacError


@dataclass(frozen=True)
class Observation:
    """What one evaluation step tells an estimator."""

    counts: np.ndarray
    """``[n_layer, n_expert]`` selections by all of the step's tokens."""
    n_tokens: int
    accepted_counts: np.ndarray | None = None
    """``[n_layer, n_expert]`` selections by the tokens on the true path (None: all were)."""

    @property
    def true_path_counts(self) -> np.ndarray:
        return self.counts if self.accepted_counts is None else self.accepted_counts


class UtilityEstimator(Protocol):
    """Turns a stream of step observations into a utility per (layer, expert)."""

    name: str

    def update(self, obs: Observation) -> None: ...

    def utility(self) -> np.ndarray: ...


class _Base:
    name = "base"

    def __init__(self, n_layer: int, n_expert: int) -> None:
        if n_layer < 1 or n_expert < 1:
            raise SpacError(f"an estimator needs at least one layer and expert, got {n_layer} x {n_expert}")
        self.shape = (n_layer, n_expert)


class HysteresisEstimator(_Base):
    """MoE-SpAc's integer state per expert with hysteresis (its public llama.cpp fork)."""

    name = "hysteresis"

    def __init__(self, n_layer: int, n_expert: int, max_state: int = 5, up_margin: int = 5) -> None:
        super().__init__(n_layer, n_expert)
        self.max_state, self.up_margin = max_state, up_margin
        self.state = np.zeros(self.shape, dtype=np.int32)

    def update(self, obs: Observation) -> None:
        c = obs.counts
        up = c >= self.state + self.up_margin
        down = c < self.state
        self.state = np.clip(self.state + up.astype(np.int32) - down.astype(np.int32), 0, self.max_state)

    def utility(self) -> np.ndarray:
        return self.state.astype(np.float64)


class DecayedAverage(_Base):
    """Exponentially decayed average of per-token demand: ``u <- beta*u + (1-beta)*counts/n_tokens``."""

    name = "decayed"

    def __init__(self, n_layer: int, n_expert: int, beta: float = 0.8) -> None:
        super().__init__(n_layer, n_expert)
        if not 0.0 <= beta < 1.0:
            raise SpacError(f"decay beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.u = np.zeros(self.shape)

    def update(self, obs: Observation) -> None:
        self.u *= self.beta
        self.u += (1.0 - self.beta) * obs.counts / max(obs.n_tokens, 1)

    def utility(self) -> np.ndarray:
        return self.u


class FrequencyWeightedLRU(_Base):
    """Most recently used first; among experts last used in the same step, the more frequent first."""

    name = "fw-lru"

    def __init__(self, n_layer: int, n_expert: int) -> None:
        super().__init__(n_layer, n_expert)
        self.last_step = np.full(self.shape, -1.0)
        self.freq = np.zeros(self.shape)
        self.step = 0

    def update(self, obs: Observation) -> None:
        used = obs.counts > 0
        self.last_step[used] = self.step
        self.freq += obs.counts
        self.step += 1

    def utility(self) -> np.ndarray:
        # frequency share < 1 never outranks one step of recency
        return self.last_step + self.freq / (self.freq.sum(axis=1, keepdims=True) + 1.0)


class SpacEstimator(_Base):
    """Ours: the last step's true-path demand plus fast and slow decayed demand.

    ``u = w_last * last + w_fast * fast + w_slow * slow`` where ``last`` is the last step's per-token
    demand with rejected draft tokens weighted by ``rejected_weight`` (their routing was computed but
    is off the true path), ``fast`` a short-memory decayed average (beta_fast) and ``slow`` a long one
    (beta_slow) that keeps popular experts resident through short gaps.
    """

    name = "spac"

    # defaults tuned on a trace of the embedded default model with its draft (docs/utility.md): the
    # last-step term only adds churn, and rejected drafts' routing still predicts the next tokens
    def __init__(self, n_layer: int, n_expert: int, w_last: float = 0.0, w_fast: float = 1.0,
                 w_slow: float = 1.0, beta_fast: float = 0.8, beta_slow: float = 0.97,
                 rejected_weight: float = 1.0) -> None:
        super().__init__(n_layer, n_expert)
        self.w_last, self.w_fast, self.w_slow = w_last, w_fast, w_slow
        self.rejected_weight = rejected_weight
        self.fast = DecayedAverage(n_layer, n_expert, beta_fast)
        self.slow = DecayedAverage(n_layer, n_expert, beta_slow)
        self.last = np.zeros(self.shape)

    def update(self, obs: Observation) -> None:
        true_path = obs.true_path_counts
        weighted = true_path + self.rejected_weight * (obs.counts - true_path)
        weighted_obs = Observation(weighted, obs.n_tokens)
        self.fast.update(weighted_obs)
        self.slow.update(weighted_obs)
        self.last = weighted / max(obs.n_tokens, 1)

    def utility(self) -> np.ndarray:
        return self.w_last * self.last + self.w_fast * self.fast.utility() + self.w_slow * self.slow.utility()


ESTIMATORS: dict[str, type[_Base]] = {
    cls.name: cls for cls in (HysteresisEstimator, DecayedAverage, FrequencyWeightedLRU, SpacEstimator)
}
DEFAULT_ESTIMATOR = "spac"


def make_estimator(name: str, n_layer: int, n_expert: int, **params: float) -> UtilityEstimator:
    """An estimator by name (``hysteresis``, ``decayed``, ``fw-lru``, ``spac``)."""
    try:
        cls = ESTIMATORS[name]
    except KeyError:
        raise SpacError(f"unknown utility estimator {name!r}; choose one of {', '.join(ESTIMATORS)}") from None
    return cls(n_layer, n_expert, **params)  # type: ignore[return-value]
