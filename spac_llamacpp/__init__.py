"""spac-llamacpp: speculative-lookahead expert offloading for MoE GGUF models in llama.cpp."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["Llama", "SpacError", "__version__", "patched_llama_available"]

from spac_llamacpp.base.errors import SpacError

if TYPE_CHECKING:
    from spac_llamacpp.llama import Llama


def patched_llama_available(level: int = 1) -> bool:
    """Whether the installed llama.cpp carries spac's patch series (``scripts/build_llama.sh``) up to
    ``level``. The VRAM tier needs the full series; the flash tier works with stock llama.cpp."""
    from spac_llamacpp.native.libs import spac_patch_level

    return spac_patch_level() >= level


def __getattr__(name: str):
    # Importing llama_cpp loads the native libraries: defer until Llama is really asked for,
    # so that `spac inspect` stays fast and works without them.
    if name == "Llama":
        from spac_llamacpp.llama import Llama

        return Llama
    raise AttributeError(f"module 'spac_llamacpp' has no attribute {name!r}")
