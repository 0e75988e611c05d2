"""Observed routing: per-step history of expert demand, built from the native sensor.

A *step* is one ``Llama.eval`` call: the prompt, one decoded token, or a speculative verification of
k draft tokens (k+1 tokens through every MoE layer at once). Each step keeps its per-(layer, expert)
counts, the per-token expert ids and the tokens per layer.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from spac_llamacpp.native.sensor import RoutingSensor


@dataclass(frozen=True)
class RoutingStep:
    """Routing of one evaluation step."""

    index: int
    """Step number since the log was created or reset."""
    first_token: int
    """Sensor token index of the step's first token."""
    n_tokens: int
    """Tokens evaluated in the step (k+1 for a verification of k drafts)."""
    counts: np.ndarray
    """``[n_layer, n_expert]`` int32: how many of the step's tokens chose each expert."""
    layer_tokens: np.ndarray
    """``[n_layer]`` int32: token rows observed per layer (0 for dense layers)."""
    ids: np.ndarray | None
    """``[n_tokens, n_layer, k]`` int32 expert ids per token (-1: not observed), if kept."""


class RoutingLog:
    """Routing observed by a :class:`RoutingSensor`, as a bounded history of steps.

    Args:
        sensor: the native sensor feeding this log.
        moe_layers: indices of the layers that have routed experts.
        history: steps kept (oldest dropped first); ``None`` keeps every step (for traces).
        keep_ids: also keep each step's per-token expert ids.
        expert_order: for a model reordered by ``spac patch``, the original expert id of each
            position per block; summaries then name original ids (counts and ids stay positional).
    """

    def __init__(
        self,
        sensor: RoutingSensor,
        moe_layers: tuple[int, ...],
        history: int | None = 1024,
        keep_ids: bool = True,
        expert_order: dict[int, tuple[int, ...]] | None = None,
    ) -> None:
        self.sensor = sensor
        self.expert_order = dict(expert_order or {})  # a `spac patch`ed model: position -> original id
        self.moe_layers = moe_layers
        self.keep_ids = keep_ids
        self.steps: deque[RoutingStep] = deque(maxlen=history)
        self._n_steps = 0
        self._step_start = 0
        self.replay: Any = None  # a RoutingReplay forcing this routing (observe/replay.py), named in summary()

    @property
    def n_layer(self) -> int:
        return self.sensor.n_layer

    @property
    def n_expert(self) -> int:
        return self.sensor.n_expert

    @property
    def n_steps(self) -> int:
        """Steps recorded since creation or :meth:`reset` (including those dropped from history)."""
        return self._n_steps

    @property
    def n_tokens(self) -> int:
        """Tokens routed since creation or :meth:`reset`."""
        return self.sensor.n_tokens

    @property
    def counts(self) -> np.ndarray:
        """``[n_layer, n_expert]`` int64 totals since creation or reset (live view, no copy)."""
        return self.sensor.total_counts

    @property
    def bad_ids(self) -> int:
        """Out-of-range expert ids the sensor dropped (always 0 for a sound model)."""
        return self.sensor.n_bad_ids

    def end_step(self) -> RoutingStep | None:
        """Close the current step (called after each evaluation); returns it, or None if empty."""
        self.sensor.flush()
        start, stop = self._step_start, self.sensor.n_tokens
        counts, layer_tokens = self.sensor.take_step()
        self._step_start = stop
        if stop == start:
            return None
        ids = None
        if self.keep_ids and stop - start <= self.sensor.capacity:
            ids = self.sensor.token_ids(start, stop)
        step = RoutingStep(self._n_steps, start, stop - start, counts, layer_tokens, ids)
        self.steps.append(step)
        self._n_steps += 1
        return step

    def original_id(self, layer: int, expert: int) -> int:
        """The expert's id in the model before ``spac patch`` reordered it (itself otherwise)."""
        order = self.expert_order.get(layer)
        return int(order[expert]) if order is not None else expert

    def history_counts(self, last: int | None = None) -> np.ndarray:
        """``[steps, n_layer, n_expert]`` counts of the last ``last`` kept steps (all if None)."""
        steps = list(self.steps)[-last:] if last else list(self.steps)
        if not steps:
            return np.zeros((0, self.n_layer, self.n_expert), dtype=np.int32)
        return np.stack([s.counts for s in steps])

    def reset(self) -> None:
        """Forget all recorded routing."""
        self.sensor.reset()
        self.steps.clear()
        self._n_steps = 0
        self._step_start = 0

    def summary(self, top: int = 4) -> dict[str, Any]:
        """Machine-readable summary: totals, per-layer hottest experts and load balance."""
        per_layer = []
        for layer in self.moe_layers:
            c = self.counts[layer].astype(np.float64)
            total = float(c.sum())
            if total == 0:
                per_layer.append({"layer": layer, "selections": 0})
                continue
            p = c / total
            nz = p[p > 0]
            order = np.argsort(-c, kind="stable")[:top]
            per_layer.append(
                {
                    "layer": layer,
                    "selections": int(total),
                    "experts_used": int((c > 0).sum()),
                    # original expert ids when the model was reordered by `spac patch`
                    "top_experts": [[self.original_id(layer, int(e)), int(c[e])] for e in order],
                    # 1.0 = perfectly uniform demand, lower = more skewed
                    "normalized_entropy": float(-(nz * np.log(nz)).sum() / np.log(len(c))),
                }
            )
        out = {
            "tokens": self.n_tokens,
            "steps": self.n_steps,
            "moe_layers": len(self.moe_layers),
            "n_expert": self.n_expert,
            "selections": int(self.counts.sum()),
            "bad_ids": self.bad_ids,
            "bad_events": self.sensor.n_bad_events,
            "layers": per_layer,
        }
        if self.replay is not None:
            out["replay"] = self.replay.summary()
        return out
