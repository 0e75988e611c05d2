"""What a tier's budget means: one function per tier, used by the runtime tiers, ``spac simulate`` and the benchmarks.

- **flash** (``Llama(tier="flash", budget=B)``): ``B`` is RAM for routed experts (the non-expert weights are
  counted and locked separately). The plan gets ``B - staging - keep - lookahead - edges``: ``staging`` is one
  layer's worth of on-demand reads (k experts of the largest layer: the layer being computed), ``keep`` the
  same again for a step's demand loads kept until the step ends (so that the plan after the step can keep
  them without reading them again), ``lookahead`` the same again when the tier keeps a step's unplanned
  experts for the next one, ``edges`` the pages a tensor shares with other data at its two ends (never
  evicted). Sizes are whole pages (:func:`tier_layout`). At a step boundary the staging and keep reserves
  are empty again (the step's demand loads are planned, looked ahead or evicted before the budget check),
  so the resident expert bytes are at most ``B - staging - keep`` there by construction.
- **vram** (``Llama(tier="vram", vram_budget=B)``): ``B`` is GPU memory for the model. The expert pool gets
  ``B - non-expert weights - KV cache - compute reserve``, in whole slots per layer group (a group's slot
  holds one expert of its layers), split over groups by their expert bytes.

Each returns a small record with the parts; a budget that leaves no room for one expert is a one-line
:class:`~spac_llamacpp.base.errors.SpacError` naming what is needed.

A budget is written as a size (``6GiB``) or as a share of the model's routed expert bytes (``50%``);
:func:`parse_budget` is the one parser of both (``Llama(budget=)``, ``spac-run --budget``/``--vram-budget``, the
bench scripts).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.base.sizes import format_size, parse_size
from spac_llamacpp.gguf.info import MoEModelInfo
from spac_llamacpp.planning.costmodel import ExpertLayout

TIERS = ("flash", "vram")
# GPU memory kept free for llama.cpp's compute buffers (activations, graph) unless told otherwise
DEFAULT_COMPUTE_RESERVE = 256 << 20
# the context length a budget's KV cache is estimated for when none is given (llama_cpp.Llama's default)
DEFAULT_N_CTX = 512


def _check_tier(tier: str) -> None:
    if tier not in TIERS:
        raise SpacError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")


_SHARE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*$")


def parse_budget(text: str | int, tier: str, info: MoEModelInfo, *, n_ctx: int = DEFAULT_N_CTX,
                 compute_reserve: int = DEFAULT_COMPUTE_RESERVE, check: bool = True) -> int:
    """A tier's budget in bytes from a size (``6GiB``, ``123456``) or a share of the model's routed expert bytes
    given to experts (``50%``). flash: the share is the budget (RAM for routed experts; the plan gets it less the
    staging and lookahead reserves); vram: the share is the pool, and the budget adds the non-expert weights, the
    KV cache of ``n_ctx`` tokens and the compute reserve. ``check``: refuse a budget the tier would refuse
    (:func:`flash_budget`, :func:`vram_budget`) now, before anything loads."""
    _check_tier(tier)
    share = None
    if isinstance(text, str) and "%" in text:
        m = _SHARE_RE.match(text)
        if not m:
            raise SpacError(f"invalid budget {text!r}; give a size (6GiB, 512MiB) or a share of the model's routed "
                            "expert bytes (50%)")
        share = int(info.expert_bytes * float(m.group(1)) / 100)
    if tier == "flash":
        budget = share if share is not None else parse_size(text)
        if check:
            flash_budget(budget, tier_layout("flash", info), name=info.path.name)
        return budget
    fixed = vram_fixed_parts(info, n_ctx, compute_reserve)
    budget = vram_budget_for_pool(share, **fixed) if share is not None else parse_size(text)
    if check:
        vram_budget(budget, pool_groups(tier_layout("vram", info))[0], name=info.path.name, **fixed)
    return budget


def page_layout(info: MoEModelInfo) -> ExpertLayout:
    """The model's expert layout with each tensor's share rounded out to whole pages (what residency costs
    in the flash tier). Non-expert bytes are 0: the flash budget counts routed experts only."""
    from spac_llamacpp.native.flash_engine import covering_bytes

    cov = covering_bytes(info)
    tensors = []
    for il in info.moe_layers:
        ts = [t for t in info.layer_tensors(il) if not t.is_chunk]
        total = sum(t.bytes_per_expert for t in ts)
        extra = int(cov[il].max()) - total  # page rounding of the whole expert, spread over its tensors
        tensors.append(tuple((t.ggml_type, t.bytes_per_expert + (extra if j == 0 else 0)) for j, t in enumerate(ts)))
    return ExpertLayout(tuple(info.moe_layers), info.n_expert, tuple(tensors),
                        tuple(info.n_expert_used[il] for il in info.moe_layers), 0, str(info.path))


def tier_layout(tier: str, info: MoEModelInfo) -> ExpertLayout:
    """The expert layout a tier plans with: flash in whole pages, vram as in the file; non-expert bytes 0
    (the budget functions take them out before the balancer sees the budget)."""
    _check_tier(tier)
    if tier == "flash":
        return page_layout(info)
    return dataclasses.replace(ExpertLayout.from_info(info), non_expert_bytes=0)


# --------------------------------------------------------------------------------------------------
# flash


def staging_bytes(layout: ExpertLayout) -> int:
    """One layer's worth of on-demand experts (k experts of the largest layer): the flash tier's staging."""
    return max((k * int(s) for k, s in zip(layout.n_expert_used, layout.expert_bytes, strict=True)), default=0)


def edge_bytes(layout: ExpertLayout) -> int:
    """Bound on the expert bytes in pages that expert tensors share with other data at their two ends (the
    flash tier never evicts those pages): two pages per expert tensor."""
    return 2 * os.sysconf("SC_PAGE_SIZE") * sum(len(ts) for ts in layout.tensors)


@dataclass(frozen=True)
class FlashBudget:
    """The flash tier's RAM budget for routed experts and what the plan gets of it."""

    budget: int  # as given: RAM for routed experts
    staging: int  # one layer's on-demand reads (the layer being computed)
    lookahead: int  # the next step's prefetch of this step's unplanned experts (0: lookahead off)
    keep: int = 0  # a step's demand loads kept until it ends (0: evicted after their layer)
    edges: int = 0  # tensor edge pages shared with other data (never evicted)

    @property
    def plan_bytes(self) -> int:
        """Bytes the balancer places experts in."""
        return self.budget - self.staging - self.keep - self.lookahead - self.edges

    @property
    def at_step_boundary(self) -> int:
        """The most expert bytes resident at a step boundary (budget checks): the plan, the lookahead and the
        edge pages; the staging and keep reserves are empty there."""
        return self.budget - self.staging - self.keep


