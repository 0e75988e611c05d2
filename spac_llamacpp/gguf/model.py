"""What a GGUF header says about a model's routed experts: :class:`MoEModelInfo`, :class:`ExpertTensor`.

Layout facts (vendored llama.cpp src/llama-arch.cpp, src/llama-model.cpp, ggml/src/gguf.cpp):
``ne`` is in ggml order (``ne[0]`` is the fastest axis); the expert axis is the *last* axis of an
expert tensor (``ne[2]`` for weights, ``ne[1]`` for ``*_exps.bias``, ``ne[0]`` for ``*_exps.scale``),
so expert ``e`` of a tensor is the contiguous byte range
``[offset + e*bytes_per_expert, offset + (e+1)*bytes_per_expert)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from spac_llamacpp.gguf.header import GGUF_DEFAULT_ALIGNMENT, GGUF_VERSION


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
        """Bytes of ONE routed expert of ``layer``, all its tensors together (0 for a dense block); in
        ``spac inspect --json`` this is ``bytes_per_expert``, and ``layer_expert_bytes`` is the whole layer's.

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
            # per MoE layer: all its routed experts, and one of them (``layer_expert_bytes()`` is the latter)
            "layer_expert_bytes": {str(layer): self.layer_expert_bytes(layer) * self.n_expert
                                   for layer in self.moe_layers},
            "bytes_per_expert": {str(layer): self.layer_expert_bytes(layer) for layer in self.moe_layers},
            "notes": list(self.notes),
            "expert_tensors": [t.to_json() for t in self.expert_tensors],
        }
