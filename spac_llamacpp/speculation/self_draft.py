"""Self-speculation (the SpecMoE direction): the target model drafts for itself, on resident experts only.

:class:`SelfDraft` loads the target's own GGUF a second time (file-backed: the weights are shared
through the page cache) and drafts greedily with cache-aware routing at a strength that makes every
layer choose among the experts the target holds resident, so drafting never misses the cache;
optionally with fewer experts per token (``experts``). Verification stays exact: the target checks
every draft with its normal routing, so outputs are unchanged.

What "resident" is: the target's flash-tier residency (``tier="flash"``), else the target's simulated
expert cache (``cache_prior``), else the draft's own per-layer LRU of half the experts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from spac_llamacpp.gguf.info import read_model_header
from spac_llamacpp.speculation.drafts import GGUFDraftModel

RESIDENT_ONLY = 20.0
"""Cache-Prior lambda for drafting: 20 logit ranges, i.e. resident experts always win."""


class SelfDraft(GGUFDraftModel):
    """Drafts with the target model restricted to its resident experts (see module docstring).

    Args:
        model_path: the target's GGUF.
        n_draft, n_ctx: as :class:`~spac_llamacpp.speculation.drafts.GGUFDraftModel`.
        llama_cls: ``spac_llamacpp.Llama`` (the draft needs its cache-aware routing; passed in so that
            this package stays below the user's object).
        experts: experts per token while drafting (default: the model's own k).
        **llama_kwargs: for the draft's ``spac_llamacpp.Llama`` (``n_threads``...).
    """

    def __init__(self, model_path: str | Path, n_draft: int = 4, n_ctx: int = 2048, *, llama_cls: type,
                 experts: int | None = None, **llama_kwargs: Any) -> None:
        info = read_model_header(model_path)
        if experts is not None:
            llama_kwargs["kv_overrides"] = {f"{info.architecture}.expert_used_count": int(experts)}
        opts = {"top_j": 0, "max_rows": 1 << 30}
        llama_kwargs.setdefault("use_extra_bufts", False)  # stay file-backed, like a flash-tier target
        super().__init__(model_path, n_draft, n_ctx, llama_cls=llama_cls, cache_prior=RESIDENT_ONLY,
                         cache_prior_options=opts, **llama_kwargs)
        self.target: Any = None  # the target Llama, set by it
        self.experts = experts
        self.rows = np.asarray(info.moe_layers, dtype=np.int64)

    def _target_residency(self) -> np.ndarray | None:
        t = self.target
        if t is None:
            return None
        if getattr(t, "flash", None) is not None:
            return t.flash.wanted | t.flash.look
        if getattr(t, "cache_prior", None) is not None:
            return t.cache_prior.resident[t.cache_prior.rows].astype(bool)
        return None

    def __call__(self, input_ids: npt.NDArray[np.intc], /, **kwargs: Any) -> npt.NDArray[np.intc]:
        held = self._target_residency()
        prior = self.llm.cache_prior
        if held is not None and prior is not None:
            prior.fixed = held
            prior.resident[prior.rows] = held
        return super().__call__(input_ids, **kwargs)
