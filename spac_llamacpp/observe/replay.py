"""Routing replay: force a model's expert selection to a recorded trace's (issue 14).

``Llama(..., routing_replay=TRACE)`` / ``spac-run MODEL --replay TRACE``: in every MoE layer, the token at
context position t selects the experts that token t of the trace selected, so the whole runtime (sensor,
estimator, balancer, flash engine, I/O) runs on real routing, e.g. on a random-weight model with a real
model's shapes (``spac synth``). The outputs are meaningless (the experts are forced, the weights are
random); the timings are real.

Mechanism (``native/spac_replay.c``): the routing sensor's graph callback rewrites each layer's router
probabilities (``ffn_moe_probs-l``) so that top-k picks exactly the trace's experts, in the trace's order,
and restores them at ``ffn_moe_topk-l``, so that the mixing weights are the model's own probabilities of the
forced experts (the trace format keeps no gating probabilities). Host and device buffers alike.

Rules:

- Position t of the context takes trace token t (the prompt's first token is position 0; llama-cpp-python
  re-evaluates only what follows a cached prefix, at its absolute positions; a reset starts again at 0).
  Speculative verification batches take the trace tokens at their positions; rejected drafts' positions
  are forced again when they are re-evaluated.
- Past the trace's end, ``replay_end="cycle"`` (default) continues with the trace's tokens after its
  prompt step (its first step, when that evaluated more than one token; else from its first token);
  ``"stop"`` ends generation before the first evaluation that would start past the end
  (:class:`ReplayEnded` from ``Llama.eval``; ``Llama.generate`` returns). An evaluation that straddles
  the end (a longer prompt, a verification batch) leaves its positions past the end to the model's own routing.
- Missing cells: a (token, layer) the trace has no ids for (``-1``: e.g. prompt rows the recording's
  last layer did not compute, or an imported trace's holes) repeats the experts of the most recent earlier
  trace token that has that layer; before the first such token, the model chooses. A cell with fewer ids
  than top-k forces those and leaves the remaining slots to the model.
- MoE layers are matched in order (the trace's i-th MoE layer drives the model's i-th); their count, the
  experts per layer and top-k must agree (one-line :class:`SpacError` naming both sides).
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from spac_llamacpp.base.errors import NotMoEError, SpacError
from spac_llamacpp.gguf.info import MoEModelInfo
from spac_llamacpp.native import module as native
from spac_llamacpp.native.sensor import RoutingSensor
from spac_llamacpp.observe.routing import RoutingLog
from spac_llamacpp.observe.trace import RoutingTrace

REPLAY_ENDS = ("cycle", "stop")
MEANINGLESS = "output text is meaningless"
_UNSUPPORTED_ARCHS = ("llama4", "grovemoe")  # their selection does not read ffn_moe_probs


class ReplayEnded(SpacError):
    """An evaluation would start past the trace's end with ``replay_end="stop"``."""


