"""Where this machine's measured cost model is stored, and loading it (``spac calibrate`` writes it).

Calibrations are cached per machine and model as JSON under ``cache_dir("calibration")``
(``$SPAC_CALIBRATION_CACHE`` overrides it).
"""

from __future__ import annotations

import hashlib
import os
import platform
import socket
from pathlib import Path
from typing import Any

from spac_llamacpp.base.cache import cache_dir
from spac_llamacpp.planning.costmodel import CostModel


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = meminfo()
    return {
        "hostname": socket.gethostname(),
        "cpu": cpu,
        "n_cpu": os.cpu_count() or 1,
        "mem_total": mem.get("MemTotal", 0),
        "platform": platform.platform(),
    }


def machine_id(info: dict[str, Any] | None = None) -> str:
    info = info or machine_info()
    key = f"{info['hostname']}|{info['cpu']}|{info['n_cpu']}|{int(info['mem_total']) >> 28}"
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def model_key(model: str | os.PathLike[str] | None) -> str:
    if model is None:
        return "generic"
    p = Path(model).resolve()
    try:
        st = p.stat()
        sig = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        sig = str(p)
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in p.stem)[:40]
    return f"{stem}-{hashlib.sha1(sig.encode()).hexdigest()[:10]}"


def calibration_path(model: str | os.PathLike[str] | None = None) -> Path:
    """Where the calibration of this machine (and ``model``) is cached."""
    return cache_dir("calibration", "SPAC_CALIBRATION_CACHE") / f"{machine_id()}-{model_key(model)}.json"


def meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[name] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    except OSError:
        pass
    return out


def load_cached(model: str | os.PathLike[str] | None = None) -> CostModel | None:
    """The cached calibration of this machine for ``model`` (else the generic one), or None."""
    for key in ([model, None] if model is not None else [None]):
        path = calibration_path(key)
        if path.is_file():
            return CostModel.load(path)
    return None


def machine_cost_model(model: str | os.PathLike[str] | None = None) -> CostModel:
    """This machine's cached calibration for ``model`` (else the generic one), else nominal costs."""
    return load_cached(model) or CostModel.nominal()
