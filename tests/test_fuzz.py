"""The fuzz targets (tests/fuzz/): seeds, every input a fuzzer once failed on, and a short atheris run.

The long runs are CI's (``.ci/run``: ``tests/fuzz/run.py --all``); here each target replays its seeds
and ``tests/fuzz/regressions/<target>/`` (each file made the target raise something other than a
SpacError before its fix), and the loaders' one-line errors are checked on the inputs that broke them.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.observe.profile import load_profile
from spac_llamacpp.observe.trace import RoutingTrace
from spac_llamacpp.observe.trace_import import import_trace

FUZZ = Path(__file__).resolve().parent / "fuzz"
sys.path.insert(0, str(FUZZ))

import seeds  # noqa: E402
import targets  # noqa: E402


@pytest.mark.parametrize("target", sorted(targets.TARGETS))
def test_seeds_parse(target):
    """The seeds are valid files of their format (the structured ones aside): fuzzing starts from inside."""
    accepted = 0
    for data in seeds.seeds(target):
        try:
            targets.TARGETS[target](data)
            accepted += 1
        except SpacError:
            pass
    assert accepted >= 2


@pytest.mark.parametrize("target", sorted(targets.TARGETS))
def test_regressions(target):
    for path in seeds.regressions(target):
        targets.run_one(target, path.read_bytes())  # raises whatever is not a SpacError


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def _trace_arrays() -> dict[str, np.ndarray]:
    t = seeds.small_trace()
    return {"ids": t.ids, "token_step": t.token_step, "step_n_tokens": t.step_n_tokens, "counts": t.counts,
            "moe_layers": t.moe_layers}


def _save_npz(path: Path, meta: object, **arrays: np.ndarray) -> Path:
    np.savez(path, meta=np.array(json.dumps(meta)), **{**_trace_arrays(), **arrays})
    return path


@pytest.mark.parametrize(("meta", "arrays", "words"), [
    ([{"version": 1, "n_expert": 4}], {}, "not a JSON object"),  # found by atheris: TypeError
    ({"version": 1, "n_expert": "4"}, {}, "not an integer"),
    ({"version": 1, "n_expert": 4, "layout": {"n_expert": float("inf"), "n_expert_used": 2}}, {}, "layout"),
    ({"version": 1, "n_expert": 4, "runs": [{"first_step": "0"}]}, {}, "first_step"),
    ({"version": 1, "n_expert": 4}, {"ids": np.zeros((5, 3), np.int16)}, "ids is a 2-D"),
    ({"version": 1, "n_expert": 4}, {"step_n_tokens": np.array([6, -1, 0], np.int32)}, "negative"),
    ({"version": 1, "n_expert": 4}, {"moe_layers": np.array([1.0, 2.0])}, "integer array"),
])
def test_trace_load_damaged(tmp_path, meta, arrays, words):
    path = _save_npz(tmp_path / "t.npz", meta, **arrays)
    with pytest.raises(SpacError) as exc:
        RoutingTrace.load(path)
    assert words in _one_line(exc)


def test_trace_load_bad_zip_member(tmp_path):
    """A member whose CRC does not match (found by atheris: zipfile.BadZipFile escaped)."""
    path = _save_npz(tmp_path / "t.npz", {"version": 1, "n_expert": 4})
    with zipfile.ZipFile(path) as z:
        member = z.getinfo("ids.npy")
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", data, member.header_offset + 26)
    data[member.header_offset + 30 + name_len + extra_len + member.file_size - 1] ^= 1  # the last data byte
    path.write_bytes(bytes(data))
    with pytest.raises(SpacError, match="BadZipFile"):
        RoutingTrace.load(path)


@pytest.mark.parametrize(("text", "words"), [
    ("[" * 100_000, "nested too deeply"),  # RecursionError
    (json.dumps({"format": "spac-profile", "moe_layers": [0], "n_expert": 2, "counts": [[1, 2]], "tokens": "x"}),
     "malformed"),  # ValueError
    (json.dumps({"format": "spac-profile", "moe_layers": [0], "n_expert": 2, "counts": [[1, 2e30]]}), "malformed"),
    (json.dumps({"format": "spac-profile", "moe_layers": "01", "n_expert": 2, "counts": [[1, 2], [3, 4]]}),
     "malformed"),
    (json.dumps({"format": "spac-profile", "moe_layers": [0], "n_expert": 2, "counts": [[1, 2]],
                 "utility": [[0.5, float("nan")]]}), "non-finite"),
    (json.dumps({"format": "spac-profile", "moe_layers": [0], "n_expert": 2, "counts": [[1, -2]]}), "negative counts"),
])
def test_profile_load_damaged(tmp_path, text, words):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(SpacError) as exc:
        load_profile(path)
    assert words in _one_line(exc)


def test_jsonl_nested_too_deeply(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("[" * 100_000 + "\n")
    with pytest.raises(SpacError, match="r.jsonl:1: JSON nested too deeply"):
        import_trace(path, "jsonl")


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
def test_atheris_short_run(tmp_path):
    """Each target under the real fuzzer for a few hundred inputs (CI runs >= 10^4 each)."""
    out = subprocess.run([sys.executable, str(FUZZ / "run.py"), "--all", "--runs", "300", "--jobs", "2",
                          "--artifacts", str(tmp_path / "artifacts")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-4000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("fuzz ")]
    assert len(lines) == len(targets.TARGETS) and all("300 inputs (atheris" in line for line in lines), out.stdout
