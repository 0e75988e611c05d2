"""Flash tier: native engine moves, budget by mincore, identity with stock, clean shutdown."""

from __future__ import annotations

import os
import subprocess
import sys

import llama_cpp
import numpy as np
import pytest

from spac_llamacpp import Llama
from spac_llamacpp.base.errors import NotMoEError, SpacError
from spac_llamacpp.gguf.info import read_model_header
from spac_llamacpp.models.factory import write_tiny_moe
from spac_llamacpp.native.flash_engine import FlashEngine, page_size, readahead_chunk
from spac_llamacpp.native.mapping import file_mappings, new_whole_file_mapping
from spac_llamacpp.tiers.flash import sweep_chunks
from spac_llamacpp.tools.generate import greedy_continuation

# experts of several pages each, so page-granular residency is meaningful
SHAPE = {"n_layer": 3, "n_embd": 128, "n_expert": 8, "n_expert_used": 2, "n_ff_exp": 256}
ARCHS = ("qwen3moe", "llama", "deepseek2", "olmoe")
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def flash_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("flash_models")
    return {a: str(write_tiny_moe(root / f"{a}.gguf", a, **SHAPE)) for a in ARCHS}


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _greedy(llm: llama_cpp.Llama, n: int) -> list[int]:
    return greedy_continuation(llm, PROMPT, n)


def _stock_tokens(path: str, n: int) -> list[int]:
    ref = llama_cpp.Llama(path, n_ctx=128, verbose=False, seed=0)
    try:
        return _greedy(ref, n)
    finally:
        ref.close()


def _flash(path: str, budget: int | str = "2MiB", **opts) -> Llama:
    return Llama(path, n_ctx=128, verbose=False, seed=0, tier="flash", budget=budget,
                 flash_options={"background": False, **opts})


def _min_budget(path: str, **opts: object) -> int:
    """The smallest flash budget for ``path`` with the tier's options ``opts`` (its reserves follow them)."""
    with pytest.raises(SpacError, match="too small") as exc:
        _flash(path, budget=1, **opts)
    return int(str(exc.value).rsplit("(", 1)[1].split()[0])


