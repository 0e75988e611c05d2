"""Replay a routing trace through a placement policy under the measured cost model.

Per step (one trace step: a prompt, a decoded token or a verification batch), per MoE layer, in
order: the experts the step's tokens used are *hits* when resident in the fast tier. Time model::

    flash:  step = sync_reads + max(compute, background_reads)
            compute = CPU time of every used expert (from RAM), sync_reads = on-demand reads of the
            misses (page faults of the memory-mapped file: they stall the compute), background_reads =
            planned placements (pread), which hide under compute but share the device with misses.
    vram:   step = max(sum_l max(gpu_l, cpu_l), h2d)
            gpu_l = GPU time of the layer's resident used experts, cpu_l = CPU time of the others (in
            parallel); h2d = RAM->VRAM copies (placements and demand admissions), on the copy engine.

The non-expert part of the model (attention, embeddings, shared experts) is the same for every
policy and not included: times are the MoE expert part per token.

Expert sizes and weight types come from the model's GGUF header, or, for a trace replayed without its
model file (an imported public trace), from the layout the trace records (:func:`recorded_layout`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.base.sizes import format_size
from spac_llamacpp.gguf.info import GGML_TYPES, MoEModelInfo, inspect_model
from spac_llamacpp.observe.trace import RoutingTrace, TraceLayout
from spac_llamacpp.planning import budgets
from spac_llamacpp.planning.calibration import load_cached
from spac_llamacpp.planning.costmodel import CostModel, ExpertLayout
from spac_llamacpp.planning.placement_config import PlacementConfig
from spac_llamacpp.planning.reference_caches import count_hits, hit_rate
from spac_llamacpp.sim.policies import POLICIES, Policy, SimSetup, make_policy

log = logging.getLogger(__name__)

# A trace replayed without its model file records one expert's bytes per MoE layer, not its tensors:
# the bytes are split over this many tensors (gate, up, down: the contiguous reads of one expert) ...
RECORDED_TENSORS = 3
# ... of this weight type unless told (the CPU cost model's fallback; the sources record none)
DEFAULT_WEIGHT_TYPE = "F16"
WEIGHT_TYPES = tuple(name for name, _, _ in GGML_TYPES.values())


@dataclass
class SimResult:
    policy: str
    tier: str
    budget: int
    expert_budget: int
    steps: int
    tokens: int
    activations: int  # distinct (step, MoE layer, expert) used (docs/hit_rate.md)
    hits: int  # ... resident in the fast tier when the layer ran
    bytes_moved: int  # after the start: on-demand reads (flash) and placements/admissions (both tiers)
    preload_bytes: int  # initial contents (static, belady), not timed
    seconds: float  # modelled expert time of the whole trace
    decode_seconds: float
    decode_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        """The project's hit rate (``reference_caches.hit_rate``: activations served from the fast tier)."""
        return hit_rate(self.hits, self.activations) or 0.0

    @property
    def ms_per_token(self) -> float:
        return 1e3 * self.seconds / self.tokens if self.tokens else 0.0

    @property
    def decode_ms_per_token(self) -> float:
        return 1e3 * self.decode_seconds / self.decode_tokens if self.decode_tokens else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "tier": self.tier,
            "budget": self.budget,
            "expert_budget": self.expert_budget,
            "steps": self.steps,
            "tokens": self.tokens,
            "activations": self.activations,
            "hits": self.hits,
            "hit_rate": self.hit_rate,
            "bytes_moved": self.bytes_moved,
            "preload_bytes": self.preload_bytes,
            "ms_per_token": self.ms_per_token,
            "decode_ms_per_token": self.decode_ms_per_token,
            "extra": self.extra,
        }


