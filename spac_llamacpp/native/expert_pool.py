"""Binding of the patched llama.cpp's expert slot pool (``llama_spac_pool_*``, patch 0003).

The pool holds copies of some routed experts in fast memory (VRAM; host memory for testing).
Every MoE layer computes its selected experts on two paths with the same routing (the pool's
and the full tensors', each skipping the other's experts) and adds them, so output never depends
on which experts are resident. Copies run on a worker thread in llama.cpp (pinned staging, own
stream); a finished copy is used from the next evaluation on; an evicted slot is reused only after
:meth:`ExpertPool.fence`. See ``docs/patches.md``.
"""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.native.libs import llama_lib_dir, spac_patch_level

if TYPE_CHECKING:
    from spac_llamacpp.gguf.info import MoEModelInfo

POOL_PATCH_LEVEL = 3
TENSOR_DATA_PATCH_LEVEL = 5  # llama_spac_pool_tensor_data (patch 0005): slots filled by the caller

# llama_spac_status
OK, E_ARG, E_NO_POOL, E_BUSY, E_RESIDENT, E_UNSUPPORTED, E_ALLOC = 0, -2, -3, -4, -5, -6, -7
_ERRORS = {
    E_ARG: "layer, expert, group or slot out of range",
    E_NO_POOL: "no pool configured",
    E_BUSY: "slot not free",
    E_RESIDENT: "expert already in a slot",
    E_UNSUPPORTED: "the model or its placement cannot use a pool (see llama.cpp's log)",
    E_ALLOC: "the pool could not be allocated",
}
# llama_spac_slot_state
FREE, LOADING, READY, RESIDENT, RETIRED = 0, 1, 2, 3, 4
# llama_spac_kind: the expert tensors a slot holds
KINDS = {"gate": 0, "up": 1, "down": 2, "gate_up": 3}


class PoolError(SpacError):
    """A pool call failed; ``code`` is the llama_spac_status."""

    def __init__(self, what: str, code: int) -> None:
        super().__init__(f"{what}: {_ERRORS.get(code, f'error {code}')}")
        self.code = code


def _address(p: Any) -> int:
    """A pointer given as an int or a ctypes object."""
    return int(p.value if hasattr(p, "value") else p)


@cache
def _lib() -> ctypes.CDLL:
    if spac_patch_level() < POOL_PATCH_LEVEL:
        raise SpacError("the expert pool needs spac's patched llama.cpp (patch level "
                        f"{POOL_PATCH_LEVEL}); run scripts/build_llama.sh (docs/patches.md)")
    lib = ctypes.CDLL(str(llama_lib_dir() / "libllama.so.0"), mode=ctypes.RTLD_GLOBAL)
    p, i32, u64, b = ctypes.c_void_p, ctypes.c_int32, ctypes.c_uint64, ctypes.c_bool
    pi32 = ctypes.POINTER(i32)
    sigs = {
        "llama_spac_pool_n_groups": (i32, [p]),
        "llama_spac_pool_layer_group": (i32, [p, i32]),
        "llama_spac_pool_slot_bytes": (u64, [p, i32]),
        "llama_spac_pool_configure": (i32, [p, pi32, i32, b]),
        "llama_spac_pool_n_slots": (i32, [p, i32]),
        "llama_spac_pool_set_source": (i32, [p, i32, i32, p, ctypes.c_size_t]),
        "llama_spac_pool_load": (i32, [p, i32, i32, i32]),
        "llama_spac_pool_evict": (i32, [p, i32, i32]),
        "llama_spac_pool_slot_of": (i32, [p, i32, i32]),
        "llama_spac_pool_slot": (i32, [p, i32, i32, pi32, pi32]),
        "llama_spac_pool_fence": (i32, [p, b]),
        "llama_spac_pool_counters": (None, [p, ctypes.POINTER(u64), ctypes.POINTER(u64)]),
    }
    if spac_patch_level() >= TENSOR_DATA_PATCH_LEVEL:
        sigs["llama_spac_pool_tensor_data"] = (p, [p, i32, i32, ctypes.POINTER(u64)])
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args
    return lib


@dataclass(frozen=True)
class PoolLayout:
    """Which layers share slots (same expert types and shapes) and what one slot costs."""

    group_of_layer: tuple[int, ...]  # per block; -1: no routed experts
    slot_bytes: tuple[int, ...]  # per group

    @classmethod
    def of(cls, model: Any) -> PoolLayout:
        """The layout of a ``llama_model *``."""
        model = _address(model)
        lib = _lib()
        n_groups = lib.llama_spac_pool_n_groups(model)
        from llama_cpp import llama_cpp as llama_c

        n_layer = llama_c.llama_model_n_layer(ctypes.c_void_p(model))
        groups = tuple(lib.llama_spac_pool_layer_group(model, il) for il in range(n_layer))
        return cls(groups, tuple(int(lib.llama_spac_pool_slot_bytes(model, g)) for g in range(n_groups)))

    def layers_of(self, group: int) -> list[int]:
        return [il for il, g in enumerate(self.group_of_layer) if g == group]


