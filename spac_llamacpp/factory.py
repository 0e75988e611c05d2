"""Tiny, deterministic, random-weight Mixture-of-Experts GGUF files for tests.

Every file written here loads and runs in the llama.cpp vendored by llama-cpp-python 0.3.36:
it has the tensors and metadata keys the loader of its architecture requires, a small
byte-level BPE tokenizer (gpt2 model, ``gpt-2`` pre-tokenizer, 256 byte tokens plus merges
trained on a built-in English text) and a ChatML chat template.

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

import contextlib
import ctypes
import dataclasses
import functools
import logging
import os
import pathlib
import re
import tempfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import gguf
import numpy as np

from .errors import SpacError

ARCHITECTURES: tuple[str, ...] = (
    "llama",
    "qwen2moe",
    "qwen3moe",
    "deepseek2",
    "deepseek2-merged",
    "olmoe",
    "gpt-oss",
)
"""Names accepted by :func:`write_tiny_moe`; ``deepseek2-merged`` is architecture deepseek2
with the expert gate/up stored as one ``ffn_gate_up_exps`` tensor."""

DTYPES: tuple[str, ...] = ("f32", "f16", "q8_0")
"""Weight types every architecture is tested with."""

EXTRA_DTYPES: tuple[str, ...] = ("q4_0",)
"""Also accepted by the writers, but not part of the standard test matrix."""

# GGUF ``general.architecture`` for each factory name.
GGUF_ARCH: dict[str, str] = {a: ("deepseek2" if a == "deepseek2-merged" else a) for a in ARCHITECTURES}

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""Control tokens, always the last ids of the vocabulary (bos = <|endoftext|>, eos = <|im_end|>)."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_QUANT_FTYPES = {"q8_0": 7, "q4_0": 2}  # llama_ftype: LLAMA_FTYPE_MOSTLY_Q8_0 / _Q4_0
_QBLOCK = 32  # block size of q8_0 and q4_0: every quantized row must be a multiple of it

_TOKEN_NORMAL = 1
_TOKEN_CONTROL = 3


@dataclass(frozen=True)
class TinySpec:
    """Shape and scale parameters of a tiny model; :func:`tiny_spec` fills in arch defaults.

    Head size is ``n_embd // n_head`` for all architectures except deepseek2, whose MLA sizes
    are given by the ``*_rank`` and ``*_dim`` fields.
    """

    arch: str = "qwen3moe"
    n_layer: int = 4
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_expert: int = 8
    n_expert_used: int = 2
    n_ff_exp: int = 64
    n_ff: int = 128  # dense FFN width (dense models, deepseek2 leading dense blocks)
    n_ff_shexp: int = 128  # qwen2moe shared expert width
    n_expert_shared: int = 1  # deepseek2: shared expert width is n_ff_exp * n_expert_shared
    n_dense_lead: int = 1  # deepseek2 leading dense blocks
    n_vocab: int = 512
    n_ctx_train: int = 4096
    rope_freq_base: float = 10000.0
    rms_eps: float = 1e-5
    # deepseek2 MLA
    q_lora_rank: int = 32
    kv_lora_rank: int = 32
    qk_rope_dim: int = 16
    qk_nope_dim: int = 32
    v_head_dim: int = 32
    expert_weights_scale: float = 2.5
    # gpt-oss
    sliding_window: int = 128
    # scales: weights are normal * gain / sqrt(fan_in); the router gain is large so that
    # the expert choice depends strongly on the token.
    attn_gain: float = 0.7
    ffn_gain: float = 1.0
    router_gain: float = 3.0
    output_gain: float = 3.0
    bias_std: float = 0.05

    @property
    def gguf_arch(self) -> str:
        """The ``general.architecture`` value."""
        return GGUF_ARCH.get(self.arch, self.arch)

    @property
    def head_dim(self) -> int:
        """Attention head size for the non-MLA architectures."""
        return self.n_embd // self.n_head

    @property
    def is_moe(self) -> bool:
        """Whether the model has routed experts."""
        return self.n_expert > 0


# Per-architecture overrides of the TinySpec defaults (matching what the real models do).
_ARCH_DEFAULTS: dict[str, dict[str, object]] = {
    "llama": {"n_head_kv": 2},
    "qwen2moe": {"n_head_kv": 2, "rms_eps": 1e-6, "rope_freq_base": 1000000.0},
    "qwen3moe": {"n_head_kv": 2, "rms_eps": 1e-6, "rope_freq_base": 1000000.0},
    "deepseek2": {"n_head_kv": 1, "rms_eps": 1e-6},
    "deepseek2-merged": {"n_head_kv": 1, "rms_eps": 1e-6},
    "olmoe": {},  # n_head_kv = n_head: olmoe's k-norm spans n_embd, so no GQA
    "gpt-oss": {"n_head_kv": 2, "rope_freq_base": 150000.0},
}


def tiny_spec(arch: str = "qwen3moe", **overrides: object) -> TinySpec:
    """Return the :class:`TinySpec` of ``arch`` with its defaults, updated by ``overrides``.

    Raises :class:`SpacError` for an unknown architecture or field name.
    """
    if arch not in ARCHITECTURES:
        raise SpacError(f"unknown tiny-model architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    fields = {f.name for f in dataclasses.fields(TinySpec)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise SpacError(
            f"unknown TinySpec field(s) {', '.join(bad)}; valid fields: {', '.join(sorted(fields))}"
        )
    params: dict[str, object] = {**_ARCH_DEFAULTS[arch], **overrides}
    if arch == "olmoe" and "n_head_kv" not in overrides:
        params["n_head_kv"] = params.get("n_head", TinySpec.n_head)
    return TinySpec(arch=arch, **params)  # type: ignore[arg-type]


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
    return write_tiny_model(path, spec, dtype=dtype, seed=seed, quantize=quantize)


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
) -> pathlib.Path:
    """Write the model described by ``spec`` (MoE or, with ``n_expert=0`` on llama, dense).

    ``quantize`` applies to the quantized dtypes: ``"experts"`` (default) quantizes only the
    routed-expert tensors (``*_exps``, like llama.cpp's MXFP4_MOE) and stores the other
    matrices as F16; ``"all"`` quantizes every matrix llama.cpp quantizes. On AMX CPUs the
    vendored CPU backend moves quantized ``MUL_MAT`` weights into its AMX buffer, whose kernel
    crashes on the development VM; routed experts (``MUL_MAT_ID``) never go there, so
    ``"experts"`` files run with a stock ``llama_cpp.Llama`` everywhere.
    """
    if quantize not in ("experts", "all"):
        raise SpacError(f"unknown quantize scope {quantize!r}; choose 'experts' or 'all'")
    path = pathlib.Path(path)
    if dtype not in DTYPES + EXTRA_DTYPES:
        raise SpacError(
            f"unknown tiny-model dtype {dtype!r}; choose one of {', '.join(DTYPES + EXTRA_DTYPES)}"
        )
    if spec.arch not in ARCHITECTURES:
        raise SpacError(
            f"unknown tiny-model architecture {spec.arch!r}; choose one of {', '.join(ARCHITECTURES)}"
        )
    _check_spec(spec, quantized=dtype in _QUANT_FTYPES)
    if dtype in _QUANT_FTYPES:
        # llama.cpp quantizes from a float file; write it next to the target and remove it.
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".f32.tmp", dir=path.parent)
        os.close(fd)
        try:
            _write_float(pathlib.Path(tmp), spec, "f32", seed)
            _quantize(pathlib.Path(tmp), path, _QUANT_FTYPES[dtype], quantize)
        finally:
            os.unlink(tmp)
    else:
        _write_float(path, spec, dtype, seed)
    return path


# --------------------------------------------------------------------------------------------
# checks


def _check_spec(spec: TinySpec, *, quantized: bool) -> None:
    if spec.n_layer < 1 or spec.n_embd < 1 or spec.n_head < 1:
        raise SpacError("n_layer, n_embd and n_head must be positive")
    if spec.n_vocab < 256 + len(SPECIAL_TOKENS) + 1:
        raise SpacError(
            f"n_vocab must be at least {256 + len(SPECIAL_TOKENS) + 1} (256 bytes + special tokens)"
        )
    if spec.arch == "llama" and spec.n_expert == 0:
        pass  # the dense model
    elif spec.n_expert < 1 or not 1 <= spec.n_expert_used <= spec.n_expert:
        raise SpacError(f"{spec.arch} needs n_expert >= 1 and 1 <= n_expert_used <= n_expert")
    mla = spec.arch.startswith("deepseek2")
    if not mla:
        if spec.n_embd % spec.n_head or spec.head_dim % 2:
            raise SpacError(f"n_embd ({spec.n_embd}) must be n_head ({spec.n_head}) times an even head size")
        if spec.n_head % spec.n_head_kv:
            raise SpacError(f"n_head ({spec.n_head}) must be a multiple of n_head_kv ({spec.n_head_kv})")
    elif spec.n_dense_lead >= spec.n_layer:
        raise SpacError("deepseek2 needs n_dense_lead < n_layer (at least one MoE block)")
    if quantized:
        rows = {
            "n_embd": spec.n_embd,
            "n_ff_exp": spec.n_ff_exp,
            "n_ff": spec.n_ff,
            "n_ff_shexp": spec.n_ff_shexp,
        }
        if not mla:
            rows["n_head * head_dim"] = spec.n_head * spec.head_dim
        else:
            rows |= {
                "q_lora_rank": spec.q_lora_rank,
                "kv_lora_rank": spec.kv_lora_rank,
                "qk_nope_dim": spec.qk_nope_dim,
                "n_head * v_head_dim": spec.n_head * spec.v_head_dim,
                "n_ff_exp * n_expert_shared": spec.n_ff_exp * spec.n_expert_shared,
            }
        bad = [f"{k}={v}" for k, v in rows.items() if v % _QBLOCK]
        if bad:
            raise SpacError(
                f"quantized tiny models need row sizes that are multiples of {_QBLOCK}: {', '.join(bad)}"
            )


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

# GPT-2 pre-tokenizer, restricted to the ASCII corpus above.
_PRETOKENIZE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> tuple[str, ...]:
    """GPT-2's reversible byte -> printable character map (as in tokenizers' ByteLevel)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs, strict=True))
    return tuple(chr(table[b]) for b in range(256))


