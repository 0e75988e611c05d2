"""Routing replay: a trace's expert selection forced onto another model of the same shape (issue 14).

A trace is recorded from a factory model (seed 0) and replayed on a model with the same shape but
other random weights (seed 1); the replayed run's own recorded trace must equal the input's ids.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spac_llamacpp import Llama
from spac_llamacpp.base.errors import NotMoEError, SpacError
from spac_llamacpp.models.default import default_model_path
from spac_llamacpp.models.factory import write_tiny_moe
from spac_llamacpp.observe.replay import MEANINGLESS, ReplayEnded, fill_missing
from spac_llamacpp.observe.trace import RoutingTrace, step_counts
from spac_llamacpp.observe.trace_import import import_trace
from spac_llamacpp.speculation.drafts import PromptLookupDraft
from spac_llamacpp.tools.generate import greedy_continuation

PROMPT = b"ROMEO. What light through yonder"
COMMON = {"n_ctx": 128, "verbose": False, "seed": 0, "routing_history": None}


@pytest.fixture(scope="session")
def other_models(tmp_path_factory: pytest.TempPathFactory):
    """``other(arch, **shape) -> Path``: a factory model with the fixtures' shape but seed 1."""
    root = tmp_path_factory.mktemp("replay_models")
    cache: dict[tuple, Path] = {}

    def other(arch: str = "qwen3moe", **shape: int) -> Path:
        key = (arch, *sorted(shape.items()))
        if key not in cache:
            name = "-".join([arch, *(f"{k}{v}" for k, v in sorted(shape.items()))])
            cache[key] = write_tiny_moe(root / f"{name}-seed1.gguf", arch, seed=1, **shape)
        return cache[key]

    return other


def record(path: Path | str, n: int = 12, prompt: bytes = PROMPT, **kwargs) -> tuple[RoutingTrace, Llama]:
    """Greedy generation of ``n`` tokens (prompt + decode steps); the run's trace and the (open) model."""
    llm = Llama(str(path), **{**COMMON, **kwargs})
    out = greedy_continuation(llm, prompt, n)
    assert len(out) == n
    return RoutingTrace.from_log(llm.routing), llm


def steps_run(llm: Llama, n_prompt: int, n_decode: int) -> RoutingTrace:
    """A prompt step of ``n_prompt`` tokens, then ``n_decode`` one-token steps (token ids do not matter:
    the routing is forced), as a trace."""
    llm.reset()
    llm.eval(list(range(1, n_prompt + 1)))
    for _ in range(n_decode):
        llm.eval([7])
    return RoutingTrace.from_log(llm.routing)


def assert_same_ids(got: RoutingTrace, want: RoutingTrace) -> None:
    assert got.ids.shape == want.ids.shape
    for t in range(want.n_tokens):  # token by token, every MoE layer, for a readable failure
        np.testing.assert_array_equal(got.ids[t], want.ids[t], err_msg=f"token {t}")
    np.testing.assert_array_equal(got.token_step, want.token_step)
    np.testing.assert_array_equal(got.counts, want.counts)


@pytest.mark.parametrize("arch", ["qwen3moe", "llama", "deepseek2", "gpt-oss", "qwen2moe"])
def test_replayed_run_records_the_input_trace(tiny_model, other_models, arch):
    # qwen3moe/qwen2moe softmax, llama (Mixtral layout), deepseek2 sigmoid gating + exp_probs_b selection
    # bias + a leading dense block, gpt-oss softmax_weight (probs are the logits)
    trace, src = record(tiny_model(arch))
    src.close()
    own, llm = record(other_models(arch))
    llm.close()
    moe = list(trace.moe_layers)
    assert not np.array_equal(own.ids[:, moe], trace.ids[:, moe])  # the other model routes differently
    assert trace.n_steps > 1 and trace.step_n_tokens[0] > 1  # a prompt step, then decode steps

    got, llm = record(other_models(arch), routing_replay=trace)
    try:
        assert_same_ids(got, trace)
        st = llm.stats()
        rp = st["replay"]
        assert rp["mismatched_rows"] == 0 and rp["rows_free"] == 0 and rp["rows_forced"] == (trace.ids[:, moe] >= 0
                                                                                             ).any(axis=2).sum()
        assert rp["note"] == MEANINGLESS and st["sensor_errors"] == {}
        assert llm.routing.summary()["replay"]["trace"] == "in-memory trace"
        assert np.isfinite(llm.scores[llm.n_tokens - 1]).all()  # meaningless, but finite
    finally:
        llm.close()


