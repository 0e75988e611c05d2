"""Tiny, deterministic, random-weight Mixture-of-Experts GGUF files for tests.

Every file written here loads and runs in the llama.cpp vendored by llama-cpp-python 0.3.36:
it has the tensors and metadata keys the loader of its architecture requires, a small
byte-level BPE tokenizer (``bpe.py``: gpt2 model, ``gpt-2`` pre-tokenizer, 256 byte tokens plus
merges trained on a built-in English text) and a ChatML chat template. Shapes are described by
``model_spec.TinySpec``; the GGUF itself is written by ``gguf_write.write_gguf``.

Weights come from a numpy RNG seeded per tensor name, so the same arguments always give the
same bytes, and the same seed gives the same weights whatever the dtype (and whether the
deepseek2 expert gate/up are merged or not). F32/F16 files are written directly with
``gguf.GGUFWriter``; quantized files (q8_0, q4_0) are written as F32 first and then converted
by llama.cpp's own ``llama_model_quantize``.

Quantized files quantize only the routed experts by default (see :func:`write_tiny_model`):
on CPUs with AMX the vendored CPU backend moves quantized ``MUL_MAT`` weights into its AMX
extra buffer (when ``use_extra_bufts`` is on, the default), and on the development VM that
AMX kernel dies with SIGSEGV at ``ldtilecfg``.
"""

from __future__ import annotations

import functools
import os
import pathlib
import zlib

import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.models.bpe import CHAT_TEMPLATE, SPECIAL_TOKENS, BpeVocab, train_bpe
from spac_llamacpp.models.gguf_write import check_write_args, write_gguf
from spac_llamacpp.models.spec import ARCHITECTURES, DTYPES, EXTRA_DTYPES, GGUF_ARCH, TinySpec, tiny_spec

__all__ = [
    "ARCHITECTURES",
    "CHAT_TEMPLATE",
    "DTYPES",
    "EXTRA_DTYPES",
    "GGUF_ARCH",
    "SPECIAL_TOKENS",
    "TinySpec",
    "factory_vocab",
    "tiny_spec",
    "write_tiny_dense",
    "write_tiny_model",
    "write_tiny_moe",
]


def write_tiny_moe(
    path: str | os.PathLike[str],
    arch: str = "qwen3moe",
    *,
    dtype: str = "f16",
    seed: int = 0,
    n_layer: int = 4,
    n_embd: int = 64,
    n_expert: int = 8,
    n_expert_used: int = 2,
    n_ff_exp: int = 64,
    n_vocab: int = 512,
    quantize: str = "experts",
    f16_pattern: str | None = None,
    f32_pattern: str | None = None,
    **overrides: object,
) -> pathlib.Path:
    """Write a tiny random-weight MoE GGUF of architecture ``arch`` to ``path`` and return it.

    Args:
        path: destination file (overwritten; its directory must exist).
        arch: one of :data:`ARCHITECTURES`.
        dtype: weight type, one of :data:`DTYPES` or :data:`EXTRA_DTYPES`. Norms, biases and
            the router stay F32, as in converted models.
        seed: RNG seed; the same arguments always give byte-identical files.
        n_layer, n_embd, n_expert, n_expert_used, n_ff_exp, n_vocab: model shape.
        quantize: for q8_0/q4_0, ``"experts"`` (only ``*_exps`` quantized, other matrices F16)
            or ``"all"``; see :func:`write_tiny_model`.
        f16_pattern: with a quantized dtype, tensors matching this regex stay F16 (see
            :func:`~spac_llamacpp.models.gguf_write.write_gguf`); ``f32_pattern`` alike for F32.
        overrides: any other :class:`TinySpec` field (e.g. ``n_head``, ``n_expert_shared``).

    Raises:
        SpacError: unknown arch/dtype/field, or shapes the quantized types cannot hold.
    """
    spec = tiny_spec(
        arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        n_ff_exp=n_ff_exp,
        n_vocab=n_vocab,
        **overrides,
    )
    if not 1 <= spec.n_expert_used <= spec.n_expert:
        raise SpacError(f"need 1 <= n_expert_used <= n_expert, got {spec.n_expert_used} and {spec.n_expert}")
    return write_tiny_model(path, spec, dtype=dtype, seed=seed, quantize=quantize, f16_pattern=f16_pattern,
                            f32_pattern=f32_pattern)


