"""Soak: 1000 short generations on one flash-tier model, a budget check at every step.

Deselected by default (``-m 'not soak'`` in pyproject.toml); ``.ci/run`` runs it (``pytest -m soak``),
about a minute on 2 cores. One model (a tiny factory MoE whose experts span several pages) with a
budget of half its expert bytes, the background re-planner on; prompts of 4 to ~150 tokens, cycled; greedy
output compared with stock llama-cpp-python on every generation; after a warm-up, anonymous resident
memory (RssAnon: the heap, not the mapped model whose pages the tier moves) may grow by at most
:data:`RSS_BOUND` and the thread and fd counts must not change; after ``close()`` the engine's
workers and the re-planner are gone.
"""

from __future__ import annotations

import os
import random
import time

import llama_cpp
import pytest

from spac_llamacpp import Llama
from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.gguf.info import read_model_header
from spac_llamacpp.models.factory import write_tiny_moe
from spac_llamacpp.tools.generate import greedy_continuation

pytestmark = pytest.mark.soak

GENERATIONS = 1000
WARMUP = 300  # past the routing log's 1024 kept steps (routing_history), which fill up first
NEW_TOKENS = 4
N_PROMPTS = 40
RSS_BOUND = 4 << 20  # bytes of RssAnon growth allowed from the end of the warm-up to the end
SHAPE = {"n_layer": 2, "n_embd": 64, "n_expert": 16, "n_expert_used": 2, "n_ff_exp": 128}  # 4 pages per expert tensor
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "old", "kings",
         "sing", "of", "rivers", "and", "stone", "under", "grey", "northern", "skies", "where", "small", "birds",
         "rest")


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _prompts() -> list[str]:
    rng = random.Random(0)
    lengths = [1, 2, 3, 5, 8, 13, 21, 34, 55] + [rng.randint(1, 60) for _ in range(N_PROMPTS - 9)]
    return [" ".join(rng.choice(WORDS) for _ in range(n)) for n in lengths]


def _min_budget(path: str) -> int:
    with pytest.raises(SpacError, match="too small") as exc:
        Llama(path, n_ctx=512, verbose=False, tier="flash", budget=1)
    return int(str(exc.value).rsplit("(", 1)[1].split()[0])


def _generate(llm: llama_cpp.Llama, prompt: str) -> list[int]:
    llm.reset()  # the whole prompt evaluated each time: one step of its length, then NEW_TOKENS steps
    return greedy_continuation(llm, prompt, NEW_TOKENS)


def test_soak_flash_generations(tmp_path):
    path = str(write_tiny_moe(tmp_path / "soak.gguf", "qwen3moe", **SHAPE))
    prompts = _prompts()
    stock = llama_cpp.Llama(path, n_ctx=512, verbose=False, seed=0, n_threads=1)
    try:
        want = {p: _generate(stock, p) for p in prompts}
        lengths = {len(stock.tokenize(p.encode())) for p in prompts}
    finally:
        stock.close()
    assert len(lengths) > 20 and min(lengths) <= 4 and max(lengths) >= 100, sorted(lengths)  # lengths really vary

    budget = read_model_header(path).expert_bytes // 2  # half the experts: misses and evictions at most steps
    assert budget >= _min_budget(path)
    threads_before, fds_before = _threads(), _fds()
    llm = Llama(path, n_ctx=512, verbose=False, seed=0, n_threads=1, tier="flash", budget=budget,
                flash_options={"check_every": 1, "background": True})  # background re-planning on
    t0 = time.monotonic()
    try:
        for i in range(GENERATIONS):
            prompt = prompts[i % len(prompts)]
            got = _generate(llm, prompt)
            assert got == want[prompt], f"generation {i}: {got} != stock {want[prompt]} for {prompt!r}"
            if i == WARMUP - 1:
                rss0, threads0, fds0 = _rss_anon(), _threads(), _fds()
            if i % 100 == 99:  # once queued moves have run, the budget holds (and nothing failed)
                assert llm.flash.engine.wait_idle(10.0)
                resident, _ = llm.flash.residency()
                assert resident <= budget, f"generation {i}: {resident} resident > budget {budget}"
        st = llm.stats(settle=5.0)
        rss1, threads1, fds1 = _rss_anon(), _threads(), _fds()
        seconds = time.monotonic() - t0
        steps = st["steps"]
        assert steps >= GENERATIONS * NEW_TOKENS and st["budget_checks"] == steps  # a check at every step
        assert st["engine"]["errors"] == 0 and st["engine_errors"] == {} and st["sensor_errors"] == {}
        assert st["engine"]["evict_in_use"] == 0 and st["model_file"]["fault"] is None
        assert st["engine"]["demand_misses"] > 0 and st["engine"]["evictions"] > 0  # the tier really worked
        assert st["resident_expert_bytes"] <= budget
        # at every step boundary, by construction (queued evictions drained before each check)
        assert st["over_budget_checks"] == 0 and st["max_resident_at_check"] <= budget
        growth = rss1 - rss0
        print(f"\nsoak: {GENERATIONS} generations, {steps} steps in {seconds:.1f} s; budget {budget} B, max resident "
              f"at a check {st['max_resident_at_check']} B ({st['over_budget_checks']} of {st['budget_checks']} checks "
              f"over); RssAnon {rss0 >> 10} -> {rss1 >> 10} KiB "
              f"({growth / 1024:+.0f} KiB); threads {threads0} -> {threads1}; fds {fds0} -> {fds1}")
        assert growth <= RSS_BOUND, f"RssAnon grew by {growth} bytes over {GENERATIONS - WARMUP} generations"
        assert threads1 == threads0, f"threads {threads0} -> {threads1}"
        assert fds1 == fds0, f"fds {fds0} -> {fds1}"
    finally:
        llm.close()
    assert _threads() == threads_before, "the engine's workers or the re-planner outlived close()"
    assert _fds() == fds_before
