"""Fuzz targets: the parsers of files a user hands to spac (GGUF headers, traces, imports, profiles).

Each target takes one fuzz input (bytes), writes it where the parser reads it, parses it and uses the
result as the tools do. The contract the fuzzer checks: a target returns normally or raises
:class:`~spac_llamacpp.base.errors.SpacError` (one line, what is wrong and what to do); any other
exception, a crash or a hang is a finding. ``tests/fuzz/run.py`` drives them with atheris (libFuzzer);
``tests/test_fuzz.py`` replays the seeds and every input that once failed (``regressions/``).

Targets:

``gguf_header``
    the GGUF header parser below ``read_model_header``'s catch-all (which turns any stray exception into
    a vague one-line error and would hide a finding): ``header.parse_header`` + ``layout.interpret``, then
    the report, the JSON and the flash tier's expert layout. The input is the head of the file; the
    file is extended (sparse) by :data:`PAD` bytes so that a header can point at tensor data.
``trace_load``
    ``RoutingTrace.load`` (+ ``check``, ``layout``, and what ``spac simulate`` reads first:
    ``trace_arrays``). First byte even: the rest is the ``.npz`` file itself; odd: the rest drives a
    structured writer (a consistent trace, then members dropped or replaced by arrays of fuzzed dtypes,
    shapes and values, and a fuzzed ``meta`` JSON; stored uncompressed), which reaches past the zip
    container and past ``check``.
``trace_import``
    ``import_trace`` of a route CSV (first byte even) or a JSONL routing log (odd), with or without
    ``n_expert`` / ``expert_bytes``.
``profile_load``
    ``load_profile`` of a profile JSON (first byte even) or of a trace ``.npz`` (odd), then what the
    flash tier does with it (``expected_demand``) on a matching fake model when the shapes allow.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.gguf.header import parse_header
from spac_llamacpp.gguf.layout import interpret
from spac_llamacpp.gguf.report import format_report
from spac_llamacpp.observe.profile import expected_demand, load_profile
from spac_llamacpp.observe.trace import RoutingTrace, step_counts
from spac_llamacpp.observe.trace_import import import_trace
from spac_llamacpp.planning.budgets import tier_layout
from spac_llamacpp.sim.simulator import trace_arrays

PAD = 1 << 20  # sparse bytes after a GGUF head: room for the tensor data its table points at


def _work_dir() -> Path:
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="spac-fuzz-", dir=base))


WORK = _work_dir()


def _write(name: str, data: bytes, pad: int = 0) -> Path:
    path = WORK / name
    with open(path, "wb") as f:
        f.write(data)
        if pad:
            f.truncate(len(data) + pad)
    return path


# --- gguf_header ------------------------------------------------------------------------------------


def gguf_header(data: bytes) -> None:
    path = _write("fuzz.gguf", data, PAD)
    size = len(data) + PAD
    with open(path, "rb") as f:
        hdr, _ = parse_header(f, size, path.name)
    info = interpret(path, path.name, hdr)
    format_report(info)
    json.dumps(info.to_json())
    for layer in info.moe_layers:
        info.layer_expert_bytes(layer)
    if info.is_moe:
        info.expert_ranges(info.moe_layers[0], info.n_expert - 1)
        tier_layout("flash", info)


# --- trace_load -------------------------------------------------------------------------------------


class _Bytes:
    """A tiny FuzzedDataProvider (atheris's is not available without atheris)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def int(self, n: int) -> int:
        """An int in 0..n-1 (0 when the input is used up)."""
        if n <= 1 or self.pos >= len(self.data):
            return 0
        width = 1 if n <= 256 else 2 if n <= 65536 else 4
        chunk = self.data[self.pos:self.pos + width]
        self.pos += width
        return int.from_bytes(chunk, "little") % n

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk


_DTYPES = ("<i2", "<i4", "<i8", "<u1", "<f4", "<f8", "|b1", "<U3", "<i4")
_FIELDS = ("ids", "token_step", "step_n_tokens", "counts", "moe_layers", "step_n_draft", "step_accepted")


def _array(src: _Bytes) -> np.ndarray:
    dtype = np.dtype(_DTYPES[src.int(len(_DTYPES))])
    ndim = src.int(5)
    shape = tuple(src.int(6) for _ in range(ndim))
    n = int(np.prod(shape)) if shape else 1
    raw = src.take(n * dtype.itemsize)
    raw += bytes(n * dtype.itemsize - len(raw))
    if dtype.kind == "U":
        return np.array([raw[i:i + 3].decode("latin-1") for i in range(0, len(raw), 12)][:n] + [""] * n,
                        dtype=dtype)[:n].reshape(shape)
    arr = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
    if dtype.kind in "iu" and src.int(2):
        arr = (arr.astype(np.int64) % 7 - 1).astype(dtype)  # small values: shapes and ids agree now and then
    return arr


def _consistent(src: _Bytes) -> dict[str, np.ndarray]:
    """Arrays of a trace that passes ``check`` unless a later perturbation breaks it."""
    n_layer, k, n_expert = 1 + src.int(4), 1 + src.int(3), 1 + src.int(9)
    steps = np.array([1 + src.int(4) for _ in range(src.int(5))], np.int32)
    n_tok = int(steps.sum())
    raw = src.take(n_tok * n_layer * k)
    raw += bytes(n_tok * n_layer * k - len(raw))
    ids = (np.frombuffer(raw, np.uint8).astype(np.int16) % (n_expert + 1) - 1).reshape(n_tok, n_layer, k)
    token_step = np.repeat(np.arange(len(steps), dtype=np.int32), steps)
    out = {"ids": ids, "token_step": token_step, "step_n_tokens": steps,
           "counts": step_counts(ids, token_step, len(steps), n_expert),
           "moe_layers": np.array(sorted({src.int(n_layer) for _ in range(1 + src.int(n_layer))}), np.int32)}
    if src.int(2):
        out["step_n_draft"] = np.array([src.int(4) for _ in steps], np.int32)
        out["step_accepted"] = np.array([src.int(4) - 1 for _ in steps], np.int32)
    out["_n_expert"] = np.array(n_expert)
    return out


def _meta(src: _Bytes, n_expert: int, n_moe: int, n_steps: int) -> str:
    mode = src.int(8)
    if mode == 0:
        return src.take(src.int(64)).decode("utf-8", errors="replace")
    meta: dict[str, object] = {"version": 1 if src.int(8) else src.int(3), "n_expert": n_expert}
    if src.int(2):
        meta["layout"] = {"n_expert": n_expert, "n_expert_used": 1 + src.int(3),
                          "expert_bytes": [src.int(5000) for _ in range(n_moe)], "non_expert_bytes": src.int(99)}
    if src.int(2):
        meta["runs"] = [{"first_step": src.int(n_steps + 2), "start_step": 0} for _ in range(src.int(3))]
    odd = [1, -4, "x", None, [2, "y"], {"n_expert": 4}, 1e308 * 10, 2.5, True, {"n_expert": 4, "n_expert_used": 9}]
    for _ in range(src.int(4)):  # perturbations of single fields
        key = ("version", "n_expert", "layout", "runs", "model")[src.int(5)]
        meta[key] = odd[src.int(len(odd))]
        if key == "layout" and src.int(2) and isinstance(meta.get("layout"), dict):
            meta["layout"] = {"n_expert": n_expert, "n_expert_used": 1, "expert_bytes": odd[src.int(len(odd))]}
    return json.dumps(meta) if mode != 7 else json.dumps([meta])


def structured_npz(data: bytes) -> bytes:
    """An uncompressed ``.npz`` whose members, dtypes, shapes and values come from ``data``: a consistent
    trace, then perturbations (members dropped or replaced by arrays of fuzzed dtype, shape and values)."""
    src = _Bytes(data)
    arrays = _consistent(src)
    n_expert = int(arrays.pop("_n_expert"))
    meta = _meta(src, n_expert, len(arrays["moe_layers"]), len(arrays["step_n_tokens"]))
    for _ in range(src.int(4)):
        name = _FIELDS[src.int(len(_FIELDS))]
        if src.int(3) == 0:
            arrays.pop(name, None)
        else:
            arrays[name] = _array(src)
    arrays["meta"] = np.array(meta) if src.int(16) else _array(src)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arr, allow_pickle=False)
            z.writestr(name + ".npy", buf.getvalue())
    return out.getvalue()


