"""Routing profiles: per-layer expert demand saved from real runs (``spac profile``), or from a trace.

A profile is a JSON file::

    {"format": "spac-profile", "version": 1, "model": "...", "n_expert": E, "moe_layers": [...],
     "counts": [[...E], ...],     # selections per MoE layer and expert, summed over the run
     "utility": [[...E], ...],    # the utility estimator's final state (expected selections per step)
     "tokens": N, "steps": S, ...}

``spac patch`` orders experts by it, and the flash tier can start from it instead of from nothing.
A routing trace (``spac trace -o t.npz``) can stand in for a profile: its counts are summed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spac_llamacpp.base.atomic import atomic_output
from spac_llamacpp.base.errors import SpacError

if TYPE_CHECKING:
    from spac_llamacpp.gguf.info import MoEModelInfo

FORMAT = "spac-profile"
VERSION = 1


@dataclass
class Profile:
    """Expert demand of one model (arrays are ``[n_moe_layer, n_expert]``)."""

    moe_layers: tuple[int, ...]
    n_expert: int
    counts: np.ndarray
    utility: np.ndarray | None = None
    tokens: int = 0
    steps: int = 0
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def score(self) -> np.ndarray:
        """What to rank experts by: the utility when saved, else the counts."""
        return self.utility if self.utility is not None else self.counts.astype(np.float64)

    def to_json(self) -> dict[str, Any]:
        out = {"format": FORMAT, "version": VERSION, "model": self.model, "n_expert": self.n_expert,
               "moe_layers": list(self.moe_layers), "counts": self.counts.astype(int).tolist(),
               "tokens": self.tokens, "steps": self.steps, **self.extra}
        if self.utility is not None:
            out["utility"] = np.round(self.utility, 6).tolist()
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        with atomic_output(path) as tmp:  # whole or not at all (base/atomic.py)
            tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path

    def check_model(self, moe_layers: tuple[int, ...], n_expert: int, what: str) -> None:
        """One-line error when this profile was made for another model layout."""
        if tuple(self.moe_layers) != tuple(moe_layers) or self.n_expert != n_expert:
            raise SpacError(
                f"the profile ({len(self.moe_layers)} MoE layers x {self.n_expert} experts) does not match {what} "
                f"({len(moe_layers)} x {n_expert}); make a profile of this model with `spac profile`"
            )


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """A profile JSON, or a routing trace ``.npz`` (counts summed over its steps)."""
    path = Path(path)
    if not path.is_file():
        raise SpacError(f"profile not found: {path}")
    if path.suffix == ".npz":
        from spac_llamacpp.observe.trace import RoutingTrace

        trace = RoutingTrace.load(path)
        layers = tuple(int(x) for x in trace.moe_layers)
        counts = trace.counts.sum(axis=0)[list(layers)].astype(np.int64)
        return Profile(layers, int(trace.n_expert), counts, None, int(trace.n_tokens), int(trace.n_steps),
                       str(trace.meta.get("model", "")))
    try:
        d = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        what = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise SpacError(f"{path} is not a profile (JSON from `spac profile`) or a trace (.npz): {what}") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise SpacError(f"{path} is not a spac profile; make one with `spac profile MODEL -o {path.name}`")
    try:
        if not isinstance(d["moe_layers"], list):
            raise TypeError("moe_layers is not a list")
        layers = tuple(_integer(x) for x in d["moe_layers"])
        n_expert = _integer(d["n_expert"])
        counts = np.asarray(d["counts"], dtype=np.int64)
        utility = np.asarray(d["utility"], dtype=np.float64) if "utility" in d else None
        tokens, steps = _integer(d.get("tokens", 0)), _integer(d.get("steps", 0))
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise SpacError(f"{path}: malformed profile ({type(exc).__name__}: {str(exc)[:80]}); "
                        "re-create it with `spac profile`") from None
    shape = (len(layers), n_expert)
    if counts.shape != shape or (utility is not None and utility.shape != shape):
        raise SpacError(f"{path}: profile arrays do not have the shape {shape}; re-create it with `spac profile`")
    if n_expert < 1 or min(layers, default=0) < 0 or len(set(layers)) != len(layers):
        raise SpacError(f"{path}: the profile's layers {list(layers)[:8]} or n_expert {n_expert} are not a model's; "
                        "re-create it with `spac profile`")
    if (counts < 0).any() or (utility is not None and not np.isfinite(utility).all()):
        raise SpacError(f"{path}: the profile has negative counts or non-finite utilities; re-create it with "
                        "`spac profile`")
    known = {"format", "version", "model", "n_expert", "moe_layers", "counts", "utility", "tokens", "steps"}
    return Profile(layers, n_expert, counts, utility, tokens, steps,
                   str(d.get("model", "")), {k: v for k, v in d.items() if k not in known})


def _integer(v: Any) -> int:
    """An integer field of a profile (not a boolean, a string or a fraction)."""
    if isinstance(v, bool) or not isinstance(v, int | float) or (isinstance(v, float) and not v.is_integer()):
        raise TypeError(f"{json.dumps(v)[:40]} is not an integer")
    return int(v)

def expected_demand(profile: str | os.PathLike[str] | Profile | None, info: MoEModelInfo,
                    n_expert_used: Sequence[int]) -> np.ndarray:
    """``[n_moe_layer, n_expert]`` expected selections per token to plan a first residency from: the
    profile's per-layer shares (checked against the model) times k, else uniform."""
    shape = (len(info.moe_layers), info.n_expert)
    share = np.full(shape, 1.0 / info.n_expert)
    if profile is not None:
        prof = load_profile(profile) if not isinstance(profile, Profile) else profile
        prof.check_model(tuple(info.moe_layers), info.n_expert, info.path.name)
        score = np.clip(prof.score(), 0.0, None)
        share = score / np.maximum(score.sum(axis=1, keepdims=True), 1e-12)
    return share * np.asarray(n_expert_used, dtype=np.float64)[:, None]

