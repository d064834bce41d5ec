"""Turn merging on (or off) in a process that is already running: the checks that come first,
the two ways (prctl(PR_SET_MEMORY_MERGE) for the whole process, or madvise(MADV_MERGEABLE) over
its private anonymous regions as they are), run inside it by inject.HeldThread, and a record of
each attach (attached.py) so that detach undoes what attach did (docs/ATTACH.md).

Ctrl-C, SIGTERM and SIGHUP wait while a process is held (signals_deferred): a madvise loop
stops at the next region and unmarks what it marked, the thread is let go with every register
restored, and only then does the signal act.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass

from . import attached, kernel
from .errors import KsmError
from .inject import HeldThread, share_memory, this_architecture

PR_SET_MEMORY_MERGE = 67
MADV_MERGEABLE, MADV_UNMERGEABLE = 12, 13
STRATEGIES = attached.STRATEGIES
DEFAULT_THRESHOLD = 8 << 10  # the shim's: regions smaller than this are left alone by madvise
HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class Attached:
    pid: int
    enabled: bool  # merging on (attach) or off (detach)
    strategy: str
    previous: bool  # merging by this strategy was on before: merge-any (prctl), a record (madvise)
    regions: int  # regions marked or unmarked (madvise; 0 for prctl)
    region_bytes: int
    failed_regions: int  # madvise refused (a region unmapped meanwhile, or no memory to unmerge)
    signals_resent: int  # signals that arrived while the thread was held, sent again
    recorded: bool  # a record was written (attach) or removed (detach)
    note: str = ""  # what the caller should know beyond the counts


# ---- what must hold before anything is touched ------------------------------------------------


def _status(pid: int) -> dict[str, str]:
    try:
        text = kernel.read_proc(pid, "status")
    except PermissionError as error:
        raise kernel.needs_root(error) from None
    if text is None:
        raise KsmError(f"no process {pid}")
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def check_target(pid: int, force: bool = False) -> None:
    """KsmError (one line, exit 1) when the process cannot or should not be attached; nothing is
    touched before this passes."""
    this_architecture()
    status = _status(pid)
    if kernel.thread_group(pid) != pid:
        raise KsmError(f"{pid} is a thread of process {kernel.thread_group(pid)}: attach that process")
    name, state = status.get("Name", "?").strip(), status.get("State", "?").strip()
    if "VmSize" not in status and not state.startswith("Z"):
        raise KsmError(f"{pid} ({name}) is a kernel thread: it has no memory to merge")
    if state.startswith("Z"):
        raise KsmError(f"{pid} ({name}) is a zombie, or its main thread has exited: attach stops that thread")
    if state.startswith("D"):
        raise KsmError(f"{pid} ({name}) waits in the kernel (state D, a vfork parent for one): try again later")
    parent = int(status.get("PPid", "0").strip() or 0)
    if parent > 1 and share_memory(pid, parent):
        raise KsmError(f"{pid} shares its memory with its parent {parent} (a vfork child before exec): try again later")
    tracer = int(status.get("TracerPid", "0").strip() or 0)
    if tracer:
        raise KsmError(f"{pid} is traced already (by {tracer}: a debugger or strace); a process has one tracer")
    if status.get("Seccomp", "0").strip() == "1":
        raise KsmError(f"{pid} runs in seccomp strict mode: any prctl or madvise would kill it")
    if status.get("Seccomp", "0").strip() == "2" and not force:
        raise KsmError(
            f"{pid} runs under a seccomp filter, which could kill it for a system call it does not expect; "
            "--force to attach anyway"
        )
    with contextlib.suppress(OSError), open("/proc/sys/kernel/yama/ptrace_scope") as yama:
        if yama.read().strip() == "3":
            raise KsmError("Yama's ptrace_scope is 3: no process may be traced until reboot")


def choose_strategy(strategy: str | None) -> str:
    """prctl where the kernel has PR_SET_MEMORY_MERGE (6.4+), else madvise; KsmError when the
    one asked for cannot run here."""
    if strategy is None:
        return "prctl" if kernel.prctl_merge_supported() else "madvise"
    if strategy not in STRATEGIES:
        raise KsmError(f"no strategy {strategy!r}: {' or '.join(STRATEGIES)}")
    if strategy == "prctl" and not kernel.prctl_merge_supported():
        raise KsmError("this kernel has no PR_SET_MEMORY_MERGE (6.4 or newer): --strategy madvise")
    return strategy


def unmarked_regions(pid: int, threshold: int) -> list[tuple[int, int]]:
    """(start, end) of each private, writable, anonymous region of at least `threshold` bytes
    not marked mergeable yet: what the madvise way marks."""
    regions = kernel.process_regions(pid)
    if regions is None:
        raise KsmError(f"{pid} is gone")
    return [
        (region["start"], region["end"])
        for region in regions
        if kernel.is_anonymous_vma(region)
        and region["perms"][1] == "w"
        and region["perms"][3] == "p"
        and region["end"] - region["start"] >= threshold
        and not region["mergeable"]
    ]


# ---- signals wait while a process is held -----------------------------------------------------

_noted: list[int] = []  # signals that arrived while deferred
_depth = [0]


def _note(number, frame):
    _noted.append(number)


def interrupted() -> bool:
    """A deferred Ctrl-C, SIGTERM or SIGHUP is waiting."""
    return bool(_noted)


@contextlib.contextmanager
def signals_deferred():
    """Inside the block Ctrl-C, SIGTERM and SIGHUP are only noted (interrupted() says so); at its
    end they act as they would have, through the handlers they had (KeyboardInterrupt, the
    command's Terminated). Nested blocks defer to the outermost; other threads cannot."""
    if _depth[0] or threading.current_thread() is not threading.main_thread():
        yield
        return
    _noted.clear()
    previous = {number: signal.signal(number, _note) for number in HELD_SIGNALS}
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        if _noted:
            number = _noted[0]
            _noted.clear()
            _deliver(number, previous[number])


def _deliver(number: int, handler) -> None:
    if callable(handler):
        handler(number, None)
    elif handler in (signal.SIG_DFL, None):
        os.kill(os.getpid(), number)


class Interrupted(KsmError):
    """A deferred signal stopped a madvise loop; what it marked is unmarked again."""


# ---- attach and detach ----------------------------------------------------------------------


def _merge_any(pid: int) -> bool:
    try:
        return bool((kernel.process_ksm_stat(pid) or {}).get("ksm_merge_any"))
    except PermissionError as error:
        raise kernel.needs_root(error) from None


def _mark(thread: HeldThread, regions: list[tuple[int, int]], keep=frozenset()) -> int:
    """madvise(MADV_MERGEABLE) over each region, inside the held thread; how many it refused.
    Stopped half-way (a deferred Ctrl-C, an error), it unmarks what it marked (but `keep`,
    marked by an earlier attach) before the thread is let go: nothing is left half-changed."""
    marked = []
    try:
        for start, end in regions:
            if interrupted():
                raise Interrupted(f"{thread.pid}: interrupted; the regions this attach marked are unmarked again")
            if thread.call("madvise", start, end - start, MADV_MERGEABLE) == 0:
                marked.append((start, end))
    except BaseException:
        with contextlib.suppress(Exception):
            for start, end in (region for region in marked if region not in keep):
                thread.call("madvise", start, end - start, MADV_UNMERGEABLE)
        raise
    return len(regions) - len(marked)


def _unmark(thread: HeldThread, regions: list[tuple[int, int]]) -> int:
    """madvise(MADV_UNMERGEABLE) over each region; how many it refused."""
    return sum(thread.call("madvise", start, end - start, MADV_UNMERGEABLE) < 0 for start, end in regions)


def _record_first(pid: int, strategy: str, regions: list[tuple[int, int]]) -> bool:
    """The attach's record, written before the process is touched, so that a full disk refuses
    the attach rather than leave marks detach could not find. Without a place for records, only
    a non-root prctl attach goes on (detach --force turns that off)."""
    why_not = attached.why_not_recordable()
    if why_not and (strategy == "madvise" or os.geteuid() == 0):
        raise KsmError(f"cannot record the attach ({why_not}); {pid} is untouched")
    if why_not:
        return False
    try:
        attached.write(pid, strategy, regions)
    except OSError as error:
        raise KsmError(
            f"cannot record the attach in {attached.RECORDS_DIR}: {error.strerror}; {pid} is untouched"
        ) from None
    return True


def _turn_on(pid: int, strategy: str, regions: list[tuple[int, int]], earlier: set) -> tuple[int, int]:
    """(regions madvise refused, signals sent again) once merging is on inside the process."""
    with HeldThread(pid) as thread:
        failed = 0
        if strategy == "prctl":
            if interrupted():
                raise Interrupted(f"{pid}: interrupted before the prctl; nothing changed")
            result = thread.call("prctl", PR_SET_MEMORY_MERGE, 1, 0, 0, 0)
            if result < 0:
                raise KsmError(f"prctl(PR_SET_MEMORY_MERGE, 1) failed in {pid}: {os.strerror(-result)}")
        else:
            failed = _mark(thread, regions, keep=earlier)
    return failed, len(thread.held)


def _plan(pid: int, strategy: str, threshold: int) -> tuple[dict | None, bool, set, list]:
    """(its record, merging on already, regions an earlier attach marked, regions to mark)."""
    record = attached.read(pid)
    if record and record["strategy"] != strategy:
        raise KsmError(f"{pid} was attached with {record['strategy']}: detach it first to change the strategy")
    previous = _merge_any(pid) if strategy == "prctl" else record is not None
    earlier = set(record["regions"]) if record else set()
    regions = sorted(set(unmarked_regions(pid, threshold)) | earlier) if strategy == "madvise" else []
    return record, previous, earlier, regions


def attach(pid: int, strategy: str | None = None, threshold: int = DEFAULT_THRESHOLD, force: bool = False) -> Attached:
    """Merging on in the running process `pid`: prctl(PR_SET_MEMORY_MERGE, 1), or
    madvise(MADV_MERGEABLE) over its unmarked anonymous regions of `threshold` bytes or more.
    The process is left as it was, and running, whatever happens; KsmError says why not."""
    strategy = choose_strategy(strategy)
    check_target(pid, force)
    record, previous, earlier, regions = _plan(pid, strategy, threshold)
    if strategy == "prctl" and previous and not record:
        note = "its merging was on already (its own prctl, or its service's MemoryKSM): left as it is, not recorded"
        return Attached(pid, True, strategy, True, 0, 0, 0, 0, False, note)
    with signals_deferred():
        recorded = _record_first(pid, strategy, regions)
        try:
            failed, resent = _turn_on(pid, strategy, regions, earlier)
        except BaseException:
            if recorded and not record:
                attached.remove(pid)
            raise
    size = sum(end - start for start, end in regions)
    note = "" if recorded else "not recorded (records are root's): detach --force turns it off"
    return Attached(pid, True, strategy, previous, len(regions), size, failed, resent, recorded, note)


def detach(pid: int, force: bool = False) -> Attached:
    """Undoes attach: prctl(PR_SET_MEMORY_MERGE, 0), or MADV_UNMERGEABLE over the regions its
    record lists (the kernel unmerges their pages). A process with no record keeps its own
    merging unless `force`: then its prctl merging is turned off."""
    record = attached.read(pid)
    strategy = record["strategy"] if record else "prctl"
    check_target(pid, force)
    if not record and not _merge_any(pid):
        return Attached(pid, False, strategy, False, 0, 0, 0, 0, False, "no record, and prctl merging is off")
    if not record and not force:
        raise KsmError(
            f"{pid} has no record of an attach: its merging is its own (its prctl, its service's MemoryKSM); "
            "--force turns it off anyway"
        )
    regions = record["regions"] if strategy == "madvise" else []
    with signals_deferred(), HeldThread(pid) as thread:
        if strategy == "prctl":
            failed, result = 0, thread.call("prctl", PR_SET_MEMORY_MERGE, 0, 0, 0, 0)
        else:
            failed, result = _unmark(thread, regions), 0
        if result < 0:
            raise KsmError(f"prctl(PR_SET_MEMORY_MERGE, 0) failed in {pid}: {os.strerror(-result)}")
        removed = attached.remove(pid) if record else False
    size = sum(end - start for start, end in regions)
    return Attached(pid, False, strategy, True, len(regions), size, failed, len(thread.held), removed)
