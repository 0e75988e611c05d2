"""Progress on the terminal for steps that take more than a few seconds (issue 17).

- :func:`phase_progress`: a step made of named phases (``spac calibrate``): on a terminal a rich spinner with
  the running phase and the time so far, each finished phase printed above it; elsewhere one
  ``LABEL: phase`` line per phase on stderr (what logs and tests read).
- :func:`token_progress`: tokens generated over a run of prompts (``spac trace``, ``spac profile``): a tqdm
  bar on a terminal only.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console


@contextlib.contextmanager
def phase_progress(label: str, console: Console | None = None) -> Iterator[Callable[[str], None]]:
    """``with phase_progress("calibrate") as progress: work(progress=progress)``: ``progress(message)`` starts a
    phase."""
    console = console or Console(stderr=True, highlight=False, soft_wrap=True)
    if not console.is_terminal:
        yield lambda m: print(f"{label}: {m}", file=sys.stderr, flush=True)
        return
    t0 = time.perf_counter()
    current: list[str] = []
    with console.status(f"{label}: starting", spinner="dots") as status:

        def progress(message: str) -> None:
            now = time.perf_counter() - t0
            if current:
                console.print(f"{label}: {current[-1]} [dim](done at {now:.1f} s)[/]")
            current.append(message)
            status.update(f"{label}: {message} [dim]({now:.1f} s)[/]")

        yield progress
    if current:
        console.print(f"{label}: {current[-1]} [dim](done at {time.perf_counter() - t0:.1f} s)[/]")


def token_progress(total: int, desc: str) -> Any:
    """A tqdm bar of ``total`` tokens, shown only on a terminal (``bar.update(n)``, ``bar.close()``)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tok", disable=None, leave=False, file=sys.stderr)
