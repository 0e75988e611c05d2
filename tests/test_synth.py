"""spac synth: real models' layouts with random weights load in stock llama.cpp and generate tokens."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import Q4_K, dequantize

from spac_llamacpp.models.synth.blocks import block_writer, pack_q4_k_scales


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.MXFP4], ids=lambda t: t.name)
def test_blocks_are_valid_and_scaled(qtype):
    w = block_writer(qtype)
    buf = np.empty(w.nbytes(256 * 1024), dtype=np.uint8)
    w.fill(buf, 0.02, np.random.default_rng(0))
    x = buf.view(np.float16).astype(np.float32) if qtype == Q.F16 else dequantize(buf, qtype).ravel()
    assert np.isfinite(x).all()
    assert x.std() == pytest.approx(0.02, rel=0.05)
    assert abs(x.mean()) < 0.1 * 0.02
    assert len(np.unique(x[:4096])) > 8


def test_q4_k_scale_packing_round_trips():
    rng = np.random.default_rng(0)
    sc, m = rng.integers(0, 64, (100, 8)), rng.integers(0, 64, (100, 8))
    sc2, m2 = Q4_K.get_scale_min(pack_q4_k_scales(sc, m))
    assert (sc2 == sc).all() and (m2 == m).all()
