"""llama.cpp's own quantizer (``llama_model_quantize``) and log silencing, for the model writers."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Iterator, Sequence

from spac_llamacpp.base.errors import SpacError


def quantize_model(src: str | os.PathLike[str], dst: str | os.PathLike[str], ftype: int,
                   type_overrides: Sequence[tuple[str, int]] = (), threads: int = 1) -> None:
    """Convert ``src`` to ``dst`` as llama_ftype ``ftype``, ``pure`` (every quantized matrix gets it).

    ``type_overrides`` are ``(regex, ggml_type)`` pairs, first match wins (the quantizer itself skips
    norms, biases and routers). A failure raises :class:`SpacError` naming ``dst``.
    """
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    # pure: otherwise llama.cpp picks k-quants for some tensors (output, attn_v, ...) that then fall
    # back because the rows of tiny models are not 256-aligned
    params.pure = True
    overrides = (llama_cpp.llama_model_tensor_override * (len(type_overrides) + 1))()  # {NULL, 0} ends it
    for entry, (pattern, ggml_type) in zip(overrides, type_overrides, strict=False):
        entry.pattern = pattern.encode()
        entry.type = ggml_type
    params.tt_overrides = overrides
    with quiet_llama_log():
        rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
    if rc != 0:
        raise SpacError(f"llama.cpp could not quantize {src} to {dst} (llama_model_quantize returned {rc})")


@contextlib.contextmanager
def quiet_llama_log() -> Iterator[None]:
    """Silence llama-cpp-python's log callback (the quantizer prints a line per tensor)."""
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    # CRITICAL, not ERROR: llama-cpp-python's level map is off by one and shows WARN as ERROR
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
