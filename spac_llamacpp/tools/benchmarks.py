"""What the benchmark scripts share (``scripts/bench_*.py``): prompts, budgets, timed generation, fresh processes."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spac_llamacpp.gguf.info import MoEModelInfo
from spac_llamacpp.observe.replay import REPLAY_ENDS, check_shape
from spac_llamacpp.observe.trace import RoutingTrace
from spac_llamacpp.planning import budgets
from spac_llamacpp.tools.generate import GenerationStats, stream_generate

# a mix of code and prose, as the benchmark-scale model was made from a coder model
PROMPTS = (
    "def merge_sort(items: list[int]) -> list[int]:",
    "Explain in plain English how a hash table handles collisions.",
    "import numpy as np\n\ndef softmax(x):",
    "Once upon a time, in a village by the sea, there lived",
)


def read_prompts(path: str | Path | None) -> list[str]:
    """The prompts of a bench script: one per line of ``path`` (``\\n`` in a line is a newline; blank lines
    skipped), else :data:`PROMPTS`."""
    lines = Path(path).read_text().splitlines() if path else list(PROMPTS)
    return [line.replace("\\n", "\n") for line in lines if line.strip()]


def add_draft_options(p: argparse.ArgumentParser) -> None:
    """``--draft D``, ``--lookup`` and ``--n-draft``: the same speculation in every run of a benchmark."""
    p.add_argument("--draft", default=None, help="draft GGUF (same tokenizer) for every run")
    p.add_argument("--lookup", action="store_true", help="prompt-lookup drafts for every run")
    p.add_argument("--n-draft", type=int, default=4, help="draft tokens per step (fixed)")


def make_draft(cfg: dict[str, Any]) -> Any | None:
    """The draft of a run configuration (``lookup``, ``draft``, ``n_draft``, ``ctx``, ``threads``), or None."""
    if cfg.get("lookup"):
        from spac_llamacpp.speculation.drafts import PromptLookupDraft

        return PromptLookupDraft(cfg["n_draft"])
    if cfg.get("draft"):
        from spac_llamacpp.speculation.drafts import GGUFDraftModel

        return GGUFDraftModel(cfg["draft"], cfg["n_draft"], cfg["ctx"], n_threads=cfg.get("threads"))
    return None


def rss_anon() -> int:
    """This process's anonymous resident memory (``RssAnon``) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def runtime_overhead(anon: int, given: str | None = None) -> int:
    """RAM a limited run needs besides the weights: ``given`` (a size), else the anonymous memory ``anon`` a
    short run measured (KV cache, compute buffers) plus 25% and 64 MiB."""
    from spac_llamacpp.base.sizes import parse_size

    return parse_size(given) if given else int(anon * 1.25) + (64 << 20)


def flash_limit(info: MoEModelInfo, budget: int, overhead: int, draft: str | None = None) -> int:
    """The RAM limit a flash-tier run of ``budget`` gets: the non-expert weights, the budget, the runtime
    ``overhead`` and a draft model's file (its weights need RAM too)."""
    return info.non_expert_bytes + int(budget) + int(overhead) + (Path(draft).stat().st_size if draft else 0)


def vram_fixed_bytes(info: MoEModelInfo, n_ctx: int, compute_reserve: int = budgets.DEFAULT_COMPUTE_RESERVE) -> int:
    """What the VRAM tier's budget holds besides the pool (non-expert weights, KV cache of ``n_ctx`` tokens
    estimated from the header, compute reserve)."""
    return budgets.vram_budget_for_pool(0, **budgets.vram_fixed_parts(info, n_ctx, compute_reserve))


def budget_arg(text: str, tier: str, info: MoEModelInfo, *, n_ctx: int = budgets.DEFAULT_N_CTX,
               compute_reserve: int = budgets.DEFAULT_COMPUTE_RESERVE) -> int:
    """A bench script's ``--budget`` as the tier's budget: :func:`spac_llamacpp.planning.budgets.parse_budget`
    (a size, or a share of the routed expert bytes given to experts, ``50%``), refused here if the tier would
    refuse it, before any run."""
    return budgets.parse_budget(text, tier, info, n_ctx=n_ctx, compute_reserve=compute_reserve)


