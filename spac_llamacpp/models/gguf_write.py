"""Writing a model given as numpy tensors to a GGUF file that the vendored llama.cpp loads.

One job, shared by the random-weight test-model factory and the trained default models: metadata
from a :class:`~spac_llamacpp.models.spec.TinySpec`, a byte-level BPE tokenizer (``bpe.py``), the
tensors in F32/F16, and quantization through llama.cpp's own ``llama_model_quantize``.

Quantized files quantize only the routed experts by default: on CPUs with AMX the vendored CPU
backend moves quantized ``MUL_MAT`` weights into its AMX extra buffer (when ``use_extra_bufts`` is
on, the default), and on the development VM that AMX kernel dies with SIGSEGV at ``ldtilecfg``.
Routed experts (``MUL_MAT_ID``) never go there, so ``"experts"`` files run everywhere.
"""

from __future__ import annotations

import os
import pathlib
import re
import tempfile
from collections.abc import Sequence

import gguf
import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.models.bpe import BpeVocab, add_tokenizer
from spac_llamacpp.models.spec import DTYPES, EXTRA_DTYPES, TinySpec, check_spec
from spac_llamacpp.native.quantize import quantize_model

QUANT_FTYPES = {"q8_0": 7, "q4_0": 2}  # llama_ftype: LLAMA_FTYPE_MOSTLY_Q8_0 / _Q4_0
"""llama.cpp file types of the quantized dtypes."""

Tensors = Sequence[tuple[str, np.ndarray]]
"""GGUF tensor names with float32 arrays in numpy shape order (the reverse of ggml's ``ne``)."""


def write_gguf(
    path: str | os.PathLike[str],
    spec: TinySpec,
    tensors: Tensors,
    vocab: BpeVocab,
    *,
    dtype: str = "f16",
    quantize: str = "experts",
    name: str | None = None,
    description: str | None = None,
    f16_pattern: str | None = None,
    f32_pattern: str | None = None,
) -> pathlib.Path:
    """Write ``tensors`` of the model ``spec`` with tokenizer ``vocab`` to ``path``; return the path.

    Args:
        path: destination file (overwritten; its directory must exist).
        spec: shapes and hyper-parameters, written as the architecture's metadata keys.
        tensors: every tensor of the model in file order (see :data:`Tensors`).
        vocab: the tokenizer; ``spec.n_vocab`` must equal its size.
        dtype: ``f32``, ``f16``, ``q8_0`` or ``q4_0``. Norms, biases and the router stay F32.
        quantize: for q8_0/q4_0, ``"experts"`` (only ``*_exps`` quantized, other matrices F16)
            or ``"all"`` (every matrix llama.cpp quantizes).
        name: ``general.name`` (default ``tiny-<arch>``, or ``tiny-dense-llama`` without experts).
        description: ``general.description``, if given.
        f16_pattern: with a quantized dtype, tensors whose names match this regex stay F16 (e.g. one
            layer's experts, for a file that mixes expert types across layers).
        f32_pattern: with a quantized dtype, tensors whose names match this regex stay F32 (before
            ``f16_pattern``; e.g. every non-expert matrix, which no CPU extra buffer then takes: AMX takes
            some F16 ones).

    Raises:
        SpacError: unknown dtype/scope, a spec llama.cpp cannot load, or a failed quantization.
    """
    check_write_args(spec, dtype, quantize)
    if spec.n_vocab != vocab.n_vocab:
        raise SpacError(f"spec.n_vocab ({spec.n_vocab}) differs from the tokenizer's size ({vocab.n_vocab})")
    path = pathlib.Path(path)
    if name is None:
        name = f"tiny-{spec.arch}" if spec.is_moe else "tiny-dense-llama"
    if dtype in QUANT_FTYPES:
        # llama.cpp quantizes from a float file; write it next to the target and remove it.
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".f32.tmp", dir=path.parent)
        os.close(fd)
        try:
            _write_float(pathlib.Path(tmp), spec, tensors, vocab, "f32", name, description)
            _quantize(pathlib.Path(tmp), path, QUANT_FTYPES[dtype], quantize, f16_pattern, f32_pattern)
        finally:
            os.unlink(tmp)
    else:
        _write_float(path, spec, tensors, vocab, dtype, name, description)
    return path


def check_write_args(spec: TinySpec, dtype: str, quantize: str) -> None:
    """Raise :class:`SpacError` unless :func:`write_gguf` can write ``spec`` as ``dtype``/``quantize``."""
    if quantize not in ("experts", "all"):
        raise SpacError(f"unknown quantize scope {quantize!r}; choose 'experts' or 'all'")
    if dtype not in DTYPES + EXTRA_DTYPES:
        raise SpacError(
            f"unknown tiny-model dtype {dtype!r}; choose one of {', '.join(DTYPES + EXTRA_DTYPES)}"
        )
    check_spec(spec, quantized=dtype in QUANT_FTYPES)


