"""Streaming GGUF rewrites: copy a model tensor by tensor, changing some, without loading it whole.

Shared by the MoEfication writer (``moefy/writer.py``) and ``spac patch`` (``gguf_patch.py``). A
rewrite is a list of :class:`Entry` (name, shape, type, and a function producing the bytes when the
writer gets there); the file is written under a temporary name and renamed when complete
(:func:`~spac_llamacpp.base.atomic.atomic_output`: a failed write leaves nothing behind).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from spac_llamacpp.base.atomic import atomic_output, close_quietly
from spac_llamacpp.base.errors import SpacError


@dataclass
class Entry:
    """One tensor of the output file."""

    name: str
    shape: tuple[int, ...]  # numpy order; for raw quantised data, the byte shape
    dtype: np.dtype
    nbytes: int
    raw: gguf.GGMLQuantizationType | None
    produce: Callable[[], np.ndarray]


def raw_entry(t: gguf.ReaderTensor, name: str | None = None, rows: np.ndarray | None = None) -> Entry:
    """Tensor ``t`` copied as stored (quantised blocks included), optionally with its first numpy axis
    re-ordered by ``rows`` (for stacked experts: the expert axis)."""
    data = t.data
    quantized = t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)

    def produce() -> np.ndarray:
        return np.ascontiguousarray(data if rows is None else data[rows])

    return Entry(name or t.name, tuple(data.shape), data.dtype, int(data.nbytes),
                 t.tensor_type if quantized else None, produce)


def copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, skip: set[str],
                  rename: tuple[str, str] | None = None) -> None:
    """Copy every key of ``reader`` but ``skip`` (and the ``GGUF.*`` header fields); ``rename``
    (old prefix, new prefix) renames architecture keys."""
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in skip:
            continue
        key = field.name
        if rename is not None and key.startswith(rename[0]):
            key = rename[1] + key[len(rename[0]):]
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def add_value(writer: gguf.GGUFWriter, key: str, value: object) -> None:
    """Add a scalar key with the GGUF type its Python type suggests."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value) if value >= 0 else writer.add_int32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_string(key, str(value))


def write_entries(dst: str | os.PathLike[str], arch: str, entries: Sequence[Entry],
                  add_metadata: Callable[[gguf.GGUFWriter], None], *, progress: bool = True) -> Path:
    """Write ``entries`` (in order) with the metadata ``add_metadata`` adds; return the path."""
    dst = Path(dst)
    with atomic_output(dst) as tmp:  # a full disk or an interrupt leaves no partial file (base/atomic.py)
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            add_metadata(writer)
            for e in entries:
                writer.add_tensor_info(e.name, e.shape, e.dtype, e.nbytes, raw_dtype=e.raw)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            # bytes, not tensors: a 20 GB model's tensors differ in size by 1000x; only on a terminal
            with tqdm(total=sum(e.nbytes for e in entries), desc=f"write {dst.name}", unit="B", unit_scale=True,
                      unit_divisor=1024, disable=None if progress else True, leave=False) as bar:
                for e in entries:
                    arr = e.produce()
                    if arr.nbytes != e.nbytes:
                        raise SpacError(f"{e.name}: produced {arr.nbytes} bytes, expected {e.nbytes}")
                    writer.write_tensor_data(arr)
                    bar.update(e.nbytes)
            writer.close()  # the last flush: its failure is a failed write too
        except BaseException:
            close_quietly(writer)
            raise
    return dst
