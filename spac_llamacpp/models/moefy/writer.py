"""Writing the MoEfied model as a ``qwen2moe`` GGUF, streaming one tensor at a time.

Everything that is not the FFN is copied from the source byte for byte (quantised blocks included,
through ``GGUFWriter``'s ``raw_dtype``), with two exceptions: a ``llama`` source's Q/K rows are
re-ordered because qwen2moe uses NEOX RoPE (rotating dims ``i`` and ``i + n_rot/2``) where llama
rotates adjacent pairs, and a tied output matrix is written out as ``output.weight`` (qwen2moe
requires it). All metadata is copied, ``<arch>.*`` keys renamed to ``qwen2moe.*``, so the tokenizer
and chat template (and so draft-model compatibility) are unchanged.

Each dense FFN becomes the tensors of one :class:`~.ffn.MoELayer`: the router and the shared-expert
gate in F32, the experts and the shared expert in ``expert_dtype`` (F16 by default: the dequantised
source values, nearly exactly).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import gguf
import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.gguf.stream import Entry, add_value, copy_metadata, raw_entry, write_entries
from spac_llamacpp.models.moefy.ffn import MoELayer
from spac_llamacpp.models.moefy.source import DenseSource

ARCH = "qwen2moe"
EXPERT_DTYPES = {"f32": (np.float32, None, 0), "f16": (np.float16, None, 1),
                 "q8_0": (np.uint8, gguf.GGMLQuantizationType.Q8_0, 7)}
"""numpy dtype, raw GGML type and ``general.file_type`` for each expert storage type."""

_FFN_PARTS = ("gate", "up", "down")
NULL_SHARED = 32
"""Width of the all-zero shared expert written when a layer has none (qwen2moe requires the tensors)."""


def neox_row_order(n_heads: int, head_dim: int, n_rot: int) -> np.ndarray:
    """Row permutation that turns a llama (adjacent-pair RoPE) Q/K projection into a NEOX one."""
    within = np.concatenate([np.arange(0, n_rot, 2), np.arange(1, n_rot, 2), np.arange(n_rot, head_dim)])
    return (np.arange(n_heads)[:, None] * head_dim + within[None, :]).reshape(-1)


class _FFNCache:
    """The dequantised FFN of the layer being written (each layer's 8 tensors are consecutive)."""

    def __init__(self, src: DenseSource) -> None:
        self.src, self.layer, self.w = src, -1, None

    def get(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if layer != self.layer:
            self.layer, self.w = layer, self.src.ffn(layer)
        assert self.w is not None
        return self.w


def _encode(arr: np.ndarray, expert_dtype: str) -> np.ndarray:
    np_dtype, raw, _ = EXPERT_DTYPES[expert_dtype]
    if raw is not None:
        return gguf.quants.quantize(arr.astype(np.float32), raw)
    return arr.astype(np_dtype)


def _expert_entry(name: str, shape: tuple[int, ...], expert_dtype: str, produce: Callable[[], np.ndarray]) -> Entry:
    np_dtype, raw, _ = EXPERT_DTYPES[expert_dtype]
    if raw is not None:
        if shape[-1] % gguf.GGML_QUANT_SIZES[raw][0]:
            raise SpacError(f"{name}: rows of {shape[-1]} do not split into {expert_dtype} blocks")
        byte_shape = tuple(gguf.quant_shape_to_byte_shape(shape, raw))
        return Entry(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw,
                      lambda: _encode(produce(), expert_dtype))
    dt = np.dtype(np_dtype)
    return Entry(name, shape, dt, int(np.prod(shape)) * dt.itemsize, None, lambda: _encode(produce(), expert_dtype))


def _f32_entry(name: str, arr: np.ndarray) -> Entry:
    a = np.ascontiguousarray(arr, dtype=np.float32)
    return Entry(name, a.shape, a.dtype, a.nbytes, None, lambda: a)


def _layer_entries(src: DenseSource, layer: int, moe: MoELayer, cache: _FFNCache, expert_dtype: str) -> list[Entry]:
    n_embd = src.n_embd
    n_exp, m = moe.experts.shape
    n_sh = len(moe.shared) or NULL_SHARED
    p = f"blk.{layer}."

    def exps(part: str) -> np.ndarray:
        gate, up, down = cache.get(layer)
        down = down if moe.down is None else moe.down
        if part == "down":  # [n_embd, n_ff] -> [E, n_embd, m], scaled to undo the 1/E softmax weight
            return np.stack([down[:, cols] for cols in moe.experts]) * np.float32(moe.down_scale)
        w = gate if part == "gate" else up
        return w[moe.experts]  # [E, m, n_embd]

    def shexp(part: str) -> np.ndarray:
        if not len(moe.shared):  # a zero FFN: contributes exactly 0 whatever its gate says
            return np.zeros((n_embd, n_sh) if part == "down" else (n_sh, n_embd), dtype=np.float32)
        gate, up, down = cache.get(layer)
        down = down if moe.down is None else moe.down
        return down[:, moe.shared] if part == "down" else (gate if part == "gate" else up)[moe.shared]

    out = [_f32_entry(p + "ffn_gate_inp.weight", moe.router)]
    for part in _FFN_PARTS:
        shape = (n_exp, n_embd, m) if part == "down" else (n_exp, m, n_embd)
        out.append(_expert_entry(f"{p}ffn_{part}_exps.weight", shape, expert_dtype, lambda part=part: exps(part)))
    out.append(_f32_entry(p + "ffn_gate_inp_shexp.weight", moe.shared_gate))
    for part in _FFN_PARTS:
        shape = (n_embd, n_sh) if part == "down" else (n_sh, n_embd)
        out.append(_expert_entry(f"{p}ffn_{part}_shexp.weight", shape, expert_dtype, lambda part=part: shexp(part)))
    return out


def write_qwen2moe(src: DenseSource, dst: str | os.PathLike[str], layers: Sequence[MoELayer], n_expert_used: int,
                   *, expert_dtype: str = "f16", name: str | None = None,
                   extra_kv: dict[str, object] | None = None, progress: bool = True) -> Path:
    """Write the qwen2moe model of ``src`` cut as ``layers`` (one per block) to ``dst``; return its path.

    The file is written under a temporary name and renamed when complete.

    Raises:
        SpacError: an unknown ``expert_dtype``, a layer count or shapes that do not match the source.
    """
    if expert_dtype not in EXPERT_DTYPES:
        raise SpacError(f"expert dtype must be one of {', '.join(EXPERT_DTYPES)}, not {expert_dtype!r}")
    if len(layers) != src.n_layer:
        raise SpacError(f"{len(layers)} MoE layers for a model of {src.n_layer} blocks")
    n_exp, m = layers[0].experts.shape
    n_sh = len(layers[0].shared)
    for i, moe in enumerate(layers):
        if moe.experts.shape != (n_exp, m) or len(moe.shared) != n_sh:
            raise SpacError(f"layer {i}: every layer needs the same expert and shared-expert shapes")
        if not np.any(moe.shared_gate):  # llama.cpp computes sigmoid as silu(z)/z: z == 0 gives NaN
            raise SpacError(f"layer {i}: the shared-expert gate must not be all zeros")
        used = np.unique(np.concatenate([moe.shared, moe.experts.ravel()]))
        if n_sh + n_exp * m != src.n_ff or len(used) != src.n_ff:
            raise SpacError(f"layer {i}: shared + routed experts must partition the {src.n_ff} neurons")
    if not 1 <= n_expert_used <= n_exp:
        raise SpacError(f"need 1 <= n_expert_used <= {n_exp}")

    cache = _FFNCache(src)
    qk_rows = {}
    if src.arch == "llama":  # NORM -> NEOX RoPE
        qk_rows = {"attn_q": neox_row_order(src.n_head, src.head_dim, src.n_rot),
                   "attn_k": neox_row_order(src.n_head_kv, src.head_dim, src.n_rot)}
    entries: list[Entry] = []
    done_ffn: set[int] = set()
    for t in src.reader.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in ("ffn_gate", "ffn_up", "ffn_down"):
            layer = int(parts[1])
            if layer not in done_ffn:
                done_ffn.add(layer)
                entries += _layer_entries(src, layer, layers[layer], cache, expert_dtype)
            continue
        rows = qk_rows.get(parts[2]) if parts[0] == "blk" and len(parts) == 4 else None
        entries.append(raw_entry(t, rows=rows))
        if t.name == "token_embd.weight" and "output.weight" not in src.tensors:
            entries.append(raw_entry(t, name="output.weight"))  # untie: qwen2moe requires output.weight
    if len(done_ffn) != src.n_layer:
        raise SpacError(f"found the FFN of only {len(done_ffn)} of {src.n_layer} blocks")

    def add_metadata(writer: gguf.GGUFWriter) -> None:
        copy_metadata(src.reader, writer, skip={"general.architecture", "general.file_type", "general.name"},
                      rename=(src.arch + ".", ARCH + "."))
        writer.add_name(name or f"{src.field('general.name', src.path.stem)} (MoEfied: {n_exp}x{m} + shared {n_sh})")
        writer.add_file_type(EXPERT_DTYPES[expert_dtype][2])
        writer.add_expert_count(n_exp)
        writer.add_expert_used_count(n_expert_used)
        writer.add_expert_feed_forward_length(m)
        writer.add_expert_shared_feed_forward_length(n_sh or NULL_SHARED)
        for key, value in (extra_kv or {}).items():
            add_value(writer, key, value)

    return write_entries(dst, ARCH, entries, add_metadata, progress=progress)
