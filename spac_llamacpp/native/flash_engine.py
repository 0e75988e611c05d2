"""The native flash-tier engine (``native/spac_engine.c``): which experts' pages are in RAM.

:class:`FlashEngine` owns one engine bound to llama.cpp's mapping of a GGUF. Its worker threads
prefetch, evict, pin and unpin experts (addressed by block index and expert id); the routing
sensor reports each MoE layer's selection to it from the graph callback, so experts being
computed are never evicted and non-resident ones get demand readahead. Residency is measured with
``mincore``. Threads stop on :meth:`close`, when the object is collected, and at interpreter exit.

Failed system calls are counted per kind in C (``evict``, ``fadvise``, ``pin``, ...); each kind is logged
once, with its errno, the first time :meth:`FlashEngine.end_step` or :meth:`FlashEngine.errors` sees it,
and :meth:`FlashEngine.errors` reports them all (``llm.stats()["engine_errors"]``).
"""

from __future__ import annotations

import logging
import os
import stat
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.gguf.info import MoEModelInfo
from spac_llamacpp.native import module as native
from spac_llamacpp.native.libs import mmid_hooks_setter
from spac_llamacpp.native.mapping import FileMapping
from spac_llamacpp.native.sensor import RoutingSensor

log = logging.getLogger(__name__)

OPS = {"prefetch": 1, "evict": 2, "pin": 3, "unpin": 4}
FILE_FAULTS = {0: None, 1: "shrunk", 2: "modified", 3: "read_fault", 4: "sigbus"}  # SPAC_FILE_* (spac_engine.h)
_STAT_FIELDS = ("prefetches", "prefetch_bytes", "evictions", "evict_bytes", "pins", "unpins", "pin_failures",
                "superseded", "deferred", "demand_hits", "demand_misses", "transient_evictions", "queue_full",
                "errors", "last_errno", "queued", "demand_wait_ns", "ahead_predicted", "ahead_issued", "ahead_useful",
                "evict_waits", "evict_in_use", "staged", "prompt_kept", "prompt_released", "drains", "drain_ns",
                "drained_here", "loading_defers", "demand_read_ns", "demand_async", "evict_pageouts", "admitted",
                "overlay_loads", "overlay_fallbacks", "overlay_fresh_bytes", "overlays", "pool_bytes",
                "slot_reads", "slot_read_bytes", "slot_fallbacks", "slot_spills", "slots_held", "slot_maps")
DEMAND_MODES = {"wait": 0, "async": 1}  # SPAC_DEMAND_* (spac_engine.h)
READ_METHODS = {"pagecache": 0, "overlay": 1, "slots": 2}  # SPAC_FLASH_READ_* (spac_engine.h)
FLAGS = {"staged": 0, "touched": 1, "kept": 2, "released": 3, "prefetching": 4}  # SPAC_FLAG_* (spac_engine.h)
_ERROR_WHAT = {  # what failed, per kind (SPAC_ERR_* in native/spac_engine.h)
    "prefetch": "prefetch reads (madvise WILLNEED/POPULATE_READ)",
    "demand": "demand loads of missed experts (madvise)",
    "evict": "evictions (madvise DONTNEED / munlock)",
    "fadvise": "evictions from the page cache (posix_fadvise DONTNEED)",
    "pin": "pinning experts (mlock; raise `ulimit -l` or lower pin_fraction)",
    "unpin": "unpinning experts (munlock)",
    "setup": "engine setup (fdatasync / madvise RANDOM)",
    "mincore": "residency checks (mincore)",
    "defer": "deferring an eviction of an in-use expert (deferred list full)",
    "nomem": "allocating scratch memory",
    "overlay": "overlay reads (O_DIRECT pread / mremap; the page cache served those experts instead)",
    "slot": "O_DIRECT reads into expert slots (a buffered read filled those slots instead)",
}


@dataclass(frozen=True)
class SlotSpec:
    """Where the slot store keeps experts (``spac_engine_set_slots``): a host expert pool's slots per group, the
    group of each block (-1: none), and per registered expert tensor (the engine's order: block, then the
    header's order) the address of its slot 0 and the bytes between slots."""

    n_slots: tuple[int, ...]
    group_of_layer: tuple[int, ...]
    bases: dict[tuple[int, int], tuple[int, int]]  # (block, i-th tensor of the block) -> (address, stride)
    readers: int = 3


