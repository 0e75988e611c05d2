"""What the benchmark scripts share (``scripts/bench_*.py``): prompts, budgets, timed generation, fresh processes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from spac_llamacpp.gguf.info import MoEModelInfo
from spac_llamacpp.planning import budgets
from spac_llamacpp.tools.generate import GenerationStats, stream_generate

# a mix of code and prose, as the benchmark-scale model was made from a coder model
PROMPTS = (
    "def merge_sort(items: list[int]) -> list[int]:",
    "Explain in plain English how a hash table handles collisions.",
    "import numpy as np\n\ndef softmax(x):",
    "Once upon a time, in a village by the sea, there lived",
)


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


def timed_generation(llm: Any, prompts: Sequence[str], n_predict: int) -> tuple[int, float, float]:
    """Greedy generation of ``n_predict`` tokens after each prompt (the context reset in between):
    ``(generated tokens, decode seconds, prompt seconds)`` summed over the prompts."""
    tokens, decode, prompt_s = 0, 0.0, 0.0
    for prompt in prompts:
        llm.reset()
        st = GenerationStats()
        for _ in stream_generate(llm, prompt, n_predict, temperature=0.0, seed=0, stats=st):
            pass
        tokens += st.generated_tokens
        decode += st.decode_seconds
        prompt_s += st.prompt_seconds
    return tokens, decode, prompt_s


def run_child(script: str, model: str, cfg: dict) -> tuple[dict | None, str]:
    """Run ``script model --child JSON(cfg)`` in a fresh interpreter (a clean page cache and heap per
    configuration): its last stdout line parsed as JSON (None if it failed) and its stderr."""
    proc = subprocess.run([sys.executable, script, model, "--child", json.dumps(cfg)], capture_output=True, text=True)
    if proc.returncode != 0:
        return None, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr
