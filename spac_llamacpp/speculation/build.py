"""Building ``Llama``'s drafting: the draft model from its arguments, and the tracker around it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from spac_llamacpp.base.errors import NotMoEError, SpacError
from spac_llamacpp.speculation.drafts import SPAC_ONLY_KWARGS, AdaptiveDraftLength, GGUFDraftModel
from spac_llamacpp.speculation.tracker import FrequencyMap, SpeculationTracker


def build_draft(model_path: str, kwargs: dict[str, Any], *, self_draft: bool | int, draft_model_path: str | None,
                n_draft: int, draft_kwargs: dict[str, Any] | None, n_expert: int,
                llama_cls: type) -> tuple[Any, Any]:
    """``(draft, owned)``: the draft to verify (the user's ``draft_model``, a GGUF draft or the model drafting
    itself) and the draft model this call created (None for the user's: they own it). ``llama_cls`` is
    ``spac_llamacpp.Llama``, for drafts that need its arguments."""
    inner = kwargs.get("draft_model")
    owned = None
    dkw = {"n_threads": kwargs.get("n_threads"), **(draft_kwargs or {})}
    n_ctx = kwargs.get("n_ctx", 512)
    if self_draft is not False and self_draft is not None:
        if inner is not None or draft_model_path is not None:
            raise SpacError("self_draft drafts with the model itself: do not also pass a draft model")
        if n_expert == 0:
            raise NotMoEError(f"{model_path} is a dense model; self-drafting needs a Mixture-of-Experts GGUF")
        from spac_llamacpp.speculation.self_draft import SelfDraft

        experts = None if self_draft is True else int(self_draft)
        inner = owned = SelfDraft(model_path, n_draft, n_ctx, llama_cls=llama_cls, experts=experts, **dkw)
    if draft_model_path is not None:
        if inner is not None:
            raise SpacError("pass either draft_model or draft_model_path, not both")
        if any(k in dkw for k in SPAC_ONLY_KWARGS):  # the draft needs the spac class for them
            dkw = {"llama_cls": llama_cls, "routing": False, **dkw}
        inner = owned = GGUFDraftModel(draft_model_path, n_draft, n_ctx, **dkw)
    return inner, owned


def build_speculation(target: Any, draft: Any, *, n_draft: int, adaptive_draft: bool, history: int | None,
                      on_resolved: Callable[[FrequencyMap], None] | None = None) -> SpeculationTracker | None:
    """The tracker that verifies ``draft``'s tokens on ``target`` (None without a draft); ``on_resolved``
    gets each verification step once its acceptance is known."""
    if draft is None:
        return None
    adaptive = AdaptiveDraftLength(k_init=n_draft, k_max=max(8, n_draft)) if adaptive_draft else None
    return SpeculationTracker(target, draft, adaptive, history=history, on_resolved=on_resolved)
