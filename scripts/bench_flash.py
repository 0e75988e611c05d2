#!/usr/bin/env python
"""Flash tier benchmark: stock llama-cpp-python vs spac_llamacpp.Llama(tier="flash") under one RAM limit.

For each budget, a helper process locks RAM so that only ``limit`` stays available (see
``spac_llamacpp/memlimit.py``; default limit: the non-expert weights + the budget + the measured
runtime overhead), then, one after the other and each in a fresh process with the model's pages
dropped from the page cache first:

* stock: ``llama_cpp.Llama`` (mmap), the kernel's page cache decides what stays; CPU weight
  repacking off (``use_extra_bufts=False``, set through llama.cpp's default model params) as in the
  flash tier, so both run the same kernels (repacking would also copy experts out of the page
  cache into anonymous memory, and crashes on AMX machines with K-quant weights);
* spac:  ``spac_llamacpp.Llama(tier="flash", budget=B)``, once per ``--demand`` mode (default ``async``:
  the layer's matmuls compute while its missing experts are read; ``wait``: the hook waits for them first;
  ``overlay``: ``read="overlay"``, O_DIRECT reads moved onto the mapping; ``slots``: ``read="slots"``, experts in
  a host pool's slots read by O_DIRECT (tiers/slot_store.py); ``async-ordered``: ``async`` with
  patch 0004's MUL_MAT_ID hooks, the resident experts computed first).

Both get the same prompts, token counts and draft settings. Before the limited runs, stock runs once
with the whole model in RAM (the physical ceiling; ``--ceiling auto`` skips it when the file does not fit
in the memory available, and then measures the runtime overhead with one short stock run). Printed:
decode tokens/s, ratio, expert hit rate, bytes read from disk per token (``/proc/<pid>/io``), resident
bytes, and per decoded token the flash tier's compute, demand-read and wait milliseconds and the overlap
``1 - wait / read`` (``llm.stats()["timing"]``, docs/flash.md), and each run's ratio to the ceiling; the last
line is one JSON object (``runs[i].spac`` is the first ``--demand`` mode, ``runs[i].spac_<mode>`` the others).

``--replay TRACE`` forces every run's routing to a trace's (``docs/replay.md``; e.g. a public trace imported
with ``spac trace import`` onto a ``spac synth`` model of its shape). Stock llama-cpp-python cannot replay,
so the stock runs are then ``spac_llamacpp.Llama`` with no tier: llama.cpp's own placement on the same
mmap, the same forced routing, and the routing sensor's graph callback on both sides.

Example::

    M=~/.cache/spac-llamacpp/models/qwen2.5-coder-1.5b-moe-e64x128-s768-k8-routernorm-f16.gguf
    python scripts/bench_flash.py $M --budget 50% --budget 25% -n 48
    spac trace import mixtral.jsonl -o mixtral.npz --format jsonl && spac synth mixtral-8x7b -o mixtral.gguf
    python scripts/bench_flash.py mixtral.gguf --budget 50% --replay mixtral.npz -n 16 --max-seconds 600
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from spac_llamacpp.tools.benchmarks import add_draft_options, add_replay_options, run_child, timed_generation

FLASH_MODES = {"async": {"demand": "async"}, "wait": {"demand": "wait"}, "overlay": {"read": "overlay"},
               "async-ordered": {"demand": "async", "mmid_hooks": True}, "slots": {"read": "slots"}}
"""``--demand`` choices: the flash options of each (``async-ordered``: with patch 0004's hooks, resident experts
computed first)."""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--budget", action="append", default=None,
                   help="the flash tier's budget, RAM for routed experts (planning/budgets.py): a size (1GiB) or a "
                        "share of the expert bytes (50%%); repeatable")
    p.add_argument("-n", "--n-predict", type=int, default=48, help="tokens generated per prompt")
    p.add_argument("--prompts", type=Path, default=None, help="file with one prompt per line")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ctx", type=int, default=512)
    add_draft_options(p)
    p.add_argument("--overhead", default=None, help="RAM for everything but the weights (default: measured + 25%%)")
    p.add_argument("--no-limit", action="store_true", help="skip the memory limit (only to debug the script)")
    p.add_argument("--ceiling", choices=("auto", "yes", "no"), default="auto",
                   help="measure the all-in-RAM ceiling (auto: when the file fits in the memory available); without "
                        "it the runtime overhead is measured by one short unlimited stock run")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop a run's generation after this many seconds (its rate is then measured on the tokens "
                        "generated so far)")
    p.add_argument("--demand", action="append", choices=tuple(FLASH_MODES), default=None,
                   help="the flash tier's demand mode (flash_options demand), or overlay (flash_options read); "
                        "repeatable, each a run of its own (default: async)")
    add_replay_options(p)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


# --------------------------------------------------------------------------------------------------
# one measured run (child process)


def _child(cfg: dict) -> dict:
    from spac_llamacpp.tiers.flash import read_bytes_so_far
    from spac_llamacpp.tools.benchmarks import make_draft, replay_kwargs, replay_stats, rss_anon, stock_llama

    kw = {"n_ctx": cfg["ctx"], "n_threads": cfg["threads"], "verbose": False, "seed": 0}
    draft = make_draft(cfg)
    t0 = time.perf_counter()
    spec = {"n_draft": cfg["n_draft"], "adaptive_draft": False} if draft is not None else {}
    if cfg["kind"] == "spac":
        from spac_llamacpp import Llama

        llm = Llama(cfg["model"], tier="flash", budget=cfg["budget"], draft_model=draft, **spec,
                    flash_options=FLASH_MODES[cfg.get("demand", "async")], **replay_kwargs(cfg), **kw)
    else:  # the same CPU kernels as the flash tier (which must not repack)
        llm = stock_llama(cfg["model"], cfg, use_extra_bufts=False, draft_model=draft,
                          **(spec if cfg.get("replay") else {}), **kw)
    load_s = time.perf_counter() - t0
    read0 = read_bytes_so_far()
    tokens, decode_s, prompt_s = timed_generation(llm, cfg["prompts"], cfg["n_predict"], cfg.get("max_seconds"))
    seconds = decode_s + prompt_s
    read = read_bytes_so_far() - read0
    out = {"kind": cfg["kind"], "tokens": tokens, "seconds": seconds, "tps": tokens / seconds, "load_s": load_s,
           "prompt_seconds": prompt_s, "decode_seconds": decode_s, "decode_tps": tokens / decode_s if decode_s else 0.0,
           "read_bytes": read, "read_per_token": read / max(tokens, 1), "rss_anon": rss_anon(),
           "replay": replay_stats(llm)}
    if cfg["kind"] == "spac":
        st = llm.stats(settle=5.0)
        out.update({k: st[k] for k in ("hit_rate", "resident_expert_bytes", "max_resident_at_check",
                                       "over_budget_checks", "budget_checks", "budget_bytes", "loop_seconds",
                                       "checks", "check_seconds", "check_cpu_seconds", "steps", "timing")})
        dec = st["timing"]["decode"]
        out.update({"demand": cfg.get("demand", "async"), "overlap": dec["overlap"],
                    **{f"{k}_ms_per_token": v for k, v in dec["per_token_ms"].items()}})
    llm.close()
    return out


def _run_child(cfg: dict) -> dict:
    out, err = run_child(__file__, cfg["model"], cfg)
    if out is None:
        raise SystemExit(f"bench_flash: the {cfg['kind']} run failed:\n{err[-3000:]}")
    return out


def _run_key(i: int, mode: str) -> str:
    """A spac run's key in a JSON row: ``spac`` for the first ``--demand`` mode (today's shape), ``spac_<mode>``."""
    return "spac" if i == 0 else f"spac_{mode}"


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f} ms"


# --------------------------------------------------------------------------------------------------


def main() -> int:
    args = parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0

    from spac_llamacpp.base.sizes import format_size
    from spac_llamacpp.gguf.info import read_model_header
    from spac_llamacpp.native.memlimit import MemoryLimit, drop_file_cache, mem_available
    from spac_llamacpp.tools.benchmarks import budget_arg, check_replay, flash_limit, read_prompts, runtime_overhead

    info = read_model_header(args.model)
    prompts = read_prompts(args.prompts)
    base = {"model": str(Path(args.model).resolve()), "prompts": prompts, "n_predict": args.n_predict,
            "threads": args.threads, "ctx": args.ctx, "draft": args.draft, "lookup": args.lookup,
            "n_draft": args.n_draft, "replay": check_replay(args.replay, info), "replay_end": args.replay_end,
            "max_seconds": args.max_seconds}

    budgets = [budget_arg(b, "flash", info) for b in (args.budget or ["50%"])]
    demands = list(dict.fromkeys(args.demand or ["async"]))
    print(f"model {info.path.name}: {format_size(info.expert_bytes)} routed experts, "
          f"{format_size(info.non_expert_bytes)} other weights; prompts {len(prompts)} x {args.n_predict} tokens; "
          f"draft: {args.draft or ('prompt lookup' if args.lookup else 'none')}; routing: "
          f"{'replayed from ' + args.replay + ' (both sides)' if args.replay else 'the model' + chr(39) + 's own'}",
          flush=True)

    # the physical ceiling: stock with the whole file in the page cache (warm)
    fits = info.file_size + (1 << 30) < mem_available()
    ceiling = None
    if args.ceiling == "yes" or (args.ceiling == "auto" and fits):
        _run_child({**base, "kind": "stock"})  # warms the cache
        ceiling = _run_child({**base, "kind": "stock"})
        anon = ceiling["rss_anon"]
        print(f"all in RAM (stock, warm): {ceiling['tps']:.2f} tok/s; runtime anon memory {format_size(anon)}",
              flush=True)
    else:  # the runtime's anonymous memory from one prompt and one token (KV cache, compute buffers)
        anon = _run_child({**base, "kind": "stock", "prompts": prompts[:1], "n_predict": 1})["rss_anon"]
        print(f"no ceiling run ({format_size(info.file_size)} file, {format_size(mem_available())} available); "
              f"runtime anon memory {format_size(anon)}", flush=True)
    overhead = runtime_overhead(anon, args.overhead)

    results = []
    for budget in budgets:
        limit = flash_limit(info, budget, overhead, args.draft)  # a draft's weights need RAM in both runs
        row = {"budget_bytes": budget, "limit_bytes": limit}
        ml = MemoryLimit(limit, min_limit=min(limit, 1 << 30)) if not args.no_limit else None
        with ml if ml is not None else contextlib.nullcontext():
            row["limit_method"] = ml.describe() if ml else "none"
            drop_file_cache(args.model)
            row["stock"] = _run_child({**base, "kind": "stock", "budget": budget})
            for i, mode in enumerate(demands):
                drop_file_cache(args.model)
                row[_run_key(i, mode)] = _run_child({**base, "kind": "spac", "budget": budget, "demand": mode})
        row["ratio"] = row["spac"]["tps"] / row["stock"]["tps"]
        results.append(row)
        s = row["stock"]
        lines = [f"budget {format_size(budget)} ({100 * budget / info.expert_bytes:.0f}% of experts), RAM limit "
                 f"{format_size(limit)}:",
                 f"  stock {s['tps']:7.3f} tok/s, read {format_size(s['read_per_token'])}/token"
                 + (f", {s['tps'] / ceiling['tps']:.2f} of the ceiling" if ceiling else "")]
        for i, mode in enumerate(demands):
            k = row[_run_key(i, mode)]
            overlap = "n/a" if k["overlap"] is None else f"{100 * k['overlap']:.0f}%"
            lines.append(
                f"  spac ({mode}) {k['tps']:7.3f} tok/s (decode {k['decode_tps']:.3f}), read "
                f"{format_size(k['read_per_token'])}/token, expert hit rate {100 * (k['hit_rate'] or 0):.1f}%, "
                f"resident "
                f"{format_size(k['resident_expert_bytes'])} "
                + (f"(max at a step boundary {format_size(k['max_resident_at_check'])})" if k["budget_checks"]
                   else "(no complete residency sweep at a step boundary)")
                + f"\n    per decoded token: {_ms(k['compute_ms_per_token'])} compute, {_ms(k['read_ms_per_token'])} "
                f"demand reads, {_ms(k['wait_ms_per_token'])} waited (overlap {overlap}); ratio to stock "
                f"{k['tps'] / s['tps']:.2f}x" + (f", to the ceiling {k['tps'] / ceiling['tps']:.2f} (decode "
                                                  f"{k['decode_tps'] / ceiling['decode_tps']:.2f})" if ceiling else ""))
        print("\n".join(lines), flush=True)

    main_row = results[0]
    print(json.dumps({"model": info.path.name, "expert_bytes": info.expert_bytes, "demand": demands,
                      "stock_tps": main_row["stock"]["tps"],
                      "spac_tps": main_row["spac"]["tps"], "ratio": main_row["ratio"],
                      "budget_bytes": main_row["budget_bytes"], "ceiling_tps": ceiling["tps"] if ceiling else None,
                      "ceiling": ceiling, "replay": args.replay, "prompts": prompts, "n_predict": args.n_predict,
                      "runs": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
