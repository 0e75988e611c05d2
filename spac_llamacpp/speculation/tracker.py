"""Speculative steps as a lookahead sensor: frequency maps with their acceptance.

Verifying k draft tokens routes k+1 tokens through every MoE layer in one batch. Each such step
becomes a :class:`FrequencyMap`: per-(layer, expert) counts over the k+1 tokens, the per-token expert
ids, and, once the target has sampled, how many drafts were accepted. ``SpeculationTracker`` sits
between ``Llama.generate`` and the real draft provider and feeds the adaptive draft length.

When acceptance is known. ``Llama.generate`` evaluates ``[t0, d1..dk]``, then samples at t0's row and
compares the sample with d1, and so on; the first differing sample ends the step (the correction), as
does the sample after dk (the bonus token). ``spac_llamacpp.Llama.sample`` shows the tracker every
sample (:meth:`SpeculationTracker.on_sample`), so a step is resolved at the sample that decides it,
exactly for any sampler, before the next draft is requested; then ``on_resolved`` is called (the
``Llama`` lets its tiers learn from the step there, with the true path's counts). A step whose drafts
were not all checked because generation stopped is finished by :meth:`SpeculationTracker.finish_open`
(at the end of ``generate`` or before the next evaluation): its true path is the first token and the
drafts confirmed so far, and it stays out of the acceptance statistics (``accepted`` None).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
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
    """Drafts the target accepted; None while unknown, and for a step whose drafts generation stopped
    checking (then ``confirmed`` counts the drafts its samples matched)."""
    tokens: np.ndarray | None = None
    """``[n_tokens]`` the evaluated token ids (the first token, then the drafts)."""
    confirmed: int = 0
    """Drafts matched by the target's samples so far (``accepted`` once resolved)."""

    @property
    def accepted_mask(self) -> np.ndarray:
        """``[n_tokens]`` bool: the tokens on the true path (the first token and the accepted drafts;
        the confirmed ones while acceptance is not known)."""
        mask = np.zeros(self.n_tokens, dtype=bool)
        kept = self.confirmed if self.accepted is None else self.accepted
        mask[: 1 + kept + (self.n_tokens - 1 - self.n_draft)] = True
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

    def accepted_counts(self) -> np.ndarray | None:
        """``[n_layer, n_expert]`` selections of the true-path tokens (``estimators.Observation``); None
        for a step without drafts (every token is on the true path) or without per-token ids."""
        if not self.n_draft or self.ids is None:
            return None
        return self.counts_where(self.accepted_mask)


