"""The native flash engine: its in-use protocol under concurrency (native/spac_engine.h), its errors.

One thread plays the decoding thread: it reports layers' selected experts to the engine as the
routing sensor does (``spac_engine_on_layer``), then, standing in for the expert matmuls, checks
with ``mincore`` that every selected expert is still wholly resident, and releases them (the next
layer, ``end_step``). With asynchronous demand loads (the default) the hook returns before the misses
have landed, so the stand-in first reads a byte of every page of the selected experts, as the matmul
does (its page faults wait for reads in flight), and checks after that. Meanwhile another thread
floods the engine's workers with evictions (and some prefetches) of random experts, the selected
ones included. An expert reported in use must never be evicted before its release: not after it was
counted a hit, not while its misses were read back.

Before the fix, the hook set in-use without the engine's lock, after a worker could already have
decided to evict: this test then found selected experts gone (tens of them per run; see the
commit message of the fix).
"""

from __future__ import annotations

import mmap
import os
import threading

import numpy as np
import pytest

from spac_llamacpp.gguf.info import read_model_header
from spac_llamacpp.models.factory import write_tiny_moe
from spac_llamacpp.native.flash_engine import OPS, FlashEngine, page_size
from spac_llamacpp.native.mapping import FileMapping

# expert shares per tensor (f16): 10 KiB (several pages, boundaries inside pages) and 3 KiB (experts
# sharing pages with their neighbours, the boundary-page rule)
SHAPES = {
    "multi_page": {"n_layer": 3, "n_embd": 64, "n_expert": 16, "n_expert_used": 3, "n_ff_exp": 80},
    "sub_page": {"n_layer": 3, "n_embd": 64, "n_expert": 16, "n_expert_used": 3, "n_ff_exp": 24},
}
ITERATIONS = 6000


@pytest.fixture(scope="module")
def race_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("race_models")
    return {name: str(write_tiny_moe(root / f"{name}.gguf", "qwen3moe", **shape)) for name, shape in SHAPES.items()}


