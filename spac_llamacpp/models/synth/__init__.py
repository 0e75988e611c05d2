"""Synthetic GGUFs of real MoE models (``spac synth``): the exact architecture and tensor shapes of a
published model, random but well-scaled weights, written as fast as the disk takes them.

- ``presets.py``: the models (Qwen3-30B-A3B, gpt-oss-20b, Mixtral-8x7B, DeepSeek-V2-Lite, OLMoE-1B-7B)
  from their Hugging Face ``config.json``.
- ``blocks.py``: random valid F16 / Q8_0 / Q5_0 / Q4_K / MXFP4 blocks, no quantization.
- ``writer.py``: the tensor plan and the streaming writer.
"""

from spac_llamacpp.models.synth.presets import PRESETS, Preset, get_preset
from spac_llamacpp.models.synth.writer import TYPES, SynthResult, SynthTensor, plan_tensors, write_synth

__all__ = ["PRESETS", "TYPES", "Preset", "SynthResult", "SynthTensor", "get_preset", "plan_tensors", "write_synth"]