# MLA absorption matrices stay F32: in an F16/quantized file the vendored CPU backend may put
# them in its AMX extra buffer, which cannot run their matmul with a permuted (non-contiguous)
# activation, and the graph scheduler then aborts (GGML_ASSERT(*cur_backend_id != -1)).
F32_MATRICES = re.compile(r"\.attn_[kv]_b\.weight$")


def keep_f32(name: str, arr: np.ndarray) -> bool:
    """Tensors kept in F32: 1-D, biases, norms and the router (as converted models do), MLA k_b/v_b."""
    return (
        arr.ndim < 2
        or name.endswith(".bias")
        or name.endswith("_norm.weight")
        or "ffn_gate_inp" in name
        or F32_MATRICES.search(name) is not None
    )


def add_hparams(g: gguf.GGUFWriter, s: TinySpec, name: str) -> None:
    """Add ``general.name`` and the hyper-parameter keys of ``s``'s architecture to ``g``."""
    a = s.arch
    g.add_name(name)
    g.add_context_length(s.n_ctx_train)
    g.add_embedding_length(s.n_embd)
    g.add_block_count(s.n_layer)
    g.add_head_count(s.n_head)
    g.add_head_count_kv(s.n_head_kv)
    g.add_layer_norm_rms_eps(s.rms_eps)
    g.add_rope_freq_base(s.rope_freq_base)
    g.add_vocab_size(s.n_vocab)
    if s.is_moe:
        g.add_expert_count(s.n_expert)
        g.add_expert_used_count(s.n_expert_used)

    if a == "llama" or a == "olmoe":
        # these loaders size the experts with feed_forward_length (Mixtral / OLMoE convention)
        g.add_feed_forward_length(s.n_ff_exp if s.is_moe else s.n_ff)
        g.add_rope_dimension_count(s.head_dim)
    elif a == "qwen2moe":
        g.add_feed_forward_length(s.n_ff)
        g.add_expert_feed_forward_length(s.n_ff_exp)
        g.add_expert_shared_feed_forward_length(s.n_ff_shexp)
    elif a == "qwen3moe":
        g.add_feed_forward_length(s.n_ff)
        g.add_expert_feed_forward_length(s.n_ff_exp)
    elif a.startswith("deepseek2"):
        g.add_feed_forward_length(s.n_ff)
        g.add_leading_dense_block_count(s.n_dense_lead)
        g.add_q_lora_rank(s.q_lora_rank)
        g.add_kv_lora_rank(s.kv_lora_rank)
        # MLA is run as MQA over the compressed kv: K = kv_lora + rope, V = kv_lora
        g.add_key_length(s.kv_lora_rank + s.qk_rope_dim)
        g.add_value_length(s.kv_lora_rank)
        g.add_key_length_mla(s.qk_nope_dim + s.qk_rope_dim)
        g.add_value_length_mla(s.v_head_dim)
        g.add_rope_dimension_count(s.qk_rope_dim)
        g.add_expert_feed_forward_length(s.n_ff_exp)
        g.add_expert_shared_count(s.n_expert_shared)
        g.add_expert_weights_scale(s.expert_weights_scale)
        g.add_expert_weights_norm(True)
        g.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    elif a == "gpt-oss":
        g.add_feed_forward_length(s.n_ff_exp)
        g.add_expert_feed_forward_length(s.n_ff_exp)
        g.add_key_length(s.head_dim)
        g.add_value_length(s.head_dim)
        g.add_sliding_window(s.sliding_window)


def _write_float(
    path: pathlib.Path, spec: TinySpec, tensors: Tensors, vocab: BpeVocab, dtype: str, name: str,
    description: str | None,
) -> None:
    writer = gguf.GGUFWriter(str(path), spec.gguf_arch)
    try:
        add_hparams(writer, spec, name)
        if description:
            writer.add_description(description)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        add_tokenizer(writer, vocab)
        for tname, arr in tensors:
            arr = np.asarray(arr, dtype=np.float32)
            if dtype == "f16" and not keep_f32(tname, arr):
                arr = arr.astype(np.float16)
            writer.add_tensor(tname, arr)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _quantize(src: pathlib.Path, dst: pathlib.Path, ftype: int, scope: str, f16_pattern: str | None = None,
              f32_pattern: str | None = None) -> None:
    """Convert ``src`` to ``dst`` with ``llama_model_quantize``; ``scope`` and the patterns as in write_gguf (the
    first pattern a tensor matches decides its type)."""
    patterns = [(F32_MATRICES.pattern, 0)]  # GGML_TYPE_F32: what _keep_f32 keeps
    if f32_pattern:
        patterns.append((f32_pattern, 0))
    if f16_pattern:
        patterns.append((f16_pattern, 1))  # GGML_TYPE_F16
    if scope == "experts":
        patterns.append((r"^(?!.*_exps\.weight$)", 1))  # GGML_TYPE_F16: all but routed experts
    quantize_model(src, dst, ftype, patterns, threads=1)  # tiny tensors: threads cost more than they save


