"""The wall-time estimate a training run prints once, early: "about 12 min for 2000 steps".

Measured on the steps after the first (the first step pays for lazy initialisation, kernel selection and
the first batches of the loader), over `window` steps, then extrapolated to the steps left. Validation
passes are not in it (they run every `train.val_every` steps); the line says so.
"""

from __future__ import annotations

import time

WINDOW = 10  # steps measured before the estimate


def format_seconds(seconds: float) -> str:
    """A duration the way a person says it: "40 s", "12 min", "3 h 05 min"."""
    if seconds < 90:
        return f"{max(round(seconds), 1)} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


class WallEstimate:
    """Call `observe(step)` after every step; it returns the estimate line once, after `window` timed steps
    (and only when steps are left to estimate), else None."""

    def __init__(self, start: int, total: int, window: int = WINDOW) -> None:
        self.first = start + 1  # timing starts when this step has finished
        self.total = total
        self.window = max(int(window), 1)
        self.t_first: float | None = None
        self.done = total <= start + 1 + self.window  # too short a run to be worth an estimate

    def observe(self, step: int, now: float | None = None) -> str | None:
        if self.done:
            return None
        t = time.perf_counter() if now is None else now
        if step == self.first:
            self.t_first = t
            return None
        if self.t_first is None or step < self.first + self.window:
            return None
        self.done = True
        per_step = (t - self.t_first) / (step - self.first)
        left = self.total - step
        return (f"estimate: about {format_seconds(per_step * self.total)} for {self.total} steps "
                f"({per_step:.3g} s/step over steps {self.first + 1}-{step}; {format_seconds(per_step * left)} left, "
                "validation not included)")
