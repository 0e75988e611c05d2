"""This machine's memory facts for automatic placement (``spac fit``, ``tier="auto"``).

:func:`read_machine_facts` reads

- ``MemAvailable`` of ``/proc/meminfo``,
- the memory limit of this process's cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``; the smallest
  over the cgroup and its ancestors) and what the cgroup uses of it, less its reclaimable inactive file
  pages (``memory.current`` / ``memory.usage_in_bytes`` minus ``inactive_file``),
- every GPU device of llama.cpp's ggml registry with its free and total memory
  (``ggml_backend_dev_memory``, the backend's own query: CUDA's ``cudaMemGetInfo``),
- the patch level of the installed llama.cpp (the VRAM tier needs spac's expert pool).

``$SPAC_MACHINE_FACTS`` replaces the measurement (tests, "what would it choose on that machine?"): a JSON
object, or ``@path`` of a file holding one, with any of the fields of :class:`MachineFacts` (sizes in bytes or
as size strings, ``gpus`` a list of ``{"name", "free", "total"}``); fields left out are read from this
machine.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.base.sizes import format_size, parse_size

FACTS_ENV = "SPAC_MACHINE_FACTS"
CGROUP_ROOT = Path("/sys/fs/cgroup")
_UNLIMITED = 1 << 60  # v1 reports "no limit" as a page-rounded LONG_MAX


@dataclass(frozen=True)
class GpuFacts:
    """One GPU device as llama.cpp's ggml sees it."""

    name: str
    free: int
    total: int
    index: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "free": self.free, "total": self.total}


@dataclass(frozen=True)
class MachineFacts:
    """Memory this process may use, as measured (or as ``$SPAC_MACHINE_FACTS`` says)."""

    mem_available: int  # /proc/meminfo MemAvailable
    cgroup_limit: int | None = None  # None: no cgroup memory limit
    cgroup_usage: int = 0  # what the cgroup uses now, reclaimable inactive file pages excluded
    gpus: tuple[GpuFacts, ...] = ()
    patch_level: int = 0  # spac's llama.cpp patch series installed (native.libs.spac_patch_level)
    source: str = "measured"  # "measured" or where an override came from
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ram_available(self) -> int:
        """RAM this process can still get: MemAvailable, capped by what the cgroup limit leaves."""
        if self.cgroup_limit is None:
            return int(self.mem_available)
        return max(0, min(int(self.mem_available), int(self.cgroup_limit) - int(self.cgroup_usage)))

    @property
    def gpu(self) -> GpuFacts | None:
        """The GPU placement uses: the one with the most free memory (llama.cpp's main GPU is device 0; with
        one GPU they are the same)."""
        return max(self.gpus, key=lambda g: g.free) if self.gpus else None

    def describe(self) -> str:
        ram = f"{format_size(self.ram_available)} RAM available"
        if self.cgroup_limit is not None:
            ram += (f" (MemAvailable {format_size(self.mem_available)}, cgroup limit {format_size(self.cgroup_limit)}"
                    f" of which {format_size(self.cgroup_usage)} in use)")
        gpu = self.gpu
        vram = ("no GPU" if gpu is None
                else f"{gpu.name or 'GPU'}: {format_size(gpu.free)} of {format_size(gpu.total)} free")
        return f"{ram}; {vram}" + ("" if self.source == "measured" else f" [{self.source}]")

    def to_json(self) -> dict[str, Any]:
        return {"mem_available": self.mem_available, "cgroup_limit": self.cgroup_limit,
                "cgroup_usage": self.cgroup_usage, "ram_available": self.ram_available,
                "gpus": [g.to_json() for g in self.gpus], "patch_level": self.patch_level, "source": self.source}


# --------------------------------------------------------------------------------------------------
# reading


