"""User-facing errors: one clear line that names the problem and what to do."""

from __future__ import annotations


class SpacError(Exception):
    """An error whose message is shown to the user as one line (no traceback).

    The message must say what is wrong and what to do about it.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class GGUFError(SpacError, ValueError):
    """The file is missing, not a GGUF, truncated or corrupt (a ValueError, as in llama_cpp)."""


class NotMoEError(SpacError):
    """The model has no routed experts but the tool needs a Mixture-of-Experts model."""


class NativeError(SpacError):
    """The native module could not be built or loaded."""


class ContextFullError(SpacError, RuntimeError):
    """More tokens than the context window holds (a RuntimeError, as llama_cpp's failed decode was)."""
