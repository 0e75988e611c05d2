#!/usr/bin/env python
"""Per-step costs of the flash tier's control loop at a model's real scale (e.g. 6144 experts).

On one GGUF (a real-shape synthetic one will do: ``spac synth qwen3-30b-a3b -o q.gguf``), with its real
expert layout, measures what grows with the number of experts and the size of the file:

* residency (``mincore``): the whole model (what every check cost before partial sweeps) and one
  check of the sweep (``check_bytes``), cold (nothing cached) and after the loop (the tier's state);
  the hook's per-expert check of one token's selections (``n_moe_layers x k`` experts);
* the balancer on utilities the loop learnt: the greedy plan (the flash tier's default solver), what
  ``solver="auto"`` returns (greedy when the bound proves it near-optimal), and the MILP forced (PuLP:
  HiGHS when installed, else CBC) within ``--time-limit`` and ``--long`` seconds;
* the tier's loop (``TierController.on_step``) driven without llama.cpp: a routing sensor that no
  model feeds, steps of random top-k routing (a prompt step, then one token per step), the real flash
  engine moving experts in its worker threads; decoding-thread seconds per phase (observe, learn,
  plan = re-planner hand-off, move = plan diff, step_ends = lookahead + residency check);
* ``--run N``: a real generation of N tokens (``spac_llamacpp.Llama(tier="flash")``, no RAM limit):
  Python time per step around llama.cpp's evaluation (sensor read-out, tier loop), and the loop's phases.

CPU seconds are the thread's (``CLOCK_THREAD_CPUTIME_ID``, system time included), wall seconds the
clock's: on a busy machine wall time also counts waiting for a core. The last line is one JSON object.

    python scripts/bench_scale.py q.gguf --budget 25% --steps 64 [--run 8]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spac_llamacpp.base.sizes import format_size  # noqa: E402
from spac_llamacpp.gguf.info import read_model_header  # noqa: E402
from spac_llamacpp.native.flash_engine import FlashEngine  # noqa: E402
from spac_llamacpp.native.mapping import FileMapping  # noqa: E402
from spac_llamacpp.native.memlimit import drop_file_cache  # noqa: E402
from spac_llamacpp.native.sensor import RoutingSensor  # noqa: E402
from spac_llamacpp.observe.routing import RoutingStep  # noqa: E402
from spac_llamacpp.planning.balancer import Balancer, solve  # noqa: E402
from spac_llamacpp.planning.budgets import flash_budget, tier_layout  # noqa: E402
from spac_llamacpp.planning.calibration import machine_cost_model  # noqa: E402
from spac_llamacpp.tiers.flash import DEFAULT_CHECK_BYTES, FlashTier, sweep_chunks  # noqa: E402
from spac_llamacpp.tools.benchmarks import budget_arg  # noqa: E402


def timed(fn, repeat: int = 3) -> dict:
    """Median wall and thread-CPU milliseconds of ``fn()`` over ``repeat`` calls."""
    walls, cpus = [], []
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.thread_time()
        fn()
        cpus.append(time.thread_time() - c0)
        walls.append(time.perf_counter() - w0)
    return {"wall_ms": 1e3 * statistics.median(walls), "cpu_ms": 1e3 * statistics.median(cpus)}


def fmt(t: dict) -> str:
    return f"{t['wall_ms']:8.2f} ms wall, {t['cpu_ms']:8.2f} ms CPU"


class Mapped:
    """A read-only MAP_SHARED mapping of the whole file, as llama.cpp makes it."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        size = os.fstat(self.fd).st_size
        self.map = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        self.view = np.frombuffer(self.map, dtype=np.uint8)
        addr = self.view.ctypes.data
        self.mapping = FileMapping(addr, addr + size, 0, "r--s", os.fstat(self.fd).st_ino, path)

    def close(self) -> None:
        del self.view
        self.map.close()
        os.close(self.fd)


def residency_costs(engine: FlashEngine, chunk: tuple[int, int], rows: np.ndarray, k: int, seed: int) -> dict:
    frac = np.zeros((engine.n_layer, engine.n_expert), np.float32)
    by_layer = np.zeros(engine.n_layer, np.int64)
    i0, i1 = chunk
    out = {"whole_model": timed(lambda: engine.residency(per_expert=True)),
           "one_check": timed(lambda: engine.residency_layers(int(rows[i0]), int(rows[i1 - 1]) + 1, frac, by_layer)),
           "check_layers": i1 - i0}
    rng = np.random.default_rng(seed)
    sel = [(int(b), int(e)) for b in rows for e in rng.choice(engine.n_expert, k, replace=False)]
    lib, handle = engine._lib, engine._handle
    out["hook_one_token"] = timed(lambda: [lib.spac_engine_expert_resident(handle, b, e) for b, e in sel])
    out["resident_bytes"] = engine.residency(per_expert=False)[0]
    return out


