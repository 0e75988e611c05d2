"""``spac patch``: hot-first expert order, identical output, recorded permutation, profile round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import llama_cpp
import numpy as np
import pytest

from spac_llamacpp.base.errors import NotMoEError, SpacError
from spac_llamacpp.gguf.info import read_model_header
from spac_llamacpp.models.factory import ARCHITECTURES
from spac_llamacpp.observe.profile import Profile, load_profile
from spac_llamacpp.tools.patch_model import expert_order, hot_first, patch_model

PROMPT = "Hello there, how"


def _profile(path, seed: int = 1) -> Profile:
    info = read_model_header(path)
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 50, size=(len(info.moe_layers), info.n_expert))
    return Profile(tuple(info.moe_layers), info.n_expert, counts, tokens=100, steps=40, model=path.name)


def _run(path, n: int = 16) -> tuple[list[int], np.ndarray]:
    llm = llama_cpp.Llama(str(path), n_ctx=128, verbose=False, logits_all=True, seed=0)
    try:
        toks = []
        for tok in llm.generate(llm.tokenize(PROMPT.encode()), top_k=1, temp=0.0):
            toks.append(tok)
            if len(toks) == n:
                break
        return toks, np.array(llm.scores[: llm.n_tokens])
    finally:
        llm.close()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_patched_model_computes_the_same(tiny_model, tmp_path, arch):
    src = tiny_model(arch)
    prof = _profile(src)
    out = tmp_path / "patched.gguf"
    summary = patch_model(src, prof, out, progress=False)
    assert summary["experts_moved"] > 0
    want_toks, want_logits = _run(src)
    got_toks, got_logits = _run(out)
    assert got_toks == want_toks
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-3, atol=1e-3)
    # hot-first: position 0 of each layer holds the profile's hottest expert, and the order is recorded
    order = expert_order(out)
    info = read_model_header(out)
    for i, block in enumerate(info.moe_layers):
        np.testing.assert_array_equal(order[block], hot_first(prof.counts)[i])
        assert prof.counts[i, order[block][0]] == prof.counts[i].max()


def test_patching_twice_composes_the_recorded_order(tiny_model, tmp_path):
    src = tiny_model("qwen3moe")
    once, twice = tmp_path / "once.gguf", tmp_path / "twice.gguf"
    p1 = _profile(src, 1)
    patch_model(src, p1, once, progress=False)
    p2 = _profile(once, 2)
    patch_model(once, p2, twice, progress=False)
    info = read_model_header(src)
    first, second = expert_order(once), expert_order(twice)
    for i, block in enumerate(info.moe_layers):
        np.testing.assert_array_equal(second[block], first[block][hot_first(p2.counts)[i]])
    assert _run(twice)[0] == _run(src)[0]


def test_hot_first_respects_groups():
    scores = np.array([[1, 5, 3, 9, 0, 2, 8, 4]], dtype=float)
    np.testing.assert_array_equal(hot_first(scores), [[3, 6, 1, 7, 2, 5, 0, 4]])
    np.testing.assert_array_equal(hot_first(scores, n_group=2), [[3, 1, 2, 0, 6, 7, 5, 4]])


def test_profile_round_trip_and_trace_as_profile(tiny_model, tmp_path):
    src = tiny_model("olmoe")
    prof = _profile(src)
    prof.utility = prof.counts / 10.0
    path = prof.save(tmp_path / "p.json")
    back = load_profile(path)
    np.testing.assert_array_equal(back.counts, prof.counts)
    np.testing.assert_allclose(back.utility, prof.utility)
    assert back.moe_layers == prof.moe_layers and back.tokens == 100

    trace = tmp_path / "t.npz"
    exe = os.path.join(os.path.dirname(sys.executable), "spac")
    subprocess.run([exe, "trace", str(src), "-p", "Hi", "-n", "6", "-o", str(trace)], check=True, capture_output=True)
    from_trace = load_profile(trace)
    assert from_trace.counts.shape == prof.counts.shape and from_trace.counts.sum() > 0


def test_bad_inputs(tiny_model, tiny_dense_model, tmp_path):
    src = tiny_model("qwen3moe")
    with pytest.raises(SpacError, match="does not match"):
        patch_model(src, Profile((0,), 3, np.zeros((1, 3))), tmp_path / "x.gguf", progress=False)
    with pytest.raises(NotMoEError):
        patch_model(tiny_dense_model, _profile(src), tmp_path / "y.gguf", progress=False)
    with pytest.raises(SpacError, match="new file"):
        patch_model(src, _profile(src), src, progress=False)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(SpacError, match="not a spac profile"):
        load_profile(bad)
    bad.write_text(json.dumps({"format": "spac-profile", "moe_layers": [0], "n_expert": 4, "counts": [[1, 2]]}))
    with pytest.raises(SpacError, match="shape"):
        load_profile(bad)


def test_cli_profile_patch_plot(tiny_model, tmp_path):
    src = tiny_model("qwen2moe")
    exe = os.path.join(os.path.dirname(sys.executable), "spac")

    def spac(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)

    prof, out, heat, trace, hits = (tmp_path / n for n in ("p.json", "o.gguf", "h.png", "t.npz", "r.png"))
    r = spac("profile", str(src), "-p", "Once upon", "-p", "The cat", "-n", "8", "--lookup", "-o", str(prof))
    assert r.returncode == 0, r.stderr
    p = load_profile(prof)
    assert p.counts.sum() > 0 and p.utility is not None and p.extra["speculation"]["provider"]
    r = spac("patch", str(src), "--profile", str(prof), "-o", str(out))
    assert r.returncode == 0 and "verified" in r.stderr, r.stderr
    assert _run(out)[0] == _run(src)[0]
    assert spac("plot", str(prof), "-o", str(heat)).returncode == 0
    assert heat.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert spac("trace", str(src), "-p", "Hello", "-n", "24", "-o", str(trace)).returncode == 0
    r = spac("plot", str(trace), "-o", str(hits), "--budget-experts", "2")
    assert r.returncode == 0, r.stderr
    assert hits.stat().st_size > 1000
    bad = spac("patch", str(src), "--profile", str(tmp_path / "missing.json"), "-o", str(out))
    assert bad.returncode == 2 and "profile not found" in bad.stderr


def test_flash_tier_starts_warm_from_a_profile(tiny_model, tmp_path):
    from spac_llamacpp import Llama
    from spac_llamacpp.planning.budgets import page_layout, staging_bytes

    src = tiny_model("olmoe")
    prof = _profile(src)
    llm = Llama(str(src), n_ctx=64, verbose=False, tier="flash", budget="64MiB",
                flash_options={"background": False, "profile": prof})
    try:
        assert llm.flash.warm
        # a roomy budget holds the whole profile; a tight one holds its hottest experts first
        assert llm.flash.wanted.any()
    finally:
        llm.close()
    layout = page_layout(read_model_header(src))
    half = staging_bytes(layout) + layout.total_expert_bytes // 2
    tight = Llama(str(src), n_ctx=64, verbose=False, tier="flash", budget=half,
                  flash_options={"background": False, "profile": prof, "lookahead": False})
    try:
        w = tight.flash.wanted
        assert 0 < w.sum() < w.size
        for i in range(w.shape[0]):  # within a layer, everything kept is at least as hot as anything dropped
            if w[i].any() and (~w[i]).any():
                assert prof.counts[i][w[i]].min() >= prof.counts[i][~w[i]].max()
    finally:
        tight.close()
    with pytest.raises(SpacError, match="does not match"):
        Llama(str(src), n_ctx=64, verbose=False, tier="flash", budget="64MiB",
              flash_options={"profile": Profile((0,), 3, np.zeros((1, 3)))})


def test_telemetry_reports_original_expert_ids(tiny_model, tmp_path):
    from spac_llamacpp import Llama

    src = tiny_model("qwen3moe")
    out = tmp_path / "p.gguf"
    patch_model(src, _profile(src, 3), out, progress=False)
    assert read_model_header(out).expert_order == {b: tuple(o) for b, o in expert_order(out).items()}
    summaries = []
    for path in (src, out):
        llm = Llama(str(path), n_ctx=128, verbose=False)
        try:
            gen = llm.generate(llm.tokenize(PROMPT.encode()), top_k=1, temp=0.0)
            for _ in range(12):
                next(gen)
            summaries.append({lay["layer"]: sorted(map(tuple, lay["top_experts"]))
                              for lay in llm.routing.summary(top=8)["layers"]})
        finally:
            llm.close()
    assert summaries[0] == summaries[1]  # same experts, same counts, named by their original ids