def write_tiny_dense(
    path: str | os.PathLike[str], *, dtype: str = "f16", seed: int = 0, quantize: str = "experts"
) -> pathlib.Path:
    """Write a tiny dense (no experts) llama GGUF to ``path``: a model that is *not* an MoE.

    Having no experts, its q8_0/q4_0 file holds F16 matrices unless ``quantize="all"``.
    """
    spec = tiny_spec("llama", n_expert=0, n_expert_used=0, n_ff=128)
    return write_tiny_model(path, spec, dtype=dtype, seed=seed, quantize=quantize)


def write_tiny_model(
    path: str | os.PathLike[str],
    spec: TinySpec,
    *,
    dtype: str = "f16",
    seed: int = 0,
    quantize: str = "experts",
    vocab: BpeVocab | None = None,
    f16_pattern: str | None = None,
    f32_pattern: str | None = None,
) -> pathlib.Path:
    """Write the random-weight model described by ``spec`` (MoE or, with ``n_expert=0`` on llama, dense).

    ``quantize`` applies to the quantized dtypes: ``"experts"`` (default) quantizes only the
    routed-expert tensors (``*_exps``, like llama.cpp's MXFP4_MOE) and stores the other
    matrices as F16; ``"all"`` quantizes every matrix llama.cpp quantizes. On AMX CPUs the
    vendored CPU backend moves quantized ``MUL_MAT`` weights into its AMX buffer, whose kernel
    crashes on the development VM; routed experts (``MUL_MAT_ID``) never go there, so
    ``"experts"`` files run with a stock ``llama_cpp.Llama`` everywhere.

    ``vocab`` replaces the factory's tokenizer (:func:`factory_vocab`), e.g. to build a random
    model with the tokenizer of a trained one; ``spec.n_vocab`` must match its size.
    """
    if spec.arch not in ARCHITECTURES:
        raise SpacError(
            f"unknown tiny-model architecture {spec.arch!r}; choose one of {', '.join(ARCHITECTURES)}"
        )
    check_write_args(spec, dtype, quantize)  # before drawing weights for shapes that cannot work
    if vocab is None:
        vocab = factory_vocab(spec.n_vocab)
    tensors = _tensors(spec, seed, vocab.silent_ids())
    return write_gguf(path, spec, tensors, vocab, dtype=dtype, quantize=quantize, f16_pattern=f16_pattern,
                      f32_pattern=f32_pattern)


