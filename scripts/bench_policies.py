#!/usr/bin/env python
"""Placement policies side by side on one engine: ``spac_llamacpp.Llama(tier=..., policy=P)`` for each P.

For each budget, every policy runs in a fresh process, one after the other, with the same prompts,
token counts, draft and routing:

* ``--tier flash`` (default): a helper process locks RAM so that only one limit stays available for all
  of the budget's runs (``spac_llamacpp/native/memlimit.py``; the non-expert weights + the budget + the
  runtime's measured overhead + a draft's file), and the model's pages are dropped from the page cache
  before each run; the tier's budget is ``--budget``;
* ``--tier vram``: the tier's VRAM budget is ``--budget``. Without a GPU the pool is in host memory
  (``--pool-on-host``, chosen automatically): the runs then check the mechanics (hit rates, copies), their
  speed means nothing, and the output says so.

Policies (``planning/policies.py``): ``spac`` (ours), ``lru`` (per-layer LRU admission of demand, llama.cpp
PR #27861's design), ``lfu``, ``pin`` (a static hot set from the first 16 steps), ``hysteresis`` (MoE-SpAc's
rule). Every policy plans in the tier's one budget (``planning/budgets.py``). Printed per policy: tok/s
(prompt and decode; decode alone too), expert hit rate, bytes read from disk per generated token
(``/proc/<pid>/io``), the wait for demand loads per token (flash: the decoding thread's blocked time in its
evaluations, ``llm.stats()["timing"]``; docs/flash.md "Compute while reading"), pool
copies per token (vram) and the tok/s ratios to LRU (prompt and decode, and decode alone); the last line is
one JSON object.

``--replay TRACE`` forces every run's routing to a trace's (docs/replay.md), e.g. a public trace on a
``spac synth`` model of its shape.

Example::

    M=~/.cache/spac-llamacpp/models/qwen2.5-coder-1.5b-moe-e64x128-s768-k8-routernorm-f16.gguf
    python scripts/bench_policies.py $M --budget 12.5% --budget 25% --budget 50% -n 48
    python scripts/bench_policies.py $M --budget 25% --lookup --policies lru,spac
    python scripts/bench_policies.py mixtral.gguf --budget 25% --replay mixtral.npz -n 16 --max-seconds 300
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.tools.benchmarks import add_draft_options, add_replay_options, run_child, timed_generation


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, as every other bad input of the project
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from spac_llamacpp.planning.policies import POLICIES

    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--budget", action="append", default=None,
                   help="the tier's budget (planning/budgets.py): flash, RAM for routed experts; vram, GPU memory "
                        "for the model; a size (1GiB) or a share of the routed expert bytes (25%%); repeatable")
    p.add_argument("--tier", choices=("flash", "vram"), default="flash")
    p.add_argument("--policies", default=",".join(("lru", *(x for x in POLICIES if x != "lru"))),
                   help="comma-separated policies, run in this order (default: %(default)s)")
    p.add_argument("-n", "--n-predict", type=int, default=48, help="tokens generated per prompt")
    p.add_argument("--prompts", type=Path, default=None, help="file with one prompt per line")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ctx", type=int, default=512)
    add_draft_options(p)
    p.add_argument("--overhead", default=None,
                   help="flash: RAM for everything but the weights (default: measured by a short run + 25%%)")
    p.add_argument("--no-limit", action="store_true",
                   help="flash: no RAM limit (the page cache keeps what it likes; to debug the script)")
    p.add_argument("--pool-on-host", action="store_true",
                   help="vram: the pool in host memory (automatic without a GPU: mechanics only)")
    p.add_argument("--no-repack", action="store_true", help="vram: CPU weight repacking off")
    p.add_argument("--placement", action="append", default=[], metavar="KEY=VALUE",
                   help="a placement option for every run (flash_options / vram_options, e.g. background=false, "
                        "replan_every=4; a value is read as JSON, else as a string); repeatable")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop a run's generation after this many seconds (its rate is then measured on the tokens "
                        "generated so far)")
    add_replay_options(p)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> list[str]:
    """The policies to run; a bad combination is a one-line SpacError."""
    from spac_llamacpp.planning.policies import check_policy

    names = [x.strip() for x in args.policies.split(",") if x.strip()]
    if not names:
        raise SpacError("--policies names no policy")
    policies = list(dict.fromkeys(check_policy(x) for x in names))
    if args.lookup and args.draft:
        raise SpacError("choose one draft source: --draft PATH or --lookup")
    if args.n_draft < 1:
        raise SpacError(f"--n-draft must be at least 1, not {args.n_draft}")
    if args.n_predict < 1:
        raise SpacError(f"-n must be at least 1, not {args.n_predict}")
    if args.max_seconds is not None and args.max_seconds <= 0:
        raise SpacError(f"--max-seconds must be positive, not {args.max_seconds}")
    if args.tier == "flash" and (args.pool_on_host or args.no_repack):
        raise SpacError("--pool-on-host and --no-repack belong to --tier vram")
    if args.tier == "vram" and (args.overhead or args.no_limit):
        raise SpacError("--overhead and --no-limit belong to --tier flash (the vram tier's budget is its own limit)")
    placement_args(args.placement)
    if args.draft and not Path(args.draft).is_file():
        raise SpacError(f"draft model not found: {args.draft}")
    if args.prompts and not args.prompts.is_file():
        raise SpacError(f"prompts file not found: {args.prompts}")
    return policies


def placement_args(items: list[str]) -> dict[str, Any]:
    """``--placement KEY=VALUE`` items as a dict (values read as JSON, else strings); a bad item is a SpacError."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpacError(f"--placement takes KEY=VALUE, not {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


# --------------------------------------------------------------------------------------------------
# one measured run (child process)


def _child(cfg: dict) -> dict:
    from spac_llamacpp import Llama
    from spac_llamacpp.tiers.flash import read_bytes_so_far
    from spac_llamacpp.tools.benchmarks import make_draft, replay_kwargs, replay_stats, rss_anon

    kw: dict[str, Any] = {"n_ctx": cfg["ctx"], "n_threads": cfg["threads"], "verbose": False, "seed": 0}
    draft = make_draft(cfg)
    spec = {"draft_model": draft, "n_draft": cfg["n_draft"], "adaptive_draft": False} if draft is not None else {}
    placement = dict(cfg.get("placement") or {})
    t0 = time.perf_counter()
    if cfg["tier"] == "flash":
        llm = Llama(cfg["model"], tier="flash", budget=cfg["budget"], policy=cfg["policy"], **spec,
                    flash_options=placement, **replay_kwargs(cfg), **kw)
    else:
        llm = Llama(cfg["model"], tier="vram", vram_budget=cfg["budget"], policy=cfg["policy"],
                    vram_options={"on_host": cfg["pool_on_host"], **placement},
                    use_extra_bufts=None if cfg["repack"] else False, n_gpu_layers=-1, **spec, **replay_kwargs(cfg),
                    **kw)
    load_s = time.perf_counter() - t0
    read0 = read_bytes_so_far()
    cpu0 = os.times()
    tokens, decode_s, prompt_s = timed_generation(llm, cfg["prompts"], cfg["n_predict"], cfg.get("max_seconds"))
    cpu1 = os.times()
    read = read_bytes_so_far() - read0
    seconds = decode_s + prompt_s
    st = llm.stats(settle=5.0)
    per = max(tokens, 1)
    out = {"policy": cfg["policy"], "tokens": tokens, "seconds": seconds, "tps": tokens / seconds if seconds else 0.0,
           "decode_tps": tokens / decode_s if decode_s else 0.0, "load_s": load_s, "prompt_seconds": prompt_s,
           "decode_seconds": decode_s, "read_bytes": read, "read_per_token": read / per, "rss_anon": rss_anon(),
           "hit_rate": st["hit_rate"], "steps": st["steps"], "plan_budget_bytes": st["plan_budget_bytes"],
           "planned_bytes": st["planned_bytes"], "replanner": st["replanner"], "replay": replay_stats(llm),
           "speculation": llm.speculation.summary() if llm.speculation is not None else None,
           # the process's CPU seconds while generating (every thread: llama.cpp's, the engine's, the re-planner's)
           "cpu_user_seconds": cpu1.user - cpu0.user, "cpu_system_seconds": cpu1.system - cpu0.system,
           "loop_cpu_seconds": st["loop_cpu_seconds"], "load_avg": os.getloadavg()[0]}
    if cfg["tier"] == "flash":
        eng = st["engine"]
        t = st["timing"]  # the decoding thread's blocked time, in the hook or (async demand) in the matmuls' faults
        blocked = [t[k]["blocked_seconds"] for k in ("prompt", "decode")]
        out.update({"wait_ms_per_token": None if None in blocked else 1e3 * sum(blocked) / per,
                    "overlap": t["decode"]["overlap"], "timing": t,
                    "demand_misses_per_token": eng["demand_misses"] / per, "engine": eng,
                    **{k: st[k] for k in ("budget_bytes", "resident_expert_bytes", "max_resident_at_check",
                                          "budget_checks", "over_budget_checks", "loop_seconds", "staged_kept",
                                          "staged_evicted")}})
    else:
        out.update({"wait_ms_per_token": None, "copies_per_token": st["copies_done"] / per,
                    "copied_per_token": st["bytes_copied"] / per,
                    **{k: st[k] for k in ("pool_bytes", "slots", "copies_done", "bytes_copied", "pool_on_host")}})
    llm.close()
    return out


def _run_child(cfg: dict) -> dict | None:
    out, err = run_child(__file__, cfg["model"], cfg)
    if out is None:
        tail = [line for line in err.strip().splitlines() if line.strip()][-1:] or ["?"]
        print(f"  {cfg['policy']}: the run failed: {tail[0]}", flush=True)
    return out


# --------------------------------------------------------------------------------------------------


def _row(name: str, r: dict | None, lru: dict | None) -> str:
    from spac_llamacpp.base.sizes import format_size

    if r is None:
        return f"  {name:<11} failed"
    hit = "n/a" if r["hit_rate"] is None else f"{100 * r['hit_rate']:.1f}%"
    wait = "-" if r["wait_ms_per_token"] is None else f"{r['wait_ms_per_token']:.1f} ms"
    extra = f", {r['copies_per_token']:.1f} copies/token" if "copies_per_token" in r else ""
    ratio = f"{r['tps'] / lru['tps']:.2f}x (decode {r['decode_tps'] / lru['decode_tps']:.2f}x)" \
        if lru and lru["tps"] > 0 and lru["decode_tps"] > 0 else "-"
    rp = r.get("replanner") or {}
    solve = f", re-plan CPU {rp['solve_cpu_seconds']:.2f} s" if rp.get("solve_cpu_seconds") else ""
    cpu = f", CPU {r['cpu_user_seconds'] + r['cpu_system_seconds']:.1f} s" if "cpu_user_seconds" in r else ""
    return (f"  {name:<11} {r['tps']:8.3f} tok/s (decode {r['decode_tps']:8.3f})  hit rate {hit:>6}  read "
            f"{format_size(r['read_per_token']):>10}/token  miss wait {wait:>9}/token{extra}  vs lru {ratio}"
            f"{cpu}{solve}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    try:
        return _main(args)
    except SpacError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    from spac_llamacpp.base.sizes import format_size
    from spac_llamacpp.gguf.info import read_model_header
    from spac_llamacpp.tools.benchmarks import budget_arg, check_replay, flash_limit, read_prompts, runtime_overhead

    policies = check_args(args)
    if not Path(args.model).is_file():
        raise SpacError(f"model file not found: {args.model}")
    info = read_model_header(args.model)
    if info.n_expert == 0:
        raise SpacError(f"{args.model} is a dense model; the policies place routed experts of an MoE GGUF")
    prompts = read_prompts(args.prompts)
    on_host = args.pool_on_host
    if args.tier == "vram":
        from spac_llamacpp import patched_llama_available
        from spac_llamacpp.native.expert_pool import POOL_PATCH_LEVEL

        if not patched_llama_available(POOL_PATCH_LEVEL):
            raise SpacError("--tier vram needs spac's patched llama.cpp (scripts/build_llama.sh; docs/patches.md)")
    if args.tier == "vram" and not on_host:
        from spac_llamacpp.native.libs import device_names

        on_host = all(name.upper().startswith("CPU") for name in device_names())
    base = {"model": str(Path(args.model).resolve()), "tier": args.tier, "prompts": prompts,
            "n_predict": args.n_predict, "threads": args.threads, "ctx": args.ctx, "draft": args.draft,
            "lookup": args.lookup, "n_draft": args.n_draft, "replay": check_replay(args.replay, info),
            "replay_end": args.replay_end, "max_seconds": args.max_seconds, "pool_on_host": on_host,
            "repack": not args.no_repack, "placement": placement_args(args.placement)}
    budgets = [budget_arg(b, args.tier, info, n_ctx=args.ctx) for b in (args.budget or ["25%"])]
    draft = args.draft or ("prompt lookup" if args.lookup else "none")
    routing = f"replayed from {args.replay}" if args.replay else "the model's own"
    print(f"model {info.path.name}: {format_size(info.expert_bytes)} routed experts, "
          f"{format_size(info.non_expert_bytes)} other weights; tier {args.tier}; policies {', '.join(policies)}; "
          f"prompts {len(prompts)} x {args.n_predict} tokens; draft: {draft}; routing: {routing}", flush=True)
    if on_host:
        print("vram tier without a GPU: the expert pool is in host memory, so these runs check the mechanics "
              "(hit rates, copies); their tok/s mean nothing", flush=True)

    overhead = None
    if args.tier == "flash" and not args.no_limit:
        probe = _run_child({**base, "policy": "spac", "budget": budgets[0], "prompts": prompts[:1], "n_predict": 1,
                            "max_seconds": None})
        if probe is None:
            raise SpacError("the probe run (one prompt, one token) that measures the runtime's memory failed")
        overhead = runtime_overhead(probe["rss_anon"], args.overhead)
        print(f"runtime overhead for the RAM limit: {format_size(overhead)}", flush=True)

    runs = []
    for budget in budgets:
        row: dict[str, Any] = {"budget_bytes": budget, "limit_bytes": None, "limit_method": "none"}
        share = f"{100 * budget / info.expert_bytes:.1f}% of the expert bytes" if args.tier == "flash" else \
            "VRAM for the model"
        ml = None
        if overhead is not None:
            from spac_llamacpp.native.memlimit import MemoryLimit

            row["limit_bytes"] = limit = flash_limit(info, budget, overhead, args.draft)
            ml = MemoryLimit(limit, min_limit=min(limit, 1 << 30))
        results: dict[str, dict | None] = {}
        with ml if ml is not None else contextlib.nullcontext():
            if ml is not None:
                row["limit_method"] = ml.describe()
            for policy in policies:
                if args.tier == "flash":
                    from spac_llamacpp.native.memlimit import drop_file_cache

                    drop_file_cache(args.model)
                results[policy] = _run_child({**base, "policy": policy, "budget": budget})
        lru = results.get("lru")
        if lru is not None and not (lru["tps"] > 0 and lru["decode_tps"] > 0):
            lru = None
        row["results"] = results
        row["ratio_to_lru"] = {p: (r["tps"] / lru["tps"] if r and lru else None) for p, r in results.items()}
        row["decode_ratio_to_lru"] = {p: (r["decode_tps"] / lru["decode_tps"] if r and lru else None)
                                      for p, r in results.items()}
        runs.append(row)
        limit_text = f", RAM limit {format_size(row['limit_bytes'])}" if row["limit_bytes"] else \
            (", no RAM limit" if args.tier == "flash" else "")
        print(f"budget {format_size(budget)} ({share}){limit_text}:", flush=True)
        for policy in policies:
            print(_row(policy, results[policy], lru), flush=True)
        if lru is None:
            print("  (no lru run: no ratios)", flush=True)

    print(json.dumps({"model": info.path.name, "tier": args.tier, "pool_on_host": on_host, "policies": policies,
                      "replay": args.replay, "draft": draft, "prompts": prompts, "n_predict": args.n_predict,
                      "max_seconds": args.max_seconds, "overhead_bytes": overhead,
                      "placement": placement_args(args.placement), "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
