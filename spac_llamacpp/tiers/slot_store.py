"""The flash tier's slot store: experts kept in the slots of a host expert pool instead of the page cache.

``FlashTier(read="slots")``: the budget becomes a host expert pool (patch 0003, ``on_host``) of whole-expert slots
per layer group; the engine (``native/spac_engine.h``, ``spac_engine_set_slots``) reads experts into them with
``O_DIRECT`` (no page cache: nothing to evict, 6-15x less CPU per byte moved than readahead + drop, docs/flash.md
"Read method"), frees a slot to evict, and writes each layer's id maps just before the graph reads them, so the
pool's path computes the experts in slots and the full tensors only what spilled. Same kernels on the same bytes:
outputs are those of stock.
"""

from __future__ import annotations

from typing import Any

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.gguf.info import MoEModelInfo
from spac_llamacpp.native.expert_pool import KINDS, ExpertPool, PoolLayout
from spac_llamacpp.native.flash_engine import SlotSpec
from spac_llamacpp.planning.budgets import split_slots
from spac_llamacpp.tiers.vram import pool_groups_of

DEMAND_READERS = 3
"""Threads reading demand loads into slots (with the completer: four O_DIRECT reads in flight)."""


def open_slot_store(llm: Any, info: MoEModelInfo, budget: int,
                    readers: int = DEMAND_READERS) -> tuple[ExpertPool, SlotSpec]:
    """Configure the host pool of ``llm``'s context within ``budget`` bytes; return it and the engine's view of it."""
    if llm is None:
        raise SpacError("read='slots' needs the model's context (use spac_llamacpp.Llama(..., tier='flash', "
                        "flash_options={'read': 'slots'}))")
    model = getattr(getattr(llm, "_model", None), "model", None)
    if model is None:
        raise SpacError("read='slots': the model is not loaded")
    layout = PoolLayout.of(model)
    n_slots = split_slots(budget, pool_groups_of(layout, info.n_expert))  # as the vram tier splits its pool
    if not any(n_slots):
        raise SpacError(f"a budget of {budget} bytes holds no expert slot of {info.path.name} "
                        f"({max(layout.slot_bytes, default=0)} bytes each); raise the budget")
    pool = ExpertPool(llm, n_slots, on_host=True)
    try:
        bases: dict[tuple[int, int], tuple[int, int]] = {}
        seen: dict[int, int] = {}
        for t in info.expert_tensors:
            if t.is_chunk:
                continue
            i = seen.get(t.layer, 0)
            seen[t.layer] = i + 1
            group = layout.group_of_layer[t.layer]
            if t.kind not in KINDS or group < 0:
                raise SpacError(f"read='slots': expert tensor {t.name} has no place in the pool; use read='pagecache'")
            addr, stride = pool.tensor_data(group, t.kind)
            if addr == 0 and n_slots[group] > 0:
                raise SpacError(f"read='slots': the pool has no host tensor for {t.name}; use read='pagecache'")
            bases[(t.layer, i)] = (addr, stride)
        return pool, SlotSpec(tuple(n_slots), tuple(layout.group_of_layer), bases, readers)
    except BaseException:
        pool.close()
        raise
