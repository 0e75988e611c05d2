"""The placement integer program, its greedy fallback, the replanner and the utility estimator."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pulp
import pytest

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.planning import balancer as B
from spac_llamacpp.planning.balancer import Balancer, Problem, brute_force, greedy, quick_bound, solve
from spac_llamacpp.planning.costmodel import CostModel, CpuKernel, ExpertLayout, GpuCost, ReadCost
from spac_llamacpp.planning.estimators import (
    DecayedAverage,
    Observation,
    UtilityEstimator,
    estimator_names,
    make_estimator,
)
from spac_llamacpp.planning.placement_config import PlacementConfig
from spac_llamacpp.planning.replanner import Replanner, ReplannerStats
from spac_llamacpp.planning.utility import utility_drift


def cost_model(gpu_bandwidth: float = 1.5e12) -> CostModel:
    return CostModel(
        cpu={"F16": CpuKernel((1, 2, 4, 8), (1e-10, 1.2e-10, 1.5e-10, 2.2e-10)),
             "Q4_K": CpuKernel((1, 8), (2e-10, 4e-10))},
        flash_miss=ReadCost(1.0e9, 1e-3),
        flash_prefetch=ReadCost(1.5e9, 2e-4),
        gpu=GpuCost(bandwidth=gpu_bandwidth, launch_s=15e-6),
    )


def random_problem(rng: np.random.Generator, L: int, E: int, parallel: bool, fill: float = 0.4,
                   cap: int | None = None) -> Problem:
    size = rng.integers(1_000, 50_000, size=(L, 1)).repeat(E, axis=1) if rng.random() < 0.5 else \
        rng.integers(1_000, 50_000, size=(L, E))
    u = rng.pareto(1.2, size=(L, E)) * (rng.random((L, E)) < 0.8)
    cpu = size * 1e-9
    slow = u * cpu * (1.0 if parallel else 5.0)
    fast = u * (cpu * rng.uniform(0.1, 1.5, size=(L, E)) if parallel else cpu)
    load = size * rng.uniform(1e-9, 5e-9, size=(L, E))
    resident = rng.random((L, E)) < 0.2
    budget = int(fill * size.sum())
    max_load = float(load.sum() * rng.uniform(0.05, 0.3)) if rng.random() < 0.3 else None
    return Problem(fast, slow, load, size.astype(np.int64), resident, budget, parallel,
                   horizon=float(rng.choice([1.0, 8.0, 64.0])), max_per_layer=cap, max_load=max_load)


@pytest.mark.parametrize("parallel", [True, False])
def test_ilp_respects_budget_exactly(parallel):
    rng = np.random.default_rng(1 if parallel else 2)
    for k in range(12):
        p = random_problem(rng, int(rng.integers(2, 7)), int(rng.integers(3, 17)), parallel,
                           fill=float(rng.uniform(0.05, 0.9)), cap=int(rng.integers(1, 4)) if k % 3 == 0 else None)
        plan = solve(p, solver="cbc", time_limit=5, gap=0.0, certify=bool(k % 2))
        assert int(p.size[plan.x].sum()) <= p.budget
        assert p.feasible(plan.x)
        if p.max_per_layer is not None:
            assert plan.x.sum(axis=1).max() <= p.max_per_layer
        if p.max_load is not None:
            assert p.load_of(plan.x) <= p.max_load * (1 + 1e-9)
        assert plan.objective == pytest.approx(p.objective(plan.x))
        assert plan.objective <= p.objective(greedy(p)) + 1e-15
        assert plan.objective >= quick_bound(p) - 1e-12


def test_ilp_budget_on_knife_edge():
    """Budget exactly one byte short of a combination: rounding in the MILP must not overshoot."""
    size = np.array([[1_000_003, 1_000_001, 999_999, 1_000_007]], np.int64)
    u = np.array([[1.0, 0.9, 0.8, 0.7]])
    p = Problem(u * 1e-4, u * 1e-3, np.zeros((1, 4)), size, np.zeros((1, 4), bool),
                int(size[0, 0] + size[0, 2]) - 1, parallel=False)
    plan = solve(p, solver="cbc", gap=0.0, certify=False)
    assert int(size[plan.x].sum()) <= p.budget
    assert plan.x.tolist() == [[False, True, True, False]]


@pytest.mark.parametrize("parallel", [True, False])
def test_ilp_equals_brute_force(parallel):
    rng = np.random.default_rng(10 + parallel)
    for _ in range(8):
        L, E = (2, 5) if rng.random() < 0.5 else (3, 4)
        p = random_problem(rng, L, E, parallel, fill=float(rng.uniform(0.1, 0.7)),
                           cap=2 if rng.random() < 0.3 else None)
        _, best = brute_force(p)
        plan = solve(p, solver="cbc", time_limit=10, gap=0.0, certify=False)
        assert plan.objective == pytest.approx(best, rel=1e-6, abs=1e-12), plan.status
        assert plan.objective >= B.lp_bound(p) - 1e-9


def test_greedy_can_be_worse_than_the_ilp_when_the_gpu_side_binds():
    # per layer max(F, S): a slow "GPU" makes greedy over-fill one layer
    lay = ExpertLayout.synthetic(2, 6, 30_000, 2, ggml_type="F16")
    u = np.array([[1.0, 1.0, 1.0, 0.2, 0.1, 0.1], [0.5, 0.4, 0.3, 0.3, 0.2, 0.1]])
    bal = Balancer(lay, cost_model(gpu_bandwidth=40e9), "vram", 6 * 30_000, tokens_per_step=1)
    p = bal.problem(u)
    plan = solve(p, solver="cbc", gap=0.0)
    assert plan.objective <= p.objective(greedy(p))
    assert plan.objective == pytest.approx(brute_force(p)[1])


def hard_problem() -> Problem:
    """Parallel, mixed sizes: the quick bound does not certify greedy, so the MILP runs."""
    rng = np.random.default_rng(5)
    p = random_problem(rng, 4, 12, True, fill=0.3)
    assert p.objective(greedy(p)) - quick_bound(p) > 1e-3 * p.objective(greedy(p))
    return p


class _TimedOutSolver(pulp.LpSolver):
    """A solver that, like CBC at its time limit without an incumbent, returns no solution."""

    name = "timed_out"

    def available(self):
        return True

    def actualSolve(self, lp, **kwargs):
        time.sleep(0.05)
        return pulp.LpStatusNotSolved


def no_estimate() -> B.SolveTiming:
    """Fresh solve timing without a MILP time estimate: these tests set their own time limits."""
    return B.SolveTiming(startup=0.0, seconds_per_var=0.0)


def test_greedy_fallback_when_solver_times_out(monkeypatch, caplog):
    p = hard_problem()
    monkeypatch.setattr(B, "_solver", lambda *a, **k: (_TimedOutSolver(), "cbc"))
    with caplog.at_level(logging.WARNING, logger="spac_llamacpp.planning.balancer"):
        plan = solve(p, time_limit=0.04, timing=no_estimate())
    assert plan.method == "greedy" and plan.status == "fallback"
    assert "time limit" in plan.reason
    assert np.array_equal(plan.x, greedy(p)) or p.objective(plan.x) <= p.objective(greedy(p))
    assert any("greedy" in r.message and "time limit" in r.message for r in caplog.records)


def test_greedy_fallback_with_real_cbc_and_a_tiny_time_limit(caplog):
    """CBC with a ~0 time limit: either it still proves the optimum or the fallback is logged."""
    rng = np.random.default_rng(7)
    p = random_problem(rng, 12, 40, True, fill=0.3)
    with caplog.at_level(logging.WARNING, logger="spac_llamacpp.planning.balancer"):
        plan = solve(p, solver="cbc", time_limit=1e-6, gap=0.0, certify=False, timing=no_estimate())
    assert p.feasible(plan.x)
    if plan.method == "greedy":
        assert any("greedy" in r.message for r in caplog.records)
    else:
        assert plan.status in ("optimal", "time limit") or plan.status.startswith(("optimal,", "time limit,"))


def test_greedy_when_the_time_limit_leaves_no_time_for_the_solver(monkeypatch, caplog):
    p = hard_problem()
    monkeypatch.setattr(B, "_solver", lambda *a, **k: (_TimedOutSolver(), "cbc"))
    timing = no_estimate()  # shared by both solves, as a Balancer shares its own
    with caplog.at_level(logging.INFO, logger="spac_llamacpp.planning.balancer"):
        plan = solve(p, time_limit=0.0, timing=timing)
        plan2 = solve(p, time_limit=0.0, timing=timing)
        plan3 = solve(p, time_limit=0.0)  # a bare solve starts from fresh timing: warned again
    assert plan.method == plan2.method == plan3.method == "greedy" and "no time left" in plan.reason
    levels = [r.levelno for r in caplog.records if "no time left" in r.message]
    assert levels == [logging.WARNING, logging.INFO, logging.WARNING]  # repeats are not warned every time


def test_solve_timing_warns_once_per_interval_and_kind():
    t = B.SolveTiming(warn_interval=60.0)
    assert t.warn_now("timeout", now=100.0)
    assert not t.warn_now("timeout", now=159.0)
    assert t.warn_now("missing", now=159.0)  # another kind of fallback
    assert t.warn_now("timeout", now=160.0)


def test_solve_timing_is_thread_safe():
    """The decoding thread and a Replanner's thread share a Balancer's timing: one warning, no lost updates."""
    import threading

    t = B.SolveTiming(startup=0.0, seconds_per_var=0.0, warn_interval=1e9)
    warned: list[bool] = []
    barrier = threading.Barrier(8)

    def work():
        barrier.wait()
        for _ in range(200):
            warned.append(t.warn_now("no time"))
            t.record_milp(1.0, 1)
            assert t.least_milp_seconds(1) <= 1.0

    threads = [threading.Thread(target=work) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert warned.count(True) == 1
    assert 0.5 <= t.seconds_per_var <= 1.0


def test_each_balancer_owns_its_solve_timing(monkeypatch):
    a, b = no_estimate(), no_estimate()
    plan = solve(hard_problem(), solver="cbc", time_limit=10, gap=0.0, certify=False, timing=a)
    assert plan.method == "cbc"
    assert a.seconds_per_var > 0.0 and b.seconds_per_var == 0.0  # the MILP's cost went into a only

    lay = ExpertLayout.synthetic(4, 12, 100_000, 2)
    u = np.random.default_rng(3).pareto(1.0, size=(4, 12))
    bal1, bal2 = (Balancer(lay, cost_model(), "vram", lay.non_expert_bytes + 15 * 100_000) for _ in range(2))
    assert bal1.timing is not bal2.timing
    shared = B.SolveTiming()
    assert Balancer(lay, cost_model(), "vram", lay.non_expert_bytes + 15 * 100_000, timing=shared).timing is shared
    seen = []
    real = B.solve
    monkeypatch.setattr(B, "solve", lambda *args, **kw: seen.append(kw["timing"]) or real(*args, **kw))
    bal1.plan(u)
    bal1.plan(u)
    bal2.plan(u)
    assert [t is bal1.timing for t in seen] == [True, True, False] and seen[2] is bal2.timing


def test_greedy_fallback_when_no_solver(monkeypatch, caplog):
    p = hard_problem()
    monkeypatch.setattr(pulp.PULP_CBC_CMD, "available", lambda self: False)
    monkeypatch.setattr(pulp.HiGHS, "available", lambda self: False)
    with caplog.at_level(logging.WARNING, logger="spac_llamacpp.planning.balancer"):
        plan = solve(p)
    assert plan.method == "greedy" and "no MILP solver" in plan.reason
    assert any("no MILP solver" in r.message for r in caplog.records)


def test_greedy_fallback_without_pulp(monkeypatch, caplog):
    import sys

    p = hard_problem()
    monkeypatch.setitem(sys.modules, "pulp", None)  # import pulp -> ImportError
    with caplog.at_level(logging.WARNING, logger="spac_llamacpp.planning.balancer"):
        plan = solve(p)
    assert plan.method == "greedy" and "PuLP is not installed" in plan.reason


def test_certified_greedy_skips_the_solver(monkeypatch):
    lay = ExpertLayout.synthetic(4, 16, 100_000, 2)
    u = np.random.default_rng(0).pareto(1.0, size=(4, 16))
    bal = Balancer(lay, cost_model(), "flash", 20 * 100_000)

    def boom(*a, **k):
        raise AssertionError("solver must not run")

    monkeypatch.setattr(B, "_solver", boom)
    plan = bal.plan(u)
    assert plan.method == "greedy" and plan.status == "optimal (bound)"


@pytest.mark.parametrize("tier", ["vram", "flash"])
def test_a_budget_below_one_expert_is_a_one_line_error(tier):
    one = 3 << 18  # bytes of one expert
    lay = ExpertLayout.synthetic(3, 8, one, 2)
    for budget in (0, 1000, one - 1):
        with pytest.raises(SpacError) as exc:
            Balancer(lay, cost_model(), tier, budget)
        msg = str(exc.value)
        assert "\n" not in msg and "too small" in msg and tier in msg
    assert Balancer(lay, cost_model(), tier, one).budget == one


def test_tier_costs_shapes_and_signs():
    lay = ExpertLayout.synthetic(3, 5, 200_000, 2, ggml_type="F16")
    u = np.array([[0, 0.5, 1, 2, 4]] * 3, float)
    for tier in ("vram", "flash"):
        c = B.tier_costs(tier, cost_model(), lay, u, tokens_per_step=4)
        assert c.fast.shape == (3, 5) and (c.fast[:, 0] == 0).all() and (c.slow[:, 0] == 0).all()
        assert (np.diff(c.slow, axis=1) > 0).all()
        assert (c.load > 0).all()
    assert B.tier_costs("flash", cost_model(), lay, u).parallel is False
    with pytest.raises(SpacError):
        B.tier_costs("disk", cost_model(), lay, u)


def test_decayed_counts():
    est = make_estimator("decayed-counts", 2, 3, half_life=1.0)
    assert isinstance(est, DecayedAverage) and isinstance(est, UtilityEstimator)
    assert est.utility().sum() == 0 and est.tokens_per_step == 1.0
    c1 = np.array([[1, 0, 0], [0, 1, 0]])
    c2 = np.array([[0, 0, 1], [0, 0, 1]])
    est.update(Observation(c1, 1))
    np.testing.assert_allclose(est.utility(), c1)  # normalised from the first step
    est.update(Observation(c2, 1))
    np.testing.assert_allclose(est.utility(), c1 / 3 + 2 * c2 / 3)  # weights 0.25 and 0.5
    assert est.tokens_per_step == pytest.approx(1.0)
    with pytest.raises(SpacError):
        est.update(Observation(np.zeros((3, 3)), 1))
    assert utility_drift(np.ones(3), None) == float("inf")
    assert utility_drift(np.ones(3) * 1.5, np.ones(3)) == pytest.approx(0.5)


def test_replanner_never_blocks_the_decoding_thread():
    """20 submits return while the first solve is still running (it waits for the test to release it)."""
    calls = []
    solving, release = threading.Event(), threading.Event()
    released_in_time = []

    def slow_plan(u, resident):
        calls.append(float(u.sum()))
        solving.set()
        released_in_time.append(release.wait(30))  # a submit that waited for this solve would stall it here
        return B.Plan(u > 0.5, 0.0, "fake", "optimal", seconds=0.3)

    rp = Replanner(slow_plan, every=1, drift=0.0)
    try:
        rp.submit(np.full((2, 2), 0, float), 0)
        assert solving.wait(30)
        for step in range(1, 20):
            rp.submit(np.full((2, 2), step, float), step)
        assert len(calls) == 1 and not release.is_set()  # all submits returned during the first solve
        assert rp.stats.submitted == 20 and rp.stats.coalesced == 18  # steps 1..18 replaced by newer ones
        release.set()
        assert rp.wait_idle(30)
        assert released_in_time == [True, True]
        plan = rp.latest()
        assert plan is not None and plan.step == 19  # the newest utilities were planned last
        assert rp.stats.solves == 2 and calls == [0.0, 4 * 19.0]
        assert rp.take() is plan and rp.take() is None
    finally:
        rp.close()


def test_replanner_triggers_on_period_and_drift():
    plans = []

    def plan_fn(u, resident):
        plans.append(u.copy())
        return B.Plan(np.zeros_like(u, bool), 0.0, "fake", "optimal")

    rp = Replanner(plan_fn, every=10, drift=0.5, background=False)
    u = np.ones((1, 4))
    assert rp.submit(u, 0)  # first call: no previous utilities
    assert not rp.submit(u * 1.1, 1)  # small drift
    assert rp.submit(u * 2.0, 2)  # drift 1.0 > 0.5
    assert not any(rp.submit(u * 2.0, s) for s in range(3, 12))
    assert rp.submit(u * 2.0, 12)  # period
    assert len(plans) == 3 and rp.stats.solves == 3


def test_replanner_with_balancer_in_background():
    lay = ExpertLayout.synthetic(4, 8, 100_000, 2)
    bal = Balancer(lay, cost_model(), "vram", 10 * 100_000)
    est = make_estimator("decayed-counts", 4, 8, half_life=4)
    rng = np.random.default_rng(0)
    with Replanner(bal.plan, every=4) as rp:
        for step in range(16):
            est.update(Observation(rng.multinomial(2, [1 / 8] * 8, size=4), 1))
            rp.submit(est.utility(), step)
        assert rp.wait_idle(30)
        plan = rp.latest()
    assert plan is not None and int(lay.bytes_matrix[plan.x].sum()) <= bal.budget


def test_replanner_caps_the_time_limit_at_a_share_of_decode_time():
    limits = []
    now = [0.0]

    def plan_fn(u, resident, time_limit=None):
        limits.append(time_limit)
        return B.Plan(np.zeros_like(u, bool), 0.0, "fake", "optimal")

    rp = Replanner(plan_fn, every=4, drift=0.0, share=0.5, min_time_limit=0.001, background=False,
                   clock=lambda: now[0])
    for step in range(9):
        rp.submit(np.ones((1, 2)), step)
        now[0] += 0.01  # a 10 ms "decode step"
    assert limits[0] is None  # no step time measured yet
    assert limits[1:] == [pytest.approx(0.5 * 4 * 0.01)] * 2
    assert rp.step_seconds == pytest.approx(0.01)
    rp.min_time_limit = 0.1
    assert rp.time_limit() == 0.1  # the floor


def test_every_estimator_gives_expected_tokens_per_step():
    for name in estimator_names():
        d = make_estimator(name, 2, 4)
        assert isinstance(d, UtilityEstimator)
        assert d.utility().sum() == 0
        c = np.array([[6, 0, 0, 0], [0, 4, 4, 1]])  # 3 tokens, top-2 in layer 0 and top-3 in layer 1
        for _ in range(6):
            d.update(Observation(c, 3))
        u = d.utility()
        assert d.tokens_per_step == pytest.approx(3.0)
        rows = u.sum(axis=1) > 0  # (hysteresis never raises layer 1: 4 < 0 + 5)
        assert rows[0]
        np.testing.assert_allclose(u.sum(axis=1)[rows], np.array([2 * 3, 3 * 3])[rows])
        assert u[0, 0] > u[0, 1]
    with pytest.raises(SpacError):
        make_estimator("nope", 2, 4)


def test_replanner_reports_its_solve_time():
    """stats()["replanner"]: the solves' wall and CPU seconds in all and per solve, the plans made outside the
    re-planner, and how many steps late its plans were applied (0 when synchronous)."""
    from spac_llamacpp.planning.placement import PlacementPlanner

    layout = ExpertLayout.synthetic(3, 8, 1_000_000, 2, ggml_type="F16")
    resident = np.zeros((3, 8), bool)
    planner = PlacementPlanner(PlacementConfig.flash(background=False, replan_every=1), layout, cost_model(), 6_000_000,
                               resident=lambda: resident.copy())
    planner.first_plan(None)
    rng = np.random.default_rng(0)
    for step in range(1, 7):
        counts = rng.multinomial(2, [1 / 8] * 8, size=3)
        planner.demand.update(Observation(counts, 1))
        assert planner.after_step(step, counts > 0) is not None  # re-planned after every step, applied at once
    st = planner.stats()
    planner.close()
    rs = planner.replanner.stats
    assert st["solves"] == 5 and st["requested"] == 5 and st["failures"] == 0 and st["background"] is False
    assert st["solve_seconds"] == pytest.approx(sum(rs.wall)) and st["solve_cpu_seconds"] == pytest.approx(sum(rs.cpu))
    assert st["solve_seconds"] > 0 and st["solve_cpu_seconds"] > 0
    assert st["solve_ms_mean"] == pytest.approx(1e3 * st["solve_seconds"] / 5)
    assert st["solve_cpu_ms_mean"] == pytest.approx(1e3 * st["solve_cpu_seconds"] / 5)
    assert st["solve_ms_max"] >= st["solve_ms_mean"]
    assert st["direct_plans"] == 2 and st["direct_seconds"] > 0  # the first plan and the first step's
    assert st["plans_taken"] == 5 and st["lag_steps_mean"] == 0.0
    assert ReplannerStats().summary()["solve_ms_mean"] == 0.0  # no solves: no division by zero


def _first_fit(order, size, room):
    """The definition fill_in_order vectorises: each item in turn while it fits."""
    out = []
    for k in order:
        if size[k] <= room:
            out.append(k)
            room -= size[k]
    return out


def test_fill_in_order_is_first_fit():
    rng = np.random.default_rng(3)
    for _ in range(500):
        size = rng.integers(1, 6, size=int(rng.integers(0, 20))) * (1 if rng.random() < 0.5 else 1000)
        order = rng.permutation(len(size))[: int(rng.integers(0, len(size) + 1))]
        room = int(rng.integers(0, int(size.sum()) + 2)) if len(size) else 3
        assert B.fill_in_order(order, size, room).tolist() == _first_fit(order.tolist(), size.tolist(), room)


def test_serial_greedy_and_keep_residents_follow_their_loops():
    """Flash (serial, no per-layer cap, no transfer cap): greedy takes experts by gain per byte first-fit, and
    keep_residents adds the resident ones it left out that are no slower resident, by slow time per byte."""
    rng = np.random.default_rng(4)
    for _ in range(200):
        L, E = int(rng.integers(1, 5)), int(rng.integers(1, 10))
        tensors = tuple((("F16", int(rng.integers(1, 4)) * 100_000),) for _ in range(L))
        lay = ExpertLayout(tuple(range(L)), E, tensors, (2,) * L)
        u = rng.random((L, E)) * (rng.random((L, E)) < 0.6)
        costs = B.tier_costs("flash", cost_model(), lay, u)
        p = Problem.build(costs, lay, int(rng.integers(1, L * E + 1)) * 150_000, rng.random((L, E)) < 0.3, 4.0)
        gain = p.slow - p.fast - p.amortised_load
        order = np.argsort(-(gain / p.size), axis=None, kind="stable")
        want = np.zeros(L * E, bool)
        want[_first_fit([k for k in order if gain.ravel()[k] > 0], p.size.ravel().tolist(), p.budget)] = True
        x = greedy(p)
        assert np.array_equal(x.ravel(), want)
        extra = (p.resident & ~x).ravel()
        ok = (p.fast <= p.slow).ravel()
        order = np.argsort(-(p.slow / p.size), axis=None, kind="stable")
        room = p.budget - int(p.size[x].sum())
        want[_first_fit([k for k in order if extra[k] and ok[k]], p.size.ravel().tolist(), room)] = True
        assert np.array_equal(B.keep_residents(p, x).ravel(), want)
