"""Running KSM for a measurement: a fast scan rate for a while, every knob put back after,
and waiting for ksmd to pass over memory a given number of times."""
import contextlib
import time

from . import kernel
from .errors import KsmError

FAST_PAGES_TO_SCAN = 5000
FAST_SLEEP_MS = 10
SAVED_KNOBS = ("pages_to_scan", "sleep_millisecs", "use_zero_pages", "run")  # run last


@contextlib.contextmanager
def fast_scanning(pages_to_scan=FAST_PAGES_TO_SCAN, sleep_ms=FAST_SLEEP_MS):
    """KSM on at a fast rate inside the block; SAVED_KNOBS (and advisor_mode, which must be
    none to set the rate) are restored after, whatever the block changed."""
    kernel.require_ksm()
    saved = kernel.read_knobs()
    advisor = saved.get("advisor_mode", "none")
    if advisor != "none":
        kernel.write_knob("advisor_mode", "none")
    kernel.write_knob("pages_to_scan", pages_to_scan)
    kernel.write_knob("sleep_millisecs", sleep_ms)
    kernel.write_knob("run", 1)
    try:
        yield
    finally:
        for name in SAVED_KNOBS:
            if kernel.read_knob(name) != saved[name]:
                kernel.write_knob(name, saved[name])
        if advisor != "none":
            kernel.write_knob("advisor_mode", advisor)


def full_scans():
    return kernel.read_knob("full_scans")


def wait_full_scans(count, timeout=120.0, on_progress=None, poll=0.1):
    """Wait until ksmd has finished `count` more full scans; on_progress(done, count) each poll."""
    start = full_scans()
    deadline = time.monotonic() + timeout
    while (done := full_scans() - start) < count:
        if on_progress:
            on_progress(done, count)
        if time.monotonic() > deadline:
            raise KsmError(f"ksmd finished {done} of {count} full scans in {timeout:.0f} s; "
                           "is KSM running and pages_to_scan high enough?")
        time.sleep(poll)
    if on_progress:
        on_progress(count, count)
