"""The VRAM tier: non-expert weights on the GPU, hot routed experts in its expert pool, the rest on CPU threads.

Needs spac's patched llama.cpp (``scripts/build_llama.sh --cuda``): the pool, its asynchronous copies and
the two-path expert computation live there (``expert_pool.py``, docs/patches.md). Per evaluation step,
top to bottom:

1. routing (the sensor's counts over the step's k+1 tokens) -> the utility estimator;
2. utility -> the balancer (``vram``: GPU and CPU compute in parallel; background re-planner) -> a plan
   of which experts sit in the pool, within the pool's bytes and each layer group's slots;
3. plan -> moves: unwanted experts are evicted (their slots return after a fence with the finished
   evaluation), wanted ones are copied in, hottest first, by llama.cpp's copy worker while the next
   steps compute. A copy is used from the first evaluation that starts after it finished.

Output never depends on the pool's content: each selected expert is computed either from its slot or
from the full tensor on the CPU, with the same kernels' arithmetic.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.base.sizes import format_size
from spac_llamacpp.gguf.info import MoEModelInfo
from spac_llamacpp.native.expert_pool import FREE, RESIDENT, ExpertPool, PoolError, PoolLayout
from spac_llamacpp.native.libs import device_names
from spac_llamacpp.observe.profile import Profile, expected_demand
from spac_llamacpp.observe.routing import RoutingStep
from spac_llamacpp.planning.balancer import Balancer, Plan
from spac_llamacpp.planning.calibration import machine_cost_model
from spac_llamacpp.planning.costmodel import CostModel, ExpertLayout
from spac_llamacpp.planning.estimators import Observation, make_estimator
from spac_llamacpp.planning.reference_caches import count_hits, hit_rate
from spac_llamacpp.planning.replanner import Replanner

log = logging.getLogger(__name__)

# GPU memory kept free for llama.cpp's compute buffers (activations, graph) unless told otherwise
DEFAULT_COMPUTE_RESERVE = 256 << 20
# routed expert weights stay in host memory (the pool holds copies); first match wins in llama.cpp
EXPERT_OVERRIDE = r"\.ffn_(gate|up|down|gate_up)_exps\.weight$"


def vram_overrides(user: Any) -> list[tuple[str, Any]]:
    """The user's tensor placement (first match wins) followed by: routed expert weights on the CPU."""
    from spac_llamacpp.native.params import parse_overrides

    return [*parse_overrides(user), (EXPERT_OVERRIDE, "CPU")]


def kv_cache_bytes(model: Any, n_ctx: int) -> int:
    """Estimated f16 KV cache bytes of a context (``n_ctx`` tokens, every layer, K and V)."""
    from llama_cpp import llama_cpp as llama_c

    m = model
    n_layer = llama_c.llama_model_n_layer(m)
    n_head = max(1, llama_c.llama_model_n_head(m))
    n_head_kv = llama_c.llama_model_n_head_kv(m)
    head_dim = llama_c.llama_model_n_embd(m) // n_head
    return int(n_ctx) * n_layer * 2 * n_head_kv * head_dim * 2


def split_slots(pool_bytes: int, layout: PoolLayout, n_expert_of_group: list[int]) -> list[int]:
    """Slots per group from the pool's bytes, in proportion to each group's expert bytes."""
    totals = [len(layout.layers_of(g)) * n * b for g, (n, b) in enumerate(zip(n_expert_of_group, layout.slot_bytes,
                                                                            strict=True))]
    whole = sum(totals)
    out = []
    for g, b in enumerate(layout.slot_bytes):
        share = pool_bytes * totals[g] / whole if whole else 0
        out.append(int(min(share // b, len(layout.layers_of(g)) * n_expert_of_group[g])) if b else 0)
    return out


@dataclass
class VramCounters:
    steps: int = 0
    tokens: int = 0
    routed: int = 0  # activations: distinct (evaluation, MoE layer, expert) (docs/hit_rate.md)
    routed_hits: int = 0  # ... served from the pool
    plans_applied: int = 0
    loads: int = 0
    evictions: int = 0
    over_capacity_dropped: int = 0  # planned experts beyond a group's slots (multi-group models)


class VramTier:
    """Drives the expert pool of one context from speculative utility.

    Args:
        llm: the loaded ``llama_cpp.Llama`` (its context gets the pool).
        info: the model header.
        budget: GPU bytes for the model: non-expert weights, KV cache, ``compute_reserve`` and the pool.
        n_ctx: the context length (for the KV estimate).
        on_host: put the pool in host memory (testing without a GPU; same code path otherwise).
        slots: slots per group, overriding the budget arithmetic (testing, experiments).
        compute_reserve: bytes kept for llama.cpp's compute buffers.
        non_expert_on_gpu: whether the non-expert weights (and KV cache) count against the budget.
        estimator, solver, replan_every, drift, horizon, cost, background, profile: as in the flash tier.
    """

    def __init__(
        self,
        llm: Any,
        info: MoEModelInfo,
        budget: int,
        *,
        n_ctx: int = 512,
        on_host: bool = False,
        slots: list[int] | None = None,
        compute_reserve: int = DEFAULT_COMPUTE_RESERVE,
        non_expert_on_gpu: bool = True,
        estimator: str = "spac",
        solver: str = "greedy",
        replan_every: int = 16,
        drift: float = 0.5,
        horizon: float = 64.0,
        cost: CostModel | None = None,
        background: bool = True,
        profile: str | os.PathLike[str] | Profile | None = None,
    ) -> None:
        self.info = info
        self.budget = int(budget)
        self.pool_layout = PoolLayout.of(llm.model)
        self.rows = np.asarray(info.moe_layers, dtype=np.int64)
        row_of = {int(b): i for i, b in enumerate(self.rows)}
        groups = self.pool_layout.group_of_layer
        if sorted(il for il, g in enumerate(groups) if g >= 0) != sorted(row_of):
            raise SpacError(f"llama.cpp's expert layers {[il for il, g in enumerate(groups) if g >= 0]} differ from "
                            f"the GGUF header's {list(info.moe_layers)}; the VRAM tier cannot serve {info.path.name}")
        self.group_of_row = np.array([groups[b] for b in self.rows], dtype=np.int64)
        n_expert_of_group = [info.n_expert] * len(self.pool_layout.slot_bytes)

        self.kv_bytes = kv_cache_bytes(llm.model, n_ctx) if non_expert_on_gpu else 0
        self.fixed_bytes = (info.non_expert_bytes + self.kv_bytes if non_expert_on_gpu else 0) + int(compute_reserve)
        smallest = min(self.pool_layout.slot_bytes)
        if slots is None:
            pool_bytes = self.budget - self.fixed_bytes
            slots = split_slots(max(pool_bytes, 0), self.pool_layout, n_expert_of_group)
            if sum(slots) == 0:
                need = self.fixed_bytes + smallest
                raise SpacError(
                    f"vram budget {format_size(self.budget)} is too small for {info.path.name}: the non-expert weights "
                    f"({format_size(info.non_expert_bytes)}), KV cache ({format_size(self.kv_bytes)}) and compute "
                    f"reserve ({format_size(compute_reserve)}) need {format_size(self.fixed_bytes)}, plus one expert "
                    f"slot {format_size(smallest)}; give at least {format_size(need)} ({need} bytes)"
                )
        if not on_host and all(name.upper().startswith("CPU") for name in device_names()):
            raise SpacError(
                "tier='vram' found no GPU: build llama.cpp with SPAC_LLAMA_BACKEND=--cuda bash scripts/setup.sh "
                "(or scripts/build_llama.sh --cuda), or pass vram_options={'on_host': True} (CLI --pool-on-host) "
                "to run the pool in host memory for testing"
            )
        try:
            self.pool = ExpertPool(llm, list(slots), on_host=on_host)
        except PoolError as exc:
            raise SpacError(f"tier='vram': {exc}") from exc
        self.pool.set_sources_from_file(info)  # repacked CPU experts are copied from the file
        self.n_slots = list(self.pool.n_slots)
        self.free: list[list[int]] = [list(range(n - 1, -1, -1)) for n in self.n_slots]  # pop() takes slot 0 first
        self.retired: list[tuple[int, int]] = []  # (group, slot) until the next fence
        self.slot_of = np.full((len(self.rows), info.n_expert), -1, dtype=np.int64)

        base = ExpertLayout.from_info(info)
        # the balancer sees the pool's bytes only (everything else is fixed)
        self.layout = dataclasses.replace(base, non_expert_bytes=0)
        if cost is None:
            cost = machine_cost_model(info.path)
        self.balancer = Balancer(self.layout, cost, "vram", self.pool.pool_bytes, solver=solver, time_limit=1.0,
                                 horizon=horizon)
        shape = (len(self.rows), info.n_expert)
        self.demand = make_estimator(estimator, shape[0], shape[1])
        self.wanted = np.zeros(shape, bool)
        self.counters = VramCounters()
        log.info("vram tier: budget %s, pool %s (%s slots%s), cost model %s", format_size(self.budget),
                 format_size(self.pool.pool_bytes), "+".join(map(str, self.n_slots)),
                 ", host memory" if on_host else "", cost.source or "given")
        self.warm = profile is not None
        if profile is not None:
            demand = expected_demand(profile, info, self.layout.n_expert_used)
            self._apply(self.balancer.plan(demand), demand)
        self.replanner = Replanner(self.balancer.plan, every=replan_every, drift=drift,
                                   resident=lambda: self.wanted.copy(), background=background)

    # --- the per-step data path -------------------------------------------------------------------
    def on_step(self, step: RoutingStep | None, accepted_counts: np.ndarray | None = None) -> None:
        """After an evaluation: count pool hits, learn, re-plan, move.

        ``accepted_counts`` (``[block, expert]``, a verification step): the selections of the step's tokens
        on the true path (``estimators.Observation``); ``Llama`` calls this once the target has sampled them.
        """
        if step is None:
            return
        c = self.counters
        c.steps += 1
        c.tokens += step.n_tokens
        counts = step.counts[self.rows]
        served = self.served(counts > 0)
        hits, activations = count_hits(counts > 0, served)
        c.routed += activations
        c.routed_hits += hits
        accepted = None if accepted_counts is None else accepted_counts[self.rows]
        self.demand.update(Observation(counts, step.n_tokens, accepted))
        u = self.demand.utility()
        if c.steps == 1 and not self.warm:
            plan = self.balancer.plan(u, self.wanted)  # the prompt's routing fills the empty pool at once
        else:
            self.replanner.submit(u, c.steps)
            plan = self.replanner.take()
        if plan is not None:
            self._apply(plan, u)

    def _apply(self, plan: Plan, utility: np.ndarray) -> None:
        x = self._fit_groups(np.asarray(plan.x, bool), utility)
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
        self.wanted = x
        self.counters.plans_applied += 1

    def _evict(self, i: int, e: int) -> None:
        g, s = int(self.group_of_row[i]), int(self.slot_of[i, e])
        self.pool.evict(int(self.rows[i]), int(e))
        self.retired.append((g, s))
        self.slot_of[i, e] = -1
        self.counters.evictions += 1

    def _fit_groups(self, x: np.ndarray, utility: np.ndarray) -> np.ndarray:
        """Keep each group's planned experts within its slots (highest utility first)."""
        x = x.copy()
        for g, n in enumerate(self.n_slots):
            rows = self.group_of_row == g
            planned = np.nonzero(x & rows[:, None])
            if len(planned[0]) <= n:
                continue
            order = np.argsort(-utility[planned], kind="stable")
            drop = order[n:]
            x[planned[0][drop], planned[1][drop]] = False
            self.counters.over_capacity_dropped += len(drop)
        return x

    def served(self, among: np.ndarray | None = None) -> np.ndarray:
        """``[n_moe_layer, n_expert]``: experts the last evaluation computed from the pool (slot resident),
        optionally only ``among`` these (one native call per candidate)."""
        out = np.zeros(self.wanted.shape, bool)
        candidates = self.slot_of >= 0 if among is None else (self.slot_of >= 0) & among
        for i, e in zip(*np.nonzero(candidates), strict=True):
            state, _, _ = self.pool.slot(int(self.group_of_row[i]), int(self.slot_of[i, e]))
            out[i, e] = state == RESIDENT
        return out

    # --- reporting --------------------------------------------------------------------------------
    def stats(self, settle: bool = False) -> dict[str, Any]:
        """Budget, pool, residency and counters; ``settle`` waits for queued copies first."""
        if settle:
            self.pool.fence(wait_loads=True)
        c = self.counters
        loads_done, bytes_copied = self.pool.counters()
        return {
            "tier": "vram",
            "vram_budget_bytes": self.budget,
            "pool_bytes": self.pool.pool_bytes,
            "pool_on_host": self.pool.on_host,
            "slots": list(self.n_slots),
            "fixed_bytes": self.fixed_bytes,
            "kv_bytes_estimate": self.kv_bytes,
            "non_expert_bytes": int(self.info.non_expert_bytes),
            "expert_bytes_total": int(self.layout.total_expert_bytes),
            "planned_experts": int(self.wanted.sum()),
            "resident_experts": int(self.served().sum()),
            "hit_rate": hit_rate(c.routed_hits, c.routed),
            "steps": c.steps,
            "tokens": c.tokens,
            "plans_applied": c.plans_applied,
            "loads": c.loads,
            "evictions": c.evictions,
            "copies_done": loads_done,
            "bytes_copied": bytes_copied,
            "over_capacity_dropped": c.over_capacity_dropped,
            "replanner": {"solves": self.replanner.stats.solves, "failures": self.replanner.stats.failures},
        }

    def close(self) -> None:
        """Stop the re-planner and remove the pool (idempotent; the context stays usable)."""
        replanner = getattr(self, "replanner", None)
        if replanner is not None:
            replanner.close()
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.close()
