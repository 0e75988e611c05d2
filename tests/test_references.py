"""The shared reference caches (planning/reference_caches.py): Belady's MIN is never beaten by a demand
policy, the caches start empty, and the one hit rate is the same number in every tool."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spac_llamacpp.gguf.info import inspect_model
from spac_llamacpp.models.default import default_draft_path, default_model_path
from spac_llamacpp.observe.trace import RoutingTrace
from spac_llamacpp.planning.costmodel import CostModel, CpuKernel, ExpertLayout, GpuCost, ReadCost
from spac_llamacpp.planning.estimators import ESTIMATORS, Observation, make_estimator
from spac_llamacpp.planning.reference_caches import (
    LFUCache,
    LRUCache,
    MinCache,
    RankedCache,
    belady_min,
    count_hits,
    hit_rate,
    lru,
    need_from_counts,
    need_from_ids,
    replay,
)
from spac_llamacpp.sim.policies import SimSetup, layer_capacities
from spac_llamacpp.sim.simulator import simulate
from spac_llamacpp.sim.trace_stats import realism_report
from spac_llamacpp.sim.utility_eval import (
    _score,
    estimator_demand_kept,
    evaluate,
    observations,
    trace_need,
)

BIN = Path(sys.executable).parent


def random_need(rng: np.random.Generator, steps: int, n_layer: int, n_expert: int, k: int,
                max_tokens: int, skew: float) -> tuple[np.ndarray, np.ndarray]:
    """``(need [T, L, E], counts [T, L, E])``: steps of 1..max_tokens tokens, each picking k experts of
    a Zipf-like popularity (``skew`` 0: uniform)."""
    p = 1.0 / np.arange(1, n_expert + 1) ** skew
    counts = np.zeros((steps, n_layer, n_expert), np.int64)
    for t in range(steps):
        for _ in range(int(rng.integers(1, max_tokens + 1))):
            for layer in range(n_layer):
                perm = rng.permutation(n_expert)  # a different hot set per layer
                counts[t, layer, perm[rng.choice(n_expert, k, replace=False, p=p / p.sum())]] += 1
    return counts > 0, counts


SHAPES = [  # steps, layers, experts, top-k, tokens per step up to, skew
    (80, 2, 8, 2, 1, 1.0),
    (60, 3, 16, 2, 6, 1.2),
    (50, 2, 12, 4, 9, 0.0),
    (40, 1, 32, 8, 3, 0.8),
]


def demand_policies(need: np.ndarray, counts: np.ndarray, capacity: int, rng: np.random.Generator):
    """(name, Replay) of demand policies other than MIN at ``capacity``, all over the same ``need``."""
    T, L, E = need.shape
    out = [("lru", lru(need, capacity)), ("lfu", replay(LFUCache(L, E, capacity), need))]
    random_rank = rng.random((T, L, E))
    out.append(("random", replay(RankedCache(L, E, capacity), need, ranks=lambda t, _n: random_rank[t])))
    total = np.zeros((L, E))

    def cumulative(t: int, _n: np.ndarray) -> np.ndarray:  # pin-hot-by-count's rank: tokens so far
        total[...] = total + counts[t]
        return total.copy()

    out.append(("pin", replay(RankedCache(L, E, capacity), need, ranks=cumulative)))
    for name in (*ESTIMATORS, "decayed-counts"):
        est = make_estimator(name, L, E)

        def rank(t: int, _n: np.ndarray, est=est) -> np.ndarray:
            est.update(Observation(counts[t], max(1, int(counts[t, 0].sum()))))  # ranks: the scale is moot
            return np.asarray(est.utility(), dtype=np.float64)

        out.append((name, replay(RankedCache(L, E, capacity), need, ranks=rank)))
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_min_is_never_beaten_on_random_traces(shape):
    rng = np.random.default_rng(sum(shape[:4]))
    need, counts = random_need(rng, *shape)
    T, L, E = need.shape
    first_uses = int(need.any(axis=0).sum())
    for capacity in range(1, E + 1):
        best = belady_min(need, capacity)
        for name, r in demand_policies(need, counts, capacity, rng):
            assert r.activations == best.activations == need.sum()
            assert r.hits <= best.hits, (name, capacity, r.hits, best.hits)
        if capacity == E:  # everything fits: a demand cache misses exactly the first uses
            assert best.hits == lru(need, capacity).hits == need.sum() - first_uses


def test_caches_start_empty_admit_on_demand_and_keep_capacity():
    rng = np.random.default_rng(7)
    need, counts = random_need(rng, 60, 3, 10, 3, 5, 1.0)
    T, L, E = need.shape
    layer, expert = np.nonzero(need.any(axis=0))
    first = need.argmax(axis=0)[layer, expert]
    for capacity in (1, 3, 5, 10):
        for cache in (LRUCache(L, E, capacity), LFUCache(L, E, capacity), MinCache(need, capacity)):
            r = replay(cache, need, keep_held=True)
            assert not r.held[0].any(), cache.name  # empty at the start
            assert not r.held[first, layer, expert].any(), cache.name  # first use: a miss
            for t in range(1, T):  # only what was held or needed; at most the capacity
                assert not (r.held[t] & ~(r.held[t - 1] | need[t - 1])).any()
                assert (r.held[t].sum(axis=1) <= capacity).all()
            assert r.admissions.sum() == (r.held[1:] & ~r.held[:-1]).sum() + (cache.resident & ~r.held[-1]).sum()
            h, a = count_hits(need, r.held)
            assert (h, a) == (r.hits, r.activations)


def optimum_hits(need: np.ndarray, capacity: int) -> int:
    """The most hits any demand cache can get: exhaustive search over what each layer keeps
    (any ``capacity`` of the held and needed experts after each step)."""
    total = 0
    for layer in range(need.shape[1]):
        masks = [sum(1 << e for e in np.flatnonzero(need[t, layer])) for t in range(len(need))]
        best = {0: 0}  # held set (bitmask) -> most hits so far
        for m in masks:
            nxt: dict[int, int] = {}
            for held, hits in best.items():
                hits += bin(held & m).count("1")
                pool = [e for e in range(need.shape[2]) if (held | m) >> e & 1]
                for r in range(min(capacity, len(pool)) + 1):
                    for keep in itertools.combinations(pool, r):
                        s = sum(1 << e for e in keep)
                        nxt[s] = max(nxt.get(s, -1), hits)
            best = nxt
        total += max(best.values())
    return total


def test_min_equals_the_exhaustive_optimum():
    rng = np.random.default_rng(3)
    for trial in range(30):
        n_expert = int(rng.integers(3, 6))
        need, _ = random_need(rng, int(rng.integers(4, 9)), 2, n_expert, int(rng.integers(1, 3)),
                              int(rng.integers(1, 4)), 0.7)
        for capacity in range(1, n_expert + 1):
            assert belady_min(need, capacity).hits == optimum_hits(need, capacity), (trial, capacity)


def test_capacity_below_one_steps_experts():
    # a step needs 3 experts of a layer with room for 2: all 3 are needed (1 hit, 2 misses), 2 stay
    need = np.zeros((3, 1, 4), bool)
    need[0, 0, [0, 3]] = True
    need[1, 0, [0, 1, 2]] = True
    need[2, 0, [1, 2]] = True
    r = lru(need, 2, keep_held=True)
    assert r.layer_hits[:, 0].tolist() == [0, 1, 1]  # step 1: 0 resident; step 2: 1 (kept: lower id of 1, 2)
    assert r.held[2, 0].tolist() == [True, True, False, False]  # ties: the resident 0 first, then id
    m = belady_min(need, 2, keep_held=True)
    assert m.held[2, 0].tolist() == [False, True, True, False] and m.hits == 1 + 2
    assert lru(need, 0).hits == belady_min(need, 0).hits == 0


def test_hit_rate_definition():
    need = np.array([[True, True, False], [False, True, True]])
    held = np.array([[True, False, True], [False, False, True]])
    assert count_hits(need, held) == (2, 4) and hit_rate(2, 4) == 0.5 and hit_rate(0, 0) is None
    # activations are distinct experts per step: two tokens routed to one expert in a step are one
    ids = np.array([[[0, 1]], [[0, 2]], [[0, 1]]])
    assert need_from_ids(ids, np.array([0, 0, 1]), 2, 3).tolist() == [[[True, True, True]], [[True, True, False]]]


# --- a recorded trace of the shipped default model, drafted (verification steps of several tokens) --


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> RoutingTrace:
    out = tmp_path_factory.mktemp("refs") / "t.npz"
    proc = subprocess.run([str(BIN / "spac"), "trace", str(default_model_path()), "--draft", str(default_draft_path()),
                           "-p", "ROMEO.", "-p", "To be, or not to be", "-p", "Once upon a time", "-n", "32",
                           "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    trace = RoutingTrace.load(out)
    assert (trace.step_n_tokens > 1).sum() > 10  # verification batches: steps of several tokens
    return trace


def test_min_is_never_beaten_on_a_recorded_trace(recorded):
    trace = recorded
    need = trace_need(trace)
    counts = trace.counts[:, trace.moe_layers].astype(np.int64)
    assert (need == need_from_ids(trace.ids[:, trace.moe_layers], trace.token_step, trace.n_steps,
                                  trace.n_expert)).all()  # per-step counts and per-token ids agree
    rng = np.random.default_rng(0)
    first_uses = int(need.any(axis=0).sum())
    for capacity in range(1, trace.n_expert + 1):
        best = belady_min(need, capacity)
        for name, r in demand_policies(need, counts, capacity, rng):
            assert r.hits <= best.hits, (name, capacity, r.hits, best.hits)
        # eval-utility: its estimators as demand caches, scored from step 1 on, against its MIN
        scores = {s.policy: s for s in evaluate(trace, capacity)}
        assert scores["min"].hits == belady_min(need, capacity, np.arange(trace.n_steps) >= 1).hits
        assert scores["min"].hits >= scores["lru"].hits
        for name in ESTIMATORS:
            est = make_estimator(name, *trace.counts.shape[1:])
            s = _score(name, capacity, trace, estimator_demand_kept(trace, est, capacity))
            assert s.activations == scores["min"].activations and s.hits <= scores["min"].hits, (name, capacity)
    assert best.hits == need.sum() - first_uses > 0  # capacity = all experts: only first uses miss


def cost_model() -> CostModel:
    return CostModel(cpu={"Q8_0": CpuKernel((1, 2, 4, 8), (1e-10, 1.2e-10, 1.5e-10, 2.2e-10))},
                     flash_miss=ReadCost(1.0e9, 1e-3), flash_prefetch=ReadCost(1.5e9, 2e-4), gpu=GpuCost())


@pytest.mark.parametrize("tier", ["flash", "vram"])
def test_one_lru_and_min_in_every_tool(recorded, tier):
    """simulate's, eval-utility's and trace_stats' LRU and MIN are the same caches: the same hits."""
    trace = recorded
    layout = ExpertLayout.from_info(inspect_model(default_model_path()))
    need = trace_need(trace)
    size = int(layout.expert_bytes.max())
    counts = trace.counts[:, trace.moe_layers].astype(np.int64)
    for capacity in (1, 3, 8, 16):
        budget = capacity * layout.n_layer * size
        setup = SimSetup(tier, layout, cost_model(), 10**12, budget, counts, trace.step_n_tokens.astype(np.int64))
        assert layer_capacities(setup.size, budget).tolist() == [capacity] * layout.n_layer
        sim = {p: simulate(trace, p, setup) for p in ("lru", "lfu", "min")}
        ref_lru, ref_min = lru(need, capacity), belady_min(need, capacity)
        assert (sim["lru"].hits, sim["lru"].activations) == (ref_lru.hits, ref_lru.activations)
        assert sim["min"].hits == ref_min.hits >= sim["lfu"].hits
        assert sim["lru"].hit_rate == ref_lru.hit_rate and sim["min"].preload_bytes == 0
        if capacity < trace.n_expert:
            report = realism_report(trace, capacities=[capacity]).to_json()
            assert report["lru"][str(capacity)]["hit_rate"] == round(ref_lru.hit_rate, 4)
        scores = {s.policy: s for s in evaluate(trace, capacity)}
        scored = np.arange(trace.n_steps) >= 1
        assert scores["lru"].hits == lru(need, capacity, scored).hits
    assert len(list(observations(trace))) == trace.n_steps


def test_layer_capacities_split_the_budget():
    size = np.array([[100] * 4, [100] * 4, [300] * 4])
    assert layer_capacities(size, 0).tolist() == [0, 0, 0]
    assert layer_capacities(size, 900).tolist() == [3, 3, 1]  # 300 bytes for each layer
    cap = layer_capacities(size, 1000)
    assert (cap * size[:, 0]).sum() <= 1000 and cap.tolist() == [4, 3, 1]  # the 100 left: one more in layer 0
    assert layer_capacities(size, 10**9).tolist() == [4, 4, 4]
    assert need_from_counts(np.array([[[0, 2]]])).tolist() == [[[False, True]]]
