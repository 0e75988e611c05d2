"""Mixture-of-Experts introspection of a GGUF file, from its header alone.

The header (magic, key/value metadata, tensor table) is parsed here with a small, bounds-checked
reader that mirrors the checks of the vendored llama.cpp ``gguf.cpp``.  Tensor data is never read:
on a 20 GB model only the first few megabytes of the file are touched, and the tensor table plus
``os.stat`` are enough to prove that every tensor lies inside the file.

Public API::

    info = inspect_model("model.gguf")        # MoEModelInfo; raises GGUFError / NotMoEError
    info = read_model_header("dense.gguf")    # same, but dense models give n_expert == 0
    print(format_report(info))
    t = info.expert_tensors[0]
    start, end = t.expert_range(5)            # absolute file byte range of expert 5 in t

Every bad input raises a :class:`~spac_llamacpp.base.errors.SpacError` subclass with a one-line message
(what is wrong, and what to do); no other exception type escapes.  Corrupt headers fail fast:
counts and lengths are checked against the file size before anything is allocated or looped over.

Layout facts (vendored llama.cpp src/llama-arch.cpp, src/llama-model.cpp, ggml/src/gguf.cpp):
``ne`` is in ggml order (``ne[0]`` is the fastest axis); the expert axis is the *last* axis of an
expert tensor (``ne[2]`` for weights, ``ne[1]`` for ``*_exps.bias``, ``ne[0]`` for ``*_exps.scale``),
so expert ``e`` of a tensor is the contiguous byte range
``[offset + e*bytes_per_expert, offset + (e+1)*bytes_per_expert)``.
"""

from __future__ import annotations

import os
import re
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

from spac_llamacpp.base.errors import GGUFError, NotMoEError, SpacError

__all__ = [
    "ExpertTensor",
    "MoEModelInfo",
    "GGML_TYPES",
    "LLAMA_ARCHITECTURES",
    "inspect_model",
    "read_model_header",
    "format_report",
]

# --------------------------------------------------------------------------------------------------
# Constants, copied from the vendored llama.cpp (ggml/include/gguf.h, ggml/src/gguf.cpp,
# ggml/src/ggml-common.h, src/llama-hparams.h, src/llama-arch.cpp).

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
GGUF_DEFAULT_ALIGNMENT = 32
GGUF_MAX_STRING_LENGTH = 1024 * 1024 * 1024
GGUF_MAX_ARRAY_ELEMENTS = 1024 * 1024 * 1024
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64
LLAMA_MAX_LAYERS = 512
LLAMA_MAX_EXPERTS = 1024
INT64_MAX = (1 << 63) - 1

# Our own sanity limits (not llama.cpp's): real headers are a few MB (tokenizer arrays), so a
# header that claims more than this is corrupt.  They keep corrupt files from being slow.
MAX_HEADER_BYTES = 256 * 1024 * 1024
MAX_KEY_LENGTH = 64 * 1024
MAX_KEPT_STRING = 64 * 1024  # longer string values (chat templates...) are skipped, not decoded
MAX_KEPT_ARRAY = 4096  # longer arrays (tokenizer) are skipped; per-layer arrays are <= 512

#: ggml type id -> (name, block size in elements, block size in bytes); ggml/src/ggml.c type_traits.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
    42: ("Q2_0", 64, 18),
}


def _words(text: str) -> list[str]:
    return text.split()


#: Architectures known to the vendored llama.cpp (src/llama-arch.cpp LLM_ARCH_NAMES).
LLAMA_ARCHITECTURES: frozenset[str] = frozenset(
    _words(
        """
    clip llama llama4 deci falcon grok gpt2 gptj gptneox mpt baichuan starcoder refact bert modern-bert
    nomic-bert nomic-bert-moe neo-bert jina-bert-v2 jina-bert-v3 eurobert bloom stablelm qwen qwen2
    qwen2moe qwen2vl qwen3 qwen3moe qwen3next qwen3vl qwen3vlmoe qwen35 qwen35moe qwen4exp phi2 phi3
    phimoe plamo plamo2 plamo3 codeshell orion internlm2 minicpm minicpm3 gemma gemma2 gemma3 gemma3n
    gemma4 gemma4-assistant gemma-embedding starcoder2 mamba mamba2 maple jamba falcon-h1 xverse
    command-r cohere2 cohere2moe dbrx olmo olmo2 olmoe muse-glimmer openelm arctic deepseek deepseek2
    deepseek2-ocr deepseek32 deepseek4 chatglm glm4 glm4moe glm-dsa bitnet t5 t5encoder jais jais2
    nemotron nemotron_h nemotron_h_moe exaone exaone4 exaone-moe rwkv6 rwkv6qwen2 rwkv7 arwkv7 granite
    granitemoe granitehybrid graniteswitch granite_swa chameleon wavtokenizer-dec plm bailingmoe
    bailingmoe2 bailingmoe3 dots1 dots3note arcee afmoe laguna ernie4_5 ernie4_5-moe hunyuan-moe
    hunyuan-dense hunyuan_vl hy_v3 hy_v4 smollm3 gpt-oss lfm2 lfm2moe dream smallthinker llada llada-moe
    seed_oss grovemoe apertus minimax-01 hrm_text minimax-m2 minimax-m3 cogvlm rnd1 pangu-embedded
    mistral3 eagle3 dflash mistral4 paddleocr mimo2 step35 spark2_5 llama-embed maincoder kimi-linear
    kimi-k3 glm5-next talkie mellum nanbeige qwen3tts pockettts
    """
    )
)

# --- expert gating function (llama_expert_gating_func_type, src/llama-hparams.h) -----------------
GATING_NAMES = {1: "softmax", 2: "sigmoid", 3: "softmax_weight", 4: "sqrt_softplus"}

# The graph builder of these architectures passes a constant to build_moe_ffn: the
# `<arch>.expert_gating_func` key, if any, is ignored (src/models/*.cpp).
_GATING_FIXED: dict[str, str] = {
    **dict.fromkeys(
        _words(
            "llama llama-embed grok nomic-bert-moe llada-moe rnd1 qwen2moe qwen3moe qwen3vlmoe qwen3next "
            "qwen35moe qwen4exp phimoe maple jamba dbrx olmoe arctic deepseek granitemoe granitehybrid "
            "granite_swa bailingmoe ernie4_5-moe hunyuan-moe grovemoe minimax-01 mistral3 gemma4 "
            "mellum"
        ),
        "softmax",
    ),
    **dict.fromkeys(["llama4", "mimo2", "nemotron_h", "nemotron_h_moe"], "sigmoid"),
    "gpt-oss": "softmax_weight",
}
# These read the key (optional) and fall back to this value when it is absent or 0.
_GATING_DEFAULT: dict[str, str] = {
    "deepseek2": "softmax",  # except GLM-4.7-Lite, see _resolve_gating
    "mistral4": "softmax",  # uses deepseek2's hparams loader
    "deepseek2-ocr": "softmax",
    **dict.fromkeys(
        ["afmoe", "cohere2moe", "glm-dsa", "glm4moe", "glm5-next", "hy_v3", "laguna", "step35"],
        "sigmoid",
    ),
}
# These require the key (llama.cpp refuses to load without it) ...
_GATING_REQUIRED = frozenset(
    _words(
        "bailingmoe2 bailingmoe3 deepseek32 deepseek4 dflash dots3note exaone-moe kimi-k3 kimi-linear "
        "lfm2moe minimax-m3"
    )
)
# ... and these read it as optional but have no default: llama.cpp aborts when it is absent.
_GATING_NO_DEFAULT = frozenset(["dots1", "minimax-m2", "hy_v4", "smallthinker"])