def flash_reserves(layout: ExpertLayout, *, lookahead: bool = True, keep: bool = True,
                   edge_pages: bool = True) -> int:
    """What :func:`flash_budget` keeps out of the plan: staging, keep and lookahead reserves, edge pages."""
    return staging_bytes(layout) * (1 + int(lookahead) + int(keep)) + (edge_bytes(layout) if edge_pages else 0)


def flash_budget_for_plan(plan_bytes: int, layout: ExpertLayout, *, lookahead: bool = True, keep: bool = True,
                          edge_pages: bool = True) -> int:
    """The flash budget whose plan gets ``plan_bytes`` (the inverse of :func:`flash_budget`)."""
    return int(plan_bytes) + flash_reserves(layout, lookahead=lookahead, keep=keep, edge_pages=edge_pages)


def smallest_flash_budget(layout: ExpertLayout, *, lookahead: bool = True, keep: bool = True,
                          edge_pages: bool = True) -> int:
    """The smallest budget :func:`flash_budget` accepts: its reserves and one resident expert."""
    smallest = int(layout.expert_bytes.min()) if layout.n_layer else 0
    return flash_budget_for_plan(smallest, layout, lookahead=lookahead, keep=keep, edge_pages=edge_pages)


def flash_budget(budget: int, layout: ExpertLayout, *, lookahead: bool = True, keep: bool = True,
                 edge_pages: bool = True, name: str = "") -> FlashBudget:
    """Split a flash budget (RAM for routed experts); ``layout`` in whole pages (:func:`tier_layout`).
    ``keep``: reserve room for a step's demand loads kept until the step ends; ``edge_pages``: reserve the
    tensors' edge pages (a model file's layout; not a trace's recorded sizes, which have no file offsets)."""
    staging = staging_bytes(layout)
    ahead = staging if lookahead else 0
    kept = staging if keep else 0
    edges = edge_bytes(layout) if edge_pages else 0
    smallest = int(layout.expert_bytes.min()) if layout.n_layer else 0
    need = smallest_flash_budget(layout, lookahead=lookahead, keep=keep, edge_pages=edge_pages)
    if int(budget) < need:
        raise SpacError(
            f"budget {format_size(int(budget))} is too small for the flash tier{' of ' + name if name else ''}: it "
            f"needs {format_size(staging)} for one layer's on-demand experts"
            + (f", {format_size(kept)} for the demand loads a step keeps" if keep else "")
            + (f", {format_size(ahead)} for lookahead" if lookahead else "")
            + (f", {format_size(edges)} for tensor edge pages" if edge_pages else "")
            + f" and {format_size(smallest)} for one resident expert; "
            f"give at least {format_size(need)} ({need} bytes)"
        )
    return FlashBudget(int(budget), staging, ahead, kept, edges)


