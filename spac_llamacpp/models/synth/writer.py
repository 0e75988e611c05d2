"""Streaming writer of synthetic GGUFs: a real model's architecture and tensor shapes, random weights.

The tensor table is planned first (:func:`plan_tensors`), the header (hyper-parameters from the preset's
:class:`~spac_llamacpp.models.spec.TinySpec` through ``gguf_write.add_hparams``, a synthetic byte-level
BPE tokenizer padded to the real vocabulary size, the tensor infos) is written with ``gguf.GGUFWriter``,
and then every tensor's data is generated and written in chunks of at most
:data:`~spac_llamacpp.models.synth.blocks.CHUNK_BYTES` (quantized blocks are written directly, see
``blocks.py``), so memory stays small whatever the file size and writing costs about what the disk
takes. The file is written under a temporary name and renamed when complete.

Types: the routed experts (``*_exps.weight``) take the chosen type (Q4_K rows that are not a multiple
of 256 fall back to Q5_0, as llama.cpp's quantizer does; gpt-oss's 2880-wide rows are such rows);
the token embedding is Q8_0 (F16 for ``f16``); norms, biases, routers, attention sinks and the MLA
``attn_k_b``/``attn_v_b`` are F32; every other matrix is F16. Non-expert matrices stay unquantized
because on CPUs with AMX the vendored CPU backend moves quantized ``MUL_MAT`` weights into its AMX
buffer, whose kernel crashes on the development VMs (``gguf_write.py``); experts and the embedding
(``MUL_MAT_ID``, ``GET_ROWS``) never go there, so the files run in stock llama.cpp everywhere.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from tqdm import tqdm

from spac_llamacpp.base.atomic import atomic_output, close_quietly
from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.models.bpe import TOKEN_CONTROL, BpeVocab, add_tokenizer
from spac_llamacpp.models.factory import factory_vocab
from spac_llamacpp.models.gguf_write import F32_MATRICES, add_hparams
from spac_llamacpp.models.spec import TinySpec
from spac_llamacpp.models.synth.blocks import CHUNK_BYTES, block_writer
from spac_llamacpp.models.synth.presets import Preset, get_preset

TYPES: dict[str, Q] = {"q4_k": Q.Q4_K, "q8_0": Q.Q8_0, "f16": Q.F16, "mxfp4": Q.MXFP4}
"""``--type`` choices: the routed experts' ggml type."""

FALLBACK: dict[Q, Q] = {Q.Q4_K: Q.Q5_0}
"""Type for rows a type's blocks do not divide (llama.cpp's ``tensor_type_fallback``); F16 otherwise."""

_FILE_TYPES = {
    "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "mxfp4": gguf.LlamaFileType.MOSTLY_MXFP4_MOE,
}

TOKEN_UNUSED = int(gguf.TokenType.UNUSED)


@dataclass(frozen=True)
class SynthTensor:
    """One planned tensor: name, ggml shape ``ne``, type and how its values are drawn."""

    name: str
    ne: tuple[int, ...]  # ggml order: ne[0] is the row (fan-in), the last axis the expert axis
    qtype: Q
    std: float = 0.0  # standard deviation of the values ("normal")
    init: str = "normal"  # "normal" or "ones"
    zero_rows: tuple[int, ...] = ()  # rows (flat index over ne[1:]) written as zeros

    @property
    def n_rows(self) -> int:
        return math.prod(self.ne[1:])

    @property
    def row_bytes(self) -> int:
        return block_writer(self.qtype).nbytes(self.ne[0])

    @property
    def nbytes(self) -> int:
        return self.row_bytes * self.n_rows

    @property
    def byte_shape(self) -> tuple[int, ...]:
        """numpy shape of the stored bytes (the reverse of ``ne``, the row in bytes)."""
        return (*reversed(self.ne[1:]), self.row_bytes)


