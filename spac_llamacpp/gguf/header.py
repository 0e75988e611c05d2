"""The raw GGUF header: magic, key/value metadata and tensor table, read guarded against corrupt input.

A small, bounds-checked reader that mirrors the checks of the vendored llama.cpp ``gguf.cpp``.
Tensor data is never read: on a 20 GB model only the first few megabytes of the file are touched,
and the tensor table plus ``os.stat`` are enough to prove that every tensor lies inside the file.
Corrupt headers fail fast: counts and lengths are checked against the file size before anything
is allocated or looped over, and every problem is a one-line :class:`GGUFError`.

What the metadata *means* for the experts is :mod:`spac_llamacpp.gguf.layout`'s job.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from spac_llamacpp.base.errors import GGUFError

# --------------------------------------------------------------------------------------------------
# Constants, copied from the vendored llama.cpp (ggml/include/gguf.h, ggml/src/gguf.cpp,
# ggml/src/ggml-common.h).

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
GGUF_DEFAULT_ALIGNMENT = 32
GGUF_MAX_STRING_LENGTH = 1024 * 1024 * 1024
GGUF_MAX_ARRAY_ELEMENTS = 1024 * 1024 * 1024
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64
INT64_MAX = (1 << 63) - 1

# Our own sanity limits (not llama.cpp's): real headers are a few MB (tokenizer arrays), so a
# header that claims more than this is corrupt.  They keep corrupt files from being slow.
MAX_HEADER_BYTES = 256 * 1024 * 1024
MAX_KEY_LENGTH = 64 * 1024
MAX_KEPT_STRING = 64 * 1024  # longer string values (chat templates...) are skipped, not decoded
MAX_KEPT_ARRAY = 4096  # longer arrays (tokenizer) are skipped; per-layer arrays are <= 512

#: ggml type id -> (name, block size in elements, block size in bytes); ggml/src/ggml.c type_traits.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
    42: ("Q2_0", 64, 18),
}

ACTION_CORRUPT = "the file is corrupt or not a valid GGUF; re-download or re-convert it"
ACTION_TRUNCATED = "the file is truncated or its header is corrupt; re-download it"


# --------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class ArrayValue:
    """An array value; ``values`` is None when it was too long to keep (e.g. the tokenizer)."""

    elem_type: int
    count: int
    values: tuple[Any, ...] | None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # as stored (n_dims entries)
    type_id: int
    offset: int  # relative to the data section
    nbytes: int


@dataclass(frozen=True)
class Header:
    version: int
    kv: dict[str, Any]
    kv_types: dict[str, int]
    alignment: int
    data_offset: int
    tensors: tuple[TensorInfo, ...]
    file_size: int


# GGUF value types: id -> (name, struct code, size)
GGUF_SCALARS: dict[int, tuple[str, str, int]] = {
    0: ("UINT8", "B", 1),
    1: ("INT8", "b", 1),
    2: ("UINT16", "H", 2),
    3: ("INT16", "h", 2),
    4: ("UINT32", "I", 4),
    5: ("INT32", "i", 4),
    6: ("FLOAT32", "f", 4),
    7: ("BOOL", "?", 1),
    10: ("UINT64", "Q", 8),
    11: ("INT64", "q", 8),
    12: ("FLOAT64", "d", 8),
}
GGUF_STRING = 8
GGUF_ARRAY = 9
INT_TYPES = frozenset({0, 1, 2, 3, 4, 5, 10, 11})


def type_name(t: int) -> str:
    if t == GGUF_STRING:
        return "STRING"
    if t == GGUF_ARRAY:
        return "ARRAY"
    return GGUF_SCALARS[t][0] if t in GGUF_SCALARS else f"type {t}"


_ZEROS64 = bytes(64)


class Reader:
    """Sequential little-endian reader over the head of a file, with hard bounds checks."""

    CHUNK = 64 * 1024  # small: on a tiny model the header is followed by tensor data we must not read

    def __init__(self, f: BinaryIO, file_size: int, label: str) -> None:
        self._f = f
        self.size = file_size
        self.label = label
        self._buf = b""
        self._base = 0  # file offset of _buf[0]
        self.pos = 0
        self.bytes_read = 0

    def fail(self, what: str, action: str = ACTION_CORRUPT) -> GGUFError:
        return GGUFError(f"{self.label}: {what}; {action}")

    def _need(self, n: int, what: str) -> int:
        """Make n bytes at pos available; return their index into _buf."""
        end = self.pos + n
        if end > self.size:
            raise self.fail(
                f"{what} at byte {self.pos} runs past the end of the file ({self.size} bytes)",
                ACTION_TRUNCATED,
            )
        if end > MAX_HEADER_BYTES:
            raise self.fail(f"GGUF header is larger than {MAX_HEADER_BYTES >> 20} MiB ({what})")
        buf_end = self._base + len(self._buf)
        if end > buf_end:
            if self.pos >= buf_end:
                keep, read_from = b"", self.pos
            else:
                keep, read_from = self._buf[self.pos - self._base :], buf_end
            want = min(max(end - read_from, self.CHUNK), self.size - read_from)
            self._f.seek(read_from)
            data = self._f.read(want)
            self.bytes_read += len(data)
            if len(data) < end - read_from:
                raise self.fail(f"file ended while reading {what} at byte {self.pos}", ACTION_TRUNCATED)
            self._buf = keep + data
            self._base = self.pos
        return self.pos - self._base

    def scalar(self, code: str, size: int, what: str) -> Any:
        i = self._need(size, what)
        self.pos += size
        return struct.unpack_from("<" + code, self._buf, i)[0]

    def u32(self, what: str) -> int:
        return self.scalar("I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("Q", 8, what)

    def raw(self, n: int, what: str) -> bytes:
        i = self._need(n, what)
        self.pos += n
        return self._buf[i : i + n]

    def skip(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise self.fail(
                f"{what} at byte {self.pos} runs past the end of the file ({self.size} bytes)",
                ACTION_TRUNCATED,
            )
        if self.pos + n > MAX_HEADER_BYTES:
            raise self.fail(f"GGUF header is larger than {MAX_HEADER_BYTES >> 20} MiB ({what})")
        self.pos += n

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def string_len(self, what: str) -> int:
        n = self.u64(f"length of {what}")
        if n > GGUF_MAX_STRING_LENGTH:
            raise self.fail(f"{what} claims a length of {n} bytes (more than llama.cpp's 1 GiB limit)")
        if n > self.remaining:
            raise self.fail(
                f"{what} at byte {self.pos} claims {n} bytes but only {self.remaining} remain in the file",
                ACTION_TRUNCATED,
            )
        return n

    def skip_string_array(self, count: int, what: str) -> None:
        """Walk over ``count`` strings without decoding them (fast path for tokenizer arrays)."""
        done = 0
        while done < count:
            i = self._need(8, what)
            buf = self._buf
            avail = len(buf)
            pos0 = self.pos
            # consume as many strings as lie fully inside the buffer
            while done < count and i + 8 <= avail:
                (n,) = struct.unpack_from("<Q", buf, i)
                if n == 0 and buf[i : i + 64] == _ZEROS64:
                    # a run of empty strings: a corrupt count walking over zeros; skip it in one go
                    run = (avail - i) - len(buf[i:avail].lstrip(b"\0"))
                    k = min(run // 8, count - done)
                    i += 8 * k
                    done += k
                    continue
                if i + 8 + n > avail:
                    break
                i += 8 + n
                done += 1
            self.pos = self._base + i
            if done < count and self.pos == pos0:
                # the next string straddles the buffer end (or is huge): take the slow path
                n = self.string_len(what)
                self.skip(n, what)
                done += 1


def parse_header(f: BinaryIO, file_size: int, label: str) -> tuple[Header, int]:
    """Parse a GGUF header like ggml/src/gguf.cpp does; return it and the number of bytes read."""
    r = Reader(f, file_size, label)
    version, n_tensors, n_kv = _read_preamble(r, label)
    kv, kv_types = _read_metadata(r, n_kv)
    alignment = _alignment(r, kv, kv_types)
    infos = _read_tensor_table(r, n_tensors)
    data_offset = r.pos
    if n_tensors > 0:
        data_offset = (r.pos + alignment - 1) // alignment * alignment
    if data_offset > file_size:
        raise r.fail(
            f"tensor data section would start at byte {data_offset} but the file has {file_size} bytes",
            ACTION_TRUNCATED,
        )
    tensors = _place_tensors(r, infos, alignment, data_offset)
    hdr = Header(version, kv, kv_types, alignment, data_offset, tensors, file_size)
    return hdr, r.bytes_read


def _read_preamble(r: Reader, label: str) -> tuple[int, int, int]:
    """Magic, version, tensor and key counts (each count checked against what the file can hold)."""
    file_size = r.size
    if file_size < 4:
        raise r.fail(f"file is only {file_size} bytes, not a GGUF model")
    magic = r.raw(4, "magic")
    if magic != GGUF_MAGIC:
        shown = "".join(chr(b) if 32 <= b < 127 else "?" for b in magic)
        raise GGUFError(
            f"{label}: not a GGUF file (magic is '{shown}', expected 'GGUF'); "
            "pass a .gguf model converted for llama.cpp"
        )
    version = r.u32("GGUF version")
    if version == 0 or version & 0xFFFF == 0:
        raise r.fail(
            f"GGUF version field is {version:#x} (a big-endian GGUF or a corrupt header)",
            "use a little-endian GGUF converted for this machine, or re-download it",
        )
    if version == 1:
        raise r.fail("GGUF version 1 is no longer supported by llama.cpp", "re-convert the model")
    if version > GGUF_VERSION:
        raise r.fail(
            f"GGUF version {version} is newer than the supported version {GGUF_VERSION}",
            "re-convert the model or upgrade llama-cpp-python",
        )
    n_tensors = r.u64("tensor count")
    n_kv = r.u64("key/value count")
    # every tensor-info entry takes at least 8+0+4+4+8 bytes, every KV pair at least 8+1+4+1
    if n_tensors > INT64_MAX or n_tensors * 24 > r.remaining:
        raise r.fail(f"header claims {n_tensors} tensors, impossible for a file of {file_size} bytes")
    if n_kv > INT64_MAX or n_kv * 14 > r.remaining:
        raise r.fail(f"header claims {n_kv} metadata keys, impossible for a file of {file_size} bytes")
    return version, n_tensors, n_kv


def _read_metadata(r: Reader, n_kv: int) -> tuple[dict[str, Any], dict[str, int]]:
    """The key/value pairs: values by key, and each key's GGUF value type."""
    kv: dict[str, Any] = {}
    kv_types: dict[str, int] = {}
    for i in range(n_kv):
        klen = r.string_len(f"key #{i}")
        if klen == 0:
            raise r.fail(f"metadata key #{i} is empty")
        if klen > MAX_KEY_LENGTH:
            raise r.fail(f"metadata key #{i} claims a length of {klen} bytes")
        key = r.raw(klen, f"key #{i}").decode("utf-8", errors="replace")
        if key in kv:
            raise r.fail(f"duplicate metadata key '{key}'")
        vtype = r.u32(f"type of key '{key}'")
        if vtype == GGUF_ARRAY:
            etype = r.u32(f"element type of key '{key}'")
            count = r.u64(f"element count of key '{key}'")
            kv[key] = _read_array(r, key, etype, count)
        else:
            kv[key] = _read_value(r, key, vtype)
        kv_types[key] = vtype
    return kv, kv_types


