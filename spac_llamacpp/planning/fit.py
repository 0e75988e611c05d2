"""Automatic placement: from the model's header and this machine's free memory, the tier and its budget.

``spac fit MODEL``, ``spac-run MODEL`` (``--tier auto``, its default) and ``Llama(MODEL, tier="auto")`` use
:func:`plan_fit`. It reads nothing but the GGUF header (:class:`~spac_llamacpp.gguf.model.MoEModelInfo`) and
the machine facts (:class:`~spac_llamacpp.native.machine.MachineFacts`: MemAvailable, the cgroup limit, the
GPUs' free memory, the llama.cpp patch level), and sizes each part with the tiers' own budget arithmetic
(:mod:`spac_llamacpp.planning.budgets`).

Rules, first match wins (sizes: the file's tensor bytes, the f16 KV cache of ``n_ctx`` tokens estimated from
the header, a compute reserve of 256 MiB for llama.cpp's buffers):

1. **All on the GPU** (``tier none``, ``n_gpu_layers -1``): a GPU is present and the whole model + KV cache +
   compute reserve fit in its free memory less the VRAM margin.
2. **VRAM tier** (``tier vram``, ``n_gpu_layers -1``, ``vram_budget`` = the GPU's free memory less the margin):
   an MoE model, a GPU and spac's patched llama.cpp (patch level 3, the expert pool); the budget leaves at
   least one pool slot after the non-expert weights, KV cache and compute reserve; the routed experts fit in
   usable RAM (they stay in host memory, the pool holds copies of the hottest).
3. **All in RAM** (``tier none``, stock llama.cpp): the whole model + KV cache + compute reserve fit in usable
   RAM.
4. **Flash tier** (``tier flash``, ``budget`` = usable RAM less the non-expert weights, KV cache and compute
   reserve): an MoE model whose budget is at least the flash tier's smallest (one layer's on-demand experts,
   the same again for the demand loads a step keeps and for lookahead, the tensor edge pages, one resident
   expert: ``budgets.smallest_flash_budget``).
5. Otherwise a one-line :class:`~spac_llamacpp.base.errors.SpacError` naming the smallest working flash budget
   and the free RAM it needs.

**Safety margins.** Usable RAM is ``ram_available - max(512 MiB, 10% of ram_available)`` (``ram_available`` is
MemAvailable capped by what the cgroup limit leaves); usable VRAM is the GPU's free memory less
``max(256 MiB, 5%)``, on top of the compute reserve. Budgets are rounded down to whole MiB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.base.sizes import format_size
from spac_llamacpp.gguf.info import MoEModelInfo
from spac_llamacpp.native.machine import MachineFacts
from spac_llamacpp.planning import budgets

MiB = 1 << 20
RAM_MARGIN_MIN = 512 * MiB
RAM_MARGIN_FRACTION = 0.10
VRAM_MARGIN_MIN = 256 * MiB
VRAM_MARGIN_FRACTION = 0.05
COMPUTE_RESERVE = budgets.DEFAULT_COMPUTE_RESERVE
POOL_PATCH_LEVEL = 3  # native.expert_pool.POOL_PATCH_LEVEL (the expert slot pool)


def ram_margin(ram_available: int) -> int:
    """RAM left unused by every plan: ``max(512 MiB, 10%)`` of what is available."""
    return max(RAM_MARGIN_MIN, int(RAM_MARGIN_FRACTION * ram_available))


def vram_margin(vram_free: int) -> int:
    """GPU memory left unused by every plan (besides the compute reserve): ``max(256 MiB, 5%)`` of the free."""
    return max(VRAM_MARGIN_MIN, int(VRAM_MARGIN_FRACTION * vram_free))


def _mib_floor(n: int) -> int:
    return max(0, int(n)) // MiB * MiB


def _flag_size(n: int) -> str:
    return f"{n // MiB}MiB" if n % MiB == 0 else str(n)


@dataclass(frozen=True)
class FitPlan:
    """What automatic placement chose, and the sizes it chose from."""

    tier: str  # "none" (llama.cpp as is), "flash" or "vram"
    placement: str  # "ram" (all in RAM), "gpu" (all on the GPU), "flash", "vram"
    n_gpu_layers: int
    budget_bytes: int | None  # flash: RAM for routed experts
    vram_budget_bytes: int | None  # vram: GPU memory for the model
    reason: str
    n_ctx: int
    model_bytes: int
    expert_bytes: int
    non_expert_bytes: int
    kv_bytes: int
    compute_reserve: int
    ram_available: int
    ram_margin: int
    vram_free: int | None
    vram_margin: int | None
    facts: MachineFacts
    notes: tuple[str, ...] = ()

    def flags(self) -> str:
        """The explicit ``spac-run`` flags of this plan."""
        if self.tier == "flash":
            return f"--tier flash --budget {_flag_size(int(self.budget_bytes or 0))}"
        if self.tier == "vram":
            return f"--tier vram --vram-budget {_flag_size(int(self.vram_budget_bytes or 0))}"
        return "--tier none" + (f" --gpu-layers {self.n_gpu_layers}" if self.n_gpu_layers else "")

    def headline(self) -> str:
        what = {"ram": "all in RAM, llama.cpp as is", "gpu": "all layers on the GPU, llama.cpp as is",
                "flash": f"flash tier, {format_size(self.budget_bytes or 0)} of routed experts in RAM",
                "vram": f"vram tier, {format_size(self.vram_budget_bytes or 0)} of GPU memory"}[self.placement]
        return f"{what} (= {self.flags()})"

    def lines(self) -> list[str]:
        """The choice and why, in two lines."""
        return [f"auto placement: {self.headline()}", f"  why: {self.reason}"]

    def llama_kwargs(self) -> dict[str, Any]:
        """``Llama`` arguments of this plan."""
        return {"tier": None if self.tier == "none" else self.tier, "budget": self.budget_bytes,
                "vram_budget": self.vram_budget_bytes, "n_gpu_layers": self.n_gpu_layers}

    def to_json(self) -> dict[str, Any]:
        return {"tier": self.tier, "placement": self.placement, "budget_bytes": self.budget_bytes,
                "vram_budget_bytes": self.vram_budget_bytes, "n_gpu_layers": self.n_gpu_layers,
                "reason": self.reason, "flags": self.flags(), "n_ctx": self.n_ctx, "model_bytes": self.model_bytes,
                "expert_bytes": self.expert_bytes, "non_expert_bytes": self.non_expert_bytes,
                "kv_bytes": self.kv_bytes, "compute_reserve": self.compute_reserve,
                "ram_available": self.ram_available, "ram_margin": self.ram_margin,
                "ram_usable": self.ram_available - self.ram_margin, "vram_free": self.vram_free,
                "vram_margin": self.vram_margin, "margin_rule": MARGIN_RULE, "machine": self.facts.to_json(),
                "notes": list(self.notes)}


MARGIN_RULE = (f"RAM: max({RAM_MARGIN_MIN // MiB} MiB, {RAM_MARGIN_FRACTION:.0%} of available) unused; "
               f"VRAM: max({VRAM_MARGIN_MIN // MiB} MiB, {VRAM_MARGIN_FRACTION:.0%} of free) unused plus a "
               f"{COMPUTE_RESERVE // MiB} MiB compute reserve")


def kv_bytes_of(info: MoEModelInfo, n_ctx: int) -> int:
    """The f16 KV cache of ``n_ctx`` tokens, from the header (without head counts: no grouped-query attention
    assumed, an upper bound)."""
    try:
        n_layer, n_head, n_head_kv, n_embd = budgets.kv_dims_of_gguf(info.path)
    except Exception:  # noqa: BLE001 - any header the estimate cannot read: the upper bound
        return int(n_ctx) * int(info.block_count) * 2 * int(info.n_embd) * 2
    return budgets.kv_cache_bytes(n_ctx, n_layer, n_head, n_head_kv, n_embd)


def smallest_flash_budget(info: MoEModelInfo) -> int:
    """The smallest budget the flash tier accepts for this model (``budgets.flash_budget``'s minimum)."""
    return budgets.smallest_flash_budget(budgets.tier_layout("flash", info))


def _ram_needed_for(usable: int) -> int:
    """The ``ram_available`` whose usable part (after the margin) is ``usable``."""
    return max(usable + RAM_MARGIN_MIN, -(-usable * 10 // 9))


def plan_fit(info: MoEModelInfo, facts: MachineFacts, *, n_ctx: int, allow_gpu: bool = True,
             kv_bytes: int | None = None, compute_reserve: int = COMPUTE_RESERVE) -> FitPlan:
    """Choose the placement of ``info`` on a machine with ``facts`` (module docstring: the rules and margins).
    ``allow_gpu=False`` plans for the CPU only (an explicit ``n_gpu_layers=0``)."""
    if n_ctx < 1:
        raise SpacError(f"n_ctx must be at least 1, not {n_ctx}")
    kv = kv_bytes_of(info, n_ctx) if kv_bytes is None else int(kv_bytes)
    model = int(info.total_tensor_bytes) or int(info.file_size)
    expert, non_expert = int(info.expert_bytes), int(info.non_expert_bytes)
    ram = facts.ram_available
    r_margin = ram_margin(ram)
    ram_usable = ram - r_margin
    whole = model + kv + compute_reserve
    notes: list[str] = list(facts.notes)
    gpu = facts.gpu if allow_gpu else None
    v_free = v_margin = None
    name = info.path.name
    common = dict(n_ctx=n_ctx, model_bytes=model, expert_bytes=expert, non_expert_bytes=non_expert, kv_bytes=kv,
                  compute_reserve=compute_reserve, ram_available=ram, ram_margin=r_margin, vram_free=None,
                  vram_margin=None, facts=facts)
    sizes = (f"model {format_size(model)} + KV cache of {n_ctx} tokens {format_size(kv)} + compute "
             f"{format_size(compute_reserve)} = {format_size(whole)}")

    if gpu is not None:
        v_free, v_margin = int(gpu.free), vram_margin(int(gpu.free))
        common.update(vram_free=v_free, vram_margin=v_margin)
        v_usable = v_free - v_margin
        gname = gpu.name or "the GPU"
        if whole <= v_usable:
            return FitPlan("none", "gpu", -1, None, None,
                           f"{sizes} fit in {gname}'s {format_size(v_free)} free less a {format_size(v_margin)} "
                           "margin", notes=tuple(notes), **common)
        if info.is_moe and facts.patch_level >= POOL_PATCH_LEVEL:
            vbudget = _mib_floor(v_usable)
            try:
                groups, _ = budgets.pool_groups(budgets.tier_layout("vram", info))
                vb = budgets.vram_budget(vbudget, groups, non_expert_bytes=non_expert, kv_bytes=kv,
                                         compute_reserve=compute_reserve, name=name)
            except SpacError:
                vb = None
                notes.append(f"{gname}: {format_size(v_usable)} usable is too little for the vram tier (non-expert "
                             f"weights {format_size(non_expert)}, KV {format_size(kv)}, compute "
                             f"{format_size(compute_reserve)} and one expert slot)")
            if vb is not None:
                if expert + compute_reserve <= ram_usable:
                    return FitPlan("vram", "vram", -1, None, vbudget,
                                   f"{sizes} exceed {gname}'s {format_size(v_free)} free (less a "
                                   f"{format_size(v_margin)} margin): non-expert weights, KV cache and compute on the "
                                   f"GPU with a {format_size(vb.pool_bytes)} expert pool; the routed experts "
                                   f"({format_size(expert)}) in RAM ({format_size(ram_usable)} usable)",
                                   notes=tuple(notes), **common)
                notes.append(f"vram tier not chosen: its routed experts ({format_size(expert)}) stay in host memory, "
                             f"more than the {format_size(ram_usable)} of usable RAM")
        elif info.is_moe:
            notes.append(f"{gname} is present but the vram tier needs spac's patched llama.cpp with the expert "
                         "pool (scripts/build_llama.sh --cuda); planning for the CPU")

    if whole <= ram_usable:
        return FitPlan("none", "ram", 0, None, None,
                       f"{sizes} fit in {format_size(ram)} of available RAM less a {format_size(r_margin)} margin",
                       notes=tuple(notes), **common)
    fixed = non_expert + kv + compute_reserve
    if not info.is_moe:
        raise SpacError(
            f"{name} does not fit this machine: {sizes} of RAM plus a margin, but {facts.describe()}; this is a "
            "dense model (the flash tier needs routed experts): free memory, lower --ctx or use a smaller model")
    smallest = smallest_flash_budget(info)
    budget = min(_mib_floor(ram_usable - fixed), _mib_floor(expert + MiB))
    if budget < smallest:
        need = _ram_needed_for(fixed + smallest)
        raise SpacError(
            f"{name} ({format_size(model)}) does not fit this machine's RAM + VRAM: the smallest working budget is "
            f"--tier flash --budget {_flag_size(-(-smallest // MiB) * MiB)}, which needs {format_size(need)} of "
            f"available RAM (non-expert weights {format_size(non_expert)} + KV cache of {n_ctx} tokens "
            f"{format_size(kv)} + compute {format_size(compute_reserve)} + budget {format_size(smallest)}, and the "
            f"safety margin), but {facts.describe()}; free memory or lower --ctx")
    return FitPlan("flash", "flash", 0, budget, None,
                   f"{sizes} exceed {format_size(ram)} of available RAM less a {format_size(r_margin)} margin: "
                   f"non-expert weights {format_size(non_expert)}, KV cache and compute stay in RAM, "
                   f"{format_size(budget)} for routed experts ({100 * budget / max(expert, 1):.0f}% of "
                   f"{format_size(expert)}), the rest streamed from the file", notes=tuple(notes), **common)
