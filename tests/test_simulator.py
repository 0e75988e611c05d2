"""Policy simulator: Belady bounds every policy, LRU by hand, the CLI on a recorded factory trace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.gguf.info import inspect_model
from spac_llamacpp.observe.trace import RoutingTrace
from spac_llamacpp.planning.budgets import edge_bytes, kv_cache_bytes, kv_dims_of_gguf, staging_bytes, tier_layout
from spac_llamacpp.planning.costmodel import CostModel, CpuKernel, ExpertLayout, GpuCost, ReadCost
from spac_llamacpp.planning.placement_config import PlacementConfig
from spac_llamacpp.sim.policies import POLICIES, SimSetup, make_policy
from spac_llamacpp.sim.simulator import compare, make_setup, simulate

BIN = Path(sys.executable).parent


def cost_model() -> CostModel:
    return CostModel(
        cpu={"F16": CpuKernel((1, 2, 4, 8), (1e-10, 1.2e-10, 1.5e-10, 2.2e-10))},
        flash_miss=ReadCost(1.0e9, 1e-3),
        flash_prefetch=ReadCost(1.5e9, 2e-4),
        gpu=GpuCost(),
    )


@pytest.fixture(scope="module")
def recorded(tiny_model, tmp_path_factory):
    """(trace path, model path, calibration JSON path): a trace recorded with `spac trace` on a factory model."""
    d = tmp_path_factory.mktemp("sim")
    model = tiny_model("qwen3moe")
    out = d / "t.npz"
    cmd = [str(BIN / "spac"), "trace", str(model), "-p", "Once upon a time", "-p", "The quick brown fox", "-n", "24",
           "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    cal = d / "cal.json"
    cost_model().save(cal)
    return out, model, cal


def run_spac(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "spac"), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


def budgets(model: Path, tier: str = "flash") -> list[int]:
    """Tier budgets (``--compute-reserve 0`` for vram) leaving room for 3, 8 and 16 experts."""
    info = inspect_model(model)
    lay = tier_layout(tier, info)
    one = int(lay.expert_bytes.max())
    if tier == "flash":
        fixed = 3 * staging_bytes(lay) + edge_bytes(lay)  # staging, keep, lookahead and the tensors' edge pages
    else:
        fixed = info.non_expert_bytes + kv_cache_bytes(512, *kv_dims_of_gguf(model))
    return [fixed + n * one for n in (3, 8, 16)]


@pytest.mark.parametrize("tier", ["flash", "vram"])
def test_belady_hit_rate_bounds_every_policy(recorded, tier):
    trace_path, model, _ = recorded
    trace = RoutingTrace.load(trace_path)
    info = inspect_model(model)
    for n, budget in zip((3, 8, 16), budgets(model, tier), strict=True):
        setup = make_setup(trace, tier, budget, cost_model(), info, compute_reserve=0)
        assert setup.budget == n * int(setup.layout.expert_bytes.max())
        results = {r.policy: r for r in compare(trace, setup)}
        assert set(results) == set(POLICIES)
        best = results["belady"].hit_rate
        for name, r in results.items():
            assert r.activations == results["none"].activations > 0
            assert r.hit_rate <= best + 1e-12, (name, r.hit_rate, best, budget)
        assert results["none"].hit_rate == 0.0
        assert results["belady"].hit_rate > 0


def hand_setup(sequence: list[list[int]], n_expert: int, capacity: int, tier: str = "flash"):
    """One MoE layer, one token per step using the listed experts; room for ``capacity`` experts."""
    T = len(sequence)
    counts = np.zeros((T, 1, n_expert), np.int32)
    ids = np.full((T, 1, 2), -1, np.int16)
    for t, es in enumerate(sequence):
        for j, e in enumerate(es):
            counts[t, 0, e] += 1
            ids[t, 0, j] = e
    trace = RoutingTrace(ids=ids, token_step=np.arange(T, dtype=np.int32), step_n_tokens=np.ones(T, np.int32),
                         counts=counts, moe_layers=np.array([0], np.int32), n_expert=n_expert, meta={})
    layout = ExpertLayout.synthetic(1, n_expert, 3000, 2, ggml_type="F16")
    setup = SimSetup(tier, layout, cost_model(), 10**9, capacity * 3000, counts.astype(np.int64),
                     np.ones(T, np.int64))
    return trace, setup


def test_lru_matches_hand_computed_example():
    # capacity 2, accesses A B A C B A D A (one expert per step)
    A, B, C, D = 0, 1, 2, 3
    seq = [[A], [B], [A], [C], [B], [A], [D], [A]]
    # LRU by hand:            cache after
    # A miss                  [A]
    # B miss                  [A B]
    # A hit                   [B A]
    # C miss, evict B         [A C]
    # B miss, evict A         [C B]
    # A miss, evict C         [B A]
    # D miss, evict B         [A D]
    # A hit                   [D A]
    trace, setup = hand_setup(seq, 4, 2)
    r = simulate(trace, "lru", setup)
    assert (r.activations, r.hits) == (8, 2)
    # flash: every miss is read on demand (3 ranges of 1000 bytes each)
    assert r.bytes_moved == 6 * 3000
    assert r.seconds == pytest.approx(6 * (3 * 1e-3 + 3000 / 1e9) + 8 * 3000 * 1e-10)
    # MIN starts empty (a reference cache): A, B miss and enter; A hits; C (never used again) is read
    # but bypassed; B, A hit; D bypassed; A hit. Flash reads: the 4 misses; nothing preloaded
    rm = simulate(trace, "min", setup)
    assert rm.hits == 4 and rm.bytes_moved == 4 * 3000 and rm.preload_bytes == 0
    assert simulate(trace, "lfu", setup).hits <= rm.hits
    # the prefetching oracle loads each step's expert just before it, evicting the furthest used:
    # C evicts A (next use 5 > B's 4), A evicts C, D evicts B: every access hits
    rb = simulate(trace, "belady", setup)
    assert rb.hits == 8 and rb.preload_bytes == 2 * 3000
    assert rb.bytes_moved == 3 * 3000


def test_lru_two_experts_per_step_never_evicts_the_other_one_in_use():
    trace, setup = hand_setup([[0, 1], [2, 3], [0, 1]], 4, 2)
    r = simulate(trace, "lru", setup)
    assert (r.activations, r.hits) == (6, 0)
    trace, setup = hand_setup([[0, 1], [0, 2], [0, 1]], 4, 2)
    assert simulate(trace, "lru", setup).hits == 2  # 0 hit twice; 1 evicted by 2


def test_vram_tier_times_and_transfers():
    trace, setup = hand_setup([[0], [0], [0]], 2, 1, tier="vram")
    r = simulate(trace, "lru", setup)
    cm = setup.cost
    gpu = cm.gpu_seconds(3000, 1)
    cpu = cm.cpu_seconds(setup.layout.tensors[0], 1)
    h2d = cm.h2d_seconds(3000, 3)
    assert r.hits == 2 and r.bytes_moved == 3000
    assert r.seconds == pytest.approx(max(cpu, h2d) + 2 * gpu)
    none = simulate(trace, "none", setup)
    assert none.seconds == pytest.approx(3 * cpu) and none.bytes_moved == 0


def test_hysteresis_rule():
    pol = make_policy("hysteresis", window=1)
    trace, setup = hand_setup([[0]] * 3, 2, 1)
    pol.reset(setup)
    c = np.zeros((1, 2), np.int64)
    c[0, 0] = 6
    pol.after_step(0, c, 6)  # 6 >= 0 + 5 -> state 1
    assert pol.state.tolist() == [[1, 0]]
    c[0, 0] = 5
    pol.after_step(1, c, 5)  # 5 < 1 + 5, 5 >= 1 -> stays
    assert pol.state.tolist() == [[1, 0]]
    c[0, 0] = 0
    pol.after_step(2, c, 0)  # 0 < 1 -> down
    assert pol.state.tolist() == [[0, 0]]


def test_cli_simulate_policy(recorded):
    trace_path, model, cal = recorded
    for tier, policy in (("flash", "lru"), ("vram", "ours"), ("flash", "hysteresis"), ("flash", "ours")):
        budget = str(budgets(model, tier)[1])
        proc = run_spac("simulate", str(trace_path), "--tier", tier, "--budget", budget, "--policy", policy,
                        "--calibration", str(cal), "--compute-reserve", "0")
        assert proc.returncode == 0, proc.stderr
        assert "hit rate" in proc.stdout and policy in proc.stdout
    budget = str(budgets(model)[1])
    proc = run_spac("simulate", str(trace_path), "--budget", budget, "--policy", "belady", "--calibration", str(cal),
                    "--json")
    assert proc.returncode == 0, proc.stderr
    (r,) = json.loads(proc.stdout)
    assert r["policy"] == "belady" and 0 < r["hit_rate"] <= 1


def test_cli_simulate_compare_writes_png(recorded, tmp_path):
    trace_path, model, cal = recorded
    png = tmp_path / "c.png"
    proc = run_spac("simulate", str(trace_path), "--budget", f"{budgets(model)[1] / 1024:.1f}KiB", "--compare",
                    "--calibration", str(cal), "--png", str(png))
    assert proc.returncode == 0, proc.stderr
    for name in POLICIES:
        assert f"\n{name} " in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_simulate_errors(recorded, tmp_path):
    trace_path, model, cal = recorded
    assert_one_line_error(run_spac("simulate", str(trace_path), "--budget", "1KiB", "--calibration", str(cal)),
                          "too small")
    assert_one_line_error(run_spac("simulate", str(trace_path), "--budget", "12 apples", "--calibration", str(cal)),
                          "size")
    assert_one_line_error(run_spac("simulate", str(trace_path), "--budget", "1GiB", "--policy", "fifo",
                                   "--calibration", str(cal)), "unknown policy")
    assert_one_line_error(run_spac("simulate", str(tmp_path / "nope.npz"), "--budget", "1GiB"), "not found")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert_one_line_error(run_spac("simulate", str(trace_path), "--budget", "1GiB", "--calibration", str(bad)),
                          "calibration")
    other = tmp_path / "other.gguf"
    from spac_llamacpp.models.factory import write_tiny_moe

    write_tiny_moe(other, "qwen3moe", n_expert=4)
    assert_one_line_error(run_spac("simulate", str(trace_path), "--budget", "1GiB", "--model", str(other),
                                   "--calibration", str(cal)), "does not match")


def test_cli_calibrate_show(tmp_path, monkeypatch):
    env = {"SPAC_CALIBRATION_CACHE": str(tmp_path)}
    assert_one_line_error(run_spac("calibrate", "--show", env=env), "no calibration")
    from spac_llamacpp.planning.calibration import calibration_path

    monkeypatch.setenv("SPAC_CALIBRATION_CACHE", str(tmp_path))
    cost_model().save(calibration_path(None))
    proc = run_spac("calibrate", "--show", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "F16" in proc.stdout and "flash miss" in proc.stdout and "GPU" in proc.stdout
    proc = run_spac("calibrate", "--show", "--json", env=env)
    assert json.loads(proc.stdout)["cpu"]["F16"]["batch"] == [1, 2, 4, 8]


def test_ours_places_a_steady_working_set_once():
    # the same two experts every step. Without admission: after one step of misses, ours loads them once
    # (a planned read each) and keeps them
    trace, setup = hand_setup([[2, 3]] * 20, 4, 2)
    r = simulate(trace, make_policy("ours", initial_plan=False, admit_demand=False, replan_every=16, drift=0.5), setup)
    assert r.hits == 38 and r.bytes_moved == 2 * 3000 + 2 * 3000  # step-0 misses + one load each
    # as the flash tier: a first residency from a uniform prior (preloaded), replaced after the first step
    # by the step's misses, which stay resident without a second read (admit_demand); re-planned after the first
    # step, at the re-planner's first request and then every 64 steps (layer admission in between: nothing to admit)
    pol = make_policy("ours")
    r = simulate(trace, pol, setup)
    assert pol.planner.config == PlacementConfig.flash(background=False) and pol.admits_demand
    assert r.preload_bytes == 2 * 3000 and r.hits == 38 and r.bytes_moved == 2 * 3000  # the misses only
    assert [t for t, _ in pol.plans] == [-1, 0, 1] and pol.admission == "predict" and pol.admitted == 0
    assert all(x[0].tolist() == [False, False, True, True] for _, x in pol.plans[1:])
    pol = make_policy("ours", replan_every=1)
    r = simulate(trace, pol, setup)
    assert r.hits == 38 and r.bytes_moved == 2 * 3000 and [t for t, _ in pol.plans] == [-1, *range(20)]


def test_ours_admission_keeps_a_miss_only_through_a_plan():
    # one slot; experts 0, 1, 2, 2: every miss is admitted and the next plan keeps it, so the last step hits
    # and nothing is read twice
    trace, setup = hand_setup([[0], [1], [2], [2]], 4, 1)
    pol = make_policy("ours", initial_plan=False, admission="off", replan_every=1)
    r = simulate(trace, pol, setup)
    assert r.hits == 1 and r.bytes_moved == 3 * 3000
    # with LRU's layer admission, no plan after the first two: every miss takes the slot in its layer's hook
    pol = make_policy("ours", initial_plan=False, admission="always")
    r = simulate(trace, pol, setup)
    assert r.hits == 1 and r.bytes_moved == 3 * 3000 and pol.admitted == 2 and [t for t, _ in pol.plans] == [0, 1]
    # predicted admission: the estimator has seen no expert used twice in a row (reuse rate 0) and ranks the
    # expert the last step used above step 2's newcomer, so 2 is not kept and step 3 misses it
    pol = make_policy("ours", initial_plan=False)
    r = simulate(trace, pol, setup)
    assert r.hits == 0 and pol.admission == "predict"
    # re-planned every 3 steps, no admission (plans after steps 0 and 1, the re-planner's first request): step
    # 2's miss has no plan after it, so it is dropped again and step 3 misses too
    pol = make_policy("ours", initial_plan=False, replan_every=3, admission="off")
    r = simulate(trace, pol, setup)
    assert [t for t, _ in pol.plans] == [0, 1] and r.hits == 0 and r.bytes_moved == 4 * 3000
    # the vram tier admits nothing for free: the option is refused there
    with pytest.raises(SpacError, match="flash-tier option"):
        PlacementConfig.vram(admit_demand=True)
    with pytest.raises(SpacError, match="admission must be one of"):
        make_policy("ours", admission="sometimes")


def test_planner_step_seconds_grow_with_the_tokens_of_a_step():
    """The draft length controller's step cost: more tokens per step, more distinct experts, more misses."""
    from spac_llamacpp.planning.estimators import Observation
    from spac_llamacpp.planning.placement import PlacementPlanner

    layout = ExpertLayout.synthetic(2, 8, 3_000_000, 2, ggml_type="F16")
    resident = np.zeros((2, 8), bool)
    planner = PlacementPlanner(PlacementConfig.flash(background=False), layout, cost_model(), 6_000_000,
                               resident=lambda: resident.copy())
    before = planner.step_seconds([1, 4])  # nothing learnt: uniform demand
    assert before[1] > before[0] > 0
    c = np.zeros((2, 8), np.int64)
    c[:, :2] = 1
    for _ in range(8):
        planner.demand.update(Observation(c, 1))  # a steady pair of experts per layer
    t1, t2, t9 = planner.step_seconds([1, 2, 9])
    assert t1 < t2 < t9 and t9 < 9 * t1  # a batch shares its experts: far less than 9 single steps
    resident[:, :2] = True  # the pair resident: no reads, only compute, and the cost falls
    assert planner.step_seconds([1])[0] < t1 / 3
    planner.close()
