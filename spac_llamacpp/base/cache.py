"""Where spac keeps what it builds: native modules and generated models."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str, env_var: str) -> Path:
    """``$env_var`` if set, else ``$XDG_CACHE_HOME/spac-llamacpp/<kind>`` (``~/.cache`` by default)."""
    env = os.environ.get(env_var)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "spac-llamacpp" / kind
