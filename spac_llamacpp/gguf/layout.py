"""The MoE layout of a parsed GGUF header: which blocks have routed experts, where each expert's bytes are.

:func:`interpret` is a pipeline of small steps, each with one job and each raising a one-line
:class:`GGUFError` on what it checks:

1. :func:`_architecture` - ``general.architecture``: a llama.cpp language model, one file;
2. :func:`_hparams` - block count, embedding length, MTP (nextn) blocks, context length;
3. :func:`_classify_tensors` - expert tensors (with their per-expert byte ranges), shared experts, routers;
4. :func:`_moe_keys` - the ``<arch>.expert_*`` / layer-rule metadata (strict only when there are experts);
5. :func:`_expert_count` - the routed expert count (0: a dense model);
6. :func:`_moe_layers` - MoE and dense blocks, checked against the metadata's layer rule;
7. :func:`_experts_used` - top-k per block;
8. :func:`_expert_shapes` - every expert/router tensor shape against the metadata; expert FFN widths;
9. :func:`_gating` - the gating function llama.cpp will actually run;
10. :func:`_expert_order` - the original expert ids recorded by ``spac patch``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spac_llamacpp.base.errors import GGUFError
from spac_llamacpp.gguf.arch import (
    EXPERT_RE,
    GATING_DEFAULT,
    GATING_FIXED,
    GATING_NAMES,
    GATING_NO_DEFAULT,
    GATING_REQUIRED,
    LLAMA_ARCHITECTURES,
    LLAMA_MAX_EXPERTS,
    LLAMA_MAX_LAYERS,
    ROUTER_RE,
    SHEXP_RE,
    SUFFIX_KIND,
    SUFFIX_RANK,
    WEIGHT_KINDS,
)
from spac_llamacpp.gguf.header import (
    ACTION_CORRUPT,
    GGML_TYPES,
    GGUF_ARRAY,
    INT_TYPES,
    ArrayValue,
    Header,
    TensorInfo,
    type_name,
)
from spac_llamacpp.gguf.model import ExpertTensor, MoEModelInfo


def interpret(path: Path, label: str, hdr: Header) -> MoEModelInfo:
    """Describe the routed experts of a parsed header (``n_expert == 0`` for a dense model)."""
    arch = _architecture(label, hdr.kv)
    meta = _Meta(hdr, arch, label)
    hp = _hparams(meta)
    tensors = _classify_tensors(meta, hdr, hp.n_layer)
    experts = tensors.experts
    keys = _moe_keys(meta, hp.n_layer, tensors)
    notes: list[str] = []
    n_expert = _expert_count(meta, experts, keys, notes)
    moe_layers, dense_layers = _moe_layers(meta, hp, experts, keys, notes)
    used = _experts_used(meta, hp.n_layer, experts, keys.used, n_expert, moe_layers)
    ff_per_layer = _expert_shapes(meta, hp, tensors, keys, n_expert)
    gating, gating_source = _gating(meta, hp, experts, notes)
    return MoEModelInfo(
        path=path,
        architecture=arch,
        block_count=hp.n_layer,
        n_expert=n_expert,
        n_expert_used=used,
        n_expert_shared=keys.n_shared,
        expert_ff_length=_expert_ff_length(ff_per_layer, moe_layers),
        gating=gating,
        moe_layers=moe_layers,
        dense_layers=dense_layers,
        leading_dense_block_count=keys.lead,
        moe_every_n_layers=keys.every_n,
        expert_tensors=tuple(experts),
        expert_bytes=tensors.expert_bytes,
        non_expert_bytes=tensors.total_bytes - tensors.expert_bytes,
        file_size=hdr.file_size,
        has_router_bias=tensors.has_router_bias,
        name=meta.string("general.name") or "",
        gguf_version=hdr.version,
        alignment=hdr.alignment,
        data_offset=hdr.data_offset,
        tensor_count=len(hdr.tensors),
        n_embd=hp.n_embd,
        context_length=hp.context_length,
        expert_order=_expert_order(hdr.kv, moe_layers, n_expert),
        gating_source=gating_source,
        interleave_moe_layer_step=keys.step,
        nextn_predict_layers=hp.nextn,
        expert_ff_lengths=ff_per_layer,
        shared_expert_bytes=tensors.shared_bytes,
        router_bytes=tensors.router_bytes,
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------------------------------
# Metadata access


class _Meta:
    """Typed access to ``<arch>.*`` metadata with one-line errors."""

    def __init__(self, hdr: Header, arch: str, label: str) -> None:
        self.hdr = hdr
        self.arch = arch
        self.label = label

    def key(self, name: str) -> str:
        return f"{self.arch}.{name}"

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.label}: {what}; {ACTION_CORRUPT}")

    def has(self, name: str) -> bool:
        return self.key(name) in self.hdr.kv

    def uint(self, name: str, default: int | None = None, *, required: bool = False) -> int | None:
        k = self.key(name)
        if k not in self.hdr.kv:
            if required:
                raise GGUFError(
                    f"{self.label}: required metadata key '{k}' is missing; the file is incomplete or "
                    "was not converted for llama.cpp; re-convert it"
                )
            return default
        t = self.hdr.kv_types[k]
        v = self.hdr.kv[k]
        if t not in INT_TYPES:
            raise self.fail(f"metadata key '{k}' has type {type_name(t)}, expected an unsigned integer")
        if v < 0:
            raise self.fail(f"metadata key '{k}' is negative ({v})")
        return int(v)

    def uint_or_array(self, name: str, n: int) -> tuple[tuple[int, ...] | None, bool]:
        """(values per block or None if absent, whether the key was an array)."""
        k = self.key(name)
        if k not in self.hdr.kv:
            return None, False
        t = self.hdr.kv_types[k]
        v = self.hdr.kv[k]
        if t != GGUF_ARRAY:
            return (self.uint(name),) * n, False  # type: ignore[operator]
        assert isinstance(v, ArrayValue)
        if v.elem_type not in INT_TYPES:
            raise self.fail(f"metadata array '{k}' has {type_name(v.elem_type)} elements, expected integers")
        if v.count != n:
            raise self.fail(f"metadata array '{k}' has {v.count} entries but block_count is {n}")
        assert v.values is not None
        if any(x < 0 for x in v.values):
            raise self.fail(f"metadata array '{k}' has negative entries")
        return tuple(int(x) for x in v.values), True

    def string(self, key: str) -> str | None:
        v = self.hdr.kv.get(key)
        return v if isinstance(v, str) else None


@dataclass
class _MoEKeys:
    """The ``<arch>.*`` keys about routed experts and which blocks have them (0/None: absent)."""

    n_expert: int = 0
    used: tuple[int, ...] | None = None
    n_shared: int = 0
    lead: int = 0
    every_n: int = 0
    step: int = 0
    ff_exp: tuple[int, ...] | None = None
    ff: tuple[int, ...] | None = None
    latent: int = 0
    per_group: int = 0


def _read_moe_keys(meta: _Meta, n_layer: int) -> _MoEKeys:
    """Read (and type-check) the MoE keys; per-block keys may be scalars or block_count arrays."""
    k = _MoEKeys()
    k.n_expert = meta.uint("expert_count", 0) or 0
    if k.n_expert > LLAMA_MAX_EXPERTS:
        raise meta.fail(
            f"'{meta.key('expert_count')}' is {k.n_expert} (llama.cpp allows at most {LLAMA_MAX_EXPERTS})"
        )
    k.used, _ = meta.uint_or_array("expert_used_count", n_layer)
    k.n_shared = meta.uint("expert_shared_count", 0) or 0
    k.lead = meta.uint("leading_dense_block_count", 0) or 0
    k.every_n = meta.uint("moe_every_n_layers", 0) or 0
    k.step = meta.uint("interleave_moe_layer_step", 0) or 0
    k.ff_exp, _ = meta.uint_or_array("expert_feed_forward_length", n_layer)
    k.ff, _ = meta.uint_or_array("feed_forward_length", n_layer)
    k.latent = meta.uint("expert_latent_length", 0) or meta.uint("moe_latent_size", 0) or 0
    k.per_group = meta.uint("experts_per_group", 0) or 0
    return k


def _resolve_gating(meta: _Meta, n_layer: int) -> tuple[str, str, list[str]]:
    """Which gating function llama.cpp will actually run, and why."""
    notes: list[str] = []
    arch = meta.arch
    key_val = meta.uint("expert_gating_func", 0)
    if key_val not in (0, *GATING_NAMES):
        raise meta.fail(
            f"metadata key '{meta.key('expert_gating_func')}' is {key_val}, not a gating function (1-4)"
        )
    key_name = GATING_NAMES.get(key_val or 0)
    if arch in GATING_FIXED:
        fixed = GATING_FIXED[arch]
        if key_name and key_name != fixed:
            notes.append(
                f"{meta.key('expert_gating_func')}={key_name} is ignored: llama.cpp always uses {fixed}"
            )
        return fixed, "graph", notes
    if key_name:
        return key_name, "key", notes
    if arch in ("deepseek2", "mistral4"):
        vocab = meta.uint("vocab_size", 0)
        if not vocab:
            toks = meta.hdr.kv.get("tokenizer.ggml.tokens")
            vocab = toks.count if isinstance(toks, ArrayValue) else 0
        if n_layer in (47, 48) and vocab == 154880:  # GLM-4.7-Lite converted as deepseek2
            return "sigmoid", "default", notes
        return "softmax", "default", notes
    if arch in GATING_DEFAULT:
        return GATING_DEFAULT[arch], "default", notes
    if arch in GATING_REQUIRED or arch in GATING_NO_DEFAULT:
        raise GGUFError(
            f"{meta.label}: metadata key '{meta.key('expert_gating_func')}' is missing and llama.cpp has no "
            f"default for architecture '{arch}' (it will refuse to run the model); re-convert the model"
        )
    notes.append(f"no {meta.key('expert_gating_func')} key: assuming softmax")
    return "softmax", "assumed", notes


# --------------------------------------------------------------------------------------------------
# The steps of interpret()


def _architecture(label: str, kv: dict[str, Any]) -> str:
    """``general.architecture``: a language model the vendored llama.cpp runs, in one file."""
    arch = kv.get("general.architecture")
    if "general.architecture" not in kv:
        raise GGUFError(
            f"{label}: no 'general.architecture' metadata key, so this is not a llama.cpp model; "
            "convert the model with llama.cpp's convert_hf_to_gguf.py"
        )
    if not isinstance(arch, str):
        raise GGUFError(f"{label}: 'general.architecture' is not a string; {ACTION_CORRUPT}")
    if arch == "clip":
        raise GGUFError(
            f"{label}: this is a CLIP/mmproj projector file, not a language model; pass the main model GGUF"
        )
    if arch not in LLAMA_ARCHITECTURES:
        raise GGUFError(
            f"{label}: architecture '{arch}' is not supported by the llama.cpp in llama-cpp-python 0.3.36; "
            "use a model of a supported architecture (or re-download the file if the name looks garbled)"
        )
    split_count = kv.get("split.count")
    if isinstance(split_count, int) and not isinstance(split_count, bool) and split_count > 1:
        raise GGUFError(
            f"{label}: this is part of a split GGUF ({split_count} files); merge it into one file with "
            "llama-gguf-split --merge and pass the merged file"
        )
    return arch


@dataclass(frozen=True)
class _HParams:
    n_layer: int
    n_embd: int
    nextn: int  # trailing MTP blocks (exempt from the MoE layer rule)
    context_length: int


def _hparams(meta: _Meta) -> _HParams:
    """Block count (1..512), embedding length, nextn (MTP) blocks, training context."""
    n_layer = meta.uint("block_count", required=True)
    assert n_layer is not None
    if not 0 < n_layer <= LLAMA_MAX_LAYERS:
        raise meta.fail(f"'{meta.key('block_count')}' is {n_layer} (llama.cpp allows 1..{LLAMA_MAX_LAYERS})")
    n_embd = meta.uint("embedding_length", required=True)
    assert n_embd is not None
    nextn = meta.uint("nextn_predict_layers", 0) or 0
    context_length = meta.uint("context_length", 0) or 0
    if nextn > n_layer:
        raise meta.fail(f"'{meta.key('nextn_predict_layers')}' ({nextn}) exceeds block_count ({n_layer})")
    return _HParams(n_layer, n_embd, nextn, context_length)


@dataclass
class _Tensors:
    """The tensor table sorted into what matters for the experts."""

    experts: list[ExpertTensor] = field(default_factory=list)
    routers: list[tuple[int, TensorInfo]] = field(default_factory=list)  # (block, ffn_gate_inp / exp_probs_b)
    total_bytes: int = 0
    shared_bytes: int = 0
    router_bytes: int = 0
    has_router_bias: bool = False
    has_shexp: bool = False

    @property
    def expert_bytes(self) -> int:
        return sum(t.nbytes for t in self.experts)


def _classify_tensors(meta: _Meta, hdr: Header, n_layer: int) -> _Tensors:
    """Routed-expert tensors (as :class:`ExpertTensor`), shared-expert and router tensors; byte totals."""
    out = _Tensors()
    for ti in hdr.tensors:
        out.total_bytes += ti.nbytes
        m = EXPERT_RE.fullmatch(ti.name)
        if m:
            out.experts.append(_expert_tensor(meta, hdr, ti, m, n_layer))
            continue
        if SHEXP_RE.fullmatch(ti.name):
            out.shared_bytes += ti.nbytes
            out.has_shexp = True
            continue
        m = ROUTER_RE.fullmatch(ti.name)
        if m:
            out.router_bytes += ti.nbytes
            out.routers.append((int(m.group(1)), ti))
            if m.group(2).startswith("exp_probs_b"):
                out.has_router_bias = True
    return out


def _expert_tensor(meta: _Meta, hdr: Header, ti: TensorInfo, m: re.Match[str], n_layer: int) -> ExpertTensor:
    """One ``blk.N.ffn_*_exps.*`` tensor and the byte range of each expert in it (the last axis)."""
    layer = int(m.group(1))
    if layer >= n_layer:
        raise meta.fail(f"tensor '{ti.name}' belongs to block {layer} but block_count is {n_layer}")
    proj, chunk, suffix = m.group(2), m.group(3), m.group(4)
    kind = proj + ("_chunk" if chunk else "") + SUFFIX_KIND[suffix]
    rank = SUFFIX_RANK[suffix]
    ne = ti.ne
    if len(ne) < rank or any(d != 1 for d in ne[rank:]):
        raise meta.fail(f"expert tensor '{ti.name}' has shape {list(ne)}, expected {rank} dimensions")
    e_count = ne[rank - 1]
    if e_count == 0:
        raise meta.fail(f"expert tensor '{ti.name}' has shape {list(ne)} with no experts")
    if ti.nbytes % e_count or (rank == 1 and GGML_TYPES[ti.type_id][1] != 1):
        raise meta.fail(
            f"expert tensor '{ti.name}' ({GGML_TYPES[ti.type_id][0]}, shape {list(ne)}) "
            "cannot be split into per-expert byte ranges"
        )
    return ExpertTensor(
        name=ti.name,
        layer=layer,
        kind=kind,
        ggml_type=GGML_TYPES[ti.type_id][0],
        shape=tuple(ne),
        file_offset=hdr.data_offset + ti.offset,
        bytes_per_expert=ti.nbytes // e_count,
        n_expert=e_count,
    )


def _moe_keys(meta: _Meta, n_layer: int, tensors: _Tensors) -> _MoEKeys:
    """MoE metadata: strict when the file has experts; a dense model never fails on it."""
    if tensors.experts:
        keys = _read_moe_keys(meta, n_layer)
    else:
        try:
            keys = _read_moe_keys(meta, n_layer)
        except GGUFError:
            keys = _MoEKeys()
    if tensors.experts and tensors.has_shexp and not keys.n_shared and not meta.has("expert_shared_count"):
        keys.n_shared = 1  # qwen2moe-style: one (gated) shared expert, sized by expert_shared_feed_forward_length
    return keys


def _expert_count(meta: _Meta, experts: list[ExpertTensor], keys: _MoEKeys, notes: list[str]) -> int:
    """``<arch>.expert_count`` when the file has expert tensors, else 0 (a dense model)."""
    if experts and keys.n_expert == 0:
        raise GGUFError(
            f"{meta.label}: the file has expert tensors (e.g. '{experts[0].name}') but no "
            f"'{meta.key('expert_count')}' metadata; {ACTION_CORRUPT}"
        )
    if keys.n_expert and not experts:
        notes.append(f"{meta.key('expert_count')}={keys.n_expert} but there are no expert tensors: dense model")
    return keys.n_expert if experts else 0


def _moe_layers(
    meta: _Meta, hp: _HParams, experts: list[ExpertTensor], keys: _MoEKeys, notes: list[str]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(MoE blocks, dense blocks): the blocks with routed-expert tensors, checked against the layer rule."""
    with_experts = sorted({t.layer for t in experts if not t.is_chunk})
    if experts and not with_experts:
        raise meta.fail("the file has chunk-expert tensors but no routed-expert tensors")
    rule_given = keys.lead > 0 or keys.every_n > 0 or keys.step > 0
    if experts and rule_given:
        _check_layer_rule(meta, hp, keys, set(with_experts))
    elif experts and len(with_experts) < hp.n_layer:
        notes.append(
            f"blocks {layer_list(set(range(hp.n_layer)) - set(with_experts))} have no expert tensors (dense)"
        )
    moe_layers = tuple(with_experts)
    dense_layers = tuple(il for il in range(hp.n_layer) if il not in set(with_experts))
    return moe_layers, dense_layers