def mem_available(meminfo: str | os.PathLike[str] = "/proc/meminfo") -> int:
    """``MemAvailable`` in bytes."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError as exc:
        raise SpacError(f"cannot read {meminfo} ({exc.strerror}); automatic placement needs Linux") from None
    raise SpacError(f"{meminfo} has no MemAvailable; automatic placement needs Linux 3.14 or newer")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _UNLIMITED else value


def _stat_value(path: Path, *keys: str) -> int:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    values = dict(line.split(None, 1) for line in lines if " " in line)
    for k in keys:
        if k in values:
            try:
                return int(values[k])
            except ValueError:
                return 0
    return 0


def _ancestors(root: Path, rel: str) -> list[Path]:
    """``root/rel`` and every directory above it up to ``root``, innermost first (those that exist)."""
    parts = [p for p in rel.strip("/").split("/") if p]
    out = []
    for n in range(len(parts), -1, -1):
        d = root.joinpath(*parts[:n])
        if d.is_dir():
            out.append(d)
    return out


def cgroup_memory(proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup",
                  root: Path = CGROUP_ROOT) -> tuple[int | None, int]:
    """``(limit, usage)`` of this process's memory cgroup: the smallest limit over the cgroup and its ancestors
    (None: unlimited) and the usage of the cgroup that sets it, less reclaimable inactive file pages."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None, 0
    candidates: list[tuple[Path, str, str, tuple[str, ...]]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if "memory" in controllers.split(","):  # v1
            for base in (root / "memory", root):
                if (base / "memory.limit_in_bytes").exists() or base.joinpath(rel.strip("/")).is_dir():
                    candidates.append((base, rel, "v1", ()))
                    break
        elif controllers == "":  # v2 (unified)
            for base in (root, root / "unified"):
                if (base / "cgroup.controllers").exists():
                    candidates.append((base, rel, "v2", ()))
                    break
    best: tuple[int, int] | None = None
    for base, rel, kind, _ in candidates:
        for d in _ancestors(base, rel):
            if kind == "v1":
                limit = _read_int(d / "memory.limit_in_bytes")
                usage = _read_int(d / "memory.usage_in_bytes") or 0
                inactive = _stat_value(d / "memory.stat", "total_inactive_file", "inactive_file")
            else:
                limit = _read_int(d / "memory.max")
                usage = _read_int(d / "memory.current") or 0
                inactive = _stat_value(d / "memory.stat", "inactive_file")
            if limit is None:
                continue
            used = max(0, usage - inactive)
            if best is None or limit - used < best[0] - best[1]:
                best = (limit, used)
    return (None, 0) if best is None else best


def _gpus() -> tuple[tuple[GpuFacts, ...], tuple[str, ...]]:
    try:
        from spac_llamacpp.native.gpu import device_memory, gpu_devices

        out = []
        for i in gpu_devices():
            free, total, name = device_memory(i)
            out.append(GpuFacts(name, int(free), int(total), i))
        return tuple(out), ()
    except Exception as exc:  # noqa: BLE001 - no llama.cpp libraries: plan for the CPU, say why
        return (), (f"GPU query failed ({type(exc).__name__}: {exc}); planning without a GPU",)


def _patch_level() -> int:
    try:
        from spac_llamacpp.native.libs import spac_patch_level

        return int(spac_patch_level())
    except Exception:  # noqa: BLE001 - no llama.cpp: no patch
        return 0


def _size(value: Any, name: str) -> int:
    try:
        return parse_size(value) if isinstance(value, str) else int(value)
    except (SpacError, TypeError, ValueError):
        raise SpacError(f"${FACTS_ENV}: {name} must be a size (bytes or e.g. '8GiB'), not {value!r}") from None


def facts_from_json(data: dict[str, Any], base: MachineFacts | None = None, source: str = FACTS_ENV) -> MachineFacts:
    """Facts from a JSON object (the ``$SPAC_MACHINE_FACTS`` format); fields left out come from ``base``, else
    from this machine."""
    if not isinstance(data, dict):
        raise SpacError(f"${FACTS_ENV} must be a JSON object, e.g. '{{\"mem_available\": \"8GiB\", \"gpus\": []}}'")
    known = {"mem_available", "cgroup_limit", "cgroup_usage", "gpus", "patch_level"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpacError(f"${FACTS_ENV}: unknown field {unknown[0]!r}; known: {', '.join(sorted(known))}")
    if base is None:
        need_gpu = "gpus" not in data
        base = read_machine_facts(use_env=False, gpus=need_gpu, patch_level="patch_level" not in data)
    kw: dict[str, Any] = {"source": source}
    if "mem_available" in data:
        kw["mem_available"] = _size(data["mem_available"], "mem_available")
    if "cgroup_limit" in data:
        kw["cgroup_limit"] = None if data["cgroup_limit"] is None else _size(data["cgroup_limit"], "cgroup_limit")
    if "cgroup_usage" in data:
        kw["cgroup_usage"] = _size(data["cgroup_usage"], "cgroup_usage")
    if "gpus" in data:
        if not isinstance(data["gpus"], list):
            raise SpacError(f"${FACTS_ENV}: gpus must be a list of {{\"name\", \"free\", \"total\"}}")
        gpus = []
        for i, g in enumerate(data["gpus"]):
            if not isinstance(g, dict) or "free" not in g:
                raise SpacError(f"${FACTS_ENV}: gpus[{i}] needs at least \"free\" (bytes)")
            free = _size(g["free"], f"gpus[{i}].free")
            gpus.append(GpuFacts(str(g.get("name", f"GPU {i}")), free, _size(g.get("total", free), "total"),
                                 int(g.get("index", i))))
        kw["gpus"] = tuple(gpus)
    if "patch_level" in data:
        kw["patch_level"] = int(data["patch_level"])
    return replace(base, **kw)


def read_machine_facts(*, use_env: bool = True, gpus: bool = True, patch_level: bool = True) -> MachineFacts:
    """This machine's facts (``$SPAC_MACHINE_FACTS`` first, when set and ``use_env``)."""
    env = os.environ.get(FACTS_ENV) if use_env else None
    if env:
        text, source = env, FACTS_ENV
        if env.startswith("@"):
            try:
                text, source = Path(env[1:]).read_text(), env[1:]
            except OSError as exc:
                raise SpacError(f"${FACTS_ENV}: cannot read {env[1:]} ({exc.strerror})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpacError(f"${FACTS_ENV} is not valid JSON ({exc.msg} at character {exc.pos})") from None
        return facts_from_json(data, source=source)
    limit, usage = cgroup_memory()
    found, notes = _gpus() if gpus else ((), ())
    return MachineFacts(mem_available(), limit, usage, found, _patch_level() if patch_level else 0, notes=notes)
