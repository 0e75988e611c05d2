"""Tests for spac_llamacpp.gguf.info: MoE introspection from the GGUF header alone.

The files used here are written with gguf.GGUFWriter by ``_write_moe`` below: header-valid (and
byte-exact in their tensor data) but not necessarily loadable by llama.cpp.  gguf.GGUFReader is used
as an independent oracle for tensor offsets, sizes and bytes.  A parametrized test at the end also
runs over the factory's llama.cpp-loadable tiny models when ``spac_llamacpp.models.factory`` is available.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import struct
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from spac_llamacpp.base.errors import GGUFError, NotMoEError, SpacError
from spac_llamacpp.gguf import header as gguf_header
from spac_llamacpp.gguf import info as gguf_info
from spac_llamacpp.gguf.info import (
    GGML_TYPES,
    ExpertTensor,
    MoEModelInfo,
    format_report,
    inspect_model,
    read_model_header,
)
from spac_llamacpp.models import factory

QT = gguf.GGMLQuantizationType

# --------------------------------------------------------------------------------------------------
# A minimal, header-valid MoE GGUF writer


def _arr(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> tuple[np.ndarray, Any]:
    """Random tensor of numpy ``shape`` stored as ``dtype``; returns (array, raw_dtype)."""
    x = rng.standard_normal(shape).astype(np.float32)
    if dtype == "F32":
        return x, None
    if dtype == "F16":
        return x.astype(np.float16), None
    qtype = QT[dtype]
    try:
        return gguf.quants.quantize(x, qtype), qtype
    except NotImplementedError:  # gguf-py cannot quantize k-quants: random bytes are header-valid too
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
        return rng.integers(0, 256, size=byte_shape, dtype=np.uint8), qtype


def _write_moe(
    path: Path,
    *,
    arch: str = "qwen3moe",
    n_layer: int = 4,
    n_embd: int = 64,
    n_expert: int = 4,
    n_ff: int = 32,
    k: int | list[int] | None = 2,
    dtype: str = "F16",
    merged: bool = False,
    lead: int = 0,
    expert_layers: list[int] | None = None,
    shexp: bool = False,
    router_bias: bool = False,
    biases: bool = False,
    scales: bool = False,
    ff_key: bool = True,
    gating: int | None = None,
    extra_kv: dict[str, Any] | None = None,
    drop_kv: tuple[str, ...] = (),
    drop_tensors: tuple[str, ...] = (),
    override_shapes: dict[str, tuple[int, ...]] | None = None,
    extra_tensors: dict[str, tuple[int, ...]] | None = None,
    n_tokens: int = 0,
    seed: int = 0,
    endian: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE,
) -> Path:
    """Write a small MoE-shaped GGUF; ggml ``ne`` shapes are given in ggml order in overrides."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch, endianess=endian)
    kv: dict[str, tuple[str, Any]] = {
        "general.name": ("string", f"test-{arch}"),
        f"{arch}.block_count": ("u32", n_layer),
        f"{arch}.embedding_length": ("u32", n_embd),
        f"{arch}.context_length": ("u32", 128),
        f"{arch}.feed_forward_length": ("u32", 4 * n_embd),
        f"{arch}.attention.head_count": ("u32", 4),
    }
    if n_expert:
        kv[f"{arch}.expert_count"] = ("u32", n_expert)
    if isinstance(k, list):
        kv[f"{arch}.expert_used_count"] = ("arr", k)
    elif k is not None:
        kv[f"{arch}.expert_used_count"] = ("u32", k)
    if ff_key and n_expert:
        kv[f"{arch}.expert_feed_forward_length"] = ("u32", n_ff)
    if lead:
        kv[f"{arch}.leading_dense_block_count"] = ("u32", lead)
    if shexp:
        kv[f"{arch}.expert_shared_count"] = ("u32", 1)
    if gating is not None:
        kv[f"{arch}.expert_gating_func"] = ("u32", gating)
    for key, val in (extra_kv or {}).items():
        kv[key] = ("raw", val)
    if n_tokens:
        toks = [f"tok{i}" * (1 + i % 7) for i in range(n_tokens)]
        w.add_array("tokenizer.ggml.tokens", toks)
    for key, (kind, val) in kv.items():
        if key in drop_kv:
            continue
        if kind == "string":
            w.add_string(key, val)
        elif kind == "u32":
            w.add_uint32(key, val)
        elif kind == "arr":
            w.add_array(key, val)
        else:
            t, v = val
            w.add_key_value(key, v, t)

    tensors: dict[str, tuple[tuple[int, ...], str]] = {}  # name -> (ggml ne, dtype)
    tensors["token_embd.weight"] = ((n_embd, 64), dtype)
    layers = range(lead, n_layer) if expert_layers is None else expert_layers
    for il in range(n_layer):
        tensors[f"blk.{il}.attn_norm.weight"] = ((n_embd,), "F32")
        tensors[f"blk.{il}.attn_q.weight"] = ((n_embd, n_embd), dtype)
        if n_expert and il in layers:
            tensors[f"blk.{il}.ffn_gate_inp.weight"] = ((n_embd, n_expert), "F32")
            if merged:
                tensors[f"blk.{il}.ffn_gate_up_exps.weight"] = ((n_embd, 2 * n_ff, n_expert), dtype)
            else:
                tensors[f"blk.{il}.ffn_gate_exps.weight"] = ((n_embd, n_ff, n_expert), dtype)
                tensors[f"blk.{il}.ffn_up_exps.weight"] = ((n_embd, n_ff, n_expert), dtype)
            tensors[f"blk.{il}.ffn_down_exps.weight"] = ((n_ff, n_embd, n_expert), dtype)
            if biases:
                tensors[f"blk.{il}.ffn_gate_exps.bias"] = ((n_ff, n_expert), "F32")
                tensors[f"blk.{il}.ffn_up_exps.bias"] = ((n_ff, n_expert), "F32")
                tensors[f"blk.{il}.ffn_down_exps.bias"] = ((n_embd, n_expert), "F32")
            if scales:
                tensors[f"blk.{il}.ffn_down_exps.scale"] = ((n_expert,), "F32")
            if router_bias:
                tensors[f"blk.{il}.exp_probs_b.bias"] = ((n_expert,), "F32")
            if shexp:
                tensors[f"blk.{il}.ffn_gate_inp_shexp.weight"] = ((n_embd,), "F32")
                tensors[f"blk.{il}.ffn_gate_shexp.weight"] = ((n_embd, n_ff), dtype)
                tensors[f"blk.{il}.ffn_up_shexp.weight"] = ((n_embd, n_ff), dtype)
                tensors[f"blk.{il}.ffn_down_shexp.weight"] = ((n_ff, n_embd), dtype)
        else:
            tensors[f"blk.{il}.ffn_gate.weight"] = ((n_embd, 4 * n_embd), dtype)
            tensors[f"blk.{il}.ffn_up.weight"] = ((n_embd, 4 * n_embd), dtype)
            tensors[f"blk.{il}.ffn_down.weight"] = ((4 * n_embd, n_embd), dtype)
    tensors["output_norm.weight"] = ((n_embd,), "F32")
    for name, ne in (extra_tensors or {}).items():
        tensors[name] = (ne, "F32")
    for name, ne in (override_shapes or {}).items():
        tensors[name] = (ne, tensors[name][1])
    for name, (ne, dt) in tensors.items():
        if name in drop_tensors:
            continue
        arr, raw = _arr(rng, tuple(reversed(ne)), dt)
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _one_line(err: BaseException) -> str:
    msg = str(err)
    assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
    assert "Traceback" not in msg
    return msg


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class _OverBudget(BaseException):  # not an Exception: read_model_header must not turn it into a GGUFError
    pass