def _rule_moe_blocks(n_layer: int, lead: int, every_n: int, step: int) -> set[int]:
    """The blocks llama.cpp builds as MoE under the metadata's layer rule."""
    predicted = set()
    for il in range(n_layer):
        if il < lead:
            continue
        if every_n > 0 and il % every_n != 1:  # llama.cpp (bert.cpp): MoE iff il % n == 1
            continue
        if step > 0 and (il + 1) % step != 0:  # llama4/ernie: MoE iff (il + 1) % step == 0
            continue
        predicted.add(il)
    return predicted


def _check_layer_rule(meta: _Meta, hp: _HParams, keys: _MoEKeys, actual: set[int]) -> None:
    """The blocks with experts are those the layer rule predicts (the nextn/MTP blocks are exempt)."""
    first_nextn = hp.n_layer - hp.nextn
    predicted = _rule_moe_blocks(hp.n_layer, keys.lead, keys.every_n, keys.step)
    missing = sorted(x for x in predicted - actual if x < first_nextn)
    extra = sorted(x for x in actual - predicted if x < first_nextn)
    if not (missing or extra):
        return
    rule = ", ".join(
        f"{k}={v}"
        for k, v in (
            ("leading_dense_block_count", keys.lead),
            ("moe_every_n_layers", keys.every_n),
            ("interleave_moe_layer_step", keys.step),
        )
        if v
    )
    problem = []
    if missing:
        problem.append(f"blocks {layer_list(missing)} should be MoE but have no expert tensors")
    if extra:
        problem.append(f"blocks {layer_list(extra)} should be dense but have expert tensors")
    raise GGUFError(
        f"{meta.label}: metadata ({rule}) disagrees with the tensors: {'; '.join(problem)}; "
        "the file is inconsistent; re-convert it"
    )


