"""spac synth: real models' layouts with random weights load in stock llama.cpp and generate tokens."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import Q4_K, dequantize

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.gguf.info import inspect_model
from spac_llamacpp.models.synth import PRESETS, plan_tensors, write_synth
from spac_llamacpp.models.synth import writer as synth_writer
from spac_llamacpp.models.synth.blocks import block_writer, pack_q4_k_scales

ROOT = Path(__file__).resolve().parents[1]

# Total parameters the model cards publish (Qwen3-30B-A3B 30.5B, gpt-oss-20b 20.9B, Mixtral-8x7B 46.7B,
# DeepSeek-V2-Lite 15.7B, OLMoE-1B-7B 6.9B): the full-depth plans must match them.
PUBLISHED_PARAMS = {
    "qwen3-30b-a3b": 30.5e9,
    "gpt-oss-20b": 20.9e9,
    "mixtral-8x7b": 46.7e9,
    "deepseek-v2-lite": 15.7e9,
    "olmoe-1b-7b": 6.9e9,
}


def run_synth(*args: str) -> subprocess.CompletedProcess[str]:
    """``spac synth ...`` in a fresh interpreter, importing this checkout's package."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = "from spac_llamacpp.tools.cli import spac; spac()"
    return subprocess.run([sys.executable, "-c", code, "synth", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def out_file(tmp_path):
    """Where a test writes its GGUF; removed afterwards (pytest keeps old tmp dirs, these are GBs)."""
    path = tmp_path / "synth.gguf"
    yield path
    path.unlink(missing_ok=True)


def check_generates(path: Path) -> None:
    """Stock llama_cpp.Llama loads ``path``; the prompt's logits are finite and vary; 4 tokens come out."""
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=32, n_threads=2, logits_all=True, verbose=False, seed=0)
    try:
        tokens = llm.tokenize(b"Once upon a time")
        llm.eval(tokens)
        logits = np.asarray(llm.scores[: llm.n_tokens])
        assert np.isfinite(logits).all()
        assert logits.std() > 0.05 and 1.0 < np.abs(logits).max() < 1e3
        assert len(set(logits.argmax(axis=1).tolist())) > 1  # the prediction depends on the token
        llm.reset()
        out = llm.create_completion("Once upon a time", max_tokens=4, temperature=0)
        assert out["usage"]["completion_tokens"] == 4
    finally:
        llm.close()


def check_layout(path: Path, preset: str, n_layer: int) -> None:
    """``spac inspect``'s reader reports the preset's experts and the real expert shapes."""
    p = PRESETS[preset]
    s = p.spec
    info = inspect_model(path)
    assert info.architecture == s.gguf_arch and info.block_count == n_layer
    assert info.n_expert == s.n_expert and info.expert_ff_length == s.n_ff_exp
    moe = [i for i in range(n_layer) if not (s.arch == "deepseek2" and i < s.n_dense_lead)]
    assert list(info.moe_layers) == moe
    assert set(info.n_expert_used[i] for i in moe) == {s.n_expert_used}
    if s.arch == "deepseek2":
        assert info.n_expert_shared == s.n_expert_shared and list(info.dense_layers) == [0]
    shapes = {t.kind: t.shape for t in info.expert_tensors if t.layer == moe[0]}
    D, F, E = s.n_embd, s.n_ff_exp, s.n_expert  # noqa: N806
    assert shapes["gate"] == shapes["up"] == (D, F, E) and shapes["down"] == (F, D, E)
    # experts are not copies of each other
    f = path.open("rb")
    with f:
        ranges = [t.expert_range(e) for t in info.layer_tensors(moe[0]) if t.kind == "up" for e in (0, 1)]
        chunks = []
        for start, end in ranges:
            f.seek(start)
            chunks.append(f.read(min(end - start, 1 << 16)))
    assert chunks[0] != chunks[1]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_loads_and_generates(preset, out_file):
    proc = run_synth(preset, "-o", str(out_file), "--layers", "2")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out_file}" in proc.stderr and "2 layers" in proc.stderr
    check_layout(out_file, preset, 2)
    check_generates(out_file)


@pytest.mark.parametrize("expert_type,ggml", [("q8_0", "Q8_0"), ("f16", "F16"), ("mxfp4", "MXFP4")])
def test_types_load(expert_type, ggml, out_file):
    """The other expert types (q4_k is every preset's default but gpt-oss's) load and run; one block is
    enough for this (OLMoE's are the smallest)."""
    result = write_synth(out_file, "olmoe-1b-7b", expert_type=expert_type, layers=1, progress=False)
    assert result.expert_type == ggml and result.n_layer == 1
    info = inspect_model(out_file)
    assert {t.ggml_type for t in info.expert_tensors} == {ggml}
    check_generates(out_file)