class _Work:
    """Counts the Python lines that spac_llamacpp.gguf executes inside the block: a machine-independent
    measure of the reader's work (a corrupt count must not make it loop over what the count claims).
    With ``limit``, stops the reader as soon as it has done more than that."""

    _DIR = str(Path(gguf_info.__file__).parent)

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.lines = 0

    def _call(self, frame: Any, event: str, arg: Any) -> Any:
        return self._line if frame.f_code.co_filename.startswith(self._DIR) else None

    def _line(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            self.lines += 1
            if self.limit is not None and self.lines > self.limit:
                raise _OverBudget(f"more than {self.limit} lines")
        return self._line

    def __enter__(self) -> _Work:
        self._old = sys.gettrace()
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(self._old)


def _work_of(path: Path) -> int:
    """Lines the reader executes on ``path`` (a success or a SpacError)."""
    with _Work() as w, contextlib.suppress(SpacError):
        inspect_model(path)
    return w.lines


def _reader_tensor_bytes(reader: gguf.GGUFReader, name: str) -> np.ndarray:
    for t in reader.tensors:
        if t.name == name:
            return t.data
    raise KeyError(name)


def _check_against_gguf_reader(path: Path, info: MoEModelInfo) -> None:
    """Every expert's bytes, read via expert_range, equal gguf's view of that tensor's slice."""
    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    data = path.read_bytes()
    assert info.data_offset == reader.data_offset
    assert info.tensor_count == len(reader.tensors)
    total = sum(int(t.n_bytes) for t in reader.tensors)
    assert info.expert_bytes + info.non_expert_bytes == total
    assert info.expert_bytes == sum(t.nbytes for t in info.expert_tensors)
    for et in info.expert_tensors:
        rt = by_name[et.name]
        assert et.file_offset == rt.data_offset
        assert et.nbytes == int(rt.n_bytes)
        assert et.shape == tuple(int(x) for x in rt.shape)
        assert et.ggml_type == rt.tensor_type.name
        arr = rt.data  # numpy order: the expert axis is first
        assert arr.shape[0] == et.n_expert
        for e in sorted({0, et.n_expert // 2, et.n_expert - 1}):
            start, end = et.expert_range(e)
            assert end - start == et.bytes_per_expert
            assert _sha(data[start:end]) == _sha(np.ascontiguousarray(arr[e]).tobytes()), (et.name, e)
    for il in info.moe_layers:
        ranges = info.expert_ranges(il, 1)
        assert sum(b - a for a, b in ranges) == info.layer_expert_bytes(il)


# --------------------------------------------------------------------------------------------------
# Happy paths


@pytest.mark.parametrize("dtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_K"])
def test_expert_byte_ranges_match_tensor_data(tmp_path: Path, dtype: str) -> None:
    n_embd = 256 if dtype == "Q4_K" else 64
    p = _write_moe(tmp_path / "m.gguf", dtype=dtype, n_embd=n_embd, n_ff=n_embd, n_expert=6)
    info = inspect_model(p)
    assert info.architecture == "qwen3moe"
    assert info.n_expert == 6
    assert info.moe_layers == (0, 1, 2, 3)
    assert info.dense_layers == ()
    assert {t.kind for t in info.expert_tensors} == {"gate", "up", "down"}
    assert {t.ggml_type for t in info.expert_tensors} == {dtype}
    for t in info.expert_tensors:
        assert t.shape[2] == 6 == t.n_expert
    _check_against_gguf_reader(p, info)


def test_totals_and_categories(tmp_path: Path) -> None:
    p = _write_moe(tmp_path / "m.gguf", shexp=True, router_bias=True, biases=True, scales=True)
    info = inspect_model(p)
    reader = gguf.GGUFReader(str(p))
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    assert info.expert_bytes + info.non_expert_bytes == sum(sizes.values())
    assert info.shared_expert_bytes == sum(v for n, v in sizes.items() if "_shexp" in n)
    assert info.router_bytes == sum(v for n, v in sizes.items() if "gate_inp." in n or "exp_probs_b" in n)
    assert info.shared_expert_bytes > 0 and info.router_bytes > 0
    assert info.has_router_bias
    assert info.n_expert_shared == 1
    kinds = {t.kind for t in info.expert_tensors}
    assert kinds == {"gate", "up", "down", "gate_bias", "up_bias", "down_bias", "down_scale"}
    assert sum(info.layer_expert_bytes(il) for il in info.moe_layers) * info.n_expert == info.expert_bytes
    bias = next(t for t in info.expert_tensors if t.kind == "down_bias")
    assert bias.shape == (64, 4) and bias.bytes_per_expert == 64 * 4
    scale = next(t for t in info.expert_tensors if t.kind == "down_scale")
    assert scale.shape == (4,) and scale.bytes_per_expert == 4
    _check_against_gguf_reader(p, info)


def test_per_layer_expert_used_array(tmp_path: Path) -> None:
    p = _write_moe(tmp_path / "a.gguf", k=[1, 2, 3, 4])
    assert inspect_model(p).n_expert_used == (1, 2, 3, 4)
    p = _write_moe(tmp_path / "s.gguf", k=3)
    assert inspect_model(p).n_expert_used == (3, 3, 3, 3)
    p = _write_moe(tmp_path / "bad.gguf", k=[1, 2, 3])
    with pytest.raises(GGUFError, match="expert_used_count.*3 entries.*block_count is 4"):
        inspect_model(p)
    p = _write_moe(tmp_path / "big.gguf", k=9)
    with pytest.raises(GGUFError, match="exceeds expert_count"):
        inspect_model(p)
    p = _write_moe(tmp_path / "none.gguf", k=None)
    with pytest.raises(GGUFError, match="expert_used_count' is missing"):
        inspect_model(p)


def test_leading_dense_blocks(tmp_path: Path) -> None:
    p = _write_moe(tmp_path / "m.gguf", arch="deepseek2", n_layer=5, lead=2)
    info = inspect_model(p)
    assert info.leading_dense_block_count == 2
    assert info.moe_layers == (2, 3, 4)
    assert info.dense_layers == (0, 1)
    assert info.layer_expert_bytes(0) == 0
    assert info.layer_expert_bytes(2) > 0
    assert info.layer_tensors(1) == ()
    _check_against_gguf_reader(p, info)


def test_leading_dense_mismatch_is_an_error(tmp_path: Path) -> None:
    p = _write_moe(tmp_path / "m.gguf", arch="deepseek2", n_layer=5, lead=2, expert_layers=[1, 2, 3, 4])
    with pytest.raises(GGUFError, match=r"leading_dense_block_count=2.*blocks 1 should be dense") as ei:
        inspect_model(p)
    _one_line(ei.value)
    p = _write_moe(tmp_path / "n.gguf", arch="deepseek2", n_layer=5, lead=2, expert_layers=[2, 4])
    with pytest.raises(GGUFError, match="blocks 3 should be MoE"):
        inspect_model(p)


def test_interleave_and_every_n(tmp_path: Path) -> None:
    p = _write_moe(
        tmp_path / "l4.gguf",
        arch="llama4",
        expert_layers=[1, 3],
        extra_kv={"llama4.interleave_moe_layer_step": (gguf.GGUFValueType.UINT32, 2)},
    )
    info = inspect_model(p)
    assert info.moe_layers == (1, 3) and info.dense_layers == (0, 2)
    assert info.interleave_moe_layer_step == 2
    assert info.gating == "sigmoid" and info.gating_source == "graph"
    p = _write_moe(
        tmp_path / "nb.gguf",
        arch="nomic-bert-moe",
        expert_layers=[1, 3],
        extra_kv={"nomic-bert-moe.moe_every_n_layers": (gguf.GGUFValueType.UINT32, 2)},
    )
    info = inspect_model(p)
    assert info.moe_layers == (1, 3) and info.moe_every_n_layers == 2
    p = _write_moe(
        tmp_path / "bad.gguf",
        arch="llama4",
        expert_layers=[0, 2],
        extra_kv={"llama4.interleave_moe_layer_step": (gguf.GGUFValueType.UINT32, 2)},
    )
    with pytest.raises(GGUFError, match="interleave_moe_layer_step=2"):
        inspect_model(p)


def test_blocks_without_experts_and_no_rule_are_dense(tmp_path: Path) -> None:
    # jamba-style: MoE-ness decided by the presence of the tensors
    p = _write_moe(tmp_path / "j.gguf", arch="jamba", expert_layers=[1, 3])
    info = inspect_model(p)
    assert info.moe_layers == (1, 3) and info.dense_layers == (0, 2)
    assert any("no expert tensors" in n for n in info.notes)


def test_nextn_layers_are_exempt_from_the_rule(tmp_path: Path) -> None:
    p = _write_moe(
        tmp_path / "g.gguf",
        arch="glm4moe",
        n_layer=5,
        lead=1,
        expert_layers=[1, 2, 3],  # block 4 is the (dense here) MTP block
        extra_kv={"glm4moe.nextn_predict_layers": (gguf.GGUFValueType.UINT32, 1)},
    )
    info = inspect_model(p)
    assert info.moe_layers == (1, 2, 3) and info.nextn_predict_layers == 1


def test_merged_gate_up(tmp_path: Path) -> None:
    p = _write_moe(tmp_path / "m.gguf", arch="deepseek2", merged=True, n_ff=48, lead=1)
    info = inspect_model(p)
    kinds = {t.kind for t in info.expert_tensors}
    assert kinds == {"gate_up", "down"}
    gu = next(t for t in info.expert_tensors if t.kind == "gate_up")
    assert gu.shape == (64, 96, 4)
    assert gu.bytes_per_expert == 64 * 96 * 2
    assert info.expert_ff_length == 48
    assert info.expert_ff_lengths == (0, 48, 48, 48)
    _check_against_gguf_reader(p, info)


def test_merged_and_separate_together_is_an_error(tmp_path: Path) -> None:
    p = _write_moe(tmp_path / "m.gguf", merged=True, extra_tensors={"blk.0.ffn_up_exps.weight": (64, 32, 4)})
    with pytest.raises(GGUFError, match="both merged"):
        inspect_model(p)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ({"blk.2.ffn_up_exps.weight": (64, 32, 5)}, r"blk\.2\.ffn_up_exps\.weight.*5 experts.*says 4"),
        ({"blk.1.ffn_gate_exps.weight": (64, 16, 4)}, r"blk\.1\.ffn_gate_exps\.weight.*shape \[64, 16, 4\]"),
        ({"blk.0.ffn_down_exps.weight": (32, 32, 4)}, r"blk\.0\.ffn_down_exps\.weight.*embedding length 64"),
        (
            {f"blk.{i}.ffn_{p}_exps.weight": (64, 40, 4) for i in range(4) for p in ("gate", "up")}
            | {f"blk.{i}.ffn_down_exps.weight": (40, 64, 4) for i in range(4)},
            "ff=40 but 'qwen3moe.expert_feed_forward_length' is 32",
        ),
        ({"blk.3.ffn_up_exps.weight": (64, 32)}, r"blk\.3\.ffn_up_exps\.weight.*expected 3 dimensions"),
        ({"blk.0.ffn_gate_inp.weight": (64, 7)}, r"router tensor 'blk\.0\.ffn_gate_inp\.weight'"),
    ],
)
def test_shape_disagreeing_with_metadata(tmp_path: Path, override: dict, pattern: str) -> None:
    p = _write_moe(tmp_path / "m.gguf", override_shapes=override)
    with pytest.raises(GGUFError, match=pattern) as ei:
        inspect_model(p)
    _one_line(ei.value)
    with pytest.raises(GGUFError):
        read_model_header(p)


