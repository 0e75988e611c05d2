"""The VRAM tier: non-expert weights on the GPU, hot routed experts in its expert pool, the rest on CPU threads.

Needs spac's patched llama.cpp (``scripts/build_llama.sh --cuda``): the pool, its asynchronous copies and
the two-path expert computation live there (``expert_pool.py``, docs/patches.md). Per evaluation step,
top to bottom (steps 1-2 are the shared loop of ``tiers/base.py``; the pool's size comes from
``planning.budgets.vram_budget``):

1. routing (the sensor's counts over the step's k+1 tokens) -> the utility estimator;
2. utility -> the balancer (``vram``: GPU and CPU compute in parallel; background re-planner) -> a plan
   of which experts sit in the pool, within the pool's bytes and each layer group's slots (or a baseline
   policy's plan, ``policy=``: ``planning/policies.py``);
3. plan -> moves: unwanted experts are evicted (their slots return after a fence with the finished
   evaluation), wanted ones are copied in, hottest first, by llama.cpp's copy worker while the next
   steps compute. A copy is used from the first evaluation that starts after it finished.

Output never depends on the pool's content: each selected expert is computed either from its slot or
from the full tensor on the CPU, with the same kernels' arithmetic.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.base.sizes import format_size
from spac_llamacpp.gguf.info import MoEModelInfo
from spac_llamacpp.native.expert_pool import FREE, RESIDENT, ExpertPool, PoolError, PoolLayout
from spac_llamacpp.native.libs import device_names
from spac_llamacpp.planning import budgets
from spac_llamacpp.planning.budgets import DEFAULT_COMPUTE_RESERVE
from spac_llamacpp.planning.placement_config import PlacementConfig
from spac_llamacpp.planning.reference_caches import count_hits, hit_rate
from spac_llamacpp.tiers.base import LoopOptions, TierController, TierCounters

log = logging.getLogger(__name__)

# routed expert weights stay in host memory (the pool holds copies); first match wins in llama.cpp
EXPERT_OVERRIDE = r"\.ffn_(gate|up|down|gate_up)_exps\.weight$"


def vram_overrides(user: Any) -> list[tuple[str, Any]]:
    """The user's tensor placement (first match wins) followed by: routed expert weights on the CPU."""
    from spac_llamacpp.native.params import parse_overrides

    return [*parse_overrides(user), (EXPERT_OVERRIDE, "CPU")]


def kv_cache_bytes(model: Any, n_ctx: int) -> int:
    """Estimated f16 KV cache bytes of a context (``n_ctx`` tokens, every layer, K and V), from llama.cpp's
    hyperparameters of the loaded model (``planning.budgets.kv_cache_bytes``)."""
    from llama_cpp import llama_cpp as llama_c

    return budgets.kv_cache_bytes(n_ctx, llama_c.llama_model_n_layer(model), llama_c.llama_model_n_head(model),
                                  llama_c.llama_model_n_head_kv(model), llama_c.llama_model_n_embd(model))


def pool_groups_of(layout: PoolLayout, n_expert: int) -> list[budgets.PoolGroup]:
    """The pool's slot groups as llama.cpp formed them."""
    return [budgets.PoolGroup(b, len(layout.layers_of(g)), n_expert) for g, b in enumerate(layout.slot_bytes)]


@dataclass
class VramCounters(TierCounters):
    routed: int = 0  # activations: distinct (evaluation, MoE layer, expert) (docs/hit_rate.md)
    routed_hits: int = 0  # ... served from the pool
    loads: int = 0
    evictions: int = 0
    over_capacity_dropped: int = 0  # planned experts beyond a group's slots (multi-group models)


class VramTier(TierController):
    """Drives the expert pool of one context from speculative utility.

    Args:
        llm: the loaded ``llama_cpp.Llama`` (its context gets the pool).
        info: the model header.
        budget: GPU bytes for the model: non-expert weights, KV cache, ``compute_reserve`` and the pool
            (``planning.budgets.vram_budget``).
        n_ctx: the context length (for the KV estimate).
        on_host: put the pool in host memory (testing without a GPU; same code path otherwise).
        slots: slots per group, overriding the budget arithmetic (testing, experiments).
        compute_reserve: bytes kept for llama.cpp's compute buffers.
        non_expert_on_gpu: whether the non-expert weights (and KV cache) count against the budget.
        loop: the shared loop's options as in the flash tier (:class:`~spac_llamacpp.tiers.base.LoopOptions`;
            default configuration :meth:`PlacementConfig.vram`), ``policy`` included: a baseline's plan is
            applied by the same moves (lru, lfu: a step's CPU-computed experts are copied in after it).
    """

    name = "vram"

    def __init__(
        self,
        llm: Any,
        info: MoEModelInfo,
        budget: int,
        *,
        n_ctx: int = budgets.DEFAULT_N_CTX,
        on_host: bool = False,
        slots: list[int] | None = None,
        compute_reserve: int = DEFAULT_COMPUTE_RESERVE,
        non_expert_on_gpu: bool = True,
        **loop: Any,
    ) -> None:
        options = LoopOptions.parse(PlacementConfig.vram(), **loop)
        self.info = info
        self.budget = int(budget)
        self.pool_layout = PoolLayout.of(llm.model)
        rows = np.asarray(info.moe_layers, dtype=np.int64)
        groups = self.pool_layout.group_of_layer
        if sorted(il for il, g in enumerate(groups) if g >= 0) != sorted(int(b) for b in rows):
            raise SpacError(f"llama.cpp's expert layers {[il for il, g in enumerate(groups) if g >= 0]} differ from "
                            f"the GGUF header's {list(info.moe_layers)}; the VRAM tier cannot serve {info.path.name}")
        self.group_of_row = np.array([groups[b] for b in rows], dtype=np.int64)
        self.kv_bytes = kv_cache_bytes(llm.model, n_ctx) if non_expert_on_gpu else 0
        self.budget_split = budgets.vram_budget(
            self.budget, pool_groups_of(self.pool_layout, info.n_expert),
            non_expert_bytes=info.non_expert_bytes if non_expert_on_gpu else 0, kv_bytes=self.kv_bytes,
            compute_reserve=int(compute_reserve), slots=slots, name=info.path.name)
        self.fixed_bytes = self.budget_split.fixed
        if not on_host and all(name.upper().startswith("CPU") for name in device_names()):
            raise SpacError(
                "tier='vram' found no GPU: build llama.cpp with SPAC_LLAMA_BACKEND=--cuda bash scripts/setup.sh "
                "(or scripts/build_llama.sh --cuda), or pass vram_options={'on_host': True} (CLI --pool-on-host) "
                "to run the pool in host memory for testing"
            )
        try:
            self.pool = ExpertPool(llm, list(self.budget_split.slots), on_host=on_host)
        except PoolError as exc:
            raise SpacError(f"tier='vram': {exc}") from exc
        try:
            self.pool.set_sources_from_file(info)  # repacked CPU experts are copied from the file
            self.n_slots = list(self.pool.n_slots)
            self.free: list[list[int]] = [list(range(n - 1, -1, -1)) for n in self.n_slots]  # pop() takes slot 0
            self.retired: list[tuple[int, int]] = []  # (group, slot) until the next fence
            self.slot_of = np.full((len(rows), info.n_expert), -1, dtype=np.int64)
            self.counters = VramCounters()
            # the balancer sees the pool's bytes only (everything else is fixed)
            self._start(info, budgets.tier_layout("vram", info), self.pool.pool_bytes, options)
            log.info("vram tier: budget %s, pool %s (%s slots%s), cost model %s", format_size(self.budget),
                     format_size(self.pool.pool_bytes), "+".join(map(str, self.n_slots)),
                     ", host memory" if on_host else "", self.cost.source or "given")
        except BaseException:
            self.close()
            raise

    # --- the per-step data path (the loop is TierController.on_step) --------------------------------
    def _observe(self, counts: np.ndarray) -> None:
        c = self.counters
        served = self.served(counts > 0)
        hits, activations = count_hits(counts > 0, served)
        c.routed += activations
        c.routed_hits += hits

    def _move(self, x: np.ndarray, utility: np.ndarray, initial: bool) -> np.ndarray:
        """Evict what the plan dropped, fence, copy in what it added (hottest first) into free slots."""
        x, dropped = budgets.fit_groups(x, utility, self.n_slots, self.group_of_row)
        self.counters.over_capacity_dropped += dropped
        for i, e in zip(*np.nonzero(self.wanted & ~x), strict=True):
            self._evict(i, e)
        if self.retired:
            self.pool.fence()  # the evaluation that may still read them is over: their slots are free
            pending = []
            for g, s in self.retired:
                # a slot evicted while its copy ran is freed only by a fence after that copy ended
                if self.pool.slot(g, s)[0] == FREE:
                    self.free[g].append(s)
                else:
                    pending.append((g, s))
            self.retired = pending
        add = x & ~self.wanted
        order = np.argsort(-utility[add], kind="stable")
        for i, e in np.transpose(np.nonzero(add))[order]:
            g = int(self.group_of_row[i])
            if not self.free[g]:
                x[i, e] = False  # slots still retired behind a cancelled copy: a later plan retries
                continue
            s = self.free[g].pop()
            self.pool.load(int(self.rows[i]), int(e), s)
            self.slot_of[i, e] = s
            self.counters.loads += 1
        return x

    def _evict(self, i: int, e: int) -> None:
        g, s = int(self.group_of_row[i]), int(self.slot_of[i, e])
        self.pool.evict(int(self.rows[i]), int(e))
        self.retired.append((g, s))
        self.slot_of[i, e] = -1
        self.counters.evictions += 1

    def served(self, among: np.ndarray | None = None) -> np.ndarray:
        """``[n_moe_layer, n_expert]``: experts the last evaluation computed from the pool (slot resident),
        optionally only ``among`` these (one native call per candidate)."""
        out = np.zeros(self.wanted.shape, bool)
        candidates = self.slot_of >= 0 if among is None else (self.slot_of >= 0) & among
        for i, e in zip(*np.nonzero(candidates), strict=True):
            state, _, _ = self.pool.slot(int(self.group_of_row[i]), int(self.slot_of[i, e]))
            out[i, e] = state == RESIDENT
        return out

    # --- reporting and shutdown -------------------------------------------------------------------
    def _settle(self, seconds: float) -> None:
        self.pool.fence(wait_loads=True)

    def _tier_stats(self) -> dict[str, Any]:
        c = self.counters
        loads_done, bytes_copied = self.pool.counters()
        return {
            "vram_budget_bytes": self.budget,
            "pool_bytes": self.pool.pool_bytes,
            "pool_on_host": self.pool.on_host,
            "slots": list(self.n_slots),
            "fixed_bytes": self.fixed_bytes,
            "kv_bytes_estimate": self.kv_bytes,
            "resident_experts": int(self.served().sum()),
            "hit_rate": hit_rate(c.routed_hits, c.routed),
            "loads": c.loads,
            "evictions": c.evictions,
            "copies_done": loads_done,
            "bytes_copied": bytes_copied,
            "over_capacity_dropped": c.over_capacity_dropped,
        }

    def _release(self) -> None:
        """Remove the pool (the context stays usable)."""
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.close()