@functools.lru_cache(maxsize=8)
def _bpe_vocab(n_vocab: int) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    """Train a byte-level BPE on the built-in corpus: (tokens, token types, merges).

    Ids 0-255 are the bytes, then the merged tokens, then ``<|reserved_N|>`` padding if the
    corpus runs out of pairs, then :data:`SPECIAL_TOKENS`.
    """
    b2u = _byte_to_unicode()
    n_merged_max = n_vocab - 256 - len(SPECIAL_TOKENS)
    words = Counter(tuple(b2u[b] for b in w.encode("utf-8")) for w in _PRETOKENIZE.findall(_CORPUS))
    tokens: list[str] = list(b2u)
    known = set(tokens)
    merges: list[str] = []
    while len(tokens) - 256 < n_merged_max:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        # most frequent pair; ties broken by the pair itself so training is deterministic
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(f"{best[0]} {best[1]}")
        joined = best[0] + best[1]
        if joined not in known:  # two different merges can yield the same string
            known.add(joined)
            tokens.append(joined)
        new_words: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += count
        words = new_words
    types = [_TOKEN_NORMAL] * len(tokens)
    n_pad = n_merged_max - (len(tokens) - 256)
    tokens += [f"<|reserved_{i}|>" for i in range(n_pad)]
    types += [_TOKEN_CONTROL] * n_pad
    tokens += list(SPECIAL_TOKENS)
    types += [_TOKEN_CONTROL] * len(SPECIAL_TOKENS)
    return tuple(tokens), tuple(types), tuple(merges)


