"""Running KSM for a measurement: a fast scan rate for a while, every knob put back after,
and waiting for ksmd to pass over memory a given number of times."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from . import kernel
from .errors import KsmError

FAST_PAGES_TO_SCAN = 5000
FAST_SLEEP_MS = 10
SAVED_KNOBS = ("pages_to_scan", "sleep_millisecs", "use_zero_pages", "smart_scan", "run")  # run last


@contextlib.contextmanager
def fast_scanning(pages_to_scan: int = FAST_PAGES_TO_SCAN, sleep_ms: int = FAST_SLEEP_MS) -> Iterator[None]:
    """KSM on at a fast rate, smart_scan off, inside the block; SAVED_KNOBS (and advisor_mode,
    which must be none to set the rate) are restored after, whatever the block changed."""
    kernel.require_ksm()
    saved = kernel.read_knobs()
    advisor = saved.get("advisor_mode", "none")
    if advisor != "none":
        kernel.write_knob("advisor_mode", "none")
    kernel.write_knob("pages_to_scan", pages_to_scan)
    kernel.write_knob("sleep_millisecs", sleep_ms)
    if saved.get("smart_scan") is not None:
        # smart_scan can leave mergeable pages unseen for hundreds of scans (seen here with
        # two identical workers stuck at 1,213 of 4,096 pages): a measurement wants every look.
        kernel.write_knob("smart_scan", 0)
    kernel.write_knob("run", 1)
    try:
        yield
    finally:
        for name in SAVED_KNOBS:
            if saved.get(name) is not None and kernel.read_knob(name) != saved[name]:
                kernel.write_knob(name, saved[name])
        if advisor != "none":
            kernel.write_knob("advisor_mode", advisor)


def full_scans() -> int:
    return kernel.read_knob("full_scans")


def wait_full_scans(
    count: int, timeout: float = 120.0, on_progress: Callable[[int, int], None] | None = None, poll: float = 0.1
) -> None:
    """Wait until ksmd has finished `count` more full scans; on_progress(done, count) each poll."""
    start = full_scans()
    deadline = time.monotonic() + timeout
    while (done := full_scans() - start) < count:
        if on_progress:
            on_progress(done, count)
        if time.monotonic() > deadline:
            raise KsmError(
                f"ksmd finished {done} of {count} full scans in {timeout:.0f} s; "
                "is KSM running and pages_to_scan high enough?"
            )
        time.sleep(poll)
    if on_progress:
        on_progress(count, count)


# smart_scan (6.7+) looks at a page that has not merged for long only every 8th scan
# (mm/ksm.c skip_age), so merging has settled only after more than 8 scans without change.
SETTLE_SCANS = 9


def wait_until_settled(
    merged_now: Callable[[], int],
    min_scans: int = 3,
    steady_scans: int = SETTLE_SCANS,
    timeout: float = 120.0,
    on_progress: Callable[[int], None] | None = None,
    poll: float = 0.2,
) -> int | None:
    """Wait until merging settles: at least `min_scans` full scans have passed and
    `merged_now()` has not changed for `steady_scans` full scans (or `timeout` passed).
    Pages need two scans with the same checksum before they merge, and smart_scan skips
    pages that did not merge for a growing number of scans, so a fixed count stops short.
    Returns the last value; on_progress(value) is called at each poll."""
    start = full_scans()
    deadline = time.monotonic() + timeout
    last, steady_since = None, start
    while time.monotonic() < deadline:
        value, scans = merged_now(), full_scans()
        if on_progress:
            on_progress(value)
        if value != last:
            last, steady_since = value, scans
        elif scans - start >= min_scans and scans - steady_since >= steady_scans:
            break
        time.sleep(poll)
    return last


def ignoring_flutter(read: Callable[[], int], pages: int = 64, fraction: float = 0.005) -> Callable[[], int]:
    """read(), except that a change of at most `pages` or `fraction` of the value last returned
    returns that value again: a few pages that a program's threads keep writing (memcached's
    clock and counters) merge and break again every scan, and the sum would never settle."""
    last = None

    def value():
        nonlocal last
        now = read()
        if last is None or abs(now - last) > max(pages, fraction * last):
            last = now
        return last

    return value
