"""The expert slot pool (patch 0003) and the VRAM tier, run with the pool in host memory.

The pool's logic (slot states, fences, asynchronous copies, id remapping, the two-path expert
computation) is the same wherever the pool lives; on the CPU both paths use the same kernels, so the
logits must equal stock llama.cpp's bit for bit under any residency.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import llama_cpp
import numpy as np
import pytest
from _pool_churn import churn_hook

from spac_llamacpp import Llama, patched_llama_available
from spac_llamacpp.base.errors import NotMoEError, SpacError
from spac_llamacpp.gguf.info import read_model_header
from spac_llamacpp.models.factory import write_tiny_moe
from spac_llamacpp.native.expert_pool import (
    E_ARG,
    E_BUSY,
    E_RESIDENT,
    E_UNSUPPORTED,
    FREE,
    LOADING,
    READY,
    RESIDENT,
    RETIRED,
    ExpertPool,
    PoolError,
    PoolLayout,
)
from spac_llamacpp.tools.generate import greedy_continuation

pytestmark = pytest.mark.skipif(
    not patched_llama_available(3) and not os.environ.get("SPAC_REQUIRE_PATCHED"),
    reason="the installed llama.cpp lacks the expert pool (run scripts/build_llama.sh)",
)

SHAPE = {"n_layer": 3, "n_embd": 64, "n_expert": 8, "n_expert_used": 2, "n_ff_exp": 64}
# gpt-oss: expert biases (added after the merge with the original ids); qwen2moe: a shared expert;
# deepseek2: a leading dense block and grouped routing
ARCHS = ("qwen3moe", "llama", "deepseek2", "olmoe", "gpt-oss", "qwen2moe")
KW = {"n_ctx": 128, "n_batch": 32, "seed": 0, "verbose": False, "logits_all": True}
PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def pool_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pool_models")
    out = {a: str(write_tiny_moe(root / f"{a}.gguf", a, **SHAPE)) for a in ARCHS}
    out["q8_0"] = str(write_tiny_moe(root / "q8.gguf", "qwen3moe", dtype="q8_0", **SHAPE))
    return out


def _continuation(llm: llama_cpp.Llama) -> tuple[list[int], list[int]]:
    prompt = llm.tokenize(PROMPT.encode())
    return prompt[:6], prompt[6:] + prompt[:4]


def _run(llm: llama_cpp.Llama, between=None) -> np.ndarray:
    """Logits of a prompt step, then one-token steps; ``between(step)`` runs before each decode step."""
    prompt, rest = _continuation(llm)
    llm.reset()
    llm.eval(prompt)
    for i, tok in enumerate(rest):
        if between is not None:
            between(i)
        llm.eval([tok])
    return np.array(llm.scores[: llm.n_tokens])


def _stock_no_repack(path: str, **kw) -> llama_cpp.Llama:
    """Stock llama-cpp-python with the VRAM tier's CPU placement: experts in plain buffers (no repacking,
    which changes the CPU kernels' rounding)."""
    from spac_llamacpp.native.params import patched_default_params

    def model_params(p) -> None:
        p.use_extra_bufts = False

    with patched_default_params(model_params, lambda p: None):
        return llama_cpp.Llama(path, **{**KW, **kw})


def _pool_llm(path: str) -> Llama:
    # routed experts in plain host buffers, as the VRAM tier loads them (no repacking)
    return Llama(path, routing=False, use_extra_bufts=False, **KW)


def _experts(pool: ExpertPool) -> list[tuple[int, int]]:
    return [(il, e) for il, g in enumerate(pool.layout.group_of_layer) if g >= 0 for e in range(SHAPE["n_expert"])]


def _churn(pool: ExpertPool, rng: np.random.Generator):
    """A ``between`` hook: evict two held experts, load others; copies may still run when the next step starts."""
    return churn_hook(pool, _experts(pool), rng)


