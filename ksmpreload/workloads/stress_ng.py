"""stress-ng --vm 2 --vm-keep --vm-hang 0 --no-madvise (fill once, then hold), for fill methods
that write duplicate pages and for methods that write random data (what the blog post ran into).
It is stopped through its parent (processes.stop_parent_first): a worker killed on its own is
taken for the OOM killer's victim and restarted."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterable, Iterator

import psutil

from ..errors import KsmError
from ..processes import process_tree, spawn, stop_parent_first
from . import Loaded, Run
from .servers import wrapped

DESCRIPTION = "stress-ng --vm 2 --vm-keep, fill methods of duplicate pages and of random data"
# Fill methods of stress-ng 0.15: the first two write pages of few distinct contents, the last
# two random data; prime-incdec leaves most pages zero.
METHODS = ("zero-one", "walk-0d", "prime-incdec", "rand-set", "flip")
WORKERS = 2


def cpu_seconds(pids: Iterable[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += sum(psutil.Process(pid).cpu_times()[:2])
    return total


def wait_until_filled(pid: int, worker_bytes: int, workers: int, timeout: float) -> dict[int, int]:
    """{pid: bytes held} of the process tree once `workers` of its processes hold `worker_bytes`
    each and the tree stopped using CPU (--vm-hang 0: each worker fills its memory once, then
    sleeps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tree = process_tree(pid)
        before = cpu_seconds(tree)
        time.sleep(0.5)
        with contextlib.suppress(psutil.NoSuchProcess):
            holding = {member for member in tree if psutil.Process(member).memory_info().rss >= worker_bytes}
            if len(holding) == workers and cpu_seconds(tree) - before < 0.05:
                return {member: worker_bytes if member in holding else 0 for member in tree}
    raise KsmError(f"stress-ng (pid {pid}) did not fill {workers} x {worker_bytes >> 20} MiB in {timeout:.0f} s")


def command(method: str, vm_bytes: int) -> list[str]:
    # --no-madvise: otherwise each worker madvises its buffer with random advice, at times
    # MADV_UNMERGEABLE, and that worker's memory stays unmerged (doctor: unmarked_by_program)
    return ["stress-ng", "--vm", str(WORKERS), "--vm-bytes", str(vm_bytes), "--vm-keep", "--vm-hang", "0",
            "--vm-method", method, "--no-madvise", "--quiet"]  # fmt: skip


@contextlib.contextmanager
def filled(method: str, vm_bytes: int, strategy: str, timeout: float) -> Iterator[Loaded]:
    proc = spawn(wrapped(command(method, vm_bytes), strategy), stdin=subprocess.DEVNULL, cwd="/")
    try:
        # stress-ng divides --vm-bytes among the workers
        yield Loaded(wait_until_filled(proc.pid, vm_bytes // WORKERS, WORKERS, timeout))
    finally:
        stop_parent_first(proc)


def runs(settings: dict, strategy: str, processes: int | None, method: str | None, workdir: str) -> list[Run]:
    return [
        Run(
            f"--vm-method {name}",
            lambda name=name: filled(name, settings["vm_bytes"], strategy, settings["timeout"]),
            details={"method": name, "workers": WORKERS},
        )
        for name in ([method] if method else METHODS)
    ]
