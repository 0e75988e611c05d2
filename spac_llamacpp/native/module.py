"""Build and load the cffi native module (C sources in ``native/``).

The module is compiled against the ggml headers and libraries of the installed llama-cpp-python,
because ggml's struct layouts change between releases and a rebuilt (patched) llama.cpp must get a
matching module. The build is keyed by a hash of our sources, the headers and the libraries, and
cached; ``spac build-native`` (run by ``scripts/setup.sh``) builds it ahead of first use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import sys
import tempfile
from functools import cache
from pathlib import Path
from types import ModuleType

from spac_llamacpp.base.cache import cache_dir
from spac_llamacpp.base.errors import NativeError
from spac_llamacpp.native.libs import llama_include_dir, llama_lib_dir

log = logging.getLogger(__name__)

MODULE_NAME = "_spac_native"

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.DOTALL)


def cdef_from_headers(src_dir: Path) -> str:
    """The cffi declarations: our headers without comments and preprocessor lines (one source of truth)."""
    out = []
    for name in _HEADERS:
        text = _COMMENT.sub("", (src_dir / name).read_text())
        out += [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return "\n".join(out) + "\n"


_SOURCES = ("spac_sensor.c", "spac_replay.c", "spac_engine.c", "spac_testops.c", "spac_readbench.c")
# the limits come first; spac_replay.h completes the struct spac_sensor.h points to
_HEADERS = ("spac_limits.h", "spac_sensor.h", "spac_replay.h", "spac_engine.h", "spac_testops.h", "spac_readbench.h")


def native_source_dir() -> Path:
    """Directory holding the C sources: ``native/`` of a checkout, or the copy shipped in the package."""
    package = Path(__file__).resolve().parent.parent  # spac_llamacpp/
    for candidate in (package.parent / "native", package / "native_src"):
        if (candidate / _SOURCES[0]).is_file():
            return candidate
    raise NativeError(
        f"the C sources of the native module are missing (looked in {package.parent / 'native'}); "
        "reinstall spac-llamacpp from its source tree"
    )


def _build_key(src_dir: Path) -> str:
    h = hashlib.sha256()
    for name in (*_SOURCES, *_HEADERS):
        h.update((src_dir / name).read_bytes())
    for header in ("ggml.h", "ggml-backend.h", "ggml-cpu.h"):
        h.update((llama_include_dir() / header).read_bytes())
    for name in ("libggml-base.so.0", "libggml-cpu.so.0"):
        lib = llama_lib_dir() / name
        st = lib.stat()
        h.update(f"{lib}:{st.st_size}:{st.st_mtime_ns}:{sys.version_info[:2]}".encode())
    h.update(cdef_from_headers(src_dir).encode())
    return h.hexdigest()[:16]


def _built_module_path(out_dir: Path) -> Path | None:
    found = sorted(out_dir.glob(f"{MODULE_NAME}*.so"))
    return found[0] if found else None


def build(force: bool = False) -> Path:
    """Compile the native module if needed; return the path of the shared object."""
    src_dir = native_source_dir()
    out_dir = cache_dir("native", "SPAC_NATIVE_CACHE") / _build_key(src_dir)
    existing = _built_module_path(out_dir)
    if existing is not None and not force:
        return existing

    try:
        from cffi import FFI
    except ImportError as exc:  # pragma: no cover - cffi is a hard dependency
        raise NativeError("cffi is not installed; run scripts/setup.sh") from exc

    ffi = FFI()
    ffi.cdef(cdef_from_headers(src_dir))
    lib_dir = llama_lib_dir()
    ffi.set_source(
        MODULE_NAME,
        "".join(f'#include "{h}"\n' for h in _HEADERS),
        sources=[str(src_dir / s) for s in _SOURCES],
        include_dirs=[str(src_dir), str(llama_include_dir())],
        # Link the .so.0 copy by soname: it is the one libllama.so loaded (see docs/internals).
        libraries=[":libggml-base.so.0", ":libggml-cpu.so.0", "m"],
        library_dirs=[str(lib_dir)],
        extra_compile_args=["-O2", "-std=gnu11", "-pthread", "-Wall", "-Wextra",
                            "-Werror=implicit-function-declaration"],
        extra_link_args=[f"-Wl,-rpath,{lib_dir}", "-pthread"],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("building native module in %s", out_dir)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        try:
            built = Path(ffi.compile(tmpdir=tmp, verbose=False))
        except Exception as exc:
            raise NativeError(
                f"could not compile the native module ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                "install gcc and the Python headers, then run `spac build-native`"
            ) from exc
        final = out_dir / built.name
        os.replace(built, final)
    return final


@cache
def load() -> ModuleType:
    """Import the native module, building it first when no matching build exists."""
    path = build()
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    if spec is None or spec.loader is None:
        raise NativeError(f"cannot load the native module at {path}; run `spac build-native --force`")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        raise NativeError(f"cannot load the native module at {path} ({exc}); run `spac build-native --force`") from exc
    return module
