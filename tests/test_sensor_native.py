"""The native sensor fed hand-made ggml tensors: strides, bounds, ubatch boundaries, chaining."""

from __future__ import annotations

import ctypes
import os

import llama_cpp.llama_cpp as llama_c
import numpy as np
import pytest

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.native.libs import ggml_base
from spac_llamacpp.native.sensor import RoutingSensor

GGML_TYPE_F32 = 0
GGML_TYPE_I32 = 26


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@pytest.fixture()
def ggml():
    """A ggml context for building tensors by hand (host memory, no backend buffer)."""
    g = ggml_base()
    g.ggml_init.restype = ctypes.c_void_p
    g.ggml_init.argtypes = [_InitParams]
    g.ggml_free.argtypes = [ctypes.c_void_p]
    g.ggml_new_tensor_2d.restype = ctypes.c_void_p
    g.ggml_new_tensor_2d.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    g.ggml_view_2d.restype = ctypes.c_void_p
    g.ggml_view_2d.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                               ctypes.c_size_t, ctypes.c_size_t]
    g.ggml_set_name.restype = ctypes.c_void_p
    g.ggml_set_name.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    g.ggml_get_data.restype = ctypes.c_void_p
    g.ggml_get_data.argtypes = [ctypes.c_void_p]
    ctx = g.ggml_init(_InitParams(16 << 20, None, False))
    yield g, ctx
    g.ggml_free(ctx)


def topk_tensor(ggml, layer: int, selected: np.ndarray, n_expert: int, name: str | None = None,
                dtype: int = GGML_TYPE_I32) -> int:
    """An ``ffn_moe_topk`` like llama.cpp's: a [k, N] view of an [n_expert, N] argsort (strided rows)."""
    g, ctx = ggml
    n_tokens, k = selected.shape
    full = g.ggml_new_tensor_2d(ctx, dtype, n_expert, n_tokens)
    if n_tokens:
        data = np.ctypeslib.as_array((ctypes.c_int32 * (n_expert * n_tokens)).from_address(g.ggml_get_data(full)))
        data[:] = -7
        data.reshape(n_tokens, n_expert)[:, :k] = selected
    view = g.ggml_view_2d(ctx, full, k, n_tokens, n_expert * 4, 0)
    g.ggml_set_name(view, (name or f"ffn_moe_topk-{layer}").encode())
    return view


def feed(sensor: RoutingSensor, tensor: int) -> bool:
    """Run the eval-callback protocol on one node: ask, then (if wanted) observe."""
    cb = sensor.cb_eval
    wanted = cb(tensor, True, sensor.cb_eval_user_data)
    if wanted:
        return cb(tensor, False, sensor.cb_eval_user_data)
    return True


def test_decodes_strided_topk_and_counts(ggml):
    s = RoutingSensor(n_layer=3, n_expert=8, k_max=2, capacity=16)
    sel = np.array([[1, 5], [7, 0], [3, 3]], dtype=np.int32)
    for layer in range(3):
        assert feed(s, topk_tensor(ggml, layer, sel, 8))
    s.flush()
    assert s.n_tokens == 3 and s.n_events == 3 and s.n_bad_ids == 0 and s.n_bad_events == 0
    np.testing.assert_array_equal(s.token_ids(0, 3)[:, 1, :], sel)
    expected = np.bincount(sel.ravel(), minlength=8)
    for layer in range(3):
        np.testing.assert_array_equal(s.step_counts[layer], expected)
    assert s.step_layer_tokens.tolist() == [3, 3, 3]


def test_out_of_range_ids_are_dropped_and_counted(ggml):
    s = RoutingSensor(n_layer=2, n_expert=4, k_max=2, capacity=8)
    sel = np.array([[0, 4], [-1, 3], [2147483647, -2147483648]], dtype=np.int32)
    feed(s, topk_tensor(ggml, 0, sel, 4 + 4))  # argsort width may exceed n_expert in a corrupt graph
    s.flush()
    assert s.n_bad_ids == 4
    assert s.step_counts[0].tolist() == [1, 0, 0, 1]
    assert s.token_ids(0, 3)[:, 0, :].tolist() == [[0, -1], [-1, 3], [-1, -1]]


