"""Calibration activations: each layer's FFN input, captured from llama.cpp running the dense model.

The tap (``lookahead.HiddenStateTap``, a chained ``cb_eval``) copies the ``ffn_norm-<layer>`` node,
the RMS-normed, weighted input that the dense FFN (and later the MoE router and experts) sees.
The FFN intermediate activations are recomputed from these in numpy (``ffn.py``): exact for the
dequantised weights, and far cheaper than capturing ``[tokens, 8960]`` per layer from the graph.
``logits_all=True`` matters: without it the last layer computes only the rows that produce logits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from spac_llamacpp.base.errors import SpacError

log = logging.getLogger(__name__)

FFN_INPUT_NODE = "ffn_norm"


FFN_OUTPUT_NODE = "ffn_out"  # dense: the FFN's output; qwen2moe: routed + gated shared expert


class NodeTaps:
    """A ``cb_eval`` that copies several per-layer nodes (one ``HiddenStateTap`` per node name)."""

    def __init__(self, n_layer: int, n_embd: int, nodes: Sequence[str], max_rows: int) -> None:
        from spac_llamacpp.observe.lookahead import HiddenStateTap

        self.taps = {node: HiddenStateTap(n_layer, n_embd, node, max_rows=max_rows) for node in nodes}
        self._asked: HiddenStateTap | None = None

    def __call__(self, t: int, ask: bool, user_data: Any) -> bool:
        if ask:
            self._asked = next((tap for tap in self.taps.values() if tap(t, True, user_data)), None)
            return self._asked is not None
        return self._asked(t, False, user_data) if self._asked is not None else True

    @property
    def errors(self) -> int:
        return sum(tap.errors for tap in self.taps.values())


def capture_nodes(model_path: str | Path, chunks: Sequence[Sequence[int]], nodes: Sequence[str] = (FFN_INPUT_NODE,),
                  n_threads: int | None = None, progress: bool = True,
                  **llama_kwargs: Any) -> dict[str, dict[int, np.ndarray]]:
    """Run each token chunk through the model (fresh context each); return ``{node: {layer: [tokens, n_embd]}}``.

    Rows are in chunk order, then token order; every chunk must fit in one context.
    """
    from spac_llamacpp.gguf.info import read_model_header
    from spac_llamacpp.llama import Llama

    info = read_model_header(model_path)
    n_ctx = max(len(c) for c in chunks)
    taps = NodeTaps(info.block_count, info.n_embd, nodes, max_rows=n_ctx)
    llama_kwargs.setdefault("use_extra_bufts", False)  # see the AMX note in docs/architecture.md
    llm = Llama(str(model_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, cb_eval=taps,
                verbose=False, n_threads=n_threads, **llama_kwargs)
    parts: dict[str, dict[int, list[np.ndarray]]] = {node: {} for node in nodes}
    try:
        for chunk in tqdm(chunks, desc="capture", unit="chunk", disable=not progress):
            llm.reset()
            llm.eval(list(chunk))
            for node, tap in taps.taps.items():
                rows = tap.take()
                for layer in range(info.block_count):
                    got = rows.get(layer)
                    if got is None or len(got) != len(chunk):
                        raise SpacError(f"{node}-{layer}: captured {0 if got is None else len(got)} rows "
                                        f"for a chunk of {len(chunk)} tokens")
                    parts[node].setdefault(layer, []).append(got)
    finally:
        llm.close()
    if taps.errors:
        raise SpacError(f"could not read {taps.errors} captured tensors")
    return {node: {layer: np.concatenate(p) for layer, p in per.items()} for node, per in parts.items()}


def capture_ffn_inputs(model_path: str | Path, chunks: Sequence[Sequence[int]], n_threads: int | None = None,
                       **llama_kwargs: Any) -> dict[int, np.ndarray]:
    """``{layer: [tokens, n_embd]}`` FFN inputs of the token chunks (see :func:`capture_nodes`)."""
    return capture_nodes(model_path, chunks, (FFN_INPUT_NODE,), n_threads, **llama_kwargs)[FFN_INPUT_NODE]


def save_inputs(inputs: dict[int, np.ndarray], directory: Path) -> None:
    """Store captured inputs as ``layer_<l>.npy`` (written to a temp name, then renamed)."""
    directory.mkdir(parents=True, exist_ok=True)
    for layer, arr in inputs.items():
        tmp = directory / f"layer_{layer}.tmp.npy"
        np.save(tmp, arr.astype(np.float32))
        tmp.replace(directory / f"layer_{layer}.npy")


def load_inputs(directory: Path, n_layer: int) -> dict[int, np.ndarray] | None:
    """Inputs saved by :func:`save_inputs`, or None if any layer is missing."""
    paths = [directory / f"layer_{layer}.npy" for layer in range(n_layer)]
    if not all(p.is_file() for p in paths):
        return None
    return {layer: np.load(p) for layer, p in enumerate(paths)}
