"""``spac calibrate``: measure the cost model on this machine (``costmodel.CostModel``).

What is measured, and how:

- **CPU expert matmuls, per weight type and batch size**, with llama.cpp's own kernels: two factory
  MoE models per type that differ only in the expert FFN width (every token uses every expert, so each
  of the 2 layers x E experts runs one ``MUL_MAT_ID`` gate/up/down on every token). Evaluating ``b``
  tokens after a reset, the time difference between the wide and the narrow model divided by the
  experts and by the difference of their bytes is the seconds per expert weight byte of an activation
  with ``b`` tokens. The wide model's experts (~100-200 MB) do not fit the last-level cache, as a real
  model's do not. Models are loaded file-backed (``use_extra_bufts=False``, no repacking), as the
  flash tier runs them.
- **Flash reads of expert-sized ranges, cold page cache**: a temporary file of random bytes next to
  the model (or in the cache directory) is written and fsync'ed, ``posix_fadvise(DONTNEED)`` drops it
  from the page cache, then expert-sized ranges at random offsets are read by ``pread`` (planned
  reads) and by touching a memory map page by page (what an on-demand miss of a memory-mapped model
  costs). ``latency + bytes / bandwidth`` is fitted over the sizes.
- **RAM -> VRAM** with ``ggml_backend_tensor_set`` into a buffer of the first GPU device, when
  llama.cpp has one; otherwise recorded as absent.
- **Budget actually available**: ``MemAvailable`` (and the GPU's free memory).

Results are cached per machine and model as JSON under ``cache_dir("calibration")``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from spac_llamacpp.base.cache import cache_dir
from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.native.gpu import device_memory, gpu_devices, measure_upload
from spac_llamacpp.native.quantize import quantize_model, quiet_llama_log
from spac_llamacpp.planning.calibration import machine_id, machine_info, meminfo, model_key
from spac_llamacpp.planning.costmodel import CostModel, CpuKernel, GpuCost, ReadCost

log = logging.getLogger(__name__)

# ggml type name -> llama_ftype, quantized from an F32 factory model with pure=True (experts only)
_FTYPES = {"F32": 0, "F16": 1, "Q8_0": 7, "Q4_0": 2, "BF16": 32, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
           "Q3_K": 11, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18}
DEFAULT_TYPES = ("F16", "Q8_0", "Q4_0")
DEFAULT_BATCHES = (1, 2, 4, 8)
_GGML_TYPE_I8 = 24


def calibratable_types() -> tuple[str, ...]:
    return tuple(_FTYPES)


# --------------------------------------------------------------------------------------------------
# Machine and cache


def default_threads() -> int:
    """llama-cpp-python's default decode thread count."""
    return max(multiprocessing.cpu_count() // 2, 1)


# --------------------------------------------------------------------------------------------------
# CPU




@contextlib.contextmanager
def _mute_fds() -> Iterator[None]:
    """Send file descriptors 1 and 2 to /dev/null (llama.cpp writes there directly)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = (os.dup(1), os.dup(2))
    except (OSError, ValueError, AttributeError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _quantize(src: Path, dst: Path, ggml_type: str, threads: int) -> Path:
    """``llama_model_quantize`` the routed experts of ``src`` to ``ggml_type``; other matrices stay F32."""
    if ggml_type == "F32":
        return src
    quantize_model(src, dst, _FTYPES[ggml_type], [(r"^(?!.*_exps\.weight$)", 0)], threads=threads)  # 0: F32
    return dst


def _write_model(d: Path, ggml_type: str, ff: int, n_embd: int, n_expert: int, n_layer: int, threads: int,
                 f32_cache: dict[int, Path]) -> Path:
    from spac_llamacpp.models.factory import write_tiny_moe

    if ggml_type not in _FTYPES:
        raise SpacError(f"cannot calibrate weight type {ggml_type}; calibratable: {', '.join(calibratable_types())}")
    src = f32_cache.get(ff)
    if src is None:
        src = write_tiny_moe(d / f"src-f32-{ff}.gguf", "qwen3moe", dtype="f32", n_layer=n_layer, n_embd=n_embd,
                             n_expert=n_expert, n_expert_used=n_expert, n_ff_exp=ff, n_vocab=300, n_head=4)
        f32_cache[ff] = src
    return _quantize(src, d / f"{ggml_type}-{ff}.gguf", ggml_type, threads)


def _time_batches(model: Path, batches: Sequence[int], threads: int, repeats: int) -> dict[int, float]:
    """Min wall time of evaluating ``b`` tokens from an empty context, per batch size."""
    from spac_llamacpp.llama import Llama

    with quiet_llama_log(), _mute_fds():
        llm = Llama(str(model), n_ctx=64, n_batch=64, n_threads=threads, n_threads_batch=threads, verbose=False,
                    use_extra_bufts=False, routing=False)
    try:
        out: dict[int, float] = {}
        llm.reset()
        llm.eval([5, 6])  # warm-up: page in the weights, build the graph once
        for b in batches:
            best = float("inf")
            for r in range(repeats):
                llm.reset()
                toks = [(7 + 13 * r + j) % 250 + 1 for j in range(b)]
                t0 = time.perf_counter()
                llm.eval(toks)
                best = min(best, time.perf_counter() - t0)
            out[b] = best
        return out
    finally:
        with _mute_fds():  # llama.cpp prints buffer sizes on close
            llm.close()


def _expert_bytes(model: Path) -> int:
    from spac_llamacpp.gguf.info import inspect_model

    info = inspect_model(model)
    return info.layer_expert_bytes(info.moe_layers[0])


def measure_cpu(
    types: Sequence[str] = DEFAULT_TYPES,
    batches: Sequence[int] = DEFAULT_BATCHES,
    threads: int | None = None,
    *,
    n_embd: int = 1024,
    ff_small: int = 256,
    ff_big: int = 2048,
    n_expert: int = 8,
    n_layer: int = 2,
    repeats: int = 5,
    workdir: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, CpuKernel], dict[str, Any]]:
    """Seconds per expert weight byte of one activation with b tokens, per type (see the module doc)."""
    threads = threads or default_threads()
    batches = tuple(sorted(set(int(b) for b in batches)))
    kernels: dict[str, CpuKernel] = {}
    raw: dict[str, Any] = {"threads": threads, "n_embd": n_embd, "ff": [ff_small, ff_big], "n_expert": n_expert,
                           "n_layer": n_layer, "types": {}}
    with tempfile.TemporaryDirectory(prefix="spac-cal-", dir=workdir) as tmp:
        d = Path(tmp)
        f32_cache: dict[int, Path] = {}
        for ty in types:
            if progress:
                progress(f"CPU {ty}")
            times = {}
            nbytes = {}
            for ff in (ff_small, ff_big):
                path = _write_model(d, ty, ff, n_embd, n_expert, n_layer, threads, f32_cache)
                nbytes[ff] = _expert_bytes(path)
                times[ff] = _time_batches(path, batches, threads, repeats)
                if ty != "F32":
                    path.unlink()
            per = []
            for b in batches:
                dt = (times[ff_big][b] - times[ff_small][b]) / (n_layer * n_expert)
                per.append(max(dt, 1e-9) / (nbytes[ff_big] - nbytes[ff_small]))
            # time with more tokens is never less: enforce monotone measurements
            per = list(np.maximum.accumulate(per))
            kernels[ty] = CpuKernel(batches, tuple(per))
            raw["types"][ty] = {
                "expert_bytes": [nbytes[ff_small], nbytes[ff_big]],
                "seconds": {str(b): [times[ff_small][b], times[ff_big][b]] for b in batches},
            }
    return kernels, raw


# --------------------------------------------------------------------------------------------------
# Flash


def _fit_affine(sizes: Sequence[int], seconds: Sequence[float]) -> ReadCost:
    """Least squares ``t = latency + size / bandwidth`` (latency >= 0)."""
    s = np.asarray(sizes, dtype=np.float64)
    t = np.asarray(seconds, dtype=np.float64)
    if len(set(s.tolist())) >= 2:
        slope, icept = np.polyfit(s, t, 1)
    else:
        slope, icept = t[0] / s[0], 0.0
    if slope <= 0:  # noise: fall back to the largest size's throughput
        k = int(np.argmax(s))
        slope, icept = t[k] / s[k], 0.0
    if icept < 0:
        slope, icept = float(np.sum(t * s) / np.sum(s * s)), 0.0
    return ReadCost(bandwidth=float(1.0 / slope), latency_s=max(float(icept), 0.0))


def flash_test_dir(model: str | os.PathLike[str] | None = None) -> Path:
    """Where the flash measurement writes its test file: the model's directory (the device its experts are read
    from) when it is writable, else the calibration cache, else the system's temporary directory (an installed,
    read-only package, a read-only mount)."""
    cache = cache_dir("calibration", "SPAC_CALIBRATION_CACHE")
    candidates = [Path(model).resolve().parent] if model is not None else []
    for d in [*candidates, cache, Path(tempfile.gettempdir())]:
        if d == cache:
            with contextlib.suppress(OSError):
                d.mkdir(parents=True, exist_ok=True)
        if d.is_dir() and os.access(d, os.W_OK | os.X_OK):
            return d
    raise SpacError("no writable directory for the flash measurement's test file; pass --flash-dir DIR")


def measure_flash(
    directory: str | os.PathLike[str] | None = None,
    sizes: Sequence[int] = (256 << 10, 1 << 20, 4 << 20),
    *,
    file_bytes: int = 256 << 20,
    reads_per_size: int = 24,
    progress: Callable[[str], None] | None = None,
) -> tuple[ReadCost, ReadCost, dict[str, Any]]:
    """(on-demand mmap miss cost, planned pread cost, raw numbers) for reads of ``sizes`` bytes."""
    directory = Path(directory) if directory else cache_dir("calibration", "SPAC_CALIBRATION_CACHE")
    directory.mkdir(parents=True, exist_ok=True)
    page = mmap.PAGESIZE
    sizes = sorted({max(page, int(s)) for s in sizes})
    file_bytes = max(int(file_bytes), 4 * sizes[-1])
    rng = np.random.default_rng(1234)
    raw: dict[str, Any] = {"directory": str(directory), "file_bytes": file_bytes, "sizes": sizes, "pread": {},
                           "mmap": {}}
    fd, name = tempfile.mkstemp(prefix="spac-flash-", suffix=".bin", dir=directory)
    try:
        if progress:
            progress(f"flash: writing {file_bytes >> 20} MiB in {directory}")
        chunk = rng.integers(0, 256, size=1 << 20, dtype=np.uint8).tobytes()
        written = 0
        while written < file_bytes:
            n = min(len(chunk), file_bytes - written)
            os.write(fd, chunk[:n])
            written += n
        os.fsync(fd)
        have_fadvise = hasattr(os, "posix_fadvise")
        raw["fadvise"] = have_fadvise

        def drop() -> None:
            if have_fadvise:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

        for method in ("pread", "mmap"):
            if progress:
                progress(f"flash: {method} reads")
            for size in sizes:
                slots = file_bytes // size
                offs = (rng.permutation(slots)[: min(slots, reads_per_size)] * size).tolist()
                drop()
                buf = bytearray(size)
                t0 = time.perf_counter()
                if method == "pread":
                    for off in offs:
                        os.preadv(fd, [buf], off)
                    dt = time.perf_counter() - t0
                else:
                    with mmap.mmap(fd, file_bytes, prot=mmap.PROT_READ) as mm:
                        arr = np.frombuffer(mm, dtype=np.uint8)
                        t0 = time.perf_counter()
                        acc = 0
                        for off in offs:
                            acc += int(arr[off : off + size : page].sum())
                        dt = time.perf_counter() - t0
                        del arr
                raw[method][str(size)] = dt / len(offs)
    finally:
        os.close(fd)
        os.unlink(name)
    miss = _fit_affine(sizes, [raw["mmap"][str(s)] for s in sizes])
    pre = _fit_affine(sizes, [raw["pread"][str(s)] for s in sizes])
    return miss, pre, raw


# --------------------------------------------------------------------------------------------------
# GPU


def measure_gpu() -> tuple[GpuCost, dict[str, Any]]:
    devs = gpu_devices()
    if not devs:
        return GpuCost(present=False), {"note": "llama.cpp has no GPU device on this machine"}
    free, total, name = device_memory(devs[0])
    try:
        sizes = (1 << 20, 4 << 20, 16 << 20)
        raw = measure_upload(devs[0], sizes)
        h2d = _fit_affine(list(sizes), [raw[str(s)] for s in sizes])
    except Exception as exc:  # noqa: BLE001 - keep the assumed link speed, say why
        log.warning("could not measure RAM->VRAM copies (%s); using assumed values", exc)
        return GpuCost(present=True, measured=False, name=name, free_bytes=free), {"error": str(exc)}
    # expert matmul throughput on the GPU is not measured (no GPU kernels are timed): assumed
    return GpuCost(present=True, measured=False, name=name, h2d=h2d, free_bytes=free), {
        "h2d": raw, "total_bytes": total, "note": "h2d measured; GPU expert matmul time assumed"}


# --------------------------------------------------------------------------------------------------
# Top level


def calibrate(
    model: str | os.PathLike[str] | None = None,
    *,
    threads: int | None = None,
    types: Sequence[str] | None = None,
    batches: Sequence[int] = DEFAULT_BATCHES,
    flash_dir: str | os.PathLike[str] | None = None,
    flash_bytes: int = 256 << 20,
    cpu_kw: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> CostModel:
    """Measure everything (about 20 s on 2 cores with the defaults) and return the cost model."""
    t0 = time.perf_counter()
    model_meta = None
    read_sizes: list[int] = [256 << 10, 1 << 20, 4 << 20]
    want = list(types) if types else list(DEFAULT_TYPES)
    if model is not None:
        from spac_llamacpp.gguf.info import inspect_model

        info = inspect_model(model)
        model_types = sorted({t.ggml_type for t in info.expert_tensors if not t.is_chunk and "bias" not in t.kind
                              and "scale" not in t.kind})
        for ty in model_types:
            if ty not in want and ty in calibratable_types():
                want.append(ty)
        slices = sorted({t.bytes_per_expert for t in info.expert_tensors if not t.is_chunk})
        read_sizes = sorted(set([max(mmap.PAGESIZE, s) for s in slices][-3:] + [256 << 10, 4 << 20]))
        model_meta = {"path": str(Path(model).resolve()), "size": info.file_size, "expert_types": model_types,
                      "key": model_key(model)}
        if flash_dir is None:
            flash_dir = flash_test_dir(model)
            if flash_dir != Path(model).resolve().parent and progress:
                progress(f"flash: {Path(model).resolve().parent} is not writable; measuring in {flash_dir} "
                         "(pass --flash-dir for a directory on the model's device)")
    threads = threads or default_threads()
    kernels, cpu_raw = measure_cpu(want, batches, threads, progress=progress, **(cpu_kw or {}))
    miss, pre, flash_raw = measure_flash(flash_dir, read_sizes, file_bytes=flash_bytes, progress=progress)
    if progress:
        progress("GPU")
    gpu, gpu_raw = measure_gpu()
    mem = meminfo()
    info = machine_info()
    return CostModel(
        cpu=kernels,
        flash_miss=miss,
        flash_prefetch=pre,
        gpu=gpu,
        mem_available=mem.get("MemAvailable", 0),
        mem_total=mem.get("MemTotal", 0),
        threads=threads,
        machine={**info, "id": machine_id(info)},
        model=model_meta,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        extra={"cpu": cpu_raw, "flash": flash_raw, "gpu": gpu_raw, "seconds": round(time.perf_counter() - t0, 2)},
    )


def format_calibration(cm: CostModel) -> str:
    from spac_llamacpp.base.sizes import format_size

    lines = [
        f"calibration   {cm.source or '(not saved)'}",
        f"created       {cm.created}  ({cm.extra.get('seconds', '?')} s)",
        f"machine       {cm.machine.get('cpu', '?')}, {cm.machine.get('n_cpu', '?')} CPUs, "
        f"{format_size(cm.mem_total)} RAM; {cm.threads} threads",
    ]
    if cm.model:
        types = ", ".join(cm.model.get("expert_types", []))
        lines.append(f"model         {cm.model.get('path')}  (expert types {types})")
    lines.append(f"memory        MemAvailable {format_size(cm.mem_available)}")
    lines.append("CPU expert matmul, ns per weight byte of one activation with b tokens (GB/s at b=1):")
    for ty, k in sorted(cm.cpu.items()):
        vals = "  ".join(f"b={b}: {1e9 * s:.4f}" for b, s in zip(k.batch, k.s_per_byte, strict=True))
        lines.append(f"  {ty:<6} {vals}   ({1e-9 / k.s_per_byte[0]:.1f} GB/s)")
    lines.append(f"flash miss    (mmap, cold) {cm.flash_miss.bandwidth / 1e6:.0f} MB/s + "
                 f"{1e3 * cm.flash_miss.latency_s:.3f} ms per range")
    lines.append(f"flash read    (pread, cold) {cm.flash_prefetch.bandwidth / 1e6:.0f} MB/s + "
                 f"{1e3 * cm.flash_prefetch.latency_s:.3f} ms per range")
    g = cm.gpu
    if g.present:
        lines.append(
            f"GPU           {g.name}: free {format_size(g.free_bytes)}; RAM->VRAM {g.h2d.bandwidth / 1e9:.1f} GB/s"
            f" + {1e6 * g.h2d.latency_s:.1f} us; expert matmul {'measured' if g.measured else 'assumed'} "
            f"{g.bandwidth / 1e9:.0f} GB/s + {1e6 * g.launch_s:.0f} us"
        )
    else:
        lines.append(
            f"GPU           absent (vram-tier numbers use assumed values: RAM->VRAM {g.h2d.bandwidth / 1e9:.0f} GB/s, "
            f"expert matmul {g.bandwidth / 1e9:.0f} GB/s + {1e6 * g.launch_s:.0f} us)"
        )
    return "\n".join(lines)


def dumps(cm: CostModel) -> str:
    return json.dumps(cm.to_json(), indent=2)