def synthetic_steps(n_layer: int, n_expert: int, k: int, steps: int, prompt: int, seed: int):
    """Random top-k routing (what a random-weight model's router gives, roughly): a prompt step of
    ``prompt`` tokens, then one token per step."""
    rng = np.random.default_rng(seed)
    first = 0
    for s in range(steps):
        n = prompt if s == 0 else 1
        counts = np.zeros((n_layer, n_expert), np.int32)
        for _ in range(n):
            picks = np.argsort(rng.random((n_layer, n_expert)), axis=1)[:, :k]
            np.add.at(counts, (np.arange(n_layer)[:, None], picks), 1)
        yield RoutingStep(s, first, n, counts, np.full(n_layer, n, np.int32), None)
        first += n


def loop_costs(tier: FlashTier, info, k: int, args: argparse.Namespace) -> dict:
    n_layer = info.block_count
    walls, cpus = [], []
    for step in synthetic_steps(n_layer, info.n_expert, k, args.steps, args.prompt_tokens, args.seed):
        t0, c0 = time.perf_counter(), time.thread_time()
        tier.on_step(step)
        cpus.append(time.thread_time() - c0)
        walls.append(time.perf_counter() - t0)
        time.sleep(args.step_gap)  # let the workers move experts, as during a model's evaluation
    st = tier.stats(settle=30.0)
    per = {name: 1e3 * s / args.steps for name, s in st["loop_seconds"].items()}
    checks = max(st["checks"], 1)
    return {"steps": args.steps, "on_step_ms_median": 1e3 * statistics.median(walls[1:]),
            "on_step_cpu_ms_median": 1e3 * statistics.median(cpus[1:]),
            "on_step_cpu_ms_mean": 1e3 * statistics.fmean(cpus[1:]),
            "on_step_ms_first": 1e3 * walls[0], "on_step_ms_max_later": 1e3 * max(walls[1:]),
            "phase_ms_per_step": per, "checks": st["checks"], "check_layers": st["check_layers"],
            "check_ms_per_check": 1e3 * st["check_seconds"] / checks,
            "check_cpu_ms_per_check": 1e3 * st["check_cpu_seconds"] / checks,
            "strays_evicted": st["strays_evicted"], "plans_applied": st["plans_applied"],
            "replanner": st["replanner"], "engine_prefetches": st["engine"]["prefetches"],
            "engine_evictions": st["engine"]["evictions"]}


def balancer_costs(tier: FlashTier, info, layout, plan_bytes: int, time_limit: float, long_limit: float) -> dict:
    cost = machine_cost_model(info.path)
    u = tier.demand.utility()
    out = {"cost_model": cost.source or "nominal", "experts": int(layout.n_layer * layout.n_expert)}
    bal = Balancer(layout, cost, "flash", plan_bytes, horizon=tier.config.horizon)
    problem = bal.problem(u, tier.wanted.copy())
    runs = {"greedy": {"solver": "greedy", "time_limit": time_limit},
            "auto": {"solver": "auto", "time_limit": time_limit},  # what solver="auto" does (may certify greedy)
            "milp": {"solver": "auto", "time_limit": time_limit, "certify": False}}
    if long_limit > 0:
        runs["milp_long"] = {"solver": "auto", "time_limit": long_limit, "certify": False}
    for name, kw in runs.items():
        w0, c0 = time.perf_counter(), time.process_time()
        plan = solve(problem, **kw)
        out[name] = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0, "method": plan.method,
                     "status": plan.status, "objective_ms": 1e3 * plan.objective, "placed": int(plan.x.sum()),
                     "time_limit": kw["time_limit"]}
    return out


