"""Find llama.cpp's memory mapping of a GGUF file in this process (``/proc/self/maps``).

llama.cpp maps the file once, read-only, from the page that holds the first tensor byte to the
end. The flash-tier engine works on that
mapping, so it takes a snapshot of the file's mappings before the model loads and picks the one
that appeared during the load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from spac_llamacpp.base.errors import SpacError


@dataclass(frozen=True)
class FileMapping:
    start: int  # address
    end: int
    offset: int  # file offset of ``start``
    perms: str
    inode: int
    path: str

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def file_base(self) -> int:
        """The address file offset 0 would have (``start - offset``): address of offset x = file_base + x."""
        return self.start - self.offset


def file_mappings(path: str | os.PathLike[str], maps: str = "/proc/self/maps") -> list[FileMapping]:
    """Every mapping of ``path`` (matched by device and inode, so links and renames do not matter)."""
    st = os.stat(path)
    out = []
    with open(maps) as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) < 6:
                continue
            addr, perms, offset, dev, inode, name = parts
            if int(inode) != st.st_ino:
                continue
            major, minor = (int(x, 16) for x in dev.split(":"))
            if os.makedev(major, minor) != st.st_dev and not _same_file(name.strip(), st):
                continue
            lo, hi = (int(x, 16) for x in addr.split("-"))
            out.append(FileMapping(lo, hi, int(offset, 16), perms, int(inode), name.strip()))
    return out


def _same_file(name: str, st: os.stat_result) -> bool:
    # overlay file systems report another device number in maps than stat() does
    try:
        other = os.stat(name)
    except OSError:
        return False
    return other.st_ino == st.st_ino and other.st_dev == st.st_dev


def new_whole_file_mapping(path: str | os.PathLike[str], before: list[FileMapping], data_offset: int) -> FileMapping:
    """The new mapping (not in ``before``) that covers the file from ``data_offset`` to its end.

    llama.cpp maps from the page holding the first tensor byte (or from 0) to the end of the file.
    """
    size = Path(path).stat().st_size
    old = {(m.start, m.end) for m in before}
    found = [m for m in file_mappings(path)
             if (m.start, m.end) not in old and m.offset <= data_offset and m.offset + m.size >= size]
    if len(found) != 1:
        raise SpacError(
            f"could not find llama.cpp's mapping of {path} ({len(found)} candidates); the flash tier needs "
            "use_mmap=True and a single-file GGUF"
        )
    return found[0]


def other_mappings(path: str | os.PathLike[str], own: FileMapping) -> list[FileMapping]:
    """Mappings of ``path`` in this process outside ``own`` (whose range madvise and mlock may have split into
    several entries): another ``Llama`` of the same file, a reader's ``np.memmap``. Empty if the file is gone."""
    try:
        found = file_mappings(path)
    except OSError:
        return []
    return [m for m in found if m.end <= own.start or m.start >= own.end]


def resident_bytes(mappings: list[FileMapping], smaps: str = "/proc/self/smaps") -> int:
    """Bytes of ``mappings`` mapped in RAM (``Rss`` in ``smaps``): pages no other mapping can evict."""
    if not mappings:
        return 0
    ranges = [(m.start, m.end) for m in mappings]
    total = 0
    inside = False
    try:
        with open(smaps) as f:
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    inside = any(a <= lo and hi <= b for a, b in ranges)
                elif inside and head == "Rss:":
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return 0
    return total
