"""Switch a mechanism on or off by its measured effect on decode time, not by a fixed default.

A mechanism such as layer-ahead prefetch pays on one model and budget (slow reads next to fast compute) and
costs on another (its extra graph cut and router evaluations are not repaid). :class:`MeasuredSwitch` runs
it both ways in alternating windows of decode steps, in the order off, on, on, off (so a steady drift of the
step time, e.g. a growing context, cancels out), compares the median seconds per token of each setting, keeps
the faster one, and measures again after ``period`` steps: the routing, the resident set and the machine's
load change during a generation. The decode steps right after a prompt are not measured (``warmup``): they pay
for the prompt's aftermath (the plan it made is being read in), which would weigh on whichever setting ran then.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import median

EXPLORE_ORDER = (False, True, True, False)


@dataclass(frozen=True)
class SwitchDecision:
    """One comparison: the decode step after which it was made, seconds per token off and on, the choice."""

    step: int
    off_seconds: float
    on_seconds: float
    on: bool


@dataclass
class MeasuredSwitch:
    """On or off, chosen by measurement (see the module docstring).

    Args:
        window: decode steps per measured window.
        period: decode steps between the end of one comparison and the start of the next.
        margin: on must be at least this share faster than off to be chosen (off costs nothing to keep).
        warmup: decode steps not measured at the start and after each :meth:`interrupt` (a prompt).
    """

    window: int = 8
    period: int = 256
    margin: float = 0.03
    warmup: int = 8
    decisions: list[SwitchDecision] = field(default_factory=list)
    _steps: int = 0
    _phase: int = 0  # index into EXPLORE_ORDER while comparing; len(EXPLORE_ORDER): exploiting
    _samples: list[float] = field(default_factory=list)
    _medians: dict[bool, list[float]] = field(default_factory=lambda: {False: [], True: []})
    _exploit_left: int = 0
    _chosen: bool = False
    _skip: int = -1  # decode steps still not measured (-1: warmup not started)

    def __post_init__(self) -> None:
        if self.window < 1 or self.period < 0 or not 0 <= self.margin < 1 or self.warmup < 0:
            raise ValueError("need window >= 1, period >= 0, 0 <= margin < 1 and warmup >= 0")
        self._skip = self.warmup

    def interrupt(self) -> None:
        """A step that is not a decode step ran (a prompt): the window in progress starts again after ``warmup``
        unmeasured decode steps."""
        if self.comparing:
            self._samples = []
            self._skip = self.warmup

    @property
    def on(self) -> bool:
        """The setting for the next decode step."""
        return EXPLORE_ORDER[self._phase] if self._phase < len(EXPLORE_ORDER) else self._chosen

    @property
    def comparing(self) -> bool:
        return self._phase < len(EXPLORE_ORDER)

    def record(self, seconds_per_token: float) -> bool:
        """A decode step ran with the setting :attr:`on` and took this long per token; returns the setting for
        the next one."""
        self._steps += 1
        if self.comparing and self._skip > 0:
            self._skip -= 1
            return self.on
        if not self.comparing:
            self._exploit_left -= 1
            if self._exploit_left <= 0:
                self._phase, self._medians, self._skip = 0, {False: [], True: []}, 0
            return self.on
        self._samples.append(float(seconds_per_token))
        if len(self._samples) < self.window:
            return self.on
        self._medians[self.on].append(median(self._samples))
        self._samples = []
        self._phase += 1
        if not self.comparing:
            off = sum(self._medians[False]) / len(self._medians[False])
            on = sum(self._medians[True]) / len(self._medians[True])
            self._chosen = on < off * (1.0 - self.margin)
            self.decisions.append(SwitchDecision(self._steps, off, on, self._chosen))
            self._exploit_left = self.period
        return self.on

    def to_json(self) -> dict[str, object]:
        return {"on": self.on, "comparing": self.comparing, "window": self.window, "period": self.period,
                "margin": self.margin, "warmup": self.warmup,
                "decisions": [{"step": d.step, "off_ms_per_token": 1e3 * d.off_seconds,
                               "on_ms_per_token": 1e3 * d.on_seconds, "on": d.on} for d in self.decisions]}
