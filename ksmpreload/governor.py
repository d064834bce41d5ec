"""ksmpreload governor: ksmd's scan rate from what is left to gain (docs/GOVERNOR.md).

Each tick samples KSM's counters, ksmd's CPU time and the anonymous memory of the processes
that use KSM, and decides between two modes:

- catch-up: there is memory ksmd has not looked at yet (a new process, an attach, a load: the
  anonymous pages of the processes using KSM beyond its rmap items), or the last full scan
  still merged GAIN_FRACTION of their pages: one full scan over them in --target-seconds;
- settled: neither, for SETTLED_SCANS full scans in a row: one full scan in --settled-seconds,
  a trickle that still finds what changes slowly (growth is seen without it, as unseen memory);

both capped so that ksmd's CPU time stays under --max-cpu percent of one core (the cost of a
page measured from ksmd's own CPU time and pages_scanned, and the rate cut again whenever a
tick measures more). decide() is the policy, without side effects; Governor applies it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import stat
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from . import kernel
from .errors import KsmError
from .idle import IdleUnmarker

STATE_DIR = "/run/ksmpreload"
STATE_FILE = os.path.join(STATE_DIR, "governor.json")
LOCK_FILE = os.path.join(STATE_DIR, "governor.lock")
ORIGINALS_FILE = os.path.join(STATE_DIR, "governor-originals.json")  # what to put back, kept before each write
PIN_FILE = "/etc/ksmpreload/governor.pin"
GOVERNED_KNOBS = ("run", "pages_to_scan", "sleep_millisecs")
RATE_KNOBS = {"pages_to_scan", "sleep_millisecs"}
GAIN_FRACTION = 0.005  # a full scan that merged less than this share of the pages gained nothing
GAIN_PAGES = 64  # ... or fewer pages than this (a few pages flutter in any busy process)
SETTLED_SCANS = 2
MIN_PAGES_PER_SECOND = 50.0
BASE_SLEEP_MS = 20  # ksmd's default; a slower rate sleeps longer rather than scanning < 1 page
MIN_SLEEP_MS, MAX_SLEEP_MS = 10, 2000
DEFAULT_PAGE_COST = 1e-6  # CPU seconds a page, until ksmd has been measured (about 0.5e-6 here)
COST_TICKS = 10
CAP_MARGIN = 0.8


@dataclass
class Settings:
    max_cpu: float = 10.0  # percent of one core
    target_seconds: float = 2.0  # a full scan while there is something to gain (a scan's CPU is the same at any speed)
    settled_seconds: float = 600.0  # a full scan once there is not
    unmark_idle_seconds: float | None = None  # --unmark-idle: merging off where KSM found nothing this long
    tick: float = 2.0


@dataclass
class Sample:
    time: float
    run: int
    full_scans: int
    pages_scanned: int | None  # None where the kernel lacks the counter
    saved_pages: int
    rmap_items: int
    anonymous_pages: int  # that ksmd may scan, of the processes that use KSM (_mergeable_pages)
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


def _mergeable_pages(process: dict) -> int:
    """The pages of a process ksmd may scan: all its anonymous memory when it merges as a whole
    (prctl), else what ksmd tracks already (madvise marks regions the governor does not read)."""
    return _anonymous_pages(process["pid"]) if process.get("ksm_merge_any") else process.get("ksm_rmap_items", 0)


def take_sample(processes: list[dict] | None = None) -> Sample:
    knobs = kernel.read_knobs()
    processes = kernel.ksm_processes() if processes is None else processes
    ksmd = kernel.ksmd_pid()
    return Sample(
        time=time.monotonic(),
        run=knobs.get("run", 0),
        full_scans=knobs.get("full_scans", 0),
        pages_scanned=knobs.get("pages_scanned"),
        saved_pages=kernel.pages_saved(knobs),
        rmap_items=sum(process.get("ksm_rmap_items", 0) for process in processes),
        anonymous_pages=sum(_mergeable_pages(process) for process in processes),
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
    rmap_at_scan: int = 0  # ksmd's rmap items then
    scan_gains: deque = field(default_factory=lambda: deque(maxlen=SETTLED_SCANS))
    recent: deque = field(default_factory=lambda: deque(maxlen=COST_TICKS))  # (cpu, scanned, seconds, rate) a tick
    page_cost: float = DEFAULT_PAGE_COST
    cpu_share: float = 0.0  # of one core
    merged_per_cpu_second: float | None = None

    def steady_at(self, rate: float) -> bool:
        """Every tick of the window ran at `rate`: its CPU share is that rate's."""
        return len(self.recent) == self.recent.maxlen and all(entry[3] == rate for entry in self.recent)

    def update(self, now: Sample) -> None:
        before, self.previous = self.previous, now
        if before is None:
            self.saved_at_scan, self.rmap_at_scan = now.saved_pages, now.rmap_items
            return
        if None not in (now.ksmd_cpu, before.ksmd_cpu):
            cpu, seconds = now.ksmd_cpu - before.ksmd_cpu, max(now.time - before.time, 1e-3)
            if None in (now.pages_scanned, before.pages_scanned):  # before 6.7: the rate it was set to
                scanned = before.rate * seconds
            else:
                scanned = now.pages_scanned - before.pages_scanned
            self.recent.append((cpu, scanned, seconds, before.rate))
            self._measure()
            if cpu > 0.01:
                self.merged_per_cpu_second = (now.saved_pages - before.saved_pages) / cpu
        taken_up = _more_than_a_flutter(now.rmap_items - self.rmap_at_scan, now)  # since the last full scan ended
        if now.full_scans > before.full_scans:
            self.scan_gains.append(now.saved_pages - self.saved_at_scan)
            self.saved_at_scan, self.rmap_at_scan = now.saved_pages, now.rmap_items
        if unseen_pages(now) or taken_up:
            self.scan_gains.clear()  # new memory: ksmd's first pass over it only takes checksums, merges come after

    def _measure(self) -> None:
        cpu, scanned, seconds, _ = (sum(values) for values in zip(*self.recent))
        self.cpu_share = cpu / seconds
        if cpu >= 0.05 and scanned >= 10_000:
            self.page_cost = cpu / scanned


