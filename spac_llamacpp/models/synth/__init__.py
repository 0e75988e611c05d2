"""Synthetic GGUFs of real MoE models (``spac synth``): the exact architecture and tensor shapes of a
published model, random but well-scaled weights, written as fast as the disk takes them.

- ``blocks.py``: random valid F16 / Q8_0 / Q5_0 / Q4_K / MXFP4 blocks, no quantization.
"""
