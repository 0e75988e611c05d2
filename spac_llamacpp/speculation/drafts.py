"""Draft providers for speculative decoding: a small GGUF draft model and prompt lookup.

Both follow llama-cpp-python's ``LlamaDraftModel`` protocol (``__call__(input_ids) -> draft ids``), so
they plug into ``Llama.generate``'s verification loop, which only ever accepts a draft token when the
target would have sampled it: speculation changes speed, never output. ``n_draft`` is read at every
call, so :class:`AdaptiveDraftLength` (driven by :mod:`speculation`) can change it between steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt
from llama_cpp.llama_speculative import LlamaDraftModel

from spac_llamacpp.base.errors import SpacError

# llama.cpp's own draft compatibility rule (common/speculative.cpp): sizes may differ by at most 128
# tokens (padding), and token texts must agree from id 5 up (the first ids are often specials).
VOCAB_MAX_SIZE_DIFFERENCE = 128
VOCAB_CHECK_START_ID = 5


class DraftVocabError(SpacError):
    """The draft model's vocabulary is not the target's."""


def check_same_vocabulary(target: llama_cpp.Llama, draft: llama_cpp.Llama, n_samples: int = 512) -> None:
    """Raise :class:`DraftVocabError` unless ``draft`` tokenizes exactly like ``target``.

    Checks the vocabulary sizes, the bos/eos tokens and the texts of ``n_samples`` evenly spaced
    token ids (plus the last ids, where added special tokens live).
    """
    nt, nd = target.n_vocab(), draft.n_vocab()
    if abs(nt - nd) > VOCAB_MAX_SIZE_DIFFERENCE:
        raise DraftVocabError(
            f"draft model vocabulary has {nd} tokens but the target's has {nt}; "
            "use a draft model from the same model family (same tokenizer)"
        )
    if (target.token_bos(), target.token_eos()) != (draft.token_bos(), draft.token_eos()):
        raise DraftVocabError(
            f"draft model bos/eos tokens ({draft.token_bos()}, {draft.token_eos()}) differ from the target's "
            f"({target.token_bos()}, {target.token_eos()}); use a draft model with the same tokenizer"
        )
    n = min(nt, nd)
    ids = np.unique(np.concatenate([
        np.linspace(VOCAB_CHECK_START_ID, n - 1, num=min(n_samples, n), dtype=np.int64),
        np.arange(max(VOCAB_CHECK_START_ID, n - 32), n),
    ]))
    for tok in ids.tolist():
        a, b = target._model.token_get_text(tok), draft._model.token_get_text(tok)
        if a != b:
            raise DraftVocabError(
                f"draft model token {tok} is {b!r} but the target's is {a!r}; "
                "use a draft model with the same tokenizer"
            )


DRAFT_MAX_CATCH_UP = 128
"""Most tokens a draft model evaluates before drafting (:class:`GGUFDraftModel`): bounds what a draft costs after
a new prompt or a long run of greedy steps (a probe of the draft length controller)."""

SPAC_ONLY_KWARGS = ("use_extra_bufts", "tensor_buft_overrides", "no_host", "cb_eval")


class GGUFDraftModel(LlamaDraftModel):
    """Greedy drafting with a small GGUF model in its own llama context.

    Between steps only the tokens that changed are evaluated: the draft's KV cache is trimmed to the
    longest common prefix with the new input instead of re-evaluating it. A catch-up longer than
    ``max_catch_up`` tokens (a new prompt, or many greedy steps since the last draft) restarts the draft on
    the input's last ``max_catch_up`` tokens instead: a draft with a shorter context may draft worse, which
    verification catches (outputs never change), but what a draft costs after a pause stays bounded.

    Args:
        model_path: the draft GGUF.
        n_draft: tokens drafted per call (can be changed between calls).
        n_ctx: the draft context length (use the target's).
        llama_cls: the class that loads the draft (``spac_llamacpp.Llama`` for self-drafting).
        max_catch_up: most tokens one call evaluates before drafting (None: the whole input).
        **llama_kwargs: passed to ``llama_cls`` for the draft (e.g. ``n_threads``, ``n_gpu_layers``).
    """

    def __init__(self, model_path: str | Path, n_draft: int = 4, n_ctx: int = 2048,
                 llama_cls: type[llama_cpp.Llama] = llama_cpp.Llama, max_catch_up: int | None = DRAFT_MAX_CATCH_UP,
                 **llama_kwargs: Any) -> None:
        if max_catch_up is not None and max_catch_up < 1:
            raise SpacError(f"max_catch_up must be a positive number of tokens or None, got {max_catch_up}")
        if not Path(model_path).is_file():
            raise SpacError(f"draft model file not found: {model_path}")
        from spac_llamacpp.gguf.info import read_model_header

        read_model_header(model_path)  # a corrupt draft file gets the same one-line error as a target
        llama_kwargs.setdefault("verbose", False)
        spac_only = sorted(k for k in SPAC_ONLY_KWARGS if k in llama_kwargs)
        if llama_cls is llama_cpp.Llama and spac_only:
            # the stock class would silently ignore them; spac_llamacpp.Llama passes itself as llama_cls
            raise SpacError(f"draft options {', '.join(spac_only)} need llama_cls=spac_llamacpp.Llama")
        self.llm = llama_cls(str(model_path), n_ctx=n_ctx, logits_all=False, **llama_kwargs)
        self.n_draft = n_draft
        self.model_path = str(model_path)
        self.max_catch_up = max_catch_up
        self.evaluated_tokens = 0
        """Tokens the draft model evaluated (prefix reuse keeps this near one per drafted token)."""
        self.last_catch_up_seconds = 0.0
        """Time the last call spent evaluating the input before its first draft (the rest is drafting)."""
        self._offset = 0  # the draft's context holds input_ids[_offset:] (a window after a long catch-up)

    def __call__(self, input_ids: npt.NDArray[np.intc], /, **kwargs: Any) -> npt.NDArray[np.intc]:
        llm = self.llm
        self.last_catch_up_seconds = 0.0
        if len(input_ids) == 0:
            return np.array([], dtype=np.intc)
        view, lcp = self._reusable(np.asarray(input_ids))
        k = min(self.n_draft, llm.n_ctx() - len(view) - 1)
        if k <= 0:
            return np.array([], dtype=np.intc)
        t0 = time.perf_counter()
        llm.n_tokens = lcp  # Llama.eval trims the KV cache from n_tokens on
        self._eval(view[lcp:])
        self.last_catch_up_seconds = time.perf_counter() - t0
        out = np.empty(k, dtype=np.intc)
        n_vocab = llm.n_vocab()
        for i in range(k):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
            out[i] = int(np.argmax(logits))
            if i + 1 < k:
                self._eval([int(out[i])])
        return out

    def _reusable(self, input_ids: npt.NDArray[np.intc]) -> tuple[npt.NDArray[np.intc], int]:
        """``(view, lcp)``: the part of the input the draft's context is to hold and how much of it the
        context holds already (at least one token is re-evaluated, for fresh logits)."""
        n_in, window = len(input_ids), self.max_catch_up
        off = self._offset if self._offset < n_in else 0
        view = input_ids[off:]
        have = self.llm.input_ids[: self.llm.n_tokens]
        m = min(len(have), len(view))
        differ = np.nonzero(have[:m] != view[:m])[0]
        lcp = int(differ[0]) if len(differ) else m
        if lcp == 0 or (window is not None and len(view) - lcp > window):
            # nothing to reuse, or a catch-up longer than the window: restart on the input's last tokens
            off = 0 if window is None else max(0, n_in - window)
            view, lcp = input_ids[off:], 0
        self._offset = off
        return view, min(lcp, len(view) - 1)

    def _eval(self, tokens: Any) -> None:
        self.llm.eval(list(map(int, tokens)))
        self.evaluated_tokens += len(tokens)

    def close(self) -> None:
        self.llm.close()


class PromptLookupDraft(LlamaDraftModel):
    """Prompt lookup (n-gram) drafting: continue the longest recent n-gram match in the context.

    No extra model; good on inputs that repeat themselves (code, summaries, extraction).
    """

    def __init__(self, n_draft: int = 4, max_ngram: int = 3, min_ngram: int = 1) -> None:
        self.n_draft = n_draft
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def __call__(self, input_ids: npt.NDArray[np.intc], /, **kwargs: Any) -> npt.NDArray[np.intc]:
        ids = np.asarray(input_ids)
        n = len(ids)
        for size in range(min(self.max_ngram, n - 1), self.min_ngram - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], size)
            hits = np.nonzero(np.all(windows == ids[n - size:], axis=1))[0]
            if len(hits):
                start = int(hits[-1]) + size  # the most recent earlier occurrence
                return ids[start: start + self.n_draft].astype(np.intc)
        return np.array([], dtype=np.intc)


def _ema(old: float, new: float) -> float:
    """The controller's moving average of a measured time: the first measurement (old still 0) as it is."""
    return new if not old else 0.8 * old + 0.2 * new


StepCost = Callable[[Sequence[int]], Sequence[float]]
"""Modelled seconds of one target evaluation of each given number of tokens (``k + 1`` for k drafts), at the
tier's current residency and miss rate (``PlacementPlanner.step_seconds``)."""


class AdaptiveDraftLength:
    """Choose the draft length from the running per-token acceptance rate, and, on a tier, from its cost.

    ``a`` is an exponential moving average of the per-token acceptance over drafted tokens, so a run of
    rejections shortens drafts quickly and a run of acceptances lengthens them.

    Without ``step_cost``: with acceptance ``a`` a draft of k tokens is accepted whole with probability
    ``a**k``; we draft the longest k whose whole-draft probability stays above ``p_min`` (clamped to
    ``[k_min, k_max]``).

    With ``step_cost`` (a tier's model of a verification's time, :data:`StepCost`): we draft the k in
    ``{0} U [k_min, k_max]`` with the most tokens per second, ``E[tokens | k] / (step_cost(k + 1) + overhead +
    k * (draft_seconds + verify_excess))``, where ``E[tokens | k] = 1 + a + ... + a**k`` (the accepted prefix
    and the correction or bonus token). k = 0 is plain (greedy) decoding: chosen when the experts that more
    tokens per step bring in (more distinct experts per verify pass: more reads at the tier's miss rate) cost
    more than the accepted drafts save, so speculation on a tier does not run slower than greedy. The model is
    corrected by measurement (the tracker reports every step's time): ``overhead`` is what a plain step takes
    beyond the modelled expert time (the non-expert layers, sampling: paid once per step whatever its length,
    which is what speculation amortises), ``verify_excess`` what a verification took beyond the model and that
    overhead, per draft token (the model's union of experts is an estimate; a verify batch that brings in
    experts the plan did not keep costs more), ``draft_seconds`` the draft provider's time per drafted token
    (its catch-up on the input excluded: that is a probe's cost). All are moving averages, 0 until measured.

    At k = 0 nothing is verified and acceptance is not observed: after ``probe_gap`` greedy steps one step
    drafts ``k_min`` tokens to measure it again. A probe costs more than its verification: the draft provider
    catches up on the tokens since its last call. The measured cost of a probe (its draft call and
    verification, less the greedy time of the tokens it yielded) sets the next gap after a probe that leaves
    greedy ahead, so that probes take at most ``probe_share`` of the greedy decoding time (``probe_every`` to
    ``probe_max`` steps; until a probe's cost is measured, the gap doubles). Only a probe leads from greedy back
    to drafting; choosing to draft on from it resets the gap. On a tier the controller starts greedy, so the
    first probe's cost is measured against greedy steps.
    """

    def __init__(self, k_init: int = 4, k_min: int = 1, k_max: int = 8, p_min: float = 0.35,
                 smoothing: float = 0.1, step_cost: StepCost | None = None, probe_every: int = 16,
                 probe_max: int = 256, probe_share: float = 0.02) -> None:
        if not 1 <= k_min <= k_init <= k_max:
            raise SpacError(f"draft lengths must satisfy 1 <= k_min <= k_init <= k_max, got {k_min}, {k_init}, {k_max}")
        if not 1 <= probe_every <= probe_max:
            raise SpacError(f"probe gaps must satisfy 1 <= probe_every <= probe_max, got {probe_every}, {probe_max}")
        if not 0 < probe_share <= 1:
            raise SpacError(f"probe_share must be in (0, 1], got {probe_share}")
        self.k, self.k_min, self.k_max = k_init, k_min, k_max
        self.p_min, self.smoothing = p_min, smoothing
        self.acceptance = p_min ** (1.0 / k_init)  # neutral start: k_init is exactly the chosen length
        self.step_cost = step_cost
        self.probe_every, self.probe_max, self.probe_share = int(probe_every), int(probe_max), float(probe_share)
        self.probe_gap = self.probe_every  # greedy steps before the next probe
        self._probing = True  # the step drafted now is a probe (the first drafting step is one)
        self._greedy: bool | None = None  # greedy until a probe finds drafting pays (None: not started)
        self.draft_seconds = 0.0  # per drafted token, measured
        self.overhead = 0.0  # seconds per plain step beyond the modelled expert time, measured
        self.verify_excess = 0.0  # seconds per draft token a verification took beyond model + overhead, measured
        self.greedy_seconds = 0.0  # seconds per plain (one-token) step, measured
        self.probe_cost = 0.0  # seconds a probe cost beyond greedy decoding of what it yielded, measured
        self._probe_measured = False
        self._call_seconds = 0.0  # the draft call of the step being verified (catch-up included)
        self._verify_seconds = 0.0  # its verification
        self.greedy_steps = 0  # steps at k = 0 since the last probe
        self.probes = 0

    def update(self, n_draft: int, n_accepted: int) -> int:
        """Record a verification of ``n_draft`` tokens of which ``n_accepted`` were accepted; return next k."""
        # an accepted prefix of length j is j accepted tokens, then one rejected (unless j == n_draft)
        trials = n_accepted + (1 if n_accepted < n_draft else 0)
        if trials:
            weight = 1 - (1 - self.smoothing) ** trials  # one EMA step per token tried
            self.acceptance += weight * (n_accepted / trials - self.acceptance)
        if self._probing and self.greedy_seconds > 0 and self._verify_seconds > 0:
            cost = max(0.0, self._call_seconds + self._verify_seconds - (n_accepted + 1) * self.greedy_seconds)
            self.probe_cost = cost if not self._probe_measured else 0.5 * self.probe_cost + 0.5 * cost
            self._probe_measured = True
        self._call_seconds = self._verify_seconds = 0.0
        self.k = self.choose()
        self._greedy = not self.k
        if self.k:  # drafting pays again: probe soon after the next fall-back to greedy
            self.probe_gap = self.probe_every
        elif self._probing:  # greedy still wins: the next probe when its measured cost is affordable
            gap = max(self._affordable_gap(), self.probe_every) if self._probe_measured else 2 * self.probe_gap
            self.probe_gap = min(gap, self.probe_max)
        self._probing = False
        return self.k

    def _affordable_gap(self) -> int:
        """Greedy steps whose time pays for one probe at ``probe_share`` of it."""
        if self.probe_cost <= 0 or self.greedy_seconds <= 0:
            return 0
        return math.ceil(self.probe_cost / (self.probe_share * self.greedy_seconds))

    def observe_draft_time(self, seconds: float, n_tokens: int, catch_up_seconds: float = 0.0) -> None:
        """The draft provider took ``seconds`` for ``n_tokens`` drafts, ``catch_up_seconds`` of it evaluating
        the input before drafting (an EMA per drafted token of the rest; the whole call counts to a probe)."""
        if n_tokens > 0 and seconds >= 0:
            self._call_seconds = seconds
            per = max(0.0, seconds - max(0.0, catch_up_seconds)) / n_tokens
            self.draft_seconds = _ema(self.draft_seconds, per)

    def observe_step_time(self, n_tokens: int, seconds: float) -> None:
        """A decode (one token) or verification step of ``n_tokens`` took ``seconds``. A plain step measures
        ``overhead`` (beyond the modelled expert time) and ``greedy_seconds``; a verification
        measures ``verify_excess`` (beyond the model and the overhead, per draft token). EMAs; either may be
        negative where the model overestimates."""
        if n_tokens < 1 or seconds < 0:
            return
        if n_tokens == 1:
            self.greedy_seconds = _ema(self.greedy_seconds, seconds)
        else:
            self._verify_seconds = seconds
        if self.step_cost is None:
            return
        # not clamped at 0: a model that overestimates plain steps must be corrected on that side too, or
        # greedy would look slower than it is next to measured verifications
        resid = seconds - float(self.step_cost([n_tokens])[0])
        if n_tokens == 1:
            self.overhead = _ema(self.overhead, resid)
        else:
            excess = (resid - self.overhead) / (n_tokens - 1)
            self.verify_excess = 0.8 * self.verify_excess + 0.2 * excess

    def expected_tokens(self, k: int) -> float:
        """Tokens a verification of k drafts yields on average: ``1 + a + ... + a**k``."""
        a = min(max(self.acceptance, 0.0), 1.0)
        return float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)

    def choose(self) -> int:
        """The draft length by the rule of the class docstring (with the current costs)."""
        a = min(max(self.acceptance, 1e-6), 1 - 1e-6)
        if self.step_cost is None:
            return int(min(self.k_max, max(self.k_min, math.floor(math.log(self.p_min) / math.log(a)))))
        ks = [0, *range(self.k_min, self.k_max + 1)]
        costs = list(self.step_cost([k + 1 for k in ks]))
        best, best_rate = 0, -1.0
        for k, c in zip(ks, costs, strict=True):
            seconds = float(c) + self.overhead + k * (self.draft_seconds + self.verify_excess)
            rate = self.expected_tokens(k) / max(seconds, 1e-9)
            if rate > best_rate * (1 + 1e-9):  # ties: the shorter draft
                best, best_rate = k, rate
        return best

    def next_length(self) -> int:
        """The draft length of the step about to be drafted (the tracker asks before each draft): the
        current choice, re-made with the tier's current costs, or, once at k = 0, 0 until a probe of ``k_min``
        after ``probe_gap`` greedy steps: only a probe's verification returns to drafting (a change of the
        tier's costs alone waits for it), since drafting after greedy steps first pays the draft's catch-up.
        On a tier the controller starts greedy (its first probe after ``probe_every`` steps)."""
        if self._greedy is None:  # a tier's controller starts greedy: the first probe's cost can be measured
            self._greedy = self.step_cost is not None
        if self.step_cost is not None:
            self.k = self.choose()
            if not self.k:
                self._greedy = True
        if self.k > 0 and not self._greedy:
            return self.k
        self.greedy_steps += 1
        if self.greedy_steps >= self.probe_gap:
            self.greedy_steps = 0
            self.probes += 1
            self._probing = True
            return self.k_min
        return 0
