"""Utility estimators and their evaluation on traces."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.observe.trace import RoutingTrace
from spac_llamacpp.planning.estimators import (
    ALIASES,
    ESTIMATORS,
    DecayedAverage,
    DecayedMean,
    FrequencyWeightedLRU,
    HysteresisEstimator,
    Observation,
    SpacEstimator,
    make_estimator,
)
from spac_llamacpp.sim.utility_eval import evaluate, lru_kept, min_kept

BIN = Path(sys.executable).parent


def obs(counts, n_tokens=None, accepted=None):
    c = np.asarray(counts, dtype=np.int64).reshape(1, -1)
    acc = None if accepted is None else np.asarray(accepted, dtype=np.int64).reshape(1, -1)
    return Observation(c, n_tokens or int(c.sum()), acc)


def test_hysteresis_rule_of_moe_spac():
    h = HysteresisEstimator(1, 3)
    h.update(obs([5, 4, 0]))  # up when count >= state + 5
    assert h.state.tolist() == [[1, 0, 0]]
    assert h.utility().tolist() == [[9, 0, 0]]  # the state's shape, in tokens: 9 selections per step
    h.update(obs([6, 9, 0]))
    assert h.state.tolist() == [[2, 1, 0]]
    h.update(obs([1, 1, 0]))  # down when count < state
    assert h.state.tolist() == [[1, 1, 0]]
    for _ in range(10):
        h.update(obs([20, 0, 0]))
    assert h.state[0, 0] == 5  # capped


def test_decayed_average_has_inertia():
    d = DecayedAverage(1, 2, beta=0.5)
    d.update(obs([2, 0], n_tokens=2))
    d.update(obs([0, 2], n_tokens=2))
    u = d.utility()[0]
    assert u[1] > u[0] > 0  # recent demand leads, but the older one is not forgotten at once
    with pytest.raises(SpacError):
        DecayedAverage(1, 2, beta=1.0)


def test_frequency_weighted_lru_orders_by_recency_then_frequency():
    f = FrequencyWeightedLRU(1, 3)
    f.update(obs([5, 0, 0]))
    f.update(obs([0, 1, 3]))
    u = f.utility()[0]
    assert u[2] > u[1] > u[0]


def test_spac_estimator_discounts_rejected_drafts():
    a = SpacEstimator(1, 2, rejected_weight=0.0)
    a.update(obs([1, 3], n_tokens=4, accepted=[1, 0]))  # expert 1 only chosen by rejected drafts
    assert a.utility()[0, 0] > a.utility()[0, 1] == 0
    b = SpacEstimator(1, 2, rejected_weight=1.0)
    b.update(obs([1, 3], n_tokens=4, accepted=[1, 0]))
    assert b.utility()[0, 1] > b.utility()[0, 0]


def test_spac_estimator_weighting_needs_a_rejection():
    a, b = SpacEstimator(1, 3, rejected_weight=0.25), SpacEstimator(1, 3, rejected_weight=1.0)
    for est in (a, b):
        est.update(obs([2, 2, 0], n_tokens=2))  # a plain step
        est.update(obs([1, 2, 1], n_tokens=2, accepted=[1, 2, 1]))  # every draft accepted
    np.testing.assert_allclose(a.utility(), b.utility())
    for est in (a, b):
        est.update(obs([0, 1, 3], n_tokens=2, accepted=[0, 1, 1]))  # the draft's expert 2 was off the path
    assert a.utility()[0, 2] < b.utility()[0, 2]
    np.testing.assert_allclose(a.utility().sum(), b.utility().sum())  # the same expected tokens, shaped otherwise


def test_decayed_mean_is_normalised_from_the_first_value():
    m = DecayedMean((2,), beta=0.5)
    assert not m.seen and m.value.tolist() == [0, 0]
    m.add([2.0, 0.0])
    assert m.value.tolist() == [2, 0]
    m.add([0.0, 2.0])
    np.testing.assert_allclose(m.value, [2 / 3, 4 / 3])  # weights 0.25 and 0.5 over 0.75
    with pytest.raises(SpacError):
        DecayedMean((), beta=1.0)


def test_one_registry_with_aliases():
    assert set(ESTIMATORS) == {"hysteresis", "decayed", "fw-lru", "spac"} and set(ALIASES) == {"decayed-counts"}
    counts = make_estimator("decayed-counts", 1, 2)
    assert type(counts) is DecayedAverage and counts.beta == pytest.approx(2 ** (-1 / 16))
    assert make_estimator("decayed", 1, 2).beta == 0.8
    assert make_estimator("decayed-counts", 1, 2, half_life=8).beta == pytest.approx(2 ** (-1 / 8))
    assert make_estimator("decayed-counts", 1, 2, beta=0.5).beta == 0.5
    assert make_estimator("spac", 1, 2, rejected_weight=0.25).rejected_weight == 0.25
    with pytest.raises(SpacError, match="decayed-counts"):
        make_estimator("nope", 1, 1)
    with pytest.raises(SpacError):
        make_estimator("spac", 1, 2, nope=1.0)
    with pytest.raises(SpacError):
        make_estimator("decayed", 1, 2, beta=0.5, half_life=3)


def synthetic_trace(steps: int = 60, n_layer: int = 2, n_expert: int = 8, seed: int = 0) -> RoutingTrace:
    """Each token picks 2 experts; experts 0-2 are hot (with temporal locality)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((steps, n_layer, 2), dtype=np.int16)
    for t in range(steps):
        for layer in range(n_layer):
            hot = rng.random() < 0.8
            ids[t, layer] = rng.choice(3, 2, replace=False) if hot else rng.choice(np.arange(3, n_expert), 2, False)
    counts = np.zeros((steps, n_layer, n_expert), dtype=np.int32)
    for t in range(steps):
        for layer in range(n_layer):
            counts[t, layer, ids[t, layer]] += 1
    return RoutingTrace(ids=ids, token_step=np.arange(steps, dtype=np.int32),
                        step_n_tokens=np.ones(steps, np.int32), counts=counts,
                        moe_layers=np.arange(n_layer, dtype=np.int32), n_expert=n_expert)


