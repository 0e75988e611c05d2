"""The native routing sensor: a C ``cb_eval`` callback writing expert ids into numpy arrays.

The C side (``native/spac_sensor.c``) decodes every ``ffn_moe_topk-<layer>`` node; this class owns
the buffers it writes (numpy arrays handed to C by pointer, so reading them copies nothing) and
turns a user ``cb_eval`` into a C function pointer the sensor chains to.

Nodes the sensor had to skip, dropped ids and failed allocations are counted per kind in C; each kind
is logged once (at the :meth:`RoutingSensor.flush` after it first happened) and reported by
:meth:`RoutingSensor.errors` (``llm.stats()["sensor_errors"]``).
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from typing import Any

import llama_cpp.llama_cpp as llama_c
import numpy as np

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.native import module as native

log = logging.getLogger(__name__)

UserCallback = Callable[[int, bool, int], bool] | int | Any | None

_ERROR_WHAT = {  # per kind (SPAC_SENSOR_ERR_* in native/spac_sensor.h)
    "topk": "ffn_moe_topk nodes skipped (unexpected layer, type or shape)",
    "ids": "expert ids outside [0, n_expert) dropped",
    "probs": "ffn_moe_probs nodes the cache prior or routing replay could not rewrite (unexpected type or shape)",
    "hidden": "l_out nodes the layer-ahead hook could not read (not F32 rows in host memory)",
    "nomem": "sensor scratch allocations failed",
    "map": "expert pool id map rows the slot store could not write (not I32 rows in host memory)",
}
_INT32_MAX = 2**31 - 1


class RoutingSensor:
    """Owns one native sensor and its buffers.

    Args:
        n_layer: blocks in the model (layer ids are ``0..n_layer-1``).
        n_expert: routed experts per MoE layer.
        k_max: the largest experts-used-per-token of any layer.
        capacity: token slots kept in the ring of per-token expert ids.
        user_cb: a ``cb_eval`` to chain to: a Python callable ``(tensor_ptr, ask, user_data) -> bool``,
            a ``llama_cpp.ggml_backend_sched_eval_callback`` object, or a raw function address.
        user_data: the ``cb_eval_user_data`` passed to ``user_cb``.
    """

    def __init__(
        self,
        n_layer: int,
        n_expert: int,
        k_max: int,
        capacity: int = 4096,
        user_cb: UserCallback = None,
        user_data: int | None = None,
    ) -> None:
        self._mod = native.load()
        ffi, lib = self._mod.ffi, self._mod.lib
        self._release = lib.spac_sensor_release  # held: at interpreter exit the module's attributes may be gone
        dims = (n_layer, n_expert, k_max, capacity)
        if not (all(abs(int(d)) <= _INT32_MAX for d in dims) and lib.spac_sensor_check_geometry(*dims)):
            raise SpacError(
                f"invalid routing sensor geometry (layers={n_layer}, experts={n_expert}, k={k_max}, "
                f"capacity={capacity}; at most {lib.SPAC_MAX_LAYERS} layers and {lib.SPAC_MAX_EXPERTS} experts); "
                "check the model's expert metadata"
            )
        self.n_layer, self.n_expert, self.k_max, self.capacity = n_layer, n_expert, k_max, capacity

        self.ids = np.full((capacity, n_layer, k_max), -1, dtype=np.int32)
        self.step_counts = np.zeros((n_layer, n_expert), dtype=np.int32)
        self.total_counts = np.zeros((n_layer, n_expert), dtype=np.int64)
        self.step_layer_tokens = np.zeros(n_layer, dtype=np.int32)

        s = ffi.new("spac_sensor *")
        s.n_layer, s.n_expert, s.k_max, s.capacity = n_layer, n_expert, k_max, capacity
        s.ids = ffi.cast("int32_t *", ffi.from_buffer(self.ids))
        s.step_counts = ffi.cast("int32_t *", ffi.from_buffer(self.step_counts))
        s.total_counts = ffi.cast("int64_t *", ffi.from_buffer(self.total_counts))
        s.step_layer_tokens = ffi.cast("int32_t *", ffi.from_buffer(self.step_layer_tokens))
        s.last_layer = -1
        s.enabled = 1
        self._struct = s

        self._user_cb_keepalive = None
        if user_cb is not None:
            addr, self._user_cb_keepalive = callback_address(user_cb)
            s.user_cb = ffi.cast("spac_eval_cb", addr)
            s.user_data = ffi.cast("void *", user_data or 0)

        self._error_names = [ffi.string(lib.spac_sensor_error_name(i)).decode()
                             for i in range(lib.SPAC_SENSOR_ERR_KINDS)]
        self._logged: set[str] = set()

        cb_addr = int(ffi.cast("uintptr_t", ffi.addressof(self._mod.lib, "spac_sensor_cb")))
        self.cb_eval = llama_c.ggml_backend_sched_eval_callback(cb_addr)
        self.cb_eval_user_data = int(ffi.cast("uintptr_t", s))

    # --- state read by the Python side -------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self._struct.enabled)

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._struct.enabled = 1 if value else 0

    @property
    def n_tokens(self) -> int:
        """Tokens recorded so far, counting only closed ubatches (call :meth:`flush` first)."""
        return int(self._struct.n_tokens)

    @property
    def n_bad_ids(self) -> int:
        """Expert ids outside ``[0, n_expert)`` that were dropped."""
        return int(self._struct.n_bad_ids)

    @property
    def n_bad_events(self) -> int:
        """``ffn_moe_topk`` nodes skipped for an unexpected layer, type or shape."""
        return int(self._struct.n_bad_events)

    @property
    def n_events(self) -> int:
        return int(self._struct.n_events)

    @property
    def n_ubatches(self) -> int:
        return int(self._struct.n_ubatches)

    def flush(self) -> None:
        """Close the ubatch in progress (call after each decode); logs kinds of error seen for the first time."""
        self._mod.lib.spac_sensor_flush(self._struct)
        if any(self._struct.error_count):
            self.errors()

    def errors(self) -> dict[str, dict[str, Any]]:
        """Errors by kind: ``{kind: {"count": n, "errno": code of the first, "message": its strerror}}``.

        A kind seen for the first time is logged (one warning line); later ones are only counted.
        """
        s, out = self._struct, {}
        for i, name in enumerate(self._error_names):
            count = int(s.error_count[i])
            if count:
                code = int(s.error_errno[i])
                out[name] = {"count": count, "errno": code, "message": os.strerror(code) if code else ""}
                if name not in self._logged:
                    self._logged.add(name)
                    log.warning("routing sensor: %s: %d so far, errno %d (%s); later ones are counted in "
                                "stats()['sensor_errors']['%s']", _ERROR_WHAT.get(name, name), count, code,
                                out[name]["message"], name)
        return out

    def token_ids(self, start: int, stop: int) -> np.ndarray:
        """Copy of the expert ids of tokens ``[start, stop)``: ``[stop-start, n_layer, k_max]``, -1 = none.

        Tokens older than ``capacity`` have been overwritten; asking for them raises.
        """
        if not (0 <= start <= stop <= self.n_tokens):
            raise IndexError(f"token range [{start}, {stop}) outside the {self.n_tokens} recorded tokens")
        if stop - start > self.capacity or start < self.n_tokens - self.capacity:
            raise IndexError(f"tokens [{start}, {stop}) left the ring of {self.capacity} slots")
        slots = np.arange(start, stop) % self.capacity
        return self.ids[slots]

    def take_step(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (counts [n_layer, n_expert], tokens per layer) of the step and zero them."""
        counts = self.step_counts.copy()
        layer_tokens = self.step_layer_tokens.copy()
        self.step_counts[:] = 0
        self.step_layer_tokens[:] = 0
        return counts, layer_tokens

    def reset(self) -> None:
        """Forget everything recorded (the ring, all counts and error tallies)."""
        s = self._struct
        self.flush()
        self.ids[:] = -1
        self.step_counts[:] = 0
        self.total_counts[:] = 0
        self.step_layer_tokens[:] = 0
        s.n_tokens = s.n_ubatches = s.n_events = s.n_bad_ids = s.n_bad_events = 0
        for i in range(len(self._error_names)):
            s.error_count[i] = s.error_errno[i] = 0

    def close(self) -> None:
        """Free native scratch memory; the sensor records nothing afterwards."""
        if self._struct is not None:
            self._struct.enabled = 0
            self._release(self._struct)


def callback_address(cb: UserCallback) -> tuple[int, Any]:
    """(function address, object to keep alive) for a user cb_eval given in any accepted form."""
    if isinstance(cb, int):
        return cb, None
    if isinstance(cb, ctypes._CFuncPtr):  # type: ignore[attr-defined]
        return ctypes.cast(cb, ctypes.c_void_p).value or 0, cb
    if callable(cb):
        wrapped = llama_c.ggml_backend_sched_eval_callback(cb)
        return ctypes.cast(wrapped, ctypes.c_void_p).value or 0, wrapped
    raise SpacError(f"cb_eval must be a callable or a C function pointer, not {type(cb).__name__}")
