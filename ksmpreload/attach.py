"""Turn merging on (or off) in a process that is already running: the checks that come first,
the two ways (prctl(PR_SET_MEMORY_MERGE) for the whole process, or madvise(MADV_MERGEABLE) over
its private anonymous regions as they are), run inside it by inject.HeldThread, and a record of
each attach (docs/ATTACH.md), so that detach undoes what attach did and status, top and report
can say which processes were attached.

Records live in RECORDS_DIR (root's only: another user's file there would decide what detach
unmarks), one JSON file a process, valid while a process of that pid and start time runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import time
from dataclasses import dataclass

import psutil

from . import kernel
from .errors import KsmError
from .inject import HeldThread, this_architecture

PR_SET_MEMORY_MERGE = 67
MADV_MERGEABLE, MADV_UNMERGEABLE = 12, 13
STRATEGIES = ("prctl", "madvise")
DEFAULT_THRESHOLD = 8 << 10  # the shim's: regions smaller than this are left alone by madvise
RECORDS_DIR = "/run/ksmpreload/attached"


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
    recorded: bool  # a record was written (attach) or removed (detach); False without root


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


# ---- records ------------------------------------------------------------------------------------


def _started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _trusted_records_dir(create: bool) -> bool:
    """RECORDS_DIR exists (made when `create` and root), a directory owned by root that no one
    else may write."""
    if create and os.geteuid() == 0:
        with contextlib.suppress(FileExistsError):
            os.makedirs(RECORDS_DIR, mode=0o755)
    try:
        info = os.lstat(RECORDS_DIR)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == 0 and not info.st_mode & 0o022


def _record_path(pid: int) -> str:
    return os.path.join(RECORDS_DIR, f"{pid}.json")


def write_record(pid: int, strategy: str, regions: list[tuple[int, int]]) -> bool:
    """Records an attach (as root only: False otherwise). OSError (a full disk) before anything
    is done to the process."""
    if os.geteuid() != 0 or not _trusted_records_dir(create=True):
        return False
    record = {"pid": pid, "started": _started(pid), "strategy": strategy, "regions": regions, "time": time.time()}
    with tempfile.NamedTemporaryFile("w", dir=RECORDS_DIR, prefix=".attach-", delete=False) as temporary:
        try:
            json.dump(record, temporary)
            temporary.flush()
            os.fsync(temporary.fileno())
            os.replace(temporary.name, _record_path(pid))
        except BaseException:
            os.unlink(temporary.name)
            raise
    return True


def _parse_record(path: str) -> dict | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd) as file:
        if os.fstat(fd).st_uid != 0:
            return None
        try:
            record = json.load(file)
            regions = [(int(start), int(end)) for start, end in record.get("regions", [])]
            return {**record, "pid": int(record["pid"]), "regions": regions}
        except (ValueError, KeyError, TypeError):
            return None


def read_record(pid: int) -> dict | None:
    """The record of the running process `pid`'s attach, or None (none, not root's, corrupt, or
    left by an earlier process of that pid)."""
    if not _trusted_records_dir(create=False):
        return None
    record = _parse_record(_record_path(pid))
    if record is None or record["pid"] != pid or record.get("started") != _started(pid):
        return None
    return record


def remove_record(pid: int) -> bool:
    try:
        os.unlink(_record_path(pid))
        return True
    except OSError:
        return False


def attached_processes() -> dict[int, dict]:
    """{pid: record} of the running processes attach turned merging on in."""
    if not _trusted_records_dir(create=False):
        return {}
    found = {}
    for name in os.listdir(RECORDS_DIR):
        pid = name.removesuffix(".json")
        if name.endswith(".json") and pid.isdigit():
            record = read_record(int(pid))
            if record:
                found[int(pid)] = record
    return found


# ---- attach and detach ----------------------------------------------------------------------


def _merge_any(pid: int) -> bool:
    try:
        return bool((kernel.process_ksm_stat(pid) or {}).get("ksm_merge_any"))
    except PermissionError as error:
        raise kernel.needs_root(error) from None


def _mark(thread: HeldThread, regions: list[tuple[int, int]], keep=frozenset()) -> int:
    """madvise(MADV_MERGEABLE) over each region, inside the held thread; how many it refused.
    Interrupted half-way (Ctrl-C, an error), it unmarks what it marked (but `keep`, marked by an
    earlier attach) before the thread is let go: the process is not left half-changed."""
    marked = []
    try:
        for start, end in regions:
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
    """The attach's record, written before the process is touched: a full disk refuses the
    attach rather than leave marks that detach could not find."""
    try:
        return write_record(pid, strategy, regions)
    except OSError as error:
        raise KsmError(f"cannot record the attach in {RECORDS_DIR}: {error.strerror}; {pid} is untouched") from None


def _turn_on(pid: int, strategy: str, regions: list[tuple[int, int]], earlier: set) -> tuple[int, int]:
    """(regions madvise refused, signals sent again) once merging is on inside the process."""
    with HeldThread(pid) as thread:
        failed = 0
        if strategy == "prctl":
            result = thread.call("prctl", PR_SET_MEMORY_MERGE, 1, 0, 0, 0)
            if result < 0:
                raise KsmError(f"prctl(PR_SET_MEMORY_MERGE, 1) failed in {pid}: {os.strerror(-result)}")
        else:
            failed = _mark(thread, regions, keep=earlier)
    return failed, len(thread.held)


def attach(pid: int, strategy: str | None = None, threshold: int = DEFAULT_THRESHOLD, force: bool = False) -> Attached:
    """Merging on in the running process `pid`: prctl(PR_SET_MEMORY_MERGE, 1), or
    madvise(MADV_MERGEABLE) over its unmarked anonymous regions of `threshold` bytes or more.
    The process is left as it was, and running, whatever happens; KsmError says why not."""
    strategy = choose_strategy(strategy)
    check_target(pid, force)
    record = read_record(pid)
    if record and record["strategy"] != strategy:
        raise KsmError(f"{pid} was attached with {record['strategy']}: detach it first to change the strategy")
    previous = _merge_any(pid) if strategy == "prctl" else record is not None
    earlier = set(record["regions"]) if record else set()
    regions = sorted(set(unmarked_regions(pid, threshold)) | earlier) if strategy == "madvise" else []
    changes = strategy == "madvise" or not previous  # prctl merging on already: nothing to record
    recorded = _record_first(pid, strategy, regions) if changes else record is not None
    try:
        failed, resent = _turn_on(pid, strategy, regions, earlier)
    except BaseException:
        if recorded and changes and not record:
            remove_record(pid)
        raise
    size = sum(end - start for start, end in regions)
    return Attached(pid, True, strategy, previous, len(regions), size, failed, resent, recorded)


def detach(pid: int, force: bool = False) -> Attached:
    """Undoes attach: prctl(PR_SET_MEMORY_MERGE, 0), or MADV_UNMERGEABLE over the regions its
    record lists (the kernel unmerges their pages). Without a record (not attached by root, or
    attached before records), prctl merging is turned off where it is on."""
    record = read_record(pid)
    strategy = record["strategy"] if record else "prctl"
    check_target(pid, force)
    if strategy == "prctl" and not record and not _merge_any(pid):
        return Attached(pid, False, strategy, False, 0, 0, 0, 0, False)
    regions = record["regions"] if strategy == "madvise" else []
    with HeldThread(pid) as thread:
        if strategy == "prctl":
            failed, result = 0, thread.call("prctl", PR_SET_MEMORY_MERGE, 0, 0, 0, 0)
        else:
            failed, result = _unmark(thread, regions), 0
    if result < 0:
        raise KsmError(f"prctl(PR_SET_MEMORY_MERGE, 0) failed in {pid}: {os.strerror(-result)}")
    removed = remove_record(pid) if record else False
    size = sum(end - start for start, end in regions)
    return Attached(pid, False, strategy, True, len(regions), size, failed, len(thread.held), removed)