class SpeculationTracker(LlamaDraftModel):
    """The draft model ``Llama.generate`` sees: delegates to ``inner`` and records acceptance.

    Args:
        llm: the target model (read for its current position).
        inner: the real draft provider (any ``LlamaDraftModel``).
        adaptive: draft-length controller; None keeps ``inner``'s length fixed.
        history: frequency maps kept (oldest dropped first).
        on_resolved: called with each verification step's map once its true path is known (resolved,
            or finished by :meth:`finish_open`), before the next evaluation.
    """

    def __init__(self, llm: llama_cpp.Llama, inner: LlamaDraftModel, adaptive: AdaptiveDraftLength | None = None,
                 history: int | None = 256, on_resolved: Callable[[FrequencyMap], None] | None = None) -> None:
        self.llm = llm
        self.inner = inner
        self.adaptive = adaptive
        self.on_resolved = on_resolved
        self.maps: deque[FrequencyMap] = deque(maxlen=history)
        self.n_verifications = 0
        self.n_drafted = 0
        self.n_accepted = 0
        self.draft_call_seconds = 0.0
        """Time spent in the draft provider's calls (catching up on the input, and drafting)."""
        self._pending = np.zeros(0, dtype=np.intc)  # the draft handed out, not yet evaluated
        self._open: FrequencyMap | None = None  # evaluated, acceptance not yet known
        self._asked: float | None = None  # when the last draft was handed out (its step's evaluation began)
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
        fmap = self._open
        if fmap is not None:  # not resolved by samples (a caller that bypassed Llama.sample)
            # Llama.generate truncated n_tokens to the verified prefix before asking for the next draft
            self._resolve(fmap, int(np.clip(self.llm.n_tokens - fmap.position - 1, 0, fmap.n_draft)))
        k = None
        if self.adaptive is not None:
            k = self.adaptive.next_length()  # 0: a plain (greedy) step; the provider is not asked
            self._set_inner_length(k)
        t0 = time.perf_counter()
        drafts = np.asarray(self.inner(input_ids, **kwargs) if k != 0 else [], dtype=np.intc)
        if k != 0:
            call = time.perf_counter() - t0
            self.draft_call_seconds += call
            if self.adaptive is not None:
                catch_up = float(getattr(self.inner, "last_catch_up_seconds", 0.0))
                self.adaptive.observe_draft_time(call, min(len(drafts), k), catch_up)
                drafts = drafts[:k]
        # a draft id outside the target's vocabulary would make llama_decode fail: never propose one
        bad = np.nonzero((drafts < 0) | (drafts >= self.llm.n_vocab()))[0]
        if len(bad):
            drafts = drafts[: bad[0]]
        self._pending = drafts
        self._asked = time.perf_counter()  # the evaluation of [last token, drafts] starts now
        return drafts

    def on_step(self, step: RoutingStep | None, position: int, tokens: Sequence[int]) -> FrequencyMap | None:
        """Called by ``Llama.eval`` after each evaluation of ``tokens`` at ``position``; returns the
        step's map (acceptance still unknown, ``accepted`` None, for a verification step)."""
        self.finish_open()
        n_tokens = len(tokens)
        drafts, self._pending = self._pending, np.zeros(0, dtype=np.intc)
        asked, self._asked = self._asked, None
        if asked is not None and self.adaptive is not None and n_tokens == 1 + len(drafts):
            self.adaptive.observe_step_time(n_tokens, time.perf_counter() - asked)  # a decode or verify step
        n_draft = _draft_rows(tokens, drafts)
        if step is None:
            return None
        fmap = FrequencyMap(step.index, position, n_tokens, n_draft, step.counts, step.ids,
                            accepted=None if n_draft else 0, tokens=np.asarray(tokens, dtype=np.int64))
        self.maps.append(fmap)
        if n_draft:
            self._open = fmap
        return fmap

    def is_verification(self, tokens: Sequence[int]) -> bool:
        """Whether evaluating ``tokens`` now verifies the pending drafts (asked before the evaluation)."""
        return _draft_rows(tokens, self._pending) > 0

    def on_sample(self, position: int, token: int) -> None:
        """The target sampled ``token`` from the logits of ``position`` (``Llama.sample``)."""
        fmap = self._open
        if fmap is None or fmap.tokens is None:
            return
        row = position - fmap.position
        if row != fmap.confirmed:  # not the row the verification checks next
            return
        if row < fmap.n_draft and int(token) == int(fmap.tokens[row + 1]):
            fmap.confirmed += 1  # draft row+1 accepted; the sample at its row decides the next one
            return
        self._resolve(fmap, row)  # the correction replaces draft row+1, or the bonus token after all

    def finish_open(self) -> None:
        """Generation stopped before the open verification was decided: its true path is the first token
        and the drafts confirmed so far (``accepted`` stays None; not in the statistics)."""
        fmap, self._open = self._open, None
        if fmap is not None and self.on_resolved is not None:
            self.on_resolved(fmap)

    def _resolve(self, fmap: FrequencyMap, accepted: int) -> None:
        self._open = None
        fmap.accepted = fmap.confirmed = accepted
        self.n_verifications += 1
        self.n_drafted += fmap.n_draft
        self.n_accepted += accepted
        if self.adaptive is not None:
            self._set_inner_length(self.adaptive.update(fmap.n_draft, accepted))
        if self.on_resolved is not None:
            self.on_resolved(fmap)

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
            "draft_call_seconds": round(self.draft_call_seconds, 4),
            "n_draft_now": self.n_draft,
            "provider": type(self.inner).__name__,
        }


def _draft_rows(tokens: Sequence[int], drafts: np.ndarray) -> int:
    """Draft rows of an evaluation: a verification is the last sampled token, then (a prefix of, when the
    context is full) the pending draft; anything else has none."""
    n = len(tokens) - 1
    if 0 < n <= len(drafts) and np.array_equal(np.asarray(tokens[1:], dtype=np.int64), drafts[:n].astype(np.int64)):
        return n
    return 0