# --------------------------------------------------------------------------------------------------
# vram


def kv_cache_bytes(n_ctx: int, n_layer: int, n_head: int, n_head_kv: int, n_embd: int) -> int:
    """Estimated f16 KV cache bytes of a context (``n_ctx`` tokens, every layer, K and V)."""
    head_dim = int(n_embd) // max(1, int(n_head))
    return int(n_ctx) * int(n_layer) * 2 * int(n_head_kv) * head_dim * 2


def kv_dims_of_gguf(path: str | os.PathLike[str]) -> tuple[int, int, int, int]:
    """``(n_layer, n_head, n_head_kv, n_embd)`` from a GGUF header, as llama.cpp reads them (a per-layer
    head count: its first layer's), for :func:`kv_cache_bytes` without loading the model."""
    import gguf

    reader = gguf.GGUFReader(Path(path))
    arch = str(reader.fields["general.architecture"].contents())

    def val(key: str, default: int | None = None) -> int:
        f = reader.fields.get(f"{arch}.{key}")
        if f is None:
            if default is None:
                raise SpacError(f"{Path(path).name} has no {arch}.{key}; cannot estimate its KV cache")
            return default
        v = f.contents()
        return int(v[0] if isinstance(v, list) else v)

    n_head = val("attention.head_count")
    return val("block_count"), n_head, val("attention.head_count_kv", n_head), val("embedding_length")


@dataclass(frozen=True)
class PoolGroup:
    """Layers whose experts share a slot size (same tensor types and shapes)."""

    slot_bytes: int  # one expert of every kind
    n_layers: int
    n_expert: int


def pool_groups(layout: ExpertLayout) -> tuple[tuple[PoolGroup, ...], tuple[int, ...]]:
    """The slot groups of a layout read from the header (what llama.cpp's pool forms: layers with the same
    expert tensor types and sizes) and each MoE layer's group."""
    keys: list[tuple[tuple[str, int], ...]] = []
    of_row = []
    for ts in layout.tensors:
        if ts not in keys:
            keys.append(ts)
        of_row.append(keys.index(ts))
    groups = tuple(PoolGroup(sum(b for _, b in k), of_row.count(g), layout.n_expert) for g, k in enumerate(keys))
    return groups, tuple(of_row)


