#!/usr/bin/env python
"""Speculative decoding sources side by side: none, prompt lookup, a draft model, self-drafting.

For one MoE model, runs the same prompts (greedy) with each draft source, reports whether every run
produces the text of the run without speculation (it can differ where llama.cpp's batched
verification rounds differently from one-token decoding and a near-tie flips; stock
llama-cpp-python's own prompt-lookup decoding does the same), and prints acceptance, tokens/s and
the ratio to no speculation; the last line is one JSON object. With ``--budget`` every run uses the flash
tier at that expert budget (no RAM limit is imposed here: see bench_flash.py for that). ``--replay TRACE``
forces the target's routing in every run to a trace's (docs/replay.md: a verification batch's tokens take
the trace's tokens at their positions); texts are then meaningless, but "identical" still compares them.

Example::

    python scripts/bench_speculation.py MODEL.gguf --draft DRAFT.gguf -n 64 [--self-draft-experts 4]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from spac_llamacpp.tools.benchmarks import PROMPTS, add_replay_options, check_replay, replay_kwargs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--draft", default=None, help="separate draft GGUF (same tokenizer)")
    p.add_argument("--self-draft-experts", type=int, action="append", default=None,
                   help="also self-draft with this many experts per token (repeatable)")
    p.add_argument("--n-draft", type=int, default=4)
    p.add_argument("--cache-prior", type=float, action="append", default=None,
                   help="also run without drafts but with cache-aware routing at this lambda (repeatable; "
                        "changes outputs)")
    p.add_argument("--no-drafts", action="store_true", help="skip the draft sources (with --cache-prior)")
    p.add_argument("-n", "--n-predict", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--budget", default=None, help="flash-tier expert budget for every run")
    p.add_argument("--limit", default=None,
                   help="RAM limit for all runs (spac_llamacpp/memlimit.py), e.g. 1.8GiB; the model's pages are "
                        "dropped from the page cache before each run")
    p.add_argument("--no-repack", action="store_true", help="use_extra_bufts=False (K-quant non-expert weights)")
    p.add_argument("--prompts", default=None, help="file with one prompt per line")
    p.add_argument("--repeat", type=int, default=1,
                   help="run every source this many times, interleaved (source order rotated each round); a row "
                        "reports the median tokens/s and its runs (the VM's run-to-run spread is ~5-10%%)")
    add_replay_options(p)
    args = p.parse_args()
    if args.replay and args.cache_prior:
        raise SystemExit("error: --replay and --cache-prior both rewrite the router probabilities; use one")

    prompts = Path(args.prompts).read_text().splitlines() if args.prompts else list(PROMPTS)
    prompts = [x.replace("\\n", "\n") for x in prompts if x.strip()]
    configs: list[tuple[str, dict]] = [("none", {})]
    if not args.no_drafts:
        configs.append(("prompt lookup", {"draft_model": "lookup"}))
        if args.draft:
            configs.append(("draft model", {"draft_model_path": args.draft}))
        configs.append(("self-draft", {"self_draft": True}))
        for k in args.self_draft_experts or []:
            configs.append((f"self-draft k={k}", {"self_draft": k}))
    for lam in args.cache_prior or []:
        configs.append((f"cache-prior {lam:g}", {"cache_prior": lam}))

    base = {"n_ctx": args.ctx, "n_threads": args.threads, "verbose": False, "seed": 0, "n_draft": args.n_draft,
            "adaptive_draft": True}
    if args.budget:
        base.update(tier="flash", budget=args.budget)
    if args.no_repack or args.budget:
        base["use_extra_bufts"] = False
        base["draft_kwargs"] = {"use_extra_bufts": False}
    if args.replay:  # every run, the draft sources' included: the target's routing is the trace's
        from spac_llamacpp.gguf.info import read_model_header

        base.update(replay_kwargs({"replay": check_replay(args.replay, read_model_header(args.model)),
                                   "replay_end": args.replay_end}))

    from spac_llamacpp.base.sizes import parse_size
    from spac_llamacpp.native.memlimit import MemoryLimit, drop_file_cache

    limit = MemoryLimit(parse_size(args.limit), min_limit=1 << 30) if args.limit else contextlib.nullcontext()
    rows: list[dict] = []
    with limit:
        _run_all(args, configs, base, prompts, rows, drop_file_cache if args.limit else None)
    print(json.dumps({"model": args.model, "budget": args.budget, "limit": args.limit, "n_predict": args.n_predict,
                      "prompts": len(prompts), "replay": args.replay, "rows": rows}))
    return 0


def _run_all(args, configs, base, prompts, rows, drop) -> None:
    runs: dict[str, list[dict]] = {label: [] for label, _ in configs}
    for rnd in range(max(1, args.repeat)):
        shift = rnd % len(configs)  # rotate the order: no source always runs first (or right after another)
        for label, extra in configs[shift:] + configs[:shift]:
            row = _run_one(args, label, {**base, **extra}, prompts, drop)
            runs[label].append(row)
            ref = runs["none"][0]["texts"] if runs["none"] else None
            print(_row_line(row, runs["none"][-1]["tps"] if runs["none"] else None, ref), flush=True)
    reference = runs["none"][0]["texts"]
    for done in runs.values():
        for r in done:
            r["identical"] = r.pop("texts") == reference
    for label, _ in configs:
        done = runs[label]
        row = dict(sorted(done, key=lambda r: r["tps"])[(len(done) - 1) // 2])  # the median run (lower middle)
        row["tps_runs"] = [r["tps"] for r in done]
        row["identical"] = all(r["identical"] for r in done)
        rows.append(row)
    if args.repeat > 1:
        print(f"medians of {args.repeat} interleaved runs:")
        for row in rows:
            print(_row_line(row, rows[0]["tps"]))


def _run_one(args, label: str, kw: dict, prompts: list[str], drop) -> dict:
    """One source in a fresh Llama (its texts kept in the row, for the comparison with no speculation)."""
    from spac_llamacpp import Llama
    from spac_llamacpp.speculation.drafts import PromptLookupDraft
    from spac_llamacpp.tools.generate import GenerationStats, stream_generate

    if drop is not None:
        drop(args.model)
    if kw.get("draft_model") == "lookup":
        kw["draft_model"] = PromptLookupDraft(args.n_draft)
    t0 = time.perf_counter()
    llm = Llama(args.model, **kw)
    load = time.perf_counter() - t0
    texts, tokens, seconds = [], 0, 0.0
    for prompt in prompts:
        llm.reset()
        st = GenerationStats()
        texts.append("".join(stream_generate(llm, prompt, args.n_predict, temperature=0.0, seed=0, stats=st)))
        tokens += st.generated_tokens
        seconds += st.decode_seconds + st.prompt_seconds
    spec = llm.speculation.summary() if llm.speculation is not None else None
    extra_stats = llm.stats() if args.budget else {}
    llm.close()
    row = {"source": label, "tokens": tokens, "seconds": seconds, "tps": tokens / seconds, "load_s": load,
           "texts": texts,
           "acceptance": spec["acceptance_rate"] if spec else None,
           "drafted": spec["drafted"] if spec else 0, "verifications": spec["verifications"] if spec else 0,
           "draft_call_seconds": spec["draft_call_seconds"] if spec else 0.0}
    if extra_stats:
        row["hit_rate"] = extra_stats.get("hit_rate")
        row["read_bytes"] = extra_stats.get("read_bytes")
    return row


def _row_line(row: dict, none_tps: float | None, reference: list[str] | None = None) -> str:
    ratio = f" ({row['tps'] / none_tps:.2f}x)" if none_tps else ""
    acc = "" if row["acceptance"] is None else f", acceptance {100 * row['acceptance']:.1f}%"
    if row["drafted"]:
        acc += f", {row['drafted']} drafted in {row['verifications']} verifications"
    if row["draft_call_seconds"]:
        acc += f", {row['draft_call_seconds']:.2f} s in draft calls"
    if row.get("hit_rate") is not None:
        acc += f", expert hit rate {100 * row['hit_rate']:.1f}%"
    same = row["identical"] if "identical" in row else (None if reference is None else row["texts"] == reference)
    return f"{row['source']:>18}: {row['tps']:7.2f} tok/s{ratio}{acc}, identical to no speculation: {same}"


if __name__ == "__main__":
    sys.exit(main())