def test_bad_geometry_events_are_skipped(ggml):
    s = RoutingSensor(n_layer=2, n_expert=4, k_max=2, capacity=8)
    ok = np.array([[0, 1]], dtype=np.int32)
    feed(s, topk_tensor(ggml, 2, ok, 4))  # layer beyond n_layer
    feed(s, topk_tensor(ggml, 0, np.array([[0, 1, 2]], np.int32), 4))  # k > k_max
    feed(s, topk_tensor(ggml, 0, ok, 4, dtype=GGML_TYPE_F32))  # wrong type
    assert s.n_bad_events == 3 and s.n_events == 0 and s.step_counts.sum() == 0
    # names that only look similar are not observed at all
    assert feed(s, topk_tensor(ggml, 0, ok, 4, name="ffn_moe_topk-0x")) is True
    assert feed(s, topk_tensor(ggml, 0, ok, 4, name="ffn_moe_topk-")) is True
    assert s.n_events == 0


def test_errors_are_counted_by_kind_logged_once_and_reset(ggml, caplog):
    import errno
    import logging

    s = RoutingSensor(n_layer=2, n_expert=4, k_max=2, capacity=8)
    ok = np.array([[0, 1]], dtype=np.int32)
    with caplog.at_level(logging.WARNING, logger="spac_llamacpp.native.sensor"):
        feed(s, topk_tensor(ggml, 2, ok, 4))  # layer beyond n_layer
        feed(s, topk_tensor(ggml, 0, ok, 4, dtype=GGML_TYPE_F32))  # wrong type
        feed(s, topk_tensor(ggml, 0, np.array([[0, 9]], np.int32), 4 + 8))  # an id out of range
        s.flush()
        s.flush()
    assert s.errors() == {
        "topk": {"count": 2, "errno": errno.EINVAL, "message": os.strerror(errno.EINVAL)},
        "ids": {"count": 1, "errno": errno.ERANGE, "message": os.strerror(errno.ERANGE)},
    }
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines  # once per kind, not per flush
    assert all("\n" not in line and "errno" in line for line in lines)
    assert any(f"errno {errno.EINVAL} ({os.strerror(errno.EINVAL)})" in line for line in lines)
    s.reset()
    assert s.errors() == {} and s.n_bad_events == 0


def test_one_set_of_limits_for_sensor_and_engine():
    import mmap

    from spac_llamacpp.gguf.arch import LLAMA_MAX_EXPERTS
    from spac_llamacpp.native import module as native

    lib = native.load().lib
    assert lib.SPAC_MAX_EXPERTS == LLAMA_MAX_EXPERTS
    RoutingSensor(n_layer=1, n_expert=lib.SPAC_MAX_EXPERTS, k_max=2, capacity=4).close()
    with pytest.raises(SpacError, match=f"at most {lib.SPAC_MAX_LAYERS} layers and {lib.SPAC_MAX_EXPERTS} experts"):
        RoutingSensor(n_layer=1, n_expert=lib.SPAC_MAX_EXPERTS + 1, k_max=2, capacity=4)
    with pytest.raises(SpacError):
        RoutingSensor(n_layer=lib.SPAC_MAX_LAYERS + 1, n_expert=8, k_max=2, capacity=4)
    with pytest.raises(SpacError):
        RoutingSensor(n_layer=1, n_expert=8, k_max=2, capacity=2**40)  # not an int32: no OverflowError
    # the engine takes exactly the experts the sensor does (its hook's stack arrays are that long)
    page = mmap.PAGESIZE
    buf = mmap.mmap(-1, page)
    base = native.load().ffi.cast("uint8_t *", np.frombuffer(buf, np.uint8).ctypes.data)
    for n_expert, ok in ((lib.SPAC_MAX_EXPERTS, True), (lib.SPAC_MAX_EXPERTS + 1, False)):
        e = lib.spac_engine_new(1, n_expert, 1, base, page, -1, 1, 16)
        assert (e != native.load().ffi.NULL) == ok
        lib.spac_engine_free(e)


def test_empty_batch_is_a_bad_event_not_a_crash(ggml):
    s = RoutingSensor(n_layer=1, n_expert=4, k_max=2, capacity=8)
    feed(s, topk_tensor(ggml, 0, np.zeros((0, 2), np.int32), 4))
    s.flush()
    assert s.n_tokens == 0 and s.n_bad_events == 1


def test_ubatch_boundaries_and_partial_last_layer(ggml):
    s = RoutingSensor(n_layer=2, n_expert=4, k_max=1, capacity=8)
    # ubatch 1: 3 tokens in layer 0, the last layer computes only the final row
    feed(s, topk_tensor(ggml, 0, np.array([[0], [1], [2]], np.int32), 4))
    feed(s, topk_tensor(ggml, 1, np.array([[3]], np.int32), 4))
    # ubatch 2 starts (layer id drops back) without an explicit flush
    feed(s, topk_tensor(ggml, 0, np.array([[1]], np.int32), 4))
    feed(s, topk_tensor(ggml, 1, np.array([[2]], np.int32), 4))
    s.flush()
    assert s.n_tokens == 4 and s.n_ubatches == 2
    assert s.token_ids(0, 4)[:, :, 0].tolist() == [[0, -1], [1, -1], [2, 3], [1, 2]]