def test_gate_up_odd_shape_is_an_error(tmp_path: Path) -> None:
    p = _write_moe(
        tmp_path / "m.gguf", merged=True, override_shapes={"blk.0.ffn_gate_up_exps.weight": (64, 60, 4)}
    )
    with pytest.raises(GGUFError, match="gate_up_exps"):
        inspect_model(p)


def test_missing_down_is_an_error(tmp_path: Path) -> None:
    p = _write_moe(tmp_path / "m.gguf", drop_tensors=("blk.1.ffn_down_exps.weight",))
    with pytest.raises(GGUFError, match="block 1 .*no ffn_down_exps"):
        inspect_model(p)


def test_per_layer_expert_ff_length_array(tmp_path: Path) -> None:
    arr = (gguf.GGUFValueType.ARRAY, [0, 32, 32, 48])
    shapes = {"blk.3.ffn_gate_exps.weight": (64, 48, 4), "blk.3.ffn_up_exps.weight": (64, 48, 4)}
    shapes["blk.3.ffn_down_exps.weight"] = (48, 64, 4)
    p = _write_moe(
        tmp_path / "m.gguf",
        arch="deepseek2",
        lead=1,
        ff_key=False,
        override_shapes=shapes,
        extra_kv={"deepseek2.expert_feed_forward_length": arr},
    )
    info = inspect_model(p)
    assert info.expert_ff_lengths == (0, 32, 32, 48)
    assert info.expert_ff_length is None
    assert info.layer_expert_bytes(3) == 3 * 64 * 48 * 2
    _check_against_gguf_reader(p, info)
    bad = _write_moe(
        tmp_path / "bad.gguf",
        arch="deepseek2",
        lead=1,
        ff_key=False,
        extra_kv={"deepseek2.expert_feed_forward_length": arr},
    )
    with pytest.raises(GGUFError, match="ff=32 but 'deepseek2.expert_feed_forward_length' is 48 for block 3"):
        inspect_model(bad)