def test_top8_of_64_and_a_prompt_split_into_ubatches(tmp_path):
    # a fine-grained shape, and a prompt in 8-token batches: rows map across ubatches, and each batch's
    # last layer computes only its output row (the ubatch's last)
    src = write_tiny_moe(tmp_path / "a.gguf", "qwen3moe", n_expert=64, n_expert_used=8)
    other = write_tiny_moe(tmp_path / "b.gguf", "qwen3moe", n_expert=64, n_expert_used=8, seed=1)
    small = {"n_batch": 8, "n_ubatch": 8}
    prompt = b"Hello there, how are you today my friend? " * 2
    trace, llm = record(src, n=12, prompt=prompt, **small)
    llm.close()
    assert trace.step_n_tokens[0] > 16
    got, llm = record(other, n=12, prompt=prompt, routing_replay=trace, **small)
    try:
        assert_same_ids(got, trace)
        assert llm.replay.stats()["mismatched_rows"] == 0
    finally:
        llm.close()


def test_replay_from_a_file_and_on_the_device_path(tiny_model, other_models, tmp_path):
    trace, src = record(tiny_model("deepseek2"))
    src.close()
    path = trace.save(tmp_path / "t.npz")
    runs = []
    for device_io in (0, 1):  # device_io: every access through ggml_backend_tensor_get/set, as on a GPU
        llm = Llama(str(other_models("deepseek2")), **COMMON, routing_replay=str(path))
        llm._sensor._struct.device_io = device_io
        try:
            greedy_continuation(llm, PROMPT, 12)
            got = RoutingTrace.from_log(llm.routing)
            assert_same_ids(got, trace)
            runs.append((greedy_continuation(llm, PROMPT, 12), llm.stats()["replay"]))
            assert runs[-1][1]["trace"] == str(path) and runs[-1][1]["mismatched_rows"] == 0
        finally:
            llm.close()
    assert runs[0] == runs[1]


def test_a_trained_models_routing_on_a_random_model_of_its_shape(other_models):
    # the shipped default model (llama, 6 layers x 16 experts, top-2, learned routing) onto random weights
    trace, src = record(default_model_path(), n=16)
    src.close()
    llm = Llama(str(other_models("llama", n_layer=6, n_expert=16)), **COMMON, routing_replay=trace)
    try:
        got = steps_run(llm, int(trace.step_n_tokens[0]), trace.n_steps - 1)
        assert_same_ids(got, trace)
    finally:
        llm.close()


def test_flash_tier_sees_the_replayed_routing(tiny_model, other_models):
    trace, src = record(tiny_model("qwen3moe"), n=16)
    src.close()
    llm = Llama(str(other_models("qwen3moe")), **COMMON, routing_replay=trace, tier="flash", budget="1MiB",
                flash_options={"background": False})
    try:
        greedy_continuation(llm, PROMPT, 16)
        assert_same_ids(RoutingTrace.from_log(llm.routing), trace)
        st = llm.stats()
        eng = st["engine"]
        # the engine looks up each (ubatch, layer)'s distinct experts: exactly the trace's
        moe = list(trace.moe_layers)
        assert eng["demand_hits"] + eng["demand_misses"] == int((trace.counts[:, moe] > 0).sum())
        assert st["replay"]["mismatched_rows"] == 0 and st["tokens"] == trace.n_tokens
    finally:
        llm.close()


def test_vram_tier_with_the_pool_on_host(tiny_model, other_models):
    from spac_llamacpp import patched_llama_available
    from spac_llamacpp.native.expert_pool import POOL_PATCH_LEVEL

    if not patched_llama_available(POOL_PATCH_LEVEL):
        pytest.skip("needs spac's patched llama.cpp (scripts/build_llama.sh)")
    trace, src = record(tiny_model("qwen3moe"), n=12)
    src.close()
    llm = Llama(str(other_models("qwen3moe")), **COMMON, routing_replay=trace, tier="vram", vram_budget="1GiB",
                vram_options={"on_host": True, "slots": [6], "background": False})
    try:
        greedy_continuation(llm, PROMPT, 12)
        assert_same_ids(RoutingTrace.from_log(llm.routing), trace)
        st = llm.stats(settle=1.0)
        assert st["hit_rate"] is not None and st["replay"]["mismatched_rows"] == 0
    finally:
        llm.close()


