"""The tiny-model factory: every architecture loads, tokenizes and generates in the vendored llama.cpp."""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Iterator

import gguf
import llama_cpp
import numpy as np
import pytest

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.models.factory import (
    ARCHITECTURES,
    DTYPES,
    GGUF_ARCH,
    write_tiny_dense,
    write_tiny_moe,
)

PROMPT = "The cat sat on the mat and then"
COMMON = {"n_ctx": 256, "verbose": False, "seed": 0}


def generate(path: pathlib.Path, n: int = 16) -> tuple[str, dict[str, str]]:
    llm = llama_cpp.Llama(model_path=str(path), **COMMON)
    try:
        out = llm(PROMPT, max_tokens=n, temperature=0.0)
        assert out["usage"]["completion_tokens"] == n  # eos/control tokens are never greedy picks
        return out["choices"][0]["text"], dict(llm.metadata)
    finally:
        llm.close()


def tensors(path: pathlib.Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loads_and_generates(tiny_model, arch: str, dtype: str) -> None:
    path = tiny_model(arch, dtype)
    assert path.stat().st_size < 5 * 2**20
    text, meta = generate(path)
    assert text.strip()
    assert text.isprintable() or "\n" in text  # printable ASCII only, by construction
    gguf_arch = GGUF_ARCH[arch]
    assert meta["general.architecture"] == gguf_arch
    assert int(meta[f"{gguf_arch}.expert_count"]) == 8
    assert int(meta[f"{gguf_arch}.expert_used_count"]) == 2


def test_f32_matches_f16_and_q8_0_is_close(tiny_model, tmp_path: pathlib.Path) -> None:
    f32 = write_tiny_moe(tmp_path / "f32.gguf", "qwen3moe", dtype="f32")
    assert generate(f32, 8)[0] == generate(tiny_model("qwen3moe", "f16"), 8)[0]
    assert generate(tiny_model("qwen3moe", "q8_0"), 8)[0] == generate(f32, 8)[0]


def test_deepseek2_merged_gate_up_is_the_same_model(tiny_model) -> None:
    split, merged = tensors(tiny_model("deepseek2")), tensors(tiny_model("deepseek2-merged"))
    assert "blk.0.ffn_gate_inp.weight" not in split  # leading dense block
    assert "blk.0.ffn_gate.weight" in split
    gu = merged["blk.1.ffn_gate_up_exps.weight"]
    assert "blk.1.ffn_gate_exps.weight" not in merged
    assert list(gu.shape) == [64, 128, 8]  # ggml ne = {n_embd, 2*n_ff_exp, n_expert}
    gate, up = (
        np.asarray(split["blk.1.ffn_gate_exps.weight"].data),
        np.asarray(split["blk.1.ffn_up_exps.weight"].data),
    )
    np.testing.assert_array_equal(np.asarray(gu.data), np.concatenate([gate, up], axis=1))  # gate half first
    assert list(split["blk.1.exp_probs_b.bias"].shape) == [8]
    assert list(split["blk.1.ffn_gate_shexp.weight"].shape) == [64, 64]
    assert generate(tiny_model("deepseek2"))[0] == generate(tiny_model("deepseek2-merged"))[0]


def test_arch_specific_tensors(tiny_model) -> None:
    qwen2 = tensors(tiny_model("qwen2moe"))
    assert list(qwen2["blk.0.ffn_gate_inp_shexp.weight"].shape) == [64]
    assert "blk.0.ffn_down_shexp.weight" in qwen2
    oss = tensors(tiny_model("gpt-oss"))
    assert list(oss["blk.0.ffn_gate_exps.bias"].shape) == [64, 8]
    assert list(oss["blk.0.attn_sinks.weight"].shape) == [4]
    assert "blk.0.attn_q_norm.weight" in tensors(tiny_model("qwen3moe"))


def test_quantized_files_quantize_the_experts(tiny_model) -> None:
    t = tensors(tiny_model("qwen3moe", "q8_0"))
    assert t["blk.0.ffn_up_exps.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert t["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert t["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16


@contextlib.contextmanager
def no_extra_bufts() -> Iterator[None]:
    """Load without the CPU extra buffer types (AMX/repack), whose quantized kernels crash on AMX VMs."""
    lib = llama_cpp.llama_cpp
    orig = lib.llama_model_default_params

    def params() -> llama_cpp.llama_model_params:
        p = orig()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params  # Llama.__init__ looks it up at call time
    try:
        yield
    finally:
        lib.llama_model_default_params = orig


@pytest.mark.parametrize("arch", ["llama", "deepseek2"])
def test_fully_quantized_q4_0(arch: str, tmp_path: pathlib.Path) -> None:
    path = write_tiny_moe(tmp_path / "q4.gguf", arch, dtype="q4_0", quantize="all")
    assert tensors(path)["blk.1.attn_output.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    with no_extra_bufts():
        text, meta = generate(path)
    assert text.strip() and meta["general.file_type"] == "2"


def test_chat_completion(tiny_model) -> None:
    llm = llama_cpp.Llama(model_path=str(tiny_model("qwen2moe")), **COMMON)
    try:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
        out = llm.create_chat_completion(messages=messages, max_tokens=12, temperature=0.0)
        assert out["choices"][0]["message"]["role"] == "assistant"
        assert out["choices"][0]["message"]["content"].strip()
        # the ChatML control tokens are single tokens
        assert len(llm.tokenize(b"<|im_start|>", add_bos=False, special=True)) == 1
    finally:
        llm.close()


def test_tokenizer_round_trip(tiny_model) -> None:
    llm = llama_cpp.Llama(model_path=str(tiny_model("olmoe")), **COMMON)
    try:
        text = "Hello, world! The model reads text. \u00e9t\u00e9 \u2713\n"
        toks = llm.tokenize(text.encode(), add_bos=False)
        assert len(toks) < len(text.encode())  # merges are used
        assert llm.detokenize(toks).decode() == text
    finally:
        llm.close()


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_deterministic(tmp_path: pathlib.Path, dtype: str) -> None:
    a = write_tiny_moe(tmp_path / "a.gguf", "deepseek2", dtype=dtype, seed=3)
    b = write_tiny_moe(tmp_path / "b.gguf", "deepseek2", dtype=dtype, seed=3)
    c = write_tiny_moe(tmp_path / "c.gguf", "deepseek2", dtype=dtype, seed=4)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf", "c.gguf"]  # no temp left


def test_overrides_change_shape(tmp_path: pathlib.Path) -> None:
    path = write_tiny_moe(tmp_path / "m.gguf", "qwen3moe", n_layer=2, n_expert=16, n_expert_used=4, n_head=8)
    t = tensors(path)
    assert list(t["blk.1.ffn_down_exps.weight"].shape) == [64, 64, 16]
    assert "blk.2.attn_norm.weight" not in t
    assert generate(path, 4)[1]["qwen3moe.expert_used_count"] == "4"


def test_dense_model_is_not_moe(tiny_dense_model: pathlib.Path) -> None:
    text, meta = generate(tiny_dense_model)
    assert text.strip()
    assert "llama.expert_count" not in meta
    assert "blk.0.ffn_gate.weight" in tensors(tiny_dense_model)


def test_dense_writer_dtype(tmp_path: pathlib.Path) -> None:
    assert write_tiny_dense(tmp_path / "d.gguf", dtype="f32").stat().st_size > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"arch": "mixtral"},
        {"dtype": "bf16"},
        {"quantize": "some"},
        {"n_expert_used": 9},
        {"n_embd": 48, "dtype": "q8_0"},
        {"bogus_field": 1},
    ],
)
def test_bad_arguments_raise_spac_error(tmp_path: pathlib.Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(SpacError) as info:
        write_tiny_moe(tmp_path / "x.gguf", **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    assert not (tmp_path / "x.gguf").exists()


def test_dtypes_constant() -> None:
    assert DTYPES == ("f32", "f16", "q8_0")
