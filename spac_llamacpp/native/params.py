"""Model/context parameters that the stock ``llama_cpp.Llama`` cannot pass.

``llama_cpp.Llama.__init__`` builds its C parameter structs from ``llama_model_default_params()`` and
``llama_context_default_params()``, looked up on the ``llama_cpp.llama_cpp`` module at call time. We
wrap those two functions for the duration of one constructor call (under a lock) to set
``tensor_buft_overrides``, ``use_extra_bufts``, ``no_host`` and ``cb_eval``.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence

import llama_cpp
import llama_cpp.llama_cpp as llama_c

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.native.libs import buffer_type

BuftSpec = str | int
OverridesArg = str | Mapping[str, BuftSpec] | Sequence[tuple[str, BuftSpec]] | None

_PARAMS_LOCK = threading.RLock()


class _BuftOverride(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


class TensorBuftOverrides:
    """A NULL-terminated ``llama_model_tensor_buft_override`` array that stays alive with this object.

    Accepts ``"regex=DEVICE,regex2=DEVICE"`` (llama.cpp's ``-ot`` syntax), a mapping or a sequence of
    ``(regex, device)`` pairs, where a device is a ggml device name (``CPU``, ``CUDA0``) or a raw
    buffer-type pointer. Patterns are regex-searched in tensor names; the first match wins.
    """

    def __init__(self, spec: OverridesArg) -> None:
        self.pairs: list[tuple[str, BuftSpec]] = parse_overrides(spec)
        limit = llama_cpp.llama_max_tensor_buft_overrides()
        if len(self.pairs) >= limit:
            raise SpacError(f"too many tensor_buft_overrides ({len(self.pairs)}); llama.cpp accepts {limit - 1}")
        self._patterns = [p.encode() for p, _ in self.pairs]
        self._array = (_BuftOverride * (len(self.pairs) + 1))()
        for i, ((_, dev), pat) in enumerate(zip(self.pairs, self._patterns, strict=True)):
            self._array[i].pattern = pat
            self._array[i].buft = dev if isinstance(dev, int) else buffer_type(dev)
        # the last element stays {NULL, NULL}: the terminator

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def address(self) -> int:
        """Address of the first element, for ``llama_model_params.tensor_buft_overrides``."""
        return ctypes.addressof(self._array)


def parse_overrides(spec: OverridesArg) -> list[tuple[str, BuftSpec]]:
    if spec is None:
        return []
    if isinstance(spec, str):
        items: list[tuple[str, BuftSpec]] = []
        for part in filter(None, (s.strip() for s in spec.split(","))):
            pattern, sep, dev = part.rpartition("=")
            if not sep or not pattern or not dev:
                raise SpacError(f"bad tensor override {part!r}: write it as REGEX=DEVICE, e.g. '\\.ffn_.*_exps=CPU'")
            items.append((pattern, dev))
    elif isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        items = [tuple(x) for x in spec]  # type: ignore[misc]
    for pattern, _ in items:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise SpacError(f"bad tensor override pattern {pattern!r}: {exc}") from exc
    return items


@contextlib.contextmanager
def patched_default_params(
    model: Callable[[llama_c.llama_model_params], None] | None = None,
    context: Callable[[llama_c.llama_context_params], None] | None = None,
) -> Iterator[None]:
    """Within the block, default model/context params are passed through the given editors."""
    with _PARAMS_LOCK:
        orig_model = llama_c.llama_model_default_params
        orig_context = llama_c.llama_context_default_params

        def model_params() -> llama_c.llama_model_params:
            p = orig_model()
            if model is not None:
                model(p)
            return p

        def context_params() -> llama_c.llama_context_params:
            p = orig_context()
            if context is not None:
                context(p)
            return p

        llama_c.llama_model_default_params = model_params
        llama_c.llama_context_default_params = context_params
        try:
            yield
        finally:
            llama_c.llama_model_default_params = orig_model
            llama_c.llama_context_default_params = orig_context
