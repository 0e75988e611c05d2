"""scripts/bench_policies.py: bad arguments are one line; a tiny run prints every policy and a JSON last line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spac_llamacpp import patched_llama_available
from spac_llamacpp.models.factory import write_tiny_moe

ROOT = Path(__file__).resolve().parent.parent
SHAPE = {"n_layer": 3, "n_embd": 128, "n_expert": 8, "n_expert_used": 2, "n_ff_exp": 256}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_moe(tmp_path_factory.mktemp("bench_policies") / "m.gguf", "qwen3moe", **SHAPE)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench_policies_prompts") / "p.txt"
    path.write_text("The quick brown fox\n")
    return path


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "scripts/bench_policies.py", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


@pytest.mark.parametrize("args, words", [
    (["--policies", "lru,fifo"], ["unknown placement policy 'fifo'", "spac, lru, lfu, pin, hysteresis"]),
    (["--policies", ","], ["names no policy"]),
    (["--lookup", "--draft", "d.gguf"], ["one draft source"]),
    (["--pool-on-host"], ["belong to --tier vram"]),
    (["--tier", "vram", "--no-limit"], ["belong to --tier flash"]),
    (["--budget", "1KiB"], ["too small"]),
    (["--budget", "12 apples"], ["size"]),
    (["--max-seconds", "0"], ["--max-seconds must be positive"]),
    (["--placement", "background"], ["--placement takes KEY=VALUE"]),
    (["--tier", "disk"], ["invalid choice"]),
])
def test_argument_errors_are_one_line(model, args, words):
    proc = _bench(str(model), *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and not proc.stdout
    for w in words:
        assert w in lines[0], lines[0]


def test_missing_model_is_one_line(tmp_path):
    proc = _bench(str(tmp_path / "nope.gguf"), "--no-limit")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: model file not found: "
                                                                         f"{tmp_path / 'nope.gguf'}"]


def _check(proc: subprocess.CompletedProcess[str], policies: list[str]) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    out = json.loads(lines[-1])
    assert out["policies"] == policies
    (run,) = out["runs"]
    for p in policies:
        r = run["results"][p]
        assert r["policy"] == p and r["tokens"] > 0 and r["tps"] > 0 and r["hit_rate"] is not None, r
        assert r["planned_bytes"] <= r["plan_budget_bytes"]
        assert any(line.strip().startswith(p + " ") and "tok/s" in line and "vs lru" in line for line in lines)
    for key in ("ratio_to_lru", "decode_ratio_to_lru"):
        assert run[key]["lru"] == 1.0 and all(v > 0 for v in run[key].values()), run[key]
    return out


def test_tiny_flash_run(model, prompts):
    policies = ["lru", "spac", "hysteresis"]
    proc = _bench(str(model), "--budget", "50%", "-n", "4", "--no-limit", "--prompts", str(prompts), "--ctx", "128",
                  "--policies", ",".join(policies), "--placement", "background=false")
    out = _check(proc, policies)
    (run,) = out["runs"]
    assert out["tier"] == "flash" and run["limit_method"] == "none" and out["placement"] == {"background": False}
    for p in policies:
        r = run["results"][p]
        assert r["wait_ms_per_token"] >= 0 and r["engine"]["demand_misses"] > 0  # a cold start misses
        # the process's CPU clock always moves in a run; a thread's CPU clock may tick coarsely (CI's read 0.0 for a
        # 4-token run's sub-millisecond tier loop), so the loop's figure is only checked to be reported and sane
        process_cpu = r["cpu_user_seconds"] + r["cpu_system_seconds"]
        assert r["cpu_user_seconds"] > 0 and 0 <= r["loop_cpu_seconds"] <= process_cpu
    ours = run["results"]["spac"]["replanner"]
    assert ours["background"] is False and ours["solves"] > 0 and ours["solve_cpu_seconds"] > 0
    # the same budget for all; with layer admission (ours, lru) a miss needs no keep reserve: their plans get it,
    # while hysteresis (misses served, not admitted) keeps its step's demand loads to the step's end
    assert len({run["results"][p]["budget_bytes"] for p in policies}) == 1
    plan = {p: run["results"][p]["plan_budget_bytes"] for p in policies}
    assert plan["lru"] == plan["spac"] > plan["hysteresis"]
    # lru admits its demand loads in their layers (layer admission, the default): kept, not read again; with no
    # lookahead it needs no keep reserve either
    lru = run["results"]["lru"]
    assert lru["engine"]["admitted"] > 0 and lru["staged_kept"] == 0
    assert run["results"]["hysteresis"]["engine"]["admitted"] == 0  # it does not admit demand


@pytest.mark.skipif(not patched_llama_available(3), reason="the VRAM tier needs spac's patched llama.cpp")
def test_tiny_vram_run_on_the_host_pool(model, prompts):
    policies = ["lru", "pin"]
    proc = _bench(str(model), "--tier", "vram", "--budget", "50%", "-n", "4", "--prompts", str(prompts), "--ctx",
                  "128", "--policies", ",".join(policies), "--pool-on-host", "--no-repack")
    out = _check(proc, policies)
    assert out["pool_on_host"] and "their tok/s mean nothing" in proc.stdout
    lru = out["runs"][0]["results"]["lru"]
    assert lru["wait_ms_per_token"] is None and lru["copies_done"] > 0 and lru["pool_on_host"]
