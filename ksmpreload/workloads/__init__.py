"""The workloads of "Exploring KSM with Modern Workloads" (shared/seed) and a Python prefork
server, each started under ksm-wrap (or not), loaded with data and ready to be measured.

Each workload module has:
- DESCRIPTION: one line;
- runs(settings, strategy, processes, method, workdir): its runs, a list of Run; each Run's
  load() is a context manager that starts and loads the processes, yields a Loaded and stops
  them at its end.

runner.py measures them (`ksmpreload demo --workload NAME`) and serves them to `ksmpreload
compare --workload NAME` (`python -m ksmpreload.workloads serve NAME`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ..sizes import MIB


# small: tens of MiB per process (the tests); full: hundreds of MiB per process.
SIZES = {
    "small": {"value_bytes": 16 * MIB, "torch_layers": 5, "torch_width": 1024, "vm_bytes": 64 * MIB,
              "index_objects": 100_000, "drive_seconds": 5, "timeout": 60},
    "full": {"value_bytes": 400 * MIB, "torch_layers": 8, "torch_width": 3072, "vm_bytes": 1024 * MIB,
             "index_objects": 1_500_000, "drive_seconds": 20, "timeout": 600},
}  # fmt: skip


@dataclass
class Loaded:
    data_by_pid: dict  # pid -> bytes of data the workload put into it
    load_seconds: float | None = None
    throughput: float | None = None  # operations per second while loading, when the workload has a rate
    throughput_unit: str | None = None
    details: dict = field(default_factory=dict)  # anything else the workload measured
    after_merge: object = None  # () -> dict of details, called once the run is measured


@dataclass
class Run:
    label: str
    load: object  # () -> context manager yielding Loaded
    expected_saved_bytes: int | None = None  # what page-aligning should save, where the data tells
    details: dict = field(default_factory=dict)


def counted(count: int, noun: str) -> str:
    """'1 server', '3 servers'."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def rate(operations: int, started: float, unit: str, now: float) -> dict:
    """Load seconds and operations per second since `started`."""
    seconds = now - started
    return {"load_seconds": round(seconds, 2), "throughput": round(operations / seconds, 1), "throughput_unit": unit}
