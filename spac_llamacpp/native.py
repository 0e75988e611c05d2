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
import sys
import tempfile
from functools import cache
from pathlib import Path
from types import ModuleType

from .cache import cache_dir
from .errors import NativeError
from .libs import llama_include_dir, llama_lib_dir

log = logging.getLogger(__name__)

MODULE_NAME = "_spac_native"

CDEF = """
struct ggml_tensor;
typedef bool (*spac_eval_cb)(struct ggml_tensor *t, bool ask, void *user_data);
typedef void (*spac_layer_hook)(void *hook_data, int32_t layer, const uint8_t *mask);
typedef struct spac_cache_prior {
    float lambda; int32_t top_j; int32_t max_rows; int32_t gating; float ema;
    uint8_t *resident; float *range_avg;
    float *saved; size_t saved_cap; int32_t *orig_topk; size_t orig_cap;
    struct ggml_tensor *saved_tensor; int32_t saved_layer; int64_t saved_rows;
    int64_t n_rows; int64_t n_selections; int64_t n_changed;
} spac_cache_prior;
typedef struct spac_sensor {
    int32_t n_layer; int32_t n_expert; int32_t k_max; int32_t capacity;
    int32_t *ids; int32_t *step_counts; int64_t *total_counts; int32_t *step_layer_tokens;
    int64_t n_tokens; int64_t n_ubatches; int64_t n_events; int64_t n_bad_ids; int64_t n_bad_events;
    int32_t last_layer; int32_t ubatch_tokens; int32_t enabled; int32_t user_asked;
    spac_eval_cb user_cb; void *user_data;
    uint8_t *scratch; size_t scratch_size;
    spac_layer_hook layer_hook; void *hook_data; uint8_t *event_mask;
    spac_cache_prior *prior;
} spac_sensor;
bool spac_sensor_cb(struct ggml_tensor *t, bool ask, void *user_data);
void spac_sensor_flush(spac_sensor *s);
void spac_sensor_release(spac_sensor *s);
int32_t spac_node_layer(const char *name, const char *prefix);
const char *spac_tensor_name(const struct ggml_tensor *t);
int64_t spac_tensor_copy_f32_rows(struct ggml_tensor *t, float *dst, int64_t max_rows, int64_t n_cols);

typedef struct spac_engine spac_engine;
typedef struct spac_engine_stats {
    int64_t prefetches, prefetch_bytes, evictions, evict_bytes, pins, unpins, pin_failures, superseded, deferred,
            demand_hits, demand_misses, transient_evictions, queue_full, errors, last_errno, queued,
            demand_wait_ns;
} spac_engine_stats;
spac_engine *spac_engine_new(int32_t n_layer, int32_t n_expert, int32_t max_tensors_per_layer, uint8_t *map_base,
                             uint64_t map_size, int32_t fd, int32_t n_threads, int32_t queue_capacity);
int32_t spac_engine_add_tensor(spac_engine *e, int32_t layer, uint64_t file_offset, uint64_t bytes_per_expert);
int32_t spac_engine_start(spac_engine *e);
int32_t spac_engine_submit(spac_engine *e, int32_t op, int32_t layer, int32_t expert);
void spac_engine_set_wanted(spac_engine *e, int32_t layer, int32_t expert, int32_t wanted);
void spac_engine_on_layer(void *engine, int32_t layer, const uint8_t *mask);
void spac_engine_end_step(spac_engine *e);
int32_t spac_engine_wait_idle(spac_engine *e, int32_t timeout_ms);
int64_t spac_engine_residency(spac_engine *e, float *frac);
int32_t spac_engine_lock_range(spac_engine *e, uint64_t file_offset, uint64_t length, int32_t lock);
void spac_engine_get_stats(spac_engine *e, spac_engine_stats *out);
void spac_engine_stop(spac_engine *e);
void spac_engine_free(spac_engine *e);
"""

_SOURCES = ("spac_sensor.c", "spac_engine.c")
_HEADERS = ("spac_sensor.h", "spac_engine.h")


def native_source_dir() -> Path:
    """Directory holding the C sources: ``native/`` of a checkout, or the copy shipped in the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "native", here / "native_src"):
        if (candidate / _SOURCES[0]).is_file():
            return candidate
    raise NativeError(
        f"the C sources of the native module are missing (looked in {here.parent / 'native'}); "
        "reinstall spac-llamacpp from its source tree"
    )


def _build_key(src_dir: Path) -> str:
    h = hashlib.sha256()
    for name in (*_SOURCES, *_HEADERS):
        h.update((src_dir / name).read_bytes())
    for header in ("ggml.h", "ggml-backend.h"):
        h.update((llama_include_dir() / header).read_bytes())
    lib = llama_lib_dir() / "libggml-base.so.0"
    st = lib.stat()
    h.update(f"{lib}:{st.st_size}:{st.st_mtime_ns}:{sys.version_info[:2]}".encode())
    h.update(CDEF.encode())
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
    ffi.cdef(CDEF)
    lib_dir = llama_lib_dir()
    ffi.set_source(
        MODULE_NAME,
        '#include "spac_sensor.h"\n#include "spac_engine.h"',
        sources=[str(src_dir / s) for s in _SOURCES],
        include_dirs=[str(src_dir), str(llama_include_dir())],
        # Link the .so.0 copy by soname: it is the one libllama.so loaded (see docs/internals).
        libraries=[":libggml-base.so.0", "m"],
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