class ExpertPool:
    """The slot pool of one llama.cpp context.

    Args:
        llm: the ``llama_cpp.Llama`` (or ``spac_llamacpp.Llama``) whose context gets the pool. Calls
            after it was closed raise :class:`SpacError` instead of touching freed memory.
        n_slots: slots per group (see :class:`PoolLayout`).
        on_host: place the pool in host memory (testing without a GPU) instead of the first GPU.
    """

    def __init__(self, llm: Any, n_slots: list[int], *, on_host: bool = False) -> None:
        self.lib = _lib()
        self.llm = llm
        self._closed = False
        self.layout = PoolLayout.of(_address(self._model()))
        if len(n_slots) != len(self.layout.slot_bytes):
            raise SpacError(f"n_slots needs {len(self.layout.slot_bytes)} entries (one per group), got {len(n_slots)}")
        arr = (ctypes.c_int32 * len(n_slots))(*n_slots)
        self._check("configure", self.lib.llama_spac_pool_configure(self.ctx, arr, len(n_slots), on_host))
        self.n_slots = [int(n) for n in n_slots]
        self.on_host = on_host
        self._file: tuple[mmap.mmap, np.ndarray] | None = None

    def _model(self) -> Any:
        model = getattr(getattr(self.llm, "_model", None), "model", None)
        if model is None:
            raise SpacError("this Llama was closed; its expert pool is gone")
        return model

    @property
    def ctx(self) -> int:
        """The live ``llama_context *`` (SpacError once the Llama or this pool was closed)."""
        ctx = getattr(getattr(self.llm, "_ctx", None), "ctx", None)
        if ctx is None or self._closed:
            raise SpacError("this Llama (or its expert pool) was closed; create a new one")
        return _address(ctx)

    @staticmethod
    def _check(what: str, rc: int) -> int:
        if rc < -1:  # -1 is slot_of's "not in a slot"
            raise PoolError(what, rc)
        return rc

    @property
    def pool_bytes(self) -> int:
        return sum(n * b for n, b in zip(self.n_slots, self.layout.slot_bytes, strict=True))

    def set_sources_from_file(self, info: MoEModelInfo) -> None:
        """Copy experts from the GGUF file (memory-mapped here, read-only) where llama.cpp repacked the
        tensors for its CPU kernels (their bytes are no longer in ggml's layout). Plain host tensors are
        copied from themselves regardless."""
        with open(info.path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        view = np.frombuffer(mm, dtype=np.uint8)
        base = view.ctypes.data
        for t in info.expert_tensors:
            if t.kind in KINDS and not t.is_chunk:
                rc = self.lib.llama_spac_pool_set_source(self.ctx, t.layer, KINDS[t.kind], base + t.file_offset,
                                                         t.bytes_per_expert)
                self._check(f"copy source of {t.name}", rc)
        if hasattr(mmap, "MADV_RANDOM"):
            mm.madvise(mmap.MADV_RANDOM)  # the worker reads whole experts at random: no read-around
        self._file = (mm, view)

    def load(self, il: int, e: int, slot: int) -> None:
        """Queue the copy of expert ``e`` of layer ``il`` into free ``slot`` of the layer's group."""
        rc = self.lib.llama_spac_pool_load(self.ctx, il, e, slot)
        self._check(f"load of expert {e} of layer {il} into slot {slot}", rc)

    def evict(self, il: int, e: int) -> bool:
        """Stop using expert ``e`` of layer ``il`` from the next evaluation on; False if it was not in a slot."""
        return self._check(f"evict of expert {e} of layer {il}", self.lib.llama_spac_pool_evict(self.ctx, il, e)) == 0

    def slot_of(self, il: int, e: int) -> int:
        """The slot holding (or loading) expert ``e`` of layer ``il``, else -1."""
        return self._check("slot_of", self.lib.llama_spac_pool_slot_of(self.ctx, il, e))

    def slot(self, group: int, slot: int) -> tuple[int, int, int]:
        """``(state, layer, expert)`` of a slot (layer and expert -1 when free)."""
        il, e = ctypes.c_int32(), ctypes.c_int32()
        rc = self.lib.llama_spac_pool_slot(self.ctx, group, slot, ctypes.byref(il), ctypes.byref(e))
        state = self._check("slot", rc)
        return state, il.value, e.value

    def fence(self, wait_loads: bool = False) -> int:
        """Wait for the running evaluation; retired slots become free (returns how many).
        ``wait_loads`` also waits for every queued copy."""
        return self._check("fence", self.lib.llama_spac_pool_fence(self.ctx, wait_loads))

    def tensor_data(self, group: int, kind: str) -> tuple[int, int]:
        """``(address, bytes from one slot to the next)`` of a host pool's tensor of one kind (patch 0005), for
        a caller that fills slots itself (the flash tier's slot store); ``(0, 0)`` when the group has no such
        tensor. SpacError on a library without patch 0005."""
        if not hasattr(self.lib, "llama_spac_pool_tensor_data"):
            raise SpacError("filling pool slots directly needs spac's patched llama.cpp at patch level "
                            f"{TENSOR_DATA_PATCH_LEVEL}; run scripts/build_llama.sh (docs/patches.md)")
        nb = ctypes.c_uint64()
        addr = self.lib.llama_spac_pool_tensor_data(self.ctx, group, KINDS[kind], ctypes.byref(nb))
        return int(addr or 0), int(nb.value)

    def counters(self) -> tuple[int, int]:
        """``(copies done, bytes copied)`` since the pool was configured."""
        n, b = ctypes.c_uint64(), ctypes.c_uint64()
        self.lib.llama_spac_pool_counters(self.ctx, ctypes.byref(n), ctypes.byref(b))
        return n.value, b.value

    def close(self) -> None:
        """Remove the pool (the context computes every expert from the full tensors again); idempotent,
        and harmless after the Llama was closed (freeing the context already freed the pool)."""
        if not self._closed:
            ctx = getattr(getattr(self.llm, "_ctx", None), "ctx", None)
            if ctx is not None:
                self.lib.llama_spac_pool_configure(_address(ctx), None, 0, False)
            self._closed = True
        self._file = None  # the mapping goes with the last reference (after the pool that read it)