def real_run(path: str, budget: int, n: int, threads: int | None) -> dict:
    """Python time per step around llama.cpp's evaluation in a real generation."""
    import llama_cpp

    from spac_llamacpp import Llama
    from spac_llamacpp.tools.benchmarks import PROMPTS, timed_generation

    inner = {"s": 0.0, "n": 0}
    stock_eval, spac_eval = llama_cpp.Llama.eval, Llama.eval
    outer = {"s": 0.0}

    def inner_eval(self, tokens):
        t0 = time.perf_counter()
        stock_eval(self, tokens)
        inner["s"] += time.perf_counter() - t0
        inner["n"] += 1

    def outer_eval(self, tokens):
        t0 = time.perf_counter()
        spac_eval(self, tokens)
        outer["s"] += time.perf_counter() - t0

    llama_cpp.Llama.eval, Llama.eval = inner_eval, outer_eval
    try:
        llm = Llama(path, n_ctx=512, n_threads=threads, verbose=False, tier="flash", budget=budget)
        tokens, decode_s, prompt_s = timed_generation(llm, PROMPTS[:1], n)
        st = llm.stats(settle=10.0)
        llm.close()
    finally:
        llama_cpp.Llama.eval, Llama.eval = stock_eval, spac_eval
    steps = max(inner["n"], 1)
    return {"tokens": tokens, "tps": tokens / (decode_s + prompt_s), "steps": inner["n"],
            "python_ms_per_step": 1e3 * (outer["s"] - inner["s"]) / steps,
            "llama_eval_ms_per_step": 1e3 * inner["s"] / steps,
            "phase_ms_per_step": {k: 1e3 * v / steps for k, v in st["loop_seconds"].items()},
            "check_ms_per_check": 1e3 * st["check_seconds"] / max(st["checks"], 1), "hit_rate": st["hit_rate"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--budget", default="25%", help="flash budget: a size or a share of the expert bytes")
    ap.add_argument("--steps", type=int, default=64, help="synthetic loop steps")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--step-gap", type=float, default=0.05, help="seconds between synthetic steps")
    ap.add_argument("--check-bytes", type=int, default=DEFAULT_CHECK_BYTES)
    ap.add_argument("--time-limit", type=float, default=1.0, help="the MILP's time limit")
    ap.add_argument("--long", type=float, default=10.0, help="a MILP with this time limit too (0: skip)")
    ap.add_argument("--run", type=int, default=0, help="also generate this many tokens with the real model")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    info = read_model_header(args.model)
    layout = tier_layout("flash", info)
    budget = budget_arg(args.budget, "flash", info)
    plan_bytes = flash_budget(budget, layout).plan_bytes
    k = max(info.n_expert_used)
    rows = np.asarray(info.moe_layers, np.int64)
    print(f"model {info.path.name}: {len(rows)} MoE layers x {info.n_expert} experts = {len(rows) * info.n_expert} "
          f"experts, top-{k}, {format_size(info.expert_bytes)} of experts; budget {format_size(budget)}", flush=True)
    report: dict = {"model": info.path.name, "experts": len(rows) * info.n_expert, "expert_bytes": info.expert_bytes,
                    "budget_bytes": budget, "check_bytes": args.check_bytes}

    drop_file_cache(args.model)
    m = Mapped(args.model)
    chunk = sweep_chunks(layout.bytes_matrix.sum(axis=1), args.check_bytes)[0]
    bare = FlashEngine(info, m.mapping)
    try:
        report["residency_cold"] = r = residency_costs(bare, chunk, rows, k, args.seed)
    finally:
        bare.close()
    sensor = RoutingSensor(info.block_count, info.n_expert, k)
    tier = FlashTier(info, m.mapping, sensor, budget, lock_non_experts=False,
                     check_bytes=args.check_bytes)
    try:
        print(f"mincore, cold: whole model {fmt(r['whole_model'])}; one check ({r['check_layers']} layers) "
              f"{fmt(r['one_check'])}; one token's hook checks {fmt(r['hook_one_token'])}", flush=True)
        report["loop"] = lp = loop_costs(tier, info, k, args)
        print(f"loop, {lp['steps']} steps: on_step median {lp['on_step_ms_median']:.2f} ms wall, CPU median "
              f"{lp['on_step_cpu_ms_median']:.2f} ms, mean {lp['on_step_cpu_ms_mean']:.2f} ms (first "
              f"{lp['on_step_ms_first']:.1f} ms, later max {lp['on_step_ms_max_later']:.1f} ms); per step "
              + ", ".join(f"{k} {v:.2f} ms" for k, v in lp["phase_ms_per_step"].items())
              + f"; a check {lp['check_ms_per_check']:.2f} ms wall, {lp['check_cpu_ms_per_check']:.2f} ms CPU "
              f"({lp['strays_evicted']} strays evicted)", flush=True)
        report["residency_tier"] = r = residency_costs(tier.engine, chunk, rows, k, args.seed)
        print(f"mincore, tier state ({format_size(r['resident_bytes'])} resident): whole model "
              f"{fmt(r['whole_model'])}; one check {fmt(r['one_check'])}; hook {fmt(r['hook_one_token'])}", flush=True)
        report["balancer"] = b = balancer_costs(tier, info, layout, plan_bytes, args.time_limit, args.long)
        for solver in [n for n in b if isinstance(b[n], dict)]:
            x = b[solver]
            print(f"balancer {solver} (limit {x['time_limit']:g} s): {x['method']} {x['status']} in "
                  f"{x['wall_s']:.3f} s wall ({x['cpu_s']:.3f} s CPU), {x['placed']} experts placed, objective "
                  f"{x['objective_ms']:.2f} ms/step", flush=True)
    finally:
        tier.close()
        m.close()
    if args.run:
        report["run"] = r = real_run(args.model, budget, args.run, args.threads)
        print(f"real run, {r['tokens']} tokens at {r['tps']:.2f} tok/s: Python around llama.cpp's eval "
              f"{r['python_ms_per_step']:.2f} ms per step (llama.cpp {r['llama_eval_ms_per_step']:.0f} ms); per step "
              + ", ".join(f"{k} {v:.2f} ms" for k, v in r["phase_ms_per_step"].items()), flush=True)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
