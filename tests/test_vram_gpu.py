"""The expert pool and the VRAM tier with the pool in GPU memory (a CUDA build of the patched llama.cpp).

Run by ``scripts/gpu_check.sh`` on a machine with an NVIDIA GPU (``SPAC_REQUIRE_GPU=1`` there turns the
skip into a failure); skipped elsewhere. What can be exact is checked exactly:

* an empty pool on the GPU: every expert comes from the CPU full tensors and the pool's ``MUL_MAT_ID``
  (all ids skipped: patch 0002's CUDA paths) must add exact zeros, so the logits equal stock
  llama-cpp-python's with the same placement bit for bit, for decode steps (mmvq/mmvf) and a prompt
  batch (mmq/mmf with ``mm_ids_helper``);
* with experts in the pool, those experts are computed by the GPU's kernels instead of the CPU's, which
  round differently: the logits must stay within a small tolerance of stock's (teacher-forced, so a
  near-tie cannot cascade; the median token and three quarters of them, as a router near-tie may flip
  one token's expert), under a full, a partial and a changing pool. The measured differences are
  recorded (``record_property``: in gpu_check.sh's JUnit XML and JSON).

``SPAC_SYNTH_MODEL=FILE`` adds the same tier check on a real-shape model (``spac synth``).
"""

from __future__ import annotations

import os

import llama_cpp
import numpy as np
import pytest

from spac_llamacpp import Llama, patched_llama_available
from spac_llamacpp.models.factory import write_tiny_moe
from spac_llamacpp.native.libs import device_names

REQUIRED = bool(os.environ.get("SPAC_REQUIRE_GPU"))


def _why_not() -> str | None:
    if not patched_llama_available(3):
        return "the installed llama.cpp lacks spac's patches (scripts/build_llama.sh --cuda)"
    if not any(n.startswith("CUDA") for n in device_names()):
        return "no CUDA device (a CUDA build of the patched llama.cpp on a machine with an NVIDIA GPU)"
    return None


_REASON = _why_not()
pytestmark = pytest.mark.skipif(_REASON is not None and not REQUIRED, reason=_REASON or "")

SHAPE = {"n_layer": 3, "n_embd": 64, "n_expert": 8, "n_expert_used": 2, "n_ff_exp": 64}
ARCHS = ("qwen3moe", "gpt-oss", "deepseek2", "qwen2moe")
KW = {"n_ctx": 256, "n_batch": 64, "seed": 0, "verbose": False, "logits_all": True}
EXPS = r"\.ffn_(gate|up|down|gate_up)_exps\.weight$"
PROMPT = ("The quick brown fox jumps over the lazy dog while the five boxing wizards jump quickly and "
          "a wizard's job is to vex chumps quickly in fog")
# GPU vs CPU kernels: max |diff| of the logits within this share of their standard deviation
TOLERANCE = 0.05


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if _REASON is not None:
        pytest.fail(f"SPAC_REQUIRE_GPU=1, but {_REASON}")
    root = tmp_path_factory.mktemp("gpu_models")
    out = {a: str(write_tiny_moe(root / f"{a}.gguf", a, **SHAPE)) for a in ARCHS}
    out["q8_0"] = str(write_tiny_moe(root / "q8.gguf", "qwen3moe", dtype="q8_0", **SHAPE))
    out["q4_0"] = str(write_tiny_moe(root / "q4.gguf", "qwen3moe", dtype="q4_0", **SHAPE))
    return out


def _stock(path: str, *, experts_on_cpu: bool = True, repack: bool = False, **kw) -> llama_cpp.Llama:
    """Stock llama-cpp-python, every layer on the GPU, routed experts on the CPU (the tier's placement)."""
    from spac_llamacpp.native.params import TensorBuftOverrides, patched_default_params

    overrides = TensorBuftOverrides([(EXPS, "CPU")]) if experts_on_cpu else None

    def model_params(p) -> None:
        p.use_extra_bufts = repack
        if overrides is not None:
            p.tensor_buft_overrides = overrides.address

    with patched_default_params(model_params, lambda p: None):
        llm = llama_cpp.Llama(path, **{**KW, "n_gpu_layers": -1, **kw})
    llm._spac_keep = overrides
    return llm


