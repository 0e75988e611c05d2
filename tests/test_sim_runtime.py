"""The simulator's ``ours`` and baselines are what the tiers run: the same steps replayed give the same plans.

A tier with ``record=True`` and the re-planner synchronous keeps, per evaluation step, the routing
counts it saw and the plan it made. The routing log of the same run, as ``spac trace`` saves it, is
replayed through ``spac simulate``'s setup (the tier's budget function, the tier's placement
configuration) and its ``ours`` policy: every plan, the first included, must hold the same experts
after the same step. The baseline policies (``policy="lru"`` etc., ``planning/policies.py``) likewise: the
residency the tier holds after each step is the simulator's.
"""

from __future__ import annotations

import os

import llama_cpp
import numpy as np
import pytest

from spac_llamacpp import Llama, patched_llama_available
from spac_llamacpp.gguf.info import read_model_header
from spac_llamacpp.models.factory import write_tiny_moe
from spac_llamacpp.observe.trace import RoutingTrace
from spac_llamacpp.planning import budgets
from spac_llamacpp.planning.costmodel import CostModel
from spac_llamacpp.planning.placement_config import PlacementConfig
from spac_llamacpp.sim.policies import make_policy
from spac_llamacpp.sim.simulator import make_setup, simulate
from spac_llamacpp.tools.generate import greedy_continuation

SHAPE = {"n_layer": 3, "n_embd": 128, "n_expert": 8, "n_expert_used": 2, "n_ff_exp": 256}
PROMPT = "The quick brown fox"
CHUNKS = (1, 1, 3, 1, 2, 5, 1, 1, 4, 1)  # tokens per decode step: plain and verification-sized steps
N_CTX = 256  # a multiple of 256: llama.cpp pads the context to one (the KV estimate follows the real one)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_moe(tmp_path_factory.mktemp("sim_runtime") / "m.gguf", "qwen3moe", **SHAPE))


@pytest.fixture(scope="module")
def tokens(model: str) -> tuple[list[int], list[int]]:
    """The prompt and its greedy continuation (stock llama-cpp-python; the tiers never change it)."""
    ref = llama_cpp.Llama(model, n_ctx=N_CTX, verbose=False, seed=0)
    try:
        return ref.tokenize(PROMPT.encode()), greedy_continuation(ref, PROMPT, sum(CHUNKS) * 2)
    finally:
        ref.close()


def _drive(llm: Llama, tokens: tuple[list[int], list[int]], after_step=None) -> None:
    """The prompt as one step, then the continuation in steps of CHUNKS tokens (twice round)."""
    prompt, rest = tokens
    llm.eval(prompt)
    pos = 0
    for n in CHUNKS * 2:
        if after_step is not None:
            after_step()
        llm.eval(rest[pos:pos + n])
        pos += n
    if after_step is not None:
        after_step()


def _runtime_plans(tier) -> dict[int, np.ndarray]:
    """{step index after which the plan was made (-1: before the first): residency}."""
    out = {} if tier.initial_plan is None else {-1: tier.initial_plan}
    for r in tier.records:
        if r.plan is not None:
            assert np.array_equal(r.plan, r.wanted), f"step {r.step}: the tier did not apply its plan as made"
            out[r.step - 1] = r.plan
    return out


def _compare(llm: Llama, tier, setup) -> dict[int, np.ndarray]:
    trace = RoutingTrace.from_log(llm.routing)
    counts = trace.counts[:, trace.moe_layers]
    assert len(tier.records) == trace.n_steps == 1 + 2 * len(CHUNKS)
    for t, r in enumerate(tier.records):  # the trace is what the tier saw
        assert np.array_equal(counts[t], r.counts) and trace.step_n_tokens[t] == r.n_tokens
    pol = make_policy("ours")
    simulate(trace, pol, setup)
    sim = {t: x for t, x in pol.plans}
    run = _runtime_plans(tier)
    assert sorted(sim) == sorted(run)
    for t in run:
        assert np.array_equal(sim[t], run[t]), f"plan after step {t}: simulator {np.argwhere(sim[t]).tolist()} " \
                                              f"vs tier {np.argwhere(run[t]).tolist()}"
    return run


