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


@dataclass(frozen=True)
class TraceLayout:
    """The expert layout a trace's source recorded (``meta["layout"]``, e.g. of an imported trace).

    Enough to replay the trace without the model file: ``expert_bytes[i]`` is the size of one expert of
    MoE layer ``moe_layers[i]`` (None: the source recorded no sizes), ``non_expert_bytes`` the rest of
    the model where the source says (dense weights), else None.
    """

    n_expert: int
    n_expert_used: int
    expert_bytes: tuple[int, ...] | None = None
    non_expert_bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "n_expert": self.n_expert,
            "n_expert_used": self.n_expert_used,
            "expert_bytes": None if self.expert_bytes is None else list(self.expert_bytes),
            "non_expert_bytes": self.non_expert_bytes,
        }

    @classmethod
    def from_json(cls, d: Any) -> TraceLayout:
        try:
            eb = d.get("expert_bytes")
            neb = d.get("non_expert_bytes")
            layout = cls(
                n_expert=int(d["n_expert"]),
                n_expert_used=int(d["n_expert_used"]),
                expert_bytes=None if eb is None else tuple(int(b) for b in eb),
                non_expert_bytes=None if neb is None else int(neb),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise SpacError(f"the trace's recorded layout is damaged ({type(exc).__name__}: {exc})") from exc
        if layout.expert_bytes is not None and any(b < 0 for b in layout.expert_bytes):
            raise SpacError("the trace's recorded layout has a negative expert size")
        return layout


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

    @property
    def layout(self) -> TraceLayout | None:
        """The expert layout the source recorded (imported traces), or None (recorded: read the model)."""
        if self.meta.get("layout") is None:
            return None
        layout = TraceLayout.from_json(self.meta["layout"])
        if layout.n_expert != self.n_expert:
            raise SpacError(f"the trace's recorded layout has {layout.n_expert} experts, the trace {self.n_expert}")
        if layout.expert_bytes is not None and len(layout.expert_bytes) != len(self.moe_layers):
            raise SpacError(f"the trace's recorded layout sizes {len(layout.expert_bytes)} layers, "
                            f"the trace has {len(self.moe_layers)} MoE layers")
        return layout

    def check(self) -> None:
        """Raise a one-line SpacError unless the arrays are consistent (shapes, steps, ids, counts)."""
        n_tok, n_layer, _ = self.ids.shape
        if self.token_step.shape != (n_tok,) or int(self.step_n_tokens.sum()) != n_tok:
            raise SpacError(f"trace: {n_tok} tokens but {self.token_step.shape[0]} token steps and "
                            f"{int(self.step_n_tokens.sum())} tokens counted per step")
        expected = np.repeat(np.arange(self.n_steps, dtype=np.int32), self.step_n_tokens)
        if not np.array_equal(self.token_step, expected):
            raise SpacError("trace: token_step does not number the steps' tokens in order")
        if self.counts.shape != (self.n_steps, n_layer, self.n_expert):
            raise SpacError(f"trace: counts are {self.counts.shape}, expected {(self.n_steps, n_layer, self.n_expert)}")
        if self.ids.size and (int(self.ids.max()) >= self.n_expert or int(self.ids.min()) < -1):
            raise SpacError(f"trace: expert ids outside -1..{self.n_expert - 1}")
        if len(self.moe_layers) and not (int(self.moe_layers.min()) >= 0 and int(self.moe_layers.max()) < n_layer):
            raise SpacError(f"trace: MoE layers outside 0..{n_layer - 1}")
        if not np.array_equal(step_counts(self.ids, self.token_step, self.n_steps, self.n_expert), self.counts):
            raise SpacError("trace: per-step counts are not the histogram of the steps' ids")
        _ = self.layout  # validates the recorded layout, if any

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


def step_counts(ids: np.ndarray, token_step: np.ndarray, n_steps: int, n_expert: int) -> np.ndarray:
    """``counts [n_steps, n_layer, n_expert]`` int32: how many tokens of each step chose each expert."""
    n_layer = ids.shape[1]
    t, layer, j = np.nonzero(ids >= 0)
    flat = (token_step[t].astype(np.int64) * n_layer + layer) * n_expert + ids[t, layer, j]
    return np.bincount(flat, minlength=n_steps * n_layer * n_expert).astype(np.int32).reshape(
        n_steps, n_layer, n_expert)