def timed_generation(llm: Any, prompts: Sequence[str], n_predict: int,
                     max_seconds: float | None = None) -> tuple[int, float, float]:
    """Greedy generation of ``n_predict`` tokens after each prompt (the context reset in between):
    ``(generated tokens, decode seconds, prompt seconds)`` summed over the prompts. With ``max_seconds``,
    generation stops after the first token that ends past that many seconds (the counts and times are
    then those of the tokens generated so far: a rate, measured on fewer tokens)."""
    tokens, decode, prompt_s = 0, 0.0, 0.0
    deadline = None if max_seconds is None else time.perf_counter() + max_seconds
    for prompt in prompts:
        llm.reset()
        st = GenerationStats()
        for _ in stream_generate(llm, prompt, n_predict, temperature=0.0, seed=0, stats=st):
            if deadline is not None and time.perf_counter() > deadline:
                break
        tokens += st.generated_tokens
        decode += st.decode_seconds
        prompt_s += st.prompt_seconds
        if deadline is not None and time.perf_counter() > deadline:
            break
    return tokens, decode, prompt_s


# --- routing replay in the benchmarks (--replay TRACE) ---------------------------------------------


def add_replay_options(p: argparse.ArgumentParser) -> None:
    """``--replay TRACE`` and ``--replay-end``, passed to every run of a benchmark (stock runs included)."""
    p.add_argument("--replay", default=None, metavar="TRACE",
                   help="force every run's expert selection to this routing trace's (docs/replay.md; same MoE "
                        "layers, experts and top-k as the model). The stock runs then use spac_llamacpp.Llama with "
                        "no tier: stock llama.cpp placement with the same forced routing")
    p.add_argument("--replay-end", choices=REPLAY_ENDS, default="cycle",
                   help="past the trace's end: cycle over its decode tokens (default), or stop generating")


def check_replay(trace: str | None, info: MoEModelInfo) -> str | None:
    """The trace's absolute path after checking that it fits the model (one-line SpacError), before any run."""
    if trace is None:
        return None
    check_shape(RoutingTrace.load(trace), info, max(info.n_expert_used), trace)
    return str(Path(trace).resolve())


def replay_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """``spac_llamacpp.Llama`` keywords for a run configuration's replay (none without ``cfg["replay"]``)."""
    if not cfg.get("replay"):
        return {}
    return {"routing_replay": cfg["replay"], "replay_end": cfg.get("replay_end", "cycle")}


def stock_llama(model: str, cfg: dict[str, Any], *, use_extra_bufts: bool | None = None,
                overrides: Sequence[tuple[str, str]] | None = None, **kw: Any) -> Any:
    """The stock side of a comparison: ``llama_cpp.Llama`` with llama.cpp's placement, CPU repacking
    (``use_extra_bufts``) and tensor overrides set through its default model params. With a replay in
    ``cfg``, stock llama-cpp-python cannot force routing, so this is ``spac_llamacpp.Llama`` with no tier
    and the replay: the same placement and mmap, the same forced routing as the spac side (plus the
    routing sensor's graph callback, which both sides then run)."""
    if cfg.get("replay"):
        from spac_llamacpp import Llama

        return Llama(model, use_extra_bufts=use_extra_bufts, tensor_buft_overrides=list(overrides or []) or None,
                     **replay_kwargs(cfg), **kw)
    import llama_cpp

    from spac_llamacpp.native.params import TensorBuftOverrides, patched_default_params

    held = TensorBuftOverrides(list(overrides)) if overrides else None

    def model_params(p: Any) -> None:
        if use_extra_bufts is not None:
            p.use_extra_bufts = use_extra_bufts
        if held is not None:
            p.tensor_buft_overrides = held.address

    with patched_default_params(model_params, lambda p: None):
        llm = llama_cpp.Llama(model, **kw)
    llm._spac_bench_overrides = held  # the override array lives as long as the model
    return llm


def replay_stats(llm: Any) -> dict[str, Any] | None:
    """What the replay forced in a run (None without one)."""
    replay = getattr(llm, "replay", None)
    if replay is None:
        return None
    st = replay.stats()
    return {k: st[k] for k in ("trace", "rows_forced", "rows_free", "rows_wrapped", "mismatched_rows")}


def run_child(script: str, model: str, cfg: dict) -> tuple[dict | None, str]:
    """Run ``script model --child JSON(cfg)`` in a fresh interpreter (a clean page cache and heap per
    configuration): its last stdout line parsed as JSON (None if it failed) and its stderr."""
    proc = subprocess.run([sys.executable, script, model, "--child", json.dumps(cfg)], capture_output=True, text=True)
    if proc.returncode != 0:
        return None, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr
