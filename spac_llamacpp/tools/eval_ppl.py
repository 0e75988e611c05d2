"""``spac eval-ppl``: the price of cache-aware routing, perplexity and miss rate for several lambdas.

The text is decoded one token at a time (every step is a decode step, where the Cache-Prior bias
applies), each lambda in a fresh model; the miss rate is that of the per-layer LRU cache of
``cache_experts`` experts the bias favours (see :mod:`spac_llamacpp.tiers.cache_prior`). Lambda 0 is exact
routing: the same LRU is tracked, nothing is biased.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.models.perplexity import token_nll


def eval_cache_prior(model: str | os.PathLike[str], text: str, lambdas: Sequence[float], *,
                     cache_experts: int | None = None, top_j: int | None = None, max_tokens: int = 256,
                     windows: int = 4, n_threads: int | None = None, no_repack: bool = False) -> list[dict[str, Any]]:
    """One row per lambda (0 first): ``ppl``, ``nll``, ``miss_rate``, ``changed_rate``, ``tokens``, ``seconds``.

    The text's first ``windows * max_tokens`` tokens are scored in ``windows`` windows, each from a
    fresh context (BOS first); the expert cache carries over between windows, as between requests.
    """
    from spac_llamacpp.llama import Llama

    rows = []
    tokens: list[int] | None = None
    for lam in [0.0, *[float(x) for x in lambdas if float(x) != 0.0]]:
        opts = {"cache_experts": cache_experts, "top_j": top_j, "max_rows": 1}
        llm = Llama(str(model), n_ctx=max_tokens, logits_all=True, verbose=False, n_threads=n_threads,
                    use_extra_bufts=False if no_repack else None, cache_prior=lam, cache_prior_options=opts)
        try:
            if tokens is None:
                ids = llm.tokenize(text.encode(), add_bos=False)
                bos = [llm.token_bos()] if llm.token_bos() >= 0 else []
                width = max_tokens - len(bos)
                tokens = [bos + ids[i * width:(i + 1) * width] for i in range(windows) if len(ids) > i * width + 16]
                if not tokens:
                    raise SpacError(f"the text gives only {len(ids)} tokens; give at least 16")
            t0 = time.perf_counter()
            nlls = []
            for window in tokens:
                llm.reset()
                for tok in window[:-1]:
                    llm.eval([tok])
                logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float32)
                nlls.append(token_nll(logits, np.asarray(window[1:])))
            seconds = time.perf_counter() - t0
            nll = np.concatenate(nlls)
            st = llm.cache_prior.stats() if llm.cache_prior is not None else {}
        finally:
            llm.close()
        mean = float(nll.mean())
        rows.append({"lambda": lam, "ppl": math.exp(mean), "nll": mean, "tokens": int(nll.size),
                     "miss_rate": st.get("miss_rate"), "changed_rate": st.get("changed_rate") or 0.0,
                     "top_j": st.get("top_j"), "cache_experts": st.get("cache_experts"), "seconds": seconds})
    base = rows[0]["ppl"]
    for r in rows:
        r["ppl_change"] = r["ppl"] / base - 1.0
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'lambda':>7} {'perplexity':>11} {'change':>8} {'miss rate':>10} {'selections changed':>19}"]
    for r in rows:
        miss = "n/a" if r["miss_rate"] is None else f"{100 * r['miss_rate']:.1f}%"
        lines.append(f"{r['lambda']:>7.3f} {r['ppl']:>11.3f} {100 * r['ppl_change']:>+7.2f}% {miss:>10} "
                     f"{100 * r['changed_rate']:>18.1f}%")
    r = rows[0]
    lines.append(f"({r['tokens']} tokens scored, decoded one at a time; LRU cache of {r['cache_experts']} experts "
                 f"per layer; top-J protected: {r['top_j']})")
    return "\n".join(lines)
