"""The reference expert caches (LRU, LFU, Belady's MIN) and the one definition of hit rate.

Every statistic and report of the project counts hits the same way (``docs/hit_rate.md``):

    hit rate = activations served from fast memory / activations

where an **activation** is a distinct (step, MoE layer, expert) that at least one token of the step
routed to, and it is **served from fast memory** (a hit) when the expert was resident when its layer
ran in that step, before the misses' own loads. A step is one evaluation: a prompt, one decoded token,
or a verification batch of k drafts (k + 1 tokens). :func:`count_hits` and :func:`hit_rate` are that
definition in code.

The input of every cache here is ``need``: ``[n_steps, n_layer, n_expert]`` booleans, the experts each
step selected in each layer (:func:`need_from_counts`, :func:`need_from_ids`), with an optional
``counted [n_steps]`` flag for the steps whose activations are tallied (the others still update the
cache, e.g. a prompt that warms it).

The caches are **per layer** (``capacity`` experts in each layer, one number or one per layer),
**demand-only** (an expert enters only when a step needs it and it is not resident: no prefetch) and
**start empty** (the first use of every expert is a miss). After each step a cache keeps, per layer, at
most ``capacity`` experts out of the ones it held and the ones the step needed, the highest ranked by
its rule; ties go to the experts that were resident (no transfer), then to the lower expert id. This
is also the rule when a step needs more distinct experts than the capacity: all of them are needed in
that step (the resident ones are hits, the others misses: loaded or computed from the slow tier), and
only ``capacity`` of them stay afterwards.

- :class:`LRUCache`: rank = the last step that used the expert (all of a step's experts are equally
  recent);
- :class:`LFUCache`: rank = steps that used the expert so far (ties: the more recent);
- :class:`RankedCache`: any rank the caller passes each step (an estimator's utility);
- :class:`MinCache`: Belady's MIN, offline: rank = how soon the expert is needed again; an expert
  never needed again is not kept (bypassed or evicted). With the transitions above (after step t a
  layer holds any ``capacity`` of its held and needed experts), MIN has the most hits of every demand
  policy at every capacity, which ``tests/test_references.py`` checks against an exhaustive search.

:func:`replay` runs a cache over ``need`` and returns hits and activations per step and layer, the
admissions (loads) and, on request, what was resident at the start of every step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

NEVER = np.iinfo(np.int64).max
"""Next use of an expert that is never needed again."""


# --------------------------------------------------------------------------------------------------
# The hit-rate definition


def count_hits(need: np.ndarray, held: np.ndarray) -> tuple[int, int]:
    """``(hits, activations)``: ``need`` the activations (bool, any shape, e.g. ``[L, E]`` or
    ``[T, L, E]``), ``held`` what fast memory held when they ran (same shape, or broadcastable)."""
    need = np.asarray(need, dtype=bool)
    return int((need & np.asarray(held, dtype=bool)).sum()), int(need.sum())


def hit_rate(hits: int, activations: int) -> float | None:
    """Hits / activations; None when there was no activation."""
    return hits / activations if activations else None


def need_from_counts(counts: np.ndarray) -> np.ndarray:
    """Activations ``[T, L, E]`` bool from per-step selection counts ``[T, L, E]``."""
    return np.asarray(counts) > 0


def need_from_ids(ids: np.ndarray, token_step: np.ndarray, n_steps: int, n_expert: int) -> np.ndarray:
    """Activations ``[n_steps, L, n_expert]`` from per-token ids ``[n_tokens, L, k]`` (negative: not
    observed) and each token's step ``[n_tokens]``."""
    ids = np.asarray(ids)
    n_tokens, n_layer, k = ids.shape
    need = np.zeros((n_steps, n_layer, n_expert), dtype=bool)
    if n_tokens == 0:
        return need
    step = np.broadcast_to(np.asarray(token_step, dtype=np.int64)[:, None, None], ids.shape)
    layer = np.broadcast_to(np.arange(n_layer)[None, :, None], ids.shape)
    ok = (ids >= 0) & (ids < n_expert)
    need[step[ok], layer[ok], ids[ok].astype(np.int64)] = True
    return need


# --------------------------------------------------------------------------------------------------
# Caches


def _capacity(capacity: int | Sequence[int] | np.ndarray, n_layer: int, n_expert: int) -> np.ndarray:
    cap = np.broadcast_to(np.asarray(capacity, dtype=np.int64), (n_layer,)).copy()
    if (cap < 0).any():
        raise ValueError(f"cache capacity must be >= 0 experts per layer, not {capacity}")
    return np.minimum(cap, n_expert)


class DemandCache:
    """Per-layer demand cache of ``capacity`` experts per layer, empty at the start (module docstring).

    Subclasses give the rank (:meth:`rank`); :meth:`step` observes one step and returns its hits.
    """

    name = "demand"

    def __init__(self, n_layer: int, n_expert: int, capacity: int | Sequence[int] | np.ndarray) -> None:
        self.shape = (int(n_layer), int(n_expert))
        self.capacity = _capacity(capacity, *self.shape)
        self.resident = np.zeros(self.shape, dtype=bool)
        self.t = 0  # steps observed
        self._ids = np.broadcast_to(np.arange(self.shape[1]), self.shape)

    def rank(self, need: np.ndarray) -> np.ndarray:
        """``[L, E]`` float: higher is kept first; ``-inf`` is never kept. Called once per step, after
        the step's activations ``need``, before the cache chooses what to keep."""
        raise NotImplementedError

    def step(self, need: np.ndarray, rank: np.ndarray | None = None) -> np.ndarray:
        """Observe one step's activations ``[L, E]``; returns its hits (``need & resident`` before the
        step). Then keeps, per layer, the ``capacity`` best-ranked of the held and needed experts."""
        need = np.asarray(need, dtype=bool)
        if need.shape != self.shape:
            raise ValueError(f"step activations have shape {need.shape}, the cache {self.shape}")
        hits = need & self.resident
        key = np.asarray(self.rank(need) if rank is None else rank, dtype=np.float64)
        cand = (self.resident | need) & (key > -np.inf)
        # per row: candidates first, then higher rank, then resident, then lower id
        order = np.lexsort((self._ids, ~self.resident, -key, ~cand), axis=-1)
        pos = np.empty(self.shape, dtype=np.int64)
        np.put_along_axis(pos, order, np.broadcast_to(np.arange(self.shape[1]), self.shape), axis=-1)
        self.resident = cand & (pos < self.capacity[:, None])
        self.t += 1
        return hits


class LRUCache(DemandCache):
    """Least recently used: keeps the experts of the most recent steps."""

    name = "lru"

    def __init__(self, n_layer: int, n_expert: int, capacity: int | Sequence[int] | np.ndarray) -> None:
        super().__init__(n_layer, n_expert, capacity)
        self.last_use = np.full(self.shape, -1.0)

    def rank(self, need: np.ndarray) -> np.ndarray:
        self.last_use[need] = self.t
        return self.last_use


class LFUCache(DemandCache):
    """Least frequently used: keeps the experts used by the most steps so far (ties: more recent)."""

    name = "lfu"

    def __init__(self, n_layer: int, n_expert: int, capacity: int | Sequence[int] | np.ndarray) -> None:
        super().__init__(n_layer, n_expert, capacity)
        self.uses = np.zeros(self.shape, dtype=np.int64)
        self.last_use = np.full(self.shape, -1, dtype=np.int64)

    def rank(self, need: np.ndarray) -> np.ndarray:
        self.uses += need
        self.last_use[need] = self.t
        return self.uses + (self.last_use + 1) / (self.t + 2)  # the fraction (< 1) only breaks ties


class RankedCache(DemandCache):
    """Demand cache ranked by ``rank_fn(need)`` (e.g. an estimator updated with the step, then its
    utility); or pass ``rank`` to :meth:`step` directly."""

    name = "ranked"

    def __init__(self, n_layer: int, n_expert: int, capacity: int | Sequence[int] | np.ndarray,
                 rank_fn: Callable[[np.ndarray], np.ndarray] | None = None, name: str = "ranked") -> None:
        super().__init__(n_layer, n_expert, capacity)
        self.rank_fn = rank_fn
        self.name = name

    def rank(self, need: np.ndarray) -> np.ndarray:
        if self.rank_fn is None:
            raise ValueError("RankedCache.step needs a rank (or a rank_fn)")
        return self.rank_fn(need)


class NextUse:
    """Clairvoyant next use of every (layer, expert) while a ``need`` sequence ``[T, L, E]`` is replayed.

    ``now[l, e]`` is the first step ``>= t`` that needs (l, e) (:data:`NEVER` if none) before
    :meth:`advance` moves past step t.
    """

    def __init__(self, need: np.ndarray) -> None:
        need = np.asarray(need, dtype=bool)
        self.need = need
        T, L, E = need.shape
        t, flat = np.nonzero(need.reshape(T, L * E))  # sorted by step
        order = np.argsort(flat, kind="stable")
        self._uses = t[order].astype(np.int64)  # per flat index, its steps in increasing order
        counts = np.bincount(flat, minlength=L * E)
        self._start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self._count = counts.astype(np.int64)
        self._ptr = np.zeros(L * E, dtype=np.int64)
        self.t = 0
        self.now = np.full(L * E, NEVER, dtype=np.int64)
        have = self._count > 0
        self.now[have] = self._uses[self._start[have]]
        self.now = self.now.reshape(L, E)

    def advance(self) -> None:
        """Move past the current step: its experts' next use becomes their following one."""
        flat = np.flatnonzero(self.need[self.t])
        self._ptr[flat] += 1
        more = self._ptr[flat] < self._count[flat]
        nxt = np.full(len(flat), NEVER, dtype=np.int64)
        nxt[more] = self._uses[self._start[flat[more]] + self._ptr[flat[more]]]
        self.now.reshape(-1)[flat] = nxt
        self.t += 1


class MinCache(DemandCache):
    """Belady's MIN (offline, demand-only): keeps the experts needed again soonest; one never needed
    again is not kept. Built on the whole ``need`` sequence, which :meth:`step` must then follow."""

    name = "min"

    def __init__(self, need: np.ndarray, capacity: int | Sequence[int] | np.ndarray) -> None:
        need = np.asarray(need, dtype=bool)
        super().__init__(need.shape[1], need.shape[2], capacity)
        self.next_use = NextUse(need)

    def rank(self, need: np.ndarray) -> np.ndarray:
        nu = self.next_use
        if nu.t >= len(nu.need) or not np.array_equal(need, nu.need[nu.t]):
            raise ValueError(f"MinCache replayed a step {nu.t} that is not the sequence it was built on")
        nu.advance()
        return np.where(nu.now == NEVER, -np.inf, -nu.now.astype(np.float64))


# --------------------------------------------------------------------------------------------------
# Replay


@dataclass(frozen=True)
class Replay:
    """What a cache did over a ``need`` sequence."""

    name: str
    layer_hits: np.ndarray  # [T, L] hits per step and layer (every step, counted or not)
    layer_activations: np.ndarray  # [T, L] activations per step and layer
    admissions: np.ndarray  # [T] experts that entered the cache after each step (loads)
    counted: np.ndarray  # [T] bool: steps whose activations count
    held: np.ndarray | None = None  # [T, L, E] resident at the start of each step (keep_held=True)

    @property
    def hits(self) -> int:
        return int(self.layer_hits[self.counted].sum())

    @property
    def activations(self) -> int:
        return int(self.layer_activations[self.counted].sum())

    @property
    def hit_rate(self) -> float | None:
        return hit_rate(self.hits, self.activations)

    def per_layer_hit_rate(self) -> np.ndarray:
        """``[L]`` hit rate of each layer over the counted steps (NaN where a layer had no activation)."""
        h = self.layer_hits[self.counted].sum(axis=0)
        a = self.layer_activations[self.counted].sum(axis=0)
        return np.divide(h, a, out=np.full(len(a), np.nan), where=a > 0)

    def per_step_hit_rate(self) -> np.ndarray:
        """``[T]`` hit rate of each step (NaN where a step had no activation)."""
        h, a = self.layer_hits.sum(axis=1), self.layer_activations.sum(axis=1)
        return np.divide(h, a, out=np.full(len(a), np.nan), where=a > 0)


def replay(cache: DemandCache, need: np.ndarray, counted: np.ndarray | None = None,
           keep_held: bool = False, ranks: Callable[[int, np.ndarray], np.ndarray] | None = None) -> Replay:
    """Run ``cache`` over ``need`` ``[T, L, E]``; ``ranks(t, need[t])`` overrides the cache's rank."""
    need = np.asarray(need, dtype=bool)
    T, L, _ = need.shape
    counted = np.ones(T, dtype=bool) if counted is None else np.asarray(counted, dtype=bool)
    if counted.shape != (T,):
        raise ValueError(f"counted has shape {counted.shape}, expected ({T},)")
    layer_hits = np.zeros((T, L), dtype=np.int64)
    admissions = np.zeros(T, dtype=np.int64)
    held = np.zeros(need.shape, dtype=bool) if keep_held else None
    for t in range(T):
        before = cache.resident
        if held is not None:
            held[t] = before
        hits = cache.step(need[t], None if ranks is None else ranks(t, need[t]))
        layer_hits[t] = hits.sum(axis=1)
        admissions[t] = int((cache.resident & ~before).sum())
    return Replay(cache.name, layer_hits, need.sum(axis=2).astype(np.int64), admissions, counted, held)


def lru(need: np.ndarray, capacity: int | Sequence[int] | np.ndarray, counted: np.ndarray | None = None,
        keep_held: bool = False) -> Replay:
    """:func:`replay` of an :class:`LRUCache`."""
    need = np.asarray(need, dtype=bool)
    return replay(LRUCache(need.shape[1], need.shape[2], capacity), need, counted, keep_held)


def belady_min(need: np.ndarray, capacity: int | Sequence[int] | np.ndarray, counted: np.ndarray | None = None,
               keep_held: bool = False) -> Replay:
    """:func:`replay` of a :class:`MinCache` (Belady's MIN)."""
    return replay(MinCache(need, capacity), need, counted, keep_held)


__all__ = [
    "NEVER",
    "DemandCache",
    "LFUCache",
    "LRUCache",
    "MinCache",
    "NextUse",
    "RankedCache",
    "Replay",
    "belady_min",
    "count_hits",
    "hit_rate",
    "lru",
    "need_from_counts",
    "need_from_ids",
    "replay",
]