@dataclass(frozen=True)
class SynthResult:
    """What :func:`write_synth` wrote."""

    path: Path
    preset: str
    n_layer: int
    expert_type: str  # ggml type names of the routed experts, e.g. "Q4_K" or "Q5_0"
    nbytes: int  # file size
    seconds: float

    def summary(self) -> str:
        p = get_preset(self.preset)
        rate = self.nbytes / max(self.seconds, 1e-9) / 2**20
        return (f"wrote {self.path}: {self.preset} ({self.n_layer} layers, {p.spec.n_expert} experts x "
                f"{p.spec.n_expert_used} used, experts {self.expert_type}), {_fmt_bytes(self.nbytes)} "
                f"in {self.seconds:.1f} s ({rate:.0f} MiB/s)")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


# ------------------------------------------------------------------------------------------------
# planning


def _fit(qtype: Q, row: int) -> Q:
    """``qtype`` if its blocks divide a row of ``row`` values, else its fallback (or F16)."""
    for t in (qtype, FALLBACK.get(qtype), Q.F16):
        if t is not None and row % block_writer(t).block_size == 0:
            return t
    return Q.F32


def plan_tensors(preset: Preset, spec: TinySpec, expert_type: str, silent_ids: Sequence[int] = ()) -> list[SynthTensor]:
    """Every tensor of ``preset`` at ``spec``'s depth, in file order, with the routed experts in ``expert_type``.

    The names and shapes are the ones the vendored llama.cpp's loader of the architecture creates
    (``src/models/<arch>.cpp``: ``load_arch_tensors``). ``silent_ids`` are output rows written as zeros
    (control, padding and unprintable byte tokens, so that greedy generation stays on text).
    """
    s = spec
    a = s.arch
    D, V, E, F = s.n_embd, s.n_vocab, s.n_expert, s.n_ff_exp  # noqa: N806
    H, Hkv, hd = s.n_head, s.n_head_kv, preset.attn_head_dim  # noqa: N806
    exp_q = TYPES[expert_type]
    out: list[SynthTensor] = []

    def ones(name: str, n: int) -> None:
        out.append(SynthTensor(name, (n,), Q.F32, init="ones"))

    def f32(name: str, ne: tuple[int, ...], std: float) -> None:
        out.append(SynthTensor(name, ne, Q.F32, std))

    def mat(name: str, ne: tuple[int, ...], gain: float) -> None:
        """A matrix of fan-in ne[0], F16 (F32 for the MLA absorption matrices)."""
        qtype = Q.F32 if F32_MATRICES.search(name) else _fit(Q.F16, ne[0])
        out.append(SynthTensor(name, ne, qtype, gain / math.sqrt(ne[0])))

    def experts(name: str, ne: tuple[int, ...]) -> None:
        out.append(SynthTensor(name, ne, _fit(exp_q, ne[0]), s.ffn_gain / math.sqrt(ne[0])))

    def bias(name: str, ne: tuple[int, ...]) -> None:
        f32(name, ne, s.bias_std)

    embd_q = Q.F16 if expert_type == "f16" else _fit(Q.Q8_0, D)
    out.append(SynthTensor("token_embd.weight", (D, V), embd_q, 1.0))

    for i in range(s.n_layer):
        p = f"blk.{i}."
        ones(p + "attn_norm.weight", D)

        # ---- attention
        if a == "deepseek2":  # MLA without q compression (q_lora_rank null in DeepSeek-V2-Lite)
            qk = s.qk_nope_dim + s.qk_rope_dim
            ones(p + "attn_kv_a_norm.weight", s.kv_lora_rank)
            mat(p + "attn_q.weight", (D, H * qk), s.attn_gain)
            mat(p + "attn_kv_a_mqa.weight", (D, s.kv_lora_rank + s.qk_rope_dim), s.attn_gain)
            mat(p + "attn_k_b.weight", (s.qk_nope_dim, s.kv_lora_rank, H), s.attn_gain)
            mat(p + "attn_v_b.weight", (s.kv_lora_rank, s.v_head_dim, H), s.attn_gain)
            mat(p + "attn_output.weight", (H * s.v_head_dim, D), s.attn_gain)
        else:
            mat(p + "attn_q.weight", (D, H * hd), s.attn_gain)
            mat(p + "attn_k.weight", (D, Hkv * hd), s.attn_gain)
            mat(p + "attn_v.weight", (D, Hkv * hd), s.attn_gain)
            if a == "gpt-oss":
                bias(p + "attn_q.bias", (H * hd,))
                bias(p + "attn_k.bias", (Hkv * hd,))
                bias(p + "attn_v.bias", (Hkv * hd,))
            mat(p + "attn_output.weight", (H * hd, D), s.attn_gain)
            if a == "gpt-oss":
                bias(p + "attn_output.bias", (D,))
                f32(p + "attn_sinks.weight", (H,), 1.0)
            elif a == "qwen3moe":
                ones(p + "attn_q_norm.weight", hd)
                ones(p + "attn_k_norm.weight", hd)
            elif a == "olmoe":  # OLMoE normalises q and k over the whole projection
                ones(p + "attn_q_norm.weight", H * hd)
                ones(p + "attn_k_norm.weight", Hkv * hd)

        # ---- feed-forward
        ones(p + ("post_attention_norm.weight" if a == "gpt-oss" else "ffn_norm.weight"), D)
        if a == "deepseek2" and i < s.n_dense_lead:
            mat(p + "ffn_gate.weight", (D, s.n_ff), s.ffn_gain)
            mat(p + "ffn_up.weight", (D, s.n_ff), s.ffn_gain)
            mat(p + "ffn_down.weight", (s.n_ff, D), s.ffn_gain)
            continue
        f32(p + "ffn_gate_inp.weight", (D, E), s.router_gain / math.sqrt(D))
        if a == "gpt-oss":
            bias(p + "ffn_gate_inp.bias", (E,))
        experts(p + "ffn_gate_exps.weight", (D, F, E))
        experts(p + "ffn_up_exps.weight", (D, F, E))
        experts(p + "ffn_down_exps.weight", (F, D, E))
        if a == "gpt-oss":
            bias(p + "ffn_gate_exps.bias", (F, E))
            bias(p + "ffn_up_exps.bias", (F, E))
            bias(p + "ffn_down_exps.bias", (D, E))
        if a == "deepseek2":
            fs = F * s.n_expert_shared
            mat(p + "ffn_gate_shexp.weight", (D, fs), s.ffn_gain)
            mat(p + "ffn_up_shexp.weight", (D, fs), s.ffn_gain)
            mat(p + "ffn_down_shexp.weight", (fs, D), s.ffn_gain)

    ones("output_norm.weight", D)
    out.append(SynthTensor("output.weight", (D, V), _fit(Q.F16, D), s.output_gain / math.sqrt(D),
                           zero_rows=tuple(sorted(silent_ids))))
    return out