# --- tensor names (src/llama-arch.cpp) ------------------------------------------------------------
_EXPERT_RE = re.compile(r"blk\.(\d+)\.ffn_(gate_up|gate|up|down)_(ch)?exps\.(weight|bias|scale|input_scale)")
_SHEXP_RE = re.compile(r"blk\.(\d+)\.ffn_(?:gate_up|gate|up|down|gate_inp)_shexp\.[a-z_]+")
_ROUTER_RE = re.compile(r"blk\.(\d+)\.(ffn_gate_inp|exp_probs_b|exp_probs_b_vl)\.(weight|bias)")
_SUFFIX_KIND = {"weight": "", "bias": "_bias", "scale": "_scale", "input_scale": "_input_scale"}
_SUFFIX_RANK = {"weight": 3, "bias": 2, "scale": 1, "input_scale": 1}
_WEIGHT_KINDS = ("gate", "up", "down", "gate_up")

_ACTION_CORRUPT = "the file is corrupt or not a valid GGUF; re-download or re-convert it"
_ACTION_TRUNCATED = "the file is truncated or its header is corrupt; re-download it"


# --------------------------------------------------------------------------------------------------
# Public data classes


@dataclass(frozen=True)
class ExpertTensor:
    """One tensor that holds all experts of one layer, stacked along its last ggml axis."""

    name: str  # e.g. "blk.3.ffn_up_exps.weight"
    layer: int
    kind: str  # gate/up/down/gate_up, <proj>_bias, <proj>_scale, <proj>_input_scale, <proj>_chunk...
    ggml_type: str  # e.g. "F16", "Q8_0"
    shape: tuple[int, ...]  # ggml order ne, as stored; the last axis is the expert axis
    file_offset: int  # absolute byte offset of the tensor data in the file
    bytes_per_expert: int  # expert e: [file_offset + e*bpe, file_offset + (e+1)*bpe)
    n_expert: int  # size of the expert axis

    @property
    def nbytes(self) -> int:
        return self.bytes_per_expert * self.n_expert

    @property
    def end_offset(self) -> int:
        return self.file_offset + self.nbytes

    @property
    def is_chunk(self) -> bool:
        """GroveMoE "chunk experts" (``ffn_*_chexps``): indexed by expert group, not by expert."""
        return "_chunk" in self.kind

    def expert_range(self, e: int) -> tuple[int, int]:
        """Absolute file byte range ``[start, end)`` of expert ``e`` in this tensor."""
        if isinstance(e, bool) or not isinstance(e, int):
            raise TypeError(f"expert index must be an int, got {type(e).__name__}")
        if not 0 <= e < self.n_expert:
            raise IndexError(f"expert {e} out of range for {self.name} ({self.n_expert} experts)")
        start = self.file_offset + e * self.bytes_per_expert
        return start, start + self.bytes_per_expert

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layer": self.layer,
            "kind": self.kind,
            "ggml_type": self.ggml_type,
            "shape": list(self.shape),
            "file_offset": self.file_offset,
            "bytes_per_expert": self.bytes_per_expert,
            "n_expert": self.n_expert,
        }


@dataclass(frozen=True)
class MoEModelInfo:
    """What a GGUF header says about a model's routed experts (n_expert == 0 for dense models)."""

    path: Path
    architecture: str
    block_count: int
    n_expert: int
    n_expert_used: tuple[int, ...]  # per block, expanded from a scalar or read from an array
    n_expert_shared: int  # <arch>.expert_shared_count; 1 if absent but ffn_*_shexp tensors exist
    expert_ff_length: int | None  # expert FFN width (checked against the metadata); None if per-block
    gating: (
        str  # "softmax", "sigmoid", "softmax_weight", "sqrt_softplus" as llama.cpp runs it; "none" if dense
    )
    moe_layers: tuple[int, ...]  # blocks with routed-expert tensors
    dense_layers: tuple[int, ...]
    leading_dense_block_count: int
    moe_every_n_layers: int
    expert_tensors: tuple[ExpertTensor, ...]
    expert_bytes: int  # sum of all expert tensors' bytes
    non_expert_bytes: int  # every other tensor (attention, embeddings, router, shared experts...)
    file_size: int
    has_router_bias: bool  # blk.N.exp_probs_b present
    # --- extras (all have defaults so that the fields above stay the positional API) ---
    name: str = ""  # general.name
    gguf_version: int = GGUF_VERSION
    alignment: int = GGUF_DEFAULT_ALIGNMENT
    data_offset: int = 0  # where the tensor data section starts
    tensor_count: int = 0
    n_embd: int = 0
    context_length: int = 0  # <arch>.context_length (training context); 0 if absent
    expert_order: dict[int, tuple[int, ...]] = field(default_factory=dict)  # spac patch: block -> original ids
    gating_source: str = ""  # "graph" (fixed by llama.cpp), "key", "default" (llama.cpp's), "assumed"
    interleave_moe_layer_step: int = 0
    nextn_predict_layers: int = 0
    expert_ff_lengths: tuple[int, ...] = ()  # per block, from the tensors; 0 for dense blocks
    shared_expert_bytes: int = 0  # ffn_*_shexp (dense, included in non_expert_bytes)
    router_bytes: int = 0  # ffn_gate_inp + exp_probs_b (included in non_expert_bytes)
    notes: tuple[str, ...] = ()

    # -- derived lookups --------------------------------------------------------------------------
    @cached_property
    def _by_layer(self) -> dict[int, tuple[ExpertTensor, ...]]:
        out: dict[int, list[ExpertTensor]] = {}
        for t in self.expert_tensors:
            out.setdefault(t.layer, []).append(t)
        return {k: tuple(sorted(v, key=lambda t: t.file_offset)) for k, v in out.items()}

    @property
    def total_tensor_bytes(self) -> int:
        return self.expert_bytes + self.non_expert_bytes

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0 and bool(self.expert_tensors)

    def _check_layer(self, layer: int) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        if not 0 <= layer < self.block_count:
            raise IndexError(f"layer {layer} out of range (model has {self.block_count} blocks)")

    def layer_tensors(self, layer: int) -> tuple[ExpertTensor, ...]:
        """Expert tensors of one block, in file order (empty for a dense block)."""
        self._check_layer(layer)
        return self._by_layer.get(layer, ())

    def layer_expert_bytes(self, layer: int) -> int:
        """Bytes of ONE routed expert of ``layer``, all its tensors together (0 for a dense block).

        GroveMoE chunk-expert tensors are not counted: they are indexed by expert group.
        """
        return sum(t.bytes_per_expert for t in self.layer_tensors(layer) if not t.is_chunk)

    def expert_ranges(self, layer: int, e: int) -> tuple[tuple[int, int], ...]:
        """File byte ranges of routed expert ``e`` of ``layer`` (one per tensor, in file order)."""
        self._check_layer(layer)
        if not 0 <= e < self.n_expert:
            raise IndexError(f"expert {e} out of range (model has {self.n_expert} experts)")
        return tuple(t.expert_range(e) for t in self.layer_tensors(layer) if not t.is_chunk)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "name": self.name,
            "architecture": self.architecture,
            "block_count": self.block_count,
            "n_embd": self.n_embd,
            "n_expert": self.n_expert,
            "n_expert_used": list(self.n_expert_used),
            "n_expert_shared": self.n_expert_shared,
            "expert_ff_length": self.expert_ff_length,
            "expert_ff_lengths": list(self.expert_ff_lengths),
            "gating": self.gating,
            "gating_source": self.gating_source,
            "moe_layers": list(self.moe_layers),
            "dense_layers": list(self.dense_layers),
            "leading_dense_block_count": self.leading_dense_block_count,
            "moe_every_n_layers": self.moe_every_n_layers,
            "interleave_moe_layer_step": self.interleave_moe_layer_step,
            "nextn_predict_layers": self.nextn_predict_layers,
            "has_router_bias": self.has_router_bias,
            "expert_bytes": self.expert_bytes,
            "non_expert_bytes": self.non_expert_bytes,
            "shared_expert_bytes": self.shared_expert_bytes,
            "router_bytes": self.router_bytes,
            "file_size": self.file_size,
            "data_offset": self.data_offset,
            "alignment": self.alignment,
            "gguf_version": self.gguf_version,
            "tensor_count": self.tensor_count,
            "layer_expert_bytes": {str(layer): self.layer_expert_bytes(layer) for layer in self.moe_layers},
            "notes": list(self.notes),
            "expert_tensors": [t.to_json() for t in self.expert_tensors],
        }