def test_speculative_verification_takes_the_trace_by_position(tiny_model, other_models, tiny_dense_model):
    trace, src = record(tiny_model("qwen3moe"), n=24)
    src.close()
    for draft in ({"draft_model_path": str(tiny_dense_model), "n_draft": 3}, {"draft_model": PromptLookupDraft(3)}):
        llm = Llama(str(other_models("qwen3moe")), **COMMON, routing_replay=trace, speculation_history=None,
                    **draft)
        try:
            greedy_continuation(llm, PROMPT, 12)  # stays within the trace, drafts included
            rp = llm.replay
            checked = 0
            for step in llm.routing.steps:
                p0 = rp.position_of(step.first_token)
                assert p0 is not None
                for i in range(step.n_tokens):
                    want = trace.ids[rp.trace_token(p0 + i)]
                    for layer in trace.moe_layers:
                        if (want[layer] >= 0).any():  # logits_all: rows the recording never computed are free
                            np.testing.assert_array_equal(step.ids[i, layer], want[layer])
                            checked += 1
            assert checked >= len(trace.moe_layers) * 12
            assert llm.speculation.summary()["drafted"] > 0
            assert rp.stats()["mismatched_rows"] == 0
        finally:
            llm.close()


def test_cycle_past_the_trace_end(tiny_model, other_models):
    trace, src = record(tiny_model("qwen3moe"), n=6)
    src.close()
    n, start = trace.n_tokens, int(trace.step_n_tokens[0])
    llm = Llama(str(other_models("qwen3moe")), **COMMON, routing_replay=trace)
    try:
        greedy_continuation(llm, PROMPT, 30)
        got = RoutingTrace.from_log(llm.routing)
        assert got.n_tokens == n + 24
        np.testing.assert_array_equal(got.ids[:n], trace.ids)
        for p in range(n, got.n_tokens):  # past the end: the decode tokens again, in order
            np.testing.assert_array_equal(got.ids[p], trace.ids[start + (p - n) % (n - start)], err_msg=f"{p}")
        st = llm.stats()["replay"]
        assert st["cycle_start"] == start and st["rows_wrapped"] == 24 * len(trace.moe_layers)
    finally:
        llm.close()


def test_stop_at_the_trace_end(tiny_model, other_models):
    trace, src = record(tiny_model("qwen3moe"), n=6)
    src.close()
    llm = Llama(str(other_models("qwen3moe")), **COMMON, routing_replay=trace, replay_end="stop")
    try:
        assert len(greedy_continuation(llm, PROMPT, 30)) == 6  # as many tokens as the trace's run
        assert_same_ids(RoutingTrace.from_log(llm.routing), trace)
        assert llm.replay.ended and llm.stats()["replay"]["end"] == "stop"
        with pytest.raises(ReplayEnded, match="ends at token"):
            llm.eval([5])  # position n: past the end
        assert llm.n_tokens == trace.n_tokens
    finally:
        llm.close()


def test_missing_cells_repeat_the_previous_token(tiny_model, other_models):
    trace, src = record(tiny_model("qwen3moe"), n=8)
    src.close()
    p, (l0, l1) = int(trace.step_n_tokens[0]), trace.moe_layers[:2]
    holed = trace.ids.copy()
    holed[p + 2, l0] = -1  # a missing cell: the previous token's experts
    holed[p + 3, l1, 1:] = -1  # a partial cell: its first expert forced, the rest the model's
    t = RoutingTrace(holed, trace.token_step, trace.step_n_tokens,
                     step_counts(holed, trace.token_step, trace.n_steps, trace.n_expert), trace.moe_layers,
                     trace.n_expert)
    llm = Llama(str(other_models("qwen3moe")), **COMMON, routing_replay=t)
    try:
        greedy_continuation(llm, PROMPT, 8)
        got = RoutingTrace.from_log(llm.routing)
        np.testing.assert_array_equal(got.ids[p + 2, l0], trace.ids[p + 1, l0])
        assert got.ids[p + 3, l1, 0] == trace.ids[p + 3, l1, 0]
        assert llm.replay.filled_cells == 1
    finally:
        llm.close()
    filled, n = fill_missing(np.array([[[-1, -1]], [[3, 1]], [[-1, -1]], [[-1, -1]], [[2, -1]]]))
    assert n == 2 and filled[:, 0].tolist() == [[-1, -1], [3, 1], [3, 1], [3, 1], [2, -1]]


def test_imported_trace(other_models, tmp_path):
    # a public JSONL routing log (no prompt phase: every token a decode step) drives a model of its shape
    rng = np.random.default_rng(3)
    rows, ids = [], rng.permuted(np.tile(np.arange(8), (12, 4, 1)), axis=2)[:, :, :2]
    for tok in range(12):
        for layer in range(4):
            rows.append(json.dumps({"problem_id": 0, "layer": layer, "token_idx": tok,
                                    "experts": ids[tok, layer].tolist(), "gating_probs": [0.6, 0.4]}))
    src = tmp_path / "routing.jsonl"
    src.write_text("\n".join(rows) + "\n")
    trace = import_trace(src, "jsonl", n_expert=8)
    llm = Llama(str(other_models("qwen3moe")), **COMMON, routing_replay=trace)
    try:
        got = steps_run(llm, 5, 6)
        assert llm.replay.cycle_start == 0  # no prompt step to skip
        for t in range(11):
            layers = range(4) if t >= 4 else range(3)  # the prompt's last layer: only its output row
            for layer in layers:
                np.testing.assert_array_equal(got.ids[t, layer], ids[t, layer], err_msg=f"{t} {layer}")
    finally:
        llm.close()


