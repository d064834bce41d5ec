"""A/B runs of one workload: each arm is an allocator and a strategy, run in turn under the same
scan rate, with KSM unmerged in between, and measured from the kernel.

An arm starts the command (through ksm-wrap unless its strategy is none; with Debian's
libjemalloc, libmimalloc or libtcmalloc preloaded for those allocators), follows its processes
while they merge and measures them (measurement.py: saved, resident, padding, net saved, time to
90%, rmap items), then stops it. Besides: throughput, what the command reports in its ready line
(below), if anything; allocator loaded, how many of the processes map the preloaded allocator.

With wait_ready the command loads its data first and then prints one JSON object on a line of
its stdout, for example {"ready": true, "pids": [4711, 4712], "throughput": 5300.0,
"throughput_unit": "sets/s"}: the arm is followed from then on (times count from it), and only
the processes in "pids" (all of its process tree when there is no "pids") are measured. Every
workload of the package speaks this (`python -m ksmpreload.workloads serve NAME`, which
`ksmpreload compare --workload NAME` runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import IO

from . import kernel, scanning
from .errors import KsmError
from .measurement import Measurement, follow, measure
from .processes import ksm_wrap_command, process_tree, spawn, stop_tree

LIBRARIES = "/usr/lib/x86_64-linux-gnu"
# allocator name: (library preloaded for it, the Debian package that installs it)
ALLOCATORS = {
    "glibc": (None, None),
    "jemalloc": (f"{LIBRARIES}/libjemalloc.so.2", "libjemalloc2"),
    "mimalloc": (f"{LIBRARIES}/libmimalloc.so.2", "libmimalloc2.0"),
    "tcmalloc": (f"{LIBRARIES}/libtcmalloc_minimal.so.4", "libtcmalloc-minimal4"),
}
STRATEGIES = {
    "none": None,
    "prctl": ["--strategy", "prctl"],
    "madvise": ["--strategy", "madvise"],
    "madvise-noalign": ["--strategy", "madvise", "--no-align"],
}
UNMERGE_TIMEOUT = 60


@dataclass
class ArmResult(Measurement):
    allocator: str | None = None
    strategy: str | None = None
    allocator_loaded: int | None = None  # measured processes that map the preloaded allocator
    throughput: float | None = None
    throughput_unit: str | None = None
    predicted_bytes: int | None = None  # what the none arm's reading predicted for this arm's remedy
    exit_code: int | None = None  # when the command ended before it was measured
    failure: str | None = None  # why the arm was not measured


class ReadyLine:
    """Reads the command's stdout to its end (so that it never blocks on a full pipe) and keeps
    the first line that is a JSON object with "ready" in it."""

    def __init__(self, stream: IO[str]) -> None:
        self.message, self.event = None, threading.Event()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            if self.message is None and line.lstrip().startswith("{"):
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if isinstance(message, dict) and message.get("ready"):
                    self.message = message
                    self.event.set()
        self.event.set()  # the stream ended: no ready line will come

    def wait(self, proc: subprocess.Popen[str], timeout: float) -> dict | None:
        """The ready message; None if the command ended or `timeout` passed first."""
        deadline = time.monotonic() + timeout
        while not self.event.wait(0.2):
            if proc.poll() is not None or time.monotonic() > deadline:
                return None
        return self.message


def arm_command(command: list[str], allocator: str, strategy: str) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of one arm."""
    env = dict(os.environ)
    library = ALLOCATORS[allocator][0]
    if library:
        env["LD_PRELOAD"] = " ".join(filter(None, [env.get("LD_PRELOAD", ""), library]))
    options = STRATEGIES[strategy]
    if options is None:
        return list(command), env
    return [*ksm_wrap_command(), *options, *command], env


def unmerge_all() -> None:
    """run=2 unmerges every KSM page on the machine; wait until none is left."""
    kernel.write_knob("run", 2)
    deadline = time.monotonic() + UNMERGE_TIMEOUT
    while kernel.read_knob("pages_sharing") and time.monotonic() < deadline:
        time.sleep(0.1)


# the doctor's remedy (diagnosis.predictions) that each strategy applies
REMEDIES = {"prctl": "ksm-wrap", "madvise": "ksm-wrap", "madvise-noalign": "as-is"}


def predict(pids: list[int]) -> dict[str, int]:
    """{remedy: saved bytes} predicted from the processes as they are (the none arm)."""
    from .diagnosis import predictions
    from .layout import duplicates_at_any_offset
    from .potential import potential

    found = predictions(potential(pids), duplicates_at_any_offset(pids))
    return {entry["remedy"]: entry["saved_bytes"] for entry in found}


