"""Shared pytest fixtures, and the session's environment."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable

import pytest

from spac_llamacpp.models.factory import write_tiny_dense, write_tiny_moe

TinyModel = Callable[..., pathlib.Path]

CALIBRATION_ENV = "SPAC_CALIBRATION_CACHE"
CALIBRATION_PREFIX = "spac-test-calibration-"


def pytest_configure(config: pytest.Config) -> None:
    """Tests never read the user's calibration (``~/.cache/spac-llamacpp/calibration``).

    ``$SPAC_CALIBRATION_CACHE`` points at a fresh, empty directory for the session, so every tier built
    in a test costs its plans with nominal costs unless the test saves its own calibration; subprocesses
    the tests spawn inherit the variable. Only the calibration is redirected: the native module cache
    (``$SPAC_NATIVE_CACHE``, else ``$XDG_CACHE_HOME``) stays shared, or the module would be rebuilt for
    every session.
    """
    directory = tempfile.mkdtemp(prefix=CALIBRATION_PREFIX)
    previous = os.environ.get(CALIBRATION_ENV)
    os.environ[CALIBRATION_ENV] = directory

    def restore() -> None:
        if previous is None:
            os.environ.pop(CALIBRATION_ENV, None)
        else:
            os.environ[CALIBRATION_ENV] = previous
        shutil.rmtree(directory, ignore_errors=True)

    config.add_cleanup(restore)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """``tiny_model(arch="qwen3moe", dtype="f16") -> Path``: a factory MoE GGUF, written once per session.

    ``arch`` is one of ``spac_llamacpp.models.factory.ARCHITECTURES``; the files use the factory defaults
    (seed 0) and must not be modified by tests.
    """
    root = tmp_path_factory.mktemp("tiny_models")
    cache: dict[tuple[str, str], pathlib.Path] = {}

    def tiny_model(arch: str = "qwen3moe", dtype: str = "f16") -> pathlib.Path:
        key = (arch, dtype)
        if key not in cache:
            cache[key] = write_tiny_moe(root / f"{arch}-{dtype}.gguf", arch, dtype=dtype)
        return cache[key]

    return tiny_model


@pytest.fixture(scope="session")
def tiny_model(tiny_models: TinyModel) -> TinyModel:
    """Alias of :func:`tiny_models`."""
    return tiny_models


@pytest.fixture(scope="session")
def tiny_dense_model(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A tiny dense (not MoE) llama GGUF (f16), written once per session."""
    return write_tiny_dense(tmp_path_factory.mktemp("tiny_dense") / "dense-f16.gguf")


def pytest_ignore_collect(collection_path: pathlib.Path, config: pytest.Config) -> bool | None:
    """The GPU-only tests (``test_vram_gpu.py``) are collected when named on the command line, as
    ``scripts/gpu_check.sh`` does on a GPU machine; a plain run (CI, no GPU) leaves them out instead of
    listing sixteen skips."""
    if collection_path.name == "test_vram_gpu.py":
        return not any(pathlib.Path(str(a).split("::")[0]).name == collection_path.name for a in config.args)
    return None