def _experts_used(
    meta: _Meta,
    n_layer: int,
    experts: list[ExpertTensor],
    used: tuple[int, ...] | None,
    n_expert: int,
    moe_layers: tuple[int, ...],
) -> tuple[int, ...]:
    """Top-k per block: required with experts, at most expert_count, and non-zero on MoE blocks."""
    if not experts:
        return (0,) * n_layer  # llama.cpp: no experts, no routing
    if used is None:
        raise GGUFError(
            f"{meta.label}: required metadata key '{meta.key('expert_used_count')}' is missing "
            f"(llama.cpp cannot route without it); re-convert the model"
        )
    if max(used) > n_expert:
        raise meta.fail(f"'{meta.key('expert_used_count')}' ({max(used)}) exceeds expert_count ({n_expert})")
    bad = [il for il in moe_layers if used[il] == 0]
    if bad:
        raise meta.fail(f"'{meta.key('expert_used_count')}' is 0 for MoE blocks {layer_list(bad)}")
    return tuple(used)


def _expert_shapes(meta: _Meta, hp: _HParams, tensors: _Tensors, keys: _MoEKeys, n_expert: int) -> tuple[int, ...]:
    """Check every expert and router tensor's shape; return the expert FFN width per block (0: dense)."""
    d_expert = keys.latent or hp.n_embd
    ff_per_layer = [0] * hp.n_layer
    by_layer: dict[int, dict[str, ExpertTensor]] = {}
    for t in tensors.experts:
        by_layer.setdefault(t.layer, {})[t.kind] = t
    n_chunk_expected = n_expert // keys.per_group if keys.per_group else 0
    for il, kinds in sorted(by_layer.items()):
        _check_expert_axis(meta, kinds, n_expert, n_chunk_expected)
        ff_per_layer[il] = _check_layer_shapes(meta, il, kinds, d_expert, keys.ff_exp, keys.ff)
    for il, ti in tensors.routers:
        ne = _strip_ones(ti.ne)
        if il not in by_layer or not ne:
            continue
        if ne[-1] != n_expert:
            raise meta.fail(f"router tensor '{ti.name}' has shape {list(ti.ne)} but expert_count is {n_expert}")
    return tuple(ff_per_layer)


