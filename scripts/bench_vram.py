#!/usr/bin/env python
"""VRAM tier benchmark: stock llama-cpp-python vs spac_llamacpp.Llama(tier="vram") at one VRAM budget.

Needs the patched library built for the GPU (``SPAC_LLAMA_BACKEND=--cuda bash scripts/setup.sh``).
For each budget, each in a fresh process, the same prompts and token counts:

* ``stock exps=CPU``: ``llama_cpp.Llama(n_gpu_layers=-1)`` with every routed expert tensor on the CPU
  (llama.cpp's ``-ot exps=CPU``): only non-expert weights use VRAM;
* ``stock n-cpu-moe=N``: routed experts of the first N layers on the CPU, the rest on the GPU
  (llama.cpp's ``--n-cpu-moe N``), for the smallest N whose weights fit the budget and the next two;
  the fastest is reported as the best;
* ``spac``: ``spac_llamacpp.Llama(tier="vram", vram_budget=B)``: the pool gets what the non-expert
  weights, KV cache and compute reserve leave.

Every run uses llama.cpp's default CPU weight repacking for the experts the CPU computes (the pool
copies repacked experts from the GGUF file); ``--no-repack`` turns it off everywhere (needed on the
development VM, whose AMX kernels crash on K-quant weights when non-expert weights stay on the CPU).
Printed: decode tokens/s, spac's pool hit rate, ratios; the last line is JSON.
``--pool-on-host`` runs the spac side with the pool in host memory (a smoke test without a GPU: its
speed means nothing). ``--replay TRACE`` forces every run's routing to a trace's (docs/replay.md); the
stock runs are then ``spac_llamacpp.Llama`` with no tier (the same overrides, the same forced routing).

Example::

    M=~/.cache/spac-llamacpp/models/qwen2.5-coder-1.5b-moe-e64x128-s768-k8-routernorm-f16.gguf
    python scripts/bench_vram.py $M --budget 50% --budget 25% -n 64
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from spac_llamacpp.tools.benchmarks import PROMPTS, add_replay_options, run_child, timed_generation

EXPS = r"\.ffn_(gate|up|down|gate_up)_exps\.weight$"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--budget", action="append", default=None,
                   help="the VRAM tier's budget (planning/budgets.py): a size (6GiB) or a share of the routed expert "
                        "bytes for the pool, on top of the other weights, KV cache and reserve (50%%); repeatable")
    p.add_argument("-n", "--n-predict", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--pool-on-host", action="store_true", help="spac's pool in host memory (smoke test, no GPU)")
    p.add_argument("--skip-n-cpu-moe", action="store_true", help="only compare with exps=CPU")
    p.add_argument("--no-repack", action="store_true", help="CPU weight repacking off in every run")
    add_replay_options(p)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def _child(cfg: dict) -> dict:
    from spac_llamacpp.tools.benchmarks import replay_kwargs, replay_stats, stock_llama

    kw = {"n_ctx": cfg["ctx"], "n_threads": cfg["threads"], "verbose": False, "seed": 0, "n_gpu_layers": -1}
    t0 = time.perf_counter()
    if cfg["kind"] == "spac":
        from spac_llamacpp import Llama

        llm = Llama(cfg["model"], tier="vram", vram_budget=cfg["budget"], vram_options={"on_host": cfg["pool_on_host"]},
                    use_extra_bufts=None if cfg["repack"] else False, **replay_kwargs(cfg), **kw)
    else:
        n_cpu = cfg.get("n_cpu_moe")
        pattern = EXPS if n_cpu is None else rf"^blk\.({'|'.join(map(str, range(n_cpu)))})\.ffn_.*_exps\.weight$"
        llm = stock_llama(cfg["model"], cfg, use_extra_bufts=cfg["repack"],
                          overrides=[(pattern, "CPU")] if n_cpu != 0 else None, **kw)
    load_s = time.perf_counter() - t0
    tokens, seconds, _ = timed_generation(llm, cfg["prompts"], cfg["n_predict"])
    out = {"kind": cfg["kind"], "n_cpu_moe": cfg.get("n_cpu_moe"), "tokens": tokens, "seconds": seconds,
           "tps": tokens / seconds if seconds > 0 else 0.0, "load_s": load_s, "replay": replay_stats(llm)}
    if cfg["kind"] == "spac":
        st = llm.stats(settle=2.0)
        out.update({k: st[k] for k in ("hit_rate", "pool_bytes", "slots", "copies_done", "bytes_copied",
                                       "fixed_bytes")})
    llm.close()
    return out


def _run_child(cfg: dict) -> dict | None:
    out, err = run_child(__file__, cfg["model"], cfg)
    if out is None:
        tail = err.strip().splitlines()[-1:] or ["?"]
        print(f"  {cfg['kind']} (n_cpu_moe={cfg.get('n_cpu_moe')}) failed: {tail[0]}", flush=True)
    return out


def main() -> int:
    args = parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0

    from spac_llamacpp.base.sizes import format_size
    from spac_llamacpp.gguf.info import read_model_header
    from spac_llamacpp.tools.benchmarks import budget_arg, check_replay, vram_fixed_bytes

    info = read_model_header(args.model)
    per_layer = {il: sum(t.nbytes for t in info.layer_tensors(il) if re.search(EXPS, t.name))
                 for il in info.moe_layers}
    base = {"model": str(Path(args.model).resolve()), "prompts": list(PROMPTS), "n_predict": args.n_predict,
            "threads": args.threads, "ctx": args.ctx, "pool_on_host": args.pool_on_host, "repack": not args.no_repack,
            "replay": check_replay(args.replay, info), "replay_end": args.replay_end}

    # the tier's budget arithmetic (planning.budgets), the KV cache estimated from the header
    fixed = vram_fixed_bytes(info, args.ctx)
    print(f"model {info.path.name}: {format_size(info.expert_bytes)} routed experts, "
          f"{format_size(info.non_expert_bytes)} other weights; fixed VRAM (other weights + KV + reserve) "
          f"{format_size(fixed)}; prompts {len(PROMPTS)} x {args.n_predict} tokens", flush=True)

    results = []
    for text in args.budget or ["50%"]:
        budget = budget_arg(text, "vram", info, n_ctx=args.ctx)
        row: dict = {"budget_bytes": budget, "pool_budget_bytes": budget - fixed}
        row["exps_cpu"] = _run_child({**base, "kind": "stock"})
        if not args.skip_n_cpu_moe:
            # smallest N whose GPU-side experts fit next to the fixed part
            n_min = next((n for n in range(len(info.moe_layers) + 1)
                          if sum(b for il, b in per_layer.items() if il >= n) <= budget - fixed),
                         len(info.moe_layers))
            runs = [r for n in range(n_min, min(n_min + 3, len(info.moe_layers) + 1))
                    if (r := _run_child({**base, "kind": "stock", "n_cpu_moe": n})) is not None]
            row["n_cpu_moe_runs"] = runs
            row["n_cpu_moe_best"] = max(runs, key=lambda r: r["tps"]) if runs else None
        row["spac"] = _run_child({**base, "kind": "spac", "budget": budget})
        results.append(row)
        s, b, k = row["exps_cpu"], row.get("n_cpu_moe_best"), row["spac"]
        print(f"VRAM budget {format_size(budget)} ({format_size(budget - fixed)} for experts):", flush=True)
        if s:
            print(f"  stock exps=CPU        {s['tps']:7.2f} tok/s")
        if b:
            print(f"  stock n-cpu-moe={b['n_cpu_moe']:<4}  {b['tps']:7.2f} tok/s")
        if k:
            print(f"  spac vram tier        {k['tps']:7.2f} tok/s, pool {format_size(k['pool_bytes'])} "
                  f"({'+'.join(map(str, k['slots']))} slots), hit rate {100 * (k['hit_rate'] or 0):.1f}%, "
                  f"{k['copies_done']} copies ({format_size(k['bytes_copied'])})")
            if s:
                row["ratio_vs_exps_cpu"] = k["tps"] / s["tps"]
                print(f"  ratio spac / exps=CPU {row['ratio_vs_exps_cpu']:.2f}x")
            if b:
                row["ratio_vs_n_cpu_moe"] = k["tps"] / b["tps"]
                print(f"  ratio spac / best n-cpu-moe {row['ratio_vs_n_cpu_moe']:.2f}x")
    print(json.dumps({"model": info.path.name, "pool_on_host": args.pool_on_host, "repack": not args.no_repack,
                      "replay": args.replay, "runs": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
