"""The flash tier: routed experts stream from the memory-mapped GGUF under a RAM budget.

Per evaluation step, top to bottom (steps 1-2 are the shared loop of ``tiers/base.py``):

1. routing (the sensor's step counts over the step's k+1 tokens) -> the utility estimator;
2. utility -> the balancer (the re-planner, at the step boundary; ``background=True``: in its thread) -> a
   plan: which experts are wanted resident, within ``budget`` minus the staging, keep, lookahead and edge
   reserves (``planning.budgets``);
3. plan -> moves (this module): newly unwanted experts are evicted, newly wanted ones prefetched (hottest first)
   unless the step's demand loads already brought them in, the hottest pinned (mlock, within
   ``pin_fraction`` of the budget);
4. lookahead: experts this step used that the plan does not hold are kept (or prefetched) for the next step
   (within a reserve of one layer's worth of experts) and dropped again if unused; the step's other demand
   loads are evicted;
5. measurement: the queued evictions are run (drained), then resident expert bytes by ``mincore`` against
   the budget.

During the step the native engine, called from the routing sensor's graph callback, loads selected
experts that are not resident; those the plan does not want are kept until the step ends within the
keep reserve (steps 3-4 decide about them: no second read for those the plan or the lookahead then
wants), and beyond it evicted again once their layer has finished. On a cold start (no profile) the
first step, usually the prompt, also swaps each layer's uninformed planned experts for the prompt's
hottest ones as its layers run (prompt keep), so the plan after it starts from them instead of
reading them again. At a step boundary the budget holds by construction: resident expert bytes
are at most the plan, the lookahead and the tensor edge pages, which the reserves leave inside it.

The plan comes from the tier's policy (``policy=``, ``planning/policies.py``): ours (``spac``, steps 1-2
above; the lookahead of step 4 only without layer admission) or a baseline (``lru``, ``lfu``, ``pin``,
``hysteresis``: no lookahead by default). Without lookahead the plan gets its reserve. A policy that admits
demand (lru, lfu, and ours' ``admit_demand``) takes a step's misses in by layer admission (each in the place of
its layer's lowest-ranked idle planned expert, in the hook), or with ``admission="off"`` at the step's end (those
the keep reserve held are adopted with no second read).
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
from spac_llamacpp.planning.policies import ADMISSION_FLOORS, DEFAULT_POLICY, policy_admission
from spac_llamacpp.planning.reference_caches import hit_rate
from spac_llamacpp.tiers.base import LoopOptions, TierController, TierCounters
from spac_llamacpp.tiers.switch import MeasuredSwitch

log = logging.getLogger(__name__)


NEXT_ROWS_EVERY = 8
"""``admission="predict"``: steps between full refreshes of the estimator's next-step rows in the engine; between
them only the rows whose own transition counts changed are rebuilt (the layer-wide parts drift slowly; the full
``[L, E, E]`` costs ~12 ms at Qwen3-30B-A3B's 48 x 128 x 128). The first :data:`YOUNG_STEPS` steps refresh in full
every step: early on every row moves."""
YOUNG_STEPS = 32
SMALL_ROWS = 1 << 18
"""Rows at most this many entries (the benchmark model: 28 x 64 x 64) are refreshed in full every step."""


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


# expert bytes one residency check measures (FlashTier check_bytes): 256 MiB, not 1 GiB, halved the checks'
# decoding-thread time on the benchmark model (0.48 -> 0.23 s at 50%, 0.83 -> 0.47 s at 25% per 192 tokens);
# a sweep then spans more checks, which the touched-expert re-measurement keeps a total as of the step boundary
DEFAULT_CHECK_BYTES = 256 << 20
DRAIN_TIMEOUT = 30.0  # seconds a budget check waits for the queued evictions


def io_overlap(wait_seconds: float | None, read_seconds: float) -> float | None:
    """The share of demand-read time the decoding thread did not wait through: ``1 - wait / read``, at least 0.

    ``read``: per MoE layer with misses, from the submission of its reads until the last landed (the engine's
    ``demand_read_ns``); ``wait``: the decoding thread's blocked time in the evaluations (``base/threadclock``:
    in the hook, in the matmuls' page faults, at the thread pool's barriers while another compute thread
    faults). 1: reads hidden behind compute entirely; 0: every read waited for, as with ``demand="wait"``.
    None when nothing was read on demand or the kernel cannot tell the blocked time.
    """
    if wait_seconds is None or read_seconds <= 0:
        return None
    return max(0.0, 1.0 - wait_seconds / read_seconds)


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
    staged_kept: int = 0  # demand loads the step-end plan or the lookahead kept (no second read)
    staged_evicted: int = 0  # demand loads evicted at the step's end
    prompt_kept: int = 0  # prompt keep: planned experts replaced by the prompt's hotter ones
    drain_timeouts: int = 0  # budget checks whose evictions did not finish in time
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
        lookahead: prefetch this step's unplanned experts for the next step (default: on for ours without layer
            admission, else off: the plan gets its reserve).
        keep_demand: keep a step's demand loads until the step ends (within a reserve of one layer's worth of
            experts, ``planning.budgets``), so that the plan after the step and the lookahead can keep them
            without a second read; off: evicted after their layer unless planned. Default: on, except with
            ``admission`` and no ``lookahead`` (lru, lfu), where its bytes go to the plan.
        prompt_keep: on a cold start (no profile), swap each layer's uninformed planned experts for the first
            step's hottest selected ones while it runs (``native/spac_engine.h``); the plan after it then
            starts from the prompt's experts instead of reading them again.
        demand: how a layer's demand loads are awaited (``native/spac_engine.h``): ``"async"`` (default) by the
            engine's completer thread while the layer's matmuls run (resident experts compute while the missing
            ones are read, a page in flight makes the matmul's fault wait for it), ``"wait"`` by the layer hook
            before the matmuls start. Same outputs; ``stats()["timing"]`` says what each costs.
        read: ``"pagecache"`` (default) or ``"overlay"``: experts' inner pages by O_DIRECT into anonymous pages
            moved onto the mapping (docs/flash.md, "Overlay reads"; slower on the benchmark VM, so off); ``"slots"``:
            experts in the slots of a host expert pool, read by O_DIRECT (``tiers/slot_store.py``; needs ``llm``
            and the patched library at level 5).
        llm: the Llama whose context gets the slot pool (``read="slots"``; the tier's builder passes it).
        mmid_hooks: install patch 0004's MUL_MAT_ID hooks (resident experts first; with overlays, the matmul
            waits per miss); None: only with overlay reads. Ignored (logged) on a library without the patch.
        admission: where a policy that admits demand (``lru``, ``lfu``, ours) takes a step's demand loads in
            (native/spac_engine.h, "Layer admission"): ``"always"`` in the layer's hook, each in the place of the
            layer's planned expert of the lowest rank (the policy's utility) that the layer is not using (LRU's
            rule); ``"rank"`` the same, only when it ranks higher than that expert; ``"off"`` at
            the step's end (the plan after the step keeps
            those the keep reserve still holds; the others were evicted after their layer and are read again if
            the plan wants them). Default: the policy's (``planning.policies.policy_admission``: ours and lru
            ``always``, lfu ``rank``); always off for policies that do not admit demand.
        layer_ahead: as soon as layer l's output exists, apply the next MoE layer's pre-FFN norm and
            router to it and start reading the predicted experts that are not resident (decode steps
            only). Off by default: on the benchmark model it cut the wait for misses by a quarter but
            cost 5% decode speed overall (docs/flash.md). ``"auto"``: on or off by its measured effect on
            decode time in this run (:class:`~spac_llamacpp.tiers.switch.MeasuredSwitch`: after 8 unmeasured decode
            steps, windows of 8 off, on, on, off, then the faster setting for 256 steps, then again).
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
        keep_demand: bool | None = None,
        prompt_keep: bool = True,
        layer_ahead: bool | str = False,
        demand: str = "async",
        read: str = "pagecache",
        mmid_hooks: bool | None = None,
        admission: str | None = None,
        check_every: int = 4,
        guard_file: bool = True,
        check_bytes: int = DEFAULT_CHECK_BYTES,
        llm: Any = None,
        **loop: Any,
    ) -> None:
        options = LoopOptions.parse(PlacementConfig.flash(), **loop)
        if admission is not None and admission not in ADMISSION_FLOORS:
            raise SpacError(f"admission must be one of {', '.join(ADMISSION_FLOORS)}, not {admission!r}")
        default = policy_admission(options.policy, options.config)
        if admission is None or default == "off":  # pin, hysteresis: a miss is read, used and dropped after its layer
            admission = default
        if lookahead is None:
            # ours' mechanism for the misses its plan did not take in; with layer admission a miss takes its place
            # in the plan at once, so the lookahead has little left to keep, and its reserve and the keep reserve
            # are worth more to the plan (the tiny default model, tuning: hit rate +4-6 points at 12.5-50% of the
            # experts, docs/flash.md "Layer admission"); a baseline runs as published, its plan gets the reserve
            lookahead = options.policy == DEFAULT_POLICY and admission == "off"
        if keep_demand is None:
            # the keep reserve holds misses for the step-end plan and the lookahead; with layer admission and no
            # lookahead a miss either took a planned expert's place or has no use after its layer: the plan gets it
            keep_demand = admission == "off" or lookahead
        self.info = info
        self.budget = int(budget)
        self._next_rows: np.ndarray | None = None  # admission="predict": the engine's rows as blocks
        self._next_rows_age = 0
        layout = tier_layout("flash", info)
        self.budget_split = flash_budget(self.budget, layout, lookahead=lookahead, keep=keep_demand,
                                         name=info.path.name)
        self.staging = self.budget_split.staging
        self.keep_reserve = self.budget_split.keep
        self.lookahead_reserve = self.budget_split.lookahead
        shape = (layout.n_layer, layout.n_expert)
        self.wanted = np.zeros(shape, bool)  # the plan (lookahead experts not included)
        self.pinned = np.zeros(shape, bool)
        self.look = np.zeros(shape, bool)
        self._staged = np.zeros(shape, bool)  # this step's demand loads kept until its end (engine)
        self._unloaded = np.zeros(shape, bool)  # planned on a cold start but never prefetched (lazy first plan)
        self._prompt_keep = False  # the step now running swaps planned experts for its hottest ones
        self.pin_budget = int(max(0.0, min(1.0, pin_fraction)) * self.budget_split.plan_bytes)
        self.lookahead = lookahead
        self.check_every = int(check_every)
        self.counters = FlashCounters()
        # a tensor's edge pages are shared with other data and never evicted: not a stray
        n_tensors = np.array([len(ts) for ts in layout.tensors], dtype=np.int64)[:, None]
        self._stray_slack = 2 * page_size() * n_tensors
        self._sweep = sweep_chunks(layout.bytes_matrix.sum(axis=1), int(check_bytes))
        self._sweep_next = 0
        self._res_all = np.zeros((info.block_count, max(info.n_expert, 1)), np.int64)  # engine rows (blocks)
        self._res = np.zeros(shape, np.int64)  # resident bytes per expert as last measured
        self._measured = np.zeros(layout.n_layer, bool)  # MoE layers measured at least once
        self.read_bytes_at_start = read_bytes_so_far()
        self.mapping = mapping
        self._warned_other_mappings = False

        self.pool = None
        slots = None
        if read == "slots":
            if layer_ahead:
                raise SpacError("read='slots' and layer_ahead do not go together (the lookahead's reads go to the "
                                "page cache); turn one off")
            from spac_llamacpp.tiers.slot_store import open_slot_store

            self.pool, slots = open_slot_store(llm, info, self.budget)
        try:
            self.engine = FlashEngine(info, mapping, threads=threads, guard=guard_file, slots=slots)
        except BaseException:
            if self.pool is not None:
                self.pool.close()
            raise
        self.non_expert_locked = 0
        self.demand_mode = demand
        try:
            self.engine.set_demand_mode(demand)
            if read != "pagecache" and layer_ahead:
                raise SpacError("read='overlay' and layer_ahead do not go together (the lookahead's reads go to the "
                                "page cache); turn one off")
            # the pool of recycled overlay pages lives in the staging reserve, which is empty at a step boundary
            if slots is not None:
                self.read_method = "slots"
            else:
                self.read_method = read if self.engine.set_read_method(read, self.staging) else "pagecache"
            # the patched ggml-cpu's MUL_MAT_ID hooks (patch 0004): a layer's resident experts compute first, while
            # its misses are read (with overlays: the matmul waits for each miss just before its rows)
            # (None: with overlay reads only; on the page cache the order's gain was not distinguishable from this
            # VM's run-to-run spread, +13%, -22% and -4% in A/B runs: benchmarks.md "Overlay reads and the order")
            if mmid_hooks is None:
                mmid_hooks = self.read_method in ("overlay", "slots")
            self.mmid_hooks = bool(mmid_hooks) and demand == "async" and self.engine.install_mmid_hooks()
            if mmid_hooks and demand == "async" and not self.mmid_hooks:
                log.info("flash tier: llama.cpp without patch 0004: experts are computed in id order%s",
                         "; overlay misses are awaited by the layer hook" if self.read_method == "overlay" else "")
            if lock_non_experts:
                self._lock_non_experts()
            self.engine.attach(sensor)
            self.engine.set_staging(self.keep_reserve)
            if layer_ahead not in (False, True, "auto"):
                raise SpacError(f"layer_ahead must be true, false or 'auto', not {layer_ahead!r}")
            self.layer_ahead = MeasuredSwitch() if layer_ahead == "auto" else bool(layer_ahead)
            if layer_ahead:
                self._set_predictors()
                self.engine.set_layer_ahead(self._layer_ahead_on)
            # llama.cpp populated the whole file at load: the first plan trims it (from the profile, else a
            # uniform prior; the prompt's routing then replaces the latter at once)
            self._start(info, layout, self.budget_split.plan_bytes, options)
            if admission == "predict" and not hasattr(self.demand, "next_step_model"):
                raise SpacError(f"admission='predict' needs an estimator that predicts the next step (ours, the 'spac' "
                                f"estimator), not policy {options.policy!r} with {type(self.demand).__name__}; choose "
                                "admission 'always', 'rank' or 'off'")
            self.admission = admission
            self._admission_rank = np.full((info.block_count, max(info.n_expert, 1)), np.inf, np.float32)
            if not self.counters.plans_applied:
                self._move(self.wanted, np.zeros(shape), initial=True)  # no first plan: trim everything
            elif prompt_keep and not self.warm:
                self._prompt_keep = True
                self.engine.set_prompt_keep(sensor.step_counts)
            self._arm_admission()  # (the engine leaves a prompt-keep step to prompt keep)
            log.info("flash tier: budget %s (%s for the plan), cost model %s", format_size(self.budget),
                     format_size(self.budget_split.plan_bytes), self.cost.source or "given")
        except BaseException:
            self.close()
            raise

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
        if self._prompt_keep or self.admission != "off":
            # the step swapped planned experts for demand loads (prompt keep, layer admission): the plan after it
            # starts from the residency the engine made
            kept = self.engine.flags("kept", clear=True)[self.rows]
            released = self.engine.flags("released", clear=True)[self.rows]
            self.wanted = (self.wanted | kept) & ~released
            self._unloaded &= ~(kept | released)  # kept: demand-loaded; released: its eviction is queued
            if self._prompt_keep:
                self.counters.prompt_kept += int(kept.sum())
            self._prompt_keep = False
        self._staged = self.engine.flags("staged")[self.rows]  # decided about in _move and _step_ends

    def _observe(self, counts: np.ndarray) -> None:
        if self.look.any():
            self.counters.lookahead_used += int((self.look & (counts > 0)).sum())

    def _in_memory(self, counts: np.ndarray) -> np.ndarray:
        # a step's demand load is still in memory only where the plan holds it (a hit, layer admission), the keep
        # reserve kept it to the step's end or the lookahead holds it; the others were evicted after their layer,
        # and a plan that keeps one reads it again: the balancer must charge that read (it re-read ~3 experts a
        # step on the Mixtral-shaped model when told all were free to keep)
        return (counts > 0) & (self.wanted | self._staged | self.look)

    def _step_ends(self, counts: np.ndarray) -> None:
        if self.lookahead:
            self._prefetch_next(counts)
        self._settle_staged()
        self._arm_admission()
        if self.check_every and self.counters.steps % self.check_every == 0:
            self._check_budget()

    def _arm_admission(self) -> None:
        """Layer admission for the next step: the policy's ranks and the plan's unused bytes to the engine."""
        if self.admission == "off":
            return
        self._admission_rank[self.rows] = self.demand.utility()
        slack = self.budget_split.plan_bytes - int(self.sizes[self.wanted].sum())
        self.engine.set_admission(self._admission_rank, ADMISSION_FLOORS[self.admission], slack)
        if self.admission == "predict":
            self._arm_prediction()

    def _arm_prediction(self) -> None:
        """``admission="predict"``: the estimator's next-step model to the engine, so that each layer's hook ranks a
        miss and the planned experts it may displace as the estimator will rank them after the step (the ranks of
        before the step undervalue the miss, which the step just used: docs/flash.md "Predicted admission")."""
        est = self.demand
        full = (self._next_rows is None or self._next_rows_age >= NEXT_ROWS_EVERY or est.n_steps <= YOUNG_STEPS
                or self._admission_rank.size * self._admission_rank.shape[1] <= SMALL_ROWS)
        if self._next_rows is None:
            self._next_rows = np.zeros((*self._admission_rank.shape, self._admission_rank.shape[1]), np.float32)
        layers, sources, rows = est.next_rows(changed_only=not full)  # type: ignore[attr-defined]
        self._next_rows[self.rows[layers], sources] = rows
        self._next_rows_age = 0 if full else self._next_rows_age + 1
        base, self_weight = est.next_step_model()  # type: ignore[attr-defined]
        base_all = np.zeros(self._admission_rank.shape, np.float32)
        base_all[self.rows] = base
        self.engine.set_admission_model(self._next_rows if len(layers) else None, base_all, self_weight)

    def _settle_staged(self) -> None:
        """The step's demand loads that neither the plan nor the lookahead kept are evicted; the engine then
        releases them all (they were kept for this decision)."""
        gone = self._staged & ~self.wanted & ~self.look
        for i, e in zip(*np.nonzero(gone), strict=True):
            self._submit("evict", i, e)
        self.counters.staged_evicted += int(gone.sum())
        self.engine.flags("staged", clear=True)
        self._staged[:] = False

    def _move(self, x: np.ndarray, utility: np.ndarray, initial: bool) -> np.ndarray:
        """Evict what the plan dropped, prefetch what it added (hottest first) unless the step's demand loads
        brought it in, re-pin. A cold start's first plan (no profile: uninformed) is applied lazily: nothing is
        read for it (the first step and the plan after it decide what is worth reading)."""
        lazy = initial and not self.warm
        drop = (self.wanted | initial) & ~x & ~self.look
        add = x & (~self.wanted | self._unloaded)
        for i, e in zip(*np.nonzero(drop), strict=True):
            self.engine.set_wanted(self.rows[i], e, False)
            self._submit("evict", i, e)
        self.pinned &= x
        order = np.argsort(-utility[add], kind="stable")
        for i, e in np.transpose(np.nonzero(add))[order]:
            self.engine.set_wanted(self.rows[i], e, True)
            if self._staged[i, e]:  # read by this step's demand load and still resident
                self.counters.staged_kept += 1
            elif not lazy:
                self._submit("prefetch", i, e)
        self._unloaded = (x & add) if lazy else (self._unloaded & x & ~add)
        self.look &= ~x
        if self.pin_budget > 0 and not lazy:
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
        # the most used first; of equally used ones, this step's kept demand loads (no read)
        order = np.argsort(-(2 * counts.astype(np.int64) + self._staged), axis=None, kind="stable")
        flat = candidates.ravel()[order]
        picked = order[flat][np.cumsum(self.sizes.ravel()[order][flat]) <= self.lookahead_reserve]
        new = np.zeros(self.wanted.size, bool)
        new[picked] = True
        new = new.reshape(self.wanted.shape)
        gone = self.look & ~new & ~self.wanted
        for i, e in zip(*np.nonzero(gone), strict=True):
            self.engine.set_wanted(self.rows[i], e, False)
            self._submit("evict", i, e)
        for i, e in zip(*np.nonzero(new & ~self.look), strict=True):
            self.engine.set_wanted(self.rows[i], e, True)
            if self._staged[i, e]:  # this step's demand load: still resident, no read
                self.counters.staged_kept += 1
            else:
                self._submit("prefetch", i, e)
                self.counters.lookahead_prefetches += 1
        self.look = new

    def _submit(self, op: str, i: int, e: int) -> None:
        if not self.engine.submit(op, int(self.rows[i]), int(e)):
            self.counters.refused_moves += 1

    def _check_budget(self) -> int | None:
        """At a step boundary: run the queued evictions, measure the next chunk of MoE layers of the sweep and
        the experts the engine moved elsewhere since their layers were measured, evict the chunk's strays
        (resident, yet neither planned nor looked ahead). Returns the whole model's resident expert bytes (loads
        still in flight counted as landed) once every layer has been measured, else None.

        The total is the sum of each expert's resident bytes as last measured: an expert whose pages the engine
        has moved since (prefetch, eviction, demand load: its ``touched`` flag) is measured again now, so the
        total is not a sum over layers taken at different steps. By construction it is at most the plan, the
        lookahead and the tensor edge pages (``FlashBudget.at_step_boundary <= budget``); strays come only from
        pages read behind the engine's back (another mapping, the kernel).
        """
        c = self.counters
        t0, c0 = time.perf_counter(), time.thread_time()
        if not self.engine.drain_evictions(DRAIN_TIMEOUT):
            c.drain_timeouts += 1
        # prefetches queued or running now count as landed (read first: one that lands during the measurement is
        # then counted whole; one that landed before it is measured)
        pending = self.engine.flags("prefetching")[self.rows]
        touched = self.engine.flags("touched", clear=True)[self.rows]
        i0, i1 = self._sweep[self._sweep_next]
        self._sweep_next = (self._sweep_next + 1) % len(self._sweep)
        rows = self.rows[i0:i1]
        self.engine.residency_bytes(int(rows[0]), int(rows[-1]) + 1, self._res_all)
        self._res[i0:i1] = self._res_all[rows]
        self._measured[i0:i1] = True
        touched[i0:i1] = False
        ti, te = np.nonzero(touched & self._measured[:, None])
        if len(ti):
            self._res[ti, te] = self.engine.residency_experts(self.rows[ti], te)
        part = slice(i0, i1)
        # the drain ran every queued eviction: what is resident and not held now is a stray (beyond the boundary
        # pages a held neighbour or the tensor's edge keeps)
        stray = (self._res[part] > self._stray_slack[part]) & ~self.wanted[part] & ~self.look[part]
        for i, e in zip(*np.nonzero(stray), strict=True):
            self._submit("evict", i0 + i, e)
        c.strays_evicted += int(stray.sum())
        resident = None
        if self._measured.all():  # (the check does not measure ahead of the reads it started)
            resident = int(self._res.sum() + np.maximum(self.sizes - self._res, 0)[pending].sum())
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
            "slot_pool_bytes": self.pool.pool_bytes if self.pool is not None else 0,  # read="slots": RAM it holds
            "keep_reserve_bytes": self.keep_reserve,
            "lookahead_reserve_bytes": self.lookahead_reserve,
            "edge_reserve_bytes": self.budget_split.edges,
            "staged_kept": c.staged_kept,
            "staged_evicted": c.staged_evicted,
            "prompt_kept": c.prompt_kept,
            "admission": self.admission,
            "admitted": eng["admitted"],  # demand loads that took a planned expert's place in their layer
            "drain_timeouts": c.drain_timeouts,
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
            "timing": self._timing(eng),
            "layer_ahead": self.layer_ahead.to_json() if isinstance(self.layer_ahead, MeasuredSwitch)
            else {"on": bool(self.layer_ahead)},
            "engine": eng,
            "engine_errors": self.engine.errors(),  # {kind: {count, errno, message}}, each kind logged once
            "other_mappings": others,
            "notes": notes,
            "model_file": self.engine.check_file(),  # the file guard: {"fault": None, ...} while the GGUF is intact
        }

    def _read_seconds(self) -> float:
        return self.engine.stats("demand_read_ns")["demand_read_ns"] * 1e-9

    @property
    def _layer_ahead_on(self) -> bool:
        la = self.layer_ahead
        return la.on if isinstance(la, MeasuredSwitch) else bool(la)

    def eval_ends(self, n_tokens: int, decode: bool) -> float | None:
        seconds = super().eval_ends(n_tokens, decode)
        if not decode and isinstance(self.layer_ahead, MeasuredSwitch):
            self.layer_ahead.interrupt()  # a prompt: its aftermath is not measured
        elif seconds is not None and isinstance(self.layer_ahead, MeasuredSwitch) and not self.engine.closed:
            was = self.layer_ahead.on
            now = self.layer_ahead.record(seconds / max(int(n_tokens), 1))
            if now != was:
                self.engine.set_layer_ahead(now)
        return seconds

    def _timing(self, eng: dict[str, int]) -> dict[str, Any]:
        """Where the evaluations' time went, per kind (prompt, decode): per token, the wall time, the demand
        reads' time, the decoding thread's wait (blocked time) and the rest (compute), and the overlap
        (:func:`io_overlap`)."""
        out: dict[str, Any] = {"demand": self.demand_mode, "read": self.read_method, "mmid_hooks": self.mmid_hooks,
                               "hook_wait_seconds": eng["demand_wait_ns"] * 1e-9}
        for kind, t in self.counters.evals.items():
            n, wait = max(t.tokens, 1), t.blocked_seconds
            out[kind] = {**t.to_json(),
                         "per_token_ms": {"eval": 1e3 * t.seconds / n, "read": 1e3 * t.read_seconds / n,
                                          "wait": None if wait is None else 1e3 * wait / n,
                                          "compute": None if wait is None else 1e3 * (t.seconds - wait) / n},
                         "overlap": io_overlap(wait, t.read_seconds)}
        return out

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
        pool = getattr(self, "pool", None)
        if pool is not None:  # after the engine's threads, which write into its slots
            pool.close()
