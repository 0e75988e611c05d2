"""What a tier's budget means (planning/budgets.py); the placement configuration tiers and simulator share."""

from __future__ import annotations

import os

import numpy as np
import pytest

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.gguf.info import read_model_header
from spac_llamacpp.models.factory import write_tiny_moe
from spac_llamacpp.planning import budgets
from spac_llamacpp.planning.costmodel import ExpertLayout
from spac_llamacpp.planning.placement_config import VRAM_ESTIMATOR_PARAMS, PlacementConfig


def test_flash_budget_takes_out_its_reserves():
    one = 3 << 18
    lay = ExpertLayout.synthetic(3, 8, one, 2, non_expert_bytes=50 << 20)  # non-expert bytes play no part
    staging = 2 * one
    edges = budgets.edge_bytes(lay)
    assert edges == 2 * os.sysconf("SC_PAGE_SIZE") * sum(len(ts) for ts in lay.tensors)  # two pages per tensor
    b = budgets.flash_budget(3 * staging + edges + 5 * one, lay)
    assert (b.staging, b.keep, b.lookahead, b.edges, b.plan_bytes) == (staging, staging, staging, edges, 5 * one)
    # at a step boundary the staging and keep reserves are empty: the plan, the lookahead and the edge pages
    assert b.at_step_boundary == b.plan_bytes + b.lookahead + b.edges == b.budget - 2 * staging
    assert budgets.flash_budget(staging + edges + one, lay, lookahead=False, keep=False).plan_bytes == one
    assert budgets.smallest_flash_budget(lay) == 3 * staging + edges + one
    cases = ((0, True, True), (3 * staging + edges + one - 1, True, True), (staging + edges + one - 1, False, False),
             (2 * staging + edges + one - 1, True, False))
    for budget, lookahead, keep in cases:
        with pytest.raises(SpacError) as exc:
            budgets.flash_budget(budget, lay, lookahead=lookahead, keep=keep, name="m.gguf")
        msg = str(exc.value)
        assert "\n" not in msg and "too small for the flash tier of m.gguf" in msg
        assert ("lookahead" in msg) == lookahead and ("a step keeps" in msg) == keep
        assert str(budgets.smallest_flash_budget(lay, lookahead=lookahead, keep=keep)) in msg


def test_vram_budget_takes_out_the_fixed_part_in_whole_slots():
    groups = [budgets.PoolGroup(1000, 2, 8), budgets.PoolGroup(3000, 1, 8)]
    fixed = 5000 + 700 + 300
    b = budgets.vram_budget(fixed + 10_000, groups, non_expert_bytes=5000, kv_bytes=700, compute_reserve=300)
    assert b.fixed == fixed
    # pool 10 000 B split by expert bytes (16 000 : 24 000): 4000 -> 4 slots of 1000, 6000 -> 2 of 3000
    assert b.slots == (4, 2) and b.slot_bytes == (1000, 3000) and b.pool_bytes == 10_000
    assert budgets.vram_budget_for_pool(10_000, non_expert_bytes=5000, kv_bytes=700, compute_reserve=300) == \
        fixed + 10_000
    assert budgets.vram_budget(0, groups, non_expert_bytes=1, kv_bytes=1, slots=[1, 1]).pool_bytes == 4000
    with pytest.raises(SpacError) as exc:
        budgets.vram_budget(fixed + 999, groups, non_expert_bytes=5000, kv_bytes=700, compute_reserve=300)
    msg = str(exc.value)
    assert "\n" not in msg and "too small" in msg and "non-expert weights" in msg and str(fixed + 1000) in msg


def test_pool_groups_from_the_header_and_fitting_a_plan_into_them(tmp_path):
    path = write_tiny_moe(tmp_path / "mixed.gguf", "qwen3moe", dtype="q8_0", f16_pattern=r"^blk\.1\.ffn_down_exps",
                          n_layer=3, n_expert=4, n_expert_used=2)
    lay = budgets.tier_layout("vram", read_model_header(path))
    groups, of_row = budgets.pool_groups(lay)
    assert of_row == (0, 1, 0) and [g.n_layers for g in groups] == [2, 1]
    assert groups[1].slot_bytes > groups[0].slot_bytes
    x = np.ones((3, 4), bool)
    u = np.arange(12, dtype=float).reshape(3, 4)
    fitted, dropped = budgets.fit_groups(x, u, [3, 1], np.array(of_row))
    assert dropped == 12 - 4 and fitted[1].tolist() == [False, False, False, True]  # the hottest of group 1
    assert fitted[[0, 2]].sum() == 3 and fitted[2, 1:].all()  # the three hottest of group 0 (layer 2)


