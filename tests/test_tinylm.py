"""The PyTorch twin of llama.cpp's llama graph: export, logits agreement, GGUF round trip, training step.

Skipped without torch (CI does not install it); everything here runs in seconds on tiny shapes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from spac_llamacpp.models.factory import factory_vocab  # noqa: E402
from spac_llamacpp.models.spec import tiny_spec  # noqa: E402
from spac_llamacpp.models.tinylm.data import TokenStream  # noqa: E402
from spac_llamacpp.models.tinylm.export import export_model, load_gguf_model  # noqa: E402
from spac_llamacpp.models.tinylm.model import TinyLM  # noqa: E402
from spac_llamacpp.models.tinylm.recipe import TrainConfig  # noqa: E402
from spac_llamacpp.models.tinylm.train import train  # noqa: E402
from spac_llamacpp.models.tinylm.verify import compare, llama_cpp_run, torch_logits  # noqa: E402

VOCAB = factory_vocab(512)
MOE = tiny_spec("llama", n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_expert=4, n_expert_used=2, n_ff_exp=64,
                n_vocab=512, n_ctx_train=256)
DENSE = dataclasses.replace(MOE, n_expert=0, n_expert_used=0, n_ff=96)
TEXT = "The quick brown fox jumps over the lazy dog. " * 3


def random_model(spec, seed: int = 0) -> TinyLM:
    """Weights large enough that routing and attention are far from uniform."""
    torch.manual_seed(seed)
    model = TinyLM(spec)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return model.eval()


@pytest.mark.parametrize("spec", [MOE, DENSE], ids=["moe", "dense"])
def test_f32_export_matches_llama_cpp(tmp_path: Path, spec) -> None:
    model = random_model(spec)
    path = export_model(model, VOCAB, tmp_path / "m.gguf", "t", dtype="f32")
    tokens = [VOCAB.bos_id, *VOCAB.encode(TEXT)]
    ll, ll_tokens = llama_cpp_run(path, tokens, TEXT, f32_cache=True)
    assert ll_tokens == tokens[1:]
    check = compare("f32", torch_logits(model, tokens), ll, mean_abs=1e-5, max_abs=1e-4, top1_min=1.0)
    assert check.ok, check.line()
    # reading the GGUF back gives the same weights
    back, vocab = load_gguf_model(path)
    assert vocab == VOCAB and back.spec == model.spec
    for (n1, a), (n2, b) in zip(model.gguf_tensors(), back.gguf_tensors(), strict=True):
        assert n1 == n2 and np.array_equal(a, b), n1


def test_q8_0_experts_export(tmp_path: Path) -> None:
    model = random_model(MOE, seed=1)
    path = export_model(model, VOCAB, tmp_path / "q.gguf", "t")  # q8_0 experts for MoE
    tokens = [VOCAB.bos_id, *VOCAB.encode(TEXT)]
    ll, _ = llama_cpp_run(path, tokens)
    deq, _ = load_gguf_model(path)
    check = compare("q8", torch_logits(deq, tokens), ll, mean_abs=0.05, top1_min=0.95)
    assert check.ok, check.line()


def test_training_steps_reduce_loss() -> None:
    stream = TokenStream.from_texts([TEXT * 20, "A second text.\n" * 50], VOCAB)
    assert stream.line_starts[0] == 0 and len(stream.window_starts(32)) > 0
    x, y = stream.windows(stream.window_starts(32)[:2], 32, VOCAB.bos_id)
    assert (x[:, 0] == VOCAB.bos_id).all() and (x[:, 1:] == y[:, :-1]).all()
    model = TinyLM(MOE)
    model.init_weights(torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=30, batch=4, seq=32, lr=3e-3, warmup=5, eval_every=1000, eval_windows=4)
    hist = train(model, stream, stream, cfg, VOCAB.bos_id, log=lambda _msg: None)
    assert hist.final_train_loss is not None and hist.final_train_loss < hist.train[0][1] - 1.0
    assert all(0.9 < row[2] < 2.5 for row in hist.train)  # balance loss is reported for MoE layers