@pytest.mark.parametrize("arch", ARCHS)
def test_identical_to_stock_under_any_residency(pool_models, arch):
    path = pool_models[arch]
    ref = _run(_stock_no_repack(path))
    llm = _pool_llm(path)
    rng = np.random.default_rng(1)
    n_all = len(_experts(ExpertPool(llm, [1], on_host=True)))  # every (layer, expert)
    for pattern in ("empty", "full", "partial", "changing"):
        pool = ExpertPool(llm, [n_all if pattern == "full" else 5], on_host=True)
        everything = _experts(pool)
        if pattern in ("full", "partial"):
            chosen = everything if pattern == "full" else [everything[i] for i in rng.choice(len(everything), 5, False)]
            for slot, (il, e) in enumerate(chosen):
                pool.load(il, e, slot)
            pool.fence(wait_loads=True)
        got = _run(llm, _churn(pool, rng) if pattern == "changing" else None)
        assert np.array_equal(got, ref), f"{arch}, {pattern} pool: max |diff| {np.abs(got - ref).max()}"
        if pattern != "empty":
            pool.fence(wait_loads=True)
            loads, nbytes = pool.counters()
            assert loads > 0 and nbytes == loads * pool.layout.slot_bytes[0], (pattern, loads, nbytes)
        pool.close()
    # the pool removed: stock again
    assert np.array_equal(_run(llm), ref)
    llm.close()


def test_quantised_experts(pool_models):
    """Q8_0 experts: pool slots keep the type (compared with the same placement without a pool)."""
    path = pool_models["q8_0"]
    llm = _pool_llm(path)
    ref = _run(llm)
    pool = ExpertPool(llm, [6], on_host=True)
    for s, (il, e) in enumerate(_experts(pool)[::4][:6]):
        pool.load(il, e, s)
    pool.fence(wait_loads=True)
    assert np.array_equal(_run(llm), ref)
    pool.close()
    llm.close()