# --------------------------------------------------------------------------------------------------
# Low-level header parsing


@dataclass(frozen=True)
class _Array:
    """An array value; ``values`` is None when it was too long to keep (e.g. the tokenizer)."""

    elem_type: int
    count: int
    values: tuple[Any, ...] | None


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    ne: tuple[int, ...]  # as stored (n_dims entries)
    type_id: int
    offset: int  # relative to the data section
    nbytes: int


@dataclass(frozen=True)
class _Header:
    version: int
    kv: dict[str, Any]
    kv_types: dict[str, int]
    alignment: int
    data_offset: int
    tensors: tuple[_TensorInfo, ...]
    file_size: int


# GGUF value types: id -> (name, struct code, size)
_GGUF_SCALARS: dict[int, tuple[str, str, int]] = {
    0: ("UINT8", "B", 1),
    1: ("INT8", "b", 1),
    2: ("UINT16", "H", 2),
    3: ("INT16", "h", 2),
    4: ("UINT32", "I", 4),
    5: ("INT32", "i", 4),
    6: ("FLOAT32", "f", 4),
    7: ("BOOL", "?", 1),
    10: ("UINT64", "Q", 8),
    11: ("INT64", "q", 8),
    12: ("FLOAT64", "d", 8),
}
_GGUF_STRING = 8
_GGUF_ARRAY = 9
_INT_TYPES = frozenset({0, 1, 2, 3, 4, 5, 10, 11})


def _type_name(t: int) -> str:
    if t == _GGUF_STRING:
        return "STRING"
    if t == _GGUF_ARRAY:
        return "ARRAY"
    return _GGUF_SCALARS[t][0] if t in _GGUF_SCALARS else f"type {t}"


_ZEROS64 = bytes(64)


