"""The benchmarks' --replay TRACE (issue 14): every run, stock runs included, takes the trace's routing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import llama_cpp
import pytest

from spac_llamacpp import Llama
from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.gguf.info import read_model_header
from spac_llamacpp.models.factory import write_tiny_moe
from spac_llamacpp.observe.trace import RoutingTrace
from spac_llamacpp.tools.benchmarks import check_replay, replay_stats, stock_llama, timed_generation

ROOT = Path(__file__).resolve().parent.parent
# experts of several pages (the flash tier's budget is page-granular)
SHAPE = {"n_layer": 3, "n_embd": 128, "n_expert": 8, "n_expert_used": 2, "n_ff_exp": 256}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A model (seed 1), a trace recorded from another of its shape (seed 0), a model of another shape."""
    root = tmp_path_factory.mktemp("bench_replay")
    src = write_tiny_moe(root / "src.gguf", "qwen3moe", seed=0, **SHAPE)
    llm = Llama(str(src), n_ctx=128, verbose=False, seed=0, routing_history=None)
    timed_generation(llm, ["The quick brown fox"], 24)
    RoutingTrace.from_log(llm.routing).save(root / "trace.npz")
    llm.close()
    return {"model": write_tiny_moe(root / "model.gguf", "qwen3moe", seed=1, **SHAPE), "trace": root / "trace.npz",
            "other": write_tiny_moe(root / "other.gguf", "qwen3moe", seed=1, **{**SHAPE, "n_expert": 4})}


def test_check_replay(models):
    assert check_replay(None, read_model_header(models["model"])) is None
    assert check_replay(str(models["trace"]), read_model_header(models["model"])) == str(models["trace"].resolve())
    with pytest.raises(SpacError, match="routing replay: trace .* 8 experts, top-2, but model other.gguf"):
        check_replay(str(models["trace"]), read_model_header(models["other"]))


def test_stock_side_with_and_without_replay(models):
    kw = {"n_ctx": 128, "verbose": False, "seed": 0}
    plain = stock_llama(str(models["model"]), {}, use_extra_bufts=False, **kw)
    assert type(plain) is llama_cpp.Llama and replay_stats(plain) is None
    plain.close()
    forced = stock_llama(str(models["model"]), {"replay": str(models["trace"])}, use_extra_bufts=False,
                         routing_history=None, **kw)
    try:
        assert isinstance(forced, Llama) and forced.tier is None  # stock placement, forced routing
        timed_generation(forced, ["The quick brown fox"], 24)
        st = replay_stats(forced)
        assert st["rows_forced"] > 0 and st["mismatched_rows"] == 0
        got, want = RoutingTrace.from_log(forced.routing), RoutingTrace.load(models["trace"])
        n = min(got.n_tokens, want.n_tokens)
        assert (got.ids[:n] == want.ids[:n]).all()
    finally:
        forced.close()


def _last_json(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bench_flash_replays_on_both_sides(models, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The quick brown fox\n")
    out = _last_json(["scripts/bench_flash.py", str(models["model"]), "--budget", "50%", "-n", "6", "--no-limit",
                      "--prompts", str(prompts), "--ctx", "128", "--replay", str(models["trace"]),
                      "--demand", "async", "--demand", "wait", "--ceiling", "yes"])
    assert out["replay"] == str(models["trace"])
    runs = [out["ceiling"], out["runs"][0]["stock"], out["runs"][0]["spac"], out["runs"][0]["spac_wait"]]
    for run in runs:
        assert run["replay"]["rows_forced"] > 0 and run["replay"]["mismatched_rows"] == 0, run
    spac = out["runs"][0]["spac"]
    assert set(spac["loop_seconds"]) == {"observe", "learn", "plan", "move", "step_ends"} and spac["checks"] >= 1
    # the JSON contract of issue 16: top-level expert bytes; per run the wait per token and the overlap
    assert out["expert_bytes"] > 0 and out["demand"] == ["async", "wait"]
    for run, mode in ((spac, "async"), (out["runs"][0]["spac_wait"], "wait")):
        assert run["demand"] == mode and run["timing"]["demand"] == mode
        assert run["wait_ms_per_token"] is None or run["wait_ms_per_token"] >= 0
        assert run["overlap"] is None or 0 <= run["overlap"] <= 1
        assert run["max_resident_at_check"] <= run["budget_bytes"]


def test_bench_speculation_replays(models):
    out = _last_json(["scripts/bench_speculation.py", str(models["model"]), "-n", "6", "--ctx", "128",
                      "--replay", str(models["trace"])])
    assert out["replay"] == str(models["trace"])
    assert [r["source"] for r in out["rows"]][:2] == ["none", "prompt lookup"]
    proc = subprocess.run([sys.executable, "scripts/bench_speculation.py", str(models["other"]), "-n", "2",
                           "--replay", str(models["trace"])], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode != 0 and "routing replay: trace" in proc.stderr


def test_bench_vram_replays_on_both_sides(models):
    from spac_llamacpp import patched_llama_available

    if not patched_llama_available(3):
        pytest.skip("the VRAM tier needs spac's patched llama.cpp")
    out = _last_json(["scripts/bench_vram.py", str(models["model"]), "--budget", "50%", "-n", "4", "--ctx", "128",
                      "--pool-on-host", "--skip-n-cpu-moe", "--no-repack", "--replay", str(models["trace"])])
    row = out["runs"][0]
    assert out["replay"] == str(models["trace"])
    for run in (row["exps_cpu"], row["spac"]):
        assert run["replay"]["rows_forced"] > 0 and run["replay"]["mismatched_rows"] == 0, run