def synth_vocab(n_vocab: int) -> tuple[BpeVocab, list[int]]:
    """A byte-level BPE tokenizer of exactly ``n_vocab`` tokens and the ids never to generate.

    The factory's tokenizer (256 bytes, merges of a built-in English text, control tokens) padded to the
    real vocabulary size with ``<|reserved_N|>`` tokens typed UNUSED: as CONTROL tokens (the factory's
    choice) llama.cpp would scan ~150k special tokens on every tokenization.
    """
    base = factory_vocab(n_vocab)
    silent = base.silent_ids()
    types = tuple(TOKEN_UNUSED if t == TOKEN_CONTROL and tok.startswith("<|reserved_") else t
                  for tok, t in zip(base.tokens, base.types, strict=True))
    return BpeVocab(base.tokens, types, base.merges), silent


# ------------------------------------------------------------------------------------------------
# metadata


def _replace_key(writer: gguf.GGUFWriter, key: str) -> None:
    """Drop ``key`` before it is written again (GGUFWriter warns about overwritten keys)."""
    writer.kv_data[0].pop(key, None)


def add_metadata(writer: gguf.GGUFWriter, preset: Preset, spec: TinySpec, expert_type: str,
                 vocab: BpeVocab) -> None:
    """The hyper-parameters of ``preset`` at ``spec``'s depth, the tokenizer and descriptive keys."""
    arch = spec.gguf_arch
    add_hparams(writer, spec, f"synth-{preset.name}")
    writer.add_description(f"random weights in the tensor layout of {preset.name} ({preset.source}); "
                           f"written by spac synth")
    writer.add_file_type(_FILE_TYPES[expert_type])
    if preset.head_dim is not None and arch != "deepseek2":
        for key in (gguf.Keys.Attention.KEY_LENGTH, gguf.Keys.Attention.VALUE_LENGTH):
            _replace_key(writer, key.format(arch=arch))
        writer.add_key_length(preset.head_dim)
        writer.add_value_length(preset.head_dim)
    if arch == "deepseek2":
        _replace_key(writer, gguf.Keys.LLM.EXPERT_GATING_FUNC.format(arch=arch))
        _replace_key(writer, gguf.Keys.LLM.EXPERT_WEIGHTS_NORM.format(arch=arch))
        gating = {"softmax": gguf.ExpertGatingFuncType.SOFTMAX, "sigmoid": gguf.ExpertGatingFuncType.SIGMOID}
        writer.add_expert_gating_func(gating[preset.gating or "softmax"])
        writer.add_expert_weights_norm(bool(preset.expert_weights_norm))
    rs = preset.rope_scaling
    if rs:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rs["factor"])
        writer.add_rope_scaling_orig_ctx_len(int(rs["original_context"]))
        if "yarn_log_mul" in rs:
            writer.add_rope_scaling_yarn_log_mul(rs["yarn_log_mul"])
    add_tokenizer(writer, vocab)


