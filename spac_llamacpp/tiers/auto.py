"""``tier="auto"``: the tier, budget and GPU layers chosen by :func:`spac_llamacpp.planning.fit.plan_fit` from this
machine's facts, unless an explicit argument already decides them.

Explicit arguments win, in this order: a flash ``budget`` means the flash tier with it; a ``vram_budget`` the
vram tier with it; ``tensor_buft_overrides`` or a non-zero ``n_gpu_layers`` mean the user places the tensors
(no tier, llama.cpp as is); ``n_gpu_layers=0`` keeps the plan on the CPU (all in RAM or the flash tier).
Used by ``Llama(tier="auto")`` and by ``spac-run`` / ``spac serve`` / ``spac chat`` (``--tier auto``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from spac_llamacpp.gguf.info import MoEModelInfo
from spac_llamacpp.native.machine import MachineFacts, read_machine_facts
from spac_llamacpp.planning.fit import FitPlan, plan_fit

log = logging.getLogger(__name__)

LLAMA_DEFAULT_N_CTX = 512  # llama_cpp.Llama's default n_ctx


@dataclass(frozen=True)
class AutoChoice:
    """What ``tier="auto"`` resolved to."""

    tier: str | None  # None (llama.cpp as is), "flash" or "vram"
    budget: Any  # flash budget (as given or planned), else None
    vram_budget: Any  # vram budget, else None
    n_gpu_layers: int | None  # None: leave it as given
    plan: FitPlan | None  # None when an explicit argument decided
    reason: str

    def lines(self) -> list[str]:
        """One or two lines saying what was chosen and why."""
        if self.plan is not None:
            return self.plan.lines()
        return [f"auto placement: {self.reason}"]

    def to_json(self) -> dict[str, Any]:
        if self.plan is not None:
            return {"explicit": False, **self.plan.to_json()}
        return {"explicit": True, "tier": self.tier or "none", "budget": self.budget, "vram_budget": self.vram_budget,
                "n_gpu_layers": self.n_gpu_layers, "reason": self.reason}


def resolve_auto(info: MoEModelInfo, *, n_ctx: int | None, budget: Any = None, vram_budget: Any = None,
                 overrides: Any = None, n_gpu_layers: int | None = None,
                 facts: MachineFacts | None = None) -> AutoChoice:
    """Resolve ``tier="auto"`` for a model (``n_gpu_layers=None``: not given; ``n_ctx`` None or 0: the model's
    training context, else llama_cpp's default)."""
    if budget is not None:
        return AutoChoice("flash", budget, None, None, None, "a flash budget was given: flash tier with it")
    if vram_budget is not None:
        return AutoChoice("vram", None, vram_budget, None, None, "a vram budget was given: vram tier with it")
    if overrides:
        return AutoChoice(None, None, None, None, None, "tensor overrides were given: llama.cpp as is with them")
    if n_gpu_layers:
        return AutoChoice(None, None, None, None, None,
                          f"n_gpu_layers={n_gpu_layers} was given: llama.cpp as is with it")
    ctx = n_ctx or info.context_length or LLAMA_DEFAULT_N_CTX
    plan = plan_fit(info, facts if facts is not None else read_machine_facts(), n_ctx=int(ctx),
                    allow_gpu=n_gpu_layers is None)
    kw = plan.llama_kwargs()
    return AutoChoice(kw["tier"], kw["budget"], kw["vram_budget"], kw["n_gpu_layers"], plan, plan.reason)


def auto_llama_arguments(info: MoEModelInfo, budget: Any, vram_budget: Any, overrides: Any,
                         kwargs: dict[str, Any], facts: MachineFacts | None = None
                         ) -> tuple[str | None, Any, Any, AutoChoice]:
    """``Llama(tier="auto", ...)``: ``(tier, budget, vram_budget, choice)``; sets ``kwargs["n_gpu_layers"]`` when
    the plan puts layers on the GPU and none was given."""
    choice = resolve_auto(info, n_ctx=kwargs.get("n_ctx", LLAMA_DEFAULT_N_CTX), budget=budget,
                          vram_budget=vram_budget, overrides=overrides, n_gpu_layers=kwargs.get("n_gpu_layers"),
                          facts=facts)
    if choice.n_gpu_layers and "n_gpu_layers" not in kwargs:
        kwargs["n_gpu_layers"] = choice.n_gpu_layers
    for line in choice.lines():
        log.info("%s: %s", info.path.name, line.strip())
    return choice.tier, choice.budget, choice.vram_budget, choice
