"""Baseline placement policies (planning/policies.py): the rules, and the tiers running them (``policy=``).

The rules are checked on hand-made steps (admission and eviction order of LRU and LFU, pin's one-time
choice, MoE-SpAc's hysteresis admission); the tiers are checked for what must never change (greedy output
equal to stock llama-cpp-python, every policy, both tiers) and for one-line errors.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from spac_llamacpp import Llama, patched_llama_available
from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.gguf.info import read_model_header
from spac_llamacpp.models.factory import write_tiny_moe
from spac_llamacpp.observe.profile import Profile
from spac_llamacpp.planning.budgets import tier_layout
from spac_llamacpp.planning.costmodel import CostModel
from spac_llamacpp.planning.estimators import Observation
from spac_llamacpp.planning.placement import PlacementPlanner
from spac_llamacpp.planning.placement_config import PlacementConfig
from spac_llamacpp.planning.policies import (
    POLICIES,
    HysteresisPolicy,
    LFUPolicy,
    LRUPolicy,
    PinPolicy,
    PolicyPlanner,
    check_policy,
    make_planner,
    make_rule,
)
from spac_llamacpp.tools.generate import greedy_continuation

BIN = Path(sys.executable).parent
SHAPE = {"n_layer": 3, "n_embd": 128, "n_expert": 8, "n_expert_used": 2, "n_ff_exp": 256}
PROMPT = "The quick brown fox"
N = 24
PATCHED = patched_llama_available(3) or bool(os.environ.get("SPAC_REQUIRE_PATCHED"))


def step(rule, used: dict[int, list[int]] | list[int], n_tokens: int = 1, counts: np.ndarray | None = None) -> None:
    """Feed one step: ``used`` experts of layer 0 (a list) or per layer (a dict), one selection each."""
    if counts is None:
        counts = np.zeros(rule.shape, np.int64)
        for layer, experts in (used.items() if isinstance(used, dict) else [(0, used)]):
            counts[layer, experts] = 1
    rule.update(Observation(counts, n_tokens))


def held(rule, layer: int = 0) -> list[int]:
    return np.flatnonzero(rule.resident[layer]).tolist()


# --------------------------------------------------------------------------------------------------
# the rules


def test_lru_admits_every_demand_and_evicts_the_least_recent_of_the_layer():
    rule = LRUPolicy(np.full((1, 4), 100), 200)  # 2 experts of 100 bytes
    assert rule.capacity.tolist() == [2] and rule.admits_demand and rule.initial(None) is None
    step(rule, [0])
    assert held(rule) == [0] and rule.take().tolist() == [[True, False, False, False]]
    assert rule.take() is None  # handed over once
    step(rule, [1])
    assert held(rule) == [0, 1]
    step(rule, [2])  # 0 is the least recently used
    assert held(rule) == [1, 2]
    step(rule, [1])  # a hit: nothing moves
    assert held(rule) == [1, 2] and rule.take() is not None  # (the change of the step before)
    step(rule, [1])
    assert rule.take() is None
    step(rule, [3])  # 2 is now the least recently used
    assert held(rule) == [1, 3]
    step(rule, [0, 2, 3])  # more than the capacity in one step: two of them stay, the resident one first
    assert held(rule) == [0, 3]
    assert rule.utility()[0, [0, 2, 3]].tolist() == [6, 6, 6]  # ranks: the step that used them last


def test_lru_gives_each_layer_an_equal_share_of_the_budget():
    size = np.array([[100] * 4, [100] * 4, [100] * 4])
    rule = LRUPolicy(size, 700)  # 233 bytes a layer: 2 experts each, the 100 bytes left go to layer 0
    assert rule.capacity.tolist() == [3, 2, 2]
    step(rule, {0: [0, 1, 2], 1: [0, 1, 2], 2: [3]})
    assert [held(rule, i) for i in range(3)] == [[0, 1, 2], [0, 1], [3]]
    assert int(size[rule.resident].sum()) <= 700


def test_lfu_keeps_the_most_used_and_breaks_ties_by_recency():
    rule = LFUPolicy(np.full((1, 4), 10), 20)
    for used in ([0], [0], [1], [2]):
        step(rule, used)
    assert held(rule) == [0, 2]  # 0 used twice; 2 as often as 1, more recently
    step(rule, [3])
    assert held(rule) == [0, 3]
    step(rule, [1])
    step(rule, [1])
    assert held(rule) == [0, 1]  # 1 used three times now


def test_pin_chooses_once_from_the_first_steps(caplog):
    size = np.array([[10, 10, 10, 20]])
    rule = PinPolicy(size, 30, warmup_steps=3)
    assert rule.initial(None) is None
    with caplog.at_level(logging.INFO, logger="spac_llamacpp.planning.policies"):
        for counts in ([5, 1, 0, 8], [5, 1, 0, 8]):
            step(rule, [], counts=np.array([counts]))
            assert rule.take() is None and not rule.resident.any()
        step(rule, [], counts=np.array([[0, 1, 1, 0]]))
    # per byte: expert 0 (10/10), 3 (16/20), 1 (3/10), 2 (1/10); 0 and 3 fill the 30 bytes
    assert held(rule) == [0, 3] and rule.take() is not None
    assert "pin: hot set of 2 experts" in caplog.text and "first 3 steps" in caplog.text
    for _ in range(5):  # never moves after
        step(rule, [], counts=np.array([[0, 9, 9, 0]]))
        assert rule.take() is None
    assert held(rule) == [0, 3]


def test_pin_from_a_profile_prior():
    rule = PinPolicy(np.full((2, 3), 10), 30)
    prior = np.array([[0.1, 0.9, 0.0], [0.5, 0.4, 0.3]])
    x = rule.initial(prior)
    assert x.tolist() == [[False, True, False], [True, True, False]]  # 0.9, 0.5, 0.4: the hottest per byte
    step(rule, [], counts=np.array([[0, 0, 9], [0, 0, 9]]))
    assert rule.take() is None and rule.resident.tolist() == x.tolist()


def test_hysteresis_admits_over_state_zero_residents_only():
    rule = HysteresisPolicy(np.full((1, 4), 10), 20, window=1)  # two experts fit
    step(rule, [], counts=np.array([[5, 5, 0, 0]]), n_tokens=5)  # c - s >= 5: both up to 1, both admitted
    assert rule.state.tolist() == [[1, 1, 0, 0]] and held(rule) == [0, 1]
    step(rule, [], counts=np.array([[1, 1, 5, 0]]), n_tokens=5)  # 0 and 1 stay at 1 (c >= s); 2 goes up
    assert rule.state.tolist() == [[1, 1, 1, 0]]
    assert held(rule) == [0, 1] and rule.blocked == 1  # no resident scores below 1: admission stops
    step(rule, [], counts=np.array([[0, 1, 1, 0]]), n_tokens=5)  # 0 drops to state 0: the first victim
    assert rule.state.tolist() == [[0, 1, 1, 0]] and held(rule) == [1, 2]
    step(rule, [], counts=np.array([[0, 0, 1, 0]]), n_tokens=5)  # 1 drops to 0 but stays resident
    assert rule.state.tolist() == [[0, 0, 1, 0]] and held(rule) == [1, 2]


def test_hysteresis_windows_gather_steps_to_nine_tokens():
    rule = HysteresisPolicy(np.full((1, 2), 10), 20)
    for _ in range(8):  # one token a step, expert 0 each time: no window is full yet
        step(rule, [0])
    assert rule.windows == 0 and not rule.resident.any()
    step(rule, [0])  # 9 tokens: c = 9 >= 0 + 5
    assert rule.windows == 1 and rule.state.tolist() == [[1, 0]] and held(rule) == [0]


def test_hysteresis_leaves_a_large_budget_unused():
    """Why it stays at one hit rate whatever the budget: only experts that once had 5 of a window's 9 tokens
    are ever admitted; a budget of every expert holds just those."""
    rng = np.random.default_rng(0)
    rule = HysteresisPolicy(np.full((1, 8), 10), 80)
    ever = np.zeros((1, 8), bool)
    for _ in range(200):
        used = rng.choice(8, 2, replace=False) if rng.random() < 0.7 else np.array([0, 1])
        step(rule, used.tolist())
        ever |= rule.state >= 1
    assert rule.resident.tolist() == ever.tolist() and 0 < ever.sum() < 8


def test_names_and_errors(model):
    assert POLICIES == ("spac", "lru", "lfu", "pin", "hysteresis")
    assert check_policy("lru") == "lru"
    with pytest.raises(SpacError, match="unknown placement policy 'fifo'; choose one of spac, lru, lfu, pin, "
                                        "hysteresis"):
        check_policy("fifo")
    with pytest.raises(SpacError, match="policy 'pin':.*bogus"):
        make_rule("pin", np.ones((1, 2)), 1, bogus=1)
    with pytest.raises(SpacError, match="warmup_steps must be >= 1"):
        make_rule("pin", np.ones((1, 2)), 1, warmup_steps=0)
    layout = tier_layout("vram", read_model_header(model))
    cfg = PlacementConfig.vram(background=False)
    ours = make_planner("spac", cfg, layout, CostModel.nominal(), 10**6, resident=lambda: None)
    base = make_planner("lfu", cfg, layout, CostModel.nominal(), 10**6, resident=lambda: None)
    assert isinstance(ours, PlacementPlanner) and not ours.admits_demand
    assert isinstance(base, PolicyPlanner) and base.admits_demand and base.budget == 10**6
    ours.close()
    with pytest.raises(SpacError, match="policy_params"):
        make_planner("spac", cfg, layout, CostModel.nominal(), 10**6, resident=lambda: None, params={"x": 1})


# --------------------------------------------------------------------------------------------------
# the tiers


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_moe(tmp_path_factory.mktemp("policies") / "m.gguf", "qwen3moe", **SHAPE))


@pytest.fixture(scope="module")
def reference(model: str) -> list[int]:
    ref = llama_cpp.Llama(model, n_ctx=256, verbose=False, seed=0)
    try:
        return greedy_continuation(ref, PROMPT, N)
    finally:
        ref.close()


@pytest.mark.parametrize("policy", POLICIES)
def test_flash_tier_every_policy_gives_stock_greedy_output(model, reference, policy):
    llm = Llama(model, n_ctx=256, verbose=False, seed=0, tier="flash", budget="50%", policy=policy,
                flash_options={"cost": CostModel.nominal()})
    try:
        assert greedy_continuation(llm, PROMPT, N) == reference
        st = llm.stats(settle=5.0)
        assert st["policy"] == policy and st["hit_rate"] is not None
        assert st["planned_bytes"] <= st["plan_budget_bytes"]
        # every policy plans in the tier's one budget; by default none keeps a lookahead (ours takes its misses in
        # by layer admission), and only a policy that serves misses without admitting them in their layer keeps
        # the step's demand loads to its end (the keep reserve)
        assert st["lookahead_reserve_bytes"] == 0
        assert st["keep_reserve_bytes"] == (st["staging_bytes"] if policy in ("pin", "hysteresis") else 0)
        assert st["resident_expert_bytes"] <= st["budget_bytes"]  # queued evictions done: within the budget
        if policy in ("pin", "hysteresis"):  # a miss is served, not admitted: evicted at the step's end
            assert st["staged_evicted"] > 0
    finally:
        llm.close()


@pytest.mark.skipif(not PATCHED, reason="the installed llama.cpp lacks the expert pool (run scripts/build_llama.sh)")
@pytest.mark.parametrize("policy", POLICIES)
def test_vram_tier_every_policy_gives_stock_greedy_output(model, reference, policy):
    """The pool in host memory: the same kernels as the CPU's, so any pool content gives stock's output."""
    llm = Llama(model, n_ctx=256, verbose=False, seed=0, tier="vram", vram_budget="50%", policy=policy,
                use_extra_bufts=False, vram_options={"on_host": True, "cost": CostModel.nominal()})
    try:
        assert greedy_continuation(llm, PROMPT, N) == reference
        st = llm.stats(settle=5.0)
        assert st["policy"] == policy and st["planned_experts"] <= sum(st["slots"])
        if policy in ("lru", "lfu"):
            assert st["loads"] > 0 and st["hit_rate"] > 0  # misses copied in after their step
    finally:
        llm.close()


def test_pin_starts_from_a_warm_profile(model):
    info = read_model_header(model)
    counts = np.zeros((len(info.moe_layers), info.n_expert), np.int64)
    counts[:, [1, 6]] = 50
    counts[:, 3] = 10
    prof = Profile(tuple(info.moe_layers), info.n_expert, counts)
    llm = Llama(model, n_ctx=256, verbose=False, seed=0, tier="flash", budget="50%", policy="pin",
                flash_options={"profile": prof, "record": True, "cost": CostModel.nominal()})
    try:
        first = llm.flash.initial_plan
        assert llm.flash.warm and first is not None
        assert first[:, [1, 6]].all() and not first[:, [0, 2, 4, 5, 7]].any()  # the hottest, then 3 if it fits
        greedy_continuation(llm, PROMPT, 8)
        assert all(r.plan is None and np.array_equal(r.wanted, first) for r in llm.flash.records)  # never moves
    finally:
        llm.close()


def test_policy_errors(model):
    with pytest.raises(SpacError, match="unknown placement policy 'fifo'; choose one of spac, lru, lfu, pin"):
        Llama(model, n_ctx=256, verbose=False, tier="flash", budget="50%", policy="fifo")
    with pytest.raises(SpacError, match="policy='lru' needs a tier"):
        Llama(model, n_ctx=256, verbose=False, policy="lru")
    with pytest.raises(SpacError, match="disagree"):
        Llama(model, n_ctx=256, verbose=False, tier="flash", budget="50%", policy="lru",
              flash_options={"policy": "lfu"})
    with pytest.raises(SpacError, match="unknown placement policy"):  # the tier's options alone
        Llama(model, n_ctx=256, verbose=False, tier="flash", budget="50%", flash_options={"policy": "mru"})


def _spac_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "spac-run"), *args], capture_output=True, text=True, timeout=300)


def test_spac_run_policy(model):
    proc = _spac_run(model, "-n", "6", "--tier", "flash", "--budget", "50%", "--policy", "lru", "--stats")
    assert proc.returncode == 0, proc.stderr
    assert "flash tier:" in proc.stderr and "; policy lru" in proc.stderr
    for args, words in (
        (["--tier", "flash", "--budget", "50%", "--policy", "fifo"], ["unknown placement policy 'fifo'",
                                                                        "spac, lru, lfu, pin, hysteresis"]),
        (["--tier", "none", "--policy", "pin"], ["--policy pin needs --tier flash", "--tier none"]),
        (["--policy", "lru"], ["--tier auto chose none"]),
    ):
        proc = _spac_run(model, "-n", "2", *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        for w in words:
            assert w in lines[0], lines[0]
