"""Fault injection: the GGUF changing under a flash-tier model, and a full disk under the writers.

Each model scenario runs in a subprocess (before the file guard, most of them died of SIGBUS): a flash
tier model generates, then its file is truncated, rewritten in place or replaced, between two
evaluations or in the middle of one (from a ``cb_eval`` callback, at a chosen graph node, so the rest
of that graph reads truncated pages). The model must fail with one SpacError line and the process
must live on; a replaced file (a new inode) is harmless and keeps working. The writers (``spac patch``,
``spac synth``, traces, profiles) run out of space for real: in a private mount namespace with a small
tmpfs (ENOSPC) where user namespaces are allowed, and under RLIMIT_FSIZE (EFBIG) everywhere.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.gguf.info import read_model_header
from spac_llamacpp.models.factory import write_tiny_moe
from spac_llamacpp.observe.profile import Profile
from spac_llamacpp.observe.trace import RoutingTrace, step_counts

ROOT = Path(__file__).resolve().parent.parent
SHAPE = {"n_layer": 3, "n_embd": 128, "n_expert": 8, "n_expert_used": 2, "n_ff_exp": 256}

SCENARIO = textwrap.dedent("""
    import json, os, shutil, sys
    from spac_llamacpp import Llama
    from spac_llamacpp.base.errors import SpacError
    from spac_llamacpp.gguf.info import read_model_header
    from spac_llamacpp.native import module

    path, other, how, at = sys.argv[1:5]
    guard = sys.argv[5] == "1"
    mod = module.load()
    info = read_model_header(path)
    armed = [False]

    def change():
        if how == "truncate":
            os.truncate(path, info.data_offset + 4096)
        elif how == "rewrite":      # cp other path: truncates, then writes other bytes into the same inode
            shutil.copyfile(other, path)
        elif how == "replace":      # write a new file and rename it over: the model keeps the old inode
            shutil.copyfile(other, path + ".new")
            os.replace(path + ".new", path)

    def cb(t, ask, data):
        if ask and armed[0]:
            name = mod.ffi.string(mod.lib.spac_tensor_name(mod.ffi.cast("struct ggml_tensor *", t))).decode()
            if name == at:
                armed[0] = False
                change()
        return False

    llm = Llama(path, n_ctx=128, verbose=False, seed=0, tier="flash", budget="2MiB", cb_eval=cb,
                flash_options={"background": False, **({} if guard else {"guard_file": False})})
    def gen():
        return llm("The quick brown fox", max_tokens=6, temperature=0)["choices"][0]["text"]
    before = gen()
    if at == "between":
        change()
    else:
        armed[0] = True
    out = {"before": before}
    for attempt in ("first", "again"):
        try:
            out[attempt] = gen()
        except SpacError as exc:
            out[attempt + "_error"] = str(exc)
    out["model_file"] = llm.stats()["model_file"]
    llm.close()
    print("RESULT " + json.dumps(out), flush=True)
""")


@pytest.fixture()
def models(tmp_path: Path) -> tuple[Path, Path]:
    """A model to break, and another one of the same size (other weights) to write over it."""
    path = write_tiny_moe(tmp_path / "m.gguf", "qwen3moe", **SHAPE)
    other = write_tiny_moe(tmp_path / "other.gguf", "qwen3moe", seed=1, **SHAPE)
    assert path.stat().st_size == other.stat().st_size
    return path, other


def _scenario(models: tuple[Path, Path], how: str, at: str, guard: bool = True) -> tuple[int, dict | None, str]:
    path, other = models
    proc = subprocess.run([sys.executable, "-c", SCENARIO, str(path), str(other), how, at, "1" if guard else "0"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return proc.returncode, json.loads(lines[-1][7:]) if lines else None, proc.stderr[-3000:]


def _assert_refused(out: dict, *words: str) -> None:
    for attempt in ("first_error", "again_error"):  # the fault is sticky: every later evaluation fails too
        assert attempt in out, out
        msg = out[attempt]
        assert "\n" not in msg and "load the model again" in msg, msg
        for w in words:
            assert w in msg, msg


# the first graph node (token embeddings: every read of the evaluation comes after), a node just after
# layer 0's expert selection (the engine has checked the file; the expert matmuls then fault), and one
# in layer 1's attention (llama.cpp's own threads fault on attention weights)
@pytest.mark.parametrize("at", ["between", "embd", "ffn_moe_weights-0", "Qcur-1"])
def test_truncated_while_mapped(models, at):
    rc, out, err = _scenario(models, "truncate", at)
    assert rc == 0 and out is not None, f"rc {rc} ({signal.Signals(-rc).name if rc < 0 else rc}): {err}"
    _assert_refused(out, "was truncated from", "bytes while the model was running from it")
    st = out["model_file"]
    assert st["fault"] in ("shrunk", "sigbus") and st["size_now"] < st["size_at_start"], st
    assert st["fenced_bytes"] > 0  # who fenced first (a worker's failed read, the layer hook's fstat, the SIGBUS
    # handler under llama.cpp's threads) is a race; test_sigbus_handler_... checks the handler alone


def test_rewritten_in_place(models):
    """``cp other.gguf m.gguf`` over a running model: truncated to 0, then other weights in the same inode."""
    rc, out, err = _scenario(models, "rewrite", "between")
    assert rc == 0 and out is not None, f"rc {rc}: {err}"
    _assert_refused(out, "in place")  # seen as truncated (a read during the copy) or as modified (after it)
    assert out["model_file"]["fault"] in ("shrunk", "modified", "sigbus")


def test_replaced_by_rename_keeps_working(models):
    """Writing a new file and renaming it over the old one is what the error message advises: harmless."""
    rc, out, err = _scenario(models, "replace", "between")
    assert rc == 0 and out is not None, f"rc {rc}: {err}"
    assert "first_error" not in out and out["first"] == out["before"] == out["again"]
    assert out["model_file"]["fault"] is None


def test_unguarded_truncation_kills_the_process(models):
    """What the guard prevents (``guard_file=False``, as before it): SIGBUS."""
    rc, out, _ = _scenario(models, "truncate", "between", guard=False)
    assert rc == -signal.SIGBUS and out is None


OTHER_MAPPING = textwrap.dedent("""
    import mmap, os, sys
    from spac_llamacpp.gguf.info import read_model_header
    from spac_llamacpp.native.flash_engine import FlashEngine
    from spac_llamacpp.native.mapping import FileMapping
    path, victim = sys.argv[1:3]
    info = read_model_header(path)
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    import numpy as np
    view = np.frombuffer(m, dtype=np.uint8)
    mapping = FileMapping(view.ctypes.data, view.ctypes.data + size, 0, "r--s", os.fstat(fd).st_ino, path)
    engine = FlashEngine(info, mapping, threads=2, queue=256)
    assert engine.guarded
    # the guarded mapping: a read past the new end gets a zero page
    os.truncate(path, info.data_offset)
    assert int(view[size - 1]) == 0
    st = engine.check_file()
    print("GUARDED", st["fault"], st["sigbus_caught"], flush=True)
    # another mapping, not guarded: its SIGBUS must still kill the process (the previous disposition)
    with open(victim, "wb") as f:
        f.write(b"x" * 65536)
    vfd = os.open(victim, os.O_RDONLY)
    vm = mmap.mmap(vfd, 65536, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    vview = np.frombuffer(vm, dtype=np.uint8)
    os.truncate(victim, 0)
    print("READ", int(vview[40000]), flush=True)
""")


@pytest.mark.parametrize("faulthandler", [False, True])
def test_sigbus_handler_answers_only_the_guarded_mapping(models, tmp_path, faulthandler):
    """A read past the end of a truncated guarded mapping gets a zero page; a SIGBUS anywhere else goes to
    the handler there was before (Python's faulthandler when enabled at start-up, else the default)."""
    path, _ = models
    flags = ["-X", "faulthandler"] if faulthandler else []
    proc = subprocess.run([sys.executable, *flags, "-c", OTHER_MAPPING, str(path), str(tmp_path / "victim")],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert "GUARDED shrunk" in proc.stdout or "GUARDED sigbus" in proc.stdout, proc.stdout + proc.stderr
    assert "READ" not in proc.stdout and proc.returncode == -signal.SIGBUS, proc.stdout + proc.stderr
    assert ("Fatal Python error: Bus error" in proc.stderr) == faulthandler, proc.stderr


def test_guard_costs_nothing_when_the_file_is_intact(tiny_model):
    from spac_llamacpp import Llama

    llm = Llama(str(tiny_model("qwen3moe")), n_ctx=128, verbose=False, seed=0, tier="flash", budget="1MiB",
                flash_options={"background": False})
    try:
        llm("Once upon", max_tokens=4, temperature=0)
        st = llm.stats()["model_file"]
        assert st["guarded"] and st["fault"] is None and st["fenced_bytes"] == 0 and st["sigbus_caught"] == 0
        assert st["size_now"] == st["size_at_start"] == Path(tiny_model("qwen3moe")).stat().st_size
    finally:
        llm.close()


# --- full disk ---------------------------------------------------------------------------------------

WRITE_TRACE = textwrap.dedent("""
    import sys
    import numpy as np
    from spac_llamacpp.base.errors import SpacError
    from spac_llamacpp.observe.profile import Profile
    from spac_llamacpp.observe.trace import RoutingTrace, step_counts
    what, out = sys.argv[1:3]
    rng = np.random.default_rng(0)
    try:
        if what == "trace":
            ids = rng.integers(0, 64, (40000, 4, 4)).astype(np.int16)
            step = np.arange(40000, dtype=np.int32)
            RoutingTrace(ids, step, np.ones(40000, np.int32), step_counts(ids, step, 40000, 64),
                         np.arange(4, dtype=np.int32), 64).save(out)
        else:
            Profile(tuple(range(400)), 256, rng.integers(0, 1 << 40, (400, 256))).save(out)
    except SpacError as exc:
        print("error: " + str(exc))
        sys.exit(2)
""")


def _fsize_limit(limit: int):  # noqa: ANN202 - a preexec_fn
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes past it fail with EFBIG (SIGXFSZ is
        # ignored by Python)

    return set_limit


def _user_namespaces() -> bool:
    if shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                                f"mount -t tmpfs -o size=64k tmpfs '{d}'"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def patch_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("full_disk")
    model = write_tiny_moe(root / "m.gguf", "qwen3moe", **SHAPE)
    info = read_model_header(model)
    counts = np.arange(len(info.moe_layers) * info.n_expert).reshape(len(info.moe_layers), -1)[:, ::-1].copy()
    profile = Profile(tuple(info.moe_layers), info.n_expert, counts).save(root / "p.json")
    return model, profile


def _commands(kind: str, out: Path, patch_inputs: tuple[Path, Path]) -> list[str]:
    bin_dir = Path(sys.executable).parent
    model, profile = patch_inputs
    if kind == "patch":
        return [str(bin_dir / "spac"), "patch", str(model), "--profile", str(profile), "-o", str(out)]
    if kind == "synth":
        return [str(bin_dir / "spac"), "synth", "olmoe-1b-7b", "--layers", "1", "-o", str(out)]
    return [sys.executable, "-c", WRITE_TRACE, kind, str(out)]


def _check_nothing_written(proc: subprocess.CompletedProcess, out: Path, cause: str) -> None:
    lines = [line for line in proc.stderr.splitlines() + proc.stdout.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
    assert f"could not write {out}: {cause}" in lines[0] and ".tmp" not in lines[0], lines[0]
    leftovers = sorted(p.name for p in out.parent.iterdir() if p.name.startswith((out.name, "." + out.name)))
    assert leftovers == [], leftovers


@pytest.mark.parametrize("kind", ["patch", "synth", "trace", "profile"])
def test_file_size_limit_leaves_no_partial_output(tmp_path, patch_inputs, kind):
    """RLIMIT_FSIZE: the write fails with EFBIG part way (1 MiB in) and nothing is left."""
    out = tmp_path / f"out.{'json' if kind == 'profile' else 'npz' if kind == 'trace' else 'gguf'}"
    proc = subprocess.run(_commands(kind, out, patch_inputs), capture_output=True, text=True, timeout=300,
                          preexec_fn=_fsize_limit(1 << 20), env=dict(os.environ, PYTHONPATH=str(ROOT)))
    _check_nothing_written(proc, out, "the file size limit was reached")


@pytest.mark.skipif(not _user_namespaces(), reason="no user namespaces here (unshare --user --mount tmpfs)")
@pytest.mark.parametrize("kind", ["patch", "trace"])
def test_full_disk_leaves_no_partial_output(tmp_path, patch_inputs, kind):
    """A real full disk: a 1 MiB tmpfs in a private mount namespace (ENOSPC part way)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    out = mnt / ("out.gguf" if kind == "patch" else "out.npz")
    cmd = " ".join(f"'{c}'" for c in _commands(kind, out, patch_inputs))
    script = f"mount -t tmpfs -o size=1m tmpfs '{mnt}' && {cmd}; rc=$?; ls -A '{mnt}' >&2; exit $rc"
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines = [line for line in proc.stderr.splitlines() + proc.stdout.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
    assert f"could not write {out}: the disk is full" in lines[0], lines[0]
    listed = [line for line in proc.stderr.splitlines() if line and not line.startswith(("error: ", "write "))
              and "%|" not in line]
    assert listed == [], proc.stderr  # `ls -A` of the tmpfs printed nothing: no partial file


def test_existing_output_survives_a_failed_write(tmp_path):
    out = tmp_path / "t.npz"
    out.write_bytes(b"the previous trace")
    ids = np.zeros((4, 1, 1), np.int16)
    step = np.arange(4, dtype=np.int32)
    trace = RoutingTrace(ids, step, np.ones(4, np.int32), step_counts(ids, step, 4, 2), np.zeros(1, np.int32), 2)

    class Boom(RuntimeError):
        pass

    orig = np.savez_compressed

    def failing(*args, **kwargs):
        orig(*args, **kwargs)
        raise Boom()

    np.savez_compressed = failing
    try:
        with pytest.raises(Boom):
            trace.save(out)
    finally:
        np.savez_compressed = orig
    assert out.read_bytes() == b"the previous trace"
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]
    with pytest.raises(SpacError, match="could not write .*missing"):
        trace.save(tmp_path / "missing" / "t.npz")