def knob_values(pages_per_second: float) -> tuple[int, int]:
    """(pages_to_scan, sleep_millisecs) that scan about `pages_per_second`: ksmd's default sleep
    of 20 ms, longer where that would scan less than a page a wake-up."""
    pages = max(1, round(pages_per_second * BASE_SLEEP_MS / 1000))
    sleep = round(1000 * pages / pages_per_second)
    return pages, min(max(sleep, MIN_SLEEP_MS), MAX_SLEEP_MS)


def unscanned_pages(now: Sample) -> int:
    """The pages of KSM processes ksmd has no rmap item for yet."""
    return max(now.anonymous_pages - now.rmap_items, 0)


def _more_than_a_flutter(pages: int, now: Sample) -> bool:
    return pages > max(GAIN_PAGES, GAIN_FRACTION * now.anonymous_pages)


def unseen_pages(now: Sample) -> int:
    """unscanned_pages when more than a flutter (a few pages come and go in any busy process), else 0."""
    return unscanned_pages(now) if _more_than_a_flutter(unscanned_pages(now), now) else 0


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
        backlog = unseen_pages(now)
        gaining, why = _gaining(now, tracker)
        if backlog:
            mode, reasons = "catch-up", [f"{backlog} pages of KSM processes not looked at yet"]
        elif gaining:
            mode, reasons = "catch-up", [why]
        else:
            mode, reasons = "settled", [why]
        seconds = settings.target_seconds if mode == "catch-up" else settings.settled_seconds
        rate = max(now.anonymous_pages / seconds, MIN_PAGES_PER_SECOND)
        reasons.append(f"a full scan of {now.anonymous_pages} pages in {seconds:g} s")
    rate, capped = _capped(rate, tracker, settings)
    reasons += capped
    pages, sleep = knob_values(rate)
    return Decision(mode, round(rate, 1), pages, sleep, reasons)


