"""Mixture-of-Experts introspection of a GGUF file, from its header alone.

This is the public module; the work is split over the modules of this package:
:mod:`~spac_llamacpp.gguf.header` reads the raw header (bounds-checked, mirroring the vendored
llama.cpp ``gguf.cpp``; tensor data is never read: on a 20 GB model only the first few megabytes
of the file are touched), :mod:`~spac_llamacpp.gguf.layout` interprets the MoE layout with the
facts of :mod:`~spac_llamacpp.gguf.arch`, into the classes of :mod:`~spac_llamacpp.gguf.model`,
and :mod:`~spac_llamacpp.gguf.report` formats ``spac inspect``.

Public API::

    info = inspect_model("model.gguf")        # MoEModelInfo; raises GGUFError / NotMoEError
    info = read_model_header("dense.gguf")    # same, but dense models give n_expert == 0
    print(format_report(info))
    t = info.expert_tensors[0]
    start, end = t.expert_range(5)            # absolute file byte range of expert 5 in t

Every bad input raises a :class:`~spac_llamacpp.base.errors.SpacError` subclass with a one-line message
(what is wrong, and what to do); no other exception type escapes.  Corrupt headers fail fast:
counts and lengths are checked against the file size before anything is allocated or looped over.

Layout facts: see :mod:`spac_llamacpp.gguf.model`.
"""

from __future__ import annotations

import os

from spac_llamacpp.base.errors import GGUFError, NotMoEError, SpacError
from spac_llamacpp.gguf.arch import LLAMA_ARCHITECTURES
from spac_llamacpp.gguf.header import ACTION_CORRUPT, GGML_TYPES, check_file, parse_header
from spac_llamacpp.gguf.layout import interpret
from spac_llamacpp.gguf.model import ExpertTensor, MoEModelInfo
from spac_llamacpp.gguf.report import format_report

__all__ = [
    "ExpertTensor",
    "MoEModelInfo",
    "GGML_TYPES",
    "LLAMA_ARCHITECTURES",
    "inspect_model",
    "read_model_header",
    "format_report",
]


def read_model_header(path: str | os.PathLike[str]) -> MoEModelInfo:
    """Parse a GGUF header and describe its experts; dense models give ``n_expert == 0``.

    Only header bytes are read.  Raises :class:`GGUFError` (one line) on any problem.
    """
    p, label, size = check_file(path)
    try:
        with open(p, "rb") as f:
            hdr, _ = parse_header(f, size, label)
        return interpret(p, label, hdr)
    except SpacError:
        raise
    except PermissionError:
        raise GGUFError(f"{label}: permission denied; make the file readable") from None
    except OSError as e:
        raise GGUFError(
            f"{label}: cannot read the file ({e.strerror or e}); check the disk and path"
        ) from None
    except MemoryError:
        raise GGUFError(f"{label}: out of memory while reading the GGUF header; {ACTION_CORRUPT}") from None
    except Exception as e:  # a bug or an unforeseen corruption: still one line, never a traceback
        raise GGUFError(
            f"{label}: cannot parse the GGUF header ({type(e).__name__}: {e}); {ACTION_CORRUPT}"
        ) from None


def inspect_model(path: str | os.PathLike[str]) -> MoEModelInfo:
    """Like :func:`read_model_header`, but a model without routed experts raises NotMoEError."""
    info = read_model_header(path)
    if not info.is_moe:
        raise NotMoEError(
            f"{info.path}: '{info.architecture}' model has no routed experts (no ffn_*_exps tensors); "
            "spac needs a Mixture-of-Experts GGUF (e.g. Mixtral, Qwen3-MoE, DeepSeek, OLMoE, gpt-oss)"
        )
    return info
