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
* spac:  ``spac_llamacpp.Llama(tier="flash", budget=B)``.

Both get the same prompts, token counts and draft settings. Before the limited runs, stock runs once
with the whole model in RAM (the physical ceiling). Printed: decode tokens/s, ratio, expert hit rate,
bytes read from disk per token (``/proc/<pid>/io``), resident bytes; the last line is one JSON object.

Example::

    M=~/.cache/spac-llamacpp/models/qwen2.5-coder-1.5b-moe-e64x128-s768-k8-routernorm-f16.gguf
    python scripts/bench_flash.py $M --budget 50% --budget 25% -n 48
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from spac_llamacpp.tools.benchmarks import PROMPTS, run_child, timed_generation


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
    p.add_argument("--draft", default=None, help="draft GGUF (same tokenizer) for both runs")
    p.add_argument("--lookup", action="store_true", help="prompt-lookup drafts for both runs")
    p.add_argument("--n-draft", type=int, default=4)
    p.add_argument("--overhead", default=None, help="RAM for everything but the weights (default: measured + 25%%)")
    p.add_argument("--no-limit", action="store_true", help="skip the memory limit (only to debug the script)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


# --------------------------------------------------------------------------------------------------
# one measured run (child process)


def _child(cfg: dict) -> dict:
    import llama_cpp

    from spac_llamacpp.tiers.flash import read_bytes_so_far

    kw = {"n_ctx": cfg["ctx"], "n_threads": cfg["threads"], "verbose": False, "seed": 0}
    draft = None
    if cfg["lookup"]:
        from spac_llamacpp.speculation.drafts import PromptLookupDraft

        draft = PromptLookupDraft(cfg["n_draft"])
    elif cfg["draft"]:
        from spac_llamacpp.speculation.drafts import GGUFDraftModel

        draft = GGUFDraftModel(cfg["draft"], cfg["n_draft"], cfg["ctx"], n_threads=cfg["threads"])
    t0 = time.perf_counter()
    if cfg["kind"] == "spac":
        from spac_llamacpp import Llama

        llm = Llama(cfg["model"], tier="flash", budget=cfg["budget"], draft_model=draft, n_draft=cfg["n_draft"],
                    adaptive_draft=False, **kw)
    else:
        from spac_llamacpp.native.params import patched_default_params

        def no_repack(p) -> None:  # the same CPU kernels as the flash tier (which must not repack)
            p.use_extra_bufts = False

        with patched_default_params(no_repack, lambda p: None):
            llm = llama_cpp.Llama(cfg["model"], draft_model=draft, **kw)
    load_s = time.perf_counter() - t0
    read0 = read_bytes_so_far()
    tokens, decode_s, prompt_s = timed_generation(llm, cfg["prompts"], cfg["n_predict"])
    seconds = decode_s + prompt_s
    read = read_bytes_so_far() - read0
    out = {"kind": cfg["kind"], "tokens": tokens, "seconds": seconds, "tps": tokens / seconds, "load_s": load_s,
           "read_bytes": read, "read_per_token": read / max(tokens, 1), "rss_anon": _rss_anon()}
    if cfg["kind"] == "spac":
        st = llm.stats(settle=5.0)
        out.update({k: st[k] for k in ("hit_rate", "resident_expert_bytes", "max_resident_at_check",
                                       "over_budget_checks", "budget_checks", "budget_bytes")})
    llm.close()
    return out


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def _run_child(cfg: dict) -> dict:
    out, err = run_child(__file__, cfg["model"], cfg)
    if out is None:
        raise SystemExit(f"bench_flash: the {cfg['kind']} run failed:\n{err[-3000:]}")
    return out


# --------------------------------------------------------------------------------------------------


def main() -> int:
    args = parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0

    from spac_llamacpp.base.sizes import format_size, parse_size
    from spac_llamacpp.gguf.info import read_model_header
    from spac_llamacpp.native.memlimit import MemoryLimit, drop_file_cache
    from spac_llamacpp.tools.benchmarks import budget_arg

    info = read_model_header(args.model)
    prompts = (args.prompts.read_text().splitlines() if args.prompts else list(PROMPTS))
    prompts = [p.replace("\\n", "\n") for p in prompts if p.strip()]
    base = {"model": str(Path(args.model).resolve()), "prompts": prompts, "n_predict": args.n_predict,
            "threads": args.threads, "ctx": args.ctx, "draft": args.draft, "lookup": args.lookup,
            "n_draft": args.n_draft}

    budgets = [budget_arg(b, "flash", info) for b in (args.budget or ["50%"])]
    print(f"model {info.path.name}: {format_size(info.expert_bytes)} routed experts, "
          f"{format_size(info.non_expert_bytes)} other weights; prompts {len(prompts)} x {args.n_predict} tokens; "
          f"draft: {args.draft or ('prompt lookup' if args.lookup else 'none')}", flush=True)

    # the physical ceiling: stock with the whole file in the page cache (warm)
    _run_child({**base, "kind": "stock"})  # warms the cache
    ceiling = _run_child({**base, "kind": "stock"})
    print(f"all in RAM (stock, warm): {ceiling['tps']:.2f} tok/s; runtime anon memory "
          f"{format_size(ceiling['rss_anon'])}", flush=True)
    overhead = parse_size(args.overhead) if args.overhead else int(ceiling["rss_anon"] * 1.25) + (64 << 20)

    results = []
    draft_bytes = Path(args.draft).stat().st_size if args.draft else 0  # its weights need RAM in both runs
    for budget in budgets:
        limit = info.non_expert_bytes + budget + overhead + draft_bytes
        row = {"budget_bytes": budget, "limit_bytes": limit}
        ml = MemoryLimit(limit, min_limit=min(limit, 1 << 30)) if not args.no_limit else None
        with ml if ml is not None else contextlib.nullcontext():
            row["limit_method"] = ml.describe() if ml else "none"
            for kind in ("stock", "spac"):
                drop_file_cache(args.model)
                row[kind] = _run_child({**base, "kind": kind, "budget": budget})
        row["ratio"] = row["spac"]["tps"] / row["stock"]["tps"]
        results.append(row)
        s, k = row["stock"], row["spac"]
        print(f"budget {format_size(budget)} ({100 * budget / info.expert_bytes:.0f}% of experts), RAM limit "
              f"{format_size(limit)}:\n"
              f"  stock {s['tps']:7.2f} tok/s, read {format_size(s['read_per_token'])}/token\n"
              f"  spac  {k['tps']:7.2f} tok/s, read {format_size(k['read_per_token'])}/token, expert hit rate "
              f"{100 * (k['hit_rate'] or 0):.1f}%, resident {format_size(k['resident_expert_bytes'])} "
              f"(max at a step boundary {format_size(k['max_resident_at_check'])})\n"
              f"  ratio spac/stock {row['ratio']:.2f}x; ceiling/stock {ceiling['tps'] / s['tps']:.2f}x", flush=True)

    main_row = results[0]
    print(json.dumps({"model": info.path.name, "stock_tps": main_row["stock"]["tps"],
                      "spac_tps": main_row["spac"]["tps"], "ratio": main_row["ratio"],
                      "budget_bytes": main_row["budget_bytes"], "ceiling_tps": ceiling["tps"], "runs": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
