"""ggml's GPU devices through its C API: which exist, their memory, and timed host-to-device copies."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence

import numpy as np

from spac_llamacpp.base.errors import SpacError

_GGML_TYPE_I8 = 24


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _ggml() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    from spac_llamacpp.native.libs import ggml_base, ggml_main

    base, main = ggml_base(), ggml_main()
    base.ggml_init.restype = ctypes.c_void_p
    base.ggml_init.argtypes = [_InitParams]
    base.ggml_free.argtypes = [ctypes.c_void_p]
    base.ggml_new_tensor_1d.restype = ctypes.c_void_p
    base.ggml_new_tensor_1d.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    base.ggml_backend_alloc_ctx_tensors_from_buft.restype = ctypes.c_void_p
    base.ggml_backend_alloc_ctx_tensors_from_buft.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    base.ggml_backend_buffer_free.argtypes = [ctypes.c_void_p]
    base.ggml_backend_tensor_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    base.ggml_backend_dev_type.restype = ctypes.c_int
    base.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    base.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                             ctypes.POINTER(ctypes.c_size_t)]
    base.ggml_backend_dev_description.restype = ctypes.c_char_p
    base.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
    return base, main


def gpu_devices() -> list[int]:
    """Indices (in ggml's device registry) of discrete or integrated GPUs llama.cpp can use."""
    try:
        base, main = _ggml()
    except Exception:  # noqa: BLE001 - no llama.cpp: no GPU
        return []
    return [i for i in range(main.ggml_backend_dev_count())
            if base.ggml_backend_dev_type(main.ggml_backend_dev_get(i)) in (1, 2)]


def measure_upload(device_index: int, sizes: Sequence[int] = (1 << 20, 4 << 20, 16 << 20),
                   repeats: int = 5) -> dict[str, float]:
    """Best seconds of host -> device copies with ``ggml_backend_tensor_set`` (pageable host memory) into
    ``device_index``, by copy size (``str(bytes)`` keys)."""
    base, main = _ggml()
    dev = main.ggml_backend_dev_get(device_index)
    buft = base.ggml_backend_dev_buffer_type(dev)
    big = max(sizes)
    ctx = base.ggml_init(_InitParams(1 << 16, None, True))
    if not ctx:
        raise SpacError("ggml_init failed")
    buf = None
    try:
        t = base.ggml_new_tensor_1d(ctx, _GGML_TYPE_I8, big)
        buf = base.ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft)
        if not buf:
            raise SpacError(f"could not allocate {big} bytes on device {device_index}")
        host = np.random.default_rng(0).integers(0, 256, size=big, dtype=np.uint8)
        ptr = host.ctypes.data_as(ctypes.c_void_p)
        raw: dict[str, float] = {}
        for s in sizes:
            base.ggml_backend_tensor_set(t, ptr, 0, s)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                base.ggml_backend_tensor_set(t, ptr, 0, s)
                best = min(best, time.perf_counter() - t0)
            raw[str(s)] = best
        return raw
    finally:
        if buf:
            base.ggml_backend_buffer_free(buf)
        base.ggml_free(ctx)


def device_memory(device_index: int) -> tuple[int, int, str]:
    """``(free_bytes, total_bytes, description)`` of ggml device ``device_index``."""
    base, main = _ggml()
    dev = main.ggml_backend_dev_get(device_index)
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    name = (base.ggml_backend_dev_description(dev) or b"").decode(errors="replace")
    return free.value, total.value, name
