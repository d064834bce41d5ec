"""Where the time of a long read goes: seconds per named step (sharing and potential)."""

from __future__ import annotations

import time


class StepClock:
    """Seconds per step into a dict, when one is given."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings, self.last = timings, time.perf_counter()

    def step(self, name: str) -> None:
        if self.timings is not None:
            now = time.perf_counter()
            self.timings[name] = self.timings.get(name, 0.0) + now - self.last
            self.last = now