def test_lru_and_min_by_hand():
    # one layer, budget 2, one expert per step: 0 | 1 | 2 | 0. Both start empty. LRU holds {0}, {0,1},
    # then {1,2} (0 is the least recent) and misses 0 at the end; MIN never keeps 1 or 2 (not used
    # again), so 0 stays and hits
    seq = [0, 1, 2, 0]
    counts = np.zeros((4, 1, 3), dtype=np.int32)
    ids = np.full((4, 1, 2), -1, dtype=np.int16)
    for step, e in enumerate(seq):
        counts[step, 0, e] = 1
        ids[step, 0, 0] = e
    t = RoutingTrace(ids, np.arange(4, dtype=np.int32), np.ones(4, np.int32), counts, np.array([0]), 3)
    assert [k[0].tolist() for k in lru_kept(t, 2)] == [[True, False, False], [True, True, False],
                                                       [False, True, True]]
    assert [k[0].tolist() for k in min_kept(t, 2)] == [[True, False, False]] * 3
    scores = {s.policy: s for s in evaluate(t, 2)}
    assert (scores["lru"].hits, scores["lru"].activations) == (0, 3)  # steps 1..3 are scored
    assert (scores["min"].hits, scores["min"].activations) == (1, 3)
    assert scores["min"].hit_rate == pytest.approx(1 / 3)


def test_min_and_oracle_bound_the_others():
    t = synthetic_trace()
    for budget in (1, 2, 3, 5):
        scores = {s.policy: s for s in evaluate(t, budget)}
        assert scores["oracle"].hit_rate >= max(s.hit_rate for s in scores.values()) - 1e-12
        assert scores["min"].hits >= scores["lru"].hits
        for mask in min_kept(t, budget):
            assert (mask.sum(axis=1) <= budget).all()
    # every expert fits: the demand caches miss exactly the first use of each expert. Step 0 is not
    # scored (nothing was kept before it), so the misses are the experts first used after step 0.
    full = {s.policy: s for s in evaluate(t, 8)}
    need = t.counts > 0
    first = need.argmax(axis=0)
    late_first_uses = int((need.any(axis=0) & (first >= 1)).sum())
    scored = int(need[1:].sum())
    assert 0 < late_first_uses < scored
    for name in ("lru", "min"):
        s = full[name]
        assert s.activations == scored and s.hits == scored - late_first_uses, name
        assert s.loads_per_step * s.steps == pytest.approx(late_first_uses)


def test_estimators_learn_the_hot_set():
    t = synthetic_trace(steps=200)
    scores = {s.policy: s.hit_rate for s in evaluate(t, 3)}
    for name in ("decayed", "spac"):
        assert scores[name] > 0.7, scores  # random choice of 3 of 8 experts would give ~0.38


def test_bad_budget(tmp_path):
    with pytest.raises(SpacError):
        evaluate(synthetic_trace(), 0)
    with pytest.raises(SpacError):
        evaluate(synthetic_trace(), 9)


def test_eval_utility_cli(tmp_path):
    path = synthetic_trace().save(tmp_path / "t.npz")
    png, js = tmp_path / "h.png", tmp_path / "h.json"
    proc = subprocess.run([str(BIN / "spac"), "eval-utility", str(path), "--budget-experts", "3",
                           "--png", str(png), "--json", str(js)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("hysteresis", "decayed", "fw-lru", "spac", "lru", "min", "oracle"):
        assert name in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    assert {s["policy"] for s in data["scores"]} >= {"lru", "min", "spac"} and data["sweep"]
    bad = subprocess.run([str(BIN / "spac"), "eval-utility", str(path), "--budget-experts", "99"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")
