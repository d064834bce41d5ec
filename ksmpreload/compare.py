"""A/B runs of one workload: each arm is an allocator and a strategy, run in turn under the same
scan rate, with KSM unmerged in between, and measured from the kernel.

An arm starts the command (through ksm-wrap unless its strategy is none; with Debian's
libjemalloc, libmimalloc or libtcmalloc preloaded for those allocators), follows the merged
pages of the command's process tree until they stop changing for several full scans (or the
time limit; a change of a few pages, which threads that keep writing them cause, does not
count), then measures and stops it:
- saved: pages the arm's processes map to a KSM page, minus the distinct KSM pages they map
  (what merging took away; from sharing(), root), plus their KSM zero pages;
- resident: the processes' RSS; padding: the shim's alignment padding; net = saved - padding;
- time to 90%: when the saving first reached 90% of its final value, in seconds from
  the command's start (with wait_ready: from its ready line);
- rmap items: the scan state KSM keeps for them (its cost);
- throughput: what the command reports in its ready line (below), if anything;
- allocator loaded: how many of the processes map the preloaded allocator.

With wait_ready the command loads its data first and then prints one JSON object on a line of
its stdout, for example {"ready": true, "pids": [4711, 4712], "throughput": 5300.0,
"throughput_unit": "sets/s"}: the arm is followed from then on, and only the processes in
"pids" (all of its process tree when there is no "pids") are measured. scripts/scenarios.py
NAME --serve speaks this.
"""

import json
import os
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field

from . import kernel, scanning, shimstats
from .processes import ksm_wrap_command, merged_pages, process_tree, resident_bytes, stop_tree
from .errors import KsmError

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
SAMPLE_SECONDS = 0.5
UNMERGE_TIMEOUT = 60


@dataclass
class ArmResult:
    allocator: str
    strategy: str
    processes: int = 0
    allocator_loaded: int = None  # measured processes that map the preloaded allocator
    saved_bytes: int = 0
    resident_bytes: int = 0
    padding_bytes: int = 0
    net_saved_bytes: int = 0
    saved_percent: float = 0.0
    seconds_to_90: float = None
    rmap_items: int = 0
    throughput: float = None
    throughput_unit: str = None
    samples: list = field(default_factory=list)  # [seconds since start, merged pages, pages saved]
    exit_code: int = None  # when the command ended before it was measured
    failure: str = None  # why the arm was not measured


class ReadyLine:
    """Reads the command's stdout to its end (so that it never blocks on a full pipe) and keeps
    the first line that is a JSON object with "ready" in it."""

    def __init__(self, stream):
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

    def wait(self, proc, timeout):
        """The ready message; None if the command ended or `timeout` passed first."""
        deadline = time.monotonic() + timeout
        while not self.event.wait(0.2):
            if proc.poll() is not None or time.monotonic() > deadline:
                return None
        return self.message


def arm_command(command, allocator, strategy):
    """(argv, environment) of one arm."""
    env = dict(os.environ)
    library = ALLOCATORS[allocator][0]
    if library:
        env["LD_PRELOAD"] = " ".join(filter(None, [env.get("LD_PRELOAD", ""), library]))
    options = STRATEGIES[strategy]
    if options is None:
        return list(command), env
    return [*ksm_wrap_command(), *options, *command], env


def unmerge_all():
    """run=2 unmerges every KSM page on the machine; wait until none is left."""
    kernel.write_knob("run", 2)
    deadline = time.monotonic() + UNMERGE_TIMEOUT
    while kernel.read_knob("pages_sharing") and time.monotonic() < deadline:
        time.sleep(0.1)


def saved_pages(pids, stats=None):
    """Pages the processes no longer need: their pages that map a KSM page minus the distinct
    KSM pages those are (page frame numbers, root), plus their KSM zero pages."""
    from .sharing import sharing  # the compiled helper: imported when needed, not with the CLI

    stats = stats or [kernel.process_ksm_stat(pid) or {} for pid in pids]
    report = sharing(pids)
    zero_pages = sum(stat.get("ksm_zero_pages", 0) for stat in stats)
    return report.totals["mapped"] - report.totals["distinct"] + zero_pages


def processes_mapping(pids, library):
    """How many of the processes map `library` (a statically linked program ignores a preload)."""
    path = os.path.realpath(library)
    return sum(1 for pid in pids if path in (kernel.read_proc(pid, "maps") or ""))


def measure(result, pids):
    library = ALLOCATORS[result.allocator][0]
    if library:
        result.allocator_loaded = processes_mapping(pids, library)
    page = kernel.page_size()
    stats = [kernel.process_ksm_stat(pid) or {} for pid in pids]
    result.saved_bytes = saved_pages(pids, stats) * page
    result.resident_bytes = sum(resident_bytes(pid) for pid in pids)
    result.padding_bytes = sum(shimstats.memory_cost_bytes(shimstats.read_process_stats(pid)) for pid in pids)
    result.net_saved_bytes = result.saved_bytes - result.padding_bytes
    result.saved_percent = round(100 * result.saved_bytes / result.resident_bytes, 1) if result.resident_bytes else 0
    result.rmap_items = sum(stat.get("ksm_rmap_items", 0) for stat in stats)
    result.processes = len(pids)


def seconds_to_share(samples, share=0.9):
    """Seconds until the saving first reached `share` of its last value."""
    final = samples[-1][2] if samples else 0
    return next((seconds for seconds, _, saved in samples if final and saved >= share * final), None)


def follow(pids, started, result, timeout, on_sample):
    """Samples the merged and saved pages of pids() (times from `started`) until the merged
    pages settle or `timeout` passes."""

    def sample():
        current = pids()
        pages = merged_pages(current)  # settling is judged by this count: ksm_stat, cheap and exact
        result.samples.append([round(time.monotonic() - started, 2), pages, saved_pages(current)])
        on_sample(result, pages)
        return pages

    if not any(kernel.uses_ksm(kernel.process_ksm_stat(pid) or {}) for pid in pids()):
        sample()  # nothing of it is mergeable: ksmd has nothing to scan, and full scans may not advance
        return
    scanning.wait_until_settled(scanning.ignoring_flutter(sample), timeout=timeout, poll=SAMPLE_SECONDS)


def wait_until_loaded(proc, result, warmup, wait_ready):
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


def run_arm(command, allocator, strategy, timeout, warmup, on_sample, wait_ready=None):
    result = ArmResult(allocator, strategy)
    argv, env = arm_command(command, allocator, strategy)
    started = time.monotonic()
    output = subprocess.DEVNULL if wait_ready is None else subprocess.PIPE
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=output, text=True)
    try:
        pids = wait_until_loaded(proc, result, warmup, wait_ready)
        if pids is None:
            return result
        if wait_ready is not None:
            started = time.monotonic()  # load times differ between arms: time the merging alone
        follow(pids, started, result, timeout, on_sample)
        measure(result, pids())
        result.seconds_to_90 = seconds_to_share(result.samples)
    finally:
        stop_tree(proc)
    return result


def compare(command, allocators, strategies, timeout=120, warmup=1.0, on_arm=None, on_sample=None, wait_ready=None):
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
                    )
                )
        unmerge_all()
    return [asdict(result) for result in results]
