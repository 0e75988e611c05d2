"""Helpers on utilities (``[n_moe_layer, n_expert]`` expected tokens per step, see ``estimators.py``).

The estimators themselves (one protocol, ``estimators.UtilityEstimator``; one factory,
``estimators.make_estimator``) live in ``estimators.py``.
"""

from __future__ import annotations

import math

import numpy as np


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