def test_ring_wraps_and_refuses_overwritten_tokens(ggml):
    s = RoutingSensor(n_layer=1, n_expert=4, k_max=1, capacity=4)
    for t in range(6):
        feed(s, topk_tensor(ggml, 0, np.array([[t % 4]], np.int32), 4))
    s.flush()
    assert s.n_tokens == 6
    assert s.token_ids(2, 6)[:, 0, 0].tolist() == [2, 3, 0, 1]
    with pytest.raises(IndexError):
        s.token_ids(0, 6)
    with pytest.raises(IndexError):
        s.token_ids(0, 7)


def test_chains_to_user_callback(ggml):
    calls: list[tuple[str, bool]] = []

    def user_cb(t, ask, data):
        name = ctypes.string_at(t + _NAME_OFFSET).decode()
        calls.append((name, ask))
        assert data == 1234
        # asks for one node only, and answers False when observing it (llama.cpp: stop this split)
        return ask and name == "wanted"

    s = RoutingSensor(n_layer=1, n_expert=4, k_max=1, capacity=4, user_cb=user_cb, user_data=1234)
    wanted = topk_tensor(ggml, 0, np.array([[1]], np.int32), 4, name="wanted")
    topk = topk_tensor(ggml, 0, np.array([[2]], np.int32), 4)
    assert feed(s, wanted) is False  # the user's observe-time answer is passed through
    assert feed(s, topk) is True  # ours: the user was asked but not called to observe
    assert calls == [("wanted", True), ("wanted", False), ("ffn_moe_topk-0", True)]
    s.flush()
    assert s.n_tokens == 1 and s.step_counts[0].tolist() == [0, 0, 1, 0]


def test_disabled_sensor_only_chains(ggml):
    s = RoutingSensor(n_layer=1, n_expert=4, k_max=1, capacity=4)
    s.enabled = False
    t = topk_tensor(ggml, 0, np.array([[1]], np.int32), 4)
    assert s.cb_eval(t, True, s.cb_eval_user_data) is False
    s.close()
    assert s.cb_eval(t, True, s.cb_eval_user_data) is False


def test_null_tensor_is_harmless():
    s = RoutingSensor(n_layer=1, n_expert=4, k_max=1, capacity=4)
    assert s.cb_eval(None, True, s.cb_eval_user_data) is False
    assert s.cb_eval(None, False, None) is False


@pytest.mark.parametrize("geometry", [(0, 8, 2), (4, 0, 2), (4, 8, 0), (4, 8, 9), (4, 2000, 2)])
def test_invalid_geometry_is_one_line_error(geometry):
    with pytest.raises(SpacError) as exc:
        RoutingSensor(*geometry)
    assert "\n" not in str(exc.value)


def test_user_callback_of_wrong_type_is_rejected():
    with pytest.raises(SpacError):
        RoutingSensor(1, 4, 1, user_cb="not a callback")  # type: ignore[arg-type]


# offset of ggml_tensor.name: type(4)+pad(4) buffer(8) ne(32) nb(32) op(4) op_params(64) flags(4)
# src(10*8) view_src(8) view_offs(8) data(8)
_NAME_OFFSET = 8 + 8 + 32 + 32 + 4 + 64 + 4 + 80 + 8 + 8 + 8


def test_the_callback_type_and_tensor_layout_these_tests_rely_on(ggml):
    """llama-cpp-python's cb_eval type is bool(tensor*, bool ask, void* user_data), and a ggml tensor's
    name is at ``_NAME_OFFSET`` (the user callbacks above read it there)."""
    cb_type = llama_c.ggml_backend_sched_eval_callback
    assert issubclass(cb_type, ctypes._CFuncPtr)  # type: ignore[attr-defined]
    assert cb_type._restype_ is ctypes.c_bool
    assert cb_type._argtypes_ == (ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p)
    g, _ = ggml
    g.ggml_get_name.restype = ctypes.c_void_p
    g.ggml_get_name.argtypes = [ctypes.c_void_p]
    t = topk_tensor(ggml, 3, np.array([[1]], np.int32), 4)
    assert g.ggml_get_name(t) == t + _NAME_OFFSET
    assert ctypes.string_at(t + _NAME_OFFSET).decode() == "ffn_moe_topk-3"
