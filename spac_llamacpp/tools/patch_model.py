"""``spac patch``: rewrite an MoE GGUF with each layer's experts ordered hot-first by a profile.

Every tensor indexed by expert (gate/up/down/merged gate_up experts, their biases and scales) is
permuted along its expert axis, and so are the router rows (``ffn_gate_inp``, its bias) and the
selection bias ``exp_probs_b``, all with the same permutation per layer. The router then produces
the same scores in a new order, so the model computes exactly what it did (greedy output is
identical; logits agree to rounding of the summation order). Hot experts end up in one contiguous
byte range per layer: one large read to load, one ``mlock`` to pin.

``spac.expert_order.<block>`` (uint32 arrays) records, for each new position, the original expert
id, so telemetry can report original ids; patching a patched model composes the orders. With
grouped routing (``expert_group_count`` > 1) experts are only reordered within their group, which
keeps group selection unchanged.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import gguf
import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.gguf.info import MoEModelInfo, read_model_header
from spac_llamacpp.gguf.stream import Entry, copy_metadata, raw_entry, write_entries
from spac_llamacpp.observe.profile import Profile

log = logging.getLogger(__name__)

ORDER_KEY = "spac.expert_order.{}"
_ROUTER_KINDS = ("ffn_gate_inp", "exp_probs_b")


def hot_first(scores: np.ndarray, n_group: int = 1) -> np.ndarray:
    """Per layer, expert ids by decreasing score (ties: lower id first), within groups of experts."""
    s = np.asarray(scores, dtype=np.float64)
    n_layer, n_expert = s.shape
    if n_group < 1 or n_expert % n_group:
        raise SpacError(f"cannot split {n_expert} experts into {n_group} groups")
    size = n_expert // n_group
    perm = np.empty_like(s, dtype=np.int64)
    for g in range(n_group):
        block = s[:, g * size:(g + 1) * size]
        perm[:, g * size:(g + 1) * size] = g * size + np.argsort(-block, axis=1, kind="stable")
    return perm


def _group_count(reader: gguf.GGUFReader, arch: str) -> int:
    f = reader.fields.get(f"{arch}.expert_group_count")
    return int(f.contents()) if f is not None else 1


def _old_order(reader: gguf.GGUFReader, block: int, n_expert: int) -> np.ndarray:
    f = reader.fields.get(ORDER_KEY.format(block))
    if f is None:
        return np.arange(n_expert)
    order = np.asarray(f.contents(), dtype=np.int64)
    if order.shape != (n_expert,) or sorted(order.tolist()) != list(range(n_expert)):
        raise SpacError(f"'{ORDER_KEY.format(block)}' is not a permutation of {n_expert} experts; the file is corrupt")
    return order


def _entries(reader: gguf.GGUFReader, info: MoEModelInfo, perm: dict[int, np.ndarray]) -> list[Entry]:
    expert_names = {t.name for t in info.expert_tensors}
    out = []
    for t in reader.tensors:
        parts = t.name.split(".")
        block = int(parts[1]) if parts[0] == "blk" and len(parts) >= 3 and parts[1].isdigit() else -1
        rows = None
        if block in perm and (t.name in expert_names or parts[2] in _ROUTER_KINDS):
            rows = perm[block]
            if t.data.shape[0] != len(rows):
                raise SpacError(f"{t.name}: its outermost axis has {t.data.shape[0]} entries, not one per expert "
                                f"({len(rows)}); this layout cannot be patched")
        out.append(raw_entry(t, rows=rows))
    return out


def patch_model(model: str | os.PathLike[str], profile: Profile, out: str | os.PathLike[str], *,
                progress: bool = True, verify: bool = True) -> dict[str, object]:
    """Write ``model`` with experts ordered hot-first by ``profile`` to ``out``; returns a summary."""
    model, out = Path(model), Path(out)
    if out.resolve() == model.resolve():
        raise SpacError("the output must be a new file, not the model itself")
    info = read_model_header(model)
    if info.n_expert == 0:
        from spac_llamacpp.base.errors import NotMoEError

        raise NotMoEError(f"{model} is a dense model; `spac patch` needs a Mixture-of-Experts GGUF")
    if any(t.is_chunk for t in info.expert_tensors):
        raise SpacError(f"{model} has chunk experts (indexed by expert group); `spac patch` cannot reorder them")
    profile.check_model(tuple(info.moe_layers), info.n_expert, model.name)
    reader = gguf.GGUFReader(model)
    n_group = _group_count(reader, info.architecture)
    new_pos = hot_first(profile.score(), n_group)
    perm = {}  # block -> for each new position, the position in the input file
    orders = {}  # block -> for each new position, the original expert id
    for i, block in enumerate(info.moe_layers):
        perm[block] = new_pos[i]
        orders[block] = _old_order(reader, block, info.n_expert)[new_pos[i]]

    def add_metadata(writer: gguf.GGUFWriter) -> None:
        skip = {"general.architecture"} | {ORDER_KEY.format(b) for b in info.moe_layers} | {"spac.patch.profile"}
        copy_metadata(reader, writer, skip)
        for block, order in orders.items():
            writer.add_array(ORDER_KEY.format(block), [int(x) for x in order])
        writer.add_string("spac.patch.profile", f"{profile.tokens} tokens, {profile.steps} steps of {profile.model}")

    write_entries(out, info.architecture, _entries(reader, info, perm), add_metadata, progress=progress)
    if verify:
        verify_patch(model, out, perm)
    moved = int(sum((p != np.arange(len(p))).sum() for p in perm.values()))
    return {"output": str(out), "layers": len(perm), "experts_moved": moved, "groups": n_group}


def verify_patch(model: Path, out: Path, perm: dict[int, np.ndarray], samples: int = 3) -> None:
    """Re-read the output: valid header, same tensors, and sampled experts equal to their sources."""
    info = read_model_header(out)
    a, b = gguf.GGUFReader(model), gguf.GGUFReader(out)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    if set(ta) != set(tb):
        raise SpacError(f"verification of {out} failed: the tensor set changed")
    expert_names = {t.name for t in info.expert_tensors}
    rng = np.random.default_rng(0)
    for name, t in tb.items():
        src = ta[name]
        if src.data.shape != t.data.shape or src.tensor_type != t.tensor_type:
            raise SpacError(f"verification of {out} failed: {name} changed shape or type")
        parts = name.split(".")
        block = int(parts[1]) if parts[0] == "blk" and parts[1].isdigit() else -1
        if block in perm and (name in expert_names or parts[2] in _ROUTER_KINDS):
            for i in rng.choice(len(perm[block]), size=min(samples, len(perm[block])), replace=False):
                if not np.array_equal(t.data[i], src.data[perm[block][i]]):
                    raise SpacError(f"verification of {out} failed: {name} position {i}")
        elif not np.array_equal(t.data.reshape(-1)[:4096], src.data.reshape(-1)[:4096]):
            raise SpacError(f"verification of {out} failed: {name} differs")
    log.info("verified %s", out)


def expert_order(model: str | os.PathLike[str]) -> dict[int, np.ndarray]:
    """The original expert ids recorded by ``spac patch`` (block -> ids by position); empty if unpatched."""
    reader = gguf.GGUFReader(model)
    out = {}
    for name, f in reader.fields.items():
        if name.startswith("spac.expert_order."):
            out[int(name.rsplit(".", 1)[1])] = np.asarray(f.contents(), dtype=np.int64)
    return out
