"""spac_llamacpp.Llama against llama_cpp.Llama on every factory architecture."""

from __future__ import annotations

import ctypes
import pickle

import llama_cpp
import numpy as np
import pytest

from spac_llamacpp import Llama
from spac_llamacpp.base.errors import GGUFError, SpacError
from spac_llamacpp.models.factory import ARCHITECTURES
from spac_llamacpp.native.params import patched_default_params
from spac_llamacpp.tools.generate import GenerationStats, stream_generate

PROMPT = "The cat sat on the mat and then"
N_GEN = 24
COMMON = {"n_ctx": 256, "verbose": False, "seed": 0, "n_threads": 2}


def greedy_tokens(llm: llama_cpp.Llama, prompt: str = PROMPT, n: int = N_GEN) -> list[int]:
    stats = GenerationStats()
    for _ in stream_generate(llm, prompt, n, temperature=0.0, stats=stats):
        pass
    return stats.token_ids


QUANT_ARCHS = ("llama", "qwen2moe", "deepseek2", "gpt-oss")


@pytest.mark.parametrize(
    ("arch", "dtype"), [(a, "f16") for a in ARCHITECTURES] + [(a, "q8_0") for a in QUANT_ARCHS]
)
def test_greedy_identical_to_stock(tiny_model, arch, dtype):
    path = str(tiny_model(arch, dtype))
    stock = llama_cpp.Llama(path, **COMMON)
    expected = greedy_tokens(stock)
    stock.close()
    assert len(expected) > 0

    spac = Llama(path, **COMMON)
    assert greedy_tokens(spac) == expected
    # the sensor saw every MoE layer of every evaluated token, and nothing out of range
    r = spac.routing
    assert r is not None and r.bad_ids == 0 and r.sensor.n_bad_events == 0
    assert r.n_tokens == len(spac.tokenize(PROMPT.encode())) + len(expected) - 1
    spac.close()

    # placement overrides reach llama.cpp and change nothing else: the reference is stock llama_cpp
    # with the same model params (no repacking selects other CPU kernels, so other rounding)
    def no_repack(p):
        p.use_extra_bufts = False

    with patched_default_params(model=no_repack):
        stock_no_repack = llama_cpp.Llama(path, **COMMON)
    expected = greedy_tokens(stock_no_repack)
    stock_no_repack.close()
    placed = Llama(path, tensor_buft_overrides={r"\.ffn_.*_exps": "CPU"}, use_extra_bufts=False, **COMMON)
    assert greedy_tokens(placed) == expected
    placed.close()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sensor_counts_layers_tokens_experts(tiny_model, arch):
    """With logits for every token, each MoE layer makes exactly tokens x experts-used selections."""
    path = str(tiny_model(arch))
    llm = Llama(path, logits_all=True, **COMMON)
    info = llm.moe_info
    n_prompt = len(llm.tokenize(PROMPT.encode()))
    out = greedy_tokens(llm, n=8)
    n_eval = n_prompt + len(out) - 1
    r = llm.routing
    assert r.n_tokens == n_eval
    for layer in range(info.block_count):
        k = info.n_expert_used[layer] if layer in info.moe_layers else 0
        assert r.counts[layer].sum() == n_eval * k, f"layer {layer}"
    # every step: its counts agree with its per-token ids, and one step per eval call
    assert r.n_steps == 1 + (len(out) - 1)
    assert r.steps[0].n_tokens == n_prompt and all(s.n_tokens == 1 for s in list(r.steps)[1:])
    for step in r.steps:
        for layer in info.moe_layers:
            ids = step.ids[:, layer, :]
            np.testing.assert_array_equal(np.bincount(ids[ids >= 0], minlength=info.n_expert), step.counts[layer])
    totals = r.history_counts().sum(axis=0)
    np.testing.assert_array_equal(totals, r.counts)
    llm.close()


def test_routing_is_deterministic_and_varied(tiny_model):
    path = str(tiny_model("qwen3moe"))
    a, b = Llama(path, **COMMON), Llama(path, **COMMON)
    greedy_tokens(a)
    greedy_tokens(b)
    np.testing.assert_array_equal(a.routing.counts, b.routing.counts)
    # routing is not degenerate: several experts are chosen in every MoE layer
    assert all((a.routing.counts[layer] > 0).sum() >= 3 for layer in a.moe_info.moe_layers)
    a.close()
    b.close()


