"""Building a tier for ``Llama``: how the model must be loaded for it, and starting it once it is.

``Llama.__init__`` asks :func:`tier_builder` for the tier's builder, lets it adjust the load arguments
(:meth:`TierBuilder.load_arguments`), has it look at the process before llama.cpp loads the file
(:meth:`TierBuilder.before_load`), loads the model, then :meth:`TierBuilder.start` builds the tier.
"""

from __future__ import annotations

from typing import Any

from spac_llamacpp.gguf.info import MoEModelInfo
from spac_llamacpp.native.sensor import RoutingSensor
from spac_llamacpp.tiers.base import TierController


class TierBuilder:
    """One tier's needs from ``Llama``; ``options`` are the tier's keyword arguments (``flash_options`` /
    ``vram_options``). This base class is the absence of a tier: it changes nothing and starts nothing."""

    name = ""

    def __init__(self, info: MoEModelInfo, budget: int, options: dict[str, Any] | None) -> None:
        self.info = info
        self.budget = budget
        self.options = dict(options or {})

    def load_arguments(self, overrides: Any, use_extra_bufts: bool | None,
                       kwargs: dict[str, Any]) -> tuple[Any, bool | None]:
        """The tensor overrides and repacking setting to load with (``kwargs`` may be completed)."""
        return overrides, use_extra_bufts

    def before_load(self, model_path: str) -> None:
        """Just before llama.cpp loads the file."""

    def start(self, llm: Any, sensor: RoutingSensor | None) -> TierController | None:
        """The tier, once llama.cpp has loaded the model (None: no tier)."""
        return None


class FlashBuilder(TierBuilder):
    name = "flash"

    def load_arguments(self, overrides: Any, use_extra_bufts: bool | None,
                       kwargs: dict[str, Any]) -> tuple[Any, bool | None]:
        return overrides, False  # experts must stay file-backed in the mapping

    def before_load(self, model_path: str) -> None:
        from spac_llamacpp.native.mapping import file_mappings

        # after any self-draft has mapped the same file: the one new mapping is then the target's
        self._model_path = model_path
        self._mappings_before = file_mappings(model_path)

    def start(self, llm: Any, sensor: RoutingSensor | None) -> TierController:
        from spac_llamacpp.native.mapping import new_whole_file_mapping
        from spac_llamacpp.tiers.flash import FlashTier

        assert sensor is not None
        mapping = new_whole_file_mapping(self._model_path, self._mappings_before, self.info.data_offset)
        return FlashTier(self.info, mapping, sensor, self.budget, llm=llm, **self.options)


class VramBuilder(TierBuilder):
    name = "vram"

    def load_arguments(self, overrides: Any, use_extra_bufts: bool | None,
                       kwargs: dict[str, Any]) -> tuple[Any, bool | None]:
        from spac_llamacpp.tiers.vram import vram_overrides

        # non-expert weights on the GPU; routed experts on the CPU (repacked or not), copied into the pool
        kwargs.setdefault("n_gpu_layers", -1)
        return vram_overrides(overrides), use_extra_bufts

    def start(self, llm: Any, sensor: RoutingSensor | None) -> TierController:
        from spac_llamacpp.tiers.vram import VramTier

        return VramTier(llm, self.info, self.budget, n_ctx=llm.n_ctx(), **self.options)


BUILDERS: dict[str, type[TierBuilder]] = {"flash": FlashBuilder, "vram": VramBuilder}


def tier_builder(kind: str | None, info: MoEModelInfo, budget: int | None,
                 options: dict[str, Any] | None) -> TierBuilder:
    """The builder of tier ``kind`` (None: no tier, a builder that does nothing); the arguments were checked
    by ``Llama``."""
    if kind is None:
        return TierBuilder(info, 0, None)
    assert budget is not None
    return BUILDERS[kind](info, budget, options)