def _capped(rate: float, tracker: Tracker, settings: Settings) -> tuple[float, list[str]]:
    """The rate under the CPU cap, by the measured cost of a page, aiming CAP_MARGIN below it
    (a page's cost varies with what ksmd finds: merging costs more than a checksum), and cut in
    proportion from the rate set now when a whole window at that rate measured ksmd above it."""
    cap = CAP_MARGIN * settings.max_cpu / 100
    allowed = cap / tracker.page_cost
    previous = tracker.previous.rate if tracker.previous else 0
    if tracker.cpu_share > settings.max_cpu / 100 and previous and tracker.steady_at(previous):
        allowed = min(allowed, previous * cap / tracker.cpu_share)  # over it at this rate: cut in proportion
    if rate <= allowed:
        return rate, []
    return max(allowed, 1.0), [
        f"capped at {settings.max_cpu:g}% of a core ({tracker.page_cost * 1e6:.2f} us a page; "
        f"ksmd used {100 * tracker.cpu_share:.1f}% lately)"
    ]


# ---- the running governor --------------------------------------------------------------------


def _lock() -> int:
    """The machine's one governor lock (a file lock, released when the process ends)."""
    try:
        os.makedirs(STATE_DIR, mode=0o700, exist_ok=True)
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    except OSError as error:
        raise KsmError(f"cannot open the governor's lock {LOCK_FILE}: {error.strerror or error}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise KsmError(f"{LOCK_FILE} is not a regular file: remove it")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise KsmError(f"another governor runs (pid {holder}); one per machine") from None
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    except OSError as error:
        os.close(fd)
        raise KsmError(f"cannot write the governor's lock {LOCK_FILE}: {error.strerror or error}") from None
    return fd


def _write_json(path: str, data: dict) -> None:
    """`data` into `path` whole or not at all (a full /run leaves no half file); KsmError if not."""
    temporary = None
    try:
        with tempfile.NamedTemporaryFile(
            "w", dir=os.path.dirname(path), prefix=".governor-", delete=False
        ) as temporary:
            json.dump(data, temporary)
        os.replace(temporary.name, path)
    except OSError as error:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary.name)
        raise KsmError(f"cannot write {path}: {error.strerror or error}") from None


def write_state(state: dict) -> None:
    _write_json(STATE_FILE, state)


def _valid_state(state) -> bool:
    decision = state.get("decision") if isinstance(state, dict) else None
    return (
        type(state.get("pid")) is int
        and isinstance(state.get("pinned"), bool)
        and isinstance(decision, dict)
        and isinstance(decision.get("mode"), str)
        and isinstance(decision.get("pages_per_second"), (int, float))
        and isinstance(decision.get("reasons"), list)
        and bool(decision["reasons"])
    )