def _check_expert_axis(meta: _Meta, kinds: dict[str, ExpertTensor], n_expert: int, n_chunk: int) -> None:
    """Each tensor's expert axis holds expert_count experts (chunk tensors: one per expert group)."""
    for t in kinds.values():
        want = n_chunk if t.is_chunk else n_expert
        if want and t.n_expert != want:
            axis = _kind_rank(t.kind) - 1
            raise meta.fail(f"expert tensor '{t.name}' has {t.n_expert} experts (ne[{axis}]) but metadata says {want}")


def _check_layer_shapes(
    meta: _Meta,
    il: int,
    kinds: dict[str, ExpertTensor],
    d_expert: int,
    ff_exp_arr: tuple[int, ...] | None,
    ff_arr: tuple[int, ...] | None,
) -> int:
    """gate/up: {d, ff, E}; down: {ff, d, E}; gate_up: {d, 2*ff, E}; biases/scales to match; return ff."""
    _check_projections_present(meta, il, kinds)
    ff = _check_projection_shapes(meta, il, kinds, d_expert, ff_exp_arr, ff_arr)
    _check_bias_and_scale_shapes(meta, kinds, ff, d_expert)
    _check_chunk_shapes(meta, il, kinds, d_expert)
    return ff


def _bad_shape(meta: _Meta, t: ExpertTensor, expected: str) -> GGUFError:
    return meta.fail(f"expert tensor '{t.name}' has shape {list(t.shape)}, expected {expected}")