def _add_tokenizer(writer: gguf.GGUFWriter, n_vocab: int) -> list[int]:
    """Add the tokenizer and chat template to ``writer``; return the ids to keep out of the output.

    Those are the control tokens and the byte tokens that are not printable ASCII (or newline).
    """
    tokens, types, merges = _bpe_vocab(n_vocab)
    w = writer
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(list(tokens))
    w.add_token_types(list(types))
    w.add_token_merges(list(merges))
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    printable = set(range(0x20, 0x7F)) | {0x0A}
    return [i for i, t in enumerate(types) if t == _TOKEN_CONTROL or (i < 256 and i not in printable)]


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


# MLA absorption matrices stay F32: in an F16/quantized file the vendored CPU backend may put
# them in its AMX extra buffer, which cannot run their matmul with a permuted (non-contiguous)
# activation, and the graph scheduler then aborts (GGML_ASSERT(*cur_backend_id != -1)).
_F32_MATRICES = re.compile(r"\.attn_[kv]_b\.weight$")


def _keep_f32(name: str, arr: np.ndarray) -> bool:
    """Tensors kept in F32: 1-D, biases, norms and the router (as converted models do), MLA k_b/v_b."""
    return (
        arr.ndim < 2
        or name.endswith(".bias")
        or name.endswith("_norm.weight")
        or "ffn_gate_inp" in name
        or _F32_MATRICES.search(name) is not None
    )


