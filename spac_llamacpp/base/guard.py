"""One evaluation at a time on a model, whichever threads ask: :class:`EvalGuard`.

A llama.cpp context, and what spac hangs on it (the routing sensor, a tier's engine and planner), must
not run two evaluations at once: two threads on one ``llama_cpp.Llama`` crash the process. The guard
serialises them at two levels:

- **operations** (:meth:`EvalGuard.op`): a decode, a sample, an embedding, state I/O, closing. Never two
  at once (one re-entrant lock).
- **sessions** (:meth:`EvalGuard.session`): a generator that runs many operations (a generation, a streamed
  completion). While one is open, other threads' operations and sessions wait until it finishes or is
  closed, so that concurrent requests each get the output they would get alone. The thread that resumes a
  session runs it: a stream resumed from a thread pool's threads in turn (``llama_cpp.server``) does not
  wait for itself. The thread that last ran an unfinished session is not kept out either (interleaving
  one's own generations is allowed, as with ``llama_cpp.Llama``); another thread waits for a stream that
  is left open until it is exhausted, closed or collected.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Generator, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class EvalGuard:
    """Serialises one model's evaluations across threads (see the module docstring)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.RLock())
        self._native = threading.RLock()
        self._owners: dict[int, int] = {}  # open session -> the thread that last ran it
        self._keys = itertools.count()
        self._local = threading.local()

    def _depth(self, name: str) -> int:
        return getattr(self._local, name, 0)

    def _bump(self, name: str, by: int) -> None:
        setattr(self._local, name, self._depth(name) + by)

    def _admitted(self) -> bool:
        """This thread runs inside a session or an operation already: it has its turn."""
        return self._depth("session") > 0 or self._depth("op") > 0

    def _take_turn(self, key: int) -> None:
        """Register ``key`` as run by this thread, once no other thread's session is open (unless admitted)."""
        me = threading.get_ident()
        with self._cond:
            if not self._admitted():
                while any(owner != me for owner in self._owners.values()):
                    self._cond.wait()
            self._owners[key] = me

    def _end_turn(self, key: int) -> None:
        with self._cond:
            self._owners.pop(key, None)
            self._cond.notify_all()

    @contextlib.contextmanager
    def op(self, *, wait_sessions: bool = True) -> Iterator[None]:
        """One operation. ``wait_sessions=False``: only never at the same time as another operation (reading the
        vocabulary does not disturb another thread's generation, but must not run while the model is freed)."""
        key = next(self._keys)
        if wait_sessions:
            self._take_turn(key)
        try:
            with self._native:
                self._bump("op", 1)
                try:
                    yield
                finally:
                    self._bump("op", -1)
        finally:
            if wait_sessions:
                self._end_turn(key)

    @contextlib.contextmanager
    def exclusive(self, timeout: float = -1) -> Iterator[bool]:
        """The operation lock alone, e.g. to free the model between another thread's operations; yields whether
        it was acquired (``timeout`` seconds, -1 = wait)."""
        got = self._native.acquire(timeout=timeout)
        try:
            yield got
        finally:
            if got:
                self._native.release()

    def session(self, gen: Generator[T, Any, Any]) -> Generator[T, Any, Any]:
        """``gen`` as a session: it takes its turn at its first step and holds it until it ends or is closed."""
        key = next(self._keys)
        self._take_turn(key)
        try:
            sent = None
            while True:
                with self._cond:
                    self._owners[key] = threading.get_ident()  # whoever resumes it runs it
                self._bump("session", 1)
                try:
                    item = gen.send(sent)
                except StopIteration as stop:
                    return stop.value
                finally:
                    self._bump("session", -1)
                sent = yield item
        finally:
            self._bump("session", 1)
            try:
                gen.close()
            finally:
                self._bump("session", -1)
                self._end_turn(key)
