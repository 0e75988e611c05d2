"""llama.cpp's RPC backend: remote ggml devices served by ``rpc-server`` (GGML_RPC=ON, scripts/build_llama.sh).

llama-cpp-python 0.3.36 has no ``rpc_servers`` argument any more (llama.cpp dropped it from
``llama_model_params``): remote devices now come from ggml's backend registry, which every model load
consults. :func:`add_rpc_servers` registers servers there, as llama.cpp's own ``--rpc`` option does
(``common/arg.cpp``: the RPC registry's ``ggml_backend_rpc_add_server``, then ``ggml_backend_register``).
From then on, in this process, each server's devices (``RPC0``, ``RPC1``, ...; type GPU) take layers
when a model is loaded with ``n_gpu_layers``, ahead of local GPUs, and the VRAM tier's expert pool goes
to the first of them. A registration lasts as long as the process (ggml cannot unregister a backend).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import threading
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from spac_llamacpp.base.errors import SpacError

_lock = threading.Lock()
_registered: dict[str, list[str]] = {}  # endpoint -> its device names


@cache
def _ggml() -> ctypes.CDLL:
    from spac_llamacpp.native.libs import ggml_main

    lib = ggml_main()
    p = ctypes.c_void_p
    lib.ggml_backend_reg_by_name.restype = p
    lib.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_reg_get_proc_address.restype = p
    lib.ggml_backend_reg_get_proc_address.argtypes = [p, ctypes.c_char_p]
    lib.ggml_backend_register.restype = None
    lib.ggml_backend_register.argtypes = [p]
    lib.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_reg_dev_count.argtypes = [p]
    lib.ggml_backend_reg_dev_get.restype = p
    lib.ggml_backend_reg_dev_get.argtypes = [p, ctypes.c_size_t]
    return lib


def rpc_supported() -> bool:
    """Whether the installed llama.cpp was built with its RPC backend (``-DGGML_RPC=ON``)."""
    try:
        return bool(_ggml().ggml_backend_reg_by_name(b"RPC"))
    except Exception:  # noqa: BLE001 - no llama.cpp at all
        return False


def rpc_server_path() -> Path | None:
    """The ``rpc-server`` built with the installed llama.cpp (``llama_cpp/lib/rpc-server``), else
    ``$SPAC_RPC_SERVER``, else one on ``PATH``; None if there is none."""
    from spac_llamacpp.native.libs import llama_package_dir

    candidates = [os.environ.get("SPAC_RPC_SERVER")]
    with contextlib.suppress(Exception):  # llama-cpp-python missing: only the others
        candidates.append(str(llama_package_dir() / "lib" / "rpc-server"))
    candidates.append(shutil.which("rpc-server"))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return Path(c)
    return None


def _endpoints(servers: str | Sequence[str]) -> list[str]:
    items = servers.split(",") if isinstance(servers, str) else list(servers)
    out = [s.strip() for s in items if s and s.strip()]
    if not out:
        raise SpacError("no RPC servers given (expected HOST:PORT[,HOST:PORT...])")
    for s in out:
        host, _, port = s.rpartition(":")
        if not host or not port.isdigit():
            raise SpacError(f"bad RPC server {s!r}: expected HOST:PORT")
    return out


def add_rpc_servers(servers: str | Sequence[str]) -> list[str]:
    """Register llama.cpp RPC servers (``"host:port,host:port"`` or a list) in this process's ggml
    registry; returns the device names they provide (``RPC0``, ...), in order. Idempotent per endpoint.
    Call it before loading the model that should use them. The server must be running: ggml aborts the
    process if it cannot connect, so the endpoint is probed with a plain TCP connection first."""
    import socket

    endpoints = _endpoints(servers)
    lib = _ggml()
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise SpacError("llama.cpp was built without its RPC backend: rebuild with scripts/build_llama.sh "
                        "(it sets -DGGML_RPC=ON)")
    add = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server")
    if not add:
        raise SpacError("llama.cpp's RPC backend has no ggml_backend_rpc_add_server")
    add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(add)
    names: list[str] = []
    with _lock:
        for ep in endpoints:
            if ep not in _registered:
                host, _, port = ep.rpartition(":")
                try:
                    socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
                except OSError as exc:
                    raise SpacError(f"RPC server {ep} is not reachable: {exc}") from exc
                sub = add_server(ep.encode())
                if not sub:
                    raise SpacError(f"RPC server {ep} offers no device")
                lib.ggml_backend_register(sub)
                from spac_llamacpp.native.libs import ggml_main

                g = ggml_main()
                _registered[ep] = [g.ggml_backend_dev_name(lib.ggml_backend_reg_dev_get(sub, i)).decode()
                                   for i in range(lib.ggml_backend_reg_dev_count(sub))]
            names += _registered[ep]
    return names