def _check_projections_present(meta: _Meta, il: int, kinds: dict[str, ExpertTensor]) -> None:
    """A down projection, and up either separate (with gate) or merged as gate_up, not both."""
    blk = f"block {il}"
    present = sorted(k for k in kinds if k in WEIGHT_KINDS)
    if "down" not in kinds:
        raise meta.fail(f"{blk} has expert tensors ({', '.join(sorted(kinds))}) but no ffn_down_exps.weight")
    if "gate_up" in kinds and ("gate" in kinds or "up" in kinds):
        raise meta.fail(f"{blk} has both merged ffn_gate_up_exps and separate gate/up expert tensors")
    if "gate_up" not in kinds and "up" not in kinds:
        raise meta.fail(f"{blk} has expert tensors ({', '.join(present)}) but no ffn_up_exps/ffn_gate_up_exps")


def _check_projection_shapes(
    meta: _Meta,
    il: int,
    kinds: dict[str, ExpertTensor],
    d_expert: int,
    ff_exp_arr: tuple[int, ...] | None,
    ff_arr: tuple[int, ...] | None,
) -> int:
    """The weights agree on the embedding length, the FFN width (returned) and the expert count."""
    down = kinds["down"]
    ff = down.shape[0]
    if down.shape[1] != d_expert:
        raise _bad_shape(meta, down, f"[{ff}, {d_expert}, {down.n_expert}] (ne[1] = embedding length {d_expert})")
    for k in ("gate", "up"):
        t = kinds.get(k)
        if t is not None and (t.shape[0] != d_expert or t.shape[1] != ff):
            raise _bad_shape(meta, t, f"[{d_expert}, {ff}, {t.n_expert}] (embedding length, ff of ffn_down_exps)")
    t = kinds.get("gate_up")
    if t is not None and (t.shape[0] != d_expert or t.shape[1] != 2 * ff):
        raise _bad_shape(meta, t, f"[{d_expert}, {2 * ff}, {t.n_expert}] (gate and up halves of ff={ff})")
    n_e = {t.n_expert for t in kinds.values() if not t.is_chunk}
    if len(n_e) > 1:
        raise meta.fail(f"block {il} expert tensors disagree on the number of experts ({sorted(n_e)})")
    # some architectures size experts with feed_forward_length and ignore the expert key
    if ff_exp_arr is not None and ff != ff_exp_arr[il] and (ff_arr is None or ff != ff_arr[il]):
        raise meta.fail(
            f"expert tensor '{down.name}' has ff={ff} but "
            f"'{meta.key('expert_feed_forward_length')}' is {ff_exp_arr[il]} for block {il}"
        )
    return ff