@pytest.mark.parametrize("demand", ["async", "wait", "async-ordered"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_output_identical_to_stock(flash_models, arch, demand):
    """async-ordered: patch 0004's MUL_MAT_ID hooks take the layer's resident experts first (where the library
    has them; CI builds it)."""
    from spac_llamacpp.native.libs import mmid_hooks_setter

    path = flash_models[arch]
    want = _stock_tokens(path, 24)
    ordered = demand == "async-ordered"
    demand = "async" if ordered else demand
    llm = _flash(path, budget=_min_budget(path), demand=demand, mmid_hooks=ordered)
    try:
        assert _greedy(llm, 24) == want
        st = llm.stats(settle=5.0)
        assert st["engine"]["evictions"] > 0 and st["engine"]["demand_misses"] > 0  # the engine really worked
        assert st["engine"]["errors"] == 0 and st["engine_errors"] == {} and st["sensor_errors"] == {}
        assert st["engine"]["evict_in_use"] == 0
        # who waited for the misses, and the accounting of it
        assert (st["engine"]["demand_async"] > 0) == (demand == "async")
        t = st["timing"]
        assert t["demand"] == demand and t["prompt"]["count"] == 1 and t["decode"]["count"] == 23
        assert t["mmid_hooks"] == (ordered and (mmid_hooks_setter() is not None
                                                or bool(os.environ.get("SPAC_REQUIRE_PATCHED"))))
        assert t["decode"]["tokens"] == 23 and t["prompt"]["tokens"] == len(llm.tokenize(PROMPT.encode()))
        # async: a layer's reads are timed when the completer's wait returns, which can be after its evaluation
        reads = t["prompt"]["read_seconds"] + t["decode"]["read_seconds"]
        assert 0 < reads <= st["engine"]["demand_read_ns"] * 1e-9 + 1e-9
        for kind in ("prompt", "decode"):
            ms = t[kind]["per_token_ms"]
            assert ms["eval"] > 0 and ms["read"] >= 0
            if t[kind]["blocked_seconds"] is not None:  # a kernel with schedstat
                assert 0 <= ms["wait"] <= ms["eval"] and ms["compute"] == pytest.approx(ms["eval"] - ms["wait"])
    finally:
        llm.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_overlay_reads_give_stock_output_and_leave_no_overlay(flash_models, arch):
    """read="overlay": the experts' inner pages come by O_DIRECT into anonymous pages moved onto the model's
    mapping; the text is stock's, the engine really overlaid and evicted overlays, and close() maps the file back
    everywhere (the mapping of the file is whole again)."""
    from spac_llamacpp.native.libs import mmid_hooks_setter
    from spac_llamacpp.native.mapping import file_mappings

    def file_gaps() -> int:
        """Bytes of the span of the file's mapping that map something else (anonymous overlays)."""
        maps = sorted(file_mappings(path), key=lambda m: m.start)
        assert all(m.file_base == maps[0].file_base for m in maps)  # one mapping of the file, in pieces
        return (maps[-1].end - maps[0].start) - sum(m.size for m in maps)

    path = flash_models[arch]
    want = _stock_tokens(path, 24)
    llm = _flash(path, budget=_min_budget(path), read="overlay")
    try:
        assert file_gaps() == 0
        assert _greedy(llm, 24) == want
        st = llm.stats(settle=5.0)
        eng = st["engine"]
        assert st["timing"]["read"] == "overlay"
        # patch 0004 (CI builds it): the matmul takes resident experts first and waits for each miss the
        # completer reads; without it the hook reads and waits itself
        hooks = mmid_hooks_setter() is not None or bool(os.environ.get("SPAC_REQUIRE_PATCHED"))
        assert st["timing"]["mmid_hooks"] == hooks and (eng["demand_async"] > 0) == hooks
        assert eng["overlay_loads"] > 0 and eng["overlay_fallbacks"] == 0 and eng["evictions"] > 0
        assert eng["errors"] == 0 and st["engine_errors"] == {} and eng["evict_in_use"] == 0
        assert 0 < eng["overlays"] < eng["overlay_loads"]  # some were given back by evictions
        assert eng["pool_bytes"] <= llm._tier.staging
        assert file_gaps() >= eng["overlays"] * 4096  # the overlays are in the file's mapping
    finally:
        tier_engine = llm._tier.engine
        llm._tier.close()
        assert tier_engine.closed
        assert file_gaps() == 0  # every overlay gave its range back to the file
        llm.close()


@pytest.mark.parametrize("demand", ["async", "wait"])
@pytest.mark.parametrize("arch", ARCHS)
def test_slot_store_gives_stock_output(flash_models, arch, demand):
    """read="slots": experts live in a host pool's slots read by O_DIRECT, the graph's id maps are written per layer
    before the graph reads them; the text is stock's, every move went through slots, the pool stays in the budget."""
    from spac_llamacpp.native.expert_pool import TENSOR_DATA_PATCH_LEVEL
    from spac_llamacpp.native.libs import spac_patch_level

    path = flash_models[arch]
    if spac_patch_level() < TENSOR_DATA_PATCH_LEVEL and not os.environ.get("SPAC_REQUIRE_PATCHED"):
        pytest.skip("needs the patched library at level 5")
    want = _stock_tokens(path, 24)
    budget = _min_budget(path)
    llm = _flash(path, budget=budget, read="slots", demand=demand)
    try:
        assert _greedy(llm, 24) == want
        st = llm.stats(settle=5.0)
        eng = st["engine"]
        assert st["timing"]["read"] == "slots"
        assert eng["slot_reads"] > 0 and eng["evictions"] > 0 and eng["demand_misses"] > 0
        assert eng["errors"] == 0 and st["engine_errors"] == {} and st["sensor_errors"] == {}
        assert eng["evict_in_use"] == 0 and eng["slot_fallbacks"] == 0
        # both id map rows of every MoE layer of every evaluation were written (the graph computed from the slots)
        n_moe = len(read_model_header(path).moe_layers)
        assert eng["slot_maps"] >= 2 * n_moe * 24
        assert (eng["demand_async"] > 0) == (demand == "async") or demand == "wait"
        pool = llm._tier.pool
        assert pool is not None and 0 < pool.pool_bytes <= budget
        assert 0 < eng["slots_held"] <= sum(pool.n_slots)
        engine = llm._tier.engine
        held = [engine.slot_of(b, x) for b in read_model_header(path).moe_layers for x in range(engine.n_expert)]
        assert sum(s >= 0 for s in held) == eng["slots_held"]  # the engine's count is its slot table's
        assert len({s for s in held if s >= 0}) == eng["slots_held"]  # (one group here: no slot held twice)
        assert st["resident_expert_bytes"] <= budget
    finally:
        llm.close()


def test_io_overlap():
    from spac_llamacpp.tiers.flash import io_overlap

    assert io_overlap(0.25, 1.0) == pytest.approx(0.75)
    assert io_overlap(2.0, 1.0) == 0.0  # waited longer than the reads took (other waits): none hidden
    assert io_overlap(None, 1.0) is None and io_overlap(0.1, 0.0) is None


def test_budget_respected_after_each_step(flash_models):
    path = flash_models["qwen3moe"]
    budget = _min_budget(path)
    info = read_model_header(path)
    assert budget < info.expert_bytes / 2  # a tight budget: most experts must go
    llm = _flash(path, budget=budget)
    try:
        llm.flash.engine.wait_idle()
        tokens = llm.tokenize(PROMPT.encode())
        for step in range(12):
            llm.eval(tokens if step == 0 else [int(np.argmax(llm.scores[llm.n_tokens - 1]))])
            assert llm.flash.engine.wait_idle(10.0)
            resident, frac = llm.flash.residency()
            assert resident <= budget, f"step {step}: {resident} resident > budget {budget}"
            # what the plan and the lookahead hold is really resident
            held = llm.flash.wanted | llm.flash.look
            assert held.any() and (frac[held] > 0.99).all()
        st = llm.stats()
        assert st["budget_bytes"] == budget and st["resident_expert_bytes"] <= budget
        assert st["steps"] == 12
    finally:
        llm.close()


def test_sweep_chunks():
    assert sweep_chunks(np.array([3, 3, 3, 3, 3]), 6) == [(0, 2), (2, 4), (4, 5)]
    assert sweep_chunks(np.array([3, 3, 3]), 1) == [(0, 1), (1, 2), (2, 3)]
    assert sweep_chunks(np.array([3, 3, 3]), 0) == [(0, 3)]
    assert sweep_chunks(np.array([3, 3, 3]), 100) == [(0, 3)]


def test_partial_residency_sweeps(flash_models):
    """check_bytes=1: each check measures one MoE layer; a sweep of all of them is one budget check, and the
    per-layer measurement equals the whole-model one."""
    path = flash_models["deepseek2"]  # block 0 is dense: the sweep covers the MoE blocks only
    llm = _flash(path, check_every=1, check_bytes=1)
    try:
        tier = llm.flash
        n_moe = len(tier.rows)
        assert tier._sweep == [(i, i + 1) for i in range(n_moe)]
        tokens = llm.tokenize(PROMPT.encode())
        for step in range(2 * n_moe):
            llm.eval(tokens if step == 0 else [int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        st = llm.stats(settle=5.0)
        # a whole-model total from the check that completes the first sweep on: n_moe + 1 of 2 * n_moe checks
        assert st["checks"] == 2 * n_moe and st["budget_checks"] == n_moe + 1 and st["check_layers"] == 1
        assert st["check_seconds"] > 0 and set(st["loop_seconds"]) == {"observe", "learn", "plan", "move",
                                                                       "step_ends"}
        total, frac = tier.engine.residency()
        part, by_layer = np.zeros_like(frac), np.zeros(frac.shape[0], np.int64)
        got = sum(tier.engine.residency_layers(int(b), int(b) + 1, part, by_layer) for b in tier.rows)
        assert got == total == by_layer.sum() and np.array_equal(part, frac)
        with pytest.raises(SpacError, match="bad block range"):
            tier.engine.residency_layers(1, 0, part, by_layer)
    finally:
        llm.close()


def test_evicted_experts_gone_prefetched_resident(flash_models):
    path = flash_models["llama"]
    before = file_mappings(path)
    from spac_llamacpp.native.params import patched_default_params

    def no_repack(p):
        p.use_extra_bufts = False

    with patched_default_params(no_repack, lambda p: None):
        ref = llama_cpp.Llama(path, n_ctx=64, verbose=False)
    info = read_model_header(path)
    engine = FlashEngine(info, new_whole_file_mapping(path, before, info.data_offset))
    try:
        layer = info.moe_layers[1]
        for e in range(info.n_expert):
            assert engine.submit("evict", layer, e)
        assert engine.wait_idle()
        _, frac = engine.residency()
        slack = 2 * page_size() / (info.layer_expert_bytes(layer))
        assert frac[layer].max() <= slack * 3 + 1e-6, frac[layer]
        assert engine.submit("prefetch", layer, 3)
        assert engine.wait_idle()
        _, frac = engine.residency()
        assert frac[layer, 3] == pytest.approx(1.0)
        assert np.delete(frac[layer], 3).max() <= slack * 3 + 1e-6
        # readahead in pieces of one page (the kernel reads at most its limit per MADV_WILLNEED call)
        assert engine.readahead_chunk == readahead_chunk(path) and engine.readahead_chunk % page_size() == 0
        engine._lib.spac_engine_set_readahead(engine._handle, 1)  # rounded up to one page
        assert engine.submit("prefetch", layer, 5)
        assert engine.wait_idle()
        assert engine.residency()[1][layer, 5] == pytest.approx(1.0)
        assert engine.stats()["errors"] == 0
        with pytest.raises(SpacError, match="no such routed expert"):
            engine.submit("evict", layer, info.n_expert)
    finally:
        engine.close()
        ref.close()


def test_eviction_waits_for_the_running_layer(flash_models):
    path = flash_models["qwen3moe"]
    llm = _flash(path, budget=_min_budget(path))
    try:
        eng = llm.flash.engine
        eng.wait_idle()
        layer = llm.moe_info.moe_layers[0]
        e = int(np.nonzero(~llm.flash.wanted[0])[0][0])
        assert eng.submit("prefetch", layer, e) and eng.wait_idle()
        mask = np.zeros(llm.moe_info.n_expert, np.uint8)
        mask[e] = 1
        eng._lib.spac_engine_on_layer(eng._handle, layer, eng._ffi.from_buffer(mask))  # as the sensor does
        deferred = eng.stats()["deferred"]
        assert eng.submit("evict", layer, e) and eng.wait_idle()
        assert eng.stats()["deferred"] == deferred + 1
        assert eng.residency()[1][layer, e] == pytest.approx(1.0)  # still there: its layer is computing
        eng.end_step()
        assert eng.wait_idle()
        assert eng.residency()[1][layer, e] < 0.5
    finally:
        llm.close()


def test_threads_stop_on_close_and_on_failure(flash_models, monkeypatch):
    path = flash_models["olmoe"]
    base = _threads()
    llm = _flash(path, threads=3)
    assert _threads() >= base + 3
    llm.close()
    assert _threads() == base
    llm.close()  # idempotent

    from spac_llamacpp.tiers import flash as flash_tier

    def boom(self, *a, **k):
        raise RuntimeError("planner exploded")

    monkeypatch.setattr(flash_tier.FlashTier, "_move", boom)
    with pytest.raises(RuntimeError, match="planner exploded"):
        _flash(path, threads=3)
    assert _threads() == base


def test_threads_stop_at_interpreter_exit(flash_models):
    code = (
        "from spac_llamacpp import Llama\n"
        f"llm = Llama({flash_models['qwen3moe']!r}, n_ctx=64, verbose=False, tier='flash', budget='2MiB')\n"
        "llm.create_completion('hi', max_tokens=4, temperature=0)\n"
        "print('done')\n"  # no close(): the finalizer must stop the engine at exit
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("done")


def test_bad_arguments(flash_models, tiny_dense_model):
    path = flash_models["qwen3moe"]
    with pytest.raises(SpacError, match="too small for the flash tier"):
        _flash(path, budget="4KiB")
    with pytest.raises(SpacError, match="needs budget"):
        Llama(path, verbose=False, tier="flash")
    with pytest.raises(SpacError, match="use_mmap"):
        Llama(path, verbose=False, tier="flash", budget="1MiB", use_mmap=False)
    with pytest.raises(SpacError, match="unknown tier"):
        Llama(path, verbose=False, tier="disk", budget="1MiB")
    with pytest.raises(SpacError, match="invalid size"):
        Llama(path, verbose=False, tier="flash", budget="lots")
    with pytest.raises(NotMoEError, match="dense"):
        Llama(str(tiny_dense_model), verbose=False, tier="flash", budget="1MiB")


def test_spac_run_flash_cli(flash_models):
    path = flash_models["deepseek2"]
    exe = os.path.join(os.path.dirname(sys.executable), "spac-run")
    proc = subprocess.run([exe, path, "-n", "8", "--tier", "flash", "--budget", "2MiB", "--stats", "json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import json

    st = json.loads(proc.stderr.strip().splitlines()[-1])["flash"]
    assert st["budget_bytes"] == 2 << 20 and st["resident_expert_bytes"] <= 2 << 20
    bad = subprocess.run([exe, path, "--tier", "flash", "--budget", "1KiB"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "too small" in bad.stderr


def test_self_draft_with_the_flash_tier(flash_models):
    path = flash_models["qwen3moe"]
    want = _stock_tokens(path, 24)
    llm = Llama(path, n_ctx=128, verbose=False, seed=0, tier="flash", budget=_min_budget(path), self_draft=True,
                n_draft=3, flash_options={"background": False})
    try:
        assert _greedy(llm, 24) == want
        assert llm.speculation.summary()["drafted"] > 0
        # the draft follows the target's residency
        draft_prior = llm._draft_llm.llm.cache_prior
        held = llm.flash.wanted | llm.flash.look
        assert (draft_prior.resident[draft_prior.rows].astype(bool) == draft_prior.fixed).all()
        assert draft_prior.fixed.shape == held.shape
    finally:
        llm.close()


@pytest.mark.parametrize("arch", ["qwen3moe", "deepseek2"])
def test_layer_ahead_prefetch(flash_models, arch):
    path = flash_models[arch]
    want = _stock_tokens(path, 24)
    budget = _min_budget(path)
    llm = _flash(path, budget=budget, layer_ahead=True)
    try:
        assert _greedy(llm, 24) == want
        llm.flash.engine.wait_idle()
        st = llm.stats(settle=5.0)
        eng = st["engine"]
        assert eng["ahead_predicted"] > 0 and eng["ahead_issued"] > 0
        assert 0 < eng["ahead_useful"] <= eng["ahead_issued"]
        assert st["resident_expert_bytes"] <= budget
    finally:
        llm.close()


def test_layer_ahead_auto_switches_by_measurement(flash_models):
    """layer_ahead="auto": windows with and without the lookahead's graph cuts, then the faster setting; the
    output is stock's either way. (Not the qwen3moe file of the budget tests: the lookahead's reads are not
    awaited, and one landing after this model closed would be a stray of the next model of the same file.)"""
    path = flash_models["olmoe"]
    want = _stock_tokens(path, 48)
    llm = _flash(path, budget=_min_budget(path), layer_ahead="auto")
    try:
        assert _greedy(llm, 48) == want
        la = llm.stats()["layer_ahead"]
        assert len(la["decisions"]) == 1 and la["decisions"][0]["step"] == 8 + 32  # warmup, 4 windows of 8 steps
        assert la["on"] == la["decisions"][0]["on"]
        assert llm.stats()["engine"]["ahead_predicted"] > 0  # the on windows ran the lookahead
    finally:
        llm.close()
    with pytest.raises(SpacError, match="layer_ahead must be"):
        _flash(path, layer_ahead="sometimes")


@pytest.mark.parametrize("admission", [None, "off"])
def test_budget_holds_at_every_step_boundary(flash_models, admission):
    """A check at every step: the whole model's resident expert bytes at each step boundary (queued evictions
    run first, loads in flight counted as landed) stay within what the plan, the lookahead and the tensors' edge
    pages may hold, so within the budget; nothing resident is left unheld; the output is stock's. Both ways a
    miss comes in: layer admission (the default: no lookahead, no keep reserve) and at the step's end (with the
    keep reserve and the lookahead)."""
    path = flash_models["qwen3moe"]
    info = read_model_header(path)
    opts = {"admission": admission} if admission else {}
    budget = _min_budget(path, **opts) + 2 * int(info.layer_expert_bytes(info.moe_layers[0]) / info.n_expert)
    want = _stock_tokens(path, 24)
    llm = _flash(path, budget=budget, check_every=1, **opts)
    try:
        assert _greedy(llm, 24) == want
        st = llm.stats(settle=5.0)
        split = llm.flash.budget_split
        assert st["budget_checks"] >= 20 and st["over_budget_checks"] == 0 and st["drain_timeouts"] == 0
        assert st["max_resident_at_check"] <= split.at_step_boundary < budget
        assert st["strays_evicted"] == 0  # the engine's evictions really dropped what the tier let go
        eng = st["engine"]
        assert st["staged_kept"] + st["staged_evicted"] == eng["staged"]
        if admission == "off":  # misses kept to the step's end, for the plan and the lookahead
            assert eng["staged"] > 0 and eng["admitted"] == 0 and llm.flash.lookahead
        else:  # misses take a planned expert's place in their layer; its reserves went to the plan
            assert eng["admitted"] > 0 and not llm.flash.lookahead and llm.flash.keep_reserve == 0
        assert eng["drains"] == st["checks"] and eng["evict_in_use"] == 0 and eng["errors"] == 0
    finally:
        llm.close()


def _engine_on(path: str) -> tuple[FlashEngine, llama_cpp.Llama, int]:
    """A flash engine on llama.cpp's mapping of ``path`` (no tier), with every expert of a layer evicted."""
    from spac_llamacpp.native.params import patched_default_params

    before = file_mappings(path)

    def no_repack(p):
        p.use_extra_bufts = False

    with patched_default_params(no_repack, lambda p: None):
        ref = llama_cpp.Llama(path, n_ctx=64, verbose=False)
    info = read_model_header(path)
    engine = FlashEngine(info, new_whole_file_mapping(path, before, info.data_offset))
    layer = info.moe_layers[1]
    for e in range(info.n_expert):
        assert engine.submit("evict", layer, e)
    assert engine.drain_evictions() and engine.wait_idle()
    return engine, ref, layer


def _hook(engine: FlashEngine, layer: int, *experts: int) -> None:
    mask = np.zeros(engine.n_expert, np.uint8)
    mask[list(experts)] = 1
    engine._lib.spac_engine_on_layer(engine._handle, layer, engine._ffi.from_buffer(mask))  # as the sensor does


def test_a_demand_load_the_next_plan_wants_is_read_once(flash_models):
    """Kept until the step ends (staging), a demand-loaded expert the plan then wants stays resident: the next
    step finds it, with no prefetch; without staging it is evicted after its layer and read a second time."""
    engine, ref, layer = _engine_on(flash_models["llama"])
    try:
        engine.set_staging(1 << 30)
        s0 = engine.stats()
        _hook(engine, layer, 3)
        assert engine.flags("staged")[layer, 3] and engine.stats()["demand_misses"] == s0["demand_misses"] + 1
        engine.end_step()
        assert engine.wait_idle() and engine.residency()[1][layer, 3] == pytest.approx(1.0)  # not evicted
        engine.set_wanted(layer, 3, True)  # the step-end plan wants it: no prefetch
        assert engine.flags("staged", clear=True)[layer, 3] and not engine.flags("staged").any()
        _hook(engine, layer, 3)
        engine.end_step()
        s1 = engine.stats()
        assert s1["demand_misses"] == s0["demand_misses"] + 1 and s1["demand_hits"] == s0["demand_hits"] + 1
        assert s1["prefetch_bytes"] == s0["prefetch_bytes"] and s1["staged"] == s0["staged"] + 1

        engine.set_staging(0)  # no staging: a transient demand load, evicted once its layer is done
        _hook(engine, layer, 5)
        engine.end_step()
        assert engine.drain_evictions() and engine.residency()[1][layer, 5] < 0.5
        _hook(engine, layer, 5)
        engine.end_step()
        s2 = engine.stats()
        assert s2["demand_misses"] == s1["demand_misses"] + 2
        assert s2["transient_evictions"] >= s1["transient_evictions"] + 2
    finally:
        engine.close()
        ref.close()


def test_prompt_keep_swaps_planned_experts_for_the_prompts_hottest(flash_models):
    """One layer hook with prompt keep on: planned experts are replaced one for one by selected experts with more
    tokens (a planned one wins ties and needs no read); the displaced are evicted, the newcomers stay."""
    engine, ref, layer = _engine_on(flash_models["llama"])
    try:
        n = engine.n_expert
        planned = [0, 1, 2]
        for e in planned:
            engine.set_wanted(layer, e, True)
        counts = np.zeros((engine.n_layer, n), np.int32)
        counts[layer, [1, 4, 6, 7]] = [3, 9, 3, 5]  # the sensor's step counts when layer `layer` is reached
        engine.set_prompt_keep(counts)
        _hook(engine, layer, 1, 4, 6, 7)
        kept, released = engine.flags("kept", clear=True), engine.flags("released", clear=True)
        # top 3 by (tokens, planned first): 4 (9), 7 (5), 1 (3, planned; beats 6 with 3 tokens)
        assert np.nonzero(kept[layer])[0].tolist() == [4, 7] and np.nonzero(released[layer])[0].tolist() == [0, 2]
        engine.end_step()  # also turns prompt keep off
        assert engine.drain_evictions() and engine.wait_idle()
        frac = engine.residency()[1][layer]
        assert (frac[[1, 4, 7]] == pytest.approx(1.0)) and (frac[[0, 2, 6]] < 0.5).all()
        st = engine.stats()
        assert st["prompt_kept"] == st["prompt_released"] == 2
        _hook(engine, layer, 6)  # the next step: no swaps
        assert not engine.flags("kept").any() and not engine.flags("released").any()
    finally:
        engine.close()
        ref.close()


def test_layer_admission_swaps_a_miss_for_the_lowest_ranked_planned_expert(flash_models):
    """Layer admission: a miss takes the place of the layer's planned expert of the lowest rank that the layer is
    not using ("always"), or only when it ranks higher ("rank"); the displaced one is evicted, the newcomer stays."""
    engine, ref, layer = _engine_on(flash_models["llama"])
    try:
        n = engine.n_expert
        for e in (0, 1, 2):
            engine.set_wanted(layer, e, True)
            assert engine.submit("prefetch", layer, e)
        assert engine.wait_idle()
        rank = np.zeros((engine.n_layer, n), np.float32)
        rank[layer, :] = [5, 1, 3, 0, 0, 9, 0, 0]  # planned 0, 1, 2: expert 1 ranks lowest
        engine.set_admission(rank, np.inf, 1 << 30)  # "always"
        _hook(engine, layer, 1, 4)  # 1 is planned and in use: the victim is 2 (rank 3), not 1
        kept, released = engine.flags("kept", clear=True), engine.flags("released", clear=True)
        assert np.nonzero(kept[layer])[0].tolist() == [4] and np.nonzero(released[layer])[0].tolist() == [2]
        engine.end_step()
        assert engine.drain_evictions() and engine.wait_idle()
        frac = engine.residency()[1][layer]
        assert (frac[[0, 1, 4]] == pytest.approx(1.0)) and frac[2] < 0.5
        assert engine.stats()["admitted"] == 1 and not engine.flags("staged").any()

        engine.set_admission(rank, -np.inf, 1 << 30)  # "rank": a newcomer counts with its own rank
        for e in (0, 1, 2, 4):
            engine.set_wanted(layer, e, e in (0, 1, 4))
        _hook(engine, layer, 5, 6)
        kept, released = engine.flags("kept", clear=True), engine.flags("released", clear=True)
        # 5 (rank 9) displaces the lowest planned idle one, 4 (rank 0); then 6 (rank 0) does not outrank 1 (rank 1)
        assert np.nonzero(kept[layer])[0].tolist() == [5] and np.nonzero(released[layer])[0].tolist() == [4]
        engine.end_step()
        engine.set_admission(None)
        _hook(engine, layer, 7)  # off: no swap
        assert not engine.flags("kept").any() and engine.stats()["admitted"] == 2
        engine.end_step()
        # ties: of equally ranked planned experts the highest id goes (the rules keep lower ids first)
        for e in range(n):
            engine.set_wanted(layer, e, e in (0, 1, 2))
        for e in (0, 1, 2):
            assert engine.submit("prefetch", layer, e)
        assert engine.wait_idle()
        tied = np.zeros((engine.n_layer, n), np.float32)
        tied[layer, :] = [2, 2, 2, 0, 0, 0, 0, 0]
        engine.set_admission(tied, np.inf, 1 << 30)
        _hook(engine, layer, 3)
        assert np.nonzero(engine.flags("released", clear=True)[layer])[0].tolist() == [2]
        engine.flags("kept", clear=True)
        engine.end_step()
        engine.set_admission(None)
        with pytest.raises(SpacError, match="admission ranks must be"):
            engine.set_admission(np.zeros((1, 1)))
        assert engine._lib.spac_engine_set_admission(engine._handle, engine._ffi.NULL, 0.0, 0, 1) == -1
    finally:
        engine.close()
        ref.close()


def test_predicted_admission_ranks_the_layer_as_it_will_be_after_the_step(flash_models):
    """Predicted admission: the hook ranks the layer from its selection (base + self weight for a selected expert +
    the selected experts' next-step rows) before it admits a miss, so a miss with a low rank from before the step is
    admitted when the step makes it rank higher than a planned expert, and not when it does not."""
    engine, ref, layer = _engine_on(flash_models["llama"])
    try:
        L, n = engine.n_layer, engine.n_expert
        for e in (0, 1, 2):
            engine.set_wanted(layer, e, True)
            assert engine.submit("prefetch", layer, e)
        assert engine.wait_idle()
        stale = np.zeros((L, n), np.float32)
        stale[layer, :] = [5, 1, 3, 0, 0, 0, 0, 0]  # from before the step: a miss of 4 (rank 0) is no better than 1
        engine.set_admission(stale, -np.inf, 1 << 30)  # "rank"
        base = np.zeros((L, n), np.float32)
        base[layer, :] = [5, 1, 3, 0, 0, 0, 0, 0]
        rows = np.zeros((L, n, n), np.float32)
        rows[layer, 4, 2] = -2.5  # a step that uses 4 makes 2 less likely next (3 - 2.5 = 0.5)
        engine.set_admission_model(rows, base, 0.75)  # 4 after the step: 0 + 0.75
        _hook(engine, layer, 4)
        kept, released = engine.flags("kept", clear=True), engine.flags("released", clear=True)
        assert np.nonzero(kept[layer])[0].tolist() == [4] and np.nonzero(released[layer])[0].tolist() == [2]
        engine.end_step()
        base[layer, 4] = 1.5  # planned now: 0, 1, 4 (ranks 5, 1, 1.5)
        engine.set_admission_model(None, base, 0.75)  # rows kept; a step using 6 alone: 0.75 < 1 (expert 1)
        _hook(engine, layer, 6)
        assert not engine.flags("kept", clear=True).any() and not engine.flags("released", clear=True).any()
        engine.end_step()
        engine.set_admission_model(None, None)  # off: the stale ranks again, and 4 is planned now
        _hook(engine, layer, 7)
        assert not engine.flags("kept", clear=True).any()
        engine.end_step()
        assert engine.stats()["admitted"] == 1
        with pytest.raises(SpacError, match="admission base ranks must be"):
            engine.set_admission_model(None, np.zeros((1, 1)))
        with pytest.raises(SpacError, match="next-step rows must be"):
            engine.set_admission_model(np.zeros((L, n)), base)
        with pytest.raises(SpacError, match="must be finite"):
            engine.set_admission_model(None, base, float("nan"))
        ffi = engine._ffi
        assert engine._lib.spac_engine_set_admission_model(engine._handle, ffi.NULL, ffi.NULL, 0.0, 1) == -1
        assert engine._lib.spac_engine_set_admission_model(ffi.NULL, ffi.NULL, ffi.NULL, 0.0, 0) == -1
    finally:
        engine.close()
        ref.close()


def test_engine_admission_is_the_rule_the_simulator_replays(flash_models):
    """Ours' predicted admission on the tier: the residency after every step without a plan is what
    ``planning/admission.py`` (the simulator's copy of the engine's rule) makes of the residency before it, with
    an estimator fed the same steps; the output is stock's."""
    from spac_llamacpp.planning.admission import admit_step, predicted_ranks
    from spac_llamacpp.planning.estimators import Observation, SpacEstimator

    path = flash_models["qwen3moe"]
    info = read_model_header(path)
    budget = _min_budget(path) + 4 * int(info.layer_expert_bytes(info.moe_layers[0]) / info.n_expert)
    want = _stock_tokens(path, 32)
    llm = _flash(path, budget=budget, record=True)
    try:
        assert _greedy(llm, 32) == want and llm.flash.admission == "predict"
        recs = llm.flash.records
        admitted = llm.stats()["admitted"]
    finally:
        llm.close()
    est = SpacEstimator(*recs[0].counts.shape)
    checked = 0
    for prev, rec in zip(recs, recs[1:], strict=False):
        est.update(Observation(prev.counts, prev.n_tokens))
        if rec.plan is not None:
            continue
        base, self_weight = est.next_step_model()
        layers, sources, rows = est.next_rows()
        table = np.zeros((*base.shape, base.shape[1]))
        table[layers, sources] = rows
        held, _ = admit_step(prev.wanted, rec.counts > 0,
                             lambda i, s: predicted_ranks(base[i], self_weight, table[i], s))  # noqa: B023
        assert np.array_equal(held, rec.wanted), rec.step
        checked += 1
    assert checked >= 20 and admitted > 0


@pytest.mark.parametrize("policy", ["spac", "lru"])
def test_layer_admission_on_the_tier(flash_models, policy):
    """With layer admission the tier's output is stock's, the budget holds at every step boundary, misses took
    planned experts' places, and (lru) the plan after a step re-reads fewer of the step's demand loads."""
    path = flash_models["qwen3moe"]
    info = read_model_header(path)
    budget = _min_budget(path, admission="off") + 3 * int(info.layer_expert_bytes(info.moe_layers[0]) / info.n_expert)
    want = _stock_tokens(path, 24)
    runs = {}
    for admission in ("off", "always"):
        llm = Llama(path, n_ctx=128, verbose=False, seed=0, tier="flash", budget=budget, policy=policy,
                    flash_options={"background": False, "check_every": 1, "admission": admission,
                                   "lookahead": False})  # (ours' default follows admission: the same for both)
        try:
            assert _greedy(llm, 24) == want
            st = llm.stats(settle=5.0)
            assert st["admission"] == admission and st["over_budget_checks"] == 0 and st["budget_checks"] >= 20
            assert st["max_resident_at_check"] <= llm.flash.budget_split.at_step_boundary
            assert st["engine"]["evict_in_use"] == 0 and st["engine"]["errors"] == 0 and st["strays_evicted"] == 0
            runs[admission] = st
        finally:
            llm.close()
    assert runs["off"]["admitted"] == 0 and runs["always"]["admitted"] > 0
    if policy == "lru":  # its plan keeps every admitted miss: no second read
        assert runs["always"]["engine"]["prefetches"] < runs["off"]["engine"]["prefetches"]
    # (ours' balancer may prefer a displaced expert back after the step, and reads it: docs/flash.md)
    with pytest.raises(SpacError, match="admission must be one of"):
        _flash(path, budget=budget, admission="sometimes")


def test_engine_flags_and_keep_refuse_bad_input(flash_models):
    """Out-of-range flag kinds (C and Python), a wrong-shape counts array, an empty hook mask and a closed engine:
    a return code or one SpacError line, never a crash."""
    engine, _, layer = _engine_on(flash_models["llama"])
    out = np.zeros((engine.n_layer, engine.n_expert), np.uint8)
    buf = engine._ffi.cast("uint8_t *", engine._ffi.from_buffer(out))
    assert engine._lib.spac_engine_flags(engine._handle, -1, buf, 0) == -1
    assert engine._lib.spac_engine_flags(engine._handle, 99, buf, 0) == -1
    with pytest.raises(SpacError, match="unknown engine flag"):
        engine.flags("nope")
    with pytest.raises(SpacError, match="C-contiguous int32"):
        engine.set_prompt_keep(np.zeros((1, 1), np.int32))
    with pytest.raises(SpacError, match="unknown demand mode 'later'"):
        engine.set_demand_mode("later")
    assert engine._lib.spac_engine_set_demand_mode(engine._handle, 7) == -1
    misses = engine.stats()["demand_misses"]
    _hook(engine, layer)  # an empty selection: nothing loaded
    every = engine._ffi.from_buffer(np.ones(engine.n_expert, np.uint8))
    for bad_layer in (engine.n_layer, -1):  # out of range: ignored
        engine._lib.spac_engine_on_layer(engine._handle, bad_layer, every)
    assert engine.stats()["demand_misses"] == misses
    engine.close()
    for call in (lambda: engine.flags("staged"), engine.drain_evictions, lambda: engine.set_prompt_keep(None),
                 lambda: engine.set_demand_mode("wait")):
        with pytest.raises(SpacError, match="closed"):
            call()


def test_eviction_takes_the_pageout_path_only_where_pages_survive_the_drop(flash_models):
    """An eviction drops the pages with DONTNEED + fadvise; MADV_PAGEOUT runs only when mincore still finds some
    (here: pages another mapping of the file holds, which nothing can drop), never for the engine's own reads."""
    import mmap

    engine, ref, layer = _engine_on(flash_models["llama"])
    try:
        assert engine.submit("prefetch", layer, 2) and engine.wait_idle()
        s0 = engine.stats()
        assert engine.submit("evict", layer, 2) and engine.drain_evictions() and engine.wait_idle()
        s1 = engine.stats()
        assert s1["evictions"] == s0["evictions"] + 1 and s1["evict_pageouts"] == s0["evict_pageouts"]
        assert engine.residency()[1][layer, 2] == 0.0
        # a second mapping of the file touches expert 3's pages: the drop leaves them, the fallback runs
        assert engine.submit("prefetch", layer, 3) and engine.wait_idle()
        t = read_model_header(flash_models["llama"]).layer_tensors(layer)[0]
        with open(flash_models["llama"], "rb") as f:
            other = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            lo = t.file_offset + 3 * t.bytes_per_expert
            assert sum(other[lo:lo + t.bytes_per_expert:page_size()]) >= 0  # map the pages in this mapping too
            assert engine.submit("evict", layer, 3) and engine.drain_evictions() and engine.wait_idle()
            s2 = engine.stats()
            other.close()
        assert s2["evict_pageouts"] > s1["evict_pageouts"] and s2["errors"] == 0
    finally:
        engine.close()
        ref.close()


def test_the_plan_is_told_only_what_a_step_left_in_memory(flash_models):
    """Ours plans after a step from the residency plus the step's experts that are still in memory (hits, layer
    admission's swaps, the keep reserve, the lookahead), never a demand load evicted after its layer: keeping
    that one costs a read, which the balancer must charge (it was told all were free, and re-read them)."""
    path = flash_models["qwen3moe"]
    info = read_model_header(path)
    budget = _min_budget(path) + 2 * int(info.layer_expert_bytes(info.moe_layers[0]) / info.n_expert)
    want = _stock_tokens(path, 24)
    llm = _flash(path, budget=budget)
    tier = llm.flash
    seen = {"claimed": 0, "left_out": 0}
    in_memory = tier._in_memory

    def checked(counts):
        told = in_memory(counts)
        pending = tier.engine.flags("prefetching")[tier.rows]
        li, le = np.nonzero(told)
        resident = tier.engine.residency_experts(tier.rows[li], le)
        # every expert the plan is told it may keep is resident (or its read is in flight)
        # (an expert's three tensors each share up to two edge pages with their neighbours)
        assert ((resident >= tier.sizes[li, le] - 6 * page_size()) | pending[li, le]).all()
        seen["claimed"] += len(li)
        seen["left_out"] += int(((counts > 0) & ~told).sum())
        return told

    tier._in_memory = checked
    try:
        assert _greedy(llm, 24) == want
    finally:
        llm.close()
    # at this budget some of a step's demand loads had no planned expert to replace and were evicted
    assert seen["claimed"] > 0 and seen["left_out"] > 0
