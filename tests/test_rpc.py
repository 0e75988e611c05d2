"""Device paths without a GPU: llama.cpp's RPC backend as a real non-host device.

A module fixture starts the ``rpc-server`` that scripts/build_llama.sh builds next to the installed
libraries (the patched build: its CPU kernels skip the pool's ids) on 127.0.0.1, on a free port. Each
check runs in a fresh interpreter (``tests/_rpc_checks.py``): an RPC registration cannot be undone and
would move every later load of this process onto the server.

Checked: ``spac_llamacpp.Llama`` with every layer on the RPC device (the sensor reads device buffers)
equals stock llama-cpp-python with the same placement, logits bit for bit and greedy tokens; the
expert pool allocated in the RPC device's memory (id maps, copies through the pool's own backend,
fences) gives stock's logits under any residency; ``Llama(tier="vram")`` without ``on_host`` takes the
RPC device for its GPU. Skipped without ``rpc-server`` or the RPC backend, unless
``SPAC_REQUIRE_RPC=1`` (CI: .ci/run), where that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spac_llamacpp import patched_llama_available
from spac_llamacpp.models.factory import write_tiny_moe
from spac_llamacpp.native.rpc import rpc_server_path, rpc_supported

REQUIRED = bool(os.environ.get("SPAC_REQUIRE_RPC"))
CHECKS = Path(__file__).with_name("_rpc_checks.py")
SHAPE = {"n_layer": 3, "n_embd": 64, "n_expert": 8, "n_expert_used": 2, "n_ff_exp": 64}
# gpt-oss: expert biases; deepseek2: a dense first block and shared experts
ARCHS = ("qwen3moe", "gpt-oss", "deepseek2")


def _why_not() -> str | None:
    if not patched_llama_available(3):
        return "the installed llama.cpp lacks spac's patches (run scripts/build_llama.sh)"
    if not rpc_supported():
        return "the installed llama.cpp has no RPC backend (rebuild with scripts/build_llama.sh: -DGGML_RPC=ON)"
    if rpc_server_path() is None:
        return "no rpc-server next to the installed llama.cpp (rebuild with scripts/build_llama.sh)"
    return None


_REASON = _why_not()
# under SPAC_REQUIRE_RPC=1 nothing skips: the server fixture fails with the reason instead
pytestmark = pytest.mark.skipif(_REASON is not None and not REQUIRED, reason=_REASON or "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """``rpc-server -H 127.0.0.1 -p PORT -d CPU`` (2 threads) for this module; its log on failure."""
    if _REASON is not None:
        pytest.fail(f"SPAC_REQUIRE_RPC=1, but {_REASON}")
    log = tmp_path_factory.mktemp("rpc") / "rpc-server.log"
    port = _free_port()
    with open(log, "wb") as f:
        # -d CPU: the server's CPU device even in a GPU build (the checks compare with CPU kernels)
        proc = subprocess.Popen([str(rpc_server_path()), "-H", "127.0.0.1", "-p", str(port), "-t", "2", "-d", "CPU"],
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"rpc-server exited ({proc.returncode}): {log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"rpc-server did not listen on {port}: {log.read_text()[-2000:]}")
                time.sleep(0.1)
        yield {"endpoint": f"127.0.0.1:{port}", "log": log, "proc": proc}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("rpc_models")
    return {a: str(write_tiny_moe(root / f"{a}.gguf", a, **SHAPE)) for a in ARCHS}


def _check(name: str, server: dict, models: dict[str, str], timeout: float = 300) -> tuple[dict, str]:
    cfg = {"endpoint": server["endpoint"], "models": models, "n_expert": SHAPE["n_expert"]}
    proc = subprocess.run([sys.executable, str(CHECKS), name, json.dumps(cfg)], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"check {name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n"
                    f"rpc-server log:\n{server['log'].read_text()[-1500:]}")
    assert server["proc"].poll() is None, "rpc-server died"
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_rpc_device_registers(server, models):
    out, _ = _check("devices", server, {})
    assert out["devices"].count("RPC0") == 1, out


def test_layers_on_the_rpc_device_identical_to_stock(server, models):
    out, err = _check("layers", server, models)
    assert set(out) == set(ARCHS)
    assert re.search(r"RPC0\[127\.0\.0\.1:\d+\] model buffer size", err)  # stock's load log: layers on the server
    assert all(r["routed"] > 0 for r in out.values())


def test_expert_pool_on_the_rpc_device(server, models):
    out, _ = _check("pool", server, {a: models[a] for a in ("qwen3moe", "gpt-oss")})
    for arch, report in out.items():
        assert report["full"]["copies"] == SHAPE["n_layer"] * SHAPE["n_expert"], (arch, report)
        assert report["changing"]["copies"] > 0, (arch, report)


def test_vram_tier_on_the_rpc_device(server, models):
    out, err = _check("tier", server, {a: models[a] for a in ("qwen3moe", "deepseek2")})
    for arch, st in out.items():
        assert st["copies_done"] > 0 and st["pool_bytes"] > 0, (arch, st)


def test_bad_endpoints_are_one_line_errors():
    from spac_llamacpp.base.errors import SpacError
    from spac_llamacpp.native.rpc import add_rpc_servers

    for bad, needle in (("", "no RPC servers"), ("localhost", "HOST:PORT"), ("host:port", "HOST:PORT"),
                        (f"127.0.0.1:{_free_port()}", "not reachable")):
        with pytest.raises(SpacError, match=needle) as exc:
            add_rpc_servers(bad)
        assert "\n" not in str(exc.value)