# --------------------------------------------------------------------------------------------
# tokenizer

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still learn a lot from a
little text, and this text is here only to give the tokenizer some common English pieces.
When the weather is good, the people of the town walk along the river and talk about the
day. They talk about their work, their friends, the price of bread and the news from the
city. Some of them are happy, some are tired, and some are thinking about what they will do
tomorrow. The children run ahead of their parents and play with a red ball near the water.
In the evening the lights come on in the houses, one after another, and the streets become
quiet again. An old man sits on a bench and reads a book about the history of the country.
He has read it many times before, but he likes to read it again because every time he finds
something new. The story is about kings and queens, about wars and peace, about farmers who
worked the land and sailors who went to sea to find new places and new things to trade.
Computers are machines that follow instructions. A program is a list of instructions, and a
programmer is a person who writes programs. Modern programs are written in languages such as
Python, C and Rust. The computer reads the program, turns it into simple operations and then
runs them very quickly, often billions of times in a single second. Memory holds the data the
program is working on, and the processor changes that data step by step until the work is done.
A language model reads text and predicts the next word. It has been trained on a large amount
of writing, so it has seen many sentences and knows which words often come together. When you
ask it a question, it writes an answer one token at a time, choosing each token by looking at
all the tokens that came before it. Some models use a mixture of experts: for every token a
small router chooses a few experts out of many, and only those experts do the work. This
makes the model large but keeps the cost of each token small.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 16 32 64 100 128 256 512 1000 1024 2048 4096 2024 2025.
Questions and answers: What is your name? Where do you live? How are you today? I am fine,
thank you. Hello, world! Yes, no, maybe. It is true that this is not the end; it is only the
beginning. "Hello," she said, 'how are you?' (It's a test.) [one, two, three] {a: 1, b: 2}
"""

@functools.lru_cache(maxsize=8)
def factory_vocab(n_vocab: int) -> BpeVocab:
    """The factory's tokenizer: a byte-level BPE of ``n_vocab`` tokens trained on a built-in English text."""
    return train_bpe(_CORPUS, n_vocab)


# --------------------------------------------------------------------------------------------
# weights


class _Weights:
    """Deterministic tensors: each is drawn from an RNG seeded by (seed, crc32(name))."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def rng(self, name: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(name.encode())])

    def normal(self, name: str, shape: tuple[int, ...], std: float) -> np.ndarray:
        """numpy ``shape`` is the reverse of ggml ``ne``: the last axis is ``ne[0]`` (fan-in)."""
        return (self.rng(name).standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)

    def linear(self, name: str, shape: tuple[int, ...], gain: float) -> np.ndarray:
        return self.normal(name, shape, gain / np.sqrt(shape[-1]))


def _tensors(spec: TinySpec, seed: int, silent_ids: list[int]) -> list[tuple[str, np.ndarray]]:
    """All tensors of the model, in file order, as float32 numpy arrays (numpy shape order)."""
    s = spec
    w = _Weights(seed)
    E, D, V = s.n_expert, s.n_embd, s.n_vocab  # noqa: N806
    out: list[tuple[str, np.ndarray]] = []

    def add(name: str, arr: np.ndarray) -> None:
        out.append((name, arr))

    def ones(name: str, n: int) -> None:
        add(name, np.ones(n, dtype=np.float32))

    def lin(name: str, shape: tuple[int, ...], gain: float) -> None:
        add(name, w.linear(name, shape, gain))

    def bias(name: str, shape: tuple[int, ...]) -> None:
        add(name, w.normal(name, shape, s.bias_std))

    add("token_embd.weight", w.normal("token_embd.weight", (V, D), 1.0))
    ones("output_norm.weight", D)
    output = w.linear("output.weight", (V, D), s.output_gain)
    # A random model would emit control tokens (eos!) and stray bytes as often as text; zero
    # logits keep greedy generation on printable tokens, so tests always get readable text back.
    output[silent_ids] = 0.0
    add("output.weight", output)

    hd, H, Hkv = s.head_dim, s.n_head, s.n_head_kv  # noqa: N806
    for i in range(s.n_layer):
        p = f"blk.{i}."
        ones(p + "attn_norm.weight", D)

        # ---- attention
        if s.arch.startswith("deepseek2"):
            ones(p + "attn_q_a_norm.weight", s.q_lora_rank)
            ones(p + "attn_kv_a_norm.weight", s.kv_lora_rank)
            lin(p + "attn_q_a.weight", (s.q_lora_rank, D), s.attn_gain)
            lin(p + "attn_q_b.weight", (H * (s.qk_nope_dim + s.qk_rope_dim), s.q_lora_rank), s.attn_gain)
            lin(p + "attn_kv_a_mqa.weight", (s.kv_lora_rank + s.qk_rope_dim, D), s.attn_gain)
            # MLA absorption form of kv_b: k_b ne={qk_nope, kv_lora, n_head}, v_b ne={kv_lora, v_head, n_head}
            lin(p + "attn_k_b.weight", (H, s.kv_lora_rank, s.qk_nope_dim), s.attn_gain)
            lin(p + "attn_v_b.weight", (H, s.v_head_dim, s.kv_lora_rank), s.attn_gain)
            lin(p + "attn_output.weight", (D, H * s.v_head_dim), s.attn_gain)
        else:
            lin(p + "attn_q.weight", (H * hd, D), s.attn_gain)
            lin(p + "attn_k.weight", (Hkv * hd, D), s.attn_gain)
            lin(p + "attn_v.weight", (Hkv * hd, D), s.attn_gain)
            if s.arch in ("qwen2moe", "gpt-oss"):
                bias(p + "attn_q.bias", (H * hd,))
                bias(p + "attn_k.bias", (Hkv * hd,))
                bias(p + "attn_v.bias", (Hkv * hd,))
            lin(p + "attn_output.weight", (D, H * hd), s.attn_gain)
            if s.arch == "qwen3moe":
                ones(p + "attn_q_norm.weight", hd)
                ones(p + "attn_k_norm.weight", hd)
            elif s.arch == "olmoe":
                ones(p + "attn_q_norm.weight", D)
                ones(p + "attn_k_norm.weight", D)
            elif s.arch == "gpt-oss":
                bias(p + "attn_output.bias", (D,))
                add(p + "attn_sinks.weight", w.normal(p + "attn_sinks.weight", (H,), 1.0))

        # ---- feed-forward
        ones(p + ("post_attention_norm.weight" if s.arch == "gpt-oss" else "ffn_norm.weight"), D)
        dense = s.n_expert == 0 or (s.arch.startswith("deepseek2") and i < s.n_dense_lead)
        if dense:
            lin(p + "ffn_gate.weight", (s.n_ff, D), s.ffn_gain)
            lin(p + "ffn_up.weight", (s.n_ff, D), s.ffn_gain)
            lin(p + "ffn_down.weight", (D, s.n_ff), s.ffn_gain)
            continue

        F = s.n_ff_exp  # noqa: N806
        lin(p + "ffn_gate_inp.weight", (E, D), s.router_gain)
        if s.arch.startswith("deepseek2"):
            # selection-only bias of sigmoid routing (DeepSeek-V3 "e_score_correction_bias")
            add(p + "exp_probs_b.bias", w.normal(p + "exp_probs_b.bias", (E,), 0.1))
        gate = w.linear(p + "ffn_gate_exps.weight", (E, F, D), s.ffn_gain)
        up = w.linear(p + "ffn_up_exps.weight", (E, F, D), s.ffn_gain)
        if s.arch == "deepseek2-merged":
            # ne = {n_embd, 2*n_ff, n_expert}, gate rows first (create_tensor_gate_up_exps)
            add(p + "ffn_gate_up_exps.weight", np.concatenate([gate, up], axis=1))
        else:
            add(p + "ffn_gate_exps.weight", gate)
            add(p + "ffn_up_exps.weight", up)
        lin(p + "ffn_down_exps.weight", (E, D, F), s.ffn_gain)
        if s.arch == "gpt-oss":
            bias(p + "ffn_gate_inp.bias", (E,))
            bias(p + "ffn_gate_exps.bias", (E, F))
            bias(p + "ffn_up_exps.bias", (E, F))
            bias(p + "ffn_down_exps.bias", (E, D))
        if s.arch == "qwen2moe":
            lin(p + "ffn_gate_inp_shexp.weight", (1, D), s.router_gain)
            out[-1] = (out[-1][0], out[-1][1].reshape(D))  # ne = {n_embd}
            lin(p + "ffn_gate_shexp.weight", (s.n_ff_shexp, D), s.ffn_gain)
            lin(p + "ffn_up_shexp.weight", (s.n_ff_shexp, D), s.ffn_gain)
            lin(p + "ffn_down_shexp.weight", (D, s.n_ff_shexp), s.ffn_gain)
        elif s.arch.startswith("deepseek2"):
            fs = F * s.n_expert_shared
            lin(p + "ffn_gate_shexp.weight", (fs, D), s.ffn_gain)
            lin(p + "ffn_up_shexp.weight", (fs, D), s.ffn_gain)
            lin(p + "ffn_down_shexp.weight", (D, fs), s.ffn_gain)
    return out