def _metadata_bytes(vocab: BpeVocab, n_tensors: int) -> int:
    """A generous bound on the header size (tokenizer strings dominate)."""
    strings = sum(len(t.encode()) + 8 + 4 for t in vocab.tokens) + sum(len(m.encode()) + 8 for m in vocab.merges)
    return strings + 256 * n_tensors + (1 << 20)


# ------------------------------------------------------------------------------------------------
# writing


def check_disk(path: Path, needed: int) -> None:
    """:class:`SpacError` (one line) unless the file system of ``path`` has ``needed`` bytes free
    (an existing file at ``path`` counts as free: it is replaced)."""
    free = shutil.disk_usage(path.parent).free
    if path.is_file():
        free += path.stat().st_size
    if needed > free:
        raise SpacError(f"not enough disk space for {path}: needs {_fmt_bytes(needed)}, {_fmt_bytes(free)} free")


def write_synth(
    path: str | os.PathLike[str],
    preset: str,
    *,
    expert_type: str | None = None,
    layers: int | None = None,
    seed: int = 0,
    progress: bool | None = None,
) -> SynthResult:
    """Write a GGUF with the architecture and tensor shapes of ``preset`` and random weights.

    Args:
        path: the file to write (replaced if it exists; its directory must exist).
        preset: a name of :data:`~spac_llamacpp.models.synth.presets.PRESETS`.
        expert_type: routed-expert type (``--type``), one of :data:`TYPES` (default: the preset's).
        layers: keep only the first ``layers`` blocks (default: all).
        seed: the same arguments and seed give byte-identical files.
        progress: show a progress bar over the bytes written (None: only on a terminal).

    Raises:
        SpacError: unknown preset or type, bad ``layers``, missing directory, not enough disk space.
    """
    t0 = time.perf_counter()
    p = get_preset(preset)
    expert_type = expert_type or p.default_type
    if expert_type not in TYPES:
        raise SpacError(f"unknown synth type {expert_type!r}; choose one of {', '.join(TYPES)}")
    spec = p.with_layers(layers)
    path = Path(path)
    if not path.parent.is_dir():
        raise SpacError(f"output directory {path.parent} does not exist")
    vocab, silent = synth_vocab(spec.n_vocab)
    tensors = plan_tensors(p, spec, expert_type, silent)
    align = gguf.GGUF_DEFAULT_ALIGNMENT
    data_bytes = sum(-(-t.nbytes // align) * align for t in tensors)
    check_disk(path, data_bytes + _metadata_bytes(vocab, len(tensors)))

    with atomic_output(path) as tmp:  # a full disk or an interrupt leaves no partial file (base/atomic.py)
        writer = gguf.GGUFWriter(tmp, spec.gguf_arch)
        try:
            add_metadata(writer, p, spec, expert_type, vocab)
            for t in tensors:
                quantized = t.qtype not in (Q.F32, Q.F16)
                dtype = np.uint8 if quantized else (np.float32 if t.qtype == Q.F32 else np.float16)
                shape = t.byte_shape if quantized else tuple(reversed(t.ne))
                writer.add_tensor_info(t.name, shape, np.dtype(dtype), t.nbytes,
                                       raw_dtype=t.qtype if quantized else None)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            assert writer.fout is not None and len(writer.fout) == 1
            fout = writer.fout[0]
            _pad(fout, align)
            with tqdm(total=data_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=f"synth {p.name}",
                      disable=None if progress is None else not progress, leave=False) as bar:
                for t in tensors:
                    for chunk in _tensor_chunks(t, seed):
                        fout.write(chunk)
                        bar.update(chunk.nbytes)
                    bar.update(_pad(fout, align))
            writer.close()  # the last flush: its failure is a failed write too
        except BaseException:
            close_quietly(writer)
            raise
    exp = sorted({t.qtype.name for t in tensors if t.name.endswith("_exps.weight")})
    return SynthResult(path, p.name, spec.n_layer, "+".join(exp), path.stat().st_size, time.perf_counter() - t0)


def _pad(fout, align: int) -> int:  # noqa: ANN001 - a binary file
    n = -fout.tell() % align
    if n:
        fout.write(b"\0" * n)
    return n


def _tensor_chunks(t: SynthTensor, seed: int):  # noqa: ANN202 - a generator of uint8 arrays
    """The bytes of ``t`` in chunks of whole rows, at most CHUNK_BYTES each (at least one row)."""
    if t.init == "ones":
        yield np.ones(math.prod(t.ne), dtype=np.float32).view(np.uint8)
        return
    w = block_writer(t.qtype)
    row_bytes = t.row_bytes
    rows_per_chunk = max(1, CHUNK_BYTES // row_bytes)
    zero = np.asarray(t.zero_rows, dtype=np.int64)
    name_id = zlib.crc32(t.name.encode())
    buf = np.empty(min(rows_per_chunk, t.n_rows) * row_bytes, dtype=np.uint8)
    for k, r0 in enumerate(range(0, t.n_rows, rows_per_chunk)):
        r1 = min(r0 + rows_per_chunk, t.n_rows)
        chunk = buf[: (r1 - r0) * row_bytes]
        rng = np.random.default_rng([seed, name_id, k])
        if row_bytes <= CHUNK_BYTES:
            w.fill(chunk, t.std, rng, seed)
        else:  # a row longer than a chunk: fill it piecewise (whole blocks)
            step = w.max_blocks * w.type_size
            for b0 in range(0, chunk.size, step):
                w.fill(chunk[b0:b0 + step], t.std, rng, seed)
        if zero.size:
            hit = zero[(zero >= r0) & (zero < r1)] - r0
            chunk.reshape(r1 - r0, row_bytes)[hit] = 0
        yield chunk
