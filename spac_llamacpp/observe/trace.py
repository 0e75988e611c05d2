"""Routing traces: what every token routed to, step by step, saved as ``.npz``.

A trace is the input of every offline tool (utility estimators, the policy simulator): it keeps the
per-token expert ids of every MoE layer, which step (evaluation call) each token belonged to, the
evaluated token ids and the per-step (layer, expert) counts.
"""

from __future__ import annotations

import json
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spac_llamacpp.base.atomic import atomic_output
from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.observe.routing import RoutingLog

if TYPE_CHECKING:
    from spac_llamacpp.speculation.tracker import SpeculationTracker

TRACE_VERSION = 1
MAX_TRACE_EXPERTS = int(np.iinfo(np.int16).max)  # expert ids are int16
_ARRAYS = (("ids", 3), ("token_step", 1), ("step_n_tokens", 1), ("counts", 3), ("moe_layers", 1))
_DRAFT_ARRAYS = ("step_n_draft", "step_accepted")


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
            if eb is not None and not isinstance(eb, list):
                raise TypeError(f"expert_bytes is a {type(eb).__name__}, not a list")
            layout = cls(
                n_expert=_count(d["n_expert"]),
                n_expert_used=_count(d["n_expert_used"]),
                expert_bytes=None if eb is None else tuple(_count(b) for b in eb),
                non_expert_bytes=None if neb is None else _count(neb),
            )
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as exc:
            raise SpacError(f"the trace's recorded layout is damaged ({type(exc).__name__}: {str(exc)[:80]})") from exc
        if layout.expert_bytes is not None and any(b < 0 for b in layout.expert_bytes):
            raise SpacError("the trace's recorded layout has a negative expert size")
        if layout.non_expert_bytes is not None and layout.non_expert_bytes < 0:
            raise SpacError("the trace's recorded layout has a negative non-expert size")
        if not 1 <= layout.n_expert_used <= max(layout.n_expert, 1):
            raise SpacError(f"the trace's recorded layout routes {layout.n_expert_used} of {layout.n_expert} experts")
        return layout


