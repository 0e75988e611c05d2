"""Seed inputs of the fuzz targets (``targets.py``): small valid files of each format, made here.

Nothing binary is checked in but what a fuzzer once found (``regressions/``): the seeds are written from
the factory models and from small traces and profiles built in code, so they follow the formats as the
code writes them today.
"""

from __future__ import annotations

import functools
import io
import json
import tempfile
from pathlib import Path

import numpy as np

from spac_llamacpp.gguf.info import read_model_header
from spac_llamacpp.models.factory import ARCHITECTURES, write_tiny_dense, write_tiny_moe
from spac_llamacpp.observe.profile import Profile
from spac_llamacpp.observe.trace import RoutingTrace, TraceLayout, step_counts

REGRESSIONS = Path(__file__).resolve().parent / "regressions"

CSV = """\
# route_trace v1
# model=/models/toy.gguf arch=qwen3moe n_layer=3 n_expert=4 n_expert_used=2
# layer=0 expert_bytes=0 dense_bytes=100
# layer=1 expert_bytes=1000 dense_bytes=110
# layer=2 expert_bytes=2000 dense_bytes=120
turn,phase,step,layer,slot,expert,weight,residency,expert_bytes,dropped
0,0,0,1,0,0,0.5,1,0,0
0,0,0,1,1,1,0.5,0,1000,0
0,0,1,1,0,2,0.5,0,1000,0
0,0,1,1,1,0,0.5,1,0,0
0,0,2,1,0,0,0.5,1,0,0
0,0,2,1,1,3,0.5,0,1000,0
0,0,2,2,0,1,0.5,1,0,0
0,0,2,2,1,2,0.5,0,2000,0
0,1,3,1,0,3,0.5,1,0,0
0,1,3,1,1,2,0.5,0,1000,0
0,1,3,2,0,0,0.5,1,0,0
0,1,3,2,1,1,0.5,0,2000,0
1,0,5,1,0,1,0.5,1,0,0
1,0,5,1,1,2,0.5,0,1000,0
1,1,7,1,0,2,0.5,1,0,0
1,1,7,1,1,1,0.5,0,1000,0
1,1,7,2,0,0,0.5,1,0,0
1,1,7,2,1,3,0.5,0,2000,0
"""

CSV_COLON = """\
# n_expert: 4
# n_expert_used: 2
# n_layer: 2
# expert_bytes: 7, 9
expert,layer,slot,phase,turn,step,expert_bytes
1,0,1,0,0,0,0
0,0,0,0,0,0,512
2,1,1,0,0,0,0
3,1,0,0,0,0,1024
1,0,0,1,0,1,512
2,0,1,1,0,1,0
0,1,0,1,0,1,1024
1,1,1,1,0,1,0
"""


def _jsonl() -> str:
    rows = []
    for p, n_tok in ((0, 3), (1, 2)):
        for layer in range(3):
            for t in range(n_tok):
                e = [(p + t + layer) % 6, (p + 2 * t + layer + 1) % 6]
                if e[0] == e[1]:
                    e[1] = (e[1] + 1) % 6
                rows.append(json.dumps({"dataset": "gsm8k", "problem_id": p, "layer": layer, "experts": e,
                                        "gating_probs": [0.7, 0.3], "token_idx": t}))
    return "\n".join(rows) + "\n"


def small_trace(layout: bool = True) -> RoutingTrace:
    """A consistent trace: 3 layers (0 dense), 4 experts, top-2, a 3-token prompt and 2 decode steps."""
    ids = np.full((5, 3, 2), -1, np.int16)
    ids[:, 1] = [[0, 1], [2, 0], [0, 3], [3, 2], [1, 2]]
    ids[2:, 2] = [[1, 2], [0, 1], [3, 1]]
    token_step = np.array([0, 0, 0, 1, 2], np.int32)
    meta: dict = {"model": "toy.gguf", "runs": [{"prompt_id": "0", "start_step": 0, "first_step": 0}]}
    if layout:
        meta["layout"] = TraceLayout(4, 2, (1000, 2000), 330).to_json()
    return RoutingTrace(ids=ids, token_step=token_step, step_n_tokens=np.array([3, 1, 1], np.int32),
                        counts=step_counts(ids, token_step, 3, 4), moe_layers=np.array([1, 2], np.int32),
                        n_expert=4, meta=meta, step_n_draft=np.array([0, 2, 0], np.int32),
                        step_accepted=np.array([0, 1, 0], np.int32))


def _npz(trace: RoutingTrace, compressed: bool) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = trace.save(Path(d) / "t.npz")
        if compressed:
            return path.read_bytes()
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def _profile_json() -> bytes:
    counts = np.array([[5, 1, 0, 2], [0, 3, 3, 1]])
    prof = Profile((1, 2), 4, counts, counts / 4.0, tokens=5, steps=3, model="toy.gguf", extra={"prompts": 2})
    return json.dumps(prof.to_json(), indent=1).encode()


@functools.cache
def _gguf_heads() -> tuple[bytes, ...]:
    """The header bytes (up to the tensor data) of small factory models of every architecture, and a dense one."""
    heads = []
    with tempfile.TemporaryDirectory() as d:
        paths = [write_tiny_moe(Path(d) / f"{arch}.gguf", arch, dtype="f32", n_layer=2, n_embd=16, n_expert=4,
                                n_ff_exp=16, n_vocab=300, n_head=2, n_head_kv=1) for arch in ARCHITECTURES]
        paths.append(write_tiny_dense(Path(d) / "dense.gguf"))
        for p in paths:
            heads.append(p.read_bytes()[: read_model_header(p).data_offset])
    return tuple(heads)


def seeds(target: str) -> list[bytes]:
    """Seed inputs of ``target`` (see ``targets.py`` for what each input byte means)."""
    if target == "gguf_header":
        return list(_gguf_heads())
    if target == "trace_load":
        rng = np.random.default_rng(0)
        out = [b"\0" + _npz(small_trace(), True), b"\0" + _npz(small_trace(False), False)]
        return out + [b"\1" + rng.bytes(n) for n in (64, 256, 1024)]
    if target == "trace_import":
        csv, colon, jsonl = CSV.encode(), CSV_COLON.encode(), _jsonl().encode()
        return [b"\0" + csv, b"\x12" + csv, b"\0" + colon, b"\1" + jsonl, b"\x13" + jsonl]
    if target == "profile_load":
        return [b"\0" + _profile_json(), b"\1" + _npz(small_trace(), True), b"\3" + np.random.default_rng(1).bytes(512)]
    raise KeyError(target)


def regressions(target: str) -> list[Path]:
    """The inputs that once made ``target`` fail (each fixed since; replayed by tests/test_fuzz.py)."""
    directory = REGRESSIONS / target
    return sorted(p for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []
