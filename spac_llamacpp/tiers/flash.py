"""The flash tier: routed experts stream from the memory-mapped GGUF under a RAM budget.

Per evaluation step, top to bottom (steps 1-2 are the shared loop of ``tiers/base.py``):

1. routing (the sensor's step counts over the step's k+1 tokens) -> the utility estimator;
2. utility -> the balancer (in the re-planner's background thread) -> a plan: which experts are
   wanted resident, within ``budget`` minus the staging and lookahead reserves (``planning.budgets``);
3. plan -> moves (this module): newly unwanted experts are evicted, newly wanted ones prefetched (hottest first),
   the hottest pinned (mlock, within ``pin_fraction`` of the budget);
4. lookahead: experts this step used that the plan does not hold are prefetched for the next step
   (within a reserve of one layer's worth of experts) and dropped again if unused;
5. measurement: resident expert bytes by ``mincore`` against the budget.

During the step the native engine, called from the routing sensor's graph callback, issues demand
readahead for selected experts that are not resident and evicts them again once their layer has
finished unless the plan wants them. The budget holds at step boundaries once queued evictions
have run; within a step, demand loads may use the staging reserve.

The plan comes from the tier's policy (``policy=``, ``planning/policies.py``): ours (``spac``, steps 1-2
above, with the lookahead of step 4) or a baseline (``lru``, ``lfu``, ``pin``, ``hysteresis``: no lookahead
by default, so its plan gets the lookahead reserve too). A policy that admits demand (lru, lfu) keeps
what a step loaded: see :meth:`FlashTier._set_wanted`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.base.sizes import format_size
from spac_llamacpp.gguf.info import MoEModelInfo
from spac_llamacpp.native.flash_engine import FlashEngine, non_expert_ranges, page_size
from spac_llamacpp.native.mapping import FileMapping, other_mappings, resident_bytes
from spac_llamacpp.native.sensor import RoutingSensor
from spac_llamacpp.planning.budgets import flash_budget, tier_layout
from spac_llamacpp.planning.placement_config import PlacementConfig
from spac_llamacpp.planning.policies import DEFAULT_POLICY
from spac_llamacpp.planning.reference_caches import hit_rate
from spac_llamacpp.tiers.base import LoopOptions, TierController, TierCounters

log = logging.getLogger(__name__)


def read_bytes_so_far() -> int:
    """Bytes this process caused to be read from storage (``/proc/self/io``), -1 if unavailable."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


DEFAULT_CHECK_BYTES = 1 << 30  # expert bytes one residency check measures (FlashTier check_bytes)


def sweep_chunks(layer_bytes: np.ndarray, check_bytes: int) -> list[tuple[int, int]]:
    """Consecutive MoE-layer ranges ``[i0, i1)`` of at least ``check_bytes`` expert bytes each (one layer at the
    least, the last range what is left; ``check_bytes <= 0``: one range of every layer)."""
    n = len(layer_bytes)
    if check_bytes <= 0 or n == 0:
        return [(0, max(n, 1))]
    out, i0, acc = [], 0, 0
    for i, b in enumerate(layer_bytes):
        acc += int(b)
        if acc >= check_bytes:
            out.append((i0, i + 1))
            i0, acc = i + 1, 0
    if i0 < n:
        out.append((i0, n))
    return out


@dataclass
class FlashCounters(TierCounters):
    budget_checks: int = 0
    over_budget_checks: int = 0  # measured at a step boundary without waiting for queued evictions
    max_resident_at_check: int = 0
    refused_moves: int = 0  # queue full
    strays_evicted: int = 0
    checks: int = 0  # partial sweeps (budget_checks: complete ones)
    check_seconds: float = 0.0  # decoding-thread time in residency checks (mincore, strays)
    check_cpu_seconds: float = 0.0  # of which the thread ran (system time included): wall less waiting for a core
    lookahead_prefetches: int = 0
    lookahead_used: int = 0
    history: list[int] = field(default_factory=list)  # resident bytes at each check (bounded)


class FlashTier(TierController):
    """Keeps the routed experts resident in RAM within ``budget`` bytes, following the balancer.

    Args:
        info: model header.
        mapping: llama.cpp's mapping of the file.
        sensor: the model's routing sensor (the engine hooks into its callback).
        budget: bytes of RAM for routed experts (non-expert weights are counted separately); the plan gets
            what ``planning.budgets.flash_budget`` leaves after the staging and lookahead reserves.
        threads: engine worker threads.
        pin_fraction: share of the budget locked with mlock for the hottest experts (0: no pinning).
        lock_non_experts: mlock the non-expert weights (attention, norms, routers, shared experts,
            embeddings), which every token reads: under memory pressure the kernel would otherwise
            evict them as readily as cold experts. Falls back (logged) when mlock is not permitted.
        lookahead: prefetch this step's unplanned experts for the next step (None: on for ``policy="spac"``,
            off for the baselines, whose plans then get its reserve).
        layer_ahead: as soon as layer l's output exists, apply the next MoE layer's pre-FFN norm and
            router to it and start reading the predicted experts that are not resident (decode steps
            only). Off by default: on the benchmark model it cut the wait for misses by a quarter but
            cost 5% decode speed overall (docs/flash.md).
        check_every: measure residency (and sweep strays) every this many steps (0: never; ``stats()``
            always measures). mincore costs 14-60 ns per page (less for pages this process has mapped), ~50-
            250 ms over the 15 GiB of experts of Qwen3-30B-A3B, so not every step, and not all layers at once:
        check_bytes: each check measures the next MoE layers in turn, at least this many expert bytes of them
            (one layer at the least), so its cost does not grow with the model; a full sweep of the model
            spans ``ceil(expert bytes / check_bytes)`` checks, and the budget is compared with the sum of one
            sweep (``budget_checks``, ``max_resident_at_check``). 0: every check sweeps the whole model.
        guard_file: guard the mapping against the GGUF changing under it (truncated, rewritten): an
            evaluation that sees it fails with one SpacError line (:meth:`check_source`) instead of the
            process dying of SIGBUS (native/spac_engine.h, docs/robustness.md).
        loop: the shared loop's options (:class:`~spac_llamacpp.tiers.base.LoopOptions`): ``config`` (default
            :meth:`PlacementConfig.flash`) or single fields of it (``estimator``, ``solver``, ``replan_every``,
            ``drift``, ``horizon``, ``background``, ...), ``cost``, ``profile`` (plan the first residency from
            it instead of from a uniform prior and then the prompt), ``record``, ``policy`` (``spac``, ours, the
            default; ``lru``, ``lfu``, ``pin``, ``hysteresis``: ``planning/policies.py``), ``policy_params``.
    """

    name = "flash"

    def __init__(
        self,
        info: MoEModelInfo,
        mapping: FileMapping,
        sensor: RoutingSensor,
        budget: int,
        *,
        threads: int = 2,
        pin_fraction: float = 0.0,
        lock_non_experts: bool = True,
        lookahead: bool | None = None,
        layer_ahead: bool = False,
        check_every: int = 4,
        guard_file: bool = True,
        check_bytes: int = DEFAULT_CHECK_BYTES,
        **loop: Any,
    ) -> None:
        options = LoopOptions.parse(PlacementConfig.flash(), **loop)
        if lookahead is None:  # our mechanism; a baseline runs as published, its plan gets the reserve
            lookahead = options.policy == DEFAULT_POLICY
        self.info = info
        self.budget = int(budget)
        layout = tier_layout("flash", info)
        self.budget_split = flash_budget(self.budget, layout, lookahead=lookahead, name=info.path.name)
        self.staging = self.budget_split.staging
        self.lookahead_reserve = self.budget_split.lookahead
        shape = (layout.n_layer, layout.n_expert)
        self.wanted = np.zeros(shape, bool)  # the plan (lookahead experts not included)
        self.admits_demand = False  # set once the planner is built (_admit_all_demand)
        self.pinned = np.zeros(shape, bool)
        self.look = np.zeros(shape, bool)
        self._just_dropped = np.zeros(shape, bool)  # evictions queued since the last budget check
        self.pin_budget = int(max(0.0, min(1.0, pin_fraction)) * self.budget_split.plan_bytes)
        self.lookahead = lookahead
        self.check_every = int(check_every)
        self.counters = FlashCounters()
        # a tensor's edge pages are shared with other data and never evicted: not a stray
        n_tensors = np.array([len(ts) for ts in layout.tensors], dtype=np.int64)[:, None]
        self._stray_slack = 2 * page_size() * n_tensors
        self._sweep = sweep_chunks(layout.bytes_matrix.sum(axis=1), int(check_bytes))
        self._sweep_next, self._sweep_sum = 0, 0
        self._frac_all = np.zeros((info.block_count, max(info.n_expert, 1)), np.float32)  # engine rows (blocks)
        self._layer_bytes = np.zeros(info.block_count, np.int64)
        self.read_bytes_at_start = read_bytes_so_far()
        self.mapping = mapping
        self._warned_other_mappings = False

        self.engine = FlashEngine(info, mapping, threads=threads, guard=guard_file)
        self.non_expert_locked = 0
        try:
            if lock_non_experts:
                self._lock_non_experts()
            self.engine.attach(sensor)
            if layer_ahead:
                self._set_predictors()
            # llama.cpp populated the whole file at load: the first plan trims it (from the profile, else a
            # uniform prior; the prompt's routing then replaces the latter at once)
            self._start(info, layout, self.budget_split.plan_bytes, options)
            if not self.counters.plans_applied:
                self._move(self.wanted, np.zeros(shape), initial=True)  # no first plan: trim everything
            self.admits_demand = bool(self.planner.admits_demand)
            if self.admits_demand:
                self._admit_all_demand()
            log.info("flash tier: budget %s (%s for the plan), cost model %s", format_size(self.budget),
                     format_size(self.budget_split.plan_bytes), self.cost.source or "given")
        except BaseException:
            self.close()
            raise

    def _admit_all_demand(self) -> None:
        """For a policy that admits demand (lru, lfu): every expert is wanted as far as the engine knows.

        Why: the engine evicts a demand-loaded expert after its layer unless it is wanted (``transient`` in
        native/spac_engine.c). Under LRU every expert a step loads is admitted, so the step-end plan wants
        it; with the plan's flags it would have been dropped after its layer and read again by the move
        (twice the reads of the design). So the flags stay set for every expert, a step's demand loads stay,
        and the plan's evictions (explicit ``evict`` moves of what the cache dropped) are the only ones.
        Costs: within a step the demand loads of all layers are held until the step's plan evicts the
        least recently used (more than the one layer of staging the budget reserves); an evicted expert's
        boundary pages shared with a neighbour are kept (the neighbour counts as wanted), at most a page per
        tensor between two experts, which the stray check allows for.
        Once the engine keeps a step's demand loads until the step ends and lets the step-end move decide,
        the plan's own flags are right for these policies too and this goes.
        """
        self.engine.wait_idle(30.0)  # the trim's evictions first, with the flags they were planned with
        for row in self.rows:
            for e in range(self.wanted.shape[1]):
                self.engine.set_wanted(int(row), e, True)
        log.info("flash tier: policy %s admits every demand load (engine flags all wanted)", self.policy)

    def _set_wanted(self, i: int, e: int, wanted: bool) -> None:
        """The engine's wanted flag of (MoE layer i, expert e), but never cleared under a policy that admits
        demand (:meth:`_admit_all_demand`)."""
        if wanted or not self.admits_demand:
            self.engine.set_wanted(int(self.rows[i]), int(e), wanted)

    def _lock_non_experts(self) -> None:
        for offset, length in non_expert_ranges(self.info):
            rc = self.engine.lock_range(offset, length)
            if rc != 0:
                log.warning("flash tier: could not mlock the non-expert weights (%s); the kernel may evict them "
                            "under memory pressure (run as root or raise `ulimit -l`)", os.strerror(-rc))
                for done_off, done_len in non_expert_ranges(self.info):
                    if done_off >= offset:
                        break
                    self.engine.lock_range(done_off, done_len, lock=False)
                self.non_expert_locked = 0
                return
            self.non_expert_locked += length

    def _set_predictors(self) -> None:
        from spac_llamacpp.observe.lookahead import RouterSet

        try:
            routers = RouterSet.from_gguf(self.info)
        except SpacError as exc:
            log.warning("flash tier: no layer-ahead prefetch (%s)", exc)
            return
        for block in self.info.moe_layers:
            if block == 0:
                continue
            r = routers.routers[block]
            self.engine.set_predictor(block - 1, block, r.weight, r.norm, r.bias, r.sigmoid, r.k, routers.eps)

    # --- the per-step data path (the loop is TierController.on_step) --------------------------------
    def _step_begins(self) -> None:
        self.engine.end_step()  # release the experts the step had in use

    def _observe(self, counts: np.ndarray) -> None:
        if self.look.any():
            self.counters.lookahead_used += int((self.look & (counts > 0)).sum())

    def _step_ends(self, counts: np.ndarray) -> None:
        if self.lookahead:
            self._prefetch_next(counts)
        if self.admits_demand:
            self._drop_unadmitted(counts > 0)
        if self.check_every and self.counters.steps % self.check_every == 0:
            self._check_budget(used=counts > 0)

    def _move(self, x: np.ndarray, utility: np.ndarray, initial: bool) -> np.ndarray:
        """Evict what the plan dropped, prefetch what it added (hottest first), re-pin."""
        drop = (self.wanted | initial) & ~x & ~self.look
        add = x & ~self.wanted
        for i, e in zip(*np.nonzero(drop), strict=True):
            self._set_wanted(i, e, False)
            self._submit("evict", i, e)
        self._just_dropped |= drop
        self.pinned &= x
        order = np.argsort(-utility[add], kind="stable")
        for i, e in np.transpose(np.nonzero(add))[order]:
            self._set_wanted(i, e, True)
            self._submit("prefetch", i, e)
        self.look &= ~x
        if self.pin_budget > 0:
            self._repin(x, utility)
        return x

    def _repin(self, x: np.ndarray, u: np.ndarray) -> None:
        idx = np.argsort(-np.where(x, u, -np.inf), axis=None, kind="stable")
        sizes = self.sizes.ravel()[idx]
        keep = idx[(np.cumsum(sizes) <= self.pin_budget) & x.ravel()[idx]]
        target = np.zeros(x.size, bool)
        target[keep] = True
        target = target.reshape(x.shape)
        for i, e in zip(*np.nonzero(target & ~self.pinned), strict=True):
            self._submit("pin", i, e)
        for i, e in zip(*np.nonzero(self.pinned & ~target), strict=True):
            self._submit("unpin", i, e)
        self.pinned = target

    def _prefetch_next(self, counts: np.ndarray) -> None:
        """Prefetch the experts this step used that the plan does not hold (they are likely used again)."""
        candidates = (counts > 0) & ~self.wanted
        order = np.argsort(-counts, axis=None, kind="stable")
        flat = candidates.ravel()[order]
        picked = order[flat][np.cumsum(self.sizes.ravel()[order][flat]) <= self.lookahead_reserve]
        new = np.zeros(self.wanted.size, bool)
        new[picked] = True
        new = new.reshape(self.wanted.shape)
        gone = self.look & ~new & ~self.wanted
        for i, e in zip(*np.nonzero(gone), strict=True):
            self._set_wanted(i, e, False)
            self._submit("evict", i, e)
        self._just_dropped |= gone
        for i, e in zip(*np.nonzero(new & ~self.look), strict=True):
            self._set_wanted(i, e, True)
            self._submit("prefetch", i, e)
            self.counters.lookahead_prefetches += 1
        self.look = new

    def _drop_unadmitted(self, used: np.ndarray) -> None:
        """Evict what this step loaded on demand and the policy did not keep (an LFU that kept its more
        frequent experts, a step that used more experts of a layer than the layer's share): with every engine
        flag set (:meth:`_admit_all_demand`) the engine kept them."""
        gone = used & ~self.wanted & ~self.look
        for i, e in zip(*np.nonzero(gone), strict=True):
            self._submit("evict", i, e)
        self._just_dropped |= gone

    def _submit(self, op: str, i: int, e: int) -> None:
        if not self.engine.submit(op, int(self.rows[i]), int(e)):
            self.counters.refused_moves += 1

    def _check_budget(self, used: np.ndarray | None = None) -> int | None:
        """Measure the next chunk of MoE layers of the sweep; evict their strays (resident, yet neither planned
        nor looked ahead). Returns the sweep's resident bytes when this check completed a sweep, else None.

        Strays come from races the engine cannot see (a plan's eviction running just before a layer
        faults the expert back in) and from pages the kernel read on its own.
        """
        c = self.counters
        t0, c0 = time.perf_counter(), time.thread_time()
        i0, i1 = self._sweep[self._sweep_next]
        self._sweep_next = (self._sweep_next + 1) % len(self._sweep)
        rows = self.rows[i0:i1]
        self._sweep_sum += self.engine.residency_layers(int(rows[0]), int(rows[-1]) + 1, self._frac_all,
                                                        self._layer_bytes)
        frac = self._frac_all[rows]
        part = slice(i0, i1)
        # not strays (yet): experts whose eviction was queued since their layers' last check, by the plan or
        # (for the experts this step used) by the engine after their layer
        stray = ((frac * self.sizes[part] > self._stray_slack[part]) & ~self.wanted[part] & ~self.look[part]
                 & ~self._just_dropped[part])
        if used is not None:
            stray &= ~used[part]
        for i, e in zip(*np.nonzero(stray), strict=True):
            self._submit("evict", i0 + i, e)
        c.strays_evicted += int(stray.sum())
        self._just_dropped[part] = False
        resident = None
        if self._sweep_next == 0:  # a sweep of every MoE layer is complete
            resident, self._sweep_sum = self._sweep_sum, 0
            c.budget_checks += 1
            c.max_resident_at_check = max(c.max_resident_at_check, resident)
            if resident > self.budget:
                c.over_budget_checks += 1
            if len(c.history) < 100_000:
                c.history.append(resident)
        c.checks += 1
        c.check_seconds += time.perf_counter() - t0
        c.check_cpu_seconds += time.thread_time() - c0
        return resident

    def check_source(self) -> None:
        """Raise one SpacError line when the GGUF changed under the mapping since the model loaded.

        ``Llama.eval`` asks before and after every evaluation: a change found after it means that
        evaluation read pages the file no longer backs (zero pages) or other weights, so its output is
        discarded; the fault is sticky, so every later evaluation fails the same way."""
        st = self.engine.check_file()
        fault = st["fault"]
        if fault is None:
            return
        path = self.info.path
        regrown = st["size_now"] >= st["size_at_start"]
        what = {
            "shrunk": "was rewritten in place (truncated, then written again)" if regrown else
                      f"was truncated from {st['size_at_start']} to {st['size_now']} bytes",
            "modified": "was modified in place (its size or modification time changed), so its weights may no "
                        "longer be the ones loaded",
            "read_fault": "could not be read (an I/O error, or the file shrank while it was read)",
            "sigbus": "shrank while it was being read",
        }.get(fault, f"failed ({fault})")
        raise SpacError(f"{path} {what} while the model was running from it; the evaluation's output is "
                        "discarded and this model cannot evaluate any more: restore the file and load the model "
                        "again (never rewrite a GGUF that a model has open; write a new file and rename it)")

    # --- reporting --------------------------------------------------------------------------------
    def residency(self) -> tuple[int, np.ndarray]:
        """(resident expert bytes, ``[n_moe_layer, n_expert]`` resident fraction), measured now."""
        total, frac = self.engine.residency(per_expert=True)
        assert frac is not None
        return total, frac[self.rows]

    def _settle(self, seconds: float) -> None:
        self.engine.wait_idle(float(seconds))

    def _tier_stats(self) -> dict[str, Any]:
        resident, frac = self.residency()
        eng = self.engine.stats()
        c = self.counters
        looked = eng["demand_hits"] + eng["demand_misses"]
        rb = read_bytes_so_far()
        others, notes = self._other_mappings()
        return {
            "budget_bytes": self.budget,
            "resident_expert_bytes": resident,
            "resident_experts": int((frac > 0.5).sum()),
            "pinned_experts": int(self.pinned.sum()),
            "non_expert_locked_bytes": self.non_expert_locked,
            "staging_bytes": self.staging,
            "lookahead_reserve_bytes": self.lookahead_reserve,
            "hit_rate": hit_rate(eng["demand_hits"], looked),  # per layer evaluation: docs/hit_rate.md
            "budget_checks": c.budget_checks,
            "over_budget_checks": c.over_budget_checks,
            "max_resident_at_check": c.max_resident_at_check,
            "lookahead_prefetches": c.lookahead_prefetches,
            "lookahead_used": c.lookahead_used,
            "refused_moves": c.refused_moves,
            "strays_evicted": c.strays_evicted,
            "checks": c.checks,
            "check_seconds": c.check_seconds,
            "check_cpu_seconds": c.check_cpu_seconds,
            "check_layers": max(i1 - i0 for i0, i1 in self._sweep),  # MoE layers per check at most
            "read_bytes": rb - self.read_bytes_at_start if rb >= 0 and self.read_bytes_at_start >= 0 else None,
            "engine": eng,
            "engine_errors": self.engine.errors(),  # {kind: {count, errno, message}}, each kind logged once
            "other_mappings": others,
            "notes": notes,
            "model_file": self.engine.check_file(),  # the file guard: {"fault": None, ...} while the GGUF is intact
        }

    def _other_mappings(self) -> tuple[dict[str, int], list[str]]:
        """Other mappings of the GGUF in this process: pages they map stay in RAM whatever the engine evicts,
        and mincore (``resident_expert_bytes``) counts them (docs/flash.md, "Other mappings of the file")."""
        found = other_mappings(self.info.path, self.mapping)
        rss = resident_bytes(found)
        out = {"count": len(found), "bytes": sum(m.size for m in found), "rss_bytes": rss}
        if not found:
            return out, []
        note = (f"{len(found)} other mapping(s) of {self.info.path.name} in this process (another Llama of the "
                f"same file, a self-draft, a reader) hold {format_size(rss)} of it in RAM: the flash tier cannot "
                "evict pages another mapping holds, so resident_expert_bytes counts them and can exceed the budget "
                f"of {format_size(self.budget)}; load the file once per process (docs/flash.md)")
        if not self._warned_other_mappings:
            self._warned_other_mappings = True
            log.warning("flash tier: %s", note)
        return out, [note]

    def _release(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
