"""Reading the dense source model: its metadata, and its FFN weights dequantised to float32."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from spac_llamacpp.base.errors import SpacError

SUPPORTED_ARCHS = ("qwen2", "llama")
"""Dense architectures whose blocks qwen2moe can take over (llama needs its Q/K rows re-ordered for NEOX RoPE)."""


class DenseSource:
    """A dense GGUF (``qwen2`` or ``llama``) opened with gguf-py's memory-mapped reader."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.reader = gguf.GGUFReader(self.path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = str(self.field("general.architecture"))
        if self.arch not in SUPPORTED_ARCHS:
            raise SpacError(f"{self.path.name}: architecture {self.arch!r} is not one of {SUPPORTED_ARCHS}")
        if f"{self.arch}.expert_count" in self.reader.fields and int(self.field(f"{self.arch}.expert_count")) > 0:
            raise SpacError(f"{self.path.name} is already a Mixture-of-Experts model")
        self.n_layer = int(self.field(f"{self.arch}.block_count"))
        self.n_embd = int(self.field(f"{self.arch}.embedding_length"))
        self.n_ff = int(self.field(f"{self.arch}.feed_forward_length"))
        self.n_head = int(self.field(f"{self.arch}.attention.head_count"))
        self.n_head_kv = int(self.field(f"{self.arch}.attention.head_count_kv", self.n_head))
        self.head_dim = int(self.field(f"{self.arch}.attention.key_length", self.n_embd // self.n_head))
        self.n_rot = int(self.field(f"{self.arch}.rope.dimension_count", self.head_dim))
        self.rms_eps = float(self.field(f"{self.arch}.attention.layer_norm_rms_epsilon", 1e-6))

    def field(self, key: str, default: object = None) -> object:
        """A metadata value (``contents()``), or ``default`` when absent (SpacError if no default)."""
        f = self.reader.fields.get(key)
        if f is None:
            if default is None:
                raise SpacError(f"{self.path.name} lacks metadata key {key}")
            return default
        return f.contents()

    def array(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float32 in numpy shape order (dequantised if needed)."""
        t = self.tensors.get(name)
        if t is None:
            raise SpacError(f"{self.path.name} lacks tensor {name}")
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)

    def ffn(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(gate [n_ff, n_embd], up [n_ff, n_embd], down [n_embd, n_ff])`` of block ``layer``."""
        return tuple(self.array(f"blk.{layer}.ffn_{p}.weight") for p in ("gate", "up", "down"))  # type: ignore[return-value]