def _use_trace(trace: RoutingTrace) -> None:
    trace.check()
    _ = trace.layout, trace.n_tokens, trace.n_steps
    trace_arrays(trace)  # what `spac simulate` reads of it


def trace_load(data: bytes) -> None:
    if not data:
        return
    body = structured_npz(data[1:]) if data[0] & 1 else data[1:]
    _use_trace(RoutingTrace.load(_write("fuzz.npz", body)))


# --- trace_import -----------------------------------------------------------------------------------


def trace_import(data: bytes) -> None:
    if not data:
        return
    flags, body = data[0], data[1:]
    fmt = "jsonl" if flags & 1 else "route-csv"
    n_expert = (flags >> 1 & 7) * 3 or None
    expert_bytes = 4096 if flags & 16 else None
    path = _write("fuzz.jsonl" if fmt == "jsonl" else "fuzz.csv", body)
    trace = import_trace(path, fmt, n_expert=n_expert, expert_bytes=expert_bytes)
    _use_trace(trace)
    # what `spac trace import` does next: save, and the saved file loads as the same trace
    again = RoutingTrace.load(trace.save(WORK / "imported.npz"))
    if not np.array_equal(again.ids, trace.ids) or not np.array_equal(again.counts, trace.counts):
        raise AssertionError("an imported trace does not load back as saved")


# --- profile_load -----------------------------------------------------------------------------------


class _FakeInfo:
    """What ``expected_demand`` reads of a model."""

    def __init__(self, moe_layers: tuple[int, ...], n_expert: int) -> None:
        self.moe_layers = moe_layers
        self.n_expert = n_expert
        self.path = Path("fake.gguf")


def profile_load(data: bytes) -> None:
    if not data:
        return
    if data[0] & 1:
        body = structured_npz(data[1:]) if data[0] & 2 else data[1:]
        path = _write("fuzz-profile.npz", body)
    else:
        path = _write("fuzz-profile.json", data[1:])
    prof = load_profile(path)
    prof.score()
    json.dumps(prof.to_json())
    if 0 < prof.n_expert <= 1 << 16 and len(prof.moe_layers) <= 1 << 12:
        info = _FakeInfo(tuple(prof.moe_layers), prof.n_expert)
        demand = expected_demand(prof, info, [1] * len(prof.moe_layers))  # type: ignore[arg-type]
        if demand.shape != (len(prof.moe_layers), prof.n_expert):
            raise AssertionError(f"expected_demand has shape {demand.shape}")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "gguf_header": gguf_header,
    "trace_load": trace_load,
    "trace_import": trace_import,
    "profile_load": profile_load,
}


def run_one(target: str, data: bytes) -> None:
    """Run ``target`` on ``data``; a SpacError is the expected rejection of a bad input."""
    with contextlib.suppress(SpacError):
        TARGETS[target](data)
