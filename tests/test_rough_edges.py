"""Issue 18's rough edges: what a new user hits first gives one clear line (or just works), never a crash.

Anything that crashed the process before runs in a subprocess here, so that a regression fails one test
instead of killing the session. The command lines run this checkout's code (``PYTHONPATH`` is set to it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.gguf.info import inspect_model, read_model_header
from spac_llamacpp.models.default import default_model_path
from spac_llamacpp.models.factory import write_tiny_moe
from spac_llamacpp.observe.profile import Profile

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(default_model_path())  # 256-token training context
SHAPE = {"n_layer": 3, "n_embd": 128, "n_expert": 8, "n_expert_used": 2, "n_ff_exp": 256}


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def py(code: str, *args: str, timeout: float = 300, env: dict[str, str] | None = None,
       ) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter on this checkout's package."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(env))


def cli(entry: str, *args: str, prelude: str = "", **kw) -> subprocess.CompletedProcess[str]:
    """``spac-run ...`` (entry ``spac_run``) or ``spac ...`` (entry ``spac``) of this checkout."""
    return py(f"{prelude}\nfrom spac_llamacpp.tools.cli import {entry}\n{entry}()\n", *args, **kw)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def flash_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A factory MoE whose experts span several pages (page-granular residency is meaningful)."""
    return str(write_tiny_moe(tmp_path_factory.mktemp("rough") / "qwen3moe.gguf", "qwen3moe", **SHAPE))


# --- context overflow ---------------------------------------------------------------------------------


def test_spac_run_stops_at_the_context_window():
    proc = cli("spac_run", "-n", "300", "--stats", "json")
    assert proc.returncode == 0, proc.stderr
    assert "memory slot" not in proc.stderr and "llama_decode" not in proc.stderr
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report["stop_reason"] in ("context", "eos")
    assert report["prompt_tokens"] + report["generated_tokens"] <= 256
    if report["stop_reason"] == "context":
        assert report["prompt_tokens"] + report["generated_tokens"] == 256
        assert any("context window" in n for n in report["notes"])


def test_spac_run_text_mode_says_why_it_stopped():
    proc = cli("spac_run", "-n", "300")
    assert proc.returncode == 0, proc.stderr
    assert "context window" in proc.stderr and "--ctx" in proc.stderr


def test_spac_run_prompt_longer_than_the_context_is_one_line():
    prompt = " ".join(["the king and queen of england"] * 1000)  # ~6000 words
    line = assert_one_line_error(cli("spac_run", DEFAULT, "-p", prompt, "-n", "4"), "context window", "--ctx")
    assert "256" in line


