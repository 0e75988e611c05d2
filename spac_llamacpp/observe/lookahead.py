"""Layer lookahead: predict layer l+1's experts from layer l's output (the Mixtral-offloading trick).

While layer l computes, its output (``l_out-l``, the input of layer l+1) is nearly what layer l+1's
router will see after attention. Applying layer l+1's pre-FFN norm and router to it predicts the
experts layer l+1 will choose, early enough to prefetch them. This module reads the routers from
the GGUF, captures hidden states through a chained ``cb_eval`` tap, and measures the prediction
against the experts the model really chose (from the routing sensor).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.gguf.info import MoEModelInfo
from spac_llamacpp.native import module as native

_NORM_NAMES = ("ffn_norm", "post_attention_norm")  # the norm in front of the MoE, by architecture


@dataclass
class LayerRouter:
    """What layer l's router computes from its FFN input."""

    weight: np.ndarray  # [n_expert, n_embd]
    norm: np.ndarray  # [n_embd] RMSNorm weight in front of the FFN
    bias: np.ndarray | None  # exp_probs_b: selection-only bias on the probabilities
    sigmoid: bool
    k: int


class RouterSet:
    """The routers of every MoE layer of a GGUF model, dequantised to float32."""

    def __init__(self, routers: dict[int, LayerRouter], eps: float) -> None:
        self.routers, self.eps = routers, eps

    @classmethod
    def from_gguf(cls, info: MoEModelInfo) -> RouterSet:
        import gguf

        reader = gguf.GGUFReader(info.path)
        tensors = {t.name: t for t in reader.tensors}

        def f32(name: str) -> np.ndarray:
            t = tensors[name]
            return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
                tuple(int(x) for x in reversed(t.shape.tolist())))

        eps_field = reader.get_field(f"{info.architecture}.attention.layer_norm_rms_epsilon")
        eps = float(eps_field.contents()) if eps_field is not None else 1e-6
        routers: dict[int, LayerRouter] = {}
        for layer in info.moe_layers:
            norm_name = next((f"blk.{layer}.{n}.weight" for n in _NORM_NAMES if f"blk.{layer}.{n}.weight" in tensors),
                             None)
            if norm_name is None:
                raise SpacError(f"layer {layer} has no pre-FFN norm tensor; layer lookahead does not support "
                                f"{info.architecture}")
            bias_name = f"blk.{layer}.exp_probs_b.bias"
            routers[layer] = LayerRouter(
                weight=f32(f"blk.{layer}.ffn_gate_inp.weight").reshape(info.n_expert, -1),
                norm=f32(norm_name).reshape(-1),
                bias=f32(bias_name).reshape(-1) if bias_name in tensors else None,
                sigmoid=info.gating == "sigmoid",
                k=info.n_expert_used[layer],
            )
        return cls(routers, eps)

    def predict(self, layer: int, hidden: np.ndarray) -> np.ndarray:
        """``[n_tokens, k]`` experts layer ``layer`` would choose for FFN inputs ``hidden`` [n_tokens, n_embd]."""
        r = self.routers[layer]
        x = hidden / np.sqrt(np.mean(hidden * hidden, axis=1, keepdims=True) + self.eps) * r.norm
        scores = x @ r.weight.T
        if r.bias is not None:  # selection uses the biased probabilities, as llama.cpp does
            scores = (1.0 / (1.0 + np.exp(-scores)) if r.sigmoid else scores) + r.bias
        return np.argsort(-scores, axis=1, kind="stable")[:, : r.k]


class HiddenStateTap:
    """A ``cb_eval`` (chained behind the routing sensor) that copies ``<node>-<layer>`` outputs.

    ``node="l_out"`` captures layer outputs (lookahead input); ``node="ffn_inp"`` captures each
    layer's own FFN input (the router's exact input, for checking the router maths).
    """

    def __init__(self, n_layer: int, n_embd: int, node: str = "l_out", max_rows: int = 4096) -> None:
        self._mod = native.load()
        self.prefix = f"{node}-".encode()
        self.n_layer, self.n_embd, self.max_rows = n_layer, n_embd, max_rows
        self._buf = np.zeros((max_rows, n_embd), dtype=np.float32)
        self._ptr = self._mod.ffi.cast("float *", self._mod.ffi.from_buffer(self._buf))
        self.rows: dict[int, list[np.ndarray]] = {}
        self.errors = 0

    def __call__(self, t: int, ask: bool, user_data: Any) -> bool:
        ffi, lib = self._mod.ffi, self._mod.lib
        tensor = ffi.cast("struct ggml_tensor *", t)
        layer = lib.spac_node_layer(lib.spac_tensor_name(tensor), self.prefix)
        if ask:
            return 0 <= layer < self.n_layer
        n = lib.spac_tensor_copy_f32_rows(tensor, self._ptr, self.max_rows, self.n_embd)
        if n < 0:
            self.errors += 1
        else:
            self.rows.setdefault(layer, []).append(self._buf[:n].copy())
        return True

    def take(self) -> dict[int, np.ndarray]:
        """Rows captured since the last call, per layer, in token order."""
        out = {layer: np.concatenate(parts) for layer, parts in self.rows.items()}
        self.rows = {}
        return out


def overlap(pred: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Per token: the share of the actually chosen experts that were predicted (recall@k)."""
    hits = (pred[:, :, None] == actual[:, None, :]).any(axis=1) & (actual >= 0)
    return hits.sum(axis=1) / np.maximum((actual >= 0).sum(axis=1), 1)


@dataclass
class LookaheadReport:
    """Recall of the lookahead prediction per predicted layer, next to a temporal baseline."""

    per_layer: dict[int, float] = field(default_factory=dict)
    per_layer_previous_token: dict[int, float] = field(default_factory=dict)
    tokens: int = 0

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.per_layer.values()))) if self.per_layer else 0.0

    @property
    def mean_previous_token(self) -> float:
        vals = list(self.per_layer_previous_token.values())
        return float(np.mean(vals)) if vals else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "mean_recall": self.mean, "mean_recall_previous_token": self.mean_previous_token,
                "per_layer": self.per_layer, "per_layer_previous_token": self.per_layer_previous_token}