def _lock_held() -> bool | None:
    """Whether a governor holds the lock (None: the lock cannot be opened, without root)."""
    try:
        fd = os.open(LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def state_known() -> bool:
    """Whether this user can tell if a governor runs (its lock is root's, in a root-only directory)."""
    return _lock_held() is not None


STATE_UNKNOWN_NOTE = "whether a governor runs is not known: its state is root's to read"


def read_state() -> dict | None:
    """The running governor's last decision (its state file), or None when none runs (or the
    file is not one it wrote)."""
    try:
        with open(STATE_FILE) as file:
            state = json.load(file)
    except (OSError, ValueError):
        return None
    if not _valid_state(state) or _lock_held() is False:
        return None
    return state if kernel.process_alive(state["pid"]) else None


class Governor:
    """Sets ksmd's knobs from decide() every tick; every knob it changed is put back when it
    stops (Ctrl-C, SIGTERM through the command's edge), or by the next governor if it was
    killed (ORIGINALS_FILE). A knob someone else changes meanwhile, or the pin file, is left
    alone: the operator wins. pages_to_scan and sleep_millisecs are one rate: a change to
    either hands both over; a change to advisor_mode hands over the rate too."""

    def __init__(self, settings: Settings, pin_file: str = PIN_FILE, say=lambda line: None) -> None:
        self.settings, self.pin_file, self.say = settings, pin_file, say
        self.tracker = Tracker()
        self.unmarker = IdleUnmarker(settings.unmark_idle_seconds) if settings.unmark_idle_seconds else None
        self.original: dict = {}  # knob -> value before the governor first wrote it
        self.written: dict = {}  # knob -> what the governor wrote last
        self.seen: dict = {}  # knob -> its value at the end of the last tick
        self.left_alone: set = set()

    def run(self, ticks: int | None = None) -> None:
        kernel.require_ksm()
        if os.geteuid() != 0:
            raise KsmError("the governor sets KSM's knobs: it needs root (run it with sudo)")
        if self.unmarker and not kernel.kernel_features()["prctl_merge"]:
            raise KsmError("--unmark-idle needs ksm_merging_pages in /proc/PID/ksm_stat (kernel 6.4 or newer)")
        lock = _lock()
        try:
            if self._pin()[0]:
                _drop_left_over()  # pinned: the knobs are the operator's, also those a killed governor left
            else:
                restore_left_over()
            self.say(
                f"ksmpreload governor: every {self.settings.tick:g} s, at most {self.settings.max_cpu:g}% of a core "
                "(Ctrl-C to stop)"
            )
            count = 0
            while ticks is None or count < ticks:
                self.tick()
                count += 1
                time.sleep(self.settings.tick)
        finally:
            self._clean_up(lock)

    def _clean_up(self, lock: int) -> None:
        """Knobs back (unless pinned: then they are the operator's), state gone, lock released; a
        second Ctrl-C waits until it is done."""
        previous = None
        with contextlib.suppress(ValueError):  # not in the main thread: no handler to change
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if not self._pin()[0]:
                self.restore()
            for path in (STATE_FILE, ORIGINALS_FILE):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            os.close(lock)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def tick(self) -> Decision:
        processes = kernel.ksm_processes()
        now = take_sample(processes)
        self.tracker.update(now)
        decision = decide(now, self.tracker, self.settings)
        pinned, why = self._pin()
        if why:
            decision.reasons.insert(0, why)
        if not pinned:
            self._apply(decision, now)
            if self.unmarker:
                for result in self.unmarker.tick(processes, now.full_scans, now.time):
                    self.say(unmark_line(result))
        elif self.unmarker:
            self.unmarker.watching.clear()  # pinned: the idle clocks start again once it is not
        write_state(self._state(decision, now, pinned))
        return decision

    def _pin(self) -> tuple[bool, str | None]:
        """(whether the pin file holds the knobs, a reason to show): a regular file owned by root
        in a directory only root may write; any other file there is ignored, and said so."""
        try:
            info = os.lstat(self.pin_file)
            parent = os.stat(os.path.dirname(os.path.abspath(self.pin_file)))
        except OSError:
            return False, None
        if stat.S_ISREG(info.st_mode) and info.st_uid == 0 and parent.st_uid == 0 and not parent.st_mode & 0o022:
            return True, f"pinned by {self.pin_file}: the knobs are left as they are"
        return False, f"{self.pin_file} ignored: not a regular file of root's in a directory only root may write"

    def _apply(self, decision: Decision, now: Sample) -> None:
        current = {name: kernel.read_knob(name) for name in (*GOVERNED_KNOBS, "advisor_mode")}
        changed = {name for name, value in self.seen.items() if current[name] != value}
        if changed & (RATE_KNOBS | {"advisor_mode"}):
            self.left_alone |= RATE_KNOBS | {"advisor_mode"}  # someone else sets the rate now
        self.left_alone |= changed
        wanted = {
            "advisor_mode": "none" if current["advisor_mode"] not in (None, "none") else None,
            "run": 1 if now.anonymous_pages and current["run"] == 0 else None,  # 2 (unmerging) is theirs
            "pages_to_scan": decision.pages_to_scan,
            "sleep_millisecs": decision.sleep_millisecs,
        }
        for name, value in wanted.items():
            if name not in self.left_alone and value is not None and current[name] != value:
                self._write(name, value)
                current[name] = value
        self.seen = current

    def _write(self, name: str, value) -> None:
        """Writes one knob, the value it had first kept in ORIGINALS_FILE before the write."""
        original = {name: kernel.read_knob(name), **self.original}  # the value before its first write
        written = {**self.written, name: value}
        _save_originals(original, written)  # KsmError (a full /run): nothing written, nothing recorded
        self.original, self.written = original, written
        try:
            kernel.write_knob(name, value)
        except KsmError:
            self.left_alone |= RATE_KNOBS if name in RATE_KNOBS else {name}  # refused: not ours to set

    def restore(self) -> None:
        """Every knob the governor changed back as it was, unless someone else changed it since."""
        _restore(self.original, self.written, self.left_alone)

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
            "unscanned_bytes": unscanned_pages(now) * kernel.page_size(),
            "settings": asdict(self.settings),
            "unmarked": self.unmarker.results if self.unmarker else [],
            "unmarked_total": self.unmarker.unmarked if self.unmarker else 0,
        }


