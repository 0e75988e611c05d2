"""Utility estimators: expected next-step demand per (MoE layer, expert), from each step's routing.

One protocol, :class:`UtilityEstimator`, for everything that consumes demand (the runtime tiers, the
policy simulator, ``spac eval-utility``, ``spac profile``)::

    est = make_estimator("spac", n_moe_layer, n_expert)
    est.update(Observation(step_counts, n_tokens, accepted_counts))   # after each evaluation step
    u = est.utility()          # [n_moe_layer, n_expert] expected tokens routed to (l, e) next step
    n = est.tokens_per_step    # expected tokens per step (1 plain, k+1 verifying k drafts)

Units are the balancer's (docs/balancer.md): ``u[l, e]`` is the expected number of the next step's
tokens that choose expert e in layer l, so ``u[l].sum()`` is layer l's expected selections per step
(experts per token x tokens per step). Each estimator only decides the *shape* of a layer's demand
(:meth:`Estimator.scores`, any non-negative unit); the one place that turns scores into tokens is
:meth:`Estimator.utility`: per layer, scores / their sum x the layer's decayed selections per token
x the decayed tokens per step (both learnt from the observations, half-life
:data:`VOLUME_HALF_LIFE` steps). For the decayed averages the scores already are per-token demand,
so this only makes the units explicit.

Implementations (names for :func:`make_estimator`, the one registry):

- ``hysteresis`` (:class:`HysteresisEstimator`): MoE-SpAc's released rule (integer state 0..5 per
  expert, up one level when the step count >= state + 5, down one when count < state).
- ``decayed`` (:class:`DecayedAverage`, beta 0.8): exponentially decayed per-token demand.
  ``decayed-counts`` is the same class with a half-life of 16 steps (beta 0.958), the balancer's
  former ``DecayedCounts``.
- ``fw-lru`` (:class:`FrequencyWeightedLRU`): recency first, frequency to break ties (scores are
  ranks, not demand: a poor balancer input, kept for ``spac eval-utility``).
- ``spac`` (:class:`SpacEstimator`, ours, the default): what usually follows the last step's experts
  (:class:`TransitionModel`, transitions between consecutive steps learnt online) plus short-memory
  decayed demand (and optional slow demand and last-step terms), where tokens the target rejected count
  ``rejected_weight``.

All decayed quantities use :class:`DecayedMean`, the one decayed average.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from spac_llamacpp.base.errors import SpacError

VOLUME_HALF_LIFE = 16.0
"""Half-life (steps) of the tokens-per-step and selections-per-token averages behind the units."""


@dataclass(frozen=True)
class Observation:
    """What one evaluation step tells an estimator.

    A verification step evaluates the last sampled token followed by k drafts (``n_tokens = k + 1``).
    The target samples at each row in turn and keeps a draft while its sample equals it; the first
    differing sample replaces that draft (the correction), and after k accepted drafts the sample at
    the last row is the bonus token. The **true path** of the step is the first token and the accepted
    drafts: the batch's tokens that stay in the context, whose outputs (logits, KV entries) the target
    kept. The rejected drafts' routing was computed but is off it. (The correction or bonus token is
    not in this batch: it is the first token of the next step.)
    """

    counts: np.ndarray
    """``[n_layer, n_expert]`` selections by all of the step's tokens."""
    n_tokens: int
    accepted_counts: np.ndarray | None = None
    """``[n_layer, n_expert]`` selections by the tokens on the true path; None: all of them are (a
    prompt, a plain decoding step, or a trace without acceptance)."""

    @property
    def true_path_counts(self) -> np.ndarray:
        return self.counts if self.accepted_counts is None else self.accepted_counts

    @property
    def rejected_counts(self) -> np.ndarray:
        """Selections by the rejected drafts (zeros when all tokens are on the true path)."""
        return np.asarray(self.counts) - np.asarray(self.true_path_counts)


@runtime_checkable
class UtilityEstimator(Protocol):
    """Online estimate of the next step's demand, in expected tokens per step per (layer, expert)."""

    name: str

    def update(self, obs: Observation) -> None:
        """Learn from one evaluation step."""
        ...

    def utility(self) -> np.ndarray:
        """``[n_layer, n_expert]`` float64: expected tokens routed to (l, e) in the next step (a fresh array)."""
        ...

    @property
    def tokens_per_step(self) -> float:
        """Expected tokens per step (1 for plain decoding, k+1 for verifying k drafts)."""
        ...


