"""Output files that appear whole or not at all (``spac patch``, ``spac synth``, traces, profiles).

:func:`atomic_output` hands out a temporary file beside the output; the output is replaced by it only
when everything was written. A failure of any kind removes the temporary file, so a full disk, a
file size limit or an interrupt never leaves a partial model behind, and an existing output stays as
it was. A failed write is one :class:`SpacError` line that names the output (never the temporary
file) and the cause.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
from collections.abc import Iterator
from pathlib import Path

from spac_llamacpp.base.errors import SpacError

_NEAR = 1 << 20  # a short write this close to a limit is that limit's

# errors of writing a file (not of reading the inputs): these become one line naming the output
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM,
                          errno.ENOENT, errno.ENOTDIR, errno.EISDIR})


def temporary_name(path: Path) -> Path:
    """The temporary file beside ``path`` (hidden, per process)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def write_cause(exc: OSError, directory: Path, written: int) -> str:
    """What made a write fail, in words (numpy's short writes carry no errno: look at the limits)."""
    code = exc.errno
    if code is None and "written" in str(exc):  # numpy's tofile: "N requested and M written"
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and written + _NEAR >= limit:
            code = errno.EFBIG
        else:
            try:
                code = errno.ENOSPC if shutil.disk_usage(directory).free < _NEAR else None
            except OSError:
                code = None
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full" if code == errno.ENOSPC else "the disk quota is exhausted"
    if code == errno.EFBIG:
        return "the file size limit was reached (ulimit -f)"
    return exc.strerror or str(exc) or type(exc).__name__


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Write ``path`` through a temporary file: ``with atomic_output(out) as tmp: write(tmp)``.

    On success ``tmp`` replaces ``path``; on any exception ``tmp`` is removed and ``path`` is untouched.
    An ``OSError`` of writing (full disk, file size limit, quota, read-only or missing directory, ...)
    becomes a :class:`SpacError` line; other exceptions pass through unchanged.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno is not None and exc.errno not in WRITE_ERRNOS:
            raise
        written = _size(tmp)
        cause = write_cause(exc, path.parent, written)
        done = f" after {written} bytes" if written else ""
        raise SpacError(f"could not write {path}: {cause}{done}; nothing was written (free some space or choose "
                        "another output with -o, then run again)") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def close_quietly(closer: object) -> None:
    """Call ``closer.close()`` on a path that is already failing (its own error would hide the first)."""
    with contextlib.suppress(Exception):
        closer.close()  # type: ignore[attr-defined]
