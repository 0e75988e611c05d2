"""Routing traces: what every token routed to, step by step, saved as ``.npz``.

A trace is the input of every offline tool (utility estimators, the policy simulator): it keeps the
per-token expert ids of every MoE layer, which step (evaluation call) each token belonged to, the
evaluated token ids and the per-step (layer, expert) counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.observe.routing import RoutingLog

if TYPE_CHECKING:
    from spac_llamacpp.speculation.tracker import SpeculationTracker

TRACE_VERSION = 1


@dataclass
class RoutingTrace:
    """Per-token routing of a run.

    ``ids[t, l, j]`` is the j-th expert chosen by token t in layer l (-1: not observed, e.g. dense
    layers, or rows the last layer skipped because no logits were requested for them).
    """

    ids: np.ndarray  # [n_tokens, n_layer, k] int16
    token_step: np.ndarray  # [n_tokens] int32: step index of each token
    step_n_tokens: np.ndarray  # [n_steps] int32
    counts: np.ndarray  # [n_steps, n_layer, n_expert] int32
    moe_layers: np.ndarray  # [n_moe_layers] int32
    n_expert: int
    meta: dict[str, Any] = field(default_factory=dict)
    step_n_draft: np.ndarray | None = None  # [n_steps] int32: drafts verified in the step (0: plain step)
    step_accepted: np.ndarray | None = None  # [n_steps] int32: drafts accepted (-1: unknown)

    @property
    def n_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def n_steps(self) -> int:
        return int(self.step_n_tokens.shape[0])

    @classmethod
    def from_log(cls, log: RoutingLog, meta: dict[str, Any] | None = None,
                 speculation: SpeculationTracker | None = None) -> RoutingTrace:
        """Build a trace from a log that kept every step with its ids (``history=None``).

        With ``speculation`` (kept with ``history=None`` too), each step also records its draft length
        and how many drafts the target accepted.
        """
        steps = list(log.steps)
        if log.n_steps != len(steps) or any(s.ids is None for s in steps):
            raise SpacError("the routing log dropped steps or ids; record traces with routing_history=None")
        k = log.sensor.k_max
        if steps:
            ids = np.concatenate([s.ids for s in steps]).astype(np.int16)  # type: ignore[misc]
            token_step = np.concatenate([np.full(s.n_tokens, s.index, np.int32) for s in steps])
            counts = np.stack([s.counts for s in steps]).astype(np.int32)
        else:
            ids = np.zeros((0, log.n_layer, k), np.int16)
            token_step = np.zeros(0, np.int32)
            counts = np.zeros((0, log.n_layer, log.n_expert), np.int32)
        n_draft = accepted = None
        if speculation is not None:
            index = {s.index: i for i, s in enumerate(steps)}
            n_draft = np.zeros(len(steps), np.int32)
            accepted = np.zeros(len(steps), np.int32)
            for fmap in speculation.maps:
                if fmap.step in index:
                    n_draft[index[fmap.step]] = fmap.n_draft
                    accepted[index[fmap.step]] = -1 if fmap.accepted is None else fmap.accepted
        return cls(
            step_n_draft=n_draft,
            step_accepted=accepted,
            ids=ids,
            token_step=token_step,
            step_n_tokens=np.array([s.n_tokens for s in steps], np.int32),
            counts=counts,
            moe_layers=np.array(log.moe_layers, np.int32),
            n_expert=log.n_expert,
            meta=dict(meta or {}),
        )

    def save(self, path: str | Path) -> Path:
        """Write the trace as a compressed ``.npz``."""
        path = Path(path)
        meta = {"version": TRACE_VERSION, "n_expert": self.n_expert, **self.meta}
        optional = {}
        if self.step_n_draft is not None and self.step_accepted is not None:
            optional = {"step_n_draft": self.step_n_draft, "step_accepted": self.step_accepted}
        with path.open("wb") as fh:
            np.savez_compressed(
                fh,
                **optional,
                ids=self.ids,
                token_step=self.token_step,
                step_n_tokens=self.step_n_tokens,
                counts=self.counts,
                moe_layers=self.moe_layers,
                meta=np.array(json.dumps(meta)),
            )
        return path

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        """Read a trace written by :meth:`save`; a wrong or damaged file is a one-line SpacError."""
        path = Path(path)
        if not path.is_file():
            raise SpacError(f"trace file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                trace = cls(
                    ids=z["ids"],
                    token_step=z["token_step"],
                    step_n_tokens=z["step_n_tokens"],
                    counts=z["counts"],
                    moe_layers=z["moe_layers"],
                    n_expert=int(meta.pop("n_expert")),
                    meta=meta,
                    step_n_draft=z["step_n_draft"] if "step_n_draft" in z.files else None,
                    step_accepted=z["step_accepted"] if "step_accepted" in z.files else None,
                )
        except (OSError, KeyError, ValueError, EOFError) as exc:
            raise SpacError(
                f"{path} is not a spac routing trace ({type(exc).__name__}); record one with `spac trace`"
            ) from exc
        if trace.meta.get("version") != TRACE_VERSION:
            raise SpacError(f"{path}: trace version {trace.meta.get('version')} is not {TRACE_VERSION}; re-record it")
        return trace
