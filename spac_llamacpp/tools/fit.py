"""``spac fit`` and ``--tier auto`` on the command line: the plan of :mod:`spac_llamacpp.planning.fit` for a model
file on this machine (or on the machine ``$SPAC_MACHINE_FACTS`` describes)."""

from __future__ import annotations

from spac_llamacpp.base.sizes import format_size
from spac_llamacpp.gguf.info import read_model_header
from spac_llamacpp.native.machine import MachineFacts, read_machine_facts
from spac_llamacpp.planning.fit import MARGIN_RULE, FitPlan, plan_fit
from spac_llamacpp.tiers.auto import AutoChoice, resolve_auto


def fit_model(model: str, n_ctx: int, *, gpu: bool = True, facts: MachineFacts | None = None) -> FitPlan:
    """The automatic placement of ``model`` with a context of ``n_ctx`` tokens (``gpu=False``: CPU only)."""
    info = read_model_header(model)
    return plan_fit(info, facts if facts is not None else read_machine_facts(), n_ctx=n_ctx, allow_gpu=gpu)


def resolve_cli_auto(model: str, n_ctx: int, budget: str | None, vram_budget: str | None, n_gpu_layers: int | None,
                     override_tensor: str | None) -> AutoChoice:
    """``--tier auto`` with the command line's explicit flags (they win: tiers/auto.py)."""
    choice = resolve_auto(read_model_header(model), n_ctx=n_ctx, budget=budget, vram_budget=vram_budget,
                          overrides=override_tensor, n_gpu_layers=n_gpu_layers)
    if choice.plan is None:
        flag = ("--budget" if budget is not None else "--vram-budget" if vram_budget is not None
                else "-ot" if override_tensor else "--gpu-layers")
        return AutoChoice(choice.tier, choice.budget, choice.vram_budget, choice.n_gpu_layers, None,
                          f"{flag} given: {choice.reason.split(': ', 1)[1]}")
    return choice


def format_fit(plan: FitPlan) -> str:
    """``spac fit``'s report: the choice, why, the sizes it weighed and the margins."""
    lines = plan.lines()
    lines.append(f"machine: {plan.facts.describe()}")
    lines.append(f"model: {format_size(plan.model_bytes)} of tensors ({format_size(plan.expert_bytes)} routed "
                 f"experts, {format_size(plan.non_expert_bytes)} other weights); KV cache of {plan.n_ctx} tokens "
                 f"{format_size(plan.kv_bytes)}; compute reserve {format_size(plan.compute_reserve)}")
    usable = plan.ram_available - plan.ram_margin
    margins = f"margins: RAM {format_size(plan.ram_margin)} kept free ({format_size(usable)} usable)"
    if plan.vram_free is not None and plan.vram_margin is not None:
        margins += f", VRAM {format_size(plan.vram_margin)} ({format_size(plan.vram_free - plan.vram_margin)} usable)"
    lines.append(f"{margins}; rule: {MARGIN_RULE}")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
