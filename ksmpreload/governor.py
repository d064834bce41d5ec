"""ksmpreload governor: ksmd's scan rate from what is left to gain (docs/GOVERNOR.md).

Each tick samples KSM's counters, ksmd's CPU time and the anonymous memory of the processes
that use KSM, and decides between two modes:

- catch-up: there is memory ksmd has not looked at yet (a new process, an attach, a load: the
  anonymous pages of the processes using KSM beyond its rmap items), or the last full scan
  still merged GAIN_FRACTION of their pages: one full scan over them in --target-seconds;
- settled: neither, for SETTLED_SCANS full scans in a row: one full scan in IDLE_FACTOR times
  that, a trickle that still finds what changes slowly;

both capped so that ksmd's CPU time stays under --max-cpu percent of one core (the cost of a
page measured from ksmd's own CPU time and pages_scanned, and the rate cut again whenever a
tick measures more). decide() is the policy, without side effects; Governor applies it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from . import kernel
from .errors import KsmError

STATE_DIR = "/run/ksmpreload"
STATE_FILE = os.path.join(STATE_DIR, "governor.json")
LOCK_FILE = os.path.join(STATE_DIR, "governor.lock")
PIN_FILE = "/etc/ksmpreload/governor.pin"
GOVERNED_KNOBS = ("run", "pages_to_scan", "sleep_millisecs")
GAIN_FRACTION = 0.005  # a full scan that merged less than this share of the pages gained nothing
GAIN_PAGES = 64  # ... or fewer pages than this (a few pages flutter in any busy process)
SETTLED_SCANS = 2
IDLE_FACTOR = 20
MIN_PAGES_PER_SECOND = 50.0
BASE_SLEEP_MS = 20  # ksmd's default; a slower rate sleeps longer rather than scanning < 1 page
MIN_SLEEP_MS, MAX_SLEEP_MS = 10, 2000
DEFAULT_PAGE_COST = 1e-6  # CPU seconds a page, until ksmd has been measured (about 0.5e-6 here)
COST_TICKS = 10
CAP_MARGIN = 0.8


@dataclass
class Settings:
    max_cpu: float = 10.0  # percent of one core
    target_seconds: float = 60.0
    tick: float = 2.0


@dataclass
class Sample:
    time: float
    run: int
    full_scans: int
    pages_scanned: int | None  # None where the kernel lacks the counter
    saved_pages: int
    rmap_items: int
    anonymous_pages: int  # of the processes that use KSM
    processes: int
    ksmd_cpu: float | None
    rate: float = 0.0  # pages a second ksmd is set to scan: pages_to_scan / sleep_millisecs


@dataclass
class Decision:
    mode: str  # catch-up, settled, nothing (no process uses KSM)
    pages_per_second: float
    pages_to_scan: int
    sleep_millisecs: int
    reasons: list[str] = field(default_factory=list)


def _anonymous_pages(pid: int) -> int:
    status = kernel.read_proc(pid, "status") or ""
    for line in status.splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024 // kernel.page_size()
    return 0


def take_sample() -> Sample:
    knobs = kernel.read_knobs()
    processes = kernel.ksm_processes()
    ksmd = kernel.ksmd_pid()
    return Sample(
        time=time.monotonic(),
        run=knobs.get("run", 0),
        full_scans=knobs.get("full_scans", 0),
        pages_scanned=knobs.get("pages_scanned"),
        saved_pages=kernel.pages_saved(knobs),
        rmap_items=sum(process.get("ksm_rmap_items", 0) for process in processes),
        anonymous_pages=sum(_anonymous_pages(process["pid"]) for process in processes),
        processes=len(processes),
        ksmd_cpu=kernel.cpu_seconds(ksmd) if ksmd else None,
        rate=knobs.get("pages_to_scan", 0) * 1000 / max(knobs.get("sleep_millisecs", 1), 1),
    )


@dataclass
class Tracker:
    """What the samples tell across ticks: each full scan's gain, and ksmd's CPU share and the
    CPU a page costs it over the last COST_TICKS ticks (its CPU time moves in 10 ms clock ticks:
    one tick's share would be too coarse)."""

    previous: Sample | None = None
    saved_at_scan: int | None = None  # saved pages when the last full scan ended
    scan_gains: deque = field(default_factory=lambda: deque(maxlen=SETTLED_SCANS))
    recent: deque = field(default_factory=lambda: deque(maxlen=COST_TICKS))  # (cpu, scanned, seconds) a tick
    page_cost: float = DEFAULT_PAGE_COST
    cpu_share: float = 0.0  # of one core
    merged_per_cpu_second: float | None = None

    def update(self, now: Sample) -> None:
        before, self.previous = self.previous, now
        if before is None:
            self.saved_at_scan = now.saved_pages
            return
        if None not in (now.ksmd_cpu, before.ksmd_cpu, now.pages_scanned, before.pages_scanned):
            cpu = now.ksmd_cpu - before.ksmd_cpu
            self.recent.append((cpu, now.pages_scanned - before.pages_scanned, max(now.time - before.time, 1e-3)))
            self._measure()
            if cpu > 0.01:
                self.merged_per_cpu_second = (now.saved_pages - before.saved_pages) / cpu
        if now.full_scans > before.full_scans:
            self.scan_gains.append(now.saved_pages - self.saved_at_scan)
            self.saved_at_scan = now.saved_pages

    def _measure(self) -> None:
        cpu, scanned, seconds = (sum(values) for values in zip(*self.recent))
        self.cpu_share = cpu / seconds
        if cpu >= 0.05 and scanned >= 10_000:
            self.page_cost = cpu / scanned


def knob_values(pages_per_second: float) -> tuple[int, int]:
    """(pages_to_scan, sleep_millisecs) that scan about `pages_per_second`: ksmd's default sleep
    of 20 ms, longer where that would scan less than a page a wake-up."""
    pages = max(1, round(pages_per_second * BASE_SLEEP_MS / 1000))
    sleep = round(1000 * pages / pages_per_second)
    return pages, min(max(sleep, MIN_SLEEP_MS), MAX_SLEEP_MS)


def _gaining(now: Sample, tracker: Tracker) -> tuple[bool, str]:
    threshold = max(GAIN_PAGES, GAIN_FRACTION * now.anonymous_pages)
    if len(tracker.scan_gains) < SETTLED_SCANS:
        return True, f"fewer than {SETTLED_SCANS} full scans measured yet"
    if max(tracker.scan_gains) >= threshold:
        return True, f"the last full scans merged {max(tracker.scan_gains)} pages (>= {threshold:.0f})"
    return False, f"the last {SETTLED_SCANS} full scans merged fewer than {threshold:.0f} pages each"


def decide(now: Sample, tracker: Tracker, settings: Settings) -> Decision:
    """The scan rate for the state `now` and what the tracker has seen; no side effects."""
    if not now.anonymous_pages:
        rate, mode, reasons = MIN_PAGES_PER_SECOND, "nothing", ["no process uses KSM: nothing to scan"]
    else:
        backlog = max(now.anonymous_pages - now.rmap_items, 0)
        gaining, why = _gaining(now, tracker)
        if backlog > max(GAIN_PAGES, GAIN_FRACTION * now.anonymous_pages):
            mode, reasons = "catch-up", [f"{backlog} pages of KSM processes not looked at yet"]
        elif gaining:
            mode, reasons = "catch-up", [why]
        else:
            mode, reasons = "settled", [why]
        seconds = settings.target_seconds * (1 if mode == "catch-up" else IDLE_FACTOR)
        rate = max(now.anonymous_pages / seconds, MIN_PAGES_PER_SECOND)
        reasons.append(f"a full scan of {now.anonymous_pages} pages in {seconds:g} s")
    rate, capped = _capped(rate, tracker, settings)
    reasons += capped
    pages, sleep = knob_values(rate)
    return Decision(mode, round(rate, 1), pages, sleep, reasons)


def _capped(rate: float, tracker: Tracker, settings: Settings) -> tuple[float, list[str]]:
    """The rate under the CPU cap, by the measured cost of a page, aiming CAP_MARGIN below it
    (a page's cost varies with what ksmd finds: merging costs more than a checksum), and cut in
    proportion from the rate set now while ksmd was measured above the cap."""
    cap = CAP_MARGIN * settings.max_cpu / 100
    allowed = cap / tracker.page_cost
    if tracker.cpu_share > settings.max_cpu / 100 and tracker.previous and tracker.previous.rate:
        allowed = min(allowed, tracker.previous.rate * cap / tracker.cpu_share)  # over it: cut in proportion
    if rate <= allowed:
        return rate, []
    return max(allowed, 1.0), [
        f"capped at {settings.max_cpu:g}% of a core ({tracker.page_cost * 1e6:.2f} us a page; "
        f"ksmd used {100 * tracker.cpu_share:.1f}% lately)"
    ]


# ---- the running governor --------------------------------------------------------------------


def _lock() -> int:
    """The machine's one governor lock (a file lock, released when the process ends)."""
    os.makedirs(STATE_DIR, mode=0o700, exist_ok=True)
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise KsmError(f"another governor runs (pid {holder}); one per machine") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def write_state(state: dict) -> None:
    with tempfile.NamedTemporaryFile("w", dir=STATE_DIR, prefix=".governor-", delete=False) as temporary:
        json.dump(state, temporary)
    os.replace(temporary.name, STATE_FILE)


def read_state() -> dict | None:
    """The running governor's last decision (its state file), or None when none runs."""
    try:
        with open(STATE_FILE) as file:
            state = json.load(file)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and kernel.process_alive(int(state.get("pid", 0))) else None


class Governor:
    """Sets ksmd's knobs from decide() every tick; every knob it changed is put back when it
    stops (Ctrl-C, SIGTERM through the command's edge). A knob someone else changes meanwhile,
    or the pin file, is left alone: the operator wins."""

    def __init__(self, settings: Settings, pin_file: str = PIN_FILE) -> None:
        self.settings, self.pin_file = settings, pin_file
        self.tracker = Tracker()
        self.original: dict = {}  # knob -> value before the governor first wrote it
        self.written: dict = {}  # knob -> what the governor wrote last
        self.seen: dict = {}  # knob -> its value at the end of the last tick
        self.left_alone: set = set()

    def run(self, ticks: int | None = None) -> None:
        kernel.require_ksm()
        if os.geteuid() != 0:
            raise KsmError("the governor sets KSM's knobs: it needs root (run it with sudo)")
        lock = _lock()
        try:
            self._stop_advisor()
            count = 0
            while ticks is None or count < ticks:
                self.tick()
                count += 1
                time.sleep(self.settings.tick)
        finally:
            self.restore()
            with contextlib.suppress(OSError):
                os.unlink(STATE_FILE)
            os.close(lock)

    def _stop_advisor(self) -> None:
        """The kernel's advisor (6.8+) sets pages_to_scan itself: off while the governor runs."""
        if kernel.read_knob("advisor_mode") not in (None, "none"):
            self._write("advisor_mode", "none")

    def tick(self) -> Decision:
        now = take_sample()
        self.tracker.update(now)
        decision = decide(now, self.tracker, self.settings)
        pinned = self._pinned()
        if pinned:
            decision.reasons.insert(0, pinned)
        else:
            self._apply(decision, now)
        write_state(self._state(decision, now, bool(pinned)))
        return decision

    def _pinned(self) -> str | None:
        with contextlib.suppress(OSError):
            info = os.stat(self.pin_file)
            if info.st_uid == 0:
                return f"pinned by {self.pin_file}: the knobs are left as they are"
        return None

    def _apply(self, decision: Decision, now: Sample) -> None:
        wanted = {
            "run": 1 if now.anonymous_pages else None,  # on when mergeable memory appears; never off
            "pages_to_scan": decision.pages_to_scan,
            "sleep_millisecs": decision.sleep_millisecs,
        }
        for name, value in wanted.items():
            current = kernel.read_knob(name)
            if name in self.seen and current != self.seen[name]:
                self.left_alone.add(name)  # changed by someone else since the last tick: theirs
            if name not in self.left_alone and value is not None and current != value:
                self._write(name, value)
                current = value
            self.seen[name] = current

    def _write(self, name: str, value) -> None:
        previous = kernel.write_knob(name, value)
        self.original.setdefault(name, previous)
        self.written[name] = value

    def restore(self) -> None:
        """Every knob the governor changed back as it was, unless someone else changed it since."""
        for name in (*GOVERNED_KNOBS, "advisor_mode"):  # the advisor last: pages_to_scan is read-only under it
            if name in self.original and name not in self.left_alone:
                with contextlib.suppress(KsmError):
                    if kernel.read_knob(name) == self.written.get(name):
                        kernel.write_knob(name, self.original[name])

    def _state(self, decision: Decision, now: Sample, pinned: bool) -> dict:
        return {
            "pid": os.getpid(),
            "time": time.time(),
            "pinned": pinned,
            "left_alone": sorted(self.left_alone),
            "decision": asdict(decision),
            "ksmd_cpu_seconds": now.ksmd_cpu,
            "ksmd_cpu_percent": round(100 * self.tracker.cpu_share, 2),
            "merged_per_cpu_second": self.tracker.merged_per_cpu_second,
            "unscanned_bytes": max(now.anonymous_pages - now.rmap_items, 0) * kernel.page_size(),
            "settings": asdict(self.settings),
        }


def decide_once(settings: Settings, seconds: float = 1.0) -> tuple[Decision, Tracker]:
    """What the governor would decide now, from two samples `seconds` apart; changes nothing."""
    tracker = Tracker()
    tracker.update(take_sample())
    time.sleep(seconds)
    now = take_sample()
    tracker.update(now)
    return decide(now, tracker, settings), tracker
