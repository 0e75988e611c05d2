"""Cache-aware routing (Cache-Prior): off = exact, weights from unbiased probabilities, fewer misses."""

from __future__ import annotations

import os
import subprocess
import sys

import llama_cpp
import pytest

from spac_llamacpp import Llama
from spac_llamacpp.base.errors import NotMoEError, SpacError
from spac_llamacpp.models.default import default_model_path
from spac_llamacpp.tools.generate import greedy_continuation

PROMPT = b"ROMEO. What light"


def _greedy(llm: llama_cpp.Llama, n: int = 40) -> list[int]:
    return greedy_continuation(llm, PROMPT, n)


def _stock(path) -> list[int]:
    ref = llama_cpp.Llama(str(path), n_ctx=128, verbose=False)
    try:
        return _greedy(ref)
    finally:
        ref.close()


@pytest.mark.parametrize("arch", ["qwen3moe", "llama", "deepseek2", "gpt-oss"])
def test_lambda_zero_is_exact(tiny_model, arch):
    path = tiny_model(arch)
    llm = Llama(str(path), n_ctx=128, verbose=False, cache_prior=0.0)
    try:
        assert _greedy(llm) == _stock(path)
        assert llm.stats()["cache_prior"]["rows_biased"] == 0
    finally:
        llm.close()


@pytest.mark.parametrize("arch", ["qwen2moe", "qwen3moe"])
def test_mixing_weights_come_from_unbiased_probabilities(tiny_model, arch):
    # every expert resident and none protected: the bias lifts all logits equally, so selection is
    # unchanged; qwen2moe does not renormalise its weights, so they would be off by exp(bias) if the
    # biased probabilities reached them
    import numpy as np

    from spac_llamacpp.gguf.info import read_model_header

    path = tiny_model(arch)
    info = read_model_header(path)
    everything = np.ones((len(info.moe_layers), info.n_expert), dtype=bool)
    llm = Llama(str(path), n_ctx=128, verbose=False, cache_prior=1.0,
                cache_prior_options={"resident": everything, "top_j": 0})
    try:
        got = _greedy(llm)
        st = llm.stats()["cache_prior"]
        assert st["rows_biased"] > 0 and st["changed_rate"] == 0.0
        assert got == _stock(path)
    finally:
        llm.close()


def test_bias_trades_misses_for_changed_selections():
    path = default_model_path()
    rows = {}
    for lam in (0.0, 0.3):
        llm = Llama(str(path), n_ctx=256, verbose=False, cache_prior=lam, cache_prior_options={"cache_experts": 6})
        try:
            _greedy(llm, 64)
            rows[lam] = llm.stats()["cache_prior"]
        finally:
            llm.close()
    assert rows[0.0]["changed_rate"] is None and rows[0.3]["changed_rate"] > 0.05
    assert rows[0.3]["miss_rate"] < 0.8 * rows[0.0]["miss_rate"]
    assert rows[0.3]["top_j"] == 1  # top-2 model: J = k - 1


@pytest.mark.parametrize("arch", ["qwen3moe", "deepseek2"])
def test_device_memory_path_equals_host_path(tiny_model, arch):
    # GPU-resident routers put ffn_moe_probs in device memory, which the callback reads and writes with
    # ggml_backend_tensor_get/set; device_io forces that path on the CPU backend's buffers
    path = tiny_model(arch)
    runs = {}
    for device_io in (0, 1):
        llm = Llama(str(path), n_ctx=128, verbose=False, cache_prior=1.0,
                    cache_prior_options={"top_j": 0, "cache_experts": 2})
        llm._sensor._struct.device_io = device_io
        try:
            tokens = _greedy(llm)
            st = llm.stats()
            runs[device_io] = (tokens, st["cache_prior"], st["sensor_errors"])
        finally:
            llm.close()
    assert runs[1] == runs[0]
    assert runs[1][1]["rows_biased"] > 0 and runs[1][1]["changed_rate"] > 0  # the bias was written and acted
    assert runs[1][2] == {}


def test_bad_arguments(tiny_model, tiny_dense_model):
    with pytest.raises(NotMoEError):
        Llama(str(tiny_dense_model), verbose=False, cache_prior=0.1)
    with pytest.raises(SpacError, match="non-negative"):
        Llama(str(tiny_model()), verbose=False, cache_prior=-1.0)
    with pytest.raises(SpacError, match="routing=True"):
        Llama(str(tiny_model()), verbose=False, cache_prior=0.1, routing=False)


def test_eval_ppl_and_spac_run_cli(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("ROMEO. But soft, what light through yonder window breaks? It is the east, and Juliet is "
                    "the sun.\n" * 12)
    exe = os.path.dirname(sys.executable)
    r = subprocess.run([os.path.join(exe, "spac"), "eval-ppl", str(default_model_path()), "-f", str(text),
                        "--cache-prior", "0.2", "--windows", "1", "--max-tokens", "128"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:2] == ["lambda", "perplexity"] and lines[1].split()[0] == "0.000"
    assert lines[2].split()[0] == "0.200"
    r = subprocess.run([os.path.join(exe, "spac-run"), "-n", "16", "--cache-prior", "0.15", "--stats"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "cache-aware routing: lambda 0.15" in r.stderr, r.stderr


def test_self_draft_keeps_output_and_drafts_on_resident_experts(tiny_model):
    path = tiny_model("qwen3moe")
    want = _stock(path)
    llm = Llama(str(path), n_ctx=128, verbose=False, self_draft=True, n_draft=3)
    try:
        assert _greedy(llm) == want  # verification is exact
        spec = llm.speculation.summary()
        assert spec["provider"] == "SelfDraft" and spec["drafted"] > 0
        prior = llm._draft_llm.llm.cache_prior
        assert prior.stats()["rows_biased"] > 0
        prior.selections = prior.misses = 0  # warmed up: now drafting should (almost) never miss
        llm.reset()
        assert _greedy(llm) == want
        assert prior.selections > 0 and prior.misses / prior.selections < 0.05
    finally:
        llm.close()
    fewer = Llama(str(path), n_ctx=128, verbose=False, self_draft=1)
    try:
        assert _greedy(fewer) == want
        assert fewer._draft_llm.llm.moe_info.n_expert_used[fewer.moe_info.moe_layers[0]] == 2  # header unchanged
    finally:
        fewer.close()
    with pytest.raises(SpacError, match="do not also pass"):
        Llama(str(path), verbose=False, self_draft=True, draft_model_path=str(path))