# --------------------------------------------------------------------------------------------
# metadata


def _add_hparams(g: gguf.GGUFWriter, s: TinySpec) -> None:
    a = s.arch
    g.add_name(f"tiny-{a}" if s.is_moe else "tiny-dense-llama")
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


def _write_float(path: pathlib.Path, spec: TinySpec, dtype: str, seed: int) -> None:
    writer = gguf.GGUFWriter(str(path), spec.gguf_arch)
    try:
        _add_hparams(writer, spec)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        silent_ids = _add_tokenizer(writer, spec.n_vocab)
        for name, arr in _tensors(spec, seed, silent_ids):
            if dtype == "f16" and not _keep_f32(name, arr):
                arr = arr.astype(np.float16)
            writer.add_tensor(name, arr)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


# --------------------------------------------------------------------------------------------
# quantization through llama.cpp


def _quantize(src: pathlib.Path, dst: pathlib.Path, ftype: int, scope: str) -> None:
    """Convert ``src`` to ``dst`` with ``llama_model_quantize``; ``scope`` as in write_tiny_model."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 1  # tiny tensors: threads cost more than they save
    # pure: every quantized matrix gets ftype; otherwise llama.cpp picks k-quants for some
    # tensors (output, attn_v, ...) that then fall back because rows are not 256-aligned.
    params.pure = True
    # Type overrides, first match wins (the quantizer itself skips norms, biases and routers).
    patterns = [(_F32_MATRICES.pattern, 0)]  # GGML_TYPE_F32: what _keep_f32 keeps
    if scope == "experts":
        patterns.append((r"^(?!.*_exps\.weight$)", 1))  # GGML_TYPE_F16: all but routed experts
    overrides = (llama_cpp.llama_model_tensor_override * (len(patterns) + 1))()  # {NULL, 0} ends it
    for entry, (pattern, ggml_type) in zip(overrides, patterns, strict=False):
        entry.pattern = pattern.encode()
        entry.type = ggml_type
    params.tt_overrides = overrides
    with _quiet_llama_log():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SpacError(
            f"llama.cpp could not quantize the tiny model to {dst} (llama_model_quantize returned {rc})"
        )


@contextlib.contextmanager
def _quiet_llama_log() -> Iterator[None]:
    """Silence llama-cpp-python's log callback (the quantizer prints a line per tensor)."""
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    # CRITICAL, not ERROR: llama-cpp-python's level map is off by one and shows WARN as ERROR
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
