"""Cutting a dense FFN's neurons into a shared expert and equal routed experts.

A neuron's *contribution* on a token is ``|h_n| * ||down[:, n]||``: how much it moves the FFN output
(for SwiGLU, activations are signed and rarely exactly zero, so "active" is a matter of size).
The neurons with the largest mean contribution form the shared expert, which every token uses.
The rest are grouped by co-activation with balanced spherical k-means: each neuron is described by
its contribution pattern over the calibration tokens, so neurons that fire on the same tokens land in
the same expert and a token's work concentrates in few experts.
"""

from __future__ import annotations

import numpy as np


def contributions(h: np.ndarray, down: np.ndarray) -> np.ndarray:
    """``[tokens, n_ff]`` contribution sizes ``|h| * ||down column||``."""
    return np.abs(h) * np.linalg.norm(down, axis=0)[None, :]


def choose_shared(contrib: np.ndarray, n_shared: int) -> np.ndarray:
    """Ids (sorted) of the ``n_shared`` neurons with the largest mean contribution."""
    if n_shared <= 0:
        return np.zeros(0, dtype=np.int64)
    mean = contrib.mean(axis=0)
    return np.sort(np.argsort(-mean, kind="stable")[:n_shared])


def coactivation_features(contrib: np.ndarray) -> np.ndarray:
    """``[n_neurons, tokens]`` unit-norm, centred contribution patterns (cosine = correlation)."""
    f = contrib.T.astype(np.float32)
    f = f - f.mean(axis=1, keepdims=True)
    f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    return f


def balanced_assign(scores: np.ndarray, capacity: int) -> np.ndarray:
    """Assign each row to a column (higher score better), exactly ``capacity`` rows per column.

    Greedy global order: (row, column) pairs are taken from the highest score down, skipping rows
    already placed and full columns. ``scores`` is ``[n, k]`` with ``n == k * capacity``.
    """
    n, k = scores.shape
    if n != k * capacity:
        raise ValueError(f"{n} rows cannot fill {k} columns of {capacity}")
    order = np.argsort(-scores, axis=None, kind="stable")
    rows, cols = np.divmod(order, k)
    labels = np.full(n, -1, dtype=np.int64)
    fill = np.zeros(k, dtype=np.int64)
    placed = 0
    # vectorised passes: every pass places, per column, the best still-free rows that fit.
    while placed < n:
        free = labels[rows] < 0
        r, c = rows[free], cols[free]
        open_ = fill[c] < capacity
        r, c = r[open_], c[open_]
        # first occurrence of each row in score order = its best open column
        _, first = np.unique(r, return_index=True)
        first = np.sort(first)
        r, c = r[first], c[first]
        # within a column, keep the best-scoring rows up to its remaining room
        take = np.zeros(len(r), dtype=bool)
        for col in np.unique(c):
            idx = np.nonzero(c == col)[0][: capacity - fill[col]]
            take[idx] = True
        labels[r[take]] = c[take]
        np.add.at(fill, c[take], 1)
        placed += int(take.sum())
    return labels


def balanced_kmeans(features: np.ndarray, n_clusters: int, n_iter: int = 20, seed: int = 0) -> np.ndarray:
    """Balanced spherical k-means: labels ``[n]`` with exactly ``n / n_clusters`` members per cluster.

    ``features`` rows should be unit norm. Seeded (``numpy.random.default_rng(seed)``) and deterministic.
    """
    n = len(features)
    if n % n_clusters:
        raise ValueError(f"{n} neurons do not split into {n_clusters} equal experts")
    capacity = n // n_clusters
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % n_clusters)
    centroids = features[rng.choice(n, n_clusters, replace=False)]
    for _ in range(n_iter):
        new = balanced_assign(features @ centroids.T, capacity)
        if np.array_equal(new, labels):
            break
        labels = new
        centroids = np.stack([features[labels == c].mean(axis=0) for c in range(n_clusters)])
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return labels


def experts_from_labels(ids: np.ndarray, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """``[n_clusters, size]`` neuron ids per expert (sorted within each expert)."""
    return np.stack([np.sort(ids[labels == c]) for c in range(n_clusters)])
