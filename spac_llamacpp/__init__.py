"""spac-llamacpp: speculative-lookahead expert offloading for MoE GGUF models in llama.cpp."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["Llama", "SpacError", "__version__", "add_rpc_servers", "patched_llama_available"]

from spac_llamacpp.base.errors import SpacError

if TYPE_CHECKING:
    from spac_llamacpp.llama import Llama


def patched_llama_available(level: int = 1) -> bool:
    """Whether the installed llama.cpp carries spac's patch series (``scripts/build_llama.sh``) up to
    ``level``. The VRAM tier needs the full series; the flash tier works with stock llama.cpp."""
    from spac_llamacpp.native.libs import spac_patch_level

    return spac_patch_level() >= level


def add_rpc_servers(servers: str | list[str]) -> list[str]:
    """Register llama.cpp RPC servers (``"host:port,host:port"``) for this process: models loaded afterwards
    with ``n_gpu_layers`` spread their layers over the servers' devices (``RPC0``, ...), and the VRAM tier
    puts its expert pool on the first of them (llama.cpp lists RPC devices before local GPUs). Returns the
    device names.
    See ``spac_llamacpp.native.rpc`` (llama-cpp-python 0.3.36 has no ``rpc_servers`` argument)."""
    from spac_llamacpp.native.rpc import add_rpc_servers as add

    return add(servers)


def __getattr__(name: str):
    # Importing llama_cpp loads the native libraries: defer until Llama is really asked for,
    # so that `spac inspect` stays fast and works without them.
    if name == "Llama":
        from spac_llamacpp.llama import Llama

        return Llama
    raise AttributeError(f"module 'spac_llamacpp' has no attribute {name!r}")
