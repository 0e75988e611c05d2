"""Locate llama-cpp-python's native libraries and bind the few ggml functions we need.

llama-cpp-python's wheel holds several *copies* of each library (``libggml-base.so``, ``.so.0``,
``.so.0.x``), each with its own static state. ``libllama.so`` loads the ``.so.0`` names, so we must
load exactly those; any other copy returns foreign buffer-type pointers that llama.cpp rejects.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

from spac_llamacpp.base.errors import NativeError


@cache
def llama_package_dir() -> Path:
    """Directory of the installed ``llama_cpp`` package."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise NativeError("llama-cpp-python is not installed; run scripts/setup.sh") from exc
    return Path(llama_cpp.__file__).resolve().parent


def llama_lib_dir() -> Path:
    """Directory with ``libllama.so`` and the ggml libraries that it loads."""
    lib = llama_package_dir() / "lib"
    if not (lib / "libggml-base.so.0").is_file():
        raise NativeError(f"llama-cpp-python's libraries are missing in {lib}; reinstall llama-cpp-python")
    return lib


@cache
def llama_include_dir() -> Path:
    """Directory with ``ggml.h`` matching the installed libraries."""
    pkg = llama_package_dir()
    candidates = [pkg.parent / "include", pkg / "include", pkg.parent.parent.parent.parent / "include"]
    for cand in candidates:
        if (cand / "ggml.h").is_file() and (cand / "ggml-backend.h").is_file():
            return cand
    raise NativeError(
        "ggml headers (ggml.h) of the installed llama-cpp-python were not found; "
        "reinstall llama-cpp-python from source (scripts/setup.sh does)"
    )


@cache
def ggml_base() -> ctypes.CDLL:
    """``libggml-base.so.0``: the very copy libllama.so uses (buffer types, tensor helpers)."""
    import llama_cpp  # noqa: F401  - make sure libllama (and so this copy) is loaded first

    lib = ctypes.CDLL(str(llama_lib_dir() / "libggml-base.so.0"), mode=ctypes.RTLD_GLOBAL)
    lib.ggml_backend_cpu_buffer_type.restype = ctypes.c_void_p
    lib.ggml_backend_cpu_buffer_type.argtypes = []
    lib.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
    lib.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_buft_name.restype = ctypes.c_char_p
    lib.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    return lib


@cache
def ggml_main() -> ctypes.CDLL:
    """``libggml.so.0``: the backend registry (device lookup by name)."""
    import llama_cpp  # noqa: F401

    lib = ctypes.CDLL(str(llama_lib_dir() / "libggml.so.0"), mode=ctypes.RTLD_GLOBAL)
    lib.ggml_backend_dev_by_name.restype = ctypes.c_void_p
    lib.ggml_backend_dev_by_name.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_count.argtypes = []
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_name.restype = ctypes.c_char_p
    lib.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    return lib


def device_names() -> list[str]:
    """Names of the ggml backend devices compiled into llama.cpp (e.g. ``CPU``, ``CUDA0``)."""
    g = ggml_main()
    return [g.ggml_backend_dev_name(g.ggml_backend_dev_get(i)).decode() for i in range(g.ggml_backend_dev_count())]


def buffer_type(name: str) -> int:
    """Buffer-type pointer for a device name (``CPU``, ``CUDA0``, ...), as llama.cpp expects it."""
    if name.upper() == "CPU":
        return ggml_base().ggml_backend_cpu_buffer_type()
    dev = ggml_main().ggml_backend_dev_by_name(name.encode())
    if not dev:
        raise NativeError(f"no ggml device named {name!r}; available: {', '.join(device_names())}")
    return ggml_base().ggml_backend_dev_buffer_type(dev)


@cache
def spac_patch_level() -> int:
    """How many spac patches the installed llama.cpp carries (0: stock; see patches/, docs/patches.md)."""
    import llama_cpp  # noqa: F401

    lib = ctypes.CDLL(str(llama_lib_dir() / "libllama.so.0"), mode=ctypes.RTLD_GLOBAL)
    try:
        fn = lib.llama_spac_patch_level
    except AttributeError:
        return 0
    fn.restype = ctypes.c_int32
    fn.argtypes = []
    return int(fn())


@cache
def ggml_cpu() -> ctypes.CDLL:
    """``libggml-cpu.so.0``: the very copy llama.cpp computes with (its MUL_MAT_ID hooks are per copy)."""
    import llama_cpp  # noqa: F401

    return ctypes.CDLL(str(llama_lib_dir() / "libggml-cpu.so.0"), mode=ctypes.RTLD_GLOBAL)


def mmid_hooks_setter() -> ctypes._CFuncPtr | None:
    """``ggml_cpu_spac_set_mmid_hooks`` of patch 0004 (the CPU MUL_MAT_ID's expert order and per-expert wait),
    or None on a library without it."""
    try:
        fn = ggml_cpu().ggml_cpu_spac_set_mmid_hooks
    except (AttributeError, OSError):
        return None
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return fn