def split_slots(pool_bytes: int, groups: Sequence[PoolGroup]) -> list[int]:
    """Slots per group from the pool's bytes, in proportion to each group's expert bytes."""
    totals = [g.n_layers * g.n_expert * g.slot_bytes for g in groups]
    whole = sum(totals)
    out = []
    for g, total in zip(groups, totals, strict=True):
        share = pool_bytes * total / whole if whole else 0
        out.append(int(min(share // g.slot_bytes, g.n_layers * g.n_expert)) if g.slot_bytes else 0)
    return out


@dataclass(frozen=True)
class VramBudget:
    """The VRAM tier's GPU budget for the model and the expert pool it leaves."""

    budget: int  # as given: GPU memory for the model
    non_expert: int  # non-expert weights on the GPU (0 when they are not counted)
    kv: int  # estimated KV cache
    compute_reserve: int
    slots: tuple[int, ...]  # per group
    slot_bytes: tuple[int, ...]  # per group

    @property
    def fixed(self) -> int:
        """Everything but the pool."""
        return self.non_expert + self.kv + self.compute_reserve

    @property
    def pool_bytes(self) -> int:
        """Bytes of the pool's whole slots: what the balancer places experts in."""
        return sum(n * b for n, b in zip(self.slots, self.slot_bytes, strict=True))


def vram_budget(budget: int, groups: Sequence[PoolGroup], *, non_expert_bytes: int, kv_bytes: int,
                compute_reserve: int = DEFAULT_COMPUTE_RESERVE, slots: Sequence[int] | None = None,
                name: str = "") -> VramBudget:
    """Split a VRAM budget: the pool gets ``budget - non-expert weights - KV cache - compute reserve`` in whole
    slots (``slots`` overrides the arithmetic: testing, experiments)."""
    fixed = int(non_expert_bytes) + int(kv_bytes) + int(compute_reserve)
    slot_bytes = tuple(int(g.slot_bytes) for g in groups)
    if slots is None:
        slots = split_slots(max(int(budget) - fixed, 0), groups)
        if sum(slots) == 0:
            smallest = min(slot_bytes) if slot_bytes else 0
            need = fixed + smallest
            raise SpacError(
                f"vram budget {format_size(int(budget))} is too small{' for ' + name if name else ''}: the non-expert "
                f"weights ({format_size(int(non_expert_bytes))}), KV cache ({format_size(int(kv_bytes))}) and compute "
                f"reserve ({format_size(int(compute_reserve))}) need {format_size(fixed)}, plus one expert slot "
                f"{format_size(smallest)}; give at least {format_size(need)} ({need} bytes)"
            )
    return VramBudget(int(budget), int(non_expert_bytes), int(kv_bytes), int(compute_reserve),
                      tuple(int(s) for s in slots), slot_bytes)


def vram_fixed_parts(info: MoEModelInfo, n_ctx: int = DEFAULT_N_CTX,
                     compute_reserve: int = DEFAULT_COMPUTE_RESERVE) -> dict[str, int]:
    """What the VRAM tier's budget holds besides the pool, from the header: ``non_expert_bytes``, ``kv_bytes`` (the
    KV cache of ``n_ctx`` tokens) and ``compute_reserve``, as :func:`vram_budget` takes them."""
    kv = kv_cache_bytes(n_ctx, *kv_dims_of_gguf(info.path))
    return {"non_expert_bytes": info.non_expert_bytes, "kv_bytes": kv, "compute_reserve": int(compute_reserve)}


def vram_budget_for_pool(pool_bytes: int, *, non_expert_bytes: int, kv_bytes: int,
                         compute_reserve: int = DEFAULT_COMPUTE_RESERVE) -> int:
    """The VRAM budget that leaves ``pool_bytes`` for the pool (the inverse of :func:`vram_budget`, before
    rounding to whole slots)."""
    return int(pool_bytes) + int(non_expert_bytes) + int(kv_bytes) + int(compute_reserve)


def fit_groups(x: np.ndarray, utility: np.ndarray, n_slots: Sequence[int],
               group_of_row: np.ndarray) -> tuple[np.ndarray, int]:
    """Keep each group's planned experts within its slots (highest utility first); returns the fitted
    plan and how many planned experts were dropped (only models whose layers form several groups)."""
    x = np.array(x, bool, copy=True)
    dropped = 0
    for g, n in enumerate(n_slots):
        rows = np.asarray(group_of_row) == g
        planned = np.nonzero(x & rows[:, None])
        if len(planned[0]) <= n:
            continue
        order = np.argsort(-utility[planned], kind="stable")
        drop = order[n:]
        x[planned[0][drop], planned[1][drop]] = False
        dropped += len(drop)
    return x, dropped


def layer_capacities(size: np.ndarray, budget: int) -> np.ndarray:
    """Experts per layer of a per-layer cache within ``budget`` bytes: the budget split evenly over the
    layers in whole experts (``size`` ``[L, E]``, equal within a layer), the bytes left over handed out one
    expert at a time in layer order."""
    L, E = size.shape
    per = size.max(axis=1).astype(np.int64)
    cap = np.minimum(np.where(per > 0, (int(budget) // max(L, 1)) // np.maximum(per, 1), E), E)
    left = int(budget) - int((cap * per).sum())
    changed = True
    while changed:
        changed = False
        for i in range(L):
            if cap[i] < E and per[i] <= left:
                cap[i] += 1
                left -= int(per[i])
                changed = True
    return cap