def _pool_llm(path: str) -> Llama:
    return Llama(path, n_gpu_layers=-1, use_extra_bufts=False, routing=False, tensor_buft_overrides={EXPS: "CPU"},
                 **KW)


def _logits(llm, between=None, long_prompt: bool = True) -> np.ndarray:
    """A prompt batch (about 30 tokens: the batched kernels), then one-token steps (the vector kernels)."""
    toks = llm.tokenize(PROMPT.encode())
    n_prompt = len(toks) - 8 if long_prompt else 6
    llm.reset()
    llm.eval(toks[:n_prompt])
    for i, tok in enumerate(toks[n_prompt:]):
        if between is not None:
            between(i)
        llm.eval([tok])
    return np.array(llm.scores[: llm.n_tokens])


def _experts(pool) -> list[tuple[int, int]]:
    return [(il, e) for il, g in enumerate(pool.layout.group_of_layer) if g >= 0 for e in range(SHAPE["n_expert"])]


def _assert_close(got: np.ndarray, ref: np.ndarray, what: str, record) -> None:
    """GPU kernels against CPU ones, per token (a row of logits): ``max |diff| / std(ref logits)``. A near-tie
    of the router can flip one expert of one token (a large difference in that row only), so the check is on
    most tokens: the median row and three quarters of the rows within ``TOLERANCE``. A wrong slot, a wrong
    expert or unzeroed rows move nearly every row."""
    assert got.shape == ref.shape and np.isfinite(got).all(), f"{what}: non-finite logits"
    rel = np.abs(got - ref).max(axis=1) / max(float(ref.std()), 1e-12)
    key = what.replace(" ", "_").replace(",", "").replace("=", "")
    within = float((rel <= TOLERANCE).mean())
    record(f"{key}_max", float(rel.max()))
    record(f"{key}_median", float(np.median(rel)))
    record(f"{key}_rows_within", within)
    record(f"{key}_argmax_agree", float((got.argmax(axis=1) == ref.argmax(axis=1)).mean()))
    assert np.median(rel) <= TOLERANCE and within >= 0.75, (
        f"{what}: per-token max |diff| / std: median {np.median(rel):.4f}, max {rel.max():.4f}, "
        f"{100 * within:.0f}% of tokens within {TOLERANCE}")


@pytest.mark.parametrize("arch", [*ARCHS, "q8_0", "q4_0"])
def test_empty_pool_on_the_gpu_is_exact(models, arch, record_property):
    from spac_llamacpp.native.expert_pool import ExpertPool

    path = models[arch]
    ref = _logits(_stock(path))
    llm = _pool_llm(path)
    pool = ExpertPool(llm, [5])
    assert not pool.on_host
    got = _logits(llm)
    record_property("max_abs_diff", float(np.abs(got - ref).max()))
    assert np.array_equal(got, ref), f"{arch}: an empty GPU pool changed the logits (max |diff| " \
                                     f"{np.abs(got - ref).max()}): skipped ids on CUDA must add exact zeros"
    pool.close()
    llm.close()