def unmark_line(result: dict) -> str:
    """One line for an --unmark-idle result."""
    what = (
        f"{result['pid']} ({result['comm']}): {result['rmap_items']} pages looked at, {result['merged_pages']} merged"
    )
    seen = f"over {result['idle_seconds']} s and {result['full_scans']} full scans"
    if not result["unmarked"]:
        return f"left merging in {what} {seen}: {result['why']}"
    also = f"; {result['why']}" if result.get("why") else ""
    return f"merging turned off in {what} {seen} (ksmpreload attach {result['pid']} turns it on again){also}"


def _restore(original: dict, written: dict, left_alone=frozenset()) -> None:
    for name in (*GOVERNED_KNOBS, "advisor_mode"):  # the advisor last: pages_to_scan is read-only under it
        if name not in original or name in left_alone or (name == "run" and original[name] == 2):
            continue
        with contextlib.suppress(KsmError, OSError):
            if kernel.read_knob(name) == written.get(name):
                kernel.write_knob(name, original[name])


def _save_originals(original: dict, written: dict) -> None:
    _write_json(ORIGINALS_FILE, {"original": original, "written": written})


def restore_left_over() -> None:
    """The knobs a governor that was killed (SIGKILL, the OOM killer) had changed, put back
    where they still hold what it wrote; called with the lock held."""
    try:
        with open(os.open(ORIGINALS_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)) as file:
            info = os.fstat(file.fileno())
            left = json.load(file) if stat.S_ISREG(info.st_mode) and info.st_uid == 0 else None
        original, written = dict(left["original"]), dict(left["written"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError):  # none, or not one a governor wrote
        original = written = None
    if original is not None:
        _restore(original, written)
    _drop_left_over()


def _drop_left_over() -> None:
    with contextlib.suppress(OSError):
        os.unlink(ORIGINALS_FILE)


def decide_once(settings: Settings, seconds: float = 1.0) -> tuple[Decision, Tracker]:
    """What a governor starting now would decide, from two samples `seconds` apart (no full
    scan measured yet); changes nothing."""
    kernel.require_ksm()
    tracker = Tracker()
    tracker.update(take_sample())
    time.sleep(seconds)
    now = take_sample()
    tracker.update(now)
    return decide(now, tracker, settings), tracker