class _IdsTap:
    """cb_eval that copies the pool's remapped ids (``spac_pool_ids-L`` / ``spac_full_ids-L``)."""

    def __init__(self) -> None:
        from spac_llamacpp.native.libs import ggml_base

        self.lib = ggml_base()
        self.lib.ggml_get_name.restype = ctypes.c_char_p
        self.lib.ggml_get_name.argtypes = [ctypes.c_void_p]
        self.lib.ggml_nbytes.restype = ctypes.c_size_t
        self.lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
        self.lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        self.seen: dict[str, np.ndarray] = {}

    def __call__(self, t: int, ask: bool, user_data: int) -> bool:
        name = (self.lib.ggml_get_name(t) or b"").decode()
        if not name.startswith(("spac_pool_ids-", "spac_full_ids-")):
            return False
        if ask:
            return True
        buf = np.empty(self.lib.ggml_nbytes(t) // 4, dtype=np.int32)
        self.lib.ggml_backend_tensor_get(t, buf.ctypes.data, 0, buf.nbytes)
        self.seen[name] = buf
        return True


def test_ids_are_remapped_to_slots(pool_models):
    path = pool_models["qwen3moe"]
    tap = _IdsTap()
    llm = Llama(path, use_extra_bufts=False, cb_eval=tap, routing_history=None, **KW)
    llm.routing.keep_ids = True
    pool = ExpertPool(llm, [12], on_host=True)
    prompt, rest = _continuation(llm)
    llm.eval(prompt)
    # every expert of layer 1 resident, half of layer 0's, none of layer 2's
    for s, (il, e) in enumerate([(1, e) for e in range(8)] + [(0, e) for e in range(4)]):
        pool.load(il, e, s)
    pool.fence(wait_loads=True)
    tap.seen.clear()
    llm.eval([rest[0]])
    ids = llm.routing.steps[-1].ids[0]  # [n_layer, k] of the decoded token
    for il in range(SHAPE["n_layer"]):
        pool_ids, full_ids = tap.seen[f"spac_pool_ids-{il}"], tap.seen[f"spac_full_ids-{il}"]
        for j, e in enumerate(ids[il]):
            slot = pool.slot_of(il, int(e))
            assert (pool_ids[j] >= 0) != (full_ids[j] >= 0)  # exactly one path computes each selection
            if slot >= 0:
                assert pool_ids[j] == slot and pool.slot(0, slot) == (RESIDENT, il, int(e))
            else:
                assert full_ids[j] == e
    assert (tap.seen["spac_pool_ids-1"] >= 0).all() and (tap.seen["spac_full_ids-2"] >= 0).all()
    pool.close()
    llm.close()


def test_slot_states_fence_and_errors(pool_models):
    llm = _pool_llm(pool_models["qwen3moe"])
    pool = ExpertPool(llm, [3], on_host=True)
    assert pool.slot(0, 0) == (FREE, -1, -1)
    pool.load(0, 5, 0)
    assert pool.slot(0, 0)[0] in (LOADING, READY)
    pool.fence(wait_loads=True)
    assert pool.slot(0, 0) == (READY, 0, 5)
    _run(llm)
    assert pool.slot(0, 0) == (RESIDENT, 0, 5)  # an evaluation made it visible
    with pytest.raises(PoolError) as exc:
        pool.load(0, 5, 1)
    assert exc.value.code == E_RESIDENT
    with pytest.raises(PoolError) as exc:
        pool.load(0, 6, 0)
    assert exc.value.code == E_BUSY
    assert pool.evict(0, 5) and not pool.evict(0, 5)
    assert pool.slot(0, 0)[0] == RETIRED
    with pytest.raises(PoolError) as exc:
        pool.load(0, 6, 0)  # not before a fence: an evaluation in flight may still read it
    assert exc.value.code == E_BUSY
    assert pool.fence() == 1 and pool.slot(0, 0)[0] == FREE
    pool.load(0, 6, 0)
    for bad in ((99, 0, 1), (0, 99, 1), (0, 1, 3), (-1, 0, 1)):
        with pytest.raises(PoolError) as exc:
            pool.load(*bad)
        assert exc.value.code == E_ARG and "\n" not in str(exc.value)
    with pytest.raises(SpacError, match="entries"):
        ExpertPool(llm, [1, 1], on_host=True)
    with pytest.raises(PoolError, match="out of range"):
        ExpertPool(llm, [10_000], on_host=True)
    pool.close()
    llm.close()


def test_repacked_experts_copy_from_the_file(tmp_path, capfd):
    """Experts repacked for the CPU kernels (llama.cpp's default) are no longer in ggml's layout: the pool
    copies them from the GGUF file instead; without that source a load is refused."""
    # the other matrices F32: no CPU extra buffer takes them (AMX takes some F16 ones), so repacking on or off
    # changes the experts' kernels only
    path = str(write_tiny_moe(tmp_path / "q4.gguf", "qwen3moe", dtype="q4_0", f32_pattern=r"^(?!.*_exps\.weight$)",
                              **SHAPE))
    ref = _run(llama_cpp.Llama(path, **KW))  # stock, repacking on
    llm = Llama(path, routing=False, **{**KW, "verbose": True})
    if "CPU_REPACK model buffer" not in capfd.readouterr().err:
        llm.close()
        pytest.skip("this CPU does not repack Q4_0")
    n_all = SHAPE["n_layer"] * SHAPE["n_expert"]
    pool = ExpertPool(llm, [n_all], on_host=True)
    with pytest.raises(PoolError) as exc:
        pool.load(0, 1, 0)
    assert exc.value.code == E_UNSUPPORTED and "\n" not in str(exc.value)
    assert "ffn_gate_exps.weight is repacked (CPU_REPACK) and has no copy source" in capfd.readouterr().err
    assert np.array_equal(_run(llm), ref)  # every expert on the (repacked) full-tensor path: stock exactly
    pool.set_sources_from_file(read_model_header(path))
    for s, (il, e) in enumerate((il, e) for il in range(SHAPE["n_layer"]) for e in range(SHAPE["n_expert"])):
        pool.load(il, e, s)
    pool.fence(wait_loads=True)
    # every expert now runs from the pool, i.e. the plain (not repacked) kernel on the file's bytes:
    # exactly what stock computes with repacking off. Same kernels on both sides, on any CPU.
    plain = _run(_stock_no_repack(path))
    assert np.array_equal(_run(llm), plain)
    pool.close()
    llm.close()


@pytest.mark.parametrize("arch", ("qwen3moe", "deepseek2", "gpt-oss", "qwen2moe"))
def test_vram_tier_greedy_identical(pool_models, arch):
    path = pool_models[arch]
    kw = {k: v for k, v in KW.items() if k != "logits_all"}
    stock = llama_cpp.Llama(path, **kw)
    want = _greedy(stock, 24)
    llm = Llama(path, tier="vram", vram_budget="1GiB",
                vram_options={"on_host": True, "slots": [4], "replan_every": 1, "background": False}, **kw)
    assert _greedy(llm, 24) == want
    st = llm.stats(settle=1.0)  # copies may all land after the run on a busy machine: let them finish
    assert st["tier"] == "vram" and st["slots"] == [4] and st["loads"] > 0 and st["copies_done"] > 0
    llm.vram.pool.fence(wait_loads=True)
    # the same continuation again, now on a filled pool: still stock's tokens, and the planned (hottest)
    # experts serve some of the repeated routing, whatever the timing of the first run's copies
    assert _greedy(llm, 24) == want
    st = llm.stats(settle=1.0)
    assert st["hit_rate"] is not None and 0.0 < st["hit_rate"] <= 1.0
    assert st["resident_experts"] <= 4
    llm.close()


def _greedy(llm: llama_cpp.Llama, n: int) -> list[int]:
    return greedy_continuation(llm, PROMPT, n)


def test_vram_budget_sizes_the_pool(pool_models):
    path = pool_models["qwen3moe"]
    llm = Llama(path, tier="vram", vram_budget="1GiB", vram_options={"on_host": True, "compute_reserve": 0},
                n_ctx=128, verbose=False)
    st = llm.stats()
    every = SHAPE["n_layer"] * SHAPE["n_expert"]
    assert st["slots"] == [every]  # 1 GiB holds all of a tiny model
    llm.close()
    # a budget for the fixed part plus 5 slots
    probe = Llama(path, tier="vram", vram_budget="1GiB", vram_options={"on_host": True}, n_ctx=128, verbose=False)
    fixed, slot = probe.stats()["fixed_bytes"], probe.vram.pool_layout.slot_bytes[0]
    probe.close()
    llm = Llama(path, tier="vram", vram_budget=fixed + 5 * slot + slot // 2, vram_options={"on_host": True},
                n_ctx=128, verbose=False)
    assert llm.stats()["slots"] == [5]
    llm.close()
    with pytest.raises(SpacError) as exc:
        Llama(path, tier="vram", vram_budget=fixed + slot // 2, vram_options={"on_host": True}, n_ctx=128,
              verbose=False)
    msg = str(exc.value)
    assert "too small" in msg and "non-expert weights" in msg and "\n" not in msg


def test_bad_vram_arguments(pool_models, tiny_dense_model):
    path = pool_models["qwen3moe"]
    cases = [
        ({"tier": "vram"}, "needs vram_budget"),
        ({"tier": "vram", "budget": "1GiB"}, "vram_budget"),
        ({"vram_budget": "1GiB"}, "needs tier='vram'"),
        ({"tier": "flash", "budget": "1GiB", "vram_budget": "1GiB"}, "belongs to tier='vram'"),
        ({"tier": "vram", "vram_budget": "1GiB", "routing": False}, "routing=True"),
        ({"tier": "gpu"}, "unknown tier"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(SpacError, match=needle.replace("(", r"\(")) as exc:
            Llama(path, n_ctx=64, verbose=False, **kwargs)
        assert "\n" not in str(exc.value)
    with pytest.raises(NotMoEError):
        Llama(str(tiny_dense_model), tier="vram", vram_budget="1GiB", n_ctx=64, verbose=False)


def test_no_gpu_is_a_clear_error(pool_models):
    from spac_llamacpp.native.libs import device_names

    if any(not n.startswith("CPU") for n in device_names()):
        pytest.skip("a GPU backend is present")
    with pytest.raises(SpacError, match="found no GPU") as exc:
        Llama(pool_models["qwen3moe"], tier="vram", vram_budget="1GiB", n_ctx=64, verbose=False)
    assert "on_host" in str(exc.value) and "\n" not in str(exc.value)


def test_unpatched_library_is_a_clear_error(pool_models, monkeypatch):
    import spac_llamacpp.native.libs as libs

    monkeypatch.setattr(libs, "spac_patch_level", lambda: 1)
    with pytest.raises(SpacError, match="build_llama.sh"):
        Llama(pool_models["qwen3moe"], tier="vram", vram_budget="1GiB", n_ctx=64, verbose=False)


def test_spac_run_vram_cli(pool_models):
    import json

    path = pool_models["qwen3moe"]
    exe = os.path.join(os.path.dirname(sys.executable), "spac-run")
    proc = subprocess.run([exe, path, "-n", "8", "--tier", "vram", "--vram-budget", "1GiB", "--pool-on-host",
                           "--stats", "json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stderr.strip().splitlines()[-1])["vram"]
    assert st["tier"] == "vram" and st["pool_on_host"] and st["vram_budget_bytes"] == 1 << 30
    assert st["copies_done"] > 0
    text = subprocess.run([exe, path, "-n", "4", "--tier", "vram", "--vram-budget", "1GiB", "--pool-on-host",
                           "--stats"], capture_output=True, text=True, timeout=300)
    assert text.returncode == 0 and "vram tier: expert pool" in text.stderr and "pool hit rate" in text.stderr
    # --tier auto (the default): an explicit --vram-budget means the vram tier, which has no GPU here
    for args, needle in ((["--tier", "vram"], "--vram-budget"), (["--vram-budget", "1GiB"], "--pool-on-host"),
                         (["--tier", "vram", "--vram-budget", "1KiB", "--pool-on-host"], "too small")):
        bad = subprocess.run([exe, path, *args], capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and needle in bad.stderr, bad.stderr


def test_cache_prior_follows_the_pool(pool_models):
    """Cache-aware routing (opt-in) biases toward the experts the pool holds."""
    llm = Llama(pool_models["qwen3moe"], tier="vram", vram_budget="1GiB", cache_prior=0.3, n_ctx=128, verbose=False,
                vram_options={"on_host": True, "slots": [6], "background": False, "replan_every": 1})
    _greedy(llm, 16)
    st = llm.stats()
    assert st["cache_prior"]["miss_rate"] is not None and st["planned_experts"] > 0
    assert np.array_equal(llm.cache_prior.resident[llm.vram.rows].astype(bool), llm.vram.wanted)
    llm.close()


def test_warm_start_from_a_profile(pool_models):
    """A saved profile fills the pool before the first token (hot experts first). A long amortisation
    horizon: with experts this small the GPU saves less than a copy costs over the default one."""
    from spac_llamacpp.observe.profile import Profile

    layers = (0, 1, 2)
    counts = np.zeros((3, SHAPE["n_expert"]), dtype=np.int64)
    counts[:, 5] = 100  # expert 5 is hot in every layer
    prof = Profile(layers, SHAPE["n_expert"], counts, None, 100, 10, "")
    llm = Llama(pool_models["qwen3moe"], tier="vram", vram_budget="1GiB", n_ctx=128, verbose=False,
                vram_options={"on_host": True, "slots": [3], "profile": prof, "horizon": 1e6})
    assert llm.vram.wanted[:, 5].all() and llm.stats(settle=True)["copies_done"] == 3
    assert all(llm.vram.pool.slot_of(il, 5) >= 0 for il in layers)
    llm.close()


def test_layers_with_different_expert_types_form_groups(tmp_path):
    """A file whose layer 1 keeps F16 down projections (others Q8_0): two groups with their own slots."""
    path = str(write_tiny_moe(tmp_path / "mixed.gguf", "qwen3moe", dtype="q8_0", f16_pattern=r"^blk\.1\.ffn_down_exps",
                              **SHAPE))
    ref = _run(_stock_no_repack(path))
    llm = _pool_llm(path)
    layout = PoolLayout.of(llm.model)
    assert layout.group_of_layer == (0, 1, 0) and layout.slot_bytes[1] > layout.slot_bytes[0]
    pool = ExpertPool(llm, [3, 2], on_host=True)
    for s, e in enumerate((1, 4, 6)):
        pool.load(0 if s < 2 else 2, e, s)
    pool.load(1, 3, 0)
    pool.load(1, 5, 1)
    with pytest.raises(PoolError) as exc:
        pool.load(1, 6, 2)  # group 1 has two slots
    assert exc.value.code == E_ARG
    pool.fence(wait_loads=True)
    assert pool.slot(1, 1) == (READY, 1, 5) and pool.slot(0, 2) == (READY, 2, 6)
    assert np.array_equal(_run(llm), ref)
    assert pool.counters()[1] == 3 * layout.slot_bytes[0] + 2 * layout.slot_bytes[1]
    pool.close()
    llm.close()

    kw = {k: v for k, v in KW.items() if k != "logits_all"}
    want = _greedy(llama_cpp.Llama(path, **kw), 16)
    tier = Llama(path, tier="vram", vram_budget="1GiB", **kw,
                 vram_options={"on_host": True, "compute_reserve": 0, "background": False, "replan_every": 1})
    assert len(tier.stats()["slots"]) == 2 and _greedy(tier, 16) == want
    for g, n in enumerate(tier.vram.n_slots):
        assert int(tier.vram.wanted[tier.vram.group_of_row == g].sum()) <= n
    tier.close()


def test_a_closed_model_is_an_error_not_a_crash(pool_models):
    llm = _pool_llm(pool_models["qwen3moe"])
    pool = ExpertPool(llm, [2], on_host=True)
    pool.load(0, 1, 0)  # a copy may still be queued when the context goes
    llm.close()
    for call in (lambda: pool.load(0, 2, 1), lambda: pool.evict(0, 1), lambda: pool.fence(), lambda: pool.slot(0, 0)):
        with pytest.raises(SpacError, match="closed"):
            call()
    pool.close()  # harmless
    tier = Llama(pool_models["qwen3moe"], tier="vram", vram_budget="1GiB", n_ctx=64, verbose=False,
                 vram_options={"on_host": True})
    tier.close()
    with pytest.raises(SpacError, match="closed"):
        tier.eval([1, 2])
    with pytest.raises(SpacError, match="closed"):
        tier.vram.pool.load(0, 0, 0)


def test_empty_evaluation_with_a_pool(pool_models):
    llm = _pool_llm(pool_models["qwen3moe"])
    pool = ExpertPool(llm, [2], on_host=True)
    llm.eval([])  # nothing to evaluate: llama-cpp-python returns at once
    assert llm.n_tokens == 0
    ref = _run(_stock_no_repack(pool_models["qwen3moe"]))
    assert np.array_equal(_run(llm), ref)
    pool.close()
    llm.close()
