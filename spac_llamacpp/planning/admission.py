"""Layer admission, the rule the flash engine applies in each MoE layer's hook, in Python.

The engine (``native/spac_engine.h``, "Layer admission") decides in the hook of every MoE layer, while the
step runs, whether a miss (an expert the layer selected and the plan does not hold, read on demand anyway)
stays: it takes the place of the layer's planned expert of the lowest rank that the layer is not using,
when it ranks higher than that expert (its rank counting at least ``newcomer_floor``; ``inf``: always,
LRU's rule). With predicted ranks (``admission="predict"``, ours' default) the layer's ranks are first
replaced by the ones the estimator will give after the step, from what the layer selected
(:func:`predicted_ranks`, ``SpacEstimator.next_step_model``).

This module is that rule for ``spac simulate`` (``sim/policies.py``: ours replays the runtime tier's
admission) and the reference the engine is tested against (``tests/test_flash.py``): same order (misses in
increasing expert id), same victims (ties: the highest id), same arithmetic (float32, summed in the
engine's order).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def predicted_ranks(base: np.ndarray, self_weight: float, rows: np.ndarray, selected: np.ndarray) -> np.ndarray:
    """One layer's ranks after a step that selects ``selected`` (``[E]`` bool): ``base`` ``[E]`` + ``self_weight``
    for a selected expert + the selected experts' ``rows`` (``[E, E]``), in float32 as the engine sums them."""
    r = np.asarray(base, np.float32).copy()
    w = np.float32(self_weight)
    rows32 = np.asarray(rows, np.float32)
    for x in np.flatnonzero(selected):
        r[x] += w
        r += rows32[x]
    return r


def admit_layer(held: np.ndarray, selected: np.ndarray, rank: np.ndarray, newcomer_floor: float = -np.inf) -> int:
    """Admit one layer's misses into ``held`` (``[E]`` bool, changed in place) by the engine's rule; ``rank``
    ``[E]`` (float32, changed in place: an admitted expert takes its counted rank). Returns the admissions."""
    rank = np.asarray(rank, np.float32)
    floor = np.float32(newcomer_floor)
    admitted = 0
    for x in np.flatnonzero(selected & ~held):
        idle = np.flatnonzero(held & ~selected)
        if not len(idle):
            break
        low = rank[idle].min()
        victim = int(idle[rank[idle] == low].max())
        mine = max(rank[x], floor)
        if not rank[victim] < mine:
            continue
        held[victim], held[x] = False, True
        rank[x] = mine
        admitted += 1
    return admitted


def admit_step(held: np.ndarray, need: np.ndarray, ranks: Callable[[int, np.ndarray], np.ndarray],
               newcomer_floor: float = -np.inf) -> tuple[np.ndarray, int]:
    """A whole step's admissions: ``held`` and ``need`` ``[L, E]``, ``ranks(layer, selected)`` the layer's ranks
    at its hook. Returns the residency after the step and the number of admissions."""
    out = np.asarray(held, bool).copy()
    need = np.asarray(need, bool)
    n = 0
    for i in range(out.shape[0]):
        if (need[i] & ~out[i]).any():
            n += admit_layer(out[i], need[i], np.array(ranks(i, need[i]), np.float32), newcomer_floor)
    return out, n
