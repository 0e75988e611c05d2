"""The embedded default model that ``spac-run`` uses when no model is given, and its draft model.

Both ship inside the package (``spac_llamacpp/models/``), so nothing is ever downloaded: a small
Mixture-of-Experts language model in llama.cpp's ``llama`` architecture (Mixtral layout: 6 layers,
16 experts, top-2 softmax routing with learned, load-balanced routers) and a 2-layer dense llama
with the same tokenizer for speculative decoding. Both were trained on Shakespeare's works by
``scripts/train_tiny_moe.py``; ``docs/models.md`` has the recipe, losses and routing statistics.
The random-weight models of ``factory.py`` remain the tests' architecture coverage.
"""

from __future__ import annotations

from pathlib import Path

from spac_llamacpp.base.cache import cache_dir
from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.models.tinylm.recipe import DENSE_NAME, MOE_NAME

MODELS_DIR = Path(__file__).resolve().parent  # the shipped .gguf files sit next to this module
"""Where the shipped GGUFs live."""

DEFAULT_LABEL = (
    "embedded default: spac's tiny Shakespeare MoE (llama/Mixtral layout, 6 layers x 16 experts, top-2, "
    "16M parameters; trained by scripts/train_tiny_moe.py)"
)

CORPUS_WORDS_FILE = "shakespeare-words.txt.gz"
"""Every word (lower-cased letter run) of the training corpus, for readability checks."""


def models_cache_dir() -> Path:
    """Where generated models are kept (``$SPAC_MODEL_CACHE`` or ``~/.cache/spac-llamacpp/models``)."""
    return cache_dir("models", "SPAC_MODEL_CACHE")


def _shipped(name: str) -> Path:
    path = MODELS_DIR / name
    if not path.is_file():
        raise SpacError(
            f"shipped model file {path} is missing; reinstall spac-llamacpp or rebuild it with "
            "scripts/train_tiny_moe.py all"
        )
    return path


def default_model_path() -> Path:
    """Path of the default MoE model (shipped in the package)."""
    return _shipped(f"{MOE_NAME}.gguf")


def default_draft_path() -> Path:
    """Path of the default model's dense draft model (same tokenizer), for speculative decoding."""
    return _shipped(f"{DENSE_NAME}.gguf")


def corpus_words_path() -> Path:
    """Path of the gzip'd word list of the default models' training corpus."""
    return _shipped(CORPUS_WORDS_FILE)
