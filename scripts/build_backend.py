"""PEP 517 build backend: setuptools, plus the native C sources copied into the package.

The cffi module is compiled on first use from the C sources in the checkout's top-level ``native/``
(``spac_llamacpp/native/module.py``). A wheel or sdist built from the checkout would not contain that
folder, so an installed (non-editable) package could never build its native module. Before building
a wheel or an sdist this backend copies ``native/*.c`` and ``native/*.h`` to
``spac_llamacpp/native_src/`` (package data, git-ignored), which ``module.py`` looks for when
``native/`` is absent. An editable install reads ``native/`` directly and copies nothing. Building a
wheel from an sdist finds ``native_src/`` already there and keeps it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (the rest of the PEP 517/660 hooks, unchanged)

_ROOT = Path(__file__).resolve().parent.parent


def _ship_native_sources() -> None:
    src = _ROOT / "native"
    if not src.is_dir():  # building from an sdist: native_src/ came with it
        return
    dst = _ROOT / "spac_llamacpp" / "native_src"
    dst.mkdir(exist_ok=True)
    for old in dst.glob("*.[ch]"):
        old.unlink()
    for path in sorted(src.glob("*.[ch]")):
        shutil.copy2(path, dst / path.name)


def build_wheel(wheel_directory: str, config_settings: dict[str, Any] | None = None,
                metadata_directory: str | None = None) -> str:
    """Build the wheel with the native C sources inside the package."""
    _ship_native_sources()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_sdist(sdist_directory: str, config_settings: dict[str, Any] | None = None) -> str:
    """Build the sdist with the native C sources inside the package."""
    _ship_native_sources()
    return _setuptools.build_sdist(sdist_directory, config_settings)
