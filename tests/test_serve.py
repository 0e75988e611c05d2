"""``spac serve``: the OpenAI-compatible server (llama_cpp.server's app serving spac's Llama), driven with the
``openai`` client over HTTP on 127.0.0.1; the tests of this module share one server, the last one stops it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from spac_llamacpp.models.default import default_model_path  # noqa: E402

ALIAS = "shakespeare"
BUDGET = "8MiB"  # the flash tier on the default model (14 MiB of experts): engine threads to join at the end
PROMPT = "Once upon a time"
# the stock server's request defaults differ from Llama.__call__'s in repeat_penalty (1.1 vs 1.0): pass it
SAMPLING = {"repeat_penalty": 1.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-c", "from spac_llamacpp.tools.cli import spac; spac()", "serve",
               "--port", str(self.port), "--alias", ALIAS, "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"spac serve exited with {self.proc.returncode}:\n{self.proc.stderr.read()}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                self.proc.kill()
                raise AssertionError("spac serve did not start within 120 s")
            time.sleep(0.2)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read())

    def post_raw(self, path: str, body: bytes) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def stop(self, sig: int | None = signal.SIGINT, timeout: float = 60) -> tuple[int, str, str]:
        if sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"spac serve did not stop within {timeout} s:\n{err}") from None
        return self.proc.returncode, out, err


@pytest.fixture(scope="module")
def server():
    srv = Server(str(default_model_path()), "--tier", "flash", "--budget", BUDGET)
    yield srv
    if srv.proc.poll() is None:
        srv.proc.kill()
        srv.proc.communicate()


@pytest.fixture(scope="module")
def local():
    """The same model in this process: the text the server must produce."""
    from spac_llamacpp.llama import Llama

    llm = Llama(str(default_model_path()), n_ctx=256, seed=0, verbose=False)
    yield llm
    llm.close()


def test_models_lists_the_model(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == [ALIAS]


def test_completion_is_the_in_process_greedy_text(server, local):
    r = server.client.completions.create(model=ALIAS, prompt=PROMPT, max_tokens=16, temperature=0,
                                         extra_body=SAMPLING)
    want = local(PROMPT, max_tokens=16, temperature=0, **SAMPLING)["choices"][0]["text"]
    assert r.choices[0].text == want and len(want) > 0
    assert r.usage.completion_tokens == 16


def test_streamed_chat_completion(server, local):
    messages = [{"role": "system", "content": "You are a poet."}, {"role": "user", "content": "Speak of love."}]
    stream = server.client.chat.completions.create(model=ALIAS, messages=messages, max_tokens=12, temperature=0,
                                                   stream=True, extra_body=SAMPLING)
    pieces, finish = [], None
    for chunk in stream:
        delta = chunk.choices[0].delta
        if delta.content:
            pieces.append(delta.content)
        finish = chunk.choices[0].finish_reason or finish
    assert len(pieces) > 1 and finish == "length"  # streamed in pieces
    want = local.create_chat_completion(messages, max_tokens=12, temperature=0, **SAMPLING)
    assert "".join(pieces) == want["choices"][0]["message"]["content"]


def test_concurrent_requests_are_serialised(server, local):
    want = local("To be", max_tokens=10, temperature=0, **SAMPLING)["choices"][0]["text"]
    got: list[str] = []
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            r = server.client.completions.create(model=ALIAS, prompt="To be", max_tokens=10, temperature=0,
                                                 extra_body=SAMPLING)
            got.append(r.choices[0].text)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and got == [want] * 4


def test_spac_stats(server):
    st = server.get("/spac/stats")
    assert st["model"] == ALIAS and st["tier"] == "flash" and not st["closed"]
    assert st["stats"]["budget_bytes"] == 8 << 20 and st["stats"]["hit_rate"] is not None
    assert st["routing"]["tokens"] > 0 and st["routing"]["bad_ids"] == 0
    assert st["server"]["requests"] >= 3


def test_bad_requests_get_json_errors(server):
    with pytest.raises(openai.BadRequestError) as exc:  # longer than the 256-token context
        server.client.completions.create(model=ALIAS, prompt="word " * 400, max_tokens=4)
    assert exc.value.status_code == 400 and exc.value.code == "context_length_exceeded"
    status, body = server.post_raw("/v1/completions", json.dumps({"prompt": "x", "max_tokens": "many"}).encode())
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == "max_tokens"
    status, body = server.post_raw("/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    # the server still answers
    r = server.client.completions.create(model=ALIAS, prompt=PROMPT, max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason == "length"


def test_sigint_stops_cleanly(server):
    """Last in this module: Ctrl+C ends the server once the stream in flight has finished, the model closed (the
    flash engine's threads joined)."""
    stream = server.client.completions.create(model=ALIAS, prompt=PROMPT, max_tokens=120, temperature=0,
                                              stream=True, extra_body=SAMPLING)
    chunks = 0
    for chunk in stream:
        chunks += 1
        if chunks == 3:
            server.proc.send_signal(signal.SIGINT)
        finish = chunk.choices[0].finish_reason
    assert finish == "length" and chunks >= 120  # the stream in flight was not cut
    code, out, err = server.stop(None)  # (a second SIGINT would force the exit)
    assert code == 0, err
    assert "stopped; model closed" in err
    for noise in ("Traceback", "Exception ignored", "Error", "leaked"):
        assert noise not in err, err


def test_serve_auto_and_bad_port(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        proc = subprocess.run([sys.executable, "-c", "from spac_llamacpp.tools.cli import spac; spac()", "serve",
                               str(default_model_path()), "--port", str(port), "--log-level", "critical"],
                              capture_output=True, text=True, timeout=120)
    finally:
        busy.close()
    assert proc.returncode == 2, proc.stderr
    assert "auto placement: all in RAM" in proc.stderr  # --tier auto is the default
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not serve on 127.0.0.1:") and "Traceback" not in proc.stderr


def test_build_app_in_process():
    """The app in this process (uvicorn on a thread): the factory is called once, the lifespan closes the model."""
    import uvicorn

    from spac_llamacpp.llama import Llama
    from spac_llamacpp.tools.serve import build_app

    calls = []

    def make():
        calls.append(1)
        return Llama(str(default_model_path()), n_ctx=128, verbose=False, tier="auto")

    app, served = build_app(make, str(default_model_path()), alias="m")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 60
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        r = client.completions.create(model="m", prompt=PROMPT, max_tokens=4, temperature=0)
        assert r.usage.completion_tokens == 4
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/spac/stats", timeout=60) as resp:
            st = json.loads(resp.read())
        assert st["tier"] == "none" and st["fit"]["placement"] == "ram" and st["routing"]["tokens"] >= 4
    finally:
        server.should_exit = True
        thread.join(60)
    assert calls == [1] and served.stats()["closed"]  # the lifespan's shutdown closed the model
    assert Path(served.path).name == default_model_path().name
