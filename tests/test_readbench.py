"""The read-method benchmark's C (native/spac_readbench.c): every method reads the experts it is given."""

from __future__ import annotations

import numpy as np
import pytest

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.native.memlimit import drop_file_cache
from spac_llamacpp.native.readbench import METHODS, read_experts


def test_every_method_reads_every_expert(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8).tobytes())
    # 6 experts of 3 unaligned slices each, as in a GGUF
    part = (300 << 10) + 32
    ranges = np.array([[[t * (2 << 20) + 4096 * 3 + 32 + x * part, part] for t in range(3)] for x in range(6)],
                      np.uint64)
    for method in METHODS:
        drop_file_cache(path)
        try:
            t = read_experts(method, path, ranges, 4, 128 << 10)
        except SpacError as exc:
            assert method == "uring" and "not implemented" in str(exc).lower(), exc  # io_uring disabled here
            continue
        assert t.done_s.shape == (6,) and (t.done_s > 0).all() and t.wall_s >= t.done_s.max() > 0
        assert t.cpu_s >= 0 and (t.evict_cpu_s >= 0 if method in ("mmap", "fault", "overlay") else t.evict_cpu_s == 0)
    past_end = ranges.copy()
    past_end[0, 0, 0] = 8 << 20
    with pytest.raises(SpacError, match="Invalid argument"):
        read_experts("pread", path, past_end, 2)
    with pytest.raises(SpacError, match="unknown read method"):
        read_experts("splice", path, ranges, 2)
