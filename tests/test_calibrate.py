"""Calibration measurements (tiny sizes, so that they are quick) and the cost model's persistence."""

from __future__ import annotations

import json

import pytest

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.native.gpu import measure_upload
from spac_llamacpp.planning import calibration as store
from spac_llamacpp.planning.costmodel import CostModel, CpuKernel, ExpertLayout, ReadCost
from spac_llamacpp.tools import calibrate as C

TINY_CPU = dict(n_embd=256, ff_small=64, ff_big=256, n_expert=4, n_layer=1, repeats=1)


def test_measure_cpu_tiny():
    kernels, raw = C.measure_cpu(("F16", "Q8_0"), (1, 4), threads=1, **TINY_CPU)
    assert set(kernels) == {"F16", "Q8_0"}
    for k in kernels.values():
        assert k.batch == (1, 4)
        assert all(s > 0 for s in k.s_per_byte) and k.s_per_byte[1] >= k.s_per_byte[0]
    assert raw["types"]["Q8_0"]["expert_bytes"][1] > raw["types"]["Q8_0"]["expert_bytes"][0]
    with pytest.raises(SpacError):
        C.measure_cpu(("IQ1_S",), (1,), threads=1, **TINY_CPU)


def test_measure_flash_small(tmp_path):
    miss, pre, raw = C.measure_flash(tmp_path, (4096, 65536), file_bytes=1 << 20, reads_per_size=4)
    assert miss.bandwidth > 0 and pre.bandwidth > 0 and miss.latency_s >= 0 and pre.latency_s >= 0
    assert set(raw["pread"]) == {"4096", "65536"}
    assert not list(tmp_path.iterdir())  # the test file is removed


def test_upload_path_on_cpu_device():
    # the RAM->VRAM code path, exercised on the CPU device (a memcpy)
    raw = measure_upload(0, sizes=(1 << 16, 1 << 20), repeats=2)
    assert set(raw) == {str(1 << 16), str(1 << 20)} and all(0 < t < 10 for t in raw.values())


def test_gpu_absent_is_recorded():
    if C.gpu_devices():
        pytest.skip("this machine has a GPU")
    gpu, raw = C.measure_gpu()
    assert gpu.present is False and "no GPU" in raw["note"]


def test_calibrate_for_a_model_and_round_trip(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("SPAC_CALIBRATION_CACHE", str(tmp_path / "cache"))
    model = tiny_model("qwen3moe", "q8_0")
    cm = C.calibrate(model, types=["F16"], batches=(1, 2), flash_bytes=1 << 20, cpu_kw=TINY_CPU, threads=1)
    assert set(cm.cpu) == {"F16", "Q8_0"}  # the model's expert type is added
    assert cm.model["expert_types"] == ["Q8_0"] and cm.mem_available > 0
    assert cm.extra["flash"]["directory"] == str(model.parent)
    path = cm.save(store.calibration_path(model))
    assert path.parent == tmp_path / "cache" and store.machine_id() in path.name
    back = store.load_cached(model)
    assert back is not None and back.to_json() == json.loads(path.read_text())
    assert store.load_cached(None) is None  # no generic calibration yet
    text = C.format_calibration(back)
    assert "Q8_0" in text and "flash miss" in text and "GPU" in text


def test_cost_model_json_and_borrowed_types(tmp_path):
    cm = CostModel(cpu={"Q4_0": CpuKernel((1, 8), (2e-10, 3e-10)), "F16": CpuKernel((1, 8), (1e-10, 2e-10))},
                   flash_miss=ReadCost(1e9, 1e-3), flash_prefetch=ReadCost(2e9, 1e-4))
    assert cm.kernel("Q4_K").source == "borrowed from Q4_0"  # closest bits per weight
    assert cm.kernel("BF16").source == "borrowed from F16"
    assert cm.cpu_seconds([("F16", 1000)], 1) == pytest.approx(1e-7)
    assert cm.cpu_seconds([("F16", 1000)], 4) == pytest.approx(1000 * (1e-10 + 3 / 7 * 1e-10))
    assert cm.cpu_seconds([("F16", 1000)], 16) > cm.cpu_seconds([("F16", 1000)], 8)
    p = cm.save(tmp_path / "c.json")
    back = CostModel.load(p)
    assert set(back.cpu) == {"Q4_0", "F16"}  # borrowed kernels are not saved
    (tmp_path / "bad.json").write_text("[1, 2]")
    for bad in (tmp_path / "bad.json", tmp_path / "missing.json"):
        with pytest.raises(SpacError):
            CostModel.load(bad)
    (tmp_path / "old.json").write_text(json.dumps({**cm.to_json(), "version": 0}))
    with pytest.raises(SpacError, match="version"):
        CostModel.load(tmp_path / "old.json")


def test_layout_from_model(tiny_model):
    from spac_llamacpp.gguf.info import inspect_model

    info = inspect_model(tiny_model("deepseek2"))
    lay = ExpertLayout.from_info(info)
    assert lay.moe_layers == info.moe_layers and lay.n_expert == info.n_expert
    assert int(lay.expert_bytes[0]) == info.layer_expert_bytes(info.moe_layers[0])
    assert lay.total_expert_bytes == sum(info.layer_expert_bytes(il) for il in info.moe_layers) * info.n_expert