def test_dense_model_ignores_bad_moe_metadata(tmp_path: Path) -> None:
    p = _write_moe(
        tmp_path / "d.gguf",
        arch="llama",
        n_expert=0,
        k=None,
        extra_kv={"llama.expert_used_count": (gguf.GGUFValueType.FLOAT32, 2.0)},
    )
    assert read_model_header(p).n_expert == 0


def test_expert_ff_length_inferred_without_key(tmp_path: Path) -> None:
    p = _write_moe(tmp_path / "m.gguf", arch="llama", ff_key=False, n_ff=48)
    info = inspect_model(p)
    assert info.expert_ff_length == 48


def test_latent_expert_dim(tmp_path: Path) -> None:
    p = _write_moe(
        tmp_path / "m.gguf",
        arch="nemotron_h_moe",
        override_shapes={
            f"blk.{i}.ffn_{x}_exps.weight": (32, 32, 4) for i in range(4) for x in ("up", "gate")
        }
        | {f"blk.{i}.ffn_down_exps.weight": (32, 32, 4) for i in range(4)},
        extra_kv={"nemotron_h_moe.moe_latent_size": (gguf.GGUFValueType.UINT32, 32)},
    )
    assert inspect_model(p).moe_layers == (0, 1, 2, 3)


# --------------------------------------------------------------------------------------------------
# Gating


@pytest.mark.parametrize(
    ("arch", "key", "gating", "source"),
    [
        ("qwen3moe", None, "softmax", "graph"),
        ("qwen2moe", None, "softmax", "graph"),
        ("llama", None, "softmax", "graph"),
        ("llama", 2, "softmax", "graph"),  # the key is ignored by llama.cpp for llama
        ("olmoe", None, "softmax", "graph"),
        ("gpt-oss", None, "softmax_weight", "graph"),
        ("llama4", None, "sigmoid", "graph"),
        ("deepseek2", None, "softmax", "default"),
        ("deepseek2", 2, "sigmoid", "key"),
        ("deepseek2", 0, "softmax", "default"),
        ("glm4moe", None, "sigmoid", "default"),
        ("deepseek4", 4, "sqrt_softplus", "key"),
        ("bailingmoe2", 2, "sigmoid", "key"),
    ],
)
def test_gating(tmp_path: Path, arch: str, key: int | None, gating: str, source: str) -> None:
    p = _write_moe(tmp_path / "m.gguf", arch=arch, gating=key)
    info = inspect_model(p)
    assert (info.gating, info.gating_source) == (gating, source)
    if arch == "llama" and key == 2:
        assert any("ignored" in n for n in info.notes)


def test_gating_glm47_lite_heuristic(tmp_path: Path) -> None:
    p = _write_moe(
        tmp_path / "m.gguf",
        arch="deepseek2",
        n_layer=48,
        k=1,
        n_embd=32,
        n_ff=32,
        n_expert=2,
        extra_kv={"deepseek2.vocab_size": (gguf.GGUFValueType.UINT32, 154880)},
    )
    info = inspect_model(p)
    assert (info.gating, info.gating_source) == ("sigmoid", "default")


def test_gating_errors(tmp_path: Path) -> None:
    p = _write_moe(tmp_path / "req.gguf", arch="bailingmoe2")
    with pytest.raises(GGUFError, match="expert_gating_func' is missing.*bailingmoe2"):
        inspect_model(p)
    p = _write_moe(tmp_path / "bad.gguf", arch="deepseek2", gating=9)
    with pytest.raises(GGUFError, match="is 9, not a gating function"):
        inspect_model(p)


