"""MeasuredSwitch: on or off by measured decode time (tiers/switch.py)."""

from __future__ import annotations

import pytest

from spac_llamacpp.tiers.switch import EXPLORE_ORDER, MeasuredSwitch


def _drive(sw: MeasuredSwitch, cost, steps: int) -> list[bool]:
    settings = []
    for i in range(steps):
        settings.append(sw.on)
        sw.record(cost(sw.on, i))
    return settings


@pytest.mark.parametrize(("on_cost", "chosen"), [(0.8, True), (1.2, False), (0.99, False)])
def test_chooses_the_faster_setting_beyond_the_margin(on_cost, chosen):
    sw = MeasuredSwitch(window=4, period=50, margin=0.03, warmup=0)
    settings = _drive(sw, lambda on, i: on_cost if on else 1.0, 4 * len(EXPLORE_ORDER) + 10)
    # the comparison ran each setting in the order off, on, on, off, one window each
    assert settings[:16] == [s for s in EXPLORE_ORDER for _ in range(4)]
    assert [d.on for d in sw.decisions] == [chosen] and settings[16:] == [chosen] * 10
    assert sw.decisions[0].on_seconds == pytest.approx(on_cost) and sw.decisions[0].off_seconds == 1.0


def test_a_steady_drift_cancels_and_outliers_do_not_decide():
    # step time grows with the context; on is 5% cheaper; one stall of 100x in an on window
    def cost(on: bool, i: int) -> float:
        return (1.0 + 0.01 * i) * (0.95 if on else 1.0) * (100.0 if i == 5 else 1.0)

    sw = MeasuredSwitch(window=4, period=100, warmup=0)
    _drive(sw, cost, 16)
    assert sw.decisions[-1].on


def test_measures_again_after_the_period():
    sw = MeasuredSwitch(window=2, period=5, warmup=0)
    # on pays at first, then costs (e.g. the budget's resident set changed)
    _drive(sw, lambda on, i: (0.5 if on else 1.0) if i < 20 else (2.0 if on else 1.0), 60)
    assert [d.on for d in sw.decisions][:1] == [True] and sw.decisions[-1].on is False
    assert sw.to_json()["decisions"][0]["on"] is True


def test_bad_parameters():
    for kw in ({"window": 0}, {"period": -1}, {"margin": 1.0}, {"warmup": -1}):
        with pytest.raises(ValueError):
            MeasuredSwitch(**kw)


def test_the_steps_after_a_prompt_are_not_measured():
    # the first 3 decode steps after each prompt are slow whatever the setting; on is 10% cheaper
    def cost(on: bool, i: int) -> float:
        return (5.0 if i % 20 < 3 else 1.0) * (0.9 if on else 1.0)

    sw = MeasuredSwitch(window=2, period=100, warmup=3)
    for i in range(40):
        if i % 20 == 0:
            sw.interrupt()  # a prompt
        sw.record(cost(sw.on, i))
    assert len(sw.decisions) == 1 and sw.decisions[0].on
    assert sw.decisions[0].off_seconds == pytest.approx(1.0) and sw.decisions[0].on_seconds == pytest.approx(0.9)
