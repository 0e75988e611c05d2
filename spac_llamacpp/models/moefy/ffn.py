"""The FFN maths in numpy: the dense SwiGLU FFN and the qwen2moe MoE FFN exactly as llama.cpp mixes it.

Shapes follow gguf-py's numpy order: ``gate``/``up`` are ``[n_ff, n_embd]``, ``down`` is
``[n_embd, n_ff]``, inputs ``x`` are ``[tokens, n_embd]`` (the output of ``ffn_norm``).

How llama.cpp's qwen2moe combines the parts (``src/models/qwen2moe.cpp``, ``build_moe_ffn`` in
``src/llama-graph.cpp``):

* routed: ``probs = softmax(x @ ffn_gate_inp.T)`` over *all* experts, the top-k by probability are
  selected, and each selected expert's output is multiplied by its probability; qwen2moe passes
  ``norm_w=false`` and never loads ``expert_weights_scale``, so the weights are neither
  renormalised nor scaled;
* shared: ``sigmoid(x @ ffn_gate_inp_shexp) * swiglu_ffn_shexp(x)``, added to the routed sum.

A dense FFN is the plain sum of its neuron groups, so a MoEfied model wants every selected expert
and the shared expert at weight ~1. :class:`MoELayer` gets that by (1) a router temperature that makes
the softmax near-uniform (weights ``1/E * (1 +- spread)``) while keeping the ranking, (2) the
routed ``down`` matrices multiplied by ``down_scale = E``, and (3) a shared-expert gate whose logit is
large and positive for every calibration input, so the sigmoid rounds to 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def silu(z: np.ndarray) -> np.ndarray:
    """``z * sigmoid(z)`` without overflow warnings."""
    return z * (0.5 * (1.0 + np.tanh(0.5 * z)))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def activations(x: np.ndarray, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """FFN intermediate ``silu(x gate^T) * (x up^T)``: ``[tokens, n_ff]``."""
    return silu(x @ gate.T) * (x @ up.T)


def dense_ffn(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """The dense SwiGLU FFN: ``[tokens, n_embd]``."""
    return activations(x, gate, up) @ down.T


@dataclass
class MoELayer:
    """How one dense FFN layer is cut into a shared expert and ``E`` routed experts, plus its gates.

    Attributes:
        shared: neuron ids of the shared expert, ``[n_shared]``.
        experts: neuron ids of each routed expert, ``[E, n_ff_exp]``.
        router: ``ffn_gate_inp`` as stored (temperature applied), ``[E, n_embd]``.
        shared_gate: ``ffn_gate_inp_shexp``, ``[n_embd]``.
        down_scale: factor folded into the routed ``down`` matrices (``E``: undoes the 1/E softmax weight).
        down: refitted ``down`` matrix ``[n_embd, n_ff]`` (dense neuron order, before ``down_scale``), or
            None to keep the dense model's (see ``refit.py``).
    """

    shared: np.ndarray
    experts: np.ndarray
    router: np.ndarray
    shared_gate: np.ndarray
    down_scale: float
    down: np.ndarray | None = None

    @property
    def n_expert(self) -> int:
        return int(self.experts.shape[0])

    def save(self, path: str) -> None:
        extra = {} if self.down is None else {"down": self.down}
        np.savez(path, shared=self.shared, experts=self.experts, router=self.router, shared_gate=self.shared_gate,
                 down_scale=np.float64(self.down_scale), **extra)

    @classmethod
    def load(cls, path: str) -> MoELayer:
        with np.load(path) as z:
            down = z["down"] if "down" in z.files else None
            return cls(z["shared"], z["experts"], z["router"], z["shared_gate"], float(z["down_scale"]), down)


def route(x: np.ndarray, router: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's selection: ``(ids [tokens, k], weights [tokens, k])`` from softmax over all experts."""
    logits = (x @ router.T).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    ids = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(probs, ids, axis=1)


def moe_ffn(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray, layer: MoELayer, k: int,
            h: np.ndarray | None = None) -> np.ndarray:
    """The qwen2moe FFN llama.cpp computes for ``layer`` cut from the dense ``gate/up/down``, top-``k``.

    ``h`` (the dense activations of ``x``) may be passed to save recomputing them. The layer's
    refitted ``down``, if any, replaces the dense one.
    """
    if h is None:
        h = activations(x, gate, up)
    return mixed_activations(x, h, layer, k) @ (down if layer.down is None else layer.down).T


def mixed_activations(x: np.ndarray, h: np.ndarray, layer: MoELayer, k: int) -> np.ndarray:
    """``[tokens, n_ff]``: each neuron's activation times the factor llama.cpp applies to its expert.

    Shared neurons get the shared gate, neurons of a selected expert its routing weight times
    ``down_scale``, all others 0; the MoE output is this times ``down^T``.
    """
    ids, w = route(x, layer.router, k)
    factor = np.zeros((len(x), h.shape[1]), dtype=np.float32)
    factor[:, layer.shared] = sigmoid(x @ layer.shared_gate)[:, None]
    weight = np.zeros((len(x), layer.n_expert), dtype=np.float32)
    np.put_along_axis(weight, ids, (w * layer.down_scale).astype(np.float32), axis=1)
    for e, cols in enumerate(layer.experts):
        factor[:, cols] = weight[:, e, None]
    return h * factor


def relative_error(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over tokens of ``||approx - exact||^2 / ||exact||^2``.

    Per token, so that the few tokens with huge FFN outputs (the first token of a context, acting
    as an attention sink, has outputs ~100x the others) do not dominate.
    """
    err = np.sum((approx - exact) ** 2, axis=1)
    return float(np.mean(err / np.maximum(np.sum(exact**2, axis=1), 1e-30)))
