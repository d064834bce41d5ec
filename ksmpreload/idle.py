"""The governor's --unmark-idle: merging turned off, through detach, in processes where KSM has
found nothing for a long time (their rmap items cost memory, ksmd's passes over them CPU).

Only merging ksmpreload turned on, in a way detach undoes, is touched: an attach's record, or a
process whose shim (ksm-wrap) says it turned whole-process merging on. A process's own prctl
or madvise, or its service's MemoryKSM, is left alone. A process is idle once, for --idle-seconds
and at least IDLE_SCANS full scans of ksmd since it last merged or grew, its merged pages
(ksm_merging_pages + ksm_zero_pages) stayed at most max(IDLE_MERGED_PAGES, one in
IDLE_MERGED_SHARE of its rmap items): unmerging them is what turning merging off costs. At most
one process is unmarked a tick; one that cannot be is tried again after an idle period twice as
long as the last.
`ksmpreload attach` marks a process again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

from . import attach, attached, kernel, shimstats
from .errors import KsmError

IDLE_SECONDS = 1800  # --idle-seconds' default
IDLE_SCANS = 3
IDLE_MERGED_PAGES = 64
IDLE_MERGED_SHARE = 1000
GROWTH_SHARE = 100  # rmap items grown by more than one in this many: new memory, the clock starts again
KEPT_RESULTS = 50
UNMARK_SECONDS = 30  # the longest one unmark may hold up the governor


@dataclass
class Watch:
    since: float  # monotonic time since which the process merged (next to) nothing
    scans: int  # ksmd's full_scans then
    rmap_items: int  # the process's then


def merged_pages(process: dict) -> int | None:
    """Its pages that KSM merged, or None where the kernel does not say (ksm_merging_pages
    before 6.4; ksm_zero_pages before 6.6, while use_zero_pages is on)."""
    if "ksm_merging_pages" not in process:
        return None
    if "ksm_zero_pages" not in process and kernel.read_knob("use_zero_pages"):
        return None
    return process["ksm_merging_pages"] + process.get("ksm_zero_pages", 0)


def merges_nothing(process: dict) -> bool:
    merged = merged_pages(process)
    return merged is not None and merged <= max(
        IDLE_MERGED_PAGES, process.get("ksm_rmap_items", 0) // IDLE_MERGED_SHARE
    )


def _grew(process: dict, watch: Watch) -> bool:
    return process.get("ksm_rmap_items", 0) - watch.rmap_items > max(
        IDLE_MERGED_PAGES, watch.rmap_items // GROWTH_SHARE
    )


def turn_off_here(pid: int) -> attach.Attached:
    attach.check_target(pid)  # without force: a seccomp filter or a tracer leaves it as it is
    return attach.detach(pid, force=True)


def _turn_off(pid: int) -> attach.Attached:
    """turn_off_here in a child process (python -m ksmpreload.idle PID), so that a target whose
    thread cannot be held, or whose call does not return (its memory map locked by another
    thread), costs the governor UNMARK_SECONDS at most: the child is then killed, and the
    target's thread goes on as after a SIGKILL of attach. A stop of the governor meanwhile waits
    for the child, which defers its own signals while it holds a thread."""
    child = subprocess.Popen([sys.executable, "-m", "ksmpreload.idle", str(pid)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, start_new_session=True)  # fmt: skip
    try:
        output, _ = child.communicate(timeout=UNMARK_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        raise KsmError(f"{pid} was not unmarked within {UNMARK_SECONDS} s; let go") from None
    except BaseException:  # Ctrl-C, SIGTERM: the child finishes what it holds first
        try:
            child.wait(timeout=UNMARK_SECONDS)
        except subprocess.TimeoutExpired:
            child.kill()
        raise
    try:
        answer = json.loads(output)
        if child.returncode == 0:
            return attach.Attached(**answer)
        reason = answer["error"]
    except (ValueError, TypeError, KeyError):
        reason = f"the unmark of {pid} ended with {child.returncode}"
    raise KsmError(reason)


def _main(argv: list[str]) -> int:
    """python -m ksmpreload.idle PID: turn_off_here, its result (or error) as one JSON line."""
    try:
        print(json.dumps(asdict(turn_off_here(int(argv[1])))))
    except (KsmError, OSError) as error:
        print(json.dumps({"error": str(error) or type(error).__name__}))
        return 1
    return 0


class IdleUnmarker:
    """Watches the processes that use KSM tick by tick and unmarks the idle ones; `results`
    says what was done (the newest KEPT_RESULTS), `unmarked` counts the processes unmarked."""

    def __init__(self, idle_seconds: float, turn_off=_turn_off) -> None:
        self.idle_seconds, self.turn_off = idle_seconds, turn_off
        self.watching: dict[tuple[int, float], Watch] = {}
        self.shim: dict[tuple[int, float], str] = {}  # the strategy the shim took: it does not change
        self.handled: dict[tuple[int, float], bool] = {}  # unmarked (or found off): merging seen off since
        self.failures: dict[tuple[int, float], int] = {}  # each doubles the idle time before the next try
        self.results: list[dict] = []
        self.unmarked = 0

    def tick(self, processes: list[dict], full_scans: int, now: float) -> list[dict]:
        """Unmarks the first process idle at `now`; the result of this tick ([] or one)."""
        idle = self.idle(processes, full_scans, now)
        done = [self._unmark(*idle[0], full_scans, now)] if idle else []
        self.results = (self.results + done)[-KEPT_RESULTS:]
        self.unmarked += sum(result["unmarked"] for result in done)
        return done

    def ours(self, key: tuple, process: dict) -> bool:
        """Merging that ksmpreload turned on and detach undoes: an attach's record, or the shim's
        whole-process merging (ksm-wrap; its counters say prctl, and ksm_stat, where it says,
        that the process still merges as a whole)."""
        if key[0] in (1, os.getpid()):
            return False
        if attached.read(key[0]) is not None:
            return True
        if not process.get("ksm_merge_any", True):
            return False
        if key not in self.shim:
            strategy = shimstats.published_strategy(key[0])
            if strategy is None:
                return False  # no shim, or it has not published yet
            self.shim[key] = strategy
        return self.shim[key] == "prctl"

    def idle(self, processes: list[dict], full_scans: int, now: float) -> list[tuple]:
        """(key, process) for each process idle at `now`, keyed by pid and start time (a reused
        pid starts over); the clock of a process starts when its merging becomes ours, and again
        when merging is turned on again after an unmark (an attach record, merge-any)."""
        found, watching, alive = [], {}, set()
        for process in processes:
            key = (process["pid"], attached.started(process["pid"]))
            alive.add(key)
            if key in self.handled:
                merging = attached.read(key[0]) is not None or bool(process.get("ksm_merge_any"))
                if merging and self.handled[key]:
                    del self.handled[key]  # off, then on again: attached again since
                else:
                    self.handled[key] = not merging
            if key[1] is None or key in self.handled or not self.ours(key, process):
                continue
            watch = self.watching.get(key)
            if watch is None or not merges_nothing(process) or _grew(process, watch):
                watch = Watch(now, full_scans, process.get("ksm_rmap_items", 0))
            elif now - watch.since >= self.idle_seconds * 2 ** self.failures.get(key, 0) and (
                full_scans - watch.scans >= IDLE_SCANS
            ):
                found.append(
                    (key, {**process, "idle_seconds": round(now - watch.since), "scans": full_scans - watch.scans})
                )
            watching[key] = watch
        self.watching = watching
        self.handled = {key: off for key, off in self.handled.items() if key in alive}
        self.shim = {key: strategy for key, strategy in self.shim.items() if key in alive}
        self.failures = {key: count for key, count in self.failures.items() if key in alive}
        return found

    def _unmark(self, key: tuple, process: dict, full_scans: int, now: float) -> dict:
        result = {
            "pid": process["pid"],
            "comm": process.get("comm", "?"),
            "rmap_items": process.get("ksm_rmap_items", 0),
            "merged_pages": merged_pages(process),
            "idle_seconds": process["idle_seconds"],
            "full_scans": process["scans"],
        }
        try:
            if attached.started(key[0]) != key[1]:
                raise KsmError(f"{key[0]} is another process now (its pid was reused)")
            done = self.turn_off(key[0])
        except (KsmError, OSError) as error:  # OSError: the process went while it was being held
            self.watching[key] = Watch(now, full_scans, result["rmap_items"])
            self.failures[key] = self.failures.get(key, 0) + 1
            return {**result, "unmarked": False, "why": str(error) or type(error).__name__}
        self.handled[key] = False
        if not done.previous:
            return {**result, "unmarked": False, "why": done.note or "its merging was off already"}
        if done.regions and done.failed_regions == done.regions:
            return {**result, "unmarked": False, "why": "every region refused MADV_UNMERGEABLE"}
        if done.failed_regions:
            return {**result, "unmarked": True, "why": f"{done.failed_regions} of its regions refused MADV_UNMERGEABLE"}
        return {**result, "unmarked": True}


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