def test_kv_estimate_from_the_header_matches_the_formula(tmp_path):
    path = write_tiny_moe(tmp_path / "m.gguf", "qwen3moe", n_layer=3, n_expert=4, n_expert_used=2)
    n_layer, n_head, n_head_kv, n_embd = budgets.kv_dims_of_gguf(path)
    assert n_layer == 3 and n_head_kv <= n_head and n_embd > 0
    assert budgets.kv_cache_bytes(512, n_layer, n_head, n_head_kv, n_embd) == \
        512 * n_layer * 2 * n_head_kv * (n_embd // n_head) * 2


def test_tier_layouts(tmp_path):
    info = read_model_header(write_tiny_moe(tmp_path / "m.gguf", "qwen3moe", n_layer=2, n_expert=4, n_expert_used=2))
    flash, vram = budgets.tier_layout("flash", info), budgets.tier_layout("vram", info)
    assert flash.non_expert_bytes == vram.non_expert_bytes == 0  # the budget functions take them out
    assert (vram.expert_bytes == ExpertLayout.from_info(info).expert_bytes).all()
    assert (flash.expert_bytes >= vram.expert_bytes).all()  # flash: the pages an expert touches
    assert budgets.staging_bytes(flash) == 2 * int(flash.expert_bytes.max())
    with pytest.raises(SpacError, match="unknown tier"):
        budgets.tier_layout("disk", info)


def test_placement_config_defaults_and_overrides():
    f, v = PlacementConfig.flash(), PlacementConfig.vram()
    assert (f.tier, f.horizon, f.initial_plan) == ("flash", 4.0, True)
    assert (v.tier, v.horizon, v.initial_plan) == ("vram", 64.0, False)
    assert (f.estimator, f.solver, f.replan_every, f.drift, f.tokens_per_step, f.admit_demand, f.estimator_params) \
        == ("spac", "greedy", 64, 0.0, None, True, {})
    assert f.layer_caps and not v.layer_caps
    assert (v.estimator, v.solver, v.replan_every, v.drift, v.tokens_per_step, v.admit_demand) == \
        ("spac", "greedy", 16, 0.5, None, False)
    assert v.estimator_params == VRAM_ESTIMATOR_PARAMS  # smooth demand: copies cost
    assert PlacementConfig.for_tier("vram", replan_every=1).replan_every == 1
    # parameters belong to their estimator: another one named alone starts from its own defaults
    assert v.replace(estimator="decayed").estimator_params == {} and v.replace(horizon=2.0).estimator_params
    with pytest.raises(SpacError, match="flash-tier option"):
        v.replace(admit_demand=True)
    assert f.replace(estimator="decayed-counts", estimator_params={"half_life": 4}).estimator_params == \
        {"half_life": 4}
    with pytest.raises(SpacError, match="unknown placement option"):
        f.replace(half_life=3)
    with pytest.raises(SpacError, match="cannot become"):
        f.replace(tier="vram")
    with pytest.raises(SpacError, match="replan_every"):
        PlacementConfig.flash(replan_every=0)
    assert PlacementConfig.flash().to_json()["horizon"] == 4.0


def test_bench_budget_arguments_are_tier_budgets(tmp_path):
    from spac_llamacpp.tools.benchmarks import budget_arg, vram_fixed_bytes

    info = read_model_header(write_tiny_moe(tmp_path / "m.gguf", "qwen3moe", n_layer=2, n_expert=16, n_expert_used=2))
    assert budget_arg("50%", "flash", info) == info.expert_bytes // 2
    assert budget_arg("64MiB", "flash", info) == 64 << 20
    fixed = vram_fixed_bytes(info, 1024)
    assert fixed == info.non_expert_bytes + budgets.kv_cache_bytes(1024, *budgets.kv_dims_of_gguf(info.path)) + \
        budgets.DEFAULT_COMPUTE_RESERVE
    assert budget_arg("50%", "vram", info, n_ctx=1024) == fixed + info.expert_bytes // 2
    for tier in ("flash", "vram"):
        with pytest.raises(SpacError, match="too small"):
            budget_arg("1KiB", tier, info)