@pytest.mark.parametrize(("shape", "words"), [
    ({"n_layer": 3}, ["3 MoE layers"]),
    ({"n_expert": 16}, ["16 experts"]),
    ({"n_expert_used": 4}, ["top-4"]),
])
def test_shape_mismatch_is_one_line(tiny_model, other_models, tmp_path, shape, words):
    trace, src = record(tiny_model("qwen3moe"), n=4)
    src.close()
    path = trace.save(tmp_path / "t.npz")
    model = other_models("qwen3moe", **shape)
    with pytest.raises(SpacError) as exc:
        Llama(str(model), **COMMON, routing_replay=str(path))
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg and model.name in msg
    assert "4 MoE layers x 8 experts, top-2" in msg  # the trace's side
    for w in words:
        assert w in msg


def test_bad_arguments(tiny_model, tiny_dense_model, tmp_path):
    trace, src = record(tiny_model("qwen3moe"), n=4)
    src.close()
    path = str(tiny_model("qwen3moe"))
    with pytest.raises(NotMoEError):
        Llama(str(tiny_dense_model), verbose=False, routing_replay=trace)
    with pytest.raises(SpacError, match="routing=True"):
        Llama(path, verbose=False, routing=False, routing_replay=trace)
    with pytest.raises(SpacError, match="cache_prior"):
        Llama(path, verbose=False, cache_prior=0.1, routing_replay=trace)
    with pytest.raises(SpacError, match="'cycle' or 'stop'"):
        Llama(path, verbose=False, routing_replay=trace, replay_end="wrap")
    with pytest.raises(SpacError, match="not found"):
        Llama(path, verbose=False, routing_replay=str(tmp_path / "missing.npz"))


# --- command line ------------------------------------------------------------------------------------

_CLI = {"spac": "from spac_llamacpp.tools.cli import spac; spac()",
        "spac-run": "from spac_llamacpp.tools.cli import spac_run; spac_run()"}


def cli(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a CLI with this checkout's package (PYTHONPATH inherited), not an installed copy."""
    return subprocess.run([sys.executable, "-c", _CLI[tool], *args], capture_output=True, text=True, timeout=300)


def test_cli_trace_replay_round_trip_and_spac_run(tiny_model, other_models, tmp_path):
    src, other = str(tiny_model("llama")), str(other_models("llama"))
    t, r = tmp_path / "t.npz", tmp_path / "r.npz"
    p = cli("spac", "trace", src, "-p", "Hello there", "-n", "10", "-o", str(t))
    assert p.returncode == 0, p.stderr
    p = cli("spac", "trace", other, "-p", "Hello there", "-n", "10", "--replay", str(t), "-o", str(r))
    assert p.returncode == 0, p.stderr
    assert f"routing replayed from {t}: output text is meaningless" in p.stderr
    want, got = RoutingTrace.load(t), RoutingTrace.load(r)
    assert_same_ids(got, want)
    assert got.meta["replay"]["trace"] == str(t) and got.meta["replay"]["mismatched_rows"] == 0

    p = cli("spac-run", other, "-p", "Hello there", "-n", "30", "--replay", str(t), "--stats", "json")
    assert p.returncode == 0, p.stderr
    stats = json.loads(p.stderr)  # stderr is pure JSON; the replay label is in its notes
    assert f"routing replayed from {t}: output text is meaningless" in stats["notes"]
    assert stats["replay"]["rows_wrapped"] > 0 and stats["replay"]["note"] == MEANINGLESS
    assert stats["routing"]["replay"]["end"] == "cycle" and stats["generated_tokens"] == 30

    p = cli("spac-run", other, "-p", "Hello there", "-n", "30", "--replay", str(t), "--replay-end", "stop", "--stats")
    assert p.returncode == 0, p.stderr
    assert "stop: trace end" in p.stderr and "routing replay:" in p.stderr


def test_cli_mismatch_is_one_line(tiny_model, other_models, tmp_path):
    t = tmp_path / "t.npz"
    assert cli("spac", "trace", str(tiny_model("llama")), "-p", "Hi", "-n", "3", "-o", str(t)).returncode == 0
    p = cli("spac-run", str(other_models("llama", n_expert=16)), "--replay", str(t))
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: routing replay: trace") and "16 experts" in lines[0]
    p = cli("spac-run", str(tiny_model("llama")), "--replay", str(t), "--cache-prior", "0.1")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
