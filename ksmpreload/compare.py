"""A/B runs of one workload: each arm is an allocator and a strategy, run in turn under the same
scan rate, with KSM unmerged in between, and measured from the kernel.

An arm starts the command (through ksm-wrap unless its strategy is none; with Debian's
libjemalloc preloaded for the jemalloc allocator), follows the merged pages of the command's
process tree until they stop changing for several full scans (or the time limit), then
measures and stops it:
- saved: pages the arm's processes map to a KSM page, minus the distinct KSM pages they map
  (what merging took away; from sharing(), root), plus their KSM zero pages;
- resident: the processes' RSS; padding: the shim's alignment padding; net = saved - padding;
- time to 90%: when the merged pages first reached 90% of their final count;
- rmap items: the scan state KSM keeps for them (its cost).
"""
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field

import psutil

from . import kernel, scanning, shimstats
from .wrap import launcher
from .errors import KsmError

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
ALLOCATORS = {"glibc": None, "jemalloc": JEMALLOC}
STRATEGIES = {"none": None, "prctl": ["--strategy", "prctl"], "madvise": ["--strategy", "madvise"],
              "madvise-noalign": ["--strategy", "madvise", "--no-align"]}
SAMPLE_SECONDS = 0.5
UNMERGE_TIMEOUT = 60


@dataclass
class ArmResult:
    allocator: str
    strategy: str
    processes: int = 0
    saved_bytes: int = 0
    resident_bytes: int = 0
    padding_bytes: int = 0
    net_saved_bytes: int = 0
    saved_percent: float = 0.0
    seconds_to_90: float = None
    rmap_items: int = 0
    samples: list = field(default_factory=list)  # [seconds since start, merged pages]
    exit_code: int = None                       # when the command ended before it was measured


def arm_command(command, allocator, strategy):
    """(argv, environment) of one arm."""
    env = dict(os.environ)
    library = ALLOCATORS[allocator]
    if library:
        env["LD_PRELOAD"] = " ".join(filter(None, [env.get("LD_PRELOAD", ""), library]))
    options = STRATEGIES[strategy]
    if options is None:
        return list(command), env
    return [*launcher(), *options, *command], env


def process_tree(pid):
    try:
        parent = psutil.Process(pid)
        return [parent.pid] + [child.pid for child in parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def merged_pages(pids):
    return sum((kernel.process_ksm_stat(pid) or {}).get("ksm_merging_pages", 0) for pid in pids)


def unmerge_all():
    """run=2 unmerges every KSM page on the machine; wait until none is left."""
    kernel.write_knob("run", 2)
    deadline = time.monotonic() + UNMERGE_TIMEOUT
    while kernel.read_knob("pages_sharing") and time.monotonic() < deadline:
        time.sleep(0.1)


def measure(result, pids):
    from .sharing import sharing  # the compiled helper: imported when needed, not with the CLI
    page = kernel.page_size()
    stats = [kernel.process_ksm_stat(pid) or {} for pid in pids]
    report = sharing(pids)
    zero_pages = sum(stat.get("ksm_zero_pages", 0) for stat in stats)
    result.saved_bytes = (report.totals["mapped"] - report.totals["distinct"] + zero_pages) * page
    result.resident_bytes = sum(_rss(pid) for pid in pids)
    result.padding_bytes = sum((shimstats.read_process_stats(pid) or {}).get("padding_bytes", 0) for pid in pids)
    result.net_saved_bytes = result.saved_bytes - result.padding_bytes
    result.saved_percent = round(100 * result.saved_bytes / result.resident_bytes, 1) if result.resident_bytes else 0
    result.rmap_items = sum(stat.get("ksm_rmap_items", 0) for stat in stats)
    result.processes = len(pids)


def _rss(pid):
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.NoSuchProcess:
        return 0


def seconds_to_share(samples, share=0.9):
    final = samples[-1][1] if samples else 0
    return next((seconds for seconds, pages in samples if final and pages >= share * final), None)


def follow(proc, started, result, timeout, on_sample):
    """Samples the merged pages of the process tree (times from `started`, when the command
    started) until they settle or `timeout` passes."""

    def sample():
        pages = merged_pages(process_tree(proc.pid))
        result.samples.append([round(time.monotonic() - started, 2), pages])
        on_sample(result, pages)
        return pages
    if not any(kernel.uses_ksm(kernel.process_ksm_stat(pid) or {}) for pid in process_tree(proc.pid)):
        sample()  # nothing of it is mergeable: ksmd has nothing to scan, and full scans may not advance
        return
    scanning.wait_until_settled(sample, timeout=timeout, poll=SAMPLE_SECONDS)


def stop(proc):
    for pid in reversed(process_tree(proc.pid)):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_arm(command, allocator, strategy, timeout, warmup, on_sample):
    result = ArmResult(allocator, strategy)
    argv, env = arm_command(command, allocator, strategy)
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        time.sleep(warmup)
        if proc.poll() is not None:
            result.exit_code = proc.returncode
            return result
        follow(proc, started, result, timeout, on_sample)
        measure(result, process_tree(proc.pid))
        result.seconds_to_90 = seconds_to_share(result.samples)
    finally:
        stop(proc)
    return result


def compare(command, allocators, strategies, timeout=120, warmup=1.0, on_arm=None, on_sample=None):
    """Runs every allocator × strategy arm in turn; returns their ArmResults as dicts."""
    kernel.require_ksm()
    unknown = [name for name in allocators if name not in ALLOCATORS]
    if unknown:
        raise KsmError(f"unknown allocator {', '.join(unknown)} (known: {', '.join(ALLOCATORS)})", 2)
    if "jemalloc" in allocators and not os.path.exists(JEMALLOC):
        raise KsmError(f"the jemalloc arm needs {JEMALLOC} (apt-get install libjemalloc2)")
    results = []
    with scanning.fast_scanning():
        for allocator in allocators:
            for strategy in strategies:
                unmerge_all()
                kernel.write_knob("run", 1)
                if on_arm:
                    on_arm(allocator, strategy)
                results.append(run_arm(command, allocator, strategy, timeout, warmup,
                                       on_sample or (lambda result, pages: None)))
        unmerge_all()
    return [asdict(result) for result in results]
