"""Where the time of a long read goes: seconds per named step (sharing and potential)."""

import time


class StepClock:
    """Seconds per step into a dict, when one is given."""

    def __init__(self, timings):
        self.timings, self.last = timings, time.perf_counter()

    def step(self, name):
        if self.timings is not None:
            now = time.perf_counter()
            self.timings[name] = self.timings.get(name, 0.0) + now - self.last
            self.last = now