def error_report(counts: Any, codes: Any, names: list[str]) -> dict[str, dict[str, Any]]:
    """``{kind: {"count", "errno", "message"}}`` of the kinds that failed (native per-kind counters)."""
    out = {}
    for i, name in enumerate(names):
        if int(counts[i]):
            code = int(codes[i])
            out[name] = {"count": int(counts[i]), "errno": code, "message": os.strerror(code) if code else ""}
    return out


def page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


def covering_bytes(info: MoEModelInfo) -> np.ndarray:
    """``[block_count, n_expert]`` bytes of the pages each expert touches (what residency can cost)."""
    pg = page_size()
    out = np.zeros((info.block_count, max(info.n_expert, 1)), dtype=np.int64)
    for t in info.expert_tensors:
        if t.is_chunk:
            continue
        starts = t.file_offset + np.arange(t.n_expert, dtype=np.int64) * t.bytes_per_expert
        lo = starts // pg * pg
        hi = -((-(starts + t.bytes_per_expert)) // pg) * pg
        out[t.layer, : t.n_expert] += hi - lo
    return out


def readahead_chunk(path: str | os.PathLike[str], default: int = 128 << 10) -> int:
    """Bytes one ``MADV_WILLNEED`` call may cover and still be read whole: the file's block device's
    ``max_sectors_kb`` (the kernel reads at most max(that, the file's readahead window) per call and leaves
    the rest to page faults); ``default`` (the kernel's default readahead window) when it cannot be found."""
    try:
        st = os.stat(path)
        dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}").resolve()
        for queue in (dev / "queue", dev.parent / "queue"):  # a partition's queue is its disk's
            limit = queue / "max_sectors_kb"
            if limit.is_file():
                return max(int(limit.read_text().split()[0]) << 10, os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        pass
    return default


def non_expert_ranges(info: MoEModelInfo) -> list[tuple[int, int]]:
    """File ranges ``(offset, length)`` of the tensor data that is not routed experts."""
    spans = sorted((t.file_offset, t.end_offset) for t in info.expert_tensors)
    out, pos = [], info.data_offset
    for lo, hi in spans:
        if lo > pos:
            out.append((pos, lo - pos))
        pos = max(pos, hi)
    if info.file_size > pos:
        out.append((pos, info.file_size - pos))
    return out


_MMID_OWNER: list[Any] = []  # the engine handle whose MUL_MAT_ID hooks are installed (process-wide: one)


def _clear_mmid_hooks(handle: Any) -> None:
    if _MMID_OWNER and _MMID_OWNER[0] == handle:
        setter = mmid_hooks_setter()
        if setter is not None:
            setter(None, None, None)  # no compute thread may call into a freed engine
        _MMID_OWNER.clear()


def _release(lib: Any, ffi: Any, handle: Any, fd: int, hooked: list) -> None:
    _clear_mmid_hooks(handle)
    for s in hooked:  # no sensor may call into a freed engine
        s.layer_hook = ffi.NULL
        s.hook_data = ffi.NULL
        s.event_mask = ffi.NULL
        s.hidden_hook = ffi.NULL
        s.hidden_data = ffi.NULL
        s.map_hook = ffi.NULL
        s.map_data = ffi.NULL
    hooked.clear()
    lib.spac_engine_free(handle)
    os.close(fd)


class FlashEngine:
    """Background expert moves on llama.cpp's mapping of ``info.path``.

    Args:
        info: the model's header (expert tensors and their file offsets).
        mapping: llama.cpp's mapping of the file's tensor data (see :mod:`spac_llamacpp.native.mapping`); the
            engine addresses file offsets from ``mapping.file_base``.
        threads: worker threads (I/O bound; 2-4 is plenty).
        queue: capacity of the move queue.
    """

    def __init__(self, info: MoEModelInfo, mapping: FileMapping, threads: int = 2, queue: int = 65536,
                 guard: bool = True, slots: SlotSpec | None = None) -> None:
        if info.n_expert <= 0:
            raise SpacError(f"{info.path} has no routed experts; the flash tier needs an MoE model")
        if mapping.offset > info.data_offset or mapping.offset + mapping.size < info.file_size:
            raise SpacError(f"mapping {mapping} does not cover the tensor data of {info.path}")
        mod = native.load()
        self._ffi, self._lib = mod.ffi, mod.lib
        tensors = [t for t in info.expert_tensors if not t.is_chunk]
        per_layer = max((sum(1 for t in tensors if t.layer == il) for il in info.moe_layers), default=1)
        self.info = info
        self.n_layer, self.n_expert = info.block_count, info.n_expert
        fd = os.open(info.path, os.O_RDONLY | os.O_CLOEXEC)
        handle = self._lib.spac_engine_new(self.n_layer, self.n_expert, per_layer,
                                           self._ffi.cast("uint8_t *", mapping.file_base),
                                           mapping.offset + mapping.size, fd,
                                           threads, queue)
        if handle == self._ffi.NULL:
            os.close(fd)
            raise SpacError(f"could not create the flash engine (layers={self.n_layer}, experts={self.n_expert}, "
                            f"threads={threads}, queue={queue})")
        self._handle = handle
        self._sensor: RoutingSensor | None = None
        self._hooked: list = []
        self._finalizer = weakref.finalize(self, _release, self._lib, self._ffi, handle, fd, self._hooked)
        for t in tensors:
            if self._lib.spac_engine_add_tensor(handle, t.layer, t.file_offset, t.bytes_per_expert) != 0:
                self.close()
                raise SpacError(f"expert tensor {t.name} lies outside the mapped file {info.path}; the GGUF is corrupt")
        self.readahead_chunk = readahead_chunk(info.path)
        self._lib.spac_engine_set_readahead(handle, self.readahead_chunk)
        self.slots = slots
        self.direct_io = False
        if slots is not None:
            self._set_slots(slots, per_layer)
        self.guarded = False
        if guard:
            self._guard(mapping, fd)
        rc = self._lib.spac_engine_start(handle)
        if rc != 0:
            self.close()
            raise SpacError(f"could not start the flash engine's threads ({os.strerror(-rc)})")
        # the pages llama.cpp's load read come in large folios spanning several experts, which the evictions of
        # single experts cannot drop: the tier starts from no expert resident (native/spac_engine.h)
        self.reset_bytes = int(self._lib.spac_engine_reset_experts(handle, info.data_offset))
        for offset, length in non_expert_ranges(info):  # read back exactly what the reset dropped beside them
            self._lib.spac_engine_read_range(handle, offset, length)
        self.covering = covering_bytes(info)
        self._mask = np.zeros(self.n_expert, dtype=np.uint8)
        self._keep: list[np.ndarray] = []  # predictor arrays the engine points into
        self._error_names = [self._ffi.string(self._lib.spac_engine_error_name(i)).decode()
                             for i in range(self._lib.SPAC_ERR_KINDS)]
        self._logged: set[str] = set()
        self.errors()  # setup failures (fdatasync, madvise RANDOM) are logged now

    def _set_slots(self, spec: SlotSpec, per_layer: int) -> None:
        ffi = self._ffi
        n = self.n_layer * per_layer
        bases = ffi.new("uint8_t *[]", n)
        strides = ffi.new("uint64_t[]", n)
        for (layer, i), (addr, stride) in spec.bases.items():
            bases[layer * per_layer + i] = ffi.cast("uint8_t *", addr)
            strides[layer * per_layer + i] = stride
        rc = self._lib.spac_engine_set_slots(self._handle, len(spec.n_slots), ffi.new("int32_t[]", list(spec.n_slots)),
                                             ffi.new("int32_t[]", list(spec.group_of_layer)), bases, strides,
                                             spec.readers)
        if rc < 0:
            self.close()
            raise SpacError(f"could not set up the slot store for {self.info.path} ({os.strerror(-rc)})")
        self.direct_io = rc == 0
        if not self.direct_io:
            log.warning("flash engine: the file system of %s refuses O_DIRECT; slots are filled by buffered reads "
                        "(more CPU per byte)", self.info.path)

    def slot_of(self, layer: int, expert: int) -> int:
        """The slot holding or loading (block, expert) in slot mode, -1 none."""
        return int(self._lib.spac_engine_slot_of(self._live(), layer, expert))

    def _guard(self, mapping: FileMapping, fd: int) -> None:
        """The file guard (native/spac_engine.h): the mapped file changing under the model is detected, and
        reads of pages it no longer backs get zero pages instead of SIGBUS."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            log.debug("flash engine: fd %d is not a regular file: no file guard", fd)
            return
        if mapping.inode and st.st_ino != mapping.inode:
            self.close()
            raise SpacError(f"{self.info.path} was replaced while the model loaded; load it again")
        rc = self._lib.spac_engine_guard_file(self._handle, mapping.offset, mapping.offset + mapping.size)
        if rc != 0:
            log.warning("flash engine: no guard against %s changing while mapped (%s)", self.info.path,
                        os.strerror(-rc))
            return
        self.guarded = True

    def check_file(self) -> dict[str, Any]:
        """The mapped file now against the file at load (fstat): ``{"fault": None | "shrunk" | "modified" |
        "read_fault" | "sigbus", "size_at_start", "size_now", "read_faults", "sigbus_caught", "fenced_bytes"}``."""
        st = self._ffi.new("spac_file_status *")
        self._lib.spac_engine_check_file(self._live(), st)
        return {"guarded": bool(st.guarded), "fault": FILE_FAULTS.get(int(st.fault), str(int(st.fault))),
                "size_at_start": int(st.size_at_start), "size_now": int(st.size_now),
                "read_faults": int(st.read_faults), "sigbus_caught": int(st.sigbus_caught),
                "fenced_bytes": int(st.fenced_bytes)}

    # --- moves -------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _live(self) -> Any:
        if self.closed:
            raise SpacError("the flash engine was closed")
        return self._handle

    def submit(self, op: str, layer: int, expert: int) -> bool:
        """Queue a move (``prefetch``, ``evict``, ``pin``, ``unpin``); False when the queue is full."""
        rc = self._lib.spac_engine_submit(self._live(), OPS[op], int(layer), int(expert))
        if rc == -1:
            raise SpacError(f"cannot {op} expert {expert} of layer {layer}: no such routed expert")
        return rc == 0

    def set_wanted(self, layer: int, expert: int, wanted: bool) -> None:
        self._lib.spac_engine_set_wanted(self._live(), int(layer), int(expert), 1 if wanted else 0)

    def set_demand_mode(self, mode: str) -> None:
        """How the layer hook waits for its demand loads (``native/spac_engine.h``): ``"async"`` (the default)
        hands the wait to the engine's completer thread, so the layer's matmuls compute resident experts while
        the missing ones are read; ``"wait"`` waits in the hook before they start. Outputs are identical."""
        if mode not in DEMAND_MODES:
            raise SpacError(f"unknown demand mode {mode!r}; choose one of {', '.join(DEMAND_MODES)}")
        self._lib.spac_engine_set_demand_mode(self._live(), DEMAND_MODES[mode])

    def set_read_method(self, method: str, pool_cap_bytes: int = 0) -> bool:
        """How experts are read (``native/spac_engine.h``, ``spac_engine_set_read_method``): ``"pagecache"``
        (readahead into the page cache, eviction drops the pages) or ``"overlay"`` (O_DIRECT into anonymous pages
        moved onto the mapping at the experts' own addresses; eviction moves them into a pool of at most
        ``pool_cap_bytes`` for the next read). Outputs are identical. Returns False, logged, where the file system
        refuses O_DIRECT (the method is then unchanged)."""
        if method not in READ_METHODS:
            raise SpacError(f"unknown read method {method!r}; choose one of {', '.join(READ_METHODS)}")
        rc = self._lib.spac_engine_set_read_method(self._live(), READ_METHODS[method], max(0, int(pool_cap_bytes)))
        if rc != 0:
            log.warning("flash engine: read method %s is not available for %s (%s); the page cache reads the "
                        "experts", method, self.info.path, os.strerror(-rc))
            return False
        return True

    def set_staging(self, cap_bytes: int) -> None:
        """Bytes of demand loads the layer hook may keep until the step ends (staged) instead of evicting them
        after their layer; the tier decides about them (:meth:`flags` ``"staged"``)."""
        self._lib.spac_engine_set_staging(self._live(), max(0, int(cap_bytes)))

    def set_prompt_keep(self, counts: np.ndarray | None, on: bool = True) -> None:
        """Prompt keep for the next step (native/spac_engine.h): each layer's planned experts are swapped for
        the selected ones with more tokens of the step. ``counts``: the routing sensor's step counts
        (int32 ``[block_count, n_expert]``, C order, kept alive here); the engine turns it off at the step's end."""
        if counts is None or not on:
            self._lib.spac_engine_set_prompt_keep(self._live(), self._ffi.NULL, 0)
            return
        if counts.shape != (self.n_layer, self.n_expert) or counts.dtype != np.int32 or not counts.flags.c_contiguous:
            raise SpacError(f"step counts must be C-contiguous int32 {(self.n_layer, self.n_expert)}")
        self._keep.append(counts)
        self._lib.spac_engine_set_prompt_keep(self._live(), self._ffi.cast("int32_t *", self._ffi.from_buffer(counts)),
                                              1)

    def set_admission(self, rank: np.ndarray | None, newcomer_floor: float = -np.inf, slack_bytes: int = 0) -> None:
        """Layer admission (native/spac_engine.h) until changed: a demand load the plan does not hold takes the
        place of its layer's planned expert of the lowest ``rank`` (``[block_count, n_expert]``, copied) that the
        layer is not using, when it ranks higher (counting at least ``newcomer_floor``; ``inf``: always, LRU's
        rule); ``slack_bytes``: the plan's unused bytes, which a swap of one page more may spend. None: off."""
        if rank is None:
            self._lib.spac_engine_set_admission(self._live(), self._ffi.NULL, 0.0, 0, 0)
            return
        r = np.ascontiguousarray(rank, dtype=np.float32)
        if r.shape != (self.n_layer, self.n_expert):
            raise SpacError(f"admission ranks must be {(self.n_layer, self.n_expert)}, not {r.shape}")
        self._lib.spac_engine_set_admission(self._live(), self._ffi.cast("float *", self._ffi.from_buffer(r)),
                                            float(newcomer_floor), max(0, int(slack_bytes)), 1)

    def set_admission_model(self, next_rows: np.ndarray | None, base: np.ndarray | None,
                            self_rank: float = 0.0) -> None:
        """Predicted admission ranks (native/spac_engine.h) until changed: a layer's hook ranks its experts as
        ``base[l] + self_rank * [selected] + sum over selected e of next_rows[l, e]`` before admitting a demand
        load (``next_rows`` ``[block_count, n_expert, n_expert]``, None: the ones set before; ``base``
        ``[block_count, n_expert]``; both copied). ``base=None``: off (the ranks of :meth:`set_admission`)."""
        ffi = self._ffi
        if base is None:
            self._lib.spac_engine_set_admission_model(self._live(), ffi.NULL, ffi.NULL, 0.0, 0)
            return
        b = np.ascontiguousarray(base, dtype=np.float32)
        if b.shape != (self.n_layer, self.n_expert):
            raise SpacError(f"admission base ranks must be {(self.n_layer, self.n_expert)}, not {b.shape}")
        if not np.isfinite(self_rank) or not np.isfinite(b).all():
            raise SpacError("admission model ranks must be finite numbers")
        nxt = ffi.NULL
        if next_rows is not None:
            rows = np.ascontiguousarray(next_rows, dtype=np.float32)
            if rows.shape != (self.n_layer, self.n_expert, self.n_expert):
                raise SpacError(f"admission next-step rows must be {(self.n_layer, self.n_expert, self.n_expert)}, "
                                f"not {rows.shape}")
            if not np.isfinite(rows).all():
                raise SpacError("admission model ranks must be finite numbers")
            nxt = ffi.cast("float *", ffi.from_buffer(rows))
        rc = self._lib.spac_engine_set_admission_model(self._live(), nxt, ffi.cast("float *", ffi.from_buffer(b)),
                                                       float(self_rank), 1)
        if rc == -2:
            raise MemoryError("flash engine: no memory for the admission model")

    def flags(self, which: str, clear: bool = False) -> np.ndarray:
        """Per-expert flags ``[block_count, n_expert]`` (bool): ``staged`` (demand loads kept until the tier
        decides; ``clear`` releases them), ``touched`` (pages moved by the engine since the last clear),
        ``kept`` / ``released`` (this step's prompt-keep swaps), ``prefetching`` (a prefetch queued or running)."""
        if which not in FLAGS:
            raise SpacError(f"unknown engine flag {which!r}; choose one of {', '.join(FLAGS)}")
        out = np.zeros((self.n_layer, self.n_expert), dtype=np.uint8)
        self._lib.spac_engine_flags(self._live(), FLAGS[which], self._ffi.cast("uint8_t *", self._ffi.from_buffer(out)),
                                    1 if clear else 0)
        return out.astype(bool)

    def drain_evictions(self, timeout: float = 30.0) -> bool:
        """Run the queued evictions (on this thread too) and wait until none is queued, running or waiting for a
        running prefetch; False on timeout."""
        return bool(self._lib.spac_engine_drain_evictions(self._live(), int(timeout * 1000)))

    def end_step(self) -> None:
        """After an evaluation step: release in-use experts, queue deferred and transient evictions.

        Also logs the kinds of failure seen for the first time (once each)."""
        self._lib.spac_engine_end_step(self._live())
        self.errors()

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until every queued move is done (tests, measurements); False on timeout."""
        return bool(self._lib.spac_engine_wait_idle(self._live(), int(timeout * 1000)))

    def lock_range(self, file_offset: int, length: int, lock: bool = True) -> int:
        """mlock (or munlock) the whole pages of a file range; returns 0 or -errno."""
        return int(self._lib.spac_engine_lock_range(self._live(), int(file_offset), int(length), 1 if lock else 0))

    # --- the sensor hook ---------------------------------------------------------------------------
    def attach(self, sensor: RoutingSensor) -> None:
        """Have ``sensor`` report each layer's selected experts to the engine (from the graph callback)."""
        if sensor.n_expert != self.n_expert:  # the hook reads n_expert mask entries
            raise SpacError(f"the routing sensor has {sensor.n_expert} experts per layer, the engine {self.n_expert}")
        s = sensor._struct
        s.event_mask = self._ffi.cast("uint8_t *", self._ffi.from_buffer(self._mask))
        s.hook_data = self._live()
        s.layer_hook = self._ffi.addressof(self._lib, "spac_engine_on_layer")
        self._lib.spac_engine_set_topk_source(self._handle, self._ffi.addressof(s, "topk_data"))
        if self.slots is not None:  # the pool's id maps, written before the graph reads them
            s.map_data = self._live()
            s.map_hook = self._ffi.addressof(self._lib, "spac_engine_on_map")
        self._hooked.append(s)
        self._sensor = sensor

    def install_mmid_hooks(self) -> bool:
        """Install this engine's MUL_MAT_ID hooks in the patched ggml-cpu (patch 0004; process-wide, replacing
        another engine's): the layer's resident experts compute first, and with overlay reads and async demand
        the hook hands the misses to the completer while the matmul waits for each just before its rows.
        False (nothing changed) on a library without the patch."""
        setter = mmid_hooks_setter()
        if setter is None:
            return False
        ffi = self._ffi
        addr = [int(ffi.cast("uintptr_t", ffi.addressof(self._lib, name)))
                for name in ("spac_engine_mmid_order", "spac_engine_mmid_wait")]
        setter(addr[0], addr[1], int(ffi.cast("uintptr_t", self._live())))
        if _MMID_OWNER and _MMID_OWNER[0] != self._handle:  # (alive: an owner clears itself before it is freed)
            self._lib.spac_engine_set_mmid_hooked(_MMID_OWNER[0], 0)  # its misses are awaited by its hook again
        _MMID_OWNER[:] = [self._handle]
        self._lib.spac_engine_set_mmid_hooked(self._handle, 1)
        return True

    def set_predictor(self, source: int, target: int, weight: np.ndarray, norm: np.ndarray, bias: np.ndarray | None,
                      sigmoid: bool, k: int, eps: float, max_rows: int = 16) -> None:
        """Layer-ahead prefetch: predict block ``target``'s experts from block ``source``'s output.

        The arrays (float32, C order) are kept alive by the engine object.
        """
        weight = np.ascontiguousarray(weight, dtype=np.float32)
        norm = np.ascontiguousarray(norm, dtype=np.float32)
        bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
        if weight.shape != (self.n_expert, norm.size) or (bias is not None and bias.size != self.n_expert):
            raise SpacError(f"router of block {target} has shape {weight.shape}, expected ({self.n_expert}, n_embd)")
        self._keep.extend(a for a in (weight, norm, bias) if a is not None)
        ffi = self._ffi
        rc = self._lib.spac_engine_set_predictor(
            self._live(), int(source), int(target), ffi.cast("float *", ffi.from_buffer(weight)),
            ffi.cast("float *", ffi.from_buffer(norm)),
            ffi.NULL if bias is None else ffi.cast("float *", ffi.from_buffer(bias)),
            1 if sigmoid else 0, int(k), int(norm.size), float(eps), int(max_rows))
        if rc != 0:
            raise SpacError(f"cannot set a layer-ahead predictor from block {source} to block {target}")
        self._has_predictors = True
        self.set_layer_ahead(True)

    def set_layer_ahead(self, on: bool) -> None:
        """Turn layer-ahead prefetch on or off between evaluations (on needs :meth:`set_predictor` first): off, the
        sensor no longer asks for the layers' outputs, so the graph loses the extra cuts as well."""
        if self._sensor is None or self._sensor._struct is None:
            return
        s = self._sensor._struct
        if on and getattr(self, "_has_predictors", False):
            s.hidden_data = self._live()
            s.hidden_hook = self._ffi.addressof(self._lib, "spac_engine_on_hidden")
        else:
            s.hidden_hook = self._ffi.NULL
            s.hidden_data = self._ffi.NULL

    def detach(self) -> None:
        if self._sensor is not None and self._sensor._struct is not None:
            s = self._sensor._struct
            s.layer_hook = self._ffi.NULL
            s.hook_data = self._ffi.NULL
            s.event_mask = self._ffi.NULL
            s.hidden_hook = self._ffi.NULL
            s.hidden_data = self._ffi.NULL
            s.map_hook = self._ffi.NULL
            s.map_data = self._ffi.NULL
            if self._finalizer.alive:
                self._lib.spac_engine_set_topk_source(self._handle, self._ffi.NULL)
            if s in self._hooked:
                self._hooked.remove(s)
        self._sensor = None

    # --- measurement -------------------------------------------------------------------------------
    def residency(self, per_expert: bool = True) -> tuple[int, np.ndarray | None]:
        """(resident expert bytes, ``[block_count, n_expert]`` resident fraction or None), by mincore."""
        frac = np.zeros((self.n_layer, self.n_expert), dtype=np.float32) if per_expert else None
        ptr = self._ffi.cast("float *", self._ffi.from_buffer(frac)) if frac is not None else self._ffi.NULL
        total = int(self._lib.spac_engine_residency(self._live(), ptr))
        if total < 0:
            raise SpacError("mincore failed on the model mapping")
        return total, frac

    def residency_layers(self, lo: int, hi: int, frac: np.ndarray, layer_bytes: np.ndarray) -> int:
        """Measure blocks ``lo <= l < hi`` only (a partial sweep costs what their pages cost): writes their rows of
        ``frac`` (float32 ``[block_count, n_expert]``, resident fraction) and ``layer_bytes`` (int64
        ``[block_count]``, resident expert bytes); returns their resident expert bytes."""
        if frac.shape != (self.n_layer, self.n_expert) or frac.dtype != np.float32 or not frac.flags.c_contiguous:
            raise SpacError(f"frac must be C-contiguous float32 {(self.n_layer, self.n_expert)}")
        if layer_bytes.shape != (self.n_layer,) or layer_bytes.dtype != np.int64 or not layer_bytes.flags.c_contiguous:
            raise SpacError(f"layer_bytes must be C-contiguous int64 ({self.n_layer},)")
        ffi = self._ffi
        total = int(self._lib.spac_engine_residency_layers(self._live(), int(lo), int(hi),
                                                           ffi.cast("float *", ffi.from_buffer(frac)),
                                                           ffi.cast("int64_t *", ffi.from_buffer(layer_bytes))))
        if total < 0:
            raise SpacError(f"mincore failed on the model mapping (or bad block range {lo}..{hi})")
        return total

    def residency_bytes(self, lo: int, hi: int, out: np.ndarray) -> int:
        """Exact resident bytes of every expert of blocks ``lo <= l < hi`` into their rows of ``out`` (int64
        ``[block_count, n_expert]``); returns their sum."""
        if out.shape != (self.n_layer, self.n_expert) or out.dtype != np.int64 or not out.flags.c_contiguous:
            raise SpacError(f"out must be C-contiguous int64 {(self.n_layer, self.n_expert)}")
        total = int(self._lib.spac_engine_residency_bytes(self._live(), int(lo), int(hi),
                                                          self._ffi.cast("int64_t *", self._ffi.from_buffer(out))))
        if total < 0:
            raise SpacError(f"mincore failed on the model mapping (or bad block range {lo}..{hi})")
        return total

    def residency_experts(self, layers: np.ndarray, experts: np.ndarray) -> np.ndarray:
        """Exact resident bytes of the listed experts (block ``layers[i]``, expert ``experts[i]``)."""
        layers = np.ascontiguousarray(layers, dtype=np.int32)
        experts = np.ascontiguousarray(experts, dtype=np.int32)
        out = np.zeros(len(layers), dtype=np.int64)
        if len(layers) == 0:
            return out
        ffi = self._ffi
        total = int(self._lib.spac_engine_residency_experts(
            self._live(), len(layers), ffi.cast("int32_t *", ffi.from_buffer(layers)),
            ffi.cast("int32_t *", ffi.from_buffer(experts)), ffi.cast("int64_t *", ffi.from_buffer(out))))
        if total < 0:
            raise SpacError("mincore failed on the model mapping (or an expert out of range)")
        return out

    def stats(self, *names: str) -> dict[str, int]:
        """The engine's counters (``spac_engine_stats``), all of them or only ``names`` (cheaper: per step)."""
        st = self._ffi.new("spac_engine_stats *")
        self._lib.spac_engine_get_stats(self._live(), st)
        return {name: int(getattr(st, name)) for name in names or _STAT_FIELDS}

    def errors(self) -> dict[str, dict[str, Any]]:
        """Failures by kind: ``{kind: {"count": n, "errno": first errno, "message": its strerror}}``.

        A kind seen for the first time is logged (one warning line); later failures are only counted.
        """
        st = self._ffi.new("spac_engine_stats *")
        self._lib.spac_engine_get_stats(self._live(), st)
        report = error_report(st.error_count, st.error_errno, self._error_names)
        for kind, e in report.items():
            if kind not in self._logged:
                self._logged.add(kind)
                log.warning("flash engine: %s failed: errno %d (%s); later failures are counted in "
                            "stats()['engine_errors']['%s']", _ERROR_WHAT.get(kind, kind), e["errno"],
                            e["message"], kind)
        return report

    def close(self) -> None:
        """Detach from the sensor, stop and join the threads, map the file again where overlays are (the model,
        whose mapping they are in, is still there: ``Llama.close`` closes the tier first), free the engine
        (idempotent). A finalizer without close() frees the engine only: the model's munmap takes the overlays."""
        self.detach()
        if self._finalizer.alive:
            _clear_mmid_hooks(self._handle)
            self._lib.spac_engine_stop(self._handle)
            self._lib.spac_engine_release_overlays(self._handle)
        self._finalizer()
