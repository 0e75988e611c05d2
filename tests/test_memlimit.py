"""The benchmark memory limit helper locks what it is asked to and lets go when its parent does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.native.memlimit import MemoryLimit, mem_available


def _vmlck(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmLck:"):
                return int(line.split()[1]) * 1024
    return 0


def test_helper_locks_and_exits_when_the_pipe_closes():
    n = 32 << 20
    proc = subprocess.Popen([sys.executable, "-m", "spac_llamacpp.native.memlimit", str(n)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stdout.readline().decode()
    if not line.startswith("locked"):
        proc.kill()
        pytest.skip(f"mlock not permitted here: {proc.stderr.read().decode().strip()}")
    assert _vmlck(proc.pid) >= n
    proc.stdin.close()  # what happens when the parent exits or dies
    assert proc.wait(timeout=30) == 0


def test_limit_below_the_safety_floor_is_refused():
    with pytest.raises(SpacError, match="safety floor"):
        MemoryLimit(256 << 20)


def test_limit_above_available_locks_nothing():
    with MemoryLimit(mem_available() + (1 << 30)) as ml:
        assert ml.locked == 0


def test_one_limit_at_a_time():
    """A second limit while one is in force (another benchmark on the machine) is refused with one line naming
    the holder; after the first ends, a new one starts."""
    refused = pytest.raises(SpacError, match=f"another RAM limit is in force on this machine \\(pid {os.getpid()}")
    with MemoryLimit(mem_available() + (1 << 30)), refused, MemoryLimit(mem_available() + (1 << 30)):
        pass
    with MemoryLimit(mem_available() + (1 << 30)) as ml:
        assert ml.locked == 0
