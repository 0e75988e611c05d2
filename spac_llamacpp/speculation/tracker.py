"""Speculative steps as a lookahead sensor: frequency maps with their acceptance.

Verifying k draft tokens routes k+1 tokens through every MoE layer in one batch. Each such step
becomes a :class:`FrequencyMap`: per-(layer, expert) counts over the k+1 tokens, the per-token expert
ids, and, once the target has sampled, how many drafts were accepted. ``SpeculationTracker`` sits
between ``Llama.generate`` and the real draft provider: it learns each step's acceptance when the
next draft is requested (``Llama.generate`` has truncated its state to the accepted prefix by then),
feeds the adaptive draft length, and keeps a bounded ring of recent maps.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from llama_cpp.llama_speculative import LlamaDraftModel

from spac_llamacpp.observe.routing import RoutingStep
from spac_llamacpp.speculation.drafts import AdaptiveDraftLength

if TYPE_CHECKING:
    import llama_cpp


@dataclass
class FrequencyMap:
    """Expert demand of one evaluation step (a verification of ``n_draft`` drafts, or a plain step)."""

    step: int
    """Routing step index (``llm.routing.steps``)."""
    position: int
    """Context position of the step's first token."""
    n_tokens: int
    """Tokens evaluated: the last sampled token plus ``n_draft`` drafts (the whole prompt for a prompt)."""
    n_draft: int
    counts: np.ndarray
    """``[n_layer, n_expert]``: how many of the step's tokens chose each expert."""
    ids: np.ndarray | None
    """``[n_tokens, n_layer, k]`` expert ids per token (-1: not observed)."""
    accepted: int | None = None
    """Drafts the target accepted; None while unknown (the step's tokens are not sampled yet)."""

    @property
    def accepted_mask(self) -> np.ndarray:
        """``[n_tokens]`` bool: the tokens on the true path (the first token and the accepted drafts)."""
        mask = np.zeros(self.n_tokens, dtype=bool)
        mask[: 1 + (self.accepted or 0) + (self.n_tokens - 1 - self.n_draft)] = True
        return mask

    def counts_where(self, mask: np.ndarray) -> np.ndarray:
        """``[n_layer, n_expert]`` counts over the tokens selected by ``mask`` (needs ``ids``)."""
        if self.ids is None:
            raise ValueError("this frequency map kept no per-token ids")
        n_expert = self.counts.shape[1]
        ids = self.ids[mask]  # [t, n_layer, k]
        out = np.zeros_like(self.counts)
        for layer in range(ids.shape[1]):
            row = ids[:, layer].ravel()
            out[layer] = np.bincount(row[row >= 0], minlength=n_expert)
        return out


class SpeculationTracker(LlamaDraftModel):
    """The draft model ``Llama.generate`` sees: delegates to ``inner`` and records acceptance.

    Args:
        llm: the target model (read for its current position).
        inner: the real draft provider (any ``LlamaDraftModel``).
        adaptive: draft-length controller; None keeps ``inner``'s length fixed.
        history: frequency maps kept (oldest dropped first).
    """

    def __init__(self, llm: llama_cpp.Llama, inner: LlamaDraftModel, adaptive: AdaptiveDraftLength | None = None,
                 history: int | None = 256) -> None:
        self.llm = llm
        self.inner = inner
        self.adaptive = adaptive
        self.maps: deque[FrequencyMap] = deque(maxlen=history)
        self.n_verifications = 0
        self.n_drafted = 0
        self.n_accepted = 0
        self._pending_draft = 0  # length of the draft handed out, not yet evaluated
        self._open: FrequencyMap | None = None  # evaluated, acceptance not yet known
        if adaptive is not None:
            self._set_inner_length(adaptive.k)

    @property
    def n_draft(self) -> int:
        """Draft length the next step will use."""
        return int(getattr(self.inner, "n_draft", getattr(self.inner, "num_pred_tokens", 0)))

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens over the resolved verifications."""
        return self.n_accepted / self.n_drafted if self.n_drafted else 0.0

    def __call__(self, input_ids: npt.NDArray[np.intc], /, **kwargs: Any) -> npt.NDArray[np.intc]:
        self._resolve_open()
        drafts = np.asarray(self.inner(input_ids, **kwargs), dtype=np.intc)
        if self.adaptive is not None:
            drafts = drafts[: self.adaptive.k]
        # a draft id outside the target's vocabulary would make llama_decode fail: never propose one
        bad = np.nonzero((drafts < 0) | (drafts >= self.llm.n_vocab()))[0]
        if len(bad):
            drafts = drafts[: bad[0]]
        self._pending_draft = len(drafts)
        return drafts

    def on_step(self, step: RoutingStep | None, position: int, n_tokens: int) -> None:
        """Called by ``Llama.eval`` after each evaluation of ``n_tokens`` tokens at ``position``."""
        self._open = None  # an unresolved step whose successor is not a draft request stays unknown
        n_draft = self._pending_draft if n_tokens == self._pending_draft + 1 else 0
        self._pending_draft = 0
        if step is None:
            return
        fmap = FrequencyMap(step.index, position, n_tokens, n_draft, step.counts, step.ids,
                            accepted=None if n_draft else 0)
        self.maps.append(fmap)
        if n_draft:
            self._open = fmap

    def _resolve_open(self) -> None:
        fmap, self._open = self._open, None
        if fmap is None:
            return
        # Llama.generate truncated n_tokens to the verified prefix before asking for the next draft
        accepted = int(np.clip(self.llm.n_tokens - fmap.position - 1, 0, fmap.n_draft))
        fmap.accepted = accepted
        self.n_verifications += 1
        self.n_drafted += fmap.n_draft
        self.n_accepted += accepted
        if self.adaptive is not None:
            self._set_inner_length(self.adaptive.update(fmap.n_draft, accepted))

    def _set_inner_length(self, k: int) -> None:
        if hasattr(self.inner, "n_draft"):
            self.inner.n_draft = k
        elif hasattr(self.inner, "num_pred_tokens"):  # llama_cpp.LlamaPromptLookupDecoding
            self.inner.num_pred_tokens = k

    def summary(self) -> dict[str, Any]:
        return {
            "verifications": self.n_verifications,
            "drafted": self.n_drafted,
            "accepted": self.n_accepted,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "n_draft_now": self.n_draft,
            "provider": type(self.inner).__name__,
        }