CONFIGS = {
    "defaults": {},
    "every-step": {"replan_every": 1, "drift": 0.2, "horizon": 2.0},
    "decayed": {"estimator": "decayed-counts", "estimator_params": {"half_life": 4.0}, "replan_every": 3},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_flash_tier_plans_are_the_simulated_plans(model, tokens, name):
    # admit_demand off: the tier tells its plan which of a step's demand loads are still in memory (those the keep
    # reserve held; the others were evicted after their layer), which the simulator does not model (it keeps all)
    config = PlacementConfig.flash(background=False, **{"admit_demand": False, **CONFIGS[name]})
    cost = CostModel.nominal()
    info = read_model_header(model)
    layout = budgets.tier_layout("flash", info)
    # 5 of 24 experts planned, after the staging, keep and lookahead reserves and the edge pages
    budget = 3 * budgets.staging_bytes(layout) + budgets.edge_bytes(layout) + 5 * int(layout.expert_bytes.max())
    # prompt keep and layer admission off: their swaps during a step (native, as each layer runs) change the
    # residency the plan after the step starts from, which the simulator does not model for ours
    llm = Llama(model, n_ctx=N_CTX, verbose=False, seed=0, tier="flash", budget=budget, routing_history=None,
                flash_options={"config": config, "cost": cost, "record": True, "prompt_keep": False,
                               "admission": "off"})
    try:
        _drive(llm, tokens)
        setup = make_setup(RoutingTrace.from_log(llm.routing), "flash", budget, cost, info, config=config)
        assert setup.budget == llm.flash.planner.budget == 5 * int(layout.expert_bytes.max())
        plans = _compare(llm, llm.flash, setup)
        assert len(plans) >= 3 and len({p.tobytes() for p in plans.values()}) >= 2  # plans were made and changed
    finally:
        llm.close()


@pytest.mark.skipif(not patched_llama_available(3) and not os.environ.get("SPAC_REQUIRE_PATCHED"),
                    reason="the installed llama.cpp lacks the expert pool (run scripts/build_llama.sh)")
@pytest.mark.parametrize("name", ["defaults", "every-step"])
def test_vram_tier_plans_are_the_simulated_plans(model, tokens, name):
    """The pool in host memory; queued copies are waited for after each step, so that a slot still
    copying never holds back a planned expert (the simulator has no copy latency)."""
    config = PlacementConfig.vram(background=False, **CONFIGS[name])
    cost = CostModel.nominal()
    info = read_model_header(model)
    groups, _ = budgets.pool_groups(budgets.tier_layout("vram", info))
    kv = budgets.kv_cache_bytes(N_CTX, *budgets.kv_dims_of_gguf(model))
    budget = budgets.vram_budget_for_pool(6 * groups[0].slot_bytes + 100, non_expert_bytes=info.non_expert_bytes,
                                          kv_bytes=kv, compute_reserve=0)
    llm = Llama(model, n_ctx=N_CTX, verbose=False, seed=0, tier="vram", vram_budget=budget, routing_history=None,
                vram_options={"on_host": True, "compute_reserve": 0, "config": config, "cost": cost, "record": True})
    try:
        assert llm.vram.kv_bytes == kv and llm.stats()["slots"] == [6]  # the header's numbers are llama.cpp's
        _drive(llm, tokens, after_step=lambda: llm.vram.pool.fence(wait_loads=True))
        setup = make_setup(RoutingTrace.from_log(llm.routing), "vram", budget, cost, info, config=config,
                           n_ctx=N_CTX, compute_reserve=0)
        assert setup.budget == llm.vram.pool.pool_bytes and setup.n_slots == (6,)
        plans = _compare(llm, llm.vram, setup)
        assert len(plans) >= 2 and any(p.any() for p in plans.values())
    finally:
        llm.close()


BASELINES = ("lru", "lfu", "pin", "hysteresis")


def _compare_residency(llm: Llama, tier, setup, policy: str) -> list[np.ndarray]:
    """The residency the tier held after each step equals the simulated policy's after the same step."""
    trace = RoutingTrace.from_log(llm.routing)
    pol = make_policy(policy)
    simulate(trace, pol, setup)
    sim = dict(pol.plans)
    assert len(tier.records) == trace.n_steps == len(sim) and tier.initial_plan is None
    for t, r in enumerate(tier.records):
        assert np.array_equal(sim[t], r.wanted), f"{policy}, after step {t}: simulator " \
            f"{np.argwhere(sim[t]).tolist()} vs tier {np.argwhere(r.wanted).tolist()}"
    return [r.wanted for r in tier.records]


@pytest.mark.parametrize("policy", BASELINES)
def test_flash_tier_baselines_are_the_simulated_ones(model, tokens, policy):
    cost = CostModel.nominal()
    info = read_model_header(model)
    layout = budgets.tier_layout("flash", info)
    # 7 of 24 experts (2 a layer), after the staging reserve, the keep reserve (not for lru and lfu: with layer
    # admission, the default, their misses take planned experts' places and their plan gets it) and the edge pages
    keep = policy not in ("lru", "lfu")
    budget = (1 + keep) * budgets.staging_bytes(layout) + budgets.edge_bytes(layout) \
        + 7 * int(layout.expert_bytes.max())
    # prompt keep off: the simulator does not model its swaps during the first step (see above)
    llm = Llama(model, n_ctx=N_CTX, verbose=False, seed=0, tier="flash", budget=budget, routing_history=None,
                policy=policy, flash_options={"cost": cost, "record": True, "prompt_keep": False})
    try:
        _drive(llm, tokens)
        # a baseline has no lookahead: its plan gets the budget less the staging, keep and edge reserves
        setup = make_setup(RoutingTrace.from_log(llm.routing), "flash", budget, cost, info, lookahead=False, keep=keep)
        assert setup.budget == llm.flash.planner.budget == 7 * int(layout.expert_bytes.max())
        held = _compare_residency(llm, llm.flash, setup, policy)
        assert any(x.any() for x in held)
        if policy in ("lru", "lfu"):
            assert len({x.tobytes() for x in held}) >= 3  # admitted and evicted along the way
    finally:
        llm.close()


@pytest.mark.skipif(not patched_llama_available(3) and not os.environ.get("SPAC_REQUIRE_PATCHED"),
                    reason="the installed llama.cpp lacks the expert pool (run scripts/build_llama.sh)")
@pytest.mark.parametrize("policy", ["lru", "hysteresis"])
def test_vram_tier_baselines_are_the_simulated_ones(model, tokens, policy):
    cost = CostModel.nominal()
    info = read_model_header(model)
    groups, _ = budgets.pool_groups(budgets.tier_layout("vram", info))
    kv = budgets.kv_cache_bytes(N_CTX, *budgets.kv_dims_of_gguf(model))
    budget = budgets.vram_budget_for_pool(6 * groups[0].slot_bytes + 100, non_expert_bytes=info.non_expert_bytes,
                                          kv_bytes=kv, compute_reserve=0)
    llm = Llama(model, n_ctx=N_CTX, verbose=False, seed=0, tier="vram", vram_budget=budget, routing_history=None,
                policy=policy, vram_options={"on_host": True, "compute_reserve": 0, "cost": cost, "record": True})
    try:
        _drive(llm, tokens, after_step=lambda: llm.vram.pool.fence(wait_loads=True))
        setup = make_setup(RoutingTrace.from_log(llm.routing), "vram", budget, cost, info, n_ctx=N_CTX,
                           compute_reserve=0)
        assert setup.budget == llm.vram.pool.pool_bytes and setup.n_slots == (6,)
        held = _compare_residency(llm, llm.vram, setup, policy)
        assert any(x.any() for x in held)
    finally:
        llm.close()