def test_is_a_llama_cpp_llama_and_behaves_like_one(tiny_model):
    path = str(tiny_model("qwen2moe"))
    stock = llama_cpp.Llama(path, **COMMON)
    llm = Llama(path, **COMMON)
    assert isinstance(llm, llama_cpp.Llama)
    text = b"Hello world, tokens!"
    assert llm.tokenize(text) == stock.tokenize(text)
    assert llm.detokenize(llm.tokenize(text)) == stock.detokenize(stock.tokenize(text))

    kw = {"max_tokens": 12, "temperature": 0.0, "seed": 0}
    assert llm(PROMPT, **kw)["choices"][0]["text"] == stock(PROMPT, **kw)["choices"][0]["text"]
    streamed = "".join(c["choices"][0]["text"] for c in llm.create_completion(PROMPT, stream=True, **kw))
    assert streamed == stock(PROMPT, **kw)["choices"][0]["text"]

    msgs = [{"role": "user", "content": "Say something."}]
    got = llm.create_chat_completion(msgs, **kw)["choices"][0]["message"]["content"]
    assert got == stock.create_chat_completion(msgs, **kw)["choices"][0]["message"]["content"]
    assert llm.routing.n_steps > 0
    stock.close()
    llm.close()


def test_embeddings_match_stock(tiny_model):
    path = str(tiny_model("qwen3moe"))
    stock = llama_cpp.Llama(path, embedding=True, **COMMON)
    llm = Llama(path, embedding=True, **COMMON)
    np.testing.assert_allclose(llm.embed("a short text"), stock.embed("a short text"), rtol=1e-5, atol=1e-6)
    stock.close()
    llm.close()


def test_user_cb_eval_is_chained(tiny_model):
    seen: list[bool] = []

    def user_cb(t, ask, data):
        seen.append(ask)
        return False

    path = str(tiny_model("olmoe"))
    llm = Llama(path, cb_eval=user_cb, **COMMON)
    out = greedy_tokens(llm, n=4)
    assert seen and all(seen)  # asked about nodes, never asked to observe one
    assert llm.routing.n_tokens > 0 and len(out) == 4
    llm.close()

    # without the sensor the user's callback is still installed
    seen.clear()
    llm = Llama(path, cb_eval=user_cb, routing=False, **COMMON)
    greedy_tokens(llm, n=2)
    assert seen and llm.routing is None
    llm.close()


def test_tensor_overrides_reach_the_loader(tiny_model, capfd):
    path = str(tiny_model("llama", "q8_0"))
    llm = Llama(path, tensor_buft_overrides=r"\.ffn_up_exps=CPU", use_extra_bufts=False,
                **{**COMMON, "verbose": True})
    err = capfd.readouterr().err
    assert "blk.0.ffn_up_exps.weight" in err and "overridden" in err
    assert "repack" not in err  # use_extra_bufts=False keeps the experts file-backed
    llm.close()


@pytest.mark.parametrize("spec", ["nodevice", r"\.ffn=NOSUCHDEVICE", "([=CPU"])
def test_bad_overrides_are_one_line_errors(tiny_model, spec):
    with pytest.raises(SpacError) as exc:
        Llama(str(tiny_model("llama")), tensor_buft_overrides=spec, **COMMON)
    assert "\n" not in str(exc.value)


def test_closed_model_raises_instead_of_crashing(tiny_model):
    llm = Llama(str(tiny_model("qwen3moe")), **COMMON)
    greedy_tokens(llm, n=2)
    llm.close()
    with pytest.raises(SpacError):
        llm.eval([1, 2])
    assert llm.routing.n_tokens > 0  # what was observed stays readable


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(GGUFError):
        Llama(str(tmp_path / "nope.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(GGUFError) as exc:
        Llama(str(bad))
    assert isinstance(exc.value, ValueError)  # as llama_cpp raises for unloadable files


def test_dense_model_runs_without_sensor(tiny_dense_model):
    llm = Llama(str(tiny_dense_model), **COMMON)
    stock = llama_cpp.Llama(str(tiny_dense_model), **COMMON)
    assert llm.routing is None
    assert greedy_tokens(llm, n=8) == greedy_tokens(stock, n=8)
    llm.close()
    stock.close()


def test_pickle_state_keeps_plugin_options(tiny_model):
    llm = Llama(str(tiny_model("qwen3moe")), use_extra_bufts=False, routing_history=7, **COMMON)
    state = llm.__getstate__()
    assert state["use_extra_bufts"] is False and state["routing_history"] == 7
    clone = pickle.loads(pickle.dumps(llm))
    assert isinstance(clone, Llama) and clone.routing.steps.maxlen == 7
    llm.close()
    clone.close()


def test_c_function_pointer_callback(tiny_model):
    """A cb_eval given as a ctypes function object (as llama_cpp code would pass it) is chained."""
    hits = []
    cfunc = llama_cpp.llama_cpp.ggml_backend_sched_eval_callback(lambda t, ask, d: hits.append(1) or False)
    llm = Llama(str(tiny_model("qwen3moe")), cb_eval=cfunc, **COMMON)
    greedy_tokens(llm, n=2)
    assert hits and ctypes.cast(cfunc, ctypes.c_void_p).value
    llm.close()
