"""Checks that run against a real non-host ggml device: llama.cpp's RPC backend (``rpc-server`` on 127.0.0.1).

Run by ``tests/test_rpc.py``, each check in a fresh interpreter::

    python tests/_rpc_checks.py CHECK '{"endpoint": "127.0.0.1:PORT", "models": {...}}'

An RPC registration lasts for the whole process (ggml cannot unregister a backend), and every later
model load with ``n_gpu_layers`` would then use the server: so none of this runs inside pytest's own
process. The last stdout line is a JSON report; any failed assertion exits non-zero.

The server computes with the CPU backend of the same patched build, so everything that runs there uses
the kernels the host would have used: results must match stock llama-cpp-python with the same placement
bit for bit, whatever the pool holds.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np

PROMPT = "The quick brown fox jumps over the lazy dog"
KW = {"n_ctx": 128, "n_batch": 32, "seed": 0, "verbose": False}
EXPS = r"\.ffn_(gate|up|down|gate_up)_exps\.weight$"


def _stock(path: str, *, experts_on_cpu: bool, **kw: Any):
    """Stock llama-cpp-python, every layer offloaded (to the RPC device), optionally the routed experts
    on the host CPU (the VRAM tier's placement), CPU weight repacking off (plain kernels everywhere)."""
    import llama_cpp

    from spac_llamacpp.native.params import TensorBuftOverrides, patched_default_params

    overrides = TensorBuftOverrides([(EXPS, "CPU")]) if experts_on_cpu else None

    def model_params(p) -> None:
        p.use_extra_bufts = False
        if overrides is not None:
            p.tensor_buft_overrides = overrides.address

    with patched_default_params(model_params, lambda p: None):
        llm = llama_cpp.Llama(path, **{**KW, "n_gpu_layers": -1, **kw})
    llm._spac_keep = overrides  # the override array must outlive the load
    return llm


def _tokens(llm) -> tuple[list[int], list[int]]:
    prompt = llm.tokenize(PROMPT.encode())
    return prompt[:6], prompt[6:] + prompt[:4]


def _logits(llm, between=None) -> np.ndarray:
    """Teacher-forced logits: a prompt step, then one-token steps (``between(i)`` before each)."""
    prompt, rest = _tokens(llm)
    llm.reset()
    llm.eval(prompt)
    for i, tok in enumerate(rest):
        if between is not None:
            between(i)
        llm.eval([tok])
    return np.array(llm.scores[: llm.n_tokens])


def _greedy(llm, n: int = 24) -> list[int]:
    from spac_llamacpp.tools.generate import greedy_continuation

    return greedy_continuation(llm, PROMPT, n)


def check_devices(cfg: dict) -> dict:
    from spac_llamacpp.native.libs import device_names
    from spac_llamacpp.native.rpc import add_rpc_servers, rpc_supported

    assert rpc_supported()
    names = add_rpc_servers(cfg["endpoint"])
    assert names == ["RPC0"], names
    assert add_rpc_servers([cfg["endpoint"]]) == names  # idempotent: no second registration
    assert device_names().count("RPC0") == 1, device_names()
    return {"devices": device_names()}


def check_layers(cfg: dict) -> dict:
    """spac_llamacpp.Llama with every layer on the RPC device: greedy tokens and logits equal to stock with
    the same placement; the routing sensor reads the router's top-k from the device's buffers."""
    from spac_llamacpp import Llama
    from spac_llamacpp.native.rpc import add_rpc_servers

    add_rpc_servers(cfg["endpoint"])
    out = {}
    for arch, path in cfg["models"].items():
        stock = _stock(path, experts_on_cpu=False, logits_all=True, verbose=True)
        want_tokens, want = _greedy(stock), _logits(stock)
        stock.close()
        llm = Llama(path, n_gpu_layers=-1, use_extra_bufts=False, logits_all=True, **KW)
        got = _logits(llm)
        assert np.array_equal(got, want), f"{arch}: logits differ, max |diff| {np.abs(got - want).max()}"
        r = llm.routing
        n_tok = llm.n_tokens
        k = int(r.counts.sum(axis=1).max()) // max(n_tok, 1)
        assert k >= 1 and (r.counts.sum(axis=1)[r.counts.sum(axis=1) > 0] == n_tok * k).all(), r.counts.sum(axis=1)
        assert _greedy(llm) == want_tokens, arch
        out[arch] = {"tokens": len(want_tokens), "routed": int(r.counts.sum())}
        llm.close()
    return out


def check_pool(cfg: dict) -> dict:
    """The expert pool in the RPC device's memory (a real non-host buffer: copies through a backend of the
    pool's own, fences, id maps): logits equal to stock with the same placement under any residency."""
    from _pool_churn import churn_hook  # tests/ is sys.path[0]: this file runs as a script

    from spac_llamacpp import Llama
    from spac_llamacpp.native.expert_pool import READY, RESIDENT, ExpertPool
    from spac_llamacpp.native.rpc import add_rpc_servers

    add_rpc_servers(cfg["endpoint"])
    rng = np.random.default_rng(1)
    out = {}
    for arch, path in cfg["models"].items():
        stock = _stock(path, experts_on_cpu=True, logits_all=True)
        ref = _logits(stock)
        stock.close()
        llm = Llama(path, n_gpu_layers=-1, use_extra_bufts=False, routing=False, logits_all=True,
                    tensor_buft_overrides={EXPS: "CPU"}, **KW)
        probe = ExpertPool(llm, [1])
        assert not probe.on_host
        everything = [(il, e) for il, g in enumerate(probe.layout.group_of_layer) if g >= 0
                      for e in range(int(cfg["n_expert"]))]
        probe.close()
        report = {}
        for pattern in ("empty", "full", "partial", "changing"):
            pool = ExpertPool(llm, [len(everything) if pattern == "full" else 5])
            if pattern in ("full", "partial"):
                chosen = everything if pattern == "full" else [everything[i] for i in
                                                              rng.choice(len(everything), 5, replace=False)]
                for s, (il, e) in enumerate(chosen):
                    pool.load(il, e, s)
                pool.fence(wait_loads=True)
                assert all(pool.slot(0, s)[0] == READY for s in range(len(chosen)))
            churn = churn_hook(pool, everything, rng)
            got = _logits(llm, churn if pattern == "changing" else None)
            assert np.array_equal(got, ref), f"{arch}, {pattern} pool on RPC0: max |diff| {np.abs(got - ref).max()}"
            pool.fence(wait_loads=True)
            loads, nbytes = pool.counters()
            if pattern != "empty":
                assert loads > 0 and nbytes == loads * pool.layout.slot_bytes[0], (pattern, loads, nbytes)
            if pattern in ("full", "partial"):
                assert all(pool.slot(0, s)[0] == RESIDENT for s in range(5))
            report[pattern] = {"copies": loads, "bytes": nbytes}
            pool.close()
        assert np.array_equal(_logits(llm), ref)  # the pool removed
        llm.close()
        out[arch] = report
    return out


def check_tier(cfg: dict) -> dict:
    """Llama(tier="vram") with no on_host: llama.cpp's RPC device is the GPU it finds. Greedy output equal to
    stock with the same placement; the pool really lives there and copies run."""
    from spac_llamacpp import Llama
    from spac_llamacpp.native.rpc import add_rpc_servers

    add_rpc_servers(cfg["endpoint"])
    out = {}
    for arch, path in cfg["models"].items():
        stock = _stock(path, experts_on_cpu=True)
        want = _greedy(stock)
        stock.close()
        llm = Llama(path, tier="vram", vram_budget="1GiB", use_extra_bufts=False, **KW,
                    vram_options={"slots": [4], "replan_every": 1, "background": False})
        got = _greedy(llm)
        st = llm.stats(settle=1.0)
        assert got == want, f"{arch}: {got} != {want}"
        assert st["tier"] == "vram" and not st["pool_on_host"] and st["slots"] == [4]
        assert st["copies_done"] > 0 and st["hit_rate"] is not None and 0.0 < st["hit_rate"] <= 1.0, st
        out[arch] = {k: st[k] for k in ("hit_rate", "copies_done", "bytes_copied", "pool_bytes")}
        llm.close()
    return out


CHECKS = {"devices": check_devices, "layers": check_layers, "pool": check_pool, "tier": check_tier}

if __name__ == "__main__":
    result = CHECKS[sys.argv[1]](json.loads(sys.argv[2]))
    print(json.dumps(result))
