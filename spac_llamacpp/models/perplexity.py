"""Perplexity of a model on a token sequence, from llama.cpp's own logits (like ``llama-perplexity``).

The text is cut into non-overlapping windows of ``n_ctx`` tokens, each evaluated in a fresh context.
As in llama.cpp's perplexity tool, only the second half of each window is scored (every scored token
then has at least ``n_ctx / 2`` tokens of context), and a model that adds BOS gets BOS in place of a
window's first token. The ``Llama`` must be created with ``logits_all=True`` and ``n_ctx >= n_ctx``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import llama_cpp
import numpy as np

from spac_llamacpp.base.errors import SpacError


@dataclass
class PerplexityResult:
    """Perplexity ``exp(mean NLL)`` over ``n_scored`` tokens, with each window's mean NLL."""

    ppl: float
    nll: float
    n_scored: int
    window_nll: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ``targets[i]`` under the row ``logits[i]`` (float64 log-softmax)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return lse - z[np.arange(len(targets)), targets]


def window_nll(llm: llama_cpp.Llama, window: Sequence[int], first_scored: int) -> np.ndarray:
    """NLLs of ``window[first_scored+1:]``, each predicted from the tokens before it (one fresh eval)."""
    if not getattr(llm, "_logits_all", False):
        raise SpacError("perplexity needs a Llama created with logits_all=True")
    if len(window) > llm.n_ctx():
        raise SpacError(f"window of {len(window)} tokens does not fit the context of {llm.n_ctx()}")
    llm.reset()
    llm.eval(list(window))
    logits = np.asarray(llm.scores[first_scored : len(window) - 1], dtype=np.float32)
    return token_nll(logits, np.asarray(window[first_scored + 1 :]))


def perplexity(llm: llama_cpp.Llama, tokens: Sequence[int], n_ctx: int, max_windows: int | None = None,
               first_scored: int | None = None) -> PerplexityResult:
    """Perplexity of ``llm`` on ``tokens``, windows of ``n_ctx`` (at most ``max_windows``).

    ``first_scored`` (default ``n_ctx // 2``) is the first position whose *prediction* is scored.
    """
    first = n_ctx // 2 if first_scored is None else first_scored
    if not 0 <= first < n_ctx - 1:
        raise SpacError(f"first_scored must be in [0, {n_ctx - 1}), got {first}")
    bos = llm.tokenize(b"", add_bos=True, special=True)  # [bos] if this model adds BOS, else []
    n_windows = len(tokens) // n_ctx
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise SpacError(f"need at least {n_ctx} tokens, got {len(tokens)}")
    total, count, per_window = 0.0, 0, []
    for w in range(n_windows):
        window = list(tokens[w * n_ctx : (w + 1) * n_ctx])
        if bos:
            window[0] = bos[0]
        nll = window_nll(llm, window, first)
        total += float(nll.sum())
        count += len(nll)
        per_window.append(float(nll.mean()))
    mean = total / count
    return PerplexityResult(ppl=math.exp(mean), nll=mean, n_scored=count, window_nll=per_window)