class RoutingReplay:
    """A trace forced onto one model's routing sensor.

    Args:
        sensor: the model's routing sensor (the rewrite runs in its callback).
        info: the model header.
        trace: the trace to replay (checked with :meth:`RoutingTrace.check`).
        end: ``"cycle"`` or ``"stop"`` (see the module docstring).
        name: how messages and stats name the trace (its path).
        history: evaluation positions kept (:meth:`position_of`).
    """

    def __init__(self, sensor: RoutingSensor, info: MoEModelInfo, trace: RoutingTrace, end: str = "cycle",
                 name: str = "trace", history: int | None = 4096) -> None:
        if end not in REPLAY_ENDS:
            raise SpacError(f"replay_end must be 'cycle' or 'stop', not {end!r}")
        if info.architecture in _UNSUPPORTED_ARCHS:
            raise SpacError(f"routing replay does not support {info.architecture}: its selection does not read "
                            "the router probabilities")
        trace.check()
        check_shape(trace, info, sensor.k_max, name)
        if trace.n_tokens == 0:
            raise SpacError(f"routing replay: {name} has no tokens")
        self.name, self.end, self.trace_tokens = name, end, trace.n_tokens
        self.ids, self.filled_cells = fill_missing(trace.ids[:, np.asarray(trace.moe_layers, np.int64), :])
        self.layer_moe = np.full(sensor.n_layer, -1, np.int32)
        self.layer_moe[list(info.moe_layers)] = np.arange(len(info.moe_layers), dtype=np.int32)
        first = int(trace.step_n_tokens[0]) if trace.n_steps else 0
        self.cycle_start = first if 1 < first < trace.n_tokens else 0
        self.ended = False
        self._positions: deque[tuple[int, int]] = deque(maxlen=history)  # (sensor token, context position)
        self._sensor = sensor

        ffi = native.load().ffi
        c = ffi.new("spac_replay *")
        c.ids = ffi.cast("int16_t *", ffi.from_buffer(self.ids))
        c.layer_moe = ffi.cast("int32_t *", ffi.from_buffer(self.layer_moe))
        c.n_tokens, c.n_moe, c.k = self.ids.shape
        c.cycle_start = self.cycle_start if end == "cycle" else -1
        c.last_layer = -1
        self._c = c
        sensor._struct.replay = c  # its scratch is freed with the sensor (spac_sensor_release)

    def begin(self, position: int) -> None:
        """Before an evaluation whose first token sits at context ``position``; raises :class:`ReplayEnded`
        with ``end="stop"`` when that is past the trace's end."""
        if self.end == "stop" and position >= self.trace_tokens:
            self.ended = True
            raise ReplayEnded(f"routing replay: {self.name} ends at token {self.trace_tokens} (replay_end='stop')")
        c = self._c
        c.position, c.ubatch_rows, c.last_layer = int(position), 0, -1
        self._positions.append((self._sensor.n_tokens, int(position)))

    def position_of(self, first_token: int) -> int | None:
        """Context position of the evaluation whose first token the sensor numbered ``first_token``
        (``RoutingStep.first_token``), if still kept."""
        for tok, pos in reversed(self._positions):
            if tok == first_token:
                return pos
        return None

    def trace_token(self, position: int) -> int:
        """The trace token a context position takes (-1: none, the model routes)."""
        return int(native.load().lib.spac_replay_token(self._c, int(position)))

    def stats(self) -> dict[str, Any]:
        c = self._c
        return {
            "trace": self.name,
            "trace_tokens": self.trace_tokens,
            "end": self.end,
            "cycle_start": self.cycle_start if self.end == "cycle" else None,
            "rows_forced": int(c.n_rows_forced),
            "rows_free": int(c.n_rows_free),
            "rows_wrapped": int(c.n_rows_wrapped),
            "mismatched_rows": int(c.n_mismatch),
            "filled_cells": self.filled_cells,
            "ended": self.ended,
            "note": MEANINGLESS,
        }

    summary = stats


def check_shape(trace: RoutingTrace, info: MoEModelInfo, k: int, name: str) -> None:
    """One-line SpacError unless the trace's MoE layers, experts and top-k are the model's."""
    layout = trace.layout
    trace_k = layout.n_expert_used if layout is not None else int(trace.ids.shape[2])
    theirs = (len(trace.moe_layers), trace.n_expert, trace_k)
    ours = (len(info.moe_layers), info.n_expert, k)
    if theirs != ours:
        raise SpacError(f"routing replay: trace {name} has {theirs[0]} MoE layers x {theirs[1]} experts, "
                        f"top-{theirs[2]}, but model {info.path.name} has {ours[0]} MoE layers x {ours[1]} "
                        f"experts, top-{ours[2]}")


def fill_missing(ids: np.ndarray) -> tuple[np.ndarray, int]:
    """``ids [tokens, moe layers, k]`` as int16 with each empty cell (all -1) repeating the most recent
    earlier token's cell of the same layer (cells before any stay -1); and how many cells were filled."""
    ids = np.ascontiguousarray(ids, dtype=np.int16)
    n_tok, n_moe, _ = ids.shape
    have = (ids >= 0).any(axis=2)
    src = np.where(have, np.arange(n_tok)[:, None], -1)
    np.maximum.accumulate(src, axis=0, out=src)
    fill = ~have & (src >= 0)
    if fill.any():
        t, layer = np.nonzero(fill)
        ids[t, layer] = ids[src[t, layer], layer]
    return ids, int(fill.sum())


def attach_replay(model_path: str, info: MoEModelInfo, sensor: RoutingSensor | None, log: RoutingLog | None,
                  source: str | Path | RoutingTrace | None, end: str = "cycle", *,
                  cache_prior: bool = False) -> RoutingReplay | None:
    """``Llama(routing_replay=...)``: load and check the trace, install it in the sensor (None: no replay)."""
    if source is None:
        return None
    if sensor is None:
        if info.n_expert == 0:
            raise NotMoEError(f"{model_path} is a dense model; routing replay needs a Mixture-of-Experts GGUF")
        raise SpacError("routing_replay needs routing=True: the replay runs in the routing sensor")
    if cache_prior:
        raise SpacError("routing_replay and cache_prior both rewrite the router probabilities; use one")
    if isinstance(source, RoutingTrace):
        trace, name = source, "in-memory trace"
    else:
        trace, name = RoutingTrace.load(source), str(source)
    replay = RoutingReplay(sensor, info, trace, end, name)
    if log is not None:
        log.replay = replay
    return replay
