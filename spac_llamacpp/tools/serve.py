"""``spac serve``: an OpenAI-compatible HTTP server for ``spac_llamacpp.Llama``, built on llama-cpp-python's own
server app (``llama_cpp.server.app``, its ``[server]`` extra: FastAPI, uvicorn, sse-starlette).

How it is wired:

- **The model.** ``llama_cpp.server.app.create_app`` builds its ``LlamaProxy`` from ``ModelSettings`` and loads
  ``llama_cpp.Llama`` from them. :func:`build_app` hands it a :class:`LlamaProxy` subclass whose
  ``load_llama_from_model_settings`` calls our factory instead (``spac serve``: the command line's tier,
  drafting and cache-aware routing options, ``--tier auto`` by default), by swapping the name ``LlamaProxy``
  in the app module for the duration of ``create_app``. Every route of the stock server is kept:
  ``/v1/completions``, ``/v1/chat/completions`` (streaming or not), ``/v1/embeddings``, ``/v1/models``,
  ``/extras/tokenize``...; the model's own chat template (GGUF ``tokenizer.chat_template``) formats chats.
- **One evaluation at a time.** Every stock route reaches the model through the app's ``get_llama_proxy``,
  which holds ``llama_inner_lock`` (an ``anyio.Lock``) while the request runs, a stream included (its
  generator is advanced in worker threads, one token at a time, with the lock held until the stream ends).
  ``/spac/stats`` takes the same lock, so it never reads the routing log in the middle of a step.
  With ``interrupt_requests`` (off by default here; the stock server's default is on) a new request ends a
  stream in progress instead of waiting for it.
- **/spac/stats**: ``llm.stats()`` (tier state: budget, resident bytes, hit rate, engine errors), the routing
  summary, speculation summary, what ``--tier auto`` chose, and request counts.
- **Shutdown.** SIGINT / SIGTERM make uvicorn stop accepting and let the requests in flight finish, streams
  included (sse-starlette's immediate drain is turned off), for up to ``SHUTDOWN_GRACE`` seconds, then cancel
  what is left (a second Ctrl+C: at once); the lifespan's shutdown then takes the model lock (no evaluation
  can be running) and closes the model, which stops the tier's re-planner and joins its engine threads before
  llama.cpp frees the model. ``run_server`` returns normally.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from spac_llamacpp.base.errors import SpacError

SHUTDOWN_GRACE = 10  # seconds requests in flight get to finish after SIGINT / SIGTERM


class ServedModel:
    """The one model a server serves, its counters, and closing it exactly once."""

    def __init__(self, path: str, alias: str) -> None:
        self.path = path
        self.alias = alias
        self.llm: Any = None
        self.started = time.time()
        self.requests = 0
        self.errors = 0
        self._closed = False
        self._close_lock = threading.Lock()

    def stats(self) -> dict[str, Any]:
        """``/spac/stats``: the model's stats, routing summary and the server's counters."""
        llm = self.llm
        out: dict[str, Any] = {"model": self.alias, "path": self.path, "closed": self._closed,
                               "server": {"requests": self.requests, "errors": self.errors,
                                          "uptime_seconds": round(time.time() - self.started, 3)}}
        if llm is None or self._closed:
            return out
        out["tier"] = llm.tier or "none"
        out["fit"] = llm.fit.to_json() if getattr(llm, "fit", None) is not None else None
        out["stats"] = llm.stats()
        out["routing"] = llm.routing.summary() if llm.routing is not None else None
        out["speculation"] = llm.speculation.summary() if llm.speculation is not None else None
        return out

    def close(self) -> None:
        with self._close_lock:
            if self._closed or self.llm is None:
                self._closed = True
                return
            self._closed = True
            self.llm.close()


@contextlib.contextmanager
def _swapped(module: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


@contextlib.contextmanager
def _env_without(name: str) -> Iterator[None]:
    old = os.environ.pop(name, None)
    try:
        yield
    finally:
        if old is not None:
            os.environ[name] = old


def _server_modules() -> tuple[Any, Any, Any, Any]:
    try:
        import llama_cpp.server.app as server_app
        from llama_cpp.server.model import LlamaProxy
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as exc:
        raise SpacError(f"spac serve needs llama-cpp-python's server extra ({exc.name} is missing): "
                        "pip install fastapi uvicorn sse-starlette starlette-context pydantic-settings") from None
    return server_app, LlamaProxy, ModelSettings, ServerSettings


class _RequestCounter:
    """Pure ASGI middleware counting ``/v1/`` requests and error responses (no wrapping of streamed bodies)."""

    def __init__(self, app: Any, served: ServedModel) -> None:
        self.app = app
        self.served = served

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        self.served.requests += 1

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.served.errors += 1
            await send(message)

        await self.app(scope, receive, counting_send)


def _openai_validation_errors(server_errors: Any) -> None:
    """Make request validation errors OpenAI-style 400 ``invalid_request_error`` responses.

    The stock server's route class (``llama_cpp.server.errors.RouteErrorHandler``) catches every exception of a
    route; with current FastAPI a body that fails validation raises inside the route, so it would answer 500
    ``internal_server_error`` with a traceback on stderr. This wraps its ``error_message_wrapper`` (once per
    process) to answer what OpenAI answers instead, naming the parameter.
    """
    from fastapi.exceptions import RequestValidationError

    handler = server_errors.RouteErrorHandler
    original = handler.error_message_wrapper
    if getattr(original, "_spac_wrapped", False):
        return

    def error_message_wrapper(self: Any, error: Exception, body: Any = None) -> Any:
        if isinstance(error, RequestValidationError):
            errs = list(error.errors())
            where = [".".join(str(x) for x in e.get("loc", ())[1:]) or "body" for e in errs]
            msg = "; ".join(f"{w}: {e.get('msg', 'invalid')}" for w, e in zip(where, errs, strict=True))
            return 400, server_errors.ErrorResponse(message=f"invalid request: {msg or error}",
                                                    type="invalid_request_error",
                                                    param=where[0] if where else None, code="invalid_value")
        return original(self, error, body)

    error_message_wrapper._spac_wrapped = True  # type: ignore[attr-defined]
    handler.error_message_wrapper = error_message_wrapper


def build_app(make_llm: Callable[[], Any], model_path: str, *, alias: str | None = None,
              api_key: str | None = None, interrupt_requests: bool = False) -> tuple[Any, ServedModel]:
    """The FastAPI app of llama-cpp-python's server serving ``make_llm()`` (called once, now), with ``/spac/stats``
    and a shutdown that closes the model; returns ``(app, served)``."""
    server_app, LlamaProxy, ModelSettings, ServerSettings = _server_modules()
    import llama_cpp.server.errors as server_errors
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse

    served = ServedModel(str(model_path), alias or Path(model_path).stem)

    class SpacLlamaProxy(LlamaProxy):  # type: ignore[misc, valid-type]
        """The stock proxy, loading ``spac_llamacpp.Llama`` from our factory instead of ``ModelSettings``."""

        def load_llama_from_model_settings(self, settings: Any) -> Any:  # the base's is a staticmethod
            served.llm = make_llm()
            return served.llm

    model_settings = ModelSettings(model=str(model_path), model_alias=served.alias)
    server_settings = ServerSettings(api_key=api_key, interrupt_requests=interrupt_requests)
    # CONFIG_FILE would make create_app load other models from a file: spac serve serves exactly one
    with _env_without("CONFIG_FILE"), _swapped(server_app, "LlamaProxy", SpacLlamaProxy):
        app = server_app.create_app(server_settings=server_settings, model_settings=[model_settings])
    if served.llm is None:  # create_app loads the default model; it always should have
        raise SpacError("llama_cpp.server did not load the model through spac's proxy")

    @app.get("/spac/stats", tags=["spac"], summary="spac tier stats and routing summary")
    async def spac_stats() -> dict[str, Any]:
        async with server_app.llama_inner_lock:  # the lock every evaluation holds
            return await run_in_threadpool(served.stats)

    app.add_middleware(_RequestCounter, served=served)
    _openai_validation_errors(server_errors)

    async def invalid_json(request: Any, exc: Exception) -> Any:
        # the stock route handler re-reads a body that failed validation as JSON; not JSON at all ends here
        return JSONResponse({"error": {"message": f"invalid request: the body is not JSON ({exc})",
                                       "type": "invalid_request_error", "param": None, "code": "invalid_json"}},
                            status_code=400)

    app.add_exception_handler(json.JSONDecodeError, invalid_json)

    stock_lifespan = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        async with stock_lifespan(a) as state:
            yield state
        # after the requests in flight: wait for any evaluation still holding the model, then close it
        async with server_app.llama_outer_lock, server_app.llama_inner_lock:
            await run_in_threadpool(served.close)

    app.router.lifespan_context = lifespan
    return app, served


def run_server(app: Any, served: ServedModel, host: str, port: int, *, log_level: str = "info",
               echo: Callable[[str], None] = print) -> None:
    """Serve until SIGINT / SIGTERM; the model is closed (tier threads joined) when this returns."""
    import uvicorn
    from sse_starlette.sse import AppStatus

    # streams in flight finish like other requests (within the grace period) instead of being cut at once
    AppStatus.disable_automatic_graceful_drain()
    AppStatus.should_exit = False
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(),
                            timeout_graceful_shutdown=SHUTDOWN_GRACE + 2)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            # streams still running when the grace period ends are ended by sse-starlette (the client sees the
            # stream stop), before uvicorn would cancel their tasks
            timer = threading.Timer(SHUTDOWN_GRACE, lambda: setattr(AppStatus, "should_exit", True))
            timer.daemon = True
            timer.start()

    server = Server(config)
    shown = f"[{host}]" if ":" in host else host
    echo(f"spac serve: {served.alias} on http://{shown}:{port}/v1 (OpenAI API: /v1/completions, "
         f"/v1/chat/completions, /v1/models; spac: /spac/stats); Ctrl+C stops")
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled, after its graceful shutdown
        pass
    except SystemExit as exc:  # uvicorn exits when it cannot bind
        if exc.code not in (0, None):
            raise SpacError(f"could not serve on {host}:{port} (uvicorn exited with status {exc.code}; "
                            "its log above says why, e.g. the port is in use)") from None
    finally:
        served.close()  # a no-op when the lifespan's shutdown closed it
    echo("spac serve: stopped; model closed")
