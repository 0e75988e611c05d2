"""``spac lookahead``: measure how well layer l's output predicts layer l+1's experts (see
:mod:`spac_llamacpp.observe.lookahead`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.gguf.info import inspect_model
from spac_llamacpp.llama import Llama
from spac_llamacpp.observe.lookahead import HiddenStateTap, LookaheadReport, RouterSet, overlap
from spac_llamacpp.tools.generate import stream_generate


def measure(model_path: str | Path, prompts: list[str], n_predict: int = 64, node: str = "l_out",
            **llama_kwargs: Any) -> LookaheadReport:
    """Run ``prompts`` and measure how well layer l's ``node`` output predicts layer l+1's experts.

    With ``node="ffn_inp"`` the prediction uses each layer's own FFN input, which must reproduce the
    model's choice exactly (a check of :class:`RouterSet`).
    """
    info = inspect_model(model_path)
    routers = RouterSet.from_gguf(info)
    tap = HiddenStateTap(info.block_count, info.n_embd, node)
    llm = Llama(str(model_path), cb_eval=tap, logits_all=True, routing_history=None, **llama_kwargs)
    shift = 1 if node == "l_out" else 0
    recall: dict[int, list[np.ndarray]] = {}
    baseline: dict[int, list[np.ndarray]] = {}
    try:
        for prompt in prompts:
            llm.routing.reset()
            tap.take()
            previous: np.ndarray | None = None
            for _ in stream_generate(llm, prompt, n_predict):
                pass
            # rebuild per-step hidden states in step order: the tap saw every ubatch of every step
            hidden = tap.take()
            ids = np.concatenate([s.ids for s in llm.routing.steps])  # [tokens, n_layer, k]
            for layer in info.moe_layers:
                src = layer - shift
                if src not in hidden or len(hidden[src]) != len(ids):
                    continue
                actual = ids[:, layer, : info.n_expert_used[layer]]
                recall.setdefault(layer, []).append(overlap(routers.predict(layer, hidden[src]), actual))
                previous = np.roll(actual, 1, axis=0)
                baseline.setdefault(layer, []).append(overlap(previous[1:], actual[1:]))
    finally:
        llm.close()
    if tap.errors:
        raise SpacError(f"could not read {tap.errors} hidden-state tensors (not F32 rows?)")
    report = LookaheadReport()
    for layer, parts in recall.items():
        report.per_layer[layer] = float(np.concatenate(parts).mean())
        report.per_layer_previous_token[layer] = float(np.concatenate(baseline[layer]).mean())
        report.tokens = int(sum(len(p) for p in parts))
    return report