def _alignment(r: Reader, kv: dict[str, Any], kv_types: dict[str, int]) -> int:
    """``general.alignment`` (a power of two, UINT32) or the GGUF default."""
    if "general.alignment" not in kv:
        return GGUF_DEFAULT_ALIGNMENT
    if kv_types["general.alignment"] != 4:
        raise r.fail(f"general.alignment has type {type_name(kv_types['general.alignment'])}, expected UINT32")
    alignment = kv["general.alignment"]
    if alignment == 0 or alignment & (alignment - 1):
        raise r.fail(f"general.alignment is {alignment}, not a power of two")
    return alignment


def _read_tensor_table(r: Reader, n_tensors: int) -> list[tuple[str, tuple[int, ...], int, int]]:
    """(name, ne, type id, relative offset) of each tensor, names and shapes checked like gguf.cpp."""
    infos: list[tuple[str, tuple[int, ...], int, int]] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        nlen = r.string_len(f"name of tensor #{i}")
        if nlen >= GGML_MAX_NAME:
            raise r.fail(f"name of tensor #{i} is {nlen} bytes long (llama.cpp allows < {GGML_MAX_NAME})")
        name = r.raw(nlen, f"name of tensor #{i}").decode("utf-8", errors="replace")
        if name in seen:
            raise r.fail(f"duplicate tensor name '{name}'")
        seen.add(name)
        n_dims = r.u32(f"dimension count of tensor '{name}'")
        if n_dims > GGML_MAX_DIMS:
            raise r.fail(f"tensor '{name}' has {n_dims} dimensions (at most {GGML_MAX_DIMS})")
        ne = tuple(r.u64(f"shape of tensor '{name}'") for _ in range(n_dims))
        if any(d > INT64_MAX for d in ne):
            raise r.fail(f"tensor '{name}' has a negative dimension {ne}")
        n_el = 1
        for d in ne:
            n_el *= d
        if n_el > INT64_MAX:
            raise r.fail(f"tensor '{name}' shape {ne} overflows the element count")
        type_id = r.u32(f"type of tensor '{name}'")
        if type_id not in GGML_TYPES:
            raise r.fail(f"tensor '{name}' has unknown ggml type id {type_id}")
        tname, blck, _ = GGML_TYPES[type_id]
        ne0 = ne[0] if ne else 1
        if ne0 % blck:
            raise r.fail(f"tensor '{name}' ({tname}) has {ne0} elements per row, not a multiple of {blck}")
        offset = r.u64(f"data offset of tensor '{name}'")
        infos.append((name, ne, type_id, offset))
    return infos


