#!/usr/bin/env python
"""Benchmark the placement integer program at real model sizes.

Two layouts, with the expert sizes of their Q4_K_M GGUFs (gate/up Q4_K; down Q6_K on the layers
where llama.cpp's Q4_K_M gives ffn_down more bits, Q4_K elsewhere, so expert sizes differ by layer):

- Qwen3-30B-A3B: 48 MoE layers x 128 experts, top-8, n_embd 2048, expert ff 768;
- DeepSeek-V2-Lite: 27 layers x 64 experts, top-6, n_embd 2048, expert ff 1408.

Utilities are Zipf-skewed per layer (random expert order) and drift between consecutive re-plans
(log-normal noise); each re-plan warm-starts from the previous plan, as the Replanner does. For each
scenario it prints the solve times, the gap to the LP-relaxation bound and to a long solve, and the
amortised re-planning cost relative to a stated decode time per token.

    .venv/bin/python scripts/bench_balancer.py                # uses this machine's cached calibration
    .venv/bin/python scripts/bench_balancer.py --replans 4 --long 0
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spac_llamacpp.base.sizes import format_size  # noqa: E402
from spac_llamacpp.planning.balancer import Balancer, lp_bound, solve  # noqa: E402
from spac_llamacpp.planning.budgets import flash_budget, pool_groups, vram_budget, vram_budget_for_pool  # noqa: E402
from spac_llamacpp.planning.calibration import calibration_path, load_cached  # noqa: E402
from spac_llamacpp.planning.costmodel import CostModel, ExpertLayout, GpuCost  # noqa: E402
from spac_llamacpp.planning.replanner import Replanner  # noqa: E402
from spac_llamacpp.tools.calibrate import calibrate  # noqa: E402

Q4_K_BPW, Q6_K_BPW = 144 * 8 / 256, 210 * 8 / 256


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's rule for which layers' ffn_down get Q6_K in Q4_K_M."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def q4_k_m_layout(n_layer: int, n_expert: int, k: int, n_embd: int, ff: int, non_expert: int) -> ExpertLayout:
    gate_up = int(n_embd * ff * Q4_K_BPW / 8)
    tensors = []
    for i in range(n_layer):
        down_type, bpw = ("Q6_K", Q6_K_BPW) if use_more_bits(i, n_layer) else ("Q4_K", Q4_K_BPW)
        tensors.append((("Q4_K", gate_up), ("Q4_K", gate_up), (down_type, int(n_embd * ff * bpw / 8))))
    return ExpertLayout(tuple(range(n_layer)), n_expert, tuple(tensors), (k,) * n_layer, non_expert)


MODELS = {
    # name: (layout, stated decode time per token in s)
    "Qwen3-30B-A3B": (q4_k_m_layout(48, 128, 8, 2048, 768, 1_600_000_000), 0.050),
    "DeepSeek-V2-Lite": (q4_k_m_layout(27, 64, 6, 2048, 1408, 1_400_000_000), 0.030),
}


def utilities(rng: np.random.Generator, lay: ExpertLayout, skew: float = 1.0) -> np.ndarray:
    L, E = lay.n_layer, lay.n_expert
    ranks = np.arange(1, E + 1, dtype=np.float64) ** -skew
    u = np.stack([rng.permutation(ranks) for _ in range(L)])
    return u / u.sum(axis=1, keepdims=True) * np.array(lay.n_expert_used)[:, None]


def drift(rng: np.random.Generator, u: np.ndarray, sigma: float) -> np.ndarray:
    v = u * rng.lognormal(0.0, sigma, size=u.shape)
    return v / v.sum(axis=1, keepdims=True) * u.sum(axis=1, keepdims=True)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def replan_sequence(bal: Balancer, lay: ExpertLayout, args: argparse.Namespace, time_limit: float | None = None):
    """Warm-started re-plans on drifting utilities: yields (problem, plan)."""
    rng = np.random.default_rng(args.seed)
    u = utilities(rng, lay)
    resident = None
    for _ in range(args.replans):
        plan = bal.plan(u, resident, time_limit=time_limit)  # times include costing the utilities
        yield bal.problem(u, resident), plan
        resident = plan.x
        u = drift(rng, u, args.sigma)


def tier_budget(lay: ExpertLayout, tier: str, share: float) -> tuple[int, int]:
    """(the tier's budget, the bytes its plan gets) for ``share`` of the expert bytes, as the tiers count
    (``planning.budgets``): flash, RAM for experts (less staging and lookahead); vram, GPU memory for the model
    (non-expert weights and the default compute reserve on top; no KV cache counted here)."""
    experts = int(lay.total_expert_bytes * share)
    if tier == "flash":
        return experts, flash_budget(experts, lay).plan_bytes
    fixed = {"non_expert_bytes": lay.non_expert_bytes, "kv_bytes": 0}
    budget = vram_budget_for_pool(experts, **fixed)
    return budget, vram_budget(budget, pool_groups(lay)[0], **fixed).pool_bytes


def run_scenario(name: str, lay: ExpertLayout, cost: CostModel, tier: str, share: float, decode_s: float,
                 args: argparse.Namespace, note: str = "") -> None:
    budget, plan_bytes = tier_budget(lay, tier, share)
    bal = Balancer(lay, cost, tier, plan_bytes, horizon=args.horizon, time_limit=args.time_limit, gap=args.gap)
    walls, cpus, methods, objs, gaps_lp = [], [], {}, [], []
    first_problem = None
    first_plan = None
    for r, (prob, plan) in enumerate(replan_sequence(bal, lay, args)):
        if first_problem is None:
            first_problem, first_plan = prob, plan
        walls.append(plan.seconds)
        cpus.append(plan.cpu_seconds)
        methods[plan.method] = methods.get(plan.method, 0) + 1
        objs.append(plan.objective)
        if r < args.lp_checks:
            lb = lp_bound(prob)
            gaps_lp.append((plan.objective - lb) / plan.objective)
    n_free = int(((first_problem.fast > 0) | (first_problem.slow > 0)).sum())
    fill = int(lay.bytes_matrix[first_plan.x].sum())
    print(f"\n## {name}, tier {tier}, budget {format_size(budget)} ({format_size(bal.budget)} for experts of "
          f"{format_size(lay.total_expert_bytes)}; {first_plan.x.sum()} of {lay.n_layer * lay.n_expert} experts "
          f"placed, {format_size(fill)}){note}")
    print(f"  variables {n_free} binaries" + (f" + {lay.n_layer} layer times" if tier == "vram" else ""))
    print(f"  plan wall   median {1e3 * statistics.median(walls):8.1f} ms  p90 {1e3 * pct(walls, 90):8.1f} ms  "
          f"max {1e3 * max(walls):8.1f} ms   (time limit {args.time_limit:g} s, {args.replans} warm-started re-plans)")
    print(f"  plan CPU    median {1e3 * statistics.median(cpus):8.1f} ms  (costing + solve, CBC subprocess included); "
          f"methods {methods}")
    print(f"  objective   {1e3 * statistics.median(objs):.3f} ms/step modelled; gap to LP bound: median "
          f"{100 * statistics.median(gaps_lp):.3f}%  max {100 * max(gaps_lp):.3f}%  (first {len(gaps_lp)} re-plans)")
    if args.long > 0:
        t0 = time.perf_counter()
        long_plan = solve(first_problem, time_limit=args.long, gap=0.0, certify=False)
        dt = time.perf_counter() - t0
        gap = (first_plan.objective - long_plan.objective) / long_plan.objective
        print(f"  long solve  {long_plan.method} {long_plan.status} in {dt:.1f} s: objective "
              f"{1e3 * long_plan.objective:.3f} ms; gap of the {args.time_limit:g} s solve {100 * gap:.4f}%")
    mean_cpu = statistics.fmean(cpus)
    for every in args.every:
        frac = mean_cpu / (every * decode_s)
        print(f"  amortised   re-plan every {every:3} steps at {1e3 * decode_s:.0f} ms/token: "
              f"{1e3 * mean_cpu:.1f} ms CPU / {every * decode_s:.2f} s = {100 * frac:.2f}% of decode time")
    if max(walls) > args.share * min(args.every) * decode_s:
        every = min(args.every)
        cap = args.share * every * decode_s
        capped = list(replan_sequence(bal, lay, args, time_limit=cap))
        c_cpu = statistics.fmean(p.cpu_seconds for _, p in capped)
        loss = statistics.fmean((p.objective - o) / o for (_, p), o in zip(capped, objs, strict=True))
        c_methods: dict[str, int] = {}
        for _, p in capped:
            c_methods[p.method] = c_methods.get(p.method, 0) + 1
        print(f"  capped      Replanner(share={args.share:g}) at every {every}: time limit {cap:.3f} s -> "
              f"{1e3 * c_cpu:.1f} ms CPU = {100 * c_cpu / (every * decode_s):.2f}% of decode time; objective "
              f"{100 * loss:+.3f}% vs the {args.time_limit:g} s solves; methods {c_methods}")


def replanner_overhead(lay: ExpertLayout, cost: CostModel, budget: int, args: argparse.Namespace) -> None:
    """What the decoding thread pays: submit() calls while the background thread solves."""
    rng = np.random.default_rng(args.seed)
    bal = Balancer(lay, cost, "vram", budget, time_limit=args.time_limit, gap=args.gap)
    u = utilities(rng, lay)
    steps = 200
    with Replanner(bal.plan, every=32, drift=0.25) as rp:
        t0 = time.perf_counter()
        for s in range(steps):
            u = drift(rng, u, 0.02)
            rp.submit(u, s)
            rp.take()
        loop = time.perf_counter() - t0
        rp.wait_idle(120)
        st = rp.stats
    print(f"\n## Replanner, {lay.n_layer} x {lay.n_expert}: {steps} submits in {1e3 * loop:.1f} ms of decoding-thread "
          f"time ({1e6 * st.submit_seconds / steps:.1f} us per submit); {st.requested} re-plans requested, "
          f"{st.solves} solved, {st.coalesced} coalesced")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibration", help="calibration JSON (default: this machine's cached one, measured if none)")
    ap.add_argument("--replans", type=int, default=8)
    ap.add_argument("--lp-checks", type=int, default=3, help="re-plans whose LP bound is computed")
    ap.add_argument("--time-limit", type=float, default=1.0)
    ap.add_argument("--gap", type=float, default=1e-3)
    ap.add_argument("--horizon", type=float, default=32.0)
    ap.add_argument("--sigma", type=float, default=0.15, help="log-normal utility drift between re-plans")
    ap.add_argument("--long", type=float, default=20.0, help="time limit of the reference solve (0: skip)")
    ap.add_argument("--every", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--share", type=float, default=0.05, help="Replanner share of decode time for the capped runs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.calibration:
        cost = CostModel.load(args.calibration)
    else:
        cost = load_cached()
        if cost is None:
            cost = calibrate(progress=lambda m: print(f"calibrate: {m}", file=sys.stderr))
            cost.source = str(cost.save(calibration_path(None)))
    print(f"cost model: {cost.source}; CPU {', '.join(sorted(cost.cpu))}; GPU "
          f"{'measured' if cost.gpu.measured else 'assumed (none here)'}")
    cpu_bw = 1.0 / cost.kernel("Q4_K").per_byte(1)
    slow_gpu = CostModel(**{**cost.__dict__, "cpu": dict(cost.cpu),
                            "gpu": GpuCost(present=False, bandwidth=2 * cpu_bw, launch_s=30e-6, h2d=cost.gpu.h2d)})
    for name, (lay, decode_s) in MODELS.items():
        total = lay.non_expert_bytes + lay.total_expert_bytes
        print(f"\n# {name}: {lay.n_layer} x {lay.n_expert} experts, top-{lay.n_expert_used[0]}, "
              f"{format_size(lay.total_expert_bytes)} of experts, {format_size(total)} in all; stated decode time "
              f"{1e3 * decode_s:.0f} ms/token")
        run_scenario(name, lay, cost, "vram", 1 / 2, decode_s, args)
        run_scenario(name, lay, cost, "flash", 1 / 3, decode_s, args)
        run_scenario(name, lay, slow_gpu, "vram", 1 / 2, decode_s, args,
                     note=f"\n  STRESS: a GPU only 2x faster than the CPU ({2 * cpu_bw / 1e9:.1f} GB/s), so the "
                     "per-layer "
                     "max(GPU, CPU) binds")
    lay, _ = MODELS["Qwen3-30B-A3B"]
    replanner_overhead(lay, cost, tier_budget(lay, "vram", 1 / 2)[1], args)


if __name__ == "__main__":
    main()
