"""`spac trace import`: public route CSVs and JSONL routing logs into the project's trace format.

The files are small synthetic ones written here in the public formats' exact field names.
"""

from __future__ import annotations

import numpy as np
import pytest

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.observe.trace import RoutingTrace, TraceLayout


def test_recorded_layout_accessor(tmp_path):
    t = RoutingTrace(ids=np.zeros((1, 2, 1), np.int16), token_step=np.zeros(1, np.int32),
                     step_n_tokens=np.ones(1, np.int32), counts=np.zeros((1, 2, 2), np.int32),
                     moe_layers=np.array([0, 1], np.int32), n_expert=2)
    t.counts[0, :, 0] = 1
    t.check()
    assert t.layout is None
    t.meta["layout"] = TraceLayout(2, 1, (10, 20)).to_json()
    assert RoutingTrace.load(t.save(tmp_path / "t.npz")).layout == TraceLayout(2, 1, (10, 20), None)
    t.meta["layout"] = TraceLayout(2, 1, (10,)).to_json()
    with pytest.raises(SpacError, match="sizes 1 layers"):
        t.check()
    t.meta["layout"] = {"n_expert": "two"}
    with pytest.raises(SpacError, match="layout is damaged"):
        _ = t.layout
    t.meta.pop("layout")
    t.counts[0, 0, 0] = 2
    with pytest.raises(SpacError, match="histogram"):
        t.check()
