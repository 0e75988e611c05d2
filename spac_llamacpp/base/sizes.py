"""Byte sizes on the command line: ``123456``, ``512KiB``, ``6GiB``, ``1.5GB``.

Binary units (``KiB``, ``MiB``, ``GiB``, ``TiB``, and the short ``K``, ``M``, ``G``, ``T``, as in
llama.cpp and ``free -h``) are powers of 1024; decimal units (``kB``, ``KB``, ``MB``, ``GB``, ``TB``) are
powers of 1000; ``B`` or no unit means bytes. Units are case-insensitive except that ``KB``/``MB``...
stay decimal. Fractions are allowed and rounded down to a whole byte.
"""

from __future__ import annotations

import math
import re

from spac_llamacpp.base.errors import SpacError

_BINARY = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DECIMAL = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Parse a byte size; raises a one-line :class:`SpacError` on anything else."""
    if isinstance(text, bool):
        raise SpacError(f"invalid size {text!r}; give bytes or a unit, e.g. 123456, 512KiB, 6GiB")
    if isinstance(text, int):
        if text < 0:
            raise SpacError(f"invalid size {text}: must not be negative")
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise SpacError(f"invalid size {text!r}; give bytes or a unit, e.g. 123456, 512KiB, 6GiB")
    number, unit = m.group(1), m.group(2)
    u = unit.lower()
    if u.endswith("ib") and u[:-2] in _BINARY and u[:-2]:
        mult = _BINARY[u[:-2]]
    elif u in _DECIMAL:
        mult = _DECIMAL[u]
    elif u in _BINARY:
        mult = _BINARY[u]
    else:
        raise SpacError(f"invalid size {text!r}: unknown unit {unit!r}; use B, KiB, MiB, GiB, TiB (or kB, MB, GB)")
    value = float(number) * mult
    if not math.isfinite(value) or value > 2**62:
        raise SpacError(f"invalid size {text!r}: too large")
    return int(value)


def format_size(n: float) -> str:
    """Human-readable binary size, e.g. ``4.00 GiB``."""
    n = float(n)
    for unit, div in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"
