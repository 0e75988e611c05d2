"""Quality of a MoEfied model next to its dense source: held-out perplexity and greedy samples."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from spac_llamacpp.models.perplexity import perplexity

log = logging.getLogger(__name__)

SAMPLE_PROMPTS = (
    "def is_prime(n: int) -> bool:\n",
    "The old king stood upon the castle wall and",
)


def _load(path: Path, k: int | None, n_ctx: int, n_threads: int | None, logits_all: bool) -> Any:
    from spac_llamacpp.llama import Llama

    overrides = {"qwen2moe.expert_used_count": k} if k is not None else None
    return Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=logits_all, verbose=False,
                 n_threads=n_threads, use_extra_bufts=False, kv_overrides=overrides, routing=False)


def evaluate_model(path: Path, k: int | None, texts: dict[str, list[int]], n_ctx: int, max_windows: int,
                   n_threads: int | None) -> dict[str, Any]:
    """Perplexity of model ``path`` (top-``k`` if given) on each tokenised held-out text."""
    llm = _load(path, k, n_ctx, n_threads, logits_all=True)
    out: dict[str, Any] = {}
    try:
        for name, tokens in texts.items():
            t0 = time.time()
            res = perplexity(llm, tokens, n_ctx, max_windows=max_windows)
            out[name] = {"ppl": res.ppl, "nll": res.nll, "n_scored": res.n_scored,
                         "tokens_per_s": (n_ctx * len(res.window_nll)) / (time.time() - t0)}
            log.info("%s k=%s %s: ppl %.3f (%d tokens)", path.name, k, name, res.ppl, res.n_scored)
    finally:
        llm.close()
    return out


def samples(path: Path, k: int | None, n_predict: int, n_threads: int | None,
            prompts: tuple[str, ...] = SAMPLE_PROMPTS) -> list[dict[str, Any]]:
    """Greedy continuations of ``prompts`` with decode speed."""
    llm = _load(path, k, 512, n_threads, logits_all=False)
    out = []
    try:
        for prompt in prompts:
            t0 = time.time()
            res = llm(prompt, max_tokens=n_predict, temperature=0.0)
            dt = time.time() - t0
            out.append({"prompt": prompt, "text": res["choices"][0]["text"],
                        "tokens": res["usage"]["completion_tokens"], "seconds": dt})
    finally:
        llm.close()
    return out
