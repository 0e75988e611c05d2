"""Automatic placement (planning/fit.py, native/machine.py, tiers/auto.py): fake machine facts give the expected
plans; `spac fit`, `spac-run` (--tier auto by default) and `Llama(tier="auto")` use them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.gguf.info import read_model_header
from spac_llamacpp.models.default import default_model_path
from spac_llamacpp.native.machine import FACTS_ENV, GpuFacts, MachineFacts, cgroup_memory, read_machine_facts
from spac_llamacpp.planning import budgets
from spac_llamacpp.planning.fit import (
    COMPUTE_RESERVE,
    RAM_MARGIN_MIN,
    VRAM_MARGIN_MIN,
    kv_bytes_of,
    plan_fit,
    ram_margin,
    smallest_flash_budget,
    vram_margin,
)
from spac_llamacpp.tiers.auto import resolve_auto

MiB, GiB = 1 << 20, 1 << 30
N_CTX = 256


@pytest.fixture(scope="module")
def info():
    return read_model_header(default_model_path())


def sizes(info):
    kv = kv_bytes_of(info, N_CTX)
    whole = info.total_tensor_bytes + kv + COMPUTE_RESERVE
    fixed = info.non_expert_bytes + kv + COMPUTE_RESERVE
    return kv, whole, fixed


def gpu(free, total=None, name="Test GPU"):
    return (GpuFacts(name, int(free), int(total or free)),)


def test_margins_are_stated():
    assert ram_margin(1 * GiB) == RAM_MARGIN_MIN and ram_margin(20 * GiB) == 2 * GiB
    assert vram_margin(1 * GiB) == VRAM_MARGIN_MIN and vram_margin(80 * GiB) == 4 * GiB


def test_all_in_ram_when_the_whole_model_fits_with_the_margin(info):
    kv, whole, _ = sizes(info)
    plan = plan_fit(info, MachineFacts(16 * GiB), n_ctx=N_CTX)
    assert (plan.tier, plan.placement, plan.n_gpu_layers, plan.budget_bytes) == ("none", "ram", 0, None)
    assert plan.kv_bytes == kv == 256 * 6 * 2 * 2 * 64 * 2  # 6 layers, 2 KV heads of 64, f16 K and V
    # the boundary: exactly the whole model in what the margin leaves -> RAM; a byte less -> flash
    edge = whole + RAM_MARGIN_MIN
    assert plan_fit(info, MachineFacts(edge), n_ctx=N_CTX).placement == "ram"
    assert plan_fit(info, MachineFacts(edge - 1), n_ctx=N_CTX).placement == "flash"
    j = plan.to_json()
    assert {"tier", "budget_bytes", "vram_budget_bytes", "n_gpu_layers", "reason"} <= set(j)
    assert "margin" in j["reason"] and j["ram_usable"] == 16 * GiB - ram_margin(16 * GiB)
    assert len(plan.lines()) == 2 and plan.flags() == "--tier none"


def test_flash_tier_with_the_ram_that_is_left(info):
    _, whole, fixed = sizes(info)
    ram = whole + RAM_MARGIN_MIN - 8 * MiB
    plan = plan_fit(info, MachineFacts(ram), n_ctx=N_CTX)
    assert (plan.tier, plan.placement, plan.n_gpu_layers, plan.vram_budget_bytes) == ("flash", "flash", 0, None)
    want = (ram - RAM_MARGIN_MIN - fixed) // MiB * MiB
    assert plan.budget_bytes == want and want < info.expert_bytes
    budgets.flash_budget(plan.budget_bytes, budgets.tier_layout("flash", info))  # the tier accepts it
    assert plan.flags() == f"--tier flash --budget {want // MiB}MiB"
    assert plan.llama_kwargs() == {"tier": "flash", "budget": want, "vram_budget": None, "n_gpu_layers": 0}


def test_cgroup_limit_caps_what_is_available(info):
    _, whole, fixed = sizes(info)
    usage = 100 * MiB
    limit = whole + RAM_MARGIN_MIN - 8 * MiB + usage
    facts = MachineFacts(64 * GiB, cgroup_limit=limit, cgroup_usage=usage)
    assert facts.ram_available == limit - usage
    plan = plan_fit(info, facts, n_ctx=N_CTX)
    assert plan.tier == "flash" and plan.budget_bytes == (limit - usage - RAM_MARGIN_MIN - fixed) // MiB * MiB
    assert "cgroup" in facts.describe()


def test_larger_than_ram_and_vram_is_one_line_error_with_the_smallest_budget(info):
    facts = MachineFacts(600 * MiB, gpus=gpu(300 * MiB), patch_level=3)
    with pytest.raises(SpacError) as exc:
        plan_fit(info, facts, n_ctx=N_CTX)
    msg = str(exc.value)
    smallest = smallest_flash_budget(info)
    suggested = -(-smallest // MiB)
    assert "\n" not in msg and "does not fit" in msg and f"--tier flash --budget {suggested}MiB" in msg
    # the RAM the message asks for is enough: with it the plan is the flash tier with at least that budget
    need = msg.split("which needs ")[1].split(" of available RAM")[0]
    from spac_llamacpp.base.sizes import parse_size

    plan = plan_fit(info, MachineFacts(parse_size(need.replace(" ", "")) + MiB), n_ctx=N_CTX)
    assert plan.tier == "flash" and plan.budget_bytes >= smallest


def test_whole_model_on_the_gpu(info):
    plan = plan_fit(info, MachineFacts(2 * GiB, gpus=gpu(80 * GiB, name="H100")), n_ctx=N_CTX)
    assert (plan.tier, plan.placement, plan.n_gpu_layers) == ("none", "gpu", -1)
    assert "H100" in plan.reason and plan.vram_free == 80 * GiB and plan.vram_margin == 4 * GiB
    assert plan.llama_kwargs()["n_gpu_layers"] == -1


def test_vram_tier_when_only_part_fits_on_the_gpu(info):
    kv, whole, _ = sizes(info)
    free = whole + VRAM_MARGIN_MIN - 4 * MiB  # all but 4 MiB of the model fit
    plan = plan_fit(info, MachineFacts(16 * GiB, gpus=gpu(free), patch_level=3), n_ctx=N_CTX)
    assert (plan.tier, plan.placement, plan.n_gpu_layers, plan.budget_bytes) == ("vram", "vram", -1, None)
    assert plan.vram_budget_bytes == (free - VRAM_MARGIN_MIN) // MiB * MiB
    groups, _ = budgets.pool_groups(budgets.tier_layout("vram", info))
    vb = budgets.vram_budget(plan.vram_budget_bytes, groups, non_expert_bytes=info.non_expert_bytes, kv_bytes=kv)
    assert 0 < vb.pool_bytes < info.expert_bytes  # the tier accepts it, and the pool holds part of the experts
    assert plan.flags().startswith("--tier vram --vram-budget ")


def test_gpu_without_the_patched_build_plans_for_the_cpu(info):
    _, whole, _ = sizes(info)
    plan = plan_fit(info, MachineFacts(16 * GiB, gpus=gpu(whole), patch_level=0), n_ctx=N_CTX)
    assert plan.placement == "ram" and any("patched llama.cpp" in n for n in plan.notes)


def test_gpu_too_small_for_the_vram_tier(info):
    plan = plan_fit(info, MachineFacts(16 * GiB, gpus=gpu(300 * MiB), patch_level=3), n_ctx=N_CTX)
    assert plan.placement == "ram" and any("too little for the vram tier" in n for n in plan.notes)


def test_vram_tier_needs_the_experts_in_ram(info):
    _, whole, fixed = sizes(info)
    ram = RAM_MARGIN_MIN + fixed + 8 * MiB  # less than the experts + compute: the flash tier instead
    free = whole + VRAM_MARGIN_MIN - 4 * MiB
    plan = plan_fit(info, MachineFacts(ram, gpus=gpu(free), patch_level=3), n_ctx=N_CTX)
    assert plan.tier == "flash" and any("host memory" in n for n in plan.notes)


def test_cpu_only_ignores_the_gpu(info):
    plan = plan_fit(info, MachineFacts(16 * GiB, gpus=gpu(80 * GiB)), n_ctx=N_CTX, allow_gpu=False)
    assert plan.placement == "ram" and plan.vram_free is None


def test_dense_model(tiny_dense_model):
    dense = read_model_header(tiny_dense_model)
    assert plan_fit(dense, MachineFacts(16 * GiB), n_ctx=64).placement == "ram"
    with pytest.raises(SpacError, match="dense model"):
        plan_fit(dense, MachineFacts(100 * MiB), n_ctx=64)


def test_longer_context_costs_kv(info):
    assert kv_bytes_of(info, 2048) == 8 * kv_bytes_of(info, 256)
    assert plan_fit(info, MachineFacts(16 * GiB), n_ctx=2048).kv_bytes == kv_bytes_of(info, 2048)


def test_explicit_arguments_win(info):
    facts = MachineFacts(600 * MiB, gpus=gpu(80 * GiB), patch_level=3)  # auto would put it all on the GPU
    c = resolve_auto(info, n_ctx=N_CTX, budget="6MiB", facts=facts)
    assert (c.tier, c.budget, c.plan) == ("flash", "6MiB", None)
    c = resolve_auto(info, n_ctx=N_CTX, vram_budget="1GiB", facts=facts)
    assert (c.tier, c.vram_budget, c.plan) == ("vram", "1GiB", None)
    assert resolve_auto(info, n_ctx=N_CTX, overrides=r"\.ffn_.*_exps=CPU", facts=facts).tier is None
    c = resolve_auto(info, n_ctx=N_CTX, n_gpu_layers=3, facts=facts)
    assert c.tier is None and c.n_gpu_layers is None and c.plan is None
    c = resolve_auto(info, n_ctx=N_CTX, facts=facts)
    assert c.plan.placement == "gpu" and c.n_gpu_layers == -1
    c = resolve_auto(info, n_ctx=N_CTX, n_gpu_layers=0, facts=MachineFacts(16 * GiB, gpus=gpu(80 * GiB)))
    assert c.plan.placement == "ram" and c.n_gpu_layers == 0  # 0 GPU layers: a CPU plan
    assert c.to_json()["explicit"] is False and resolve_auto(info, n_ctx=1, budget=1).to_json()["explicit"]


# --- machine facts ------------------------------------------------------------------------------------


def test_facts_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(FACTS_ENV, json.dumps({"mem_available": "8GiB", "cgroup_limit": "4GiB",
                                              "cgroup_usage": 1 << 30, "patch_level": 3,
                                              "gpus": [{"name": "A", "free": "10GiB", "total": "16GiB"}]}))
    f = read_machine_facts()
    assert (f.mem_available, f.cgroup_limit, f.ram_available, f.patch_level) == (8 * GiB, 4 * GiB, 3 * GiB, 3)
    assert f.gpu == GpuFacts("A", 10 * GiB, 16 * GiB, 0) and f.source == FACTS_ENV
    path = tmp_path / "facts.json"
    path.write_text('{"mem_available": 1234, "gpus": []}')
    monkeypatch.setenv(FACTS_ENV, f"@{path}")
    f = read_machine_facts()
    assert f.mem_available == 1234 and f.gpus == () and f.source == str(path)
    for bad, words in (("{", "not valid JSON"), ('{"ram": 1}', "unknown field"), ('{"mem_available": "lots"}', "size"),
                       ("[1]", "JSON object"), ('{"gpus": [{"name": "x"}]}', "free")):
        monkeypatch.setenv(FACTS_ENV, bad)
        with pytest.raises(SpacError, match=words):
            read_machine_facts()


def test_this_machine_facts():
    f = read_machine_facts(use_env=False)
    assert f.mem_available > 0 and 0 <= f.ram_available <= f.mem_available and f.source == "measured"
    assert isinstance(f.patch_level, int)


def test_cgroup_v2_limit_of_the_cgroup_or_an_ancestor(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/user.slice/app\n")
    root = tmp_path / "fs"
    (root / "user.slice" / "app").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("memory\n")
    (root / "user.slice" / "memory.max").write_text("max\n")
    app = root / "user.slice" / "app"
    (app / "memory.max").write_text(f"{1 << 30}\n")
    (app / "memory.current").write_text(f"{300 << 20}\n")
    (app / "memory.stat").write_text(f"anon 1\ninactive_file {100 << 20}\nactive_file 5\n")
    assert cgroup_memory(proc, root) == (1 << 30, 200 << 20)
    (root / "user.slice" / "memory.max").write_text(f"{512 << 20}\n")  # a tighter parent wins
    (root / "user.slice" / "memory.current").write_text(f"{400 << 20}\n")
    assert cgroup_memory(proc, root) == (512 << 20, 400 << 20)


def test_cgroup_v1_and_no_limit(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("5:devices:/\n4:memory:/docker/abc\n0::/\n")
    root = tmp_path / "fs"
    mem = root / "memory"
    (mem / "docker" / "abc").mkdir(parents=True)
    (mem / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # "unlimited"
    (mem / "docker" / "abc" / "memory.limit_in_bytes").write_text(f"{2 << 30}\n")
    (mem / "docker" / "abc" / "memory.usage_in_bytes").write_text(f"{1 << 30}\n")
    (mem / "docker" / "abc" / "memory.stat").write_text(f"cache 1\ntotal_inactive_file {256 << 20}\n")
    assert cgroup_memory(proc, root) == (2 << 30, 768 << 20)
    (mem / "docker" / "abc" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_memory(proc, root) == (None, 0)
    assert cgroup_memory(tmp_path / "missing", root) == (None, 0)


# --- the command line and Llama ------------------------------------------------------------------------


def spac(*args: str, facts: dict | None = None, tool: str = "spac") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop(FACTS_ENV, None)
    if facts is not None:
        env[FACTS_ENV] = json.dumps(facts)
    code = f"from spac_llamacpp.tools.cli import {tool.replace('-', '_')} as c; c()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env=env)


def test_spac_fit_cli(info):
    _, whole, fixed = sizes(info)
    ram = whole + RAM_MARGIN_MIN - 8 * MiB
    proc = spac("fit", str(default_model_path()), "--json", facts={"mem_available": ram, "gpus": []})
    assert proc.returncode == 0, proc.stderr
    j = json.loads(proc.stdout)
    assert (j["tier"], j["n_gpu_layers"], j["vram_budget_bytes"]) == ("flash", 0, None)
    assert j["budget_bytes"] == (ram - RAM_MARGIN_MIN - fixed) // MiB * MiB and j["reason"]
    assert j["n_ctx"] == N_CTX  # the default context, clamped to the model's 256
    proc = spac("fit", str(default_model_path()), "--ctx", "128", facts={"mem_available": "16GiB", "gpus": []})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("auto placement: all in RAM") and "margins: RAM" in proc.stdout


def test_spac_fit_too_small_is_one_line(info):
    proc = spac("fit", str(default_model_path()), facts={"mem_available": "300MiB", "gpus": []})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--tier flash --budget" in lines[0]


def test_spac_run_is_auto_by_default(info):
    _, whole, _ = sizes(info)
    facts = {"mem_available": whole + RAM_MARGIN_MIN - 8 * MiB, "gpus": []}
    model = str(default_model_path())
    proc = spac(model, "-n", "4", "--stats", facts=facts, tool="spac-run")
    assert proc.returncode == 0, proc.stderr
    assert "auto placement: flash tier" in proc.stderr and "flash tier:" in proc.stderr
    proc = spac(model, "-n", "4", "--stats", "json", facts=facts, tool="spac-run")
    assert proc.returncode == 0, proc.stderr
    assert "auto placement" not in proc.stderr  # with --stats json the choice is in the JSON
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report["fit"]["tier"] == "flash" and report["flash"]["budget_bytes"] == report["fit"]["budget_bytes"]
    proc = spac(model, "-n", "4", "--stats", "json", "--tier", "none", facts=facts, tool="spac-run")
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0 and "fit" not in report and "flash" not in report
    proc = spac(model, "-n", "4", "--stats", "json", "--budget", "6MiB", facts=facts, tool="spac-run")
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report["fit"]["explicit"] and report["flash"]["budget_bytes"] == 6 * MiB


def test_llama_auto(monkeypatch, info):
    from spac_llamacpp.llama import Llama

    model = str(default_model_path())
    monkeypatch.delenv(FACTS_ENV, raising=False)
    stock = Llama(model, n_ctx=128, verbose=False)
    try:
        assert stock.fit is None and stock.tier is None  # no tier= given: llama.cpp as is, never auto
        want = stock("Once upon a time", max_tokens=12, temperature=0)["choices"][0]["text"]
    finally:
        stock.close()
    auto = Llama(model, n_ctx=128, verbose=False, tier="auto")
    try:
        assert auto.fit.plan.placement == "ram" and auto.tier is None and auto.flash is None
        assert auto("Once upon a time", max_tokens=12, temperature=0)["choices"][0]["text"] == want
    finally:
        auto.close()
    _, whole, _ = sizes(info)
    monkeypatch.setenv(FACTS_ENV, json.dumps({"mem_available": whole + RAM_MARGIN_MIN - 8 * MiB, "gpus": []}))
    flash = Llama(model, n_ctx=128, verbose=False, tier="auto")
    try:
        assert flash.tier == "flash" and flash.flash is not None
        assert flash.stats()["budget_bytes"] == flash.fit.plan.budget_bytes
        assert flash("Once upon a time", max_tokens=12, temperature=0)["choices"][0]["text"] == want
    finally:
        flash.close()