# --------------------------------------------------------------------------------------------------
# Model-level errors


def test_dense_model(tmp_path: Path) -> None:
    p = _write_moe(tmp_path / "d.gguf", arch="llama", n_expert=0, k=None)
    info = read_model_header(p)
    assert info.n_expert == 0 and not info.is_moe
    assert info.moe_layers == () and info.dense_layers == (0, 1, 2, 3)
    assert info.expert_tensors == () and info.expert_bytes == 0
    assert info.n_expert_used == (0, 0, 0, 0)
    assert "dense" in format_report(info)
    with pytest.raises(NotMoEError, match="no routed experts") as ei:
        inspect_model(p)
    _one_line(ei.value)


def test_expert_count_without_expert_tensors_is_dense(tmp_path: Path) -> None:
    p = _write_moe(tmp_path / "d.gguf", arch="llama", n_expert=4, expert_layers=[])
    info = read_model_header(p)
    assert info.n_expert == 0
    with pytest.raises(NotMoEError):
        inspect_model(p)


def test_expert_tensors_without_expert_count(tmp_path: Path) -> None:
    p = _write_moe(tmp_path / "m.gguf", drop_kv=("qwen3moe.expert_count",))
    with pytest.raises(GGUFError, match="no 'qwen3moe.expert_count'"):
        inspect_model(p)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"drop_kv": ("qwen3moe.block_count",)}, "'qwen3moe.block_count' is missing"),
        ({"drop_kv": ("qwen3moe.embedding_length",)}, "'qwen3moe.embedding_length' is missing"),
        ({"arch": "not-an-arch"}, "architecture 'not-an-arch' is not supported"),
        ({"arch": "clip"}, "CLIP/mmproj"),
        (
            {"extra_kv": {"split.count": (gguf.GGUFValueType.UINT16, 3)}},
            "split GGUF",
        ),
        (
            {"extra_kv": {"qwen3moe.expert_count": (gguf.GGUFValueType.FLOAT32, 4.0)}},
            "expert_count' has type FLOAT32",
        ),
        (
            {"extra_kv": {"qwen3moe.block_count": (gguf.GGUFValueType.UINT32, 100000)}},
            "block_count' is 100000",
        ),
        (
            {"extra_kv": {"qwen3moe.expert_count": (gguf.GGUFValueType.UINT32, 5000)}},
            "expert_count' is 5000",
        ),
    ],
)
def test_metadata_errors(tmp_path: Path, kwargs: dict, pattern: str) -> None:
    p = _write_moe(tmp_path / "m.gguf", **kwargs)
    with pytest.raises(GGUFError, match=pattern) as ei:
        read_model_header(p)
    _one_line(ei.value)


def test_no_architecture_key(tmp_path: Path) -> None:
    p = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.kv_data[0].pop("general.architecture")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="no 'general.architecture'"):
        read_model_header(p)


# --------------------------------------------------------------------------------------------------
# File-level errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="no such file") as ei:
        inspect_model(tmp_path / "nope.gguf")
    _one_line(ei.value)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="is a directory") as ei:
        inspect_model(tmp_path)
    _one_line(ei.value)


def test_not_a_path() -> None:
    with pytest.raises(GGUFError, match="not a file path"):
        inspect_model(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "content",
    [b"", b"GG", b"GGUF", b"hello world, this is not a model\n" * 10, b"\x00" * 4096],
)
def test_garbage_files(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "g.gguf"
    p.write_bytes(content)
    with pytest.raises(GGUFError) as ei:
        inspect_model(p)
    _one_line(ei.value)


def test_random_bytes_file(tmp_path: Path) -> None:
    rng = random.Random(1234)
    for i in range(20):
        p = tmp_path / f"r{i}.gguf"
        body = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 5000)))
        if i % 2:
            body = b"GGUF" + body  # get past the magic check
        p.write_bytes(body)
        with pytest.raises(GGUFError) as ei:
            inspect_model(p)
        _one_line(ei.value)


def test_bad_magic_message(tmp_path: Path) -> None:
    p = tmp_path / "m.bin"
    p.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(GGUFError, match="not a GGUF file.*'PK\\?\\?'"):
        inspect_model(p)


def test_big_endian_file(tmp_path: Path) -> None:
    p = _write_moe(tmp_path / "be.gguf", endian=gguf.GGUFEndian.BIG)
    with pytest.raises(GGUFError, match="big-endian"):
        inspect_model(p)


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _write_moe(tmp_path / "m.gguf")
    if os.geteuid() == 0:  # root reads anything: simulate the failure

        def deny(*a: Any, **kw: Any) -> Any:
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(gguf_info, "open", deny, raising=False)
    else:
        p.chmod(0)
    with pytest.raises(GGUFError, match="permission denied") as ei:
        inspect_model(p)
    _one_line(ei.value)


def test_io_error_while_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _write_moe(tmp_path / "m.gguf")

    def broken(*a: Any, **kw: Any) -> Any:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(gguf_info, "open", broken, raising=False)
    with pytest.raises(GGUFError, match="cannot read the file .Input/output error") as ei:
        inspect_model(p)
    _one_line(ei.value)


def test_truncated_anywhere(tmp_path: Path) -> None:
    """Cut the file at every header byte and at many data bytes: always one GGUFError line."""
    src = _write_moe(tmp_path / "m.gguf", n_tokens=50, shexp=True)
    data = src.read_bytes()
    info = inspect_model(src)
    last_end = max(info.data_offset + t for t in _tensor_ends(src))
    cut_path = tmp_path / "cut.gguf"
    cuts = list(range(0, info.data_offset + 1))
    rng = random.Random(7)
    cuts += sorted(rng.sample(range(info.data_offset + 1, last_end), 200))
    cuts += [last_end - 1]
    messages = set()
    for cut in cuts:
        cut_path.write_bytes(data[:cut])
        with pytest.raises(GGUFError) as ei:
            inspect_model(cut_path)
        msg = _one_line(ei.value)
        messages.add(msg.split(":", 1)[1].split(" at byte")[0][:40])
        if cut > info.data_offset:
            assert "truncated" in msg
    # cutting only the padding after the last tensor leaves a valid file (as for llama.cpp)
    cut_path.write_bytes(data[:last_end])
    assert inspect_model(cut_path).expert_bytes == info.expert_bytes