def _count(v: Any) -> int:
    """An integer field of a recorded layout (integers and integral floats; not booleans or strings)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError(f"{json.dumps(v)[:40]} is not a number")
    if isinstance(v, float) and not v.is_integer():
        raise ValueError(f"{v} is not an integer")
    return int(v)


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
        """Raise a one-line SpacError unless the arrays are consistent (shapes, steps, ids, counts, meta)."""
        for name, ndim in _ARRAYS:
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.ndim != ndim or a.dtype.kind not in "iu":
                what = f"a {a.ndim}-D {a.dtype} array" if isinstance(a, np.ndarray) else type(a).__name__
                raise SpacError(f"trace: {name} is {what}, expected a {ndim}-D integer array")
        if isinstance(self.n_expert, bool) or not isinstance(self.n_expert, int | np.integer) \
                or not 1 <= self.n_expert <= MAX_TRACE_EXPERTS:
            raise SpacError(f"trace: n_expert is {self.n_expert!r}, not an expert count in 1..{MAX_TRACE_EXPERTS}")
        n_tok, n_layer, _ = self.ids.shape
        if self.step_n_tokens.size and int(self.step_n_tokens.min()) < 0:
            raise SpacError("trace: a step has a negative number of tokens")
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
        if len(np.unique(self.moe_layers)) != len(self.moe_layers):
            raise SpacError("trace: a MoE layer is listed twice")
        if not np.array_equal(step_counts(self.ids, self.token_step, self.n_steps, self.n_expert), self.counts):
            raise SpacError("trace: per-step counts are not the histogram of the steps' ids")
        self._check_drafts()
        self._check_meta()
        _ = self.layout  # validates the recorded layout, if any

    def _check_drafts(self) -> None:
        if (self.step_n_draft is None) != (self.step_accepted is None):
            raise SpacError("trace: step_n_draft and step_accepted come together")
        if self.step_n_draft is None or self.step_accepted is None:
            return
        for name, a in (("step_n_draft", self.step_n_draft), ("step_accepted", self.step_accepted)):
            if not isinstance(a, np.ndarray) or a.shape != (self.n_steps,) or a.dtype.kind not in "iu":
                raise SpacError(f"trace: {name} is not one integer per step ({self.n_steps} steps)")
        n_draft, accepted = self.step_n_draft.astype(np.int64), self.step_accepted.astype(np.int64)
        if self.n_steps and (int(n_draft.min()) < 0 or int((accepted < -1).sum()) or int((accepted > n_draft).sum())):
            raise SpacError("trace: a step's draft length is negative or fewer than its accepted drafts")

    def _check_meta(self) -> None:
        if not isinstance(self.meta, dict):
            raise SpacError(f"trace: meta is a {type(self.meta).__name__}, not a JSON object")
        runs = self.meta.get("runs")
        if runs is None:
            return
        if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
            raise SpacError("trace: meta 'runs' is not a list of objects")
        for r in runs:
            for key in ("first_step", "start_step"):
                v = r.get(key)
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= self.n_steps):
                    raise SpacError(f"trace: a run's {key} is {json.dumps(v)[:40]}, not a step of the trace")

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

    def first_layers(self, n: int) -> RoutingTrace:
        """The trace of its first ``n`` MoE layers only (the blocks after the n-th MoE layer dropped).

        For replaying a public trace on a shallower model of the same expert shape (``spac synth
        --layers N``): the kept layers' routing is unchanged, ``meta["first_layers"]`` records the cut.
        """
        n_moe = len(self.moe_layers)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= n_moe:
            raise SpacError(f"trace: cannot keep the first {n} MoE layers of {n_moe}; pass 1..{n_moe}")
        blocks = int(self.moe_layers[n - 1]) + 1
        meta = json.loads(json.dumps(self.meta))  # a deep copy of a JSON object
        layout = self.layout
        if layout is not None:
            meta["layout"] = TraceLayout(layout.n_expert, layout.n_expert_used,
                                         None if layout.expert_bytes is None else layout.expert_bytes[:n],
                                         None).to_json()  # the source's dense bytes were the whole model's
        meta["first_layers"] = {"kept": n, "of": n_moe}
        out = RoutingTrace(self.ids[:, :blocks].copy(), self.token_step.copy(), self.step_n_tokens.copy(),
                           self.counts[:, :blocks].copy(), self.moe_layers[:n].copy(), self.n_expert, meta,
                           None if self.step_n_draft is None else self.step_n_draft.copy(),
                           None if self.step_accepted is None else self.step_accepted.copy())
        out.check()
        return out

    def save(self, path: str | Path) -> Path:
        """Write the trace as a compressed ``.npz``."""
        path = Path(path)
        meta = {"version": TRACE_VERSION, "n_expert": self.n_expert, **self.meta}
        optional = {}
        if self.step_n_draft is not None and self.step_accepted is not None:
            optional = {"step_n_draft": self.step_n_draft, "step_accepted": self.step_accepted}
        with atomic_output(path) as tmp, tmp.open("wb") as fh:  # whole or not at all (base/atomic.py)
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
        """Read a trace written by :meth:`save` and check it (:meth:`check`); a wrong or damaged file is a
        one-line SpacError."""
        path = Path(path)
        if not path.is_file():
            raise SpacError(f"trace file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                if not isinstance(z, np.lib.npyio.NpzFile):
                    raise ValueError("a single array, not an archive of arrays")
                files = set(z.files)
                missing = [k for k in ("meta", *(name for name, _ in _ARRAYS)) if k not in files]
                if missing:
                    raise KeyError(", ".join(missing))
                meta = json.loads(str(z["meta"][()]))
                if not isinstance(meta, dict):
                    raise ValueError(f"meta is a {type(meta).__name__}, not a JSON object")
                arrays = {name: z[name] for name in (*(n for n, _ in _ARRAYS), *_DRAFT_ARRAYS) if name in files}
        except (OSError, EOFError, KeyError, ValueError, TypeError, IndexError, OverflowError, MemoryError,
                NotImplementedError, RuntimeError, zipfile.BadZipFile, zlib.error, struct.error) as exc:
            # (what np.load, zipfile and the npy reader raise for a damaged archive, a member of an
            # unsupported compression or encryption, or a header claiming impossible sizes)
            raise SpacError(
                f"{path} is not a spac routing trace ({type(exc).__name__}: {str(exc)[:80]}); "
                "record one with `spac trace`"
            ) from None
        if meta.get("version") != TRACE_VERSION:
            raise SpacError(f"{path}: trace version {str(meta.get('version'))[:20]} is not {TRACE_VERSION}; "
                            "re-record it")
        n_expert = meta.pop("n_expert", None)
        if isinstance(n_expert, bool) or not isinstance(n_expert, int):
            raise SpacError(f"{path}: the trace's n_expert is {json.dumps(n_expert)[:40]}, not an integer; "
                            "re-record it")
        trace = cls(
            ids=arrays["ids"],
            token_step=arrays["token_step"],
            step_n_tokens=arrays["step_n_tokens"],
            counts=arrays["counts"],
            moe_layers=arrays["moe_layers"],
            n_expert=n_expert,
            meta=meta,
            step_n_draft=arrays.get("step_n_draft"),
            step_accepted=arrays.get("step_accepted"),
        )
        try:
            trace.check()
        except SpacError as exc:
            raise SpacError(f"{path} is a damaged routing trace ({exc}); re-record it") from None
        return trace


def step_counts(ids: np.ndarray, token_step: np.ndarray, n_steps: int, n_expert: int) -> np.ndarray:
    """``counts [n_steps, n_layer, n_expert]`` int32: how many tokens of each step chose each expert."""
    n_layer = ids.shape[1]
    t, layer, j = np.nonzero(ids >= 0)
    flat = (token_step[t].astype(np.int64) * n_layer + layer) * n_expert + ids[t, layer, j]
    return np.bincount(flat, minlength=n_steps * n_layer * n_expert).astype(np.int32).reshape(
        n_steps, n_layer, n_expert)