def test_same_seed_same_bytes():
    """The data of every tensor is a function of (seed, name): same seed, same bytes; another seed, others."""
    p = PRESETS["olmoe-1b-7b"]

    def data(seed: int) -> list[bytes]:
        out = []
        for t in plan_tensors(p, p.with_layers(1), "mxfp4"):
            first = next(synth_writer._tensor_chunks(t, seed))
            out.append(first[: 1 << 16].tobytes())
        return out

    a, b, c = data(3), data(3), data(4)
    assert a == b
    assert sum(x != y for x, y in zip(a, c, strict=True)) == sum(
        not t.name.endswith("norm.weight") for t in plan_tensors(p, p.with_layers(1), "mxfp4"))
    # silent ids: zero output rows
    output = plan_tensors(p, p.with_layers(1), "mxfp4", silent_ids=[1, 5])[-1]
    rows = next(synth_writer._tensor_chunks(output, 0)).reshape(-1, output.row_bytes)
    assert output.name == "output.weight" and not rows[[1, 5]].any() and rows[[0, 2, 3, 4, 6]].any(axis=1).all()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_full_plan_has_the_published_parameter_count(preset):
    p = PRESETS[preset]
    tensors = plan_tensors(p, p.spec, p.default_type)
    params = sum(math.prod(t.ne) for t in tensors)
    assert params == pytest.approx(PUBLISHED_PARAMS[preset], rel=0.01)
    assert sum(t.name.endswith("_exps.weight") for t in tensors) == 3 * (p.spec.n_layer - (
        p.spec.n_dense_lead if p.spec.arch == "deepseek2" else 0))


def test_plan_types():
    p = PRESETS["gpt-oss-20b"]
    by_name = {t.name: t for t in plan_tensors(p, p.with_layers(1), "q4_k")}
    # 2880-wide rows are not whole Q4_K super-blocks: llama.cpp's fallback Q5_0
    assert by_name["blk.0.ffn_up_exps.weight"].qtype == Q.Q5_0
    assert by_name["blk.0.attn_q.weight"].qtype == Q.F16 and by_name["blk.0.attn_q.weight"].ne == (2880, 4096)
    assert by_name["blk.0.attn_sinks.weight"].qtype == Q.F32 and by_name["token_embd.weight"].qtype == Q.Q8_0
    q = PRESETS["qwen3-30b-a3b"]
    by_name = {t.name: t for t in plan_tensors(q, q.with_layers(1), "q4_k")}
    assert by_name["blk.0.attn_q.weight"].ne == (2048, 32 * 128) and by_name["blk.0.attn_k_norm.weight"].ne == (128,)
    assert by_name["blk.0.ffn_down_exps.weight"].qtype == Q.Q4_K


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.MXFP4], ids=lambda t: t.name)
def test_blocks_are_valid_and_scaled(qtype):
    w = block_writer(qtype)
    buf = np.empty(w.nbytes(256 * 1024), dtype=np.uint8)
    w.fill(buf, 0.02, np.random.default_rng(0))
    x = buf.view(np.float16).astype(np.float32) if qtype == Q.F16 else dequantize(buf, qtype).ravel()
    assert np.isfinite(x).all()
    assert x.std() == pytest.approx(0.02, rel=0.05)
    assert abs(x.mean()) < 0.1 * 0.02
    assert len(np.unique(x[:4096])) > 8


def test_q4_k_scale_packing_round_trips():
    rng = np.random.default_rng(0)
    sc, m = rng.integers(0, 64, (100, 8)), rng.integers(0, 64, (100, 8))
    sc2, m2 = Q4_K.get_scale_min(pack_q4_k_scales(sc, m))
    assert (sc2 == sc).all() and (m2 == m).all()


def test_refuses_without_disk_space(out_file, monkeypatch):
    from click.testing import CliRunner

    from spac_llamacpp.tools.cli import spac

    class Usage:
        total, used, free = 10 << 30, 10 << 30, 100 << 20

    monkeypatch.setattr(synth_writer.shutil, "disk_usage", lambda _path: Usage)
    with pytest.raises(SpacError, match=r"needs 1\.\d GiB, 100\.0 MiB free"):
        write_synth(out_file, "qwen3-30b-a3b", layers=2)
    result = CliRunner().invoke(spac, ["synth", "mixtral-8x7b", "-o", str(out_file)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: not enough disk space") and "26.5 GiB" in lines[0]
    assert list(out_file.parent.iterdir()) == []  # nothing written, no temporary file left


def test_bad_arguments_are_one_line(out_file):
    assert_one_line_error(run_synth("qwen3-235b", "-o", str(out_file)), "unknown synth preset", "qwen3-30b-a3b")
    assert_one_line_error(run_synth("olmoe-1b-7b", "-o", str(out_file), "--type", "q2_k"), "unknown synth type")
    assert_one_line_error(run_synth("deepseek-v2-lite", "-o", str(out_file), "--layers", "1"), "between 2 and 27")
    assert_one_line_error(run_synth("olmoe-1b-7b", "-o", str(out_file.parent / "no" / "x.gguf")), "does not exist")
    assert not out_file.exists()