def beta_of(beta: float | None = None, half_life: float | None = None, default: float = 0.8) -> float:
    """A decay factor from ``beta`` or a ``half_life`` in steps (``beta = 2**(-1/half_life)``)."""
    if beta is not None and half_life is not None:
        raise SpacError("give a decay as beta or as half_life, not both")
    if half_life is not None:
        if half_life <= 0:
            raise SpacError(f"half_life must be positive, not {half_life}")
        return float(2.0 ** (-1.0 / float(half_life)))
    beta = default if beta is None else float(beta)
    if not 0.0 <= beta < 1.0:
        raise SpacError(f"decay beta must be in [0, 1), got {beta}")
    return beta


class DecayedMean:
    """The one exponentially decayed average: ``m <- beta*m + (1-beta)*x``, read as ``m / (1 - beta**n)``.

    The read is normalised by the weight seen so far, so the first values are not shrunk towards
    zero (after one value the mean is that value). Works on scalars and arrays alike.
    """

    def __init__(self, shape: tuple[int, ...] | int = (), beta: float = 0.8) -> None:
        if not 0.0 <= beta < 1.0:
            raise SpacError(f"decay beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        self._acc = np.zeros(shape, np.float64)
        self._weight = 0.0

    def add(self, x: np.ndarray | float) -> None:
        self._acc *= self.beta
        self._acc += (1.0 - self.beta) * np.asarray(x, np.float64)
        self._weight = self.beta * self._weight + (1.0 - self.beta)

    @property
    def seen(self) -> bool:
        return self._weight > 0

    def affine_next(self) -> tuple[np.ndarray, float]:
        """``(a, b)`` such that the value after the next ``add(x)`` is ``a + b * x``."""
        weight_after = self.beta * self._weight + (1.0 - self.beta)
        return self.beta * self._acc / weight_after, (1.0 - self.beta) / weight_after

    @property
    def value(self) -> np.ndarray:
        """The current mean (zeros before the first value; a fresh array)."""
        return self._acc / self._weight if self._weight > 0 else np.zeros_like(self._acc)


class Estimator:
    """Base of the built-in estimators: checks shapes, learns the volume, converts scores to tokens.

    Subclasses implement :meth:`_learn` (one observation) and :meth:`scores` (non-negative, any unit,
    higher = more demand); :meth:`utility` scales each layer's scores to its expected selections per step.
    """

    name = "base"

    def __init__(self, n_layer: int, n_expert: int) -> None:
        if n_layer < 1 or n_expert < 1:
            raise SpacError(f"an estimator needs at least one layer and expert, got {n_layer} x {n_expert}")
        self.shape = (int(n_layer), int(n_expert))
        beta = beta_of(half_life=VOLUME_HALF_LIFE)
        self._tokens = DecayedMean((), beta)
        self._per_token = DecayedMean((self.shape[0],), beta)  # selections per token per layer (top-k)
        self.n_steps = 0

    def update(self, obs: Observation) -> None:
        counts = np.asarray(obs.counts, np.float64)
        if counts.shape != self.shape:
            raise SpacError(f"step counts have shape {counts.shape}, expected {self.shape}")
        if obs.accepted_counts is not None and np.shape(obs.accepted_counts) != self.shape:
            raise SpacError(f"accepted counts have shape {np.shape(obs.accepted_counts)}, expected {self.shape}")
        n = max(int(obs.n_tokens), 1)
        self._tokens.add(float(n))
        self._per_token.add(counts.sum(axis=1) / n)
        self.n_steps += 1
        self._learn(obs)

    def _learn(self, obs: Observation) -> None:
        raise NotImplementedError

    def scores(self) -> np.ndarray:
        """``[n_layer, n_expert]`` the estimator's own scores (the shape of each layer's demand)."""
        raise NotImplementedError

    @property
    def tokens_per_step(self) -> float:
        return max(1.0, float(self._tokens.value)) if self._tokens.seen else 1.0

    @property
    def selections_per_token(self) -> np.ndarray:
        """``[n_layer]`` observed expert selections per token (each layer's top-k)."""
        return self._per_token.value

    def utility(self) -> np.ndarray:
        s = np.clip(np.asarray(self.scores(), np.float64), 0.0, None)
        total = s.sum(axis=1, keepdims=True)
        volume = (self.selections_per_token * self.tokens_per_step)[:, None]
        return s * np.divide(volume, total, out=np.zeros_like(total), where=total > 0)


class HysteresisEstimator(Estimator):
    """MoE-SpAc's integer state per expert with hysteresis (its public llama.cpp fork)."""

    name = "hysteresis"

    def __init__(self, n_layer: int, n_expert: int, max_state: int = 5, up_margin: int = 5) -> None:
        super().__init__(n_layer, n_expert)
        self.max_state, self.up_margin = max_state, up_margin
        self.state = np.zeros(self.shape, dtype=np.int32)

    def _learn(self, obs: Observation) -> None:
        c = obs.counts
        up = c >= self.state + self.up_margin
        down = c < self.state
        self.state = np.clip(self.state + up.astype(np.int32) - down.astype(np.int32), 0, self.max_state)

    def scores(self) -> np.ndarray:
        return self.state.astype(np.float64)


class DecayedAverage(Estimator):
    """Exponentially decayed per-token demand (``counts / n_tokens``), one :class:`DecayedMean`.

    Decay ``beta`` (default 0.8) or ``half_life`` steps (``decayed-counts``: 16). Its utility is that
    demand times the expected tokens per step.
    """

    name = "decayed"

    def __init__(self, n_layer: int, n_expert: int, beta: float | None = None, half_life: float | None = None) -> None:
        super().__init__(n_layer, n_expert)
        self.beta = beta_of(beta, half_life)
        self.mean = DecayedMean(self.shape, self.beta)

    def _learn(self, obs: Observation) -> None:
        self.mean.add(np.asarray(obs.counts, np.float64) / max(obs.n_tokens, 1))

    def scores(self) -> np.ndarray:
        return self.mean.value


class FrequencyWeightedLRU(Estimator):
    """Most recently used first; among experts last used in the same step, the more frequent first."""

    name = "fw-lru"

    def __init__(self, n_layer: int, n_expert: int) -> None:
        super().__init__(n_layer, n_expert)
        self.last_step = np.full(self.shape, -1.0)
        self.freq = np.zeros(self.shape)
        self.step = 0

    def _learn(self, obs: Observation) -> None:
        used = obs.counts > 0
        self.last_step[used] = self.step
        self.freq += obs.counts
        self.step += 1

    def scores(self) -> np.ndarray:
        # frequency share < 1 never outranks one step of recency; never-used experts clip to 0
        return self.last_step + self.freq / (self.freq.sum(axis=1, keepdims=True) + 1.0)


class TransitionModel:
    """Which experts follow which, per layer: decayed counts of "expert e used in a step, f in the next".

    ``counts[l, e, f]`` is a decayed (``beta``) count of consecutive steps where layer l used e and then f;
    :meth:`predict` turns the experts one step used into the next step's expected use of each expert:
    ``sum over used e of P(f | e)``. Each row is smoothed by ``prior`` pseudo-counts towards what the whole
    layer does, which is learnt from every row at once: with the layer's reuse rate r (the share of its
    transitions that stay on the same expert) and its marginal q (where its transitions go),
    ``P(f | e) = (counts[e, f] + prior * (r [f == e] + (1 - r) q[f])) / (counts[e].sum() + prior)``. An
    expert seen rarely is thus predicted like LRU would (used again at the layer's reuse rate) plus the
    layer's frequencies, and its own successors take over as they are seen; before the layer's first
    transition nothing is predicted. Routing is at step granularity, as the tier sees it: with
    speculative decoding a step is the k+1-token verify batch and its successor the next batch.

    Why: learnt routers make consecutive tokens' experts depend on each other beyond "the same expert
    again" (Mixtral-8x7B, top-2 of 8: P(e reused) is 0.34-0.40, but the best next-step pair by these
    counts covers 0.42-0.45 of the next token's experts). Decay is applied lazily (one scale factor), so
    an update costs the k x k pairs of each layer, not the whole ``[L, E, E]``.
    """

    def __init__(self, n_layer: int, n_expert: int, beta: float = 0.99, prior: float = 2.0,
                 beta_mix: float | None = 0.8) -> None:
        if not 0.0 <= beta <= 1.0:
            raise SpacError(f"transition decay beta must be in [0, 1], got {beta}")
        if prior <= 0:
            raise SpacError(f"transition prior must be positive, not {prior}")
        self.beta, self.prior = float(beta), float(prior)
        self.shape = (int(n_layer), int(n_expert))
        # all decayed sums are stored divided by self._scale (the decay applied lazily)
        self._raw = np.zeros((n_layer, n_expert, n_expert), np.float64)
        self._rows = np.zeros((n_layer, n_expert), np.float64)  # row sums of _raw
        self._cols = np.zeros((n_layer, n_expert), np.float64)  # column sums of _raw (the marginal q)
        self._same = np.zeros(n_layer, np.float64)  # diagonal sums of _raw (the reuse rate r)
        self._scale = 1.0
        self._prev: np.ndarray | None = None
        self.last_sources = np.zeros(self.shape, bool)  # the source experts of the last update's transitions
        self.beta_mix = beta_mix
        self.mix = np.full(n_layer, 0.5)  # per layer: weight of the experts' own rows against the layer's pooled rule
        self._last: tuple[np.ndarray, np.ndarray] | None = None  # (own, pooled) predictions for the coming step

    @property
    def counts(self) -> np.ndarray:
        """``[L, E, E]`` the decayed transition counts (a fresh array)."""
        return self._raw * self._scale

    @property
    def reuse_rate(self) -> np.ndarray:
        """``[L]`` share of each layer's transitions that stay on the same expert (0 before any)."""
        total = self._rows.sum(axis=1)
        return np.divide(self._same, total, out=np.zeros_like(total), where=total > 0)

    def update(self, used: np.ndarray) -> None:
        """Learn from one step: ``used`` ``[L, E]`` (> 0: the step used the expert)."""
        cur = np.asarray(used) > 0
        if cur.shape != self.shape:
            raise SpacError(f"transition update has shape {cur.shape}, expected {self.shape}")
        if self.beta_mix is not None and self._last is not None:
            self._learn_mix(cur, *self._last)
        if self._prev is not None:
            self._scale *= self.beta
            if self._scale < 1e-100:  # renormalise long before float underflow
                for arr in (self._raw, self._rows, self._cols, self._same):
                    arr *= self._scale
                self._scale = 1.0
            self.last_sources = self._prev
            layer, src, dst = _pairs(self._prev, cur)
            if len(layer):
                inc = 1.0 / self._scale
                np.add.at(self._raw, (layer, src, dst), inc)
                np.add.at(self._rows, (layer, src), inc)
                np.add.at(self._cols, (layer, dst), inc)
                np.add.at(self._same, layer[src == dst], inc)
        self._prev = cur
        self._last = self._components(cur) if self.beta_mix is not None else None

    def _learn_mix(self, cur: np.ndarray, own: np.ndarray, pooled: np.ndarray) -> None:
        """Online EM step of each layer's mixture weight: the mean responsibility of the own rows for the
        experts the step used, under the prediction made before it (maximises the likelihood of the routing)."""
        po = own / np.maximum(own.sum(axis=1, keepdims=True), 1e-300)
        pp = pooled / np.maximum(pooled.sum(axis=1, keepdims=True), 1e-300)
        lam = self.mix[:, None]
        den = lam * po + (1 - lam) * pp
        resp = np.divide(lam * po, den, out=np.full_like(den, 0.5), where=den > 0)
        n = cur.sum(axis=1)
        ok = (n > 0) & (own.sum(axis=1) > 0)
        mean = np.where(ok, (resp * cur).sum(axis=1) / np.maximum(n, 1), self.mix)
        b = float(self.beta_mix)  # type: ignore[arg-type]
        self.mix = np.clip(b * self.mix + (1 - b) * mean, 0.02, 0.98)

    def predict(self, used: np.ndarray | None = None) -> np.ndarray:
        """``[L, E]``: expected use of each expert in the step after one that used ``used`` (default: the
        last step learnt); zeros before any step."""
        cur = self._prev if used is None else np.asarray(used) > 0
        if cur is None:
            return np.zeros(self.shape, np.float64)
        own, pooled = self._components(cur) if used is not None or self._last is None else self._last
        if self.beta_mix is None:
            return own
        lam = self.mix[:, None]
        return lam * own + (1 - lam) * pooled

    def rows(self, layers: np.ndarray | None = None, sources: np.ndarray | None = None) -> np.ndarray:
        """What one step's use of an expert adds to the next step's expected use of each expert under the current
        tables (:meth:`predict` of a step is the sum of its experts' rows): ``[L, E, E]`` for every (layer, source
        expert), or ``[n, E]`` for the pairs ``(layers[i], sources[i])``; zeros for a layer without transitions."""
        L, E = self.shape
        if layers is None or sources is None:
            grid = np.indices((L, E)).reshape(2, -1)
            return self.rows(grid[0], grid[1]).reshape(L, E, E)
        layers, sources = np.asarray(layers, np.int64), np.asarray(sources, np.int64)
        out = np.zeros((len(layers), E), np.float64)
        total = self._rows.sum(axis=1)
        ok = np.flatnonzero(total[layers] > 0)
        if not len(ok):
            return out
        lay, src = layers[ok], sources[ok]
        r = self.reuse_rate[lay]
        base = (1.0 - r)[:, None] * (self._cols[lay] / total[lay, None])
        base[np.arange(len(ok)), src] += r
        own = (self._raw[lay, src] + self.prior / self._scale * base)
        own /= (self._rows[lay, src] + self.prior / self._scale)[:, None]
        if self.beta_mix is None:
            out[ok] = own
        else:
            lam = self.mix[lay][:, None]
            out[ok] = lam * own + (1 - lam) * base
        return out

    def _components(self, cur: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The prediction from the experts' own (smoothed) rows and from the layer's pooled rule alone."""
        own = np.zeros(self.shape, np.float64)
        pooled = np.zeros(self.shape, np.float64)
        total = self._rows.sum(axis=1)
        layer, src = np.nonzero(cur & (total > 0)[:, None])  # a layer without transitions: no opinion yet
        if not len(layer):
            return own, pooled
        r = self.reuse_rate[layer]
        base = (1.0 - r)[:, None] * (self._cols[layer] / total[layer, None])
        base[np.arange(len(layer)), src] += r  # the pooled rule: reused at the layer's rate, else its marginal
        rows = (self._raw[layer, src] + self.prior / self._scale * base)
        rows /= (self._rows[layer, src] + self.prior / self._scale)[:, None]
        starts = np.flatnonzero(np.r_[True, layer[1:] != layer[:-1]])  # np.nonzero sorts by layer
        own[layer[starts]] = np.add.reduceat(rows, starts, axis=0)
        pooled[layer[starts]] = np.add.reduceat(base, starts, axis=0)
        return own, pooled


def _pairs(prev: np.ndarray, cur: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (layer, e, f) with ``prev[layer, e]`` and ``cur[layer, f]``: the k x k pairs of each layer, without
    building the ``[L, E, E]`` product."""
    pl, pe = np.nonzero(prev)
    cl, cf = np.nonzero(cur)
    n_cur = np.bincount(cl, minlength=prev.shape[0])
    start = np.concatenate([[0], np.cumsum(n_cur)[:-1]])
    reps = n_cur[pl]  # each source pairs with every expert its layer used next
    total = int(reps.sum())
    if not total:
        return (np.zeros(0, np.int64),) * 3  # type: ignore[return-value]
    first = np.repeat(np.cumsum(reps) - reps, reps)
    offset = np.arange(total) - first  # 0..n_cur-1 within each source's run
    dst = cf[np.repeat(start[pl], reps) + offset]
    return np.repeat(pl, reps), np.repeat(pe, reps), dst


class SpacEstimator(Estimator):
    """Ours: what follows the last step (learnt transitions) plus fast and slow decayed demand.

    ``scores = w_next * next + w_last * last + w_fast * fast + w_slow * slow`` where ``next`` is the
    :class:`TransitionModel`'s prediction from the last step's experts (decay ``beta_next``, ``prior``) and
    the other terms are per-token demand with the selections of rejected draft tokens weighted by
    ``rejected_weight`` (their routing was computed but is off the true path, :class:`Observation`):
    ``last`` of the last step, ``fast`` a short-memory decayed average (beta_fast) and ``slow`` a long one
    (beta_slow) that keeps popular experts resident through short gaps.
    """

    name = "spac"

    # defaults tuned on the tuning traces of docs/utility.md ("Held-out evaluation": the default model's
    # plain and drafted traces and Mixtral-8x7B HumanEval; reported on Mixtral-8x7B GSM8K and the benchmark
    # model's traces): the transitions carry most of it; a little short-memory demand breaks their ties
    def __init__(self, n_layer: int, n_expert: int, w_last: float = 0.0, w_fast: float = 0.1,
                 w_slow: float = 0.0, beta_fast: float = 0.5, beta_slow: float = 0.97,
                 rejected_weight: float = 1.0, w_next: float = 1.0, beta_next: float = 0.99,
                 prior: float = 2.0, beta_mix: float | None = 0.8) -> None:
        super().__init__(n_layer, n_expert)
        self.w_last, self.w_fast, self.w_slow, self.w_next = w_last, w_fast, w_slow, w_next
        self.rejected_weight = float(rejected_weight)
        self.fast = DecayedMean(self.shape, beta_of(beta_fast))
        self.slow = DecayedMean(self.shape, beta_of(beta_slow))
        self.last = np.zeros(self.shape)
        self.transitions = TransitionModel(*self.shape, beta=beta_next, prior=prior, beta_mix=beta_mix)
        self._scores: np.ndarray | None = None

    def _learn(self, obs: Observation) -> None:
        true_path = np.asarray(obs.true_path_counts, np.float64)
        weighted = true_path + self.rejected_weight * (np.asarray(obs.counts, np.float64) - true_path)
        demand = weighted / max(obs.n_tokens, 1)
        self.fast.add(demand)
        self.slow.add(demand)
        self.last = demand
        if self.w_next:
            self.transitions.update(weighted)
        self._scores = None

    def next_step_model(self) -> tuple[np.ndarray, float]:
        """The scores this estimator will have after the coming decode step, as a function of what it selects:
        ``(base, self_weight)`` and the rows of :meth:`next_rows`, such that the scores after a step that selects
        the set S of each layer are about ``base + self_weight * [f in S] + sum over e in S of row[l, e]``
        (``base`` ``[L, E]``). A tier that decides in the step (the flash tier's predicted admission,
        ``native/spac_engine.h``) ranks a newcomer and the experts it may displace as the estimator will once it
        has seen the step. Approximations: one token (a verify batch's counts / n taken as 1 for every selected
        expert), and the tables and mixture weights of now (the step's own update moves them a little)."""
        base = np.zeros(self.shape, np.float64)
        self_weight = self.w_last
        for mean, w in ((self.fast, self.w_fast), (self.slow, self.w_slow)):
            if w:
                a, b = mean.affine_next()
                base += w * a
                self_weight += w * b
        return base, float(self_weight)

    def next_rows(self, changed_only: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(layers, sources, rows)``: the next-step rows (``rows[i]`` ``[E]``: what using expert ``sources[i]``
        of layer ``layers[i]`` adds to each expert's score after the step) of every (layer, expert), or with
        ``changed_only`` of those whose own transition counts the last update changed (the experts of the step
        before it; the layer-wide parts of every row drift more slowly)."""
        L, E = self.shape
        if changed_only:
            layers, sources = np.nonzero(self.transitions.last_sources)
        else:
            layers, sources = (g.ravel() for g in np.indices((L, E)))
        rows = self.w_next * self.transitions.rows(layers, sources) if self.w_next else np.zeros((len(layers), E))
        return layers, sources, rows

    def scores(self) -> np.ndarray:
        if self._scores is None:  # a tier reads them twice per step (the plan, then the order of its moves)
            s = self.w_last * self.last + self.w_fast * self.fast.value + self.w_slow * self.slow.value
            if self.w_next:
                s = s + self.w_next * self.transitions.predict()
            self._scores = s
        return self._scores.copy()


ESTIMATORS: dict[str, type[Estimator]] = {
    cls.name: cls for cls in (HysteresisEstimator, DecayedAverage, FrequencyWeightedLRU, SpacEstimator)
}
"""The estimators by name (what ``spac eval-utility`` compares)."""

ALIASES: dict[str, tuple[str, dict[str, Any]]] = {"decayed-counts": ("decayed", {"half_life": 16.0})}
"""Other accepted names: an estimator with other default parameters."""

DEFAULT_ESTIMATOR = "spac"


def predicts_next_step(name: str) -> bool:
    """Whether estimator ``name`` has a next-step model (``next_step_model``: the flash tier's predicted admission)."""
    cls = ESTIMATORS.get(ALIASES[name][0] if name in ALIASES else name)
    return cls is not None and hasattr(cls, "next_step_model")


def estimator_names() -> list[str]:
    return [*ESTIMATORS, *ALIASES]


def make_estimator(name: str, n_layer: int, n_expert: int, **params: Any) -> Estimator:
    """An estimator by name: ``hysteresis``, ``decayed``, ``decayed-counts``, ``fw-lru``, ``spac``."""
    defaults: dict[str, Any] = {}
    if name in ALIASES:
        name, defaults = ALIASES[name]
        if "beta" in params:
            defaults = {}  # a decay given as beta replaces the alias's half-life
    try:
        cls = ESTIMATORS[name]
    except KeyError:
        raise SpacError(f"unknown utility estimator {name!r}; choose one of {', '.join(estimator_names())}") from None
    try:
        return cls(n_layer, n_expert, **{**defaults, **params})
    except TypeError as exc:
        raise SpacError(f"utility estimator {name!r}: {exc}") from None