def trace_arrays(trace: RoutingTrace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``counts [T, n_moe_layer, E]``, ``step_tokens [T]`` and a ``prompt [T]`` mask (first step of each run)."""
    counts = trace.counts[:, trace.moe_layers, :].astype(np.int64)
    tokens = trace.step_n_tokens.astype(np.int64)
    prompt = np.zeros(trace.n_steps, bool)
    runs = trace.meta.get("runs") or []
    firsts = [int(r["first_step"]) for r in runs if isinstance(r, dict) and "first_step" in r]
    if firsts:
        prompt[[f for f in firsts if 0 <= f < trace.n_steps]] = True
    else:
        prompt = tokens > 32
    return counts, tokens, prompt


def check_layout(trace: RoutingTrace, layout: ExpertLayout) -> None:
    if trace.n_expert != layout.n_expert or tuple(int(x) for x in trace.moe_layers) != tuple(layout.moe_layers):
        raise SpacError(
            f"the trace ({len(trace.moe_layers)} MoE layers x {trace.n_expert} experts) does not match the model "
            f"({layout.n_layer} MoE layers x {layout.n_expert} experts); pass the model it was recorded from (--model)"
        )


def weight_type_name(name: str) -> str:
    """``name`` as a ggml type name (``q4_k`` -> ``Q4_K``); a one-line error for an unknown one."""
    up = name.strip().upper()
    if up not in WEIGHT_TYPES:
        raise SpacError(f"unknown weight type {name!r}; use a ggml type such as F16, Q8_0, Q4_K, Q6_K")
    return up


def recorded_layout(trace: RoutingTrace, expert_bytes: int | None = None, weight_type: str | None = None,
                    name: str = "the trace") -> ExpertLayout:
    """The expert layout of ``trace`` replayed without its model file, from what the trace records.

    Per MoE layer: the trace's top-k, one expert of ``expert_bytes`` (else the recorded size) split over
    :data:`RECORDED_TENSORS` tensors (the reads of one expert) of ``weight_type`` (else
    :data:`DEFAULT_WEIGHT_TYPE`); ``non_expert_bytes`` as recorded, else 0. A trace without a recorded
    layout (one recorded by ``spac trace``) needs ``expert_bytes``; its top-k is its ids' width.
    """
    rec = trace.layout
    if rec is None:
        k = int(trace.meta.get("n_expert_used") or trace.ids.shape[2])
        rec = TraceLayout(trace.n_expert, k)
    n_layer = len(trace.moe_layers)
    if expert_bytes is not None:
        if int(expert_bytes) <= 0:
            raise SpacError(f"--expert-bytes must be positive, not {expert_bytes}")
        sizes: tuple[int, ...] = (int(expert_bytes),) * n_layer
    elif rec.expert_bytes is None:
        fmt = (trace.meta.get("imported") or {}).get("format")
        src = f" (its source format, {fmt}, has none)" if fmt else ""
        raise SpacError(f"{name} records no expert sizes{src}; pass --expert-bytes SIZE (the bytes of one expert, "
                        f"e.g. 94.5MiB), or re-import it with `spac trace import ... --expert-bytes SIZE`")
    else:
        sizes = tuple(int(b) for b in rec.expert_bytes)
        zero = [int(il) for il, b in zip(trace.moe_layers, sizes, strict=True) if b <= 0]
        if zero:
            raise SpacError(f"{name} records 0 bytes per expert for MoE layer {zero[0]}; pass --expert-bytes SIZE "
                            f"or re-import it with `spac trace import ... --expert-bytes SIZE`")
    wt = weight_type_name(weight_type) if weight_type is not None else DEFAULT_WEIGHT_TYPE
    n = RECORDED_TENSORS
    tensors = tuple(tuple((wt, b // n + (b % n if j == 0 else 0)) for j in range(n)) for b in sizes)
    return ExpertLayout(tuple(int(il) for il in trace.moe_layers), int(trace.n_expert), tensors,
                        (int(rec.n_expert_used),) * n_layer, int(rec.non_expert_bytes or 0),
                        model=f"recorded in {name}")


def make_setup(trace: RoutingTrace, tier: str, budget: int, cost: CostModel, info: MoEModelInfo | ExpertLayout, *,
               config: PlacementConfig | None = None, lookahead: bool = True, keep: bool = True,
               n_ctx: int = budgets.DEFAULT_N_CTX,
               compute_reserve: int = budgets.DEFAULT_COMPUTE_RESERVE, kv_bytes: int | None = None) -> SimSetup:
    """What a replay of ``trace`` knows, with ``budget`` meaning what the tier's budget means
    (``planning.budgets``): flash, RAM for routed experts (the plan gets it less the staging, with
    ``lookahead`` the lookahead and with ``keep`` the keep reserve; sizes in whole pages); vram, GPU memory for
    the model (the pool gets it less the non-expert weights, the KV cache of ``n_ctx`` tokens, estimated from the
    GGUF header unless ``kv_bytes`` is given, and ``compute_reserve``, in whole slots per layer group).
    ``config``: the tier's placement configuration for ``ours`` (default: its defaults).

    ``info`` is the model's header, or without a model file the trace's recorded layout
    (:func:`recorded_layout`). Then the budget counts routed expert bytes only, at the recorded sizes (no
    page rounding: the file's offsets are unknown): flash, the plan gets it less the same staging, keep and
    lookahead reserves, computed from the recorded sizes and top-k (no edge pages); vram, the pool gets it all, in whole
    slots (nothing is known of the non-expert weights' or the KV cache's GPU memory; ``n_ctx``,
    ``compute_reserve`` and ``kv_bytes`` do not apply)."""
    if tier not in budgets.TIERS:
        raise SpacError(f"unknown tier {tier!r}; choose one of {', '.join(budgets.TIERS)}")
    model_path: Path | None = None  # None: the trace's recorded layout
    if isinstance(info, ExpertLayout):
        layout = dataclasses.replace(info, non_expert_bytes=0)
        name = info.model.removeprefix("recorded in ") or "the trace"
        non_expert = 0
    else:
        layout = budgets.tier_layout(tier, info)
        model_path, name, non_expert = info.path, info.path.name, info.non_expert_bytes
    check_layout(trace, layout)
    counts, tokens, _ = trace_arrays(trace)
    n_slots = group_of_row = None
    if tier == "flash":
        plan_bytes = budgets.flash_budget(budget, layout, lookahead=lookahead, keep=keep,
                                          edge_pages=model_path is not None, name=name).plan_bytes
    else:
        groups, group_of_row = budgets.pool_groups(layout)
        if model_path is None:
            smallest = min(g.slot_bytes for g in groups)
            if int(budget) < smallest:
                raise SpacError(
                    f"vram budget {format_size(int(budget))} is too small for {name}: without a model the budget is "
                    f"the expert pool, and one slot needs {format_size(smallest)} ({smallest} bytes)")
            kv_bytes, compute_reserve = 0, 0
        elif kv_bytes is None:
            kv_bytes = budgets.kv_cache_bytes(n_ctx, *budgets.kv_dims_of_gguf(model_path))
        split = budgets.vram_budget(budget, groups, non_expert_bytes=non_expert, kv_bytes=kv_bytes,
                                    compute_reserve=compute_reserve, name=name)
        plan_bytes, n_slots = split.pool_bytes, split.slots
    return SimSetup(tier, layout, cost, int(budget), int(plan_bytes), counts, tokens,
                    config=config or PlacementConfig.for_tier(tier), n_slots=n_slots, group_of_row=group_of_row)


def simulate(trace: RoutingTrace, policy: Policy | str, setup: SimSetup) -> SimResult:
    """Replay ``trace`` through ``policy`` (see the module docstring for the time model)."""
    pol = make_policy(policy) if isinstance(policy, str) else policy
    counts, tokens, prompt = trace_arrays(trace)
    T, L, E = counts.shape
    cost, layout, tier = setup.cost, setup.layout, setup.tier
    size = setup.size
    budget = setup.budget
    nbytes = layout.expert_bytes
    n_ranges = [layout.n_ranges(i) for i in range(L)]
    if tier == "flash":
        miss_t = [cost.flash_miss.seconds(int(nbytes[i]), n_ranges[i]) for i in range(L)]
        load_t = [cost.flash_prefetch.seconds(int(nbytes[i]), n_ranges[i]) for i in range(L)]
    else:
        miss_t = [0.0] * L
        load_t = [cost.h2d_seconds(int(nbytes[i]), n_ranges[i]) for i in range(L)]
    cpu_cache: dict[tuple[int, int], float] = {}
    gpu_cache: dict[tuple[int, int], float] = {}

    def cpu(i: int, c: int) -> float:
        v = cpu_cache.get((i, c))
        if v is None:
            v = cpu_cache[i, c] = cost.cpu_seconds(layout.tensors[i], c)
        return v

    def gpu(i: int, c: int) -> float:
        v = gpu_cache.get((i, c))
        if v is None:
            v = gpu_cache[i, c] = cost.gpu_seconds(int(nbytes[i]), c)
        return v

    res = np.asarray(pol.reset(setup), bool).copy()
    if res.shape != (L, E):
        raise RuntimeError(f"policy {pol.name} returned a residency of shape {res.shape}")
    used = int(size[res].sum())
    if used > budget:
        raise RuntimeError(f"policy {pol.name} preloaded {used} bytes > budget {budget}")
    preload = used
    hits_total = acts_total = 0
    moved = 0
    total_s = decode_s = 0.0
    decode_tokens = 0
    transfer_bound = 0  # steps whose background transfers outlasted their compute
    stall_s = 0.0
    admits = pol.admits_demand and not pol.demand and tier == "flash"
    transient = np.zeros((L, E), bool)  # admitted demand loads that no plan has kept yet
    for t in range(T):
        bg = 0.0
        want = pol.before_step(t, res)
        if want is None and transient.any():
            want = res & ~transient  # no plan since the step that loaded them: dropped again
        transient[:] = False
        if want is not None:
            want = np.asarray(want, bool)
            new_used = int(size[want].sum())
            if new_used > budget:
                raise RuntimeError(f"policy {pol.name} planned {new_used} bytes > budget {budget} at step {t}")
            loads = want & ~res
            for i, _ in np.argwhere(loads).tolist():
                bg += load_t[i]
                moved += int(nbytes[i])
            res = want.copy()
            used = new_used
        compute = sync = gpu_sum = 0.0
        need = counts[t] > 0
        step_hits, step_activations = count_hits(need, res)
        hits_total += step_hits
        acts_total += step_activations
        for i in range(L):
            row = counts[t, i]
            active = np.flatnonzero(row)
            if not len(active):
                continue
            hits = res[i, active]
            layer_cpu = layer_gpu = 0.0
            for e, h in zip(active.tolist(), hits.tolist(), strict=True):
                c = int(row[e])
                if tier == "flash":
                    compute += cpu(i, c)
                    if not h:
                        sync += miss_t[i]
                        moved += int(nbytes[i])
                elif h:
                    layer_gpu += gpu(i, c)
                else:
                    layer_cpu += cpu(i, c)
            if tier == "vram":
                gpu_sum += max(layer_gpu, layer_cpu)
        if pol.demand:
            # the step's misses that the cache keeps are admitted (a copy in vram; in flash the
            # on-demand read already brought them in); evictions are free
            kept = np.asarray(pol.demand_step(t, need), bool)
            if (kept & ~(res | need)).any():
                raise RuntimeError(f"demand policy {pol.name} admitted an expert step {t} did not use")
            for i, _ in np.argwhere(kept & ~res).tolist():
                if tier == "vram":
                    bg += load_t[i]
                    moved += int(nbytes[i])
            res = kept.copy()
            used = int(size[res].sum())
        step_s = sync + max(compute, bg) if tier == "flash" else max(gpu_sum, bg)
        work = compute if tier == "flash" else gpu_sum
        if bg > work:
            transfer_bound += 1
            stall_s += bg - work
        total_s += step_s
        if not prompt[t]:
            decode_s += step_s
            decode_tokens += int(tokens[t])
        admitted = pol.admit(t, need, res) if not pol.demand else None
        if admitted is not None:
            # layer admission (flash): misses took planned experts' places in their layers' hooks (no charge:
            # their read is the miss); the others were dropped after their layer
            res = np.asarray(admitted, bool).copy()
        elif admits:
            # the step's misses were read on demand and stay until the next plan says which to keep (no
            # charge: their read is the miss); a residency the plan does not name is dropped again
            transient = need & ~res
            res = res | need
        pol.after_step(t, counts[t], int(tokens[t]))
        if used > budget:
            raise RuntimeError(f"policy {pol.name} exceeded the budget at step {t}")
    return SimResult(
        policy=pol.name,
        tier=tier,
        budget=setup.total_budget,
        expert_budget=budget,
        steps=T,
        tokens=int(tokens.sum()),
        activations=acts_total,
        hits=hits_total,
        bytes_moved=moved,
        preload_bytes=preload,
        seconds=total_s,
        decode_seconds=decode_s,
        decode_tokens=decode_tokens,
        extra={**pol.stats(), "transfer_bound_steps": transfer_bound, "transfer_stall_s": stall_s},
    )


def compare(trace: RoutingTrace, setup: SimSetup, policies: tuple[str, ...] = POLICIES) -> list[SimResult]:
    return [simulate(trace, make_policy(p), setup) for p in policies]


def format_table(results: list[SimResult]) -> str:
    header = ("policy", "hit rate", "moved", "preload", "ms/token", "decode ms/tok")
    rows = [
        (
            r.policy,
            f"{100 * r.hit_rate:.1f}%",
            format_size(r.bytes_moved),
            format_size(r.preload_bytes),
            f"{r.ms_per_token:.3f}",
            f"{r.decode_ms_per_token:.3f}" if r.decode_tokens else "-",
        )
        for r in results
    ]
    widths = [max(len(x[k]) for x in [header, *rows]) for k in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if k == 0 else '>'}{w}}}" for k, w in enumerate(widths))
    lines = [fmt.format(*header), "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


def plot(results: list[SimResult], path: str | Path, title: str = "") -> Path:
    """Bar charts of hit rate, modelled ms/token and bytes moved, one bar per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    names = [r.policy for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [
        ("hit rate (%)", [100 * r.hit_rate for r in results]),
        ("modelled ms / token (experts)", [r.ms_per_token for r in results]),
        ("MiB moved", [r.bytes_moved / 2**20 for r in results]),
    ]
    colors = ["#c44e52" if n == "ours" else ("#8c8c8c" if n in ("belady", "min") else "#4c72b0") for n in names]
    for ax, (label, vals) in zip(axes, panels, strict=True):
        ax.bar(names, vals, color=colors)
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
        for k, v in enumerate(vals):
            ax.text(k, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_inputs(
    trace_path: str | Path,
    model: str | Path | None = None,
    calibration: str | Path | None = None,
    measure: Callable[[str | Path | None], CostModel] | None = None,
    *,
    expert_bytes: int | None = None,
    weight_type: str | None = None,
) -> tuple[RoutingTrace, MoEModelInfo | ExpertLayout, CostModel]:
    """The trace, its model's header (or its recorded layout) and the cost model.

    The layout: ``model``'s header if given; else, unless ``expert_bytes`` or ``weight_type`` is given, that
    of the model the trace names when that file is here; else the trace's recorded layout
    (:func:`recorded_layout`: an imported trace, or any trace with ``expert_bytes``).

    The cost model is ``calibration`` if given, else this machine's cached calibration (for the model,
    else the generic one; without a model the generic one), else ``measure(model or None)`` when given
    (the CLI measures and caches it), else nominal costs (logged).
    """

    trace = RoutingTrace.load(trace_path)
    name = Path(trace_path).name
    by_layout = expert_bytes is not None or weight_type is not None
    if model and by_layout:
        raise SpacError("--expert-bytes and --weight-type describe a trace replayed without its model; with --model "
                        "the expert sizes and types come from the model's header")
    named = trace.meta.get("model")
    model_path = model or (None if by_layout else named)
    info: MoEModelInfo | ExpertLayout
    if model_path and Path(model_path).is_file():
        info = inspect_model(model_path)
        check_layout(trace, ExpertLayout.from_info(info))
    elif model:
        raise SpacError(f"model {model} (from --model) not found")
    elif trace.layout is not None or by_layout:
        if named and not by_layout:
            log.info("model %s (from the trace) is not here: using the layout the trace records", named)
        info = recorded_layout(trace, expert_bytes, weight_type, name=name)
        model_path = None
    elif not named:
        raise SpacError(f"{trace_path} does not name the model it was recorded from and records no layout; "
                        "pass --model MODEL.gguf or --expert-bytes SIZE")
    else:
        raise SpacError(f"model {named} (from the trace) not found; pass --model MODEL.gguf or --expert-bytes SIZE")
    if calibration is not None:
        cost = CostModel.load(calibration)
    else:
        cached = load_cached(model_path)
        if cached is None and measure is not None:
            cached = measure(model_path)
        if cached is None:
            log.warning("no calibration cached for this machine: simulating with nominal costs (run `spac calibrate`)")
            cached = CostModel.nominal()
        cost = cached
    return trace, info, cost
