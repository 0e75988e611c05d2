"""The build backend ships native/'s C sources inside the package (non-editable installs need them)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _backend():
    spec = importlib.util.spec_from_file_location("spac_build_backend", REPO / "scripts" / "build_backend.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_sources_copied_into_the_package(tmp_path, monkeypatch):
    backend = _backend()
    (tmp_path / "native").mkdir()
    (tmp_path / "spac_llamacpp" / "native_src").mkdir(parents=True)
    (tmp_path / "spac_llamacpp" / "native_src" / "stale.c").write_text("old")
    for name in ("a.c", "a.h"):
        (tmp_path / "native" / name).write_text(name)
    (tmp_path / "native" / "notes.txt").write_text("not a source")
    monkeypatch.setattr(backend, "_ROOT", tmp_path)
    backend._ship_native_sources()
    shipped = sorted(p.name for p in (tmp_path / "spac_llamacpp" / "native_src").iterdir())
    assert shipped == ["a.c", "a.h"]
    assert (tmp_path / "spac_llamacpp" / "native_src" / "a.h").read_text() == "a.h"


def test_from_an_sdist_keeps_what_came_with_it(tmp_path, monkeypatch):
    backend = _backend()
    (tmp_path / "spac_llamacpp" / "native_src").mkdir(parents=True)
    (tmp_path / "spac_llamacpp" / "native_src" / "x.c").write_text("x")
    monkeypatch.setattr(backend, "_ROOT", tmp_path)
    backend._ship_native_sources()
    assert (tmp_path / "spac_llamacpp" / "native_src" / "x.c").read_text() == "x"


def test_every_source_the_module_compiles_is_shipped():
    from spac_llamacpp.native import module

    names = {Path(s).name for s in module._SOURCES}
    present = {p.name for p in (REPO / "native").glob("*.[ch]")}
    assert names <= present, "module._SOURCES names a file the backend would not ship"