def _check_bias_and_scale_shapes(meta: _Meta, kinds: dict[str, ExpertTensor], ff: int, d_expert: int) -> None:
    """Biases are one vector per expert of the projection's output width; scales one value per expert."""
    want_bias = {"gate_bias": ff, "up_bias": ff, "down_bias": d_expert, "gate_up_bias": 2 * ff}
    for k, t in kinds.items():
        if k in want_bias and t.shape[0] != want_bias[k]:
            raise _bad_shape(meta, t, f"[{want_bias[k]}, {t.n_expert}]")
        if k.endswith("scale") and len(t.shape) and t.shape[0] != t.n_expert:
            raise _bad_shape(meta, t, f"[{t.n_expert}]")


def _check_chunk_shapes(meta: _Meta, il: int, kinds: dict[str, ExpertTensor], d_expert: int) -> None:
    """GroveMoE chunk experts (``ffn_*_chexps``): a down projection, gate/up of the same width."""
    ch = {k: kinds[k] for k in ("gate_chunk", "up_chunk", "down_chunk") if k in kinds}
    if not ch:
        return
    if "down_chunk" not in ch:
        raise meta.fail(f"block {il} has chunk-expert tensors but no ffn_down_chexps.weight")
    dch = ch["down_chunk"]
    ffc = dch.shape[0]
    if dch.shape[1] != d_expert:
        raise _bad_shape(meta, dch, f"[{ffc}, {d_expert}, {dch.n_expert}]")
    for k in ("gate_chunk", "up_chunk"):
        t = ch.get(k)
        if t is not None and (t.shape[0] != d_expert or t.shape[1] != ffc or t.n_expert != dch.n_expert):
            raise _bad_shape(meta, t, f"[{d_expert}, {ffc}, {dch.n_expert}]")