def _tensor_ends(path: Path) -> list[int]:
    r = gguf.GGUFReader(str(path))
    return [int(t.data_offset) - r.data_offset + int(t.n_bytes) for t in r.tensors]


def test_bit_flips_in_header(tmp_path: Path) -> None:
    """200 random single-bit flips in the header: success or one-line SpacError, never else."""
    src = _write_moe(tmp_path / "m.gguf", n_tokens=30, shexp=True, router_bias=True, k=[2, 2, 1, 2])
    data = bytearray(src.read_bytes())
    hdr_end = inspect_model(src).data_offset
    rng = random.Random(20240601)
    bad = tmp_path / "flip.gguf"
    budget = 4 * _work_of(src) + 10_000  # a flipped count or length must not make the reader loop over it
    outcomes = {"ok": 0, "error": 0}
    for _ in range(200):
        pos = rng.randrange(hdr_end)
        bit = rng.randrange(8)
        mutated = bytearray(data)
        mutated[pos] ^= 1 << bit
        bad.write_bytes(mutated)
        try:
            with _Work(budget):
                info = inspect_model(bad)
        except SpacError as e:
            _one_line(e)
            outcomes["error"] += 1
        except _OverBudget:
            pytest.fail(f"flip at {pos} bit {bit}: the reader did more than {budget} lines of work")
        else:
            assert isinstance(info, MoEModelInfo)
            outcomes["ok"] += 1
    assert outcomes["error"] > 50  # most flips hit structure, counts, names or shapes


def test_random_byte_overwrites_in_header(tmp_path: Path) -> None:
    """Overwrite 1-8 random bytes with random values (absurd counts/lengths, types, offsets...)."""
    src = _write_moe(tmp_path / "m.gguf", n_tokens=30, dtype="Q8_0")
    data = bytearray(src.read_bytes())
    hdr_end = inspect_model(src).data_offset
    rng = random.Random(99)
    bad = tmp_path / "over.gguf"
    budget = 4 * _work_of(src) + 10_000
    for _ in range(200):
        mutated = bytearray(data)
        pos = rng.randrange(hdr_end)
        n = rng.randrange(1, 9)
        mutated[pos : pos + n] = bytes(rng.choice([0x00, 0xFF, rng.getrandbits(8)]) for _ in range(n))
        bad.write_bytes(mutated)
        try:
            with _Work(budget):
                inspect_model(bad)
        except SpacError as e:
            _one_line(e)
        except _OverBudget:
            pytest.fail(f"{n} bytes at {pos}: the reader did more than {budget} lines of work")


# --- targeted header corruptions ------------------------------------------------------------------


def _field_offsets(path: Path) -> tuple[gguf.GGUFReader, dict[str, int]]:
    r = gguf.GGUFReader(str(path))
    return r, {name: f.offset for name, f in r.fields.items()}


def _patch(path: Path, out: Path, pos: int, fmt: str, value: int) -> Path:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, pos, value)
    out.write_bytes(data)
    return out


def _tensor_field_pos(r: gguf.GGUFReader, name: str) -> dict[str, int]:
    t = next(t for t in r.tensors if t.name == name)
    base = t.field.offset
    n_dims = len(t.shape)
    name_len = len(name.encode())
    return {
        "name_len": base,
        "n_dims": base + 8 + name_len,
        "dims": base + 8 + name_len + 4,
        "type": base + 8 + name_len + 4 + 8 * n_dims,
        "offset": base + 8 + name_len + 4 + 8 * n_dims + 4,
    }


@pytest.mark.parametrize(
    ("what", "fmt", "value", "pattern"),
    [
        ("tensor_count", "<Q", 1 << 40, "claims 1099511627776 tensors"),
        ("tensor_count", "<Q", (1 << 64) - 1, "tensors, impossible"),
        ("kv_count", "<Q", 1 << 33, "metadata keys, impossible"),
        ("version", "<I", 7, "version 7 is newer"),
        ("version", "<I", 1, "version 1 is no longer supported"),
        ("key_len", "<Q", 1 << 62, "length"),
        ("array_len", "<Q", 1 << 29, "claims 536870912 strings"),
        ("array_len", "<Q", 1 << 50, "more than llama.cpp's limit"),
        ("value_type", "<I", 77, "invalid GGUF value type 77"),
        ("tensor_type", "<I", 31, "unknown ggml type id 31"),
        ("tensor_type", "<I", 0xFFFFFFFF, "unknown ggml type id"),
        ("n_dims", "<I", 9, "has 9 dimensions"),
        ("dim0", "<Q", 1 << 63, "negative dimension"),
        ("dim0", "<Q", (1 << 62) + 64, "overflows|extends|ends at byte|not a multiple"),
        ("offset", "<Q", 8, "not aligned"),
        ("offset", "<Q", 1 << 45, "has data offset 35184372088832, expected"),
        ("name_len", "<Q", 200, "is 200 bytes long"),
        ("alignment", "<I", 48, "not a power of two"),
    ],
)
def test_targeted_header_corruption(tmp_path: Path, what: str, fmt: str, value: int, pattern: str) -> None:
    src = _write_moe(
        tmp_path / "m.gguf",
        n_tokens=20,
        extra_kv={"general.alignment": (gguf.GGUFValueType.UINT32, 64)},
    )
    r, offs = _field_offsets(src)
    tpos = _tensor_field_pos(r, "blk.1.ffn_up_exps.weight")
    key = "tokenizer.ggml.tokens"
    klen = len(key.encode())
    positions = {
        "version": 4,
        "tensor_count": 8,
        "kv_count": 16,
        "key_len": offs["general.name"],
        "array_len": offs[key] + 8 + klen + 4 + 4,
        "value_type": offs["qwen3moe.block_count"] + 8 + len(b"qwen3moe.block_count"),
        "tensor_type": tpos["type"],
        "n_dims": tpos["n_dims"],
        "dim0": tpos["dims"],
        "offset": tpos["offset"],
        "name_len": tpos["name_len"],
        "alignment": offs["general.alignment"] + 8 + len(b"general.alignment") + 4,
    }
    bad = _patch(src, tmp_path / "bad.gguf", positions[what], fmt, value)
    budget = _work_of(src)  # fails on the way through the header, never after more work than a clean read
    with pytest.raises(GGUFError, match=pattern) as ei, _Work(budget):
        inspect_model(bad)
    _one_line(ei.value)


def test_offset_past_end_of_file(tmp_path: Path) -> None:
    src = _write_moe(tmp_path / "m.gguf")
    r = gguf.GGUFReader(str(src))
    last = r.tensors[-1]
    pos = _tensor_field_pos(r, last.name)["offset"]
    size = src.stat().st_size
    new_off = (size // 32 + 10) * 32  # aligned, beyond the file: "expected" check fires first
    bad = _patch(src, tmp_path / "bad.gguf", pos, "<Q", new_off)
    with pytest.raises(GGUFError, match="data offset"):
        inspect_model(bad)
    # same offset layout but the data is missing: a truncated file
    data = src.read_bytes()
    (tmp_path / "short.gguf").write_bytes(data[: int(last.data_offset) + 2])
    with pytest.raises(GGUFError, match="truncated"):
        inspect_model(tmp_path / "short.gguf")


# --------------------------------------------------------------------------------------------------
# Reads only the header


class _CountingFile(io.RawIOBase):
    def __init__(self, f: Any, stats: dict[str, int]) -> None:
        self._f = f
        self._stats = stats

    def readable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()

    def read(self, n: int = -1) -> bytes:
        start = self._f.tell()
        b = self._f.read(n)
        self._stats["bytes"] += len(b)
        self._stats["reads"] += 1
        self._stats["max_end"] = max(self._stats["max_end"], start + len(b))
        return b

    def close(self) -> None:
        self._f.close()
        super().close()


def _write_sparse_moe(path: Path, *, n_layer: int, n_embd: int, n_ff: int, n_expert: int) -> int:
    """A header-valid GGUF whose (sparse, all-zero) tensor data is huge; returns the data size."""
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_uint32("qwen3moe.block_count", n_layer)
    w.add_uint32("qwen3moe.embedding_length", n_embd)
    w.add_uint32("qwen3moe.expert_count", n_expert)
    w.add_uint32("qwen3moe.expert_used_count", 8)
    w.add_uint32("qwen3moe.expert_feed_forward_length", n_ff)
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(150_000)])
    q4k = QT.Q4_K
    total = 0

    def add(name: str, ne: tuple[int, ...], qtype: Any) -> None:
        nonlocal total
        blck, tsize = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(ne)) // blck * tsize
        byte_shape = tuple(reversed(ne[1:])) + (ne[0] // blck * tsize,)
        w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        total += (nbytes + 31) // 32 * 32

    add("token_embd.weight", (n_embd, 151_936), q4k)
    for il in range(n_layer):
        add(f"blk.{il}.attn_q.weight", (n_embd, n_embd), q4k)
        add(f"blk.{il}.ffn_gate_inp.weight", (n_embd, n_expert), QT.F32)
        add(f"blk.{il}.ffn_gate_exps.weight", (n_embd, n_ff, n_expert), q4k)
        add(f"blk.{il}.ffn_up_exps.weight", (n_embd, n_ff, n_expert), q4k)
        add(f"blk.{il}.ffn_down_exps.weight", (n_ff, n_embd, n_expert), QT.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    header_size = path.stat().st_size
    data_offset = (header_size + 31) // 32 * 32
    os.truncate(path, data_offset + total)
    return total


def test_reads_only_header_of_a_20gb_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "huge.gguf"
    total = _write_sparse_moe(p, n_layer=48, n_embd=2048, n_ff=768, n_expert=128)
    assert p.stat().st_size > 15 * 2**30
    if os.stat(p).st_blocks * 512 > 2**30:
        pytest.skip("filesystem does not support sparse files")
    stats = {"bytes": 0, "max_end": 0, "reads": 0}
    real_open = open

    def counting_open(file: Any, mode: str = "r", *a: Any, **kw: Any) -> Any:
        f = real_open(file, mode, *a, **kw)
        return _CountingFile(f, stats) if "b" in mode else f

    monkeypatch.setattr(gguf_info, "open", counting_open, raising=False)
    info = inspect_model(p)
    assert info.n_expert == 128 and len(info.moe_layers) == 48
    assert info.expert_bytes + info.non_expert_bytes <= total
    assert stats["bytes"] > 0
    assert stats["max_end"] <= info.data_offset + gguf_header.Reader.CHUNK
    assert stats["bytes"] <= info.data_offset + gguf_header.Reader.CHUNK
    assert stats["reads"] <= info.data_offset // gguf_header.Reader.CHUNK + 2  # chunked, never per value


def test_corrupt_array_count_over_zeros_fails_fast(tmp_path: Path) -> None:
    """A string-array count corrupted to 2**26 walking over (sparse) zeros stops quickly."""
    src = _write_moe(tmp_path / "m.gguf", n_tokens=5000)
    r, offs = _field_offsets(src)
    pos = offs["tokenizer.ggml.tokens"] + 8 + len(b"tokenizer.ggml.tokens") + 4 + 4
    data = bytearray(src.read_bytes())
    struct.pack_into("<Q", data, pos, 1 << 26)
    data[pos + 8 :] = bytes(len(data) - pos - 8)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    os.truncate(bad, 1 << 30)
    # skipped a buffer at a time (~30 lines per 64 KiB), not a string at a time (2**25 strings to the 256 MiB limit)
    with pytest.raises(GGUFError, match="header is larger than") as ei, _Work(1_000_000):
        inspect_model(bad)
    _one_line(ei.value)


def test_large_string_array_then_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path over a tokenizer array crosses buffer boundaries correctly."""
    p = _write_moe(tmp_path / "m.gguf", n_tokens=60_000)
    slow_path = []  # tokens read one by one: only those that straddle the end of a buffer
    string_len = gguf_header.Reader.string_len

    def counting_string_len(self: Any, what: str) -> int:
        if what == "array 'tokenizer.ggml.tokens'":
            slow_path.append(self.pos)
        return string_len(self, what)

    monkeypatch.setattr(gguf_header.Reader, "string_len", counting_string_len)
    info = inspect_model(p)
    assert 1 <= len(slow_path) <= info.data_offset // gguf_header.Reader.CHUNK + 1
    assert info.n_expert == 4 and info.name == "test-qwen3moe"
    _check_against_gguf_reader(p, info)


# --------------------------------------------------------------------------------------------------
# API details


def test_expert_range_bounds(tmp_path: Path) -> None:
    info = inspect_model(_write_moe(tmp_path / "m.gguf"))
    t = info.expert_tensors[0]
    assert isinstance(t, ExpertTensor)
    assert t.expert_range(0) == (t.file_offset, t.file_offset + t.bytes_per_expert)
    assert t.expert_range(3)[1] == t.end_offset == t.file_offset + t.nbytes
    for bad in (-1, 4, 100):
        with pytest.raises(IndexError):
            t.expert_range(bad)
    with pytest.raises(TypeError):
        t.expert_range(1.0)  # type: ignore[arg-type]
    with pytest.raises(IndexError):
        info.layer_expert_bytes(4)
    with pytest.raises(IndexError):
        info.expert_ranges(0, 4)
    # experts of one tensor tile it exactly
    ranges = [t.expert_range(e) for e in range(t.n_expert)]
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))


def test_to_json_and_report(tmp_path: Path) -> None:
    info = inspect_model(
        _write_moe(tmp_path / "m.gguf", arch="deepseek2", lead=1, shexp=True, router_bias=True)
    )
    d = info.to_json()
    s = json.dumps(d)
    back = json.loads(s)
    assert back["architecture"] == "deepseek2"
    assert back["moe_layers"] == [1, 2, 3]
    assert back["dense_layers"] == [0]
    assert back["n_expert_used"] == [2, 2, 2, 2]
    assert back["has_router_bias"] is True
    assert len(back["expert_tensors"]) == len(info.expert_tensors)
    assert back["expert_tensors"][0]["file_offset"] == info.expert_tensors[0].file_offset
    rep = format_report(info)
    assert "deepseek2" in rep and "softmax" in rep and "1-3" in rep
    assert len(rep.splitlines()) < 20


def test_header_values_match_gguf_reader(tmp_path: Path) -> None:
    p = _write_moe(
        tmp_path / "m.gguf",
        k=[1, 2, 2, 1],
        n_tokens=100,
        extra_kv={
            "general.alignment": (gguf.GGUFValueType.UINT32, 64),
            "test.f32": (gguf.GGUFValueType.FLOAT32, 0.5),
            "test.i64": (gguf.GGUFValueType.INT64, -7),
            "test.bool": (gguf.GGUFValueType.BOOL, True),
            "test.f64": (gguf.GGUFValueType.FLOAT64, 1e300),
        },
    )
    with open(p, "rb") as f:
        hdr, nread = gguf_header.parse_header(f, p.stat().st_size, str(p))
    reader = gguf.GGUFReader(str(p))
    assert hdr.data_offset == reader.data_offset and hdr.alignment == 64
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        ours = hdr.kv[name]
        theirs = field.contents()
        if isinstance(ours, gguf_header.ArrayValue):
            assert list(ours.values) == theirs, name
        else:
            assert ours == theirs, name
    assert [t.name for t in hdr.tensors] == [t.name for t in reader.tensors]
    assert [hdr.data_offset + t.offset for t in hdr.tensors] == [t.data_offset for t in reader.tensors]
    assert nread <= hdr.data_offset + gguf_header.Reader.CHUNK


def test_gguf_v2_is_accepted(tmp_path: Path) -> None:
    src = _write_moe(tmp_path / "m.gguf")
    v2 = _patch(src, tmp_path / "v2.gguf", 4, "<I", 2)
    assert inspect_model(v2).gguf_version == 2


def test_ggml_type_table_matches_gguf_py() -> None:
    for tid, (name, blck, tsize) in GGML_TYPES.items():
        try:
            qt = QT(tid)
        except ValueError:
            continue  # newer than gguf-py (Q2_0)
        assert qt.name == name
        if name == "Q8_1":
            continue  # gguf-py 0.19 has a stale size for Q8_1 (40); ggml's block_q8_1 is 36 bytes
        assert gguf.GGML_QUANT_SIZES[qt] == (blck, tsize), name


# --------------------------------------------------------------------------------------------------
# Over the factory's llama.cpp-loadable tiny models


_EXPECTED_GATING = {
    "llama": "softmax",
    "qwen2moe": "softmax",
    "qwen3moe": "softmax",
    "olmoe": "softmax",
    "gpt-oss": "softmax_weight",
}


@pytest.mark.parametrize("dtype", ["f16", "f32", "q8_0"])
@pytest.mark.parametrize("arch", factory.ARCHITECTURES)
def test_factory_models(tmp_path: Path, arch: str, dtype: str) -> None:
    p = factory.write_tiny_moe(tmp_path / f"{arch}.gguf", arch, dtype=dtype, seed=3)
    info = inspect_model(p)
    gguf_arch = "deepseek2" if arch.startswith("deepseek2") else arch
    assert info.architecture == gguf_arch
    assert info.n_expert > 0 and info.moe_layers
    assert all(info.n_expert_used[il] >= 1 for il in info.moe_layers)
    assert set(info.moe_layers) | set(info.dense_layers) == set(range(info.block_count))
    assert info.moe_layers[0] == info.leading_dense_block_count
    for t in info.expert_tensors:
        assert t.shape[-1] == info.n_expert or t.kind.endswith("scale")
    kinds = {t.kind for t in info.expert_tensors}
    if arch == "deepseek2-merged":
        assert "gate_up" in kinds and "gate" not in kinds
    else:
        assert {"up", "down"} <= kinds
    if arch == "gpt-oss":
        assert {"gate_bias", "up_bias", "down_bias"} <= kinds
    if arch in _EXPECTED_GATING:
        assert info.gating == _EXPECTED_GATING[arch]
    if arch.startswith("deepseek2"):
        assert info.has_router_bias
    if arch in ("qwen2moe", "deepseek2", "deepseek2-merged"):
        assert info.n_expert_shared >= 1 and info.shared_expert_bytes > 0
    _check_against_gguf_reader(p, info)
    assert format_report(info)


def test_factory_dense_model(tmp_path: Path) -> None:
    p = factory.write_tiny_dense(tmp_path / "dense.gguf")
    assert read_model_header(p).n_expert == 0
    with pytest.raises(NotMoEError):
        inspect_model(p)
