"""Routing-realism statistics on hand-made traces."""

from __future__ import annotations

import numpy as np
import pytest

from spac_llamacpp.observe.trace import RoutingTrace
from spac_llamacpp.sim.trace_stats import (
    layer_ids,
    lru_curve,
    popularity,
    realism_report,
    reuse_rate,
    step_need,
    uniform_ids,
)


def make_trace(ids: np.ndarray, n_expert: int, step_n_tokens: list[int] | None = None) -> RoutingTrace:
    n, n_layer, _ = ids.shape
    steps = step_n_tokens or [1] * n
    assert sum(steps) == n
    token_step = np.repeat(np.arange(len(steps), dtype=np.int32), steps)
    return RoutingTrace(
        ids=ids.astype(np.int16),
        token_step=token_step,
        step_n_tokens=np.array(steps, np.int32),
        counts=np.zeros((len(steps), n_layer, n_expert), np.int32),
        moe_layers=np.arange(n_layer, dtype=np.int32),
        n_expert=n_expert,
    )


def test_lru_curve_by_hand() -> None:
    # one token per step, capacity 2: A B | A C | B A -> A, B miss; A hit, C miss (B, the older,
    # is evicted); B miss, A hit: 2 of 6. Capacity 3 keeps everything: only the 3 first uses miss
    ids = np.array([[[0, 1]], [[0, 2]], [[1, 0]]])
    need = step_need(ids, np.arange(3), 3, 4)
    per_layer, pooled = lru_curve(need, np.ones(3, bool), [2, 3])
    assert per_layer[:, 0].tolist() == pooled.tolist() == [2 / 6, 3 / 6]
    per_layer, pooled = lru_curve(need, np.array([False, True, True]), [2])  # the first step warms only
    assert pooled[0] == 2 / 4
    # -1 (not observed) is skipped; a step of two tokens using the same expert is one activation
    need = step_need(np.array([[[0, -1]], [[0, -1]], [[0, -1]]]), np.array([0, 0, 1]), 2, 4)
    assert need.sum() == 2
    assert lru_curve(need, np.ones(2, bool), [1])[1].tolist() == [0.5]


def test_popularity_skew() -> None:
    even = np.array([[[0, 1]], [[2, 3]]])  # 4 experts, each once
    p = popularity(even, 4)
    assert p.normalized_entropy[0] == pytest.approx(1.0)
    assert p.max_over_mean[0] == pytest.approx(1.0)
    skewed = np.array([[[0, 1]], [[0, 1]], [[0, 2]], [[0, -1]]])
    p = popularity(skewed, 4)
    assert p.counts[0].tolist() == [4, 2, 1, 0]
    assert p.normalized_entropy[0] < 0.75
    assert p.top_quarter_share[0] == pytest.approx(4 / 7)


def test_reuse_and_uniform_reference() -> None:
    same = np.tile(np.array([[[3, 5]]]), (10, 1, 1))
    assert reuse_rate(same)[0] == pytest.approx(1.0)
    uni = uniform_ids(4000, 2, 2, 16, seed=1)
    assert ((uni >= 0) & (uni < 16)).all() and (uni[:, :, 0] != uni[:, :, 1]).all()
    assert reuse_rate(uni) == pytest.approx([2 / 16] * 2, abs=0.02)
    need = step_need(uni, np.arange(len(uni)), len(uni), 16)
    per_layer, pooled = lru_curve(need, np.ones(len(uni), bool), [8])
    assert per_layer[0] == pytest.approx([0.5, 0.5], abs=0.03) and pooled[0] == pytest.approx(0.5, abs=0.03)


def test_realism_report_decode_only() -> None:
    rng = np.random.default_rng(0)
    # a sticky router: each token keeps the previous token's experts 90% of the time
    ids = np.zeros((600, 3, 2), np.int64)
    cur = np.array([[0, 1]] * 3)
    for t in range(600):
        for layer in range(3):
            if rng.random() > 0.9:
                cur[layer] = rng.choice(8, 2, replace=False)
        ids[t] = cur
    trace = make_trace(ids, 8, [100] + [1] * 500)
    ids_l, counted = layer_ids(trace, decode_only=True)
    assert counted.sum() == 500 and not counted[0] and len(counted) == 501
    rep = realism_report(trace, capacities=[2, 4], decode_only=True)
    js = rep.to_json()
    assert js["counted_tokens"] == js["counted_steps"] == 500 and js["moe_layers"] == 3
    assert js["lru"]["4"]["hit_rate"] > js["lru"]["4"]["uniform"] + 0.3
    assert js["lru"]["4"]["uniform"] == pytest.approx(0.5, abs=0.08)
    assert min(js["reuse"]) > 0.8