def _expert_ff_length(ff_per_layer: tuple[int, ...], moe_layers: tuple[int, ...]) -> int | None:
    """The expert FFN width; None when MoE blocks differ (see expert_ff_lengths) or for a dense model.

    The tensors are the truth (they were checked against expert_feed_forward_length).
    """
    ff_vals = {ff_per_layer[il] for il in moe_layers}
    return ff_vals.pop() if len(ff_vals) == 1 else None


def _gating(meta: _Meta, hp: _HParams, experts: list[ExpertTensor], notes: list[str]) -> tuple[str, str]:
    """(gating function, where it comes from); ``("none", "")`` for a dense model."""
    if not experts:
        return "none", ""
    gating, source, gnotes = _resolve_gating(meta, hp.n_layer - hp.nextn)
    notes += gnotes
    return gating, source


def _expert_order(kv: dict[str, Any], moe_layers: tuple[int, ...], n_expert: int) -> dict[int, tuple[int, ...]]:
    """``spac.expert_order.<block>`` written by ``spac patch``: original expert id of each position."""
    out = {}
    for block in moe_layers:
        v = kv.get(f"spac.expert_order.{block}")
        if v is None:
            continue
        values = v.values if isinstance(v, ArrayValue) else None
        order = tuple(int(x) for x in values) if values is not None else ()
        if sorted(order) != list(range(n_expert)):
            raise GGUFError(f"metadata 'spac.expert_order.{block}' is not a permutation of the {n_expert} experts; "
                            "the file is corrupt; re-run `spac patch`")
        out[block] = order
    return out


# --------------------------------------------------------------------------------------------------
# Helpers


def _kind_rank(kind: str) -> int:
    if kind.endswith("scale"):
        return 1
    return 2 if kind.endswith("_bias") else 3


def _strip_ones(ne: tuple[int, ...]) -> tuple[int, ...]:
    while len(ne) > 1 and ne[-1] == 1:
        ne = ne[:-1]
    return ne


def layer_list(layers: Iterable[int]) -> str:
    """Compact "0-3,5,7-9" form of a sorted list of ints."""
    out: list[str] = []
    items = sorted(layers)
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(out) if out else "none"
