"""The embedded default model that ``spac-run`` uses when no model is given.

For now this is the test-model factory's small qwen3moe model with random weights: it exercises the
whole pipeline (loading, routing, the sensor) but writes gibberish. It is generated
deterministically into the user's cache on first use, so nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from .cache import cache_dir

DEFAULT_ARCH = "qwen3moe"
DEFAULT_LABEL = (
    "embedded default: tiny random-weight qwen3moe test model from spac's factory "
    "(its text is gibberish; it only demonstrates the pipeline)"
)
_FILE = "spac-default-tiny-qwen3moe-f16-v1.gguf"


def models_cache_dir() -> Path:
    """Where generated models are kept (``$SPAC_MODEL_CACHE`` or ``~/.cache/spac-llamacpp/models``)."""
    return cache_dir("models", "SPAC_MODEL_CACHE")


def default_model_path() -> Path:
    """Path of the default model, written on first use."""
    from .factory import write_tiny_moe

    path = models_cache_dir() / _FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        write_tiny_moe(tmp, DEFAULT_ARCH, dtype="f16", seed=0, n_layer=6, n_embd=128, n_expert=16, n_ff_exp=64)
        os.replace(tmp, path)
    return path