@pytest.mark.parametrize("arch", [*ARCHS, "q8_0", "q4_0"])
def test_pool_content_on_the_gpu_within_rounding(models, arch, record_property):
    from spac_llamacpp.native.expert_pool import FREE, RESIDENT, ExpertPool

    path = models[arch]
    ref = _logits(_stock(path))
    gpu_all = _logits(_stock(path, experts_on_cpu=False))  # every expert on the GPU: the pool's kernels
    llm = _pool_llm(path)
    n_all = len(_experts(ExpertPool(llm, [1])))
    rng = np.random.default_rng(1)
    for pattern in ("full", "partial", "changing"):
        pool = ExpertPool(llm, [n_all if pattern == "full" else 5])
        everything = _experts(pool)
        held: list[tuple[int, int]] = []
        if pattern != "changing":
            chosen = everything if pattern == "full" else [everything[i] for i in rng.choice(n_all, 5, replace=False)]
            for s, (il, e) in enumerate(chosen):
                pool.load(il, e, s)
            pool.fence(wait_loads=True)

        def churn(step: int, pool=pool, held=held, everything=everything) -> None:
            for _ in range(min(2, len(held))):
                il, e = held.pop(int(rng.integers(len(held))))
                pool.evict(il, e)
            pool.fence()
            free = [s for s in range(pool.n_slots[0]) if pool.slot(0, s)[0] == FREE]
            for il, e in [everything[i] for i in rng.permutation(n_all)]:
                if not free or len(held) >= 4:
                    break
                if pool.slot_of(il, e) < 0:
                    pool.load(il, e, free.pop())
                    held.append((il, e))

        got = _logits(llm, churn if pattern == "changing" else None)
        _assert_close(got, ref, f"{arch} {pattern} pool vs stock exps=CPU", record_property)
        if pattern == "full":
            assert all(pool.slot(0, s)[0] == RESIDENT for s in range(n_all))
            # every expert from the pool: the GPU's own kernels, as stock with every expert on the GPU
            record_property("full_pool_vs_stock_all_gpu_exact", bool(np.array_equal(got, gpu_all)))
            _assert_close(got, gpu_all, f"{arch} full pool vs stock all-GPU", record_property)
        pool.fence(wait_loads=True)
        loads, nbytes = pool.counters()
        assert loads > 0 and nbytes == loads * pool.layout.slot_bytes[0]
        pool.close()
    assert np.array_equal(_logits(llm), ref)  # the pool removed: exact again
    llm.close()


def _tier_check(path: str, record, slots: list[int] | None = None, budget: str = "1GiB") -> None:
    opts = {"replan_every": 1, "background": False}
    if slots is not None:
        opts["slots"] = slots
    stock = _stock(path, repack=True)
    ref = _logits(stock)
    want = _greedy(stock)
    stock.close()
    llm = Llama(path, tier="vram", vram_budget=budget, **KW, vram_options=opts)  # CPU repacking as llama.cpp decides
    got = _logits(llm)
    _assert_close(got, ref, "tier vs stock exps=CPU", record)
    tokens = _greedy(llm)
    same = next((i for i, (a, b) in enumerate(zip(tokens, want, strict=False)) if a != b), len(want))
    record("greedy_tokens_equal_prefix", same)
    record("greedy_tokens", len(want))
    st = llm.stats(settle=2.0)
    for k in ("hit_rate", "copies_done", "bytes_copied", "pool_bytes", "slots"):
        record(k, st[k])
    assert st["tier"] == "vram" and not st["pool_on_host"] and st["copies_done"] > 0, st
    assert st["hit_rate"] is not None and st["hit_rate"] > 0.0, st
    llm.close()


def _greedy(llm, n: int = 24) -> list[int]:
    from spac_llamacpp.tools.generate import greedy_continuation

    return greedy_continuation(llm, PROMPT, n)


@pytest.mark.parametrize("arch", ["qwen3moe", "gpt-oss", "q4_0"])
def test_vram_tier_on_the_gpu(models, arch, record_property):
    _tier_check(models[arch], record_property, slots=[6])


def test_vram_tier_on_a_real_shape_model(record_property):
    path = os.environ.get("SPAC_SYNTH_MODEL")
    if not path:
        pytest.skip("SPAC_SYNTH_MODEL not set (scripts/gpu_check.sh sets it to a `spac synth` model)")
    if _REASON is not None:
        pytest.fail(_REASON)
    _tier_check(path, record_property, budget=os.environ.get("SPAC_SYNTH_BUDGET", "25%"))
