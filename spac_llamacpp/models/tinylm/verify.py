"""Checks that an exported GGUF computes what the PyTorch model computes, through llama_cpp.Llama.

Three logit comparisons on the same token sequence (bos + a Shakespeare passage), all positions:

1. ``f32``: the model exported as F32, run with an F32 KV cache, against the PyTorch model in
   float32. This isolates the math (norms, RoPE type, GQA, routing, SwiGLU, tied output) from
   quantization: it must agree to float32 rounding.
2. ``gguf-vs-dequantized``: the shipped file (Q8_0 experts, F16 matrices) against PyTorch running
   the very same dequantized weights; llama.cpp additionally rounds activations to Q8_0/F16, so
   the bound is looser.
3. ``gguf-vs-trained``: the shipped file against the trained float32 weights (quantization error
   included); the greedy next token must almost always agree.

Plus a tokenizer check: llama.cpp's tokenization of the passage equals :meth:`BpeVocab.encode`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from spac_llamacpp.models.bpe import BpeVocab
from spac_llamacpp.models.tinylm.export import export_model, load_checkpoint, load_gguf_model
from spac_llamacpp.models.tinylm.model import TinyLM

VERIFY_TEXT = (
    "HAMLET.\nTo be, or not to be,--that is the question:--\nWhether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles,\n"
    "And by opposing end them?--To die,--to sleep,--\nNo more; and by a sleep to say we end\n"
    "The heartache, and the thousand natural shocks\nThat flesh is heir to,--'tis a consummation\n"
    "Devoutly to be wish'd.\n"
)


@dataclass
class Check:
    """One comparison: ``ok`` and a one-line summary."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        """``check <name>: ok|FAILED <detail>``."""
        return f"check {self.name}: {'ok' if self.ok else 'FAILED'} {self.detail}"


def llama_cpp_run(
    path: str | Path, tokens: list[int], text: str = "", f32_cache: bool = False
) -> tuple[np.ndarray, list[int]]:
    """Logits [len(tokens), n_vocab] of every position from a stock ``llama_cpp.Llama``, and its
    tokenization of ``text`` (no bos). ``f32_cache``: keep K/V in F32 (llama.cpp's default is F16,
    which alone moves logits by ~1e-3)."""
    import llama_cpp

    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(64, len(tokens)), n_batch=len(tokens),
                          logits_all=True, verbose=False, seed=0, n_threads=2, **kv)
    try:
        llm.eval(tokens)
        logits = np.array(llm.scores[: len(tokens)], dtype=np.float32)
        return logits, llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    finally:
        llm.close()


@torch.no_grad()
def torch_logits(model: TinyLM, tokens: list[int]) -> np.ndarray:
    """Float32 logits [len(tokens), n_vocab] of ``model``."""
    logits, _ = model.float().eval()(torch.tensor([tokens]))
    return logits[0].numpy()


def compare(name: str, ref: np.ndarray, got: np.ndarray, *, mean_abs: float, top1_min: float,
            max_abs: float = float("inf")) -> Check:
    """Absolute logit differences and greedy (argmax) agreement of ``got`` against ``ref``.

    Quantized comparisons bound the mean, not the max: a router near-tie that flips one expert
    choice moves that position's logits by far more than rounding does, and that is expected.
    """
    diff = np.abs(ref - got)
    top1 = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
    ok = bool(diff.mean() <= mean_abs and diff.max() <= max_abs and top1 >= top1_min)
    bound = f" (<= {max_abs:g})" if max_abs != float("inf") else ""
    detail = (f"{len(ref)} positions, mean |dlogit| {diff.mean():.2e} (<= {mean_abs:g}), max {diff.max():.2e}{bound}, "
              f"argmax agreement {top1:.1%} (>= {top1_min:.0%}), logit range {ref.min():.1f}..{ref.max():.1f}")
    return Check(name, ok, detail)


def verify_tokens(vocab: BpeVocab, text: str = VERIFY_TEXT) -> list[int]:
    """bos followed by the tokens of ``text``."""
    return [vocab.bos_id, *vocab.encode(text)]


def check_gguf_against(model: TinyLM, gguf_path: str | Path, vocab: BpeVocab) -> list[Check]:
    """Checks 2 and 3 (and the tokenizer) of ``gguf_path`` against ``model`` (the trained weights)."""
    tokens = verify_tokens(vocab)
    ll, ll_tokens = llama_cpp_run(gguf_path, tokens, VERIFY_TEXT)
    deq, _ = load_gguf_model(gguf_path)
    return [
        Check("tokenizer", ll_tokens == tokens[1:],
              f"llama.cpp and BpeVocab.encode agree on {len(tokens) - 1} tokens"),
        compare("gguf-vs-dequantized", torch_logits(deq, tokens), ll, mean_abs=0.05, top1_min=0.97),
        compare("gguf-vs-trained", torch_logits(model, tokens), ll, mean_abs=0.1, top1_min=0.95),
    ]


def compare_logits(ckpt_path: str | Path, gguf_path: str | Path) -> list[Check]:
    """All checks of the module docstring for a training checkpoint and its exported GGUF."""
    model, vocab, ckpt = load_checkpoint(ckpt_path)
    tokens = verify_tokens(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        f32 = export_model(model, vocab, Path(tmp) / "f32.gguf", ckpt["extra"]["name"], dtype="f32")
        ll = llama_cpp_run(f32, tokens, f32_cache=True)[0]
        checks = [compare("f32", torch_logits(model, tokens), ll, mean_abs=1e-4, max_abs=1e-3, top1_min=1.0)]
    return checks + check_gguf_against(model, gguf_path, vocab)