class _Mapped:
    """A read-only MAP_SHARED mapping of the whole file, as llama.cpp makes it."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        self.map = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        self.view = np.frombuffer(self.map, dtype=np.uint8)
        addr = self.view.ctypes.data
        self.mapping = FileMapping(addr, addr + self.size, 0, "r--s", os.fstat(self.fd).st_ino, path)

    def close(self) -> None:
        del self.view
        self.map.close()
        os.close(self.fd)


def _touch(view: np.ndarray, info, layer: int, x: int) -> int:
    """Read a byte of every page of expert x of the layer (the matmul's reads)."""
    total, page = 0, page_size()
    for t in info.layer_tensors(layer):
        lo = t.file_offset + x * t.bytes_per_expert
        total += int(view[lo:lo + t.bytes_per_expert:page].sum()) + int(view[lo + t.bytes_per_expert - 1])
    return total


def _race(path: str, iterations: int, seed: int = 0, demand: str = "async") -> tuple[list[tuple[int, int, int]], dict]:
    """``demand``: "wait", "async" or "overlay" (overlay reads, whose hook waits; the stand-in then also checks
    the bytes the matmul would read against the file's)."""
    info = read_model_header(path)
    assert info.layer_tensors(info.moe_layers[0])[0].bytes_per_expert % page_size() != 0  # unaligned experts
    m = _Mapped(path)
    engine = FlashEngine(info, m.mapping, threads=2, queue=4096)
    overlay = demand == "overlay"
    if overlay:
        assert engine.set_read_method("overlay", pool_cap_bytes=64 * page_size())
        want = np.fromfile(path, dtype=np.uint8)
    else:
        engine.set_demand_mode(demand)
    lib, ffi, handle = engine._lib, engine._ffi, engine._handle
    layers, n, k = list(info.moe_layers), info.n_expert, info.n_expert_used[info.moe_layers[0]]
    stop = threading.Event()

    def evictor() -> None:
        rng = np.random.default_rng(seed + 1)
        while not stop.is_set():
            for layer, x, r in zip(rng.choice(layers, 64), rng.integers(0, n, 64), rng.random(64), strict=True):
                op = OPS["evict"] if r < 0.8 else OPS["prefetch"]
                lib.spac_engine_submit(handle, op, int(layer), int(x))  # releases the GIL: workers run meanwhile

    violations: list[tuple[int, int, int]] = []
    thread = threading.Thread(target=evictor, daemon=True)
    thread.start()
    try:
        rng = np.random.default_rng(seed)
        mask = np.zeros(n, dtype=np.uint8)
        mask_ptr = ffi.cast("uint8_t *", ffi.from_buffer(mask))
        for it in range(iterations):
            layer = layers[it % len(layers)]
            selected = [int(x) for x in rng.choice(n, k, replace=False)]
            mask[:] = 0
            mask[selected] = 1
            lib.spac_engine_on_layer(handle, layer, mask_ptr)
            if demand == "async":
                for x in selected:
                    _touch(m.view, info, layer, x)
            for _ in range(3):  # the matmul of this layer: its experts must stay whole until released
                for x in selected:
                    if lib.spac_engine_expert_resident(handle, layer, x) != 1:
                        violations.append((it, layer, x))
            if overlay:  # and hold the file's bytes, overlaid or not
                for x in selected:
                    for t in info.layer_tensors(layer):
                        lo = t.file_offset + x * t.bytes_per_expert
                        if not np.array_equal(m.view[lo:lo + t.bytes_per_expert], want[lo:lo + t.bytes_per_expert]):
                            violations.append((it, layer, -1 - x))
            if it % len(layers) == len(layers) - 1:
                lib.spac_engine_end_step(handle)
    finally:
        stop.set()
        thread.join()
        lib.spac_engine_end_step(handle)
        engine.wait_idle(10.0)
        stats = {**engine.stats(), "by_kind": engine.errors()}
        engine.close()
        m.close()
    return violations, stats


@pytest.mark.parametrize("demand", ["wait", "async", "overlay"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_no_in_use_expert_is_ever_evicted(race_models, shape, demand):
    violations, st = _race(race_models[shape], ITERATIONS, demand=demand)
    # the race was really run: many evictions, some of them of experts the hook had just selected
    assert st["evictions"] > ITERATIONS // 2, st
    assert st["deferred"] > 0 and st["demand_misses"] > 0, st
    assert not violations, f"{len(violations)} in-use experts lost pages, first {violations[:5]}; {st}"
    assert st["evict_in_use"] == 0, st
    assert st["errors"] == 0 and not st["by_kind"], st
    if demand == "async":  # the completer awaited the misses, and the evictions it deferred ran after it
        assert st["demand_async"] > 0 and st["demand_read_ns"] > 0, st
    else:
        assert st["demand_async"] == 0, st
    if demand == "overlay" and shape == "multi_page":  # experts with inner pages: overlays came and went
        assert st["overlay_loads"] > ITERATIONS // 4 and st["overlay_fallbacks"] == 0, st
        assert st["overlay_fresh_bytes"] < st["overlay_loads"] * page_size(), st  # the pool recycled pages


def test_failed_system_calls_are_counted_by_kind_and_logged_once(race_models, monkeypatch, caplog):
    """An engine whose file descriptor is a pipe: every posix_fadvise of an eviction fails (ESPIPE)."""
    import errno
    import logging

    from spac_llamacpp.native import flash_engine

    path = race_models["multi_page"]
    info = read_model_header(path)
    m = _Mapped(path)
    r, w = os.pipe()
    monkeypatch.setattr(flash_engine.os, "open", lambda *a, **k: r)  # the engine's own fd of the file
    engine = FlashEngine(info, m.mapping, threads=1)
    monkeypatch.undo()
    try:
        with caplog.at_level(logging.WARNING, logger="spac_llamacpp.native.flash_engine"):
            for x in range(4):
                assert engine.submit("evict", info.moe_layers[0], x)
            assert engine.wait_idle()
            engine.end_step()
            engine.end_step()
            report = engine.errors()
        assert set(report) == {"fadvise"}, report  # fdatasync's EINVAL on a pipe is expected, not an error
        assert report["fadvise"]["count"] >= 4 and report["fadvise"]["errno"] == errno.ESPIPE
        assert report["fadvise"]["message"] == os.strerror(errno.ESPIPE)
        st = engine.stats()
        assert st["errors"] == report["fadvise"]["count"] and st["last_errno"] == errno.ESPIPE
        lines = [rec.getMessage() for rec in caplog.records]
        assert len(lines) == 1 and f"errno {errno.ESPIPE} ({os.strerror(errno.ESPIPE)})" in lines[0], lines
    finally:
        engine.close()  # closes r
        os.close(w)
        m.close()