def _place_tensors(
    r: Reader, infos: list[tuple[str, tuple[int, ...], int, int]], alignment: int, data_offset: int
) -> tuple[TensorInfo, ...]:
    """Each tensor's size; offsets aligned, back to back, and every tensor inside the file."""
    tensors: list[TensorInfo] = []
    expected = 0
    for name, ne, type_id, offset in infos:
        _, blck, tsize = GGML_TYPES[type_id]
        full = ne + (1,) * (GGML_MAX_DIMS - len(ne))
        row = (full[0] // blck) * tsize
        nbytes = row * full[1] * full[2] * full[3]
        if offset % alignment:
            raise r.fail(f"tensor '{name}' data offset {offset} is not aligned to {alignment} bytes")
        if offset != expected:
            raise r.fail(
                f"tensor '{name}' has data offset {offset}, expected {expected} "
                "(llama.cpp requires tensors to be stored back to back)"
            )
        end = data_offset + offset + nbytes
        if end > r.size:
            raise GGUFError(
                f"{r.label}: tensor '{name}' data ends at byte {end} but the file has only {r.size} bytes; "
                "the file is truncated (incomplete download?); re-download it"
            )
        tensors.append(TensorInfo(name, ne, type_id, offset, nbytes))
        expected = offset + (nbytes + alignment - 1) // alignment * alignment
    return tuple(tensors)


def _read_value(r: Reader, key: str, vtype: int) -> Any:
    if vtype == GGUF_STRING:
        n = r.string_len(f"value of key '{key}'")
        if n > MAX_KEPT_STRING:
            r.skip(n, f"value of key '{key}'")
            return ArrayValue(GGUF_STRING, n, None)  # a skipped long string
        return r.raw(n, f"value of key '{key}'").decode("utf-8", errors="replace")
    if vtype in GGUF_SCALARS:
        _, code, size = GGUF_SCALARS[vtype]
        return r.scalar(code, size, f"value of key '{key}'")
    raise r.fail(f"metadata key '{key}' has invalid GGUF value type {vtype}")


def _read_array(r: Reader, key: str, etype: int, count: int) -> ArrayValue:
    what = f"array '{key}'"
    if count > GGUF_MAX_ARRAY_ELEMENTS:
        raise r.fail(f"{what} claims {count} elements (more than llama.cpp's limit)")
    if etype == GGUF_STRING:
        if count * 8 > r.remaining:
            raise r.fail(f"{what} claims {count} strings, more than the file can hold", ACTION_TRUNCATED)
        if count <= MAX_KEPT_ARRAY:
            vals = []
            for _ in range(count):
                n = r.string_len(f"element of {what}")
                if n > MAX_KEPT_STRING:
                    r.skip(n, f"element of {what}")
                    vals.append("")
                else:
                    vals.append(r.raw(n, f"element of {what}").decode("utf-8", errors="replace"))
            return ArrayValue(etype, count, tuple(vals))
        r.skip_string_array(count, what)
        return ArrayValue(etype, count, None)
    if etype not in GGUF_SCALARS:
        raise r.fail(f"{what} has invalid element type {etype}")
    _, code, size = GGUF_SCALARS[etype]
    total = count * size
    if total > r.remaining:
        raise r.fail(
            f"{what} claims {count} elements ({total} bytes) but only {r.remaining} bytes remain",
            ACTION_TRUNCATED,
        )
    if count <= MAX_KEPT_ARRAY:
        data = r.raw(total, what)
        return ArrayValue(etype, count, struct.unpack(f"<{count}{code}", data))
    r.skip(total, what)
    return ArrayValue(etype, count, None)


def check_file(path: Any) -> tuple[Path, str, int]:
    """The path as a ``Path``, its label for messages and its size; a one-line error unless it is a regular file."""
    try:
        p = Path(os.fspath(path))
    except TypeError:
        raise GGUFError(f"{path!r} is not a file path; pass the path of a .gguf file") from None
    label = str(p)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise GGUFError(f"{label}: no such file; check the path") from None
    except PermissionError:
        raise GGUFError(f"{label}: permission denied; make the file readable") from None
    except (OSError, ValueError) as e:
        raise GGUFError(f"{label}: cannot access the file ({e}); check the path") from None
    if stat.S_ISDIR(st.st_mode):
        raise GGUFError(f"{label} is a directory, not a GGUF file; pass the path of the .gguf file itself")
    if not stat.S_ISREG(st.st_mode):
        raise GGUFError(f"{label} is not a regular file; pass the path of a .gguf file")
    return p, label, st.st_size
