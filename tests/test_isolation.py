"""The test session's environment: tests never read the user's calibration (see conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import CALIBRATION_ENV, CALIBRATION_PREFIX

from spac_llamacpp import Llama
from spac_llamacpp.base.cache import cache_dir
from spac_llamacpp.planning.calibration import calibration_path, load_cached, machine_cost_model
from spac_llamacpp.planning.costmodel import CostModel, ReadCost

_SOURCE = "from spac_llamacpp.planning.calibration import machine_cost_model as m; print(m().source)"


def test_the_calibration_cache_is_a_fresh_session_directory():
    directory = Path(os.environ[CALIBRATION_ENV])
    assert directory.name.startswith(CALIBRATION_PREFIX)
    assert directory.resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())
    assert directory.is_dir() and not list(directory.iterdir())  # no test leaves a calibration there
    assert calibration_path(None).parent == directory
    # only the calibration is redirected: the native module cache stays where it always is
    assert CALIBRATION_PREFIX not in str(cache_dir("native", "SPAC_NATIVE_CACHE"))


def test_a_tier_built_in_tests_uses_nominal_costs_despite_a_users_calibration(tiny_model, tmp_path, monkeypatch):
    model = tiny_model()
    # keep the native module where it is built, then move the user's cache home somewhere we may write
    monkeypatch.setenv("SPAC_NATIVE_CACHE", str(cache_dir("native", "SPAC_NATIVE_CACHE")))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    mine = CostModel.nominal()
    mine.flash_miss = ReadCost(123e6, 4e-3)
    with monkeypatch.context() as m:  # without the session's isolation, this is the user's calibration
        m.delenv(CALIBRATION_ENV, raising=False)
        for key in (None, model):
            users = calibration_path(key)
            assert users.is_relative_to(tmp_path / "xdg" / "spac-llamacpp" / "calibration")
            mine.save(users)
        assert load_cached(model) is not None and load_cached(model).flash_miss.bandwidth == 123e6

    assert load_cached(model) is None
    assert machine_cost_model(model).source.startswith("nominal")
    llm = Llama(str(model), n_ctx=64, verbose=False, seed=0, tier="flash", budget="64MiB",
                flash_options={"background": False})
    try:
        cost = llm.flash.balancer.cost
        assert cost.source.startswith("nominal") and cost.flash_miss.bandwidth != 123e6
    finally:
        llm.close()
    # a subprocess the tests spawn inherits the isolation
    proc = subprocess.run([sys.executable, "-c", _SOURCE], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.startswith("nominal"), proc.stdout + proc.stderr