class _Reader:
    """Sequential little-endian reader over the head of a file, with hard bounds checks."""

    CHUNK = 64 * 1024  # small: on a tiny model the header is followed by tensor data we must not read

    def __init__(self, f: BinaryIO, file_size: int, label: str) -> None:
        self._f = f
        self.size = file_size
        self.label = label
        self._buf = b""
        self._base = 0  # file offset of _buf[0]
        self.pos = 0
        self.bytes_read = 0

    def fail(self, what: str, action: str = _ACTION_CORRUPT) -> GGUFError:
        return GGUFError(f"{self.label}: {what}; {action}")

    def _need(self, n: int, what: str) -> int:
        """Make n bytes at pos available; return their index into _buf."""
        end = self.pos + n
        if end > self.size:
            raise self.fail(
                f"{what} at byte {self.pos} runs past the end of the file ({self.size} bytes)",
                _ACTION_TRUNCATED,
            )
        if end > MAX_HEADER_BYTES:
            raise self.fail(f"GGUF header is larger than {MAX_HEADER_BYTES >> 20} MiB ({what})")
        buf_end = self._base + len(self._buf)
        if end > buf_end:
            if self.pos >= buf_end:
                keep, read_from = b"", self.pos
            else:
                keep, read_from = self._buf[self.pos - self._base :], buf_end
            want = min(max(end - read_from, self.CHUNK), self.size - read_from)
            self._f.seek(read_from)
            data = self._f.read(want)
            self.bytes_read += len(data)
            if len(data) < end - read_from:
                raise self.fail(f"file ended while reading {what} at byte {self.pos}", _ACTION_TRUNCATED)
            self._buf = keep + data
            self._base = self.pos
        return self.pos - self._base

    def scalar(self, code: str, size: int, what: str) -> Any:
        i = self._need(size, what)
        self.pos += size
        return struct.unpack_from("<" + code, self._buf, i)[0]

    def u32(self, what: str) -> int:
        return self.scalar("I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("Q", 8, what)

    def raw(self, n: int, what: str) -> bytes:
        i = self._need(n, what)
        self.pos += n
        return self._buf[i : i + n]

    def skip(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise self.fail(
                f"{what} at byte {self.pos} runs past the end of the file ({self.size} bytes)",
                _ACTION_TRUNCATED,
            )
        if self.pos + n > MAX_HEADER_BYTES:
            raise self.fail(f"GGUF header is larger than {MAX_HEADER_BYTES >> 20} MiB ({what})")
        self.pos += n

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def string_len(self, what: str) -> int:
        n = self.u64(f"length of {what}")
        if n > GGUF_MAX_STRING_LENGTH:
            raise self.fail(f"{what} claims a length of {n} bytes (more than llama.cpp's 1 GiB limit)")
        if n > self.remaining:
            raise self.fail(
                f"{what} at byte {self.pos} claims {n} bytes but only {self.remaining} remain in the file",
                _ACTION_TRUNCATED,
            )
        return n

    def skip_string_array(self, count: int, what: str) -> None:
        """Walk over ``count`` strings without decoding them (fast path for tokenizer arrays)."""
        done = 0
        while done < count:
            i = self._need(8, what)
            buf = self._buf
            avail = len(buf)
            pos0 = self.pos
            # consume as many strings as lie fully inside the buffer
            while done < count and i + 8 <= avail:
                (n,) = struct.unpack_from("<Q", buf, i)
                if n == 0 and buf[i : i + 64] == _ZEROS64:
                    # a run of empty strings: a corrupt count walking over zeros; skip it in one go
                    run = (avail - i) - len(buf[i:avail].lstrip(b"\0"))
                    k = min(run // 8, count - done)
                    i += 8 * k
                    done += k
                    continue
                if i + 8 + n > avail:
                    break
                i += 8 + n
                done += 1
            self.pos = self._base + i
            if done < count and self.pos == pos0:
                # the next string straddles the buffer end (or is huge): take the slow path
                n = self.string_len(what)
                self.skip(n, what)
                done += 1


def _parse_header(f: BinaryIO, file_size: int, label: str) -> tuple[_Header, int]:
    """Parse a GGUF header like ggml/src/gguf.cpp does; return it and the number of bytes read."""
    r = _Reader(f, file_size, label)
    if file_size < 4:
        raise r.fail(f"file is only {file_size} bytes, not a GGUF model")
    magic = r.raw(4, "magic")
    if magic != GGUF_MAGIC:
        shown = "".join(chr(b) if 32 <= b < 127 else "?" for b in magic)
        raise GGUFError(
            f"{label}: not a GGUF file (magic is '{shown}', expected 'GGUF'); "
            "pass a .gguf model converted for llama.cpp"
        )
    version = r.u32("GGUF version")
    if version == 0 or version & 0xFFFF == 0:
        raise r.fail(
            f"GGUF version field is {version:#x} (a big-endian GGUF or a corrupt header)",
            "use a little-endian GGUF converted for this machine, or re-download it",
        )
    if version == 1:
        raise r.fail("GGUF version 1 is no longer supported by llama.cpp", "re-convert the model")
    if version > GGUF_VERSION:
        raise r.fail(
            f"GGUF version {version} is newer than the supported version {GGUF_VERSION}",
            "re-convert the model or upgrade llama-cpp-python",
        )
    n_tensors = r.u64("tensor count")
    n_kv = r.u64("key/value count")
    # every tensor-info entry takes at least 8+0+4+4+8 bytes, every KV pair at least 8+1+4+1
    if n_tensors > INT64_MAX or n_tensors * 24 > r.remaining:
        raise r.fail(f"header claims {n_tensors} tensors, impossible for a file of {file_size} bytes")
    if n_kv > INT64_MAX or n_kv * 14 > r.remaining:
        raise r.fail(f"header claims {n_kv} metadata keys, impossible for a file of {file_size} bytes")

    kv: dict[str, Any] = {}
    kv_types: dict[str, int] = {}
    for i in range(n_kv):
        klen = r.string_len(f"key #{i}")
        if klen == 0:
            raise r.fail(f"metadata key #{i} is empty")
        if klen > MAX_KEY_LENGTH:
            raise r.fail(f"metadata key #{i} claims a length of {klen} bytes")
        key = r.raw(klen, f"key #{i}").decode("utf-8", errors="replace")
        if key in kv:
            raise r.fail(f"duplicate metadata key '{key}'")
        vtype = r.u32(f"type of key '{key}'")
        if vtype == _GGUF_ARRAY:
            etype = r.u32(f"element type of key '{key}'")
            count = r.u64(f"element count of key '{key}'")
            kv[key] = _read_array(r, key, etype, count)
        else:
            kv[key] = _read_value(r, key, vtype)
        kv_types[key] = vtype

    alignment = GGUF_DEFAULT_ALIGNMENT
    if "general.alignment" in kv:
        if kv_types["general.alignment"] != 4:
            raise r.fail(
                f"general.alignment has type {_type_name(kv_types['general.alignment'])}, expected UINT32"
            )
        alignment = kv["general.alignment"]
        if alignment == 0 or alignment & (alignment - 1):
            raise r.fail(f"general.alignment is {alignment}, not a power of two")

    infos: list[tuple[str, tuple[int, ...], int, int]] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        nlen = r.string_len(f"name of tensor #{i}")
        if nlen >= GGML_MAX_NAME:
            raise r.fail(f"name of tensor #{i} is {nlen} bytes long (llama.cpp allows < {GGML_MAX_NAME})")
        name = r.raw(nlen, f"name of tensor #{i}").decode("utf-8", errors="replace")
        if name in seen:
            raise r.fail(f"duplicate tensor name '{name}'")
        seen.add(name)
        n_dims = r.u32(f"dimension count of tensor '{name}'")
        if n_dims > GGML_MAX_DIMS:
            raise r.fail(f"tensor '{name}' has {n_dims} dimensions (at most {GGML_MAX_DIMS})")
        ne = tuple(r.u64(f"shape of tensor '{name}'") for _ in range(n_dims))
        if any(d > INT64_MAX for d in ne):
            raise r.fail(f"tensor '{name}' has a negative dimension {ne}")
        n_el = 1
        for d in ne:
            n_el *= d
        if n_el > INT64_MAX:
            raise r.fail(f"tensor '{name}' shape {ne} overflows the element count")
        type_id = r.u32(f"type of tensor '{name}'")
        if type_id not in GGML_TYPES:
            raise r.fail(f"tensor '{name}' has unknown ggml type id {type_id}")
        tname, blck, tsize = GGML_TYPES[type_id]
        ne0 = ne[0] if ne else 1
        if ne0 % blck:
            raise r.fail(f"tensor '{name}' ({tname}) has {ne0} elements per row, not a multiple of {blck}")
        offset = r.u64(f"data offset of tensor '{name}'")
        infos.append((name, ne, type_id, offset))

    data_offset = r.pos
    if n_tensors > 0:
        data_offset = (r.pos + alignment - 1) // alignment * alignment
    if data_offset > file_size:
        raise r.fail(
            f"tensor data section would start at byte {data_offset} but the file has {file_size} bytes",
            _ACTION_TRUNCATED,
        )

    tensors: list[_TensorInfo] = []
    expected = 0
    for name, ne, type_id, offset in infos:
        tname, blck, tsize = GGML_TYPES[type_id]
        full = ne + (1,) * (GGML_MAX_DIMS - len(ne))
        row = (full[0] // blck) * tsize
        nbytes = row * full[1] * full[2] * full[3]
        if offset % alignment:
            raise r.fail(f"tensor '{name}' data offset {offset} is not aligned to {alignment} bytes")
        if offset != expected:
            raise r.fail(
                f"tensor '{name}' has data offset {offset}, expected {expected} "
                "(llama.cpp requires tensors to be stored back to back)"
            )
        end = data_offset + offset + nbytes
        if end > file_size:
            raise GGUFError(
                f"{label}: tensor '{name}' data ends at byte {end} but the file has only {file_size} bytes; "
                "the file is truncated (incomplete download?); re-download it"
            )
        tensors.append(_TensorInfo(name, ne, type_id, offset, nbytes))
        expected = offset + (nbytes + alignment - 1) // alignment * alignment

    hdr = _Header(version, kv, kv_types, alignment, data_offset, tuple(tensors), file_size)
    return hdr, r.bytes_read


def _read_value(r: _Reader, key: str, vtype: int) -> Any:
    if vtype == _GGUF_STRING:
        n = r.string_len(f"value of key '{key}'")
        if n > MAX_KEPT_STRING:
            r.skip(n, f"value of key '{key}'")
            return _Array(_GGUF_STRING, n, None)  # a skipped long string
        return r.raw(n, f"value of key '{key}'").decode("utf-8", errors="replace")
    if vtype in _GGUF_SCALARS:
        _, code, size = _GGUF_SCALARS[vtype]
        return r.scalar(code, size, f"value of key '{key}'")
    raise r.fail(f"metadata key '{key}' has invalid GGUF value type {vtype}")


def _read_array(r: _Reader, key: str, etype: int, count: int) -> _Array:
    what = f"array '{key}'"
    if count > GGUF_MAX_ARRAY_ELEMENTS:
        raise r.fail(f"{what} claims {count} elements (more than llama.cpp's limit)")
    if etype == _GGUF_STRING:
        if count * 8 > r.remaining:
            raise r.fail(f"{what} claims {count} strings, more than the file can hold", _ACTION_TRUNCATED)
        if count <= MAX_KEPT_ARRAY:
            vals = []
            for _ in range(count):
                n = r.string_len(f"element of {what}")
                if n > MAX_KEPT_STRING:
                    r.skip(n, f"element of {what}")
                    vals.append("")
                else:
                    vals.append(r.raw(n, f"element of {what}").decode("utf-8", errors="replace"))
            return _Array(etype, count, tuple(vals))
        r.skip_string_array(count, what)
        return _Array(etype, count, None)
    if etype not in _GGUF_SCALARS:
        raise r.fail(f"{what} has invalid element type {etype}")
    _, code, size = _GGUF_SCALARS[etype]
    total = count * size
    if total > r.remaining:
        raise r.fail(
            f"{what} claims {count} elements ({total} bytes) but only {r.remaining} bytes remain",
            _ACTION_TRUNCATED,
        )
    if count <= MAX_KEPT_ARRAY:
        data = r.raw(total, what)
        return _Array(etype, count, struct.unpack(f"<{count}{code}", data))
    r.skip(total, what)
    return _Array(etype, count, None)


# --------------------------------------------------------------------------------------------------
# Interpretation


class _Meta:
    """Typed access to ``<arch>.*`` metadata with one-line errors."""

    def __init__(self, hdr: _Header, arch: str, label: str) -> None:
        self.hdr = hdr
        self.arch = arch
        self.label = label

    def key(self, name: str) -> str:
        return f"{self.arch}.{name}"

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.label}: {what}; {_ACTION_CORRUPT}")

    def has(self, name: str) -> bool:
        return self.key(name) in self.hdr.kv

    def uint(self, name: str, default: int | None = None, *, required: bool = False) -> int | None:
        k = self.key(name)
        if k not in self.hdr.kv:
            if required:
                raise GGUFError(
                    f"{self.label}: required metadata key '{k}' is missing; the file is incomplete or "
                    "was not converted for llama.cpp; re-convert it"
                )
            return default
        t = self.hdr.kv_types[k]
        v = self.hdr.kv[k]
        if t not in _INT_TYPES:
            raise self.fail(f"metadata key '{k}' has type {_type_name(t)}, expected an unsigned integer")
        if v < 0:
            raise self.fail(f"metadata key '{k}' is negative ({v})")
        return int(v)

    def uint_or_array(self, name: str, n: int) -> tuple[tuple[int, ...] | None, bool]:
        """(values per block or None if absent, whether the key was an array)."""
        k = self.key(name)
        if k not in self.hdr.kv:
            return None, False
        t = self.hdr.kv_types[k]
        v = self.hdr.kv[k]
        if t != _GGUF_ARRAY:
            return (self.uint(name),) * n, False  # type: ignore[operator]
        assert isinstance(v, _Array)
        if v.elem_type not in _INT_TYPES:
            raise self.fail(f"metadata array '{k}' has {_type_name(v.elem_type)} elements, expected integers")
        if v.count != n:
            raise self.fail(f"metadata array '{k}' has {v.count} entries but block_count is {n}")
        assert v.values is not None
        if any(x < 0 for x in v.values):
            raise self.fail(f"metadata array '{k}' has negative entries")
        return tuple(int(x) for x in v.values), True

    def string(self, key: str) -> str | None:
        v = self.hdr.kv.get(key)
        return v if isinstance(v, str) else None


@dataclass
class _MoEKeys:
    n_expert: int = 0
    used: tuple[int, ...] | None = None
    n_shared: int = 0
    lead: int = 0
    every_n: int = 0
    step: int = 0
    ff_exp: tuple[int, ...] | None = None
    ff: tuple[int, ...] | None = None
    latent: int = 0
    per_group: int = 0


def _read_moe_keys(meta: _Meta, n_layer: int) -> _MoEKeys:
    k = _MoEKeys()
    k.n_expert = meta.uint("expert_count", 0) or 0
    if k.n_expert > LLAMA_MAX_EXPERTS:
        raise meta.fail(
            f"'{meta.key('expert_count')}' is {k.n_expert} (llama.cpp allows at most {LLAMA_MAX_EXPERTS})"
        )
    k.used, _ = meta.uint_or_array("expert_used_count", n_layer)
    k.n_shared = meta.uint("expert_shared_count", 0) or 0
    k.lead = meta.uint("leading_dense_block_count", 0) or 0
    k.every_n = meta.uint("moe_every_n_layers", 0) or 0
    k.step = meta.uint("interleave_moe_layer_step", 0) or 0
    k.ff_exp, _ = meta.uint_or_array("expert_feed_forward_length", n_layer)
    k.ff, _ = meta.uint_or_array("feed_forward_length", n_layer)
    k.latent = meta.uint("expert_latent_length", 0) or meta.uint("moe_latent_size", 0) or 0
    k.per_group = meta.uint("experts_per_group", 0) or 0
    return k


def _resolve_gating(meta: _Meta, n_layer: int) -> tuple[str, str, list[str]]:
    """Which gating function llama.cpp will actually run, and why."""
    notes: list[str] = []
    arch = meta.arch
    key_val = meta.uint("expert_gating_func", 0)
    if key_val not in (0, *GATING_NAMES):
        raise meta.fail(
            f"metadata key '{meta.key('expert_gating_func')}' is {key_val}, not a gating function (1-4)"
        )
    key_name = GATING_NAMES.get(key_val or 0)
    if arch in _GATING_FIXED:
        fixed = _GATING_FIXED[arch]
        if key_name and key_name != fixed:
            notes.append(
                f"{meta.key('expert_gating_func')}={key_name} is ignored: llama.cpp always uses {fixed}"
            )
        return fixed, "graph", notes
    if key_name:
        return key_name, "key", notes
    if arch in ("deepseek2", "mistral4"):
        vocab = meta.uint("vocab_size", 0)
        if not vocab:
            toks = meta.hdr.kv.get("tokenizer.ggml.tokens")
            vocab = toks.count if isinstance(toks, _Array) else 0
        if n_layer in (47, 48) and vocab == 154880:  # GLM-4.7-Lite converted as deepseek2
            return "sigmoid", "default", notes
        return "softmax", "default", notes
    if arch in _GATING_DEFAULT:
        return _GATING_DEFAULT[arch], "default", notes
    if arch in _GATING_REQUIRED or arch in _GATING_NO_DEFAULT:
        raise GGUFError(
            f"{meta.label}: metadata key '{meta.key('expert_gating_func')}' is missing and llama.cpp has no "
            f"default for architecture '{arch}' (it will refuse to run the model); re-convert the model"
        )
    notes.append(f"no {meta.key('expert_gating_func')} key: assuming softmax")
    return "softmax", "assumed", notes


def _kind_rank(kind: str) -> int:
    if kind.endswith("scale"):
        return 1
    return 2 if kind.endswith("_bias") else 3


def _strip_ones(ne: tuple[int, ...]) -> tuple[int, ...]:
    while len(ne) > 1 and ne[-1] == 1:
        ne = ne[:-1]
    return ne


def _layer_list(layers: Iterable[int]) -> str:
    """Compact "0-3,5,7-9" form of a sorted list of ints."""
    out: list[str] = []
    items = sorted(layers)
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(out) if out else "none"


def _interpret(path: Path, label: str, hdr: _Header) -> MoEModelInfo:
    kv = hdr.kv
    arch = kv.get("general.architecture")
    if "general.architecture" not in kv:
        raise GGUFError(
            f"{label}: no 'general.architecture' metadata key, so this is not a llama.cpp model; "
            "convert the model with llama.cpp's convert_hf_to_gguf.py"
        )
    if not isinstance(arch, str):
        raise GGUFError(f"{label}: 'general.architecture' is not a string; {_ACTION_CORRUPT}")
    if arch == "clip":
        raise GGUFError(
            f"{label}: this is a CLIP/mmproj projector file, not a language model; pass the main model GGUF"
        )
    if arch not in LLAMA_ARCHITECTURES:
        raise GGUFError(
            f"{label}: architecture '{arch}' is not supported by the llama.cpp in llama-cpp-python 0.3.36; "
            "use a model of a supported architecture (or re-download the file if the name looks garbled)"
        )
    split_count = kv.get("split.count")
    if isinstance(split_count, int) and not isinstance(split_count, bool) and split_count > 1:
        raise GGUFError(
            f"{label}: this is part of a split GGUF ({split_count} files); merge it into one file with "
            "llama-gguf-split --merge and pass the merged file"
        )
    meta = _Meta(hdr, arch, label)
    notes: list[str] = []

    n_layer = meta.uint("block_count", required=True)
    assert n_layer is not None
    if not 0 < n_layer <= LLAMA_MAX_LAYERS:
        raise meta.fail(f"'{meta.key('block_count')}' is {n_layer} (llama.cpp allows 1..{LLAMA_MAX_LAYERS})")
    n_embd = meta.uint("embedding_length", required=True)
    assert n_embd is not None
    nextn = meta.uint("nextn_predict_layers", 0) or 0
    context_length = meta.uint("context_length", 0) or 0
    if nextn > n_layer:
        raise meta.fail(f"'{meta.key('nextn_predict_layers')}' ({nextn}) exceeds block_count ({n_layer})")

    # ---- classify tensors ------------------------------------------------------------------
    total_bytes = 0
    shared_bytes = 0
    router_bytes = 0
    has_router_bias = False
    has_shexp = False
    experts: list[ExpertTensor] = []
    routers: list[tuple[int, _TensorInfo]] = []
    for ti in hdr.tensors:
        total_bytes += ti.nbytes
        m = _EXPERT_RE.fullmatch(ti.name)
        if m:
            layer = int(m.group(1))
            if layer >= n_layer:
                raise meta.fail(f"tensor '{ti.name}' belongs to block {layer} but block_count is {n_layer}")
            proj, chunk, suffix = m.group(2), m.group(3), m.group(4)
            kind = proj + ("_chunk" if chunk else "") + _SUFFIX_KIND[suffix]
            rank = _SUFFIX_RANK[suffix]
            ne = ti.ne
            if len(ne) < rank or any(d != 1 for d in ne[rank:]):
                raise meta.fail(f"expert tensor '{ti.name}' has shape {list(ne)}, expected {rank} dimensions")
            e_count = ne[rank - 1]
            if e_count == 0:
                raise meta.fail(f"expert tensor '{ti.name}' has shape {list(ne)} with no experts")
            if ti.nbytes % e_count or (rank == 1 and GGML_TYPES[ti.type_id][1] != 1):
                raise meta.fail(
                    f"expert tensor '{ti.name}' ({GGML_TYPES[ti.type_id][0]}, shape {list(ne)}) "
                    "cannot be split into per-expert byte ranges"
                )
            experts.append(
                ExpertTensor(
                    name=ti.name,
                    layer=layer,
                    kind=kind,
                    ggml_type=GGML_TYPES[ti.type_id][0],
                    shape=tuple(ne),
                    file_offset=hdr.data_offset + ti.offset,
                    bytes_per_expert=ti.nbytes // e_count,
                    n_expert=e_count,
                )
            )
            continue
        if _SHEXP_RE.fullmatch(ti.name):
            shared_bytes += ti.nbytes
            has_shexp = True
            continue
        m = _ROUTER_RE.fullmatch(ti.name)
        if m:
            router_bytes += ti.nbytes
            routers.append((int(m.group(1)), ti))
            if m.group(2).startswith("exp_probs_b"):
                has_router_bias = True
    expert_bytes = sum(t.nbytes for t in experts)

    # ---- MoE metadata: strict when the file has experts; a dense model never fails on it -----
    if experts:
        moe = _read_moe_keys(meta, n_layer)
    else:
        try:
            moe = _read_moe_keys(meta, n_layer)
        except GGUFError:
            moe = _MoEKeys()
    n_expert_meta, used_arr, n_shared = moe.n_expert, moe.used, moe.n_shared
    if experts and has_shexp and not n_shared and not meta.has("expert_shared_count"):
        n_shared = 1  # qwen2moe-style: one (gated) shared expert, sized by expert_shared_feed_forward_length
    lead, every_n, step = moe.lead, moe.every_n, moe.step
    ff_exp_arr, ff_arr = moe.ff_exp, moe.ff
    d_expert = moe.latent or n_embd
    per_group = moe.per_group

    # ---- which blocks are MoE ----------------------------------------------------------------
    if experts and n_expert_meta == 0:
        raise GGUFError(
            f"{label}: the file has expert tensors (e.g. '{experts[0].name}') but no "
            f"'{meta.key('expert_count')}' metadata; {_ACTION_CORRUPT}"
        )
    n_expert = n_expert_meta if experts else 0
    if n_expert_meta and not experts:
        notes.append(
            f"{meta.key('expert_count')}={n_expert_meta} but there are no expert tensors: dense model"
        )

    with_experts = sorted({t.layer for t in experts if not t.is_chunk})
    if experts and not with_experts:
        raise meta.fail("the file has chunk-expert tensors but no routed-expert tensors")
    rule_given = lead > 0 or every_n > 0 or step > 0
    if experts and rule_given:
        first_nextn = n_layer - nextn
        predicted = set()
        for il in range(n_layer):
            if il < lead:
                continue
            if every_n > 0 and il % every_n != 1:  # llama.cpp (bert.cpp): MoE iff il % n == 1
                continue
            if step > 0 and (il + 1) % step != 0:  # llama4/ernie: MoE iff (il + 1) % step == 0
                continue
            predicted.add(il)
        actual = set(with_experts)
        missing = sorted(x for x in predicted - actual if x < first_nextn)
        extra = sorted(x for x in actual - predicted if x < first_nextn)
        if missing or extra:
            rule = ", ".join(
                f"{k}={v}"
                for k, v in (
                    ("leading_dense_block_count", lead),
                    ("moe_every_n_layers", every_n),
                    ("interleave_moe_layer_step", step),
                )
                if v
            )
            problem = []
            if missing:
                problem.append(f"blocks {_layer_list(missing)} should be MoE but have no expert tensors")
            if extra:
                problem.append(f"blocks {_layer_list(extra)} should be dense but have expert tensors")
            raise GGUFError(
                f"{label}: metadata ({rule}) disagrees with the tensors: {'; '.join(problem)}; "
                "the file is inconsistent; re-convert it"
            )
    elif experts and len(with_experts) < n_layer:
        notes.append(
            f"blocks {_layer_list(set(range(n_layer)) - set(with_experts))} have no expert tensors (dense)"
        )
    moe_layers = tuple(with_experts)
    dense_layers = tuple(il for il in range(n_layer) if il not in set(with_experts))

    # ---- per-layer k -------------------------------------------------------------------------
    if not experts:
        used_arr = (0,) * n_layer  # llama.cpp: no experts, no routing
    elif used_arr is None:
        raise GGUFError(
            f"{label}: required metadata key '{meta.key('expert_used_count')}' is missing "
            f"(llama.cpp cannot route without it); re-convert the model"
        )
    else:
        if max(used_arr) > n_expert:
            raise meta.fail(
                f"'{meta.key('expert_used_count')}' ({max(used_arr)}) exceeds expert_count ({n_expert})"
            )
        bad = [il for il in moe_layers if used_arr[il] == 0]
        if bad:
            raise meta.fail(f"'{meta.key('expert_used_count')}' is 0 for MoE blocks {_layer_list(bad)}")

    # ---- shape checks ------------------------------------------------------------------------
    ff_per_layer = [0] * n_layer
    by_layer: dict[int, dict[str, ExpertTensor]] = {}
    for t in experts:
        by_layer.setdefault(t.layer, {})[t.kind] = t
    n_chunk_expected = n_expert // per_group if per_group else 0
    for il, kinds in sorted(by_layer.items()):
        for t in kinds.values():
            want = n_chunk_expected if t.is_chunk else n_expert
            if want and t.n_expert != want:
                axis = _kind_rank(t.kind) - 1
                raise meta.fail(
                    f"expert tensor '{t.name}' has {t.n_expert} experts (ne[{axis}]) but metadata says {want}"
                )
        _check_layer_shapes(meta, il, kinds, d_expert, ff_exp_arr, ff_arr, ff_per_layer)
    for il, ti in routers:
        ne = _strip_ones(ti.ne)
        if il not in by_layer or not ne:
            continue
        if ne[-1] != n_expert:
            raise meta.fail(
                f"router tensor '{ti.name}' has shape {list(ti.ne)} but expert_count is {n_expert}"
            )

    # ---- expert FF length ------------------------------------------------------------------
    # the tensors are the truth (they were checked against expert_feed_forward_length above);
    # None when MoE blocks differ (see expert_ff_lengths) or for a dense model
    ff_vals = {ff_per_layer[il] for il in moe_layers}
    expert_ff = ff_vals.pop() if len(ff_vals) == 1 else None

    # ---- gating ------------------------------------------------------------------------------
    if experts:
        gating, gating_source, gnotes = _resolve_gating(meta, n_layer - nextn)
        notes += gnotes
    else:
        gating, gating_source = "none", ""

    name = meta.string("general.name") or ""
    return MoEModelInfo(
        path=path,
        architecture=arch,
        block_count=n_layer,
        n_expert=n_expert,
        n_expert_used=tuple(used_arr),
        n_expert_shared=n_shared,
        expert_ff_length=expert_ff,
        gating=gating,
        moe_layers=moe_layers,
        dense_layers=dense_layers,
        leading_dense_block_count=lead,
        moe_every_n_layers=every_n,
        expert_tensors=tuple(experts),
        expert_bytes=expert_bytes,
        non_expert_bytes=total_bytes - expert_bytes,
        file_size=hdr.file_size,
        has_router_bias=has_router_bias,
        name=name,
        gguf_version=hdr.version,
        alignment=hdr.alignment,
        data_offset=hdr.data_offset,
        tensor_count=len(hdr.tensors),
        n_embd=n_embd,
        context_length=context_length,
        expert_order=_expert_order(hdr.kv, moe_layers, n_expert),
        gating_source=gating_source,
        interleave_moe_layer_step=step,
        nextn_predict_layers=nextn,
        expert_ff_lengths=tuple(ff_per_layer),
        shared_expert_bytes=shared_bytes,
        router_bytes=router_bytes,
        notes=tuple(notes),
    )


def _expert_order(kv: dict[str, Any], moe_layers: tuple[int, ...], n_expert: int) -> dict[int, tuple[int, ...]]:
    """``spac.expert_order.<block>`` written by ``spac patch``: original expert id of each position."""
    out = {}
    for block in moe_layers:
        v = kv.get(f"spac.expert_order.{block}")
        if v is None:
            continue
        values = v.values if isinstance(v, _Array) else None
        order = tuple(int(x) for x in values) if values is not None else ()
        if sorted(order) != list(range(n_expert)):
            raise GGUFError(f"metadata 'spac.expert_order.{block}' is not a permutation of the {n_expert} experts; "
                            "the file is corrupt; re-run `spac patch`")
        out[block] = order
    return out


def _check_layer_shapes(
    meta: _Meta,
    il: int,
    kinds: dict[str, ExpertTensor],
    d_expert: int,
    ff_exp_arr: tuple[int, ...] | None,
    ff_arr: tuple[int, ...] | None,
    ff_per_layer: list[int],
) -> None:
    """gate/up: {d, ff, E}; down: {ff, d, E}; gate_up: {d, 2*ff, E}; biases/scales to match."""
    blk = f"block {il}"
    present = sorted(k for k in kinds if k in _WEIGHT_KINDS)
    if "down" not in kinds:
        raise meta.fail(f"{blk} has expert tensors ({', '.join(sorted(kinds))}) but no ffn_down_exps.weight")
    if "gate_up" in kinds and ("gate" in kinds or "up" in kinds):
        raise meta.fail(f"{blk} has both merged ffn_gate_up_exps and separate gate/up expert tensors")
    if "gate_up" not in kinds and "up" not in kinds:
        raise meta.fail(
            f"{blk} has expert tensors ({', '.join(present)}) but no ffn_up_exps/ffn_gate_up_exps"
        )

    def bad(t: ExpertTensor, expected: str) -> GGUFError:
        return meta.fail(f"expert tensor '{t.name}' has shape {list(t.shape)}, expected {expected}")

    down = kinds["down"]
    ff = down.shape[0]
    if down.shape[1] != d_expert:
        raise bad(down, f"[{ff}, {d_expert}, {down.n_expert}] (ne[1] = embedding length {d_expert})")
    for k in ("gate", "up"):
        t = kinds.get(k)
        if t is not None and (t.shape[0] != d_expert or t.shape[1] != ff):
            raise bad(t, f"[{d_expert}, {ff}, {t.n_expert}] (embedding length, ff of ffn_down_exps)")
    t = kinds.get("gate_up")
    if t is not None and (t.shape[0] != d_expert or t.shape[1] != 2 * ff):
        raise bad(t, f"[{d_expert}, {2 * ff}, {t.n_expert}] (gate and up halves of ff={ff})")
    n_e = {t.n_expert for k, t in kinds.items() if not t.is_chunk}
    if len(n_e) > 1:
        raise meta.fail(f"{blk} expert tensors disagree on the number of experts ({sorted(n_e)})")
    # some architectures size experts with feed_forward_length and ignore the expert key
    if ff_exp_arr is not None and ff != ff_exp_arr[il] and (ff_arr is None or ff != ff_arr[il]):
        raise meta.fail(
            f"expert tensor '{down.name}' has ff={ff} but "
            f"'{meta.key('expert_feed_forward_length')}' is {ff_exp_arr[il]} for block {il}"
        )
    ff_per_layer[il] = ff
    want_bias = {"gate_bias": ff, "up_bias": ff, "down_bias": d_expert, "gate_up_bias": 2 * ff}
    for k, t in kinds.items():
        if k in want_bias and t.shape[0] != want_bias[k]:
            raise bad(t, f"[{want_bias[k]}, {t.n_expert}]")
        if k.endswith("scale") and len(t.shape) and t.shape[0] != t.n_expert:
            raise bad(t, f"[{t.n_expert}]")
    ch = {k: kinds[k] for k in ("gate_chunk", "up_chunk", "down_chunk") if k in kinds}
    if ch:
        if "down_chunk" not in ch:
            raise meta.fail(f"{blk} has chunk-expert tensors but no ffn_down_chexps.weight")
        dch = ch["down_chunk"]
        ffc = dch.shape[0]
        if dch.shape[1] != d_expert:
            raise bad(dch, f"[{ffc}, {d_expert}, {dch.n_expert}]")
        for k in ("gate_chunk", "up_chunk"):
            t = ch.get(k)
            if t is not None and (t.shape[0] != d_expert or t.shape[1] != ffc or t.n_expert != dch.n_expert):
                raise bad(t, f"[{d_expert}, {ffc}, {dch.n_expert}]")


# --------------------------------------------------------------------------------------------------
# Entry points


def _open_checked(path: Any) -> tuple[Path, str, int]:
    try:
        p = Path(os.fspath(path))
    except TypeError:
        raise GGUFError(f"{path!r} is not a file path; pass the path of a .gguf file") from None
    label = str(p)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise GGUFError(f"{label}: no such file; check the path") from None
    except PermissionError:
        raise GGUFError(f"{label}: permission denied; make the file readable") from None
    except (OSError, ValueError) as e:
        raise GGUFError(f"{label}: cannot access the file ({e}); check the path") from None
    if stat.S_ISDIR(st.st_mode):
        raise GGUFError(f"{label} is a directory, not a GGUF file; pass the path of the .gguf file itself")
    if not stat.S_ISREG(st.st_mode):
        raise GGUFError(f"{label} is not a regular file; pass the path of a .gguf file")
    return p, label, st.st_size


def read_model_header(path: str | os.PathLike[str]) -> MoEModelInfo:
    """Parse a GGUF header and describe its experts; dense models give ``n_expert == 0``.

    Only header bytes are read.  Raises :class:`GGUFError` (one line) on any problem.
    """
    p, label, size = _open_checked(path)
    try:
        with open(p, "rb") as f:
            hdr, _ = _parse_header(f, size, label)
        return _interpret(p, label, hdr)
    except SpacError:
        raise
    except PermissionError:
        raise GGUFError(f"{label}: permission denied; make the file readable") from None
    except OSError as e:
        raise GGUFError(
            f"{label}: cannot read the file ({e.strerror or e}); check the disk and path"
        ) from None
    except MemoryError:
        raise GGUFError(f"{label}: out of memory while reading the GGUF header; {_ACTION_CORRUPT}") from None
    except Exception as e:  # a bug or an unforeseen corruption: still one line, never a traceback
        raise GGUFError(
            f"{label}: cannot parse the GGUF header ({type(e).__name__}: {e}); {_ACTION_CORRUPT}"
        ) from None


def inspect_model(path: str | os.PathLike[str]) -> MoEModelInfo:
    """Like :func:`read_model_header`, but a model without routed experts raises NotMoEError."""
    info = read_model_header(path)
    if not info.is_moe:
        raise NotMoEError(
            f"{info.path}: '{info.architecture}' model has no routed experts (no ffn_*_exps tensors); "
            "spac needs a Mixture-of-Experts GGUF (e.g. Mixtral, Qwen3-MoE, DeepSeek, OLMoE, gpt-oss)"
        )
    return info


def _fmt_bytes(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def format_report(info: MoEModelInfo) -> str:
    """A concise human-readable summary (plain text, one table row per run of similar blocks)."""
    total = info.total_tensor_bytes or 1
    lines = [
        f"file          {info.path}  ({_fmt_bytes(info.file_size)}, GGUF v{info.gguf_version}, "
        f"{info.tensor_count} tensors)",
        f"model         {info.architecture}" + (f"  '{info.name}'" if info.name else ""),
        f"blocks        {info.block_count}  (n_embd {info.n_embd})",
    ]
    if not info.is_moe:
        lines.append("experts       none (dense model)")
        lines.append(f"weights       {_fmt_bytes(info.non_expert_bytes)}")
        lines += [f"note          {n}" for n in info.notes]
        return "\n".join(lines)
    ks = sorted(set(info.n_expert_used[il] for il in info.moe_layers))
    k_txt = str(ks[0]) if len(ks) == 1 else f"{ks[0]}..{ks[-1]} (per layer)"
    lines += [
        f"experts       {info.n_expert} routed, top-{k_txt} used, {info.n_expert_shared} shared"
        + (f", ff {info.expert_ff_length}" if info.expert_ff_length else ""),
        f"gating        {info.gating} ({info.gating_source})"
        + ("  + selection bias (exp_probs_b)" if info.has_router_bias else ""),
        f"MoE blocks    {_layer_list(info.moe_layers)}  ({len(info.moe_layers)})"
        + (f"; dense: {_layer_list(info.dense_layers)}" if info.dense_layers else ""),
        f"expert bytes  {_fmt_bytes(info.expert_bytes)} ({100 * info.expert_bytes / total:.1f}%); "
        f"other {_fmt_bytes(info.non_expert_bytes)} (shared experts {_fmt_bytes(info.shared_expert_bytes)}, "
        f"routers {_fmt_bytes(info.router_bytes)})",
        "",
    ]
    header = ("blocks", "k", "tensors", "per expert", "per block")
    rows: list[tuple[str, ...]] = []
    prev_sig: tuple[Any, ...] | None = None
    run: list[int] = []

    def flush() -> None:
        if run and prev_sig is not None:
            k, tensors, per_expert = prev_sig
            rows.append(
                (
                    _layer_list(run),
                    str(k),
                    tensors,
                    _fmt_bytes(per_expert),
                    _fmt_bytes(per_expert * info.n_expert),
                )
            )

    for il in info.moe_layers:
        ts = info.layer_tensors(il)
        groups: dict[str, list[str]] = {}
        for t in ts:
            if not t.is_chunk:
                groups.setdefault(t.ggml_type, []).append(t.kind)
        desc = " ".join(f"{','.join(kinds)}:{ty}" for ty, kinds in groups.items())
        sig = (info.n_expert_used[il], desc, info.layer_expert_bytes(il))
        if sig != prev_sig or (run and run[-1] != il - 1):
            flush()
            run = []
            prev_sig = sig
        run.append(il)
    flush()
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'>' if i in (1, 3, 4) else '<'}{w}}}" for i, w in enumerate(widths))
    lines.append(fmt.format(*header))
    lines.append("  ".join("-" * w for w in widths))
    lines += [fmt.format(*r) for r in rows]
    lines += [f"note          {n}" for n in info.notes]
    return "\n".join(lines)