def workload_command(name: str, size: str, processes: int | None = None, method: str | None = None) -> list[str]:
    """The command that serves a workload of the package for `compare --wait-ready`."""
    command = [sys.executable, "-m", "ksmpreload.workloads", "serve", name, "--size", size]
    command += ["--processes", str(processes)] if processes else []
    return command + (["--method", method] if method else [])


def processes_mapping(pids: list[int], library: str) -> int:
    """How many of the processes map `library` (a statically linked program ignores a preload)."""
    path = os.path.realpath(library)
    return sum(1 for pid in pids if path in (kernel.read_proc(pid, "maps") or ""))


def wait_until_loaded(
    proc: subprocess.Popen[str], result: ArmResult, warmup: float, wait_ready: float | None
) -> Callable[[], list[int]] | None:
    """The processes to measure (a function giving their pids) once the command has loaded its
    data: after `warmup` seconds, or, with wait_ready, once it printed its ready line (waiting at
    most `wait_ready` seconds). None, with the reason in `result`, if it did not get there."""
    if wait_ready is None:
        time.sleep(warmup)
        message = {}
    else:
        message = ReadyLine(proc.stdout).wait(proc, wait_ready)
        if message is None and proc.poll() is None:
            result.failure = f"no ready line in {wait_ready:.0f} s"
            return None
    if proc.poll() is not None:
        result.exit_code = proc.returncode
        result.failure = f"exited with {proc.returncode}"
        return None
    result.throughput, result.throughput_unit = message.get("throughput"), message.get("throughput_unit")
    listed = [int(pid) for pid in message.get("pids", [])]
    return (lambda: listed) if listed else (lambda: process_tree(proc.pid))


def run_arm(
    command: list[str],
    allocator: str,
    strategy: str,
    timeout: float,
    warmup: float,
    on_sample: Callable[[ArmResult, int], None],
    wait_ready: float | None = None,
    cwd: str | None = None,
    predicted: dict | None = None,
) -> ArmResult:
    """One arm, measured. The none arm fills `predicted` with what each remedy would save (from
    its processes as they are), and later arms of the allocator are shown beside theirs."""
    result = ArmResult(allocator=allocator, strategy=strategy)
    if predicted and REMEDIES.get(strategy) in predicted:
        result.predicted_bytes = predicted[REMEDIES[strategy]]
    argv, env = arm_command(command, allocator, strategy)
    started = time.monotonic()
    output = subprocess.DEVNULL if wait_ready is None else subprocess.PIPE
    proc = spawn(argv, env=env, stdin=subprocess.DEVNULL, stdout=output, text=True, cwd=cwd)
    try:
        pids = wait_until_loaded(proc, result, warmup, wait_ready)
        if pids is None:
            return result
        if wait_ready is not None:
            started = time.monotonic()  # load times differ between arms: time the merging alone
        follow(pids, started, timeout, result, lambda pages: on_sample(result, pages))
        measured = pids()
        measure(measured, result)
        if strategy == "none" and predicted is not None:
            predicted.update(predict(measured))
        library = ALLOCATORS[allocator][0]
        if library:
            result.allocator_loaded = processes_mapping(measured, library)
    finally:
        stop_tree(proc)
    return result


def compare(
    command: list[str],
    allocators: list[str],
    strategies: list[str],
    timeout: float = 120,
    warmup: float = 1.0,
    on_arm: Callable[[str, str], None] | None = None,
    on_sample: Callable[[ArmResult, int], None] | None = None,
    wait_ready: float | None = None,
    cwd: str | None = None,
) -> list[dict]:
    """Runs every allocator × strategy arm in turn; returns their ArmResults as dicts.
    wait_ready: seconds to wait for the command's ready line (None: wait `warmup` seconds)."""
    kernel.require_ksm()
    unknown = [name for name in allocators if name not in ALLOCATORS]
    if unknown:
        raise KsmError(f"unknown allocator {', '.join(unknown)} (known: {', '.join(ALLOCATORS)})", 2)
    for name in allocators:
        library, package = ALLOCATORS[name]
        if library and not os.path.exists(library):
            raise KsmError(f"the {name} arm needs {library} (apt-get install {package})")
    results = []
    with scanning.fast_scanning():
        for allocator in allocators:
            predicted = {}
            for strategy in strategies:
                unmerge_all()
                kernel.write_knob("run", 1)
                if on_arm:
                    on_arm(allocator, strategy)
                results.append(
                    run_arm(
                        command,
                        allocator,
                        strategy,
                        timeout,
                        warmup,
                        on_sample or (lambda result, pages: None),
                        wait_ready,
                        cwd,
                        predicted,
                    )
                )
        unmerge_all()
    return [asdict(result) for result in results]