def test_spac_trace_stops_at_the_context_window(tmp_path):
    out = tmp_path / "t.npz"
    proc = cli("spac", "trace", DEFAULT, "-p", "Once upon a time", "-n", "300", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "llama_decode" not in proc.stderr and out.is_file()
    assert "context window" in proc.stderr


def test_python_eval_past_the_context_window_is_a_clear_error(flash_model):
    from spac_llamacpp import Llama

    llm = Llama(flash_model, n_ctx=32, verbose=False)
    try:
        with pytest.raises(SpacError, match="context window") as exc:
            for _ in llm.generate(llm.tokenize(b"hello"), top_k=1, temp=0.0):
                pass
        assert isinstance(exc.value, RuntimeError)  # what llama_cpp raised before: handlers keep working
        assert "\n" not in str(exc.value)
    finally:
        llm.close()


# --- two threads on one model -------------------------------------------------------------------------

THREADS = """
    import sys, threading
    from spac_llamacpp import Llama
    from spac_llamacpp.gguf.info import read_model_header
    path = sys.argv[1]
    llm = Llama(path, n_ctx=256, verbose=False, seed=0, tier="flash",
                budget=read_model_header(path).expert_bytes // 2)
    prompts = ["Once upon a time", "To be or not to be", "My lord, the king", "Good morrow"]
    want = {p: llm(p, max_tokens=24, temperature=0)["choices"][0]["text"] for p in prompts}
    got, errors = {}, []

    def work(i):
        try:
            for r in range(3):
                p = prompts[(i + r) % len(prompts)]
                if i == 1 and r == 1:  # a streamed completion
                    text = "".join(c["choices"][0]["text"] for c in llm(p, max_tokens=24, temperature=0, stream=True))
                else:
                    text = llm(p, max_tokens=24, temperature=0)["choices"][0]["text"]
                got[(i, r)] = (p, text)
                llm.tokenize(p.encode())
        except BaseException as exc:
            errors.append(repr(exc))

    ts = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    bad = {k: v for k, v in got.items() if v[1] != want[v[0]]}
    assert len(got) == 9 and not bad, bad
    st = llm.stats(settle=2.0)
    assert st["engine"]["evict_in_use"] == 0 and st["sensor_errors"] == {}
    llm.close()
    print("ok")
"""


def test_two_threads_on_one_flash_model_are_serialised():
    for _ in range(2):  # it crashed 3 of 3 runs before
        proc = py(THREADS, DEFAULT)
        assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (proc.returncode, proc.stderr[-3000:])


def test_eval_guard_keeps_each_session_whole():
    import threading
    import time

    from spac_llamacpp.base.guard import EvalGuard

    guard, log = EvalGuard(), []

    def steps(name: str):
        for i in range(30):
            with guard.op():
                log.append(name)
            time.sleep(0.0005)  # a chance for the other thread to cut in
            yield i

    def nested(name: str):  # a session inside a session, as generate inside a completion
        yield from guard.session(steps(name))

    threads = [threading.Thread(target=lambda n=n: list(guard.session(nested(n)))) for n in "ab"]
    for t in threads:
        t.start()
    with guard.op():  # an operation of another thread never lands inside a session
        log.append("m")
    for t in threads:
        t.join(30)
    text = "".join(log)
    assert sorted(text.replace("m", "")) == sorted("a" * 30 + "b" * 30)
    assert "a" * 30 in text and "b" * 30 in text, text  # never interleaved


STREAM_ACROSS_THREADS = """
    import sys, threading
    from concurrent.futures import ThreadPoolExecutor
    from spac_llamacpp import Llama
    llm = Llama(sys.argv[1], n_ctx=128, verbose=False, seed=0)
    want = llm("Hello there", max_tokens=12, temperature=0)["choices"][0]["text"]
    # llama_cpp.server runs each next() of a stream in a thread pool: another thread may resume it
    stream = llm("Hello there", max_tokens=12, temperature=0, stream=True)
    pools = [ThreadPoolExecutor(1), ThreadPoolExecutor(1)]  # each chunk from the other thread
    parts = []
    for i in range(1000):
        chunk = pools[i % 2].submit(next, stream, None).result(timeout=60)
        if chunk is None:
            break
        parts.append(chunk["choices"][0]["text"])
    for pool in pools:
        pool.shutdown()
    assert "".join(parts) == want, ("".join(parts), want)
    # an abandoned stream in this thread does not lock this thread out (as with llama_cpp.Llama)
    half = llm("Hello there", max_tokens=12, temperature=0, stream=True)
    next(half)
    assert llm("Hello there", max_tokens=12, temperature=0)["choices"][0]["text"] == want
    llm.close()
    print("ok")
"""


def test_a_stream_resumed_from_other_threads_does_not_deadlock(flash_model):
    proc = py(STREAM_ACROSS_THREADS, flash_model, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (proc.returncode, proc.stderr[-3000:])


# --- a closed model -----------------------------------------------------------------------------------

CLOSED = """
    import sys
    from spac_llamacpp import Llama
    from spac_llamacpp.base.errors import SpacError
    llm = Llama(sys.argv[1], n_ctx=128, verbose=False, embedding=sys.argv[2] == "embed")
    llm.tokenize(b"hello")
    llm.close()
    calls = {
        "call": lambda: llm("hello", max_tokens=2),
        "tokenize": lambda: llm.tokenize(b"hello"),
        "detokenize": lambda: llm.detokenize([1, 2]),
        "generate": lambda: next(llm.generate([1, 2])),
        "eval": lambda: llm.eval([1, 2]),
        "n_ctx": lambda: llm.n_ctx(),
        "n_vocab": lambda: llm.n_vocab(),
        "token_eos": lambda: llm.token_eos(),
        "chat": lambda: llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=2),
        "embed": lambda: llm.embed("hello"),
    }
    for name, fn in calls.items():
        try:
            fn()
        except SpacError as exc:
            msg = str(exc)
            assert "\\n" not in msg and "closed" in msg, msg
            print(name, "refused")
        else:
            raise AssertionError(name + " did not refuse")
    llm.close()  # idempotent
    print("ok")
"""


@pytest.mark.parametrize("mode", ["plain", "embed"])
def test_a_closed_model_refuses_with_one_line(flash_model, mode):
    proc = py(CLOSED, flash_model, mode)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (proc.returncode, proc.stdout, proc.stderr)


CLOSE_WHILE_GENERATING = """
    import sys, threading, time
    from spac_llamacpp import Llama
    from spac_llamacpp.base.errors import SpacError
    from spac_llamacpp.gguf.info import read_model_header
    llm = Llama(sys.argv[1], n_ctx=256, verbose=False, tier="flash",
                budget=read_model_header(sys.argv[1]).expert_bytes // 2)
    started, outcome = threading.Event(), []

    def work():
        try:
            while True:
                for _ in llm("Once upon a time", max_tokens=200, temperature=0, stream=True):
                    started.set()
        except SpacError as exc:
            outcome.append(str(exc))

    t = threading.Thread(target=work)
    t.start()
    started.wait(60)
    time.sleep(0.2)
    llm.close()  # from another thread, mid-generation
    t.join(60)
    assert len(outcome) == 1 and "closed" in outcome[0], outcome
    print("ok")
"""


def test_closing_from_another_thread_mid_generation_is_one_error():
    proc = py(CLOSE_WHILE_GENERATING, DEFAULT)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (proc.returncode, proc.stderr[-3000:])


# --- embeddings go through the sensor and the tier ----------------------------------------------------


def test_embed_is_observed_and_budget_checked(flash_model):
    from spac_llamacpp import Llama

    info = read_model_header(flash_model)
    budget = info.expert_bytes // 3
    llm = Llama(flash_model, n_ctx=256, n_batch=64, n_ubatch=64, verbose=False, embedding=True, tier="flash",
                budget=budget, flash_options={"background": False, "check_every": 1})
    try:
        texts = ["the quick brown fox jumps over the lazy dog " * 4, "a second text, of other words " * 4]
        before = llm.routing.n_steps
        emb = llm.embed(texts)
        assert len(emb) == 2
        assert llm.routing.n_steps - before == 2  # one step per decoded batch
        resp = llm.create_embedding(["a short text", "another one"])
        assert len(resp["data"]) == 2
        st = llm.stats(settle=5.0)
        assert st["budget_checks"] >= 3
        assert st["resident_expert_bytes"] <= budget, st
        assert st["routing_tokens"] >= resp["usage"]["total_tokens"]
        assert st["engine"]["evict_in_use"] == 0
    finally:
        llm.close()


def test_embed_matches_stock_and_records_routing(tiny_model):
    import llama_cpp

    from spac_llamacpp import Llama

    path = str(tiny_model("qwen3moe"))
    stock = llama_cpp.Llama(path, embedding=True, n_ctx=128, verbose=False)
    llm = Llama(path, embedding=True, n_ctx=128, verbose=False)
    try:
        np.testing.assert_allclose(llm.embed("some words"), stock.embed("some words"), rtol=1e-5, atol=1e-6)
        assert llm.routing.n_steps == 1 and llm.routing.n_tokens == len(llm.tokenize(b"some words"))
    finally:
        stock.close()
        llm.close()


# --- teardown at interpreter exit ---------------------------------------------------------------------

AT_EXIT = """
    import json, sys
    from spac_llamacpp import Llama
    from spac_llamacpp.gguf.info import read_model_header
    kw = {}
    if sys.argv[2] == "flash":
        kw = {"tier": "flash", "budget": read_model_header(sys.argv[1]).expert_bytes // 2}
    # a reference from a module imported before ours: module teardown reaches it late (llama_cpp.server's
    # global model, a model kept by a library)
    json._kept = Llama(sys.argv[1], n_ctx=128, verbose=False, **kw)
    json._kept("hello", max_tokens=4)
    print("done")
"""


@pytest.mark.parametrize("tier", ["none", "flash"])
def test_no_exception_at_interpreter_exit(flash_model, tier):
    proc = py(AT_EXIT, flash_model, tier)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# --- Ctrl-C in spac-run -------------------------------------------------------------------------------

SIGINT_AFTER = """
import os, signal
import spac_llamacpp.tools.generate as g
# a terminal's foreground process: Python's Ctrl-C handler (a process started in the background by a
# non-interactive shell inherits SIGINT ignored, and Python then leaves it ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)
_orig = g.stream_generate
def _interrupted(*a, **k):
    for i, piece in enumerate(_orig(*a, **k)):
        yield piece
        if i == 5:
            os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C
g.stream_generate = _interrupted
"""


@pytest.mark.parametrize("stats", [None, "json"])
def test_spac_run_ctrl_c_exits_130_with_a_summary(stats):
    args = ["-n", "200"] + (["--stats", stats] if stats else [])
    proc = cli("spac_run", *args, prelude=SIGINT_AFTER)
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert proc.stdout.startswith("Once upon a time") and len(proc.stdout) > len("Once upon a time")
    assert "Traceback" not in proc.stderr
    if stats == "json":
        report = json.loads(proc.stderr)
        assert report["stop_reason"] == "interrupted" and report["generated_tokens"] >= 6
    else:
        assert "interrupted" in proc.stderr and "tokens generated" in proc.stderr


# --- --budget 50% -------------------------------------------------------------------------------------


def test_spac_run_budget_as_a_share_of_the_expert_bytes():
    from spac_llamacpp.planning.budgets import parse_budget
    from spac_llamacpp.tools.benchmarks import budget_arg

    info = read_model_header(DEFAULT)
    proc = cli("spac_run", "--tier", "flash", "--budget", "50%", "-n", "4", "--stats", "json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report["flash"]["budget_bytes"] == info.expert_bytes // 2
    # one parser: the bench scripts', the command line's and the Python API's
    assert budget_arg("50%", "flash", info) == parse_budget("50%", "flash", info) == info.expert_bytes // 2
    assert parse_budget("6GiB", "flash", info) == 6 << 30
    for bad in ("fifty%", "-5%", "%"):
        with pytest.raises(SpacError, match="50%"):
            parse_budget(bad, "flash", info)
    assert_one_line_error(cli("spac_run", DEFAULT, "--tier", "flash", "--budget", "half%", "-n", "2"), "half%")


def test_python_budget_as_a_share(flash_model):
    from spac_llamacpp import Llama

    info = read_model_header(flash_model)
    llm = Llama(flash_model, n_ctx=64, verbose=False, tier="flash", budget="50%",
                flash_options={"background": False})
    try:
        assert llm.stats()["budget_bytes"] == info.expert_bytes // 2
    finally:
        llm.close()


# --- --stats json: stderr is JSON ---------------------------------------------------------------------


def test_spac_run_stats_json_without_a_model_is_json():
    proc = cli("spac_run", "-n", "4", "--stats", "json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stderr)  # all of it: `spac-run --stats json 2> stats.json`
    assert report["model"] == DEFAULT
    assert any("embedded default" in n for n in report["notes"])


def test_spac_run_stats_text_still_names_the_default_model():
    proc = cli("spac_run", "-n", "4", "--stats")
    assert proc.returncode == 0 and "embedded default" in proc.stderr, proc.stderr


# --- spac patch -o into an unwritable place -----------------------------------------------------------


@pytest.mark.parametrize("where", ["/proc/x.gguf", "missing-dir/x.gguf"])
def test_patch_unwritable_output_names_the_output(flash_model, tmp_path, where):
    info = read_model_header(flash_model)
    prof = tmp_path / "p.json"
    counts = np.arange(len(info.moe_layers) * info.n_expert).reshape(len(info.moe_layers), info.n_expert)
    Profile(tuple(info.moe_layers), info.n_expert, counts, tokens=10, steps=2, model="m").save(prof)
    out = where if where.startswith("/") else str(tmp_path / where)
    line = assert_one_line_error(cli("spac", "patch", flash_model, "--profile", str(prof), "-o", out), out)
    assert ".tmp" not in line and "Errno" not in line
    assert not list(tmp_path.glob("**/*.tmp*"))


# --- spac simulate does not calibrate unasked ---------------------------------------------------------


@pytest.fixture(scope="module")
def recorded_trace(flash_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("rough_sim")
    out = d / "t.npz"
    proc = cli("spac", "trace", flash_model, "-p", "Once upon a time", "-n", "12", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_first_simulate_uses_nominal_costs_and_writes_nothing(flash_model, recorded_trace, tmp_path):
    model_dir = Path(flash_model).parent
    before = sorted(p.name for p in model_dir.iterdir())
    cache = tmp_path / "calibration"
    budget = str(read_model_header(flash_model).expert_bytes // 2)
    proc = cli("spac", "simulate", str(recorded_trace), "--budget", budget, "--policy", "lru",
               env={"SPAC_CALIBRATION_CACHE": str(cache)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "nominal" in proc.stderr and "--calibrate" in proc.stderr
    assert "nominal" in proc.stdout  # the table says which costs it used
    assert not cache.exists() or not any(cache.iterdir())  # nothing measured, nothing cached
    assert sorted(p.name for p in model_dir.iterdir()) == before


def test_simulate_calibrates_only_when_asked(flash_model, recorded_trace, monkeypatch, tmp_path):
    from click.testing import CliRunner

    from spac_llamacpp.planning.costmodel import CostModel
    from spac_llamacpp.tools import cli as cli_mod

    measured = []

    def fake_measure(model, types=None):
        measured.append(model)
        cm = CostModel.nominal()
        cm.source = "measured (test)"
        return cm

    monkeypatch.setattr(cli_mod, "_measure_and_cache", fake_measure)
    monkeypatch.setenv("SPAC_CALIBRATION_CACHE", str(tmp_path / "calibration"))  # none cached
    budget = str(read_model_header(flash_model).expert_bytes // 2)
    args = ["simulate", str(recorded_trace), "--budget", budget, "--policy", "lru"]
    res = CliRunner().invoke(cli_mod.spac, args)
    assert res.exit_code == 0, res.output
    assert measured == []
    res = CliRunner().invoke(cli_mod.spac, [*args, "--calibrate"])
    assert res.exit_code == 0, res.output
    assert len(measured) == 1 and "measured (test)" in res.output


def test_calibration_flash_file_goes_to_a_writable_directory(tmp_path, monkeypatch):
    from spac_llamacpp.tools import calibrate as C

    model_dir = tmp_path / "installed"
    model_dir.mkdir()
    model = model_dir / "m.gguf"
    model.write_bytes(b"")
    assert C.flash_test_dir(model) == model_dir  # the model's own device when it can
    real_access = os.access
    monkeypatch.setattr(C.os, "access", lambda p, mode: False if Path(p) == model_dir else real_access(p, mode))
    chosen = C.flash_test_dir(model)  # a read-only install: not next to the model
    assert chosen != model_dir and real_access(chosen, os.W_OK)


# --- spac inspect --json: layer_expert_bytes ----------------------------------------------------------


def test_inspect_json_layer_expert_bytes_is_per_layer(flash_model):
    info = inspect_model(flash_model)
    data = json.loads(json.dumps(info.to_json()))
    for layer in info.moe_layers:
        per_expert = info.layer_expert_bytes(layer)
        assert data["bytes_per_expert"][str(layer)] == per_expert
        assert data["layer_expert_bytes"][str(layer)] == per_expert * info.n_expert
    assert sum(data["layer_expert_bytes"].values()) == data["expert_bytes"]


# --- a second mapping of the same GGUF ----------------------------------------------------------------


def test_second_mapping_of_the_file_is_reported(flash_model):
    import llama_cpp

    from spac_llamacpp import Llama

    info = read_model_header(flash_model)
    budget = info.expert_bytes // 3
    llm = Llama(flash_model, n_ctx=128, verbose=False, tier="flash", budget=budget,
                flash_options={"background": False})
    try:
        llm("hello", max_tokens=4)
        st = llm.stats(settle=2.0)
        assert st["other_mappings"] == {"count": 0, "bytes": 0, "rss_bytes": 0}
        assert not any("mapping" in n for n in st["notes"])
        stock = llama_cpp.Llama(flash_model, n_ctx=128, verbose=False)  # e.g. for comparison
        try:
            stock("hello", max_tokens=4)
            st = llm.stats(settle=2.0)
            other = st["other_mappings"]
            assert other["count"] >= 1 and other["rss_bytes"] > 0 and other["bytes"] >= info.expert_bytes
            (note,) = [n for n in st["notes"] if "mapping" in n]
            assert "budget" in note and "flash.md" in note
        finally:
            stock.close()
        assert llm.stats()["other_mappings"]["count"] == 0
    finally:
        llm.close()
