"""The command line: spac-run, spac inspect, spac trace; bad input gives one line, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spac_llamacpp.observe.trace import RoutingTrace

BIN = Path(sys.executable).parent


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    tool, *rest = args
    return subprocess.run([str(BIN / tool), *rest], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


def test_spac_run_default_model(tmp_path):
    proc = run("spac-run", "-n", "12", "--stats", env={"SPAC_MODEL_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Once upon a time") and len(proc.stdout.strip()) > len("Once upon a time")
    assert "embedded default" in proc.stderr and "tok/s" in proc.stderr and "routing:" in proc.stderr


def test_spac_run_json_stats(tiny_model, tmp_path):
    stats_file = tmp_path / "s.json"
    proc = run("spac-run", str(tiny_model("deepseek2")), "-p", "Hello", "-n", "8", "--stats", "json",
               "--stats-file", str(stats_file))
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stderr.strip().splitlines()[-1])
    assert stats == json.loads(stats_file.read_text())
    assert stats["generated_tokens"] + (stats["stop_reason"] == "eos") >= 1
    routing = stats["routing"]
    assert routing["bad_ids"] == 0 and routing["tokens"] >= stats["prompt_tokens"]
    assert [layer["layer"] for layer in routing["layers"]][0] >= 1  # deepseek2's leading dense block


def test_spac_run_with_overrides(tiny_model):
    proc = run("spac-run", str(tiny_model("olmoe")), "-n", "4", "-ot", r"\.ffn_.*_exps=CPU", "--no-repack")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("tool", [("spac-run",), ("spac", "inspect"), ("spac", "trace")])
def test_missing_file(tool, tmp_path):
    extra = ["-p", "x", "-o", str(tmp_path / "t.npz")] if tool[-1] == "trace" else []
    assert_one_line_error(run(*tool, str(tmp_path / "missing.gguf"), *extra), "missing.gguf")


@pytest.mark.parametrize("cut", [3, 20, 200, 2000])
@pytest.mark.parametrize("tool", [("spac-run",), ("spac", "inspect")])
def test_truncated_gguf(tiny_model, tmp_path, cut, tool):
    bad = tmp_path / "trunc.gguf"
    bad.write_bytes(tiny_model("qwen3moe").read_bytes()[:cut])
    assert_one_line_error(run(*tool, str(bad)))


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "text.gguf"
    bad.write_text("hello, I am not a model\n" * 10)
    assert_one_line_error(run("spac-run", str(bad)))
    assert_one_line_error(run("spac", "inspect", str(bad)))


def test_dense_model_for_moe_tools(tiny_dense_model, tmp_path):
    assert_one_line_error(run("spac", "inspect", str(tiny_dense_model)))
    assert_one_line_error(run("spac", "trace", str(tiny_dense_model), "-p", "x", "-o", str(tmp_path / "t.npz")))
    # spac-run is a general runner: a dense model runs, it simply has no routing
    proc = run("spac-run", str(tiny_dense_model), "-n", "4", "--stats")
    assert proc.returncode == 0 and "no routed experts" in proc.stderr


def test_inspect_json(tiny_model):
    proc = run("spac", "inspect", str(tiny_model("qwen2moe")), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["architecture"] == "qwen2moe" and info["n_expert"] > 0
    text = run("spac", "inspect", str(tiny_model("qwen2moe")))
    assert text.returncode == 0 and "qwen2moe" in text.stdout


def test_trace_records_every_token(tiny_model, tmp_path):
    out = tmp_path / "t.npz"
    prompts = tmp_path / "p.txt"
    prompts.write_text("first prompt here\n\nsecond one\n")
    proc = run("spac", "trace", str(tiny_model("qwen3moe")), "-p", "Hello there", "-f", str(prompts),
               "-n", "6", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    t = RoutingTrace.load(out)
    assert len(t.meta["runs"]) == 3 and t.meta["architecture"] == "qwen3moe"
    assert t.ids.shape[0] == t.n_tokens == int(t.step_n_tokens.sum()) == len(t.token_step)
    assert t.counts.shape == (t.n_steps, t.ids.shape[1], t.n_expert)
    # per-step counts are the histogram of that step's ids
    for step in range(t.n_steps):
        ids = t.ids[t.token_step == step]
        for layer in t.moe_layers:
            row = ids[:, layer][ids[:, layer] >= 0]
            np.testing.assert_array_equal(np.bincount(row, minlength=t.n_expert), t.counts[step, layer])
    assert set(np.unique(t.ids[:, t.moe_layers[0]])) - {-1} <= set(range(t.n_expert))


def test_trace_load_rejects_other_files(tmp_path):
    from spac_llamacpp.base.errors import SpacError

    bad = tmp_path / "x.npz"
    bad.write_bytes(b"nope")
    with pytest.raises(SpacError):
        RoutingTrace.load(bad)
    with pytest.raises(SpacError):
        RoutingTrace.load(tmp_path / "missing.npz")


@pytest.mark.parametrize(("arch", "dtype"), [("deepseek2-merged", "q8_0"), ("gpt-oss", "f16")])
def test_inspect_json_byte_ranges_are_the_real_expert_bytes(tiny_model, arch, dtype):
    """Hash one expert's bytes read through the --json range and through gguf's own tensor data."""
    import hashlib

    import gguf

    path = tiny_model(arch, dtype)
    info = json.loads(run("spac", "inspect", str(path), "--json").stdout)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    raw = path.read_bytes()
    for et in info["expert_tensors"]:
        e = info["n_expert"] - 1
        start = et["file_offset"] + e * et["bytes_per_expert"]
        via_range = raw[start:start + et["bytes_per_expert"]]
        data = np.ascontiguousarray(tensors[et["name"]].data).view(np.uint8).reshape(info["n_expert"], -1)
        assert hashlib.sha256(via_range).digest() == hashlib.sha256(data[e].tobytes()).digest(), et["name"]


def test_default_ctx_clamped_to_training_context(tiny_model):
    from spac_llamacpp.gguf.info import read_model_header
    from spac_llamacpp.models.default import default_model_path
    from spac_llamacpp.tools.cli import DEFAULT_CTX, default_ctx

    shipped = default_model_path()
    assert read_model_header(shipped).context_length == 256
    assert default_ctx(str(shipped), None) == 256
    assert default_ctx(str(shipped), 1024) == 1024  # an explicit --ctx wins
    path = tiny_model()
    trained = read_model_header(path).context_length
    assert default_ctx(str(path), None) == (min(DEFAULT_CTX, trained) if trained else DEFAULT_CTX)
