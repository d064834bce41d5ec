"""Running a workload: each of its runs is started and loaded (see the workload's module), then
KSM merges it at a fast scan rate (scanning.fast_scanning: every knob put back after) and
measurement.py follows and measures it (saved, padding, net saved, time to 90%, rmap items,
the duplicate potential left). Besides the measurement, each run reports:

- expected: for redis, memcached and pytorch, what page-aligning the data should save: the
  pages entirely inside values of at least 8 KiB (ksm-wrap's default threshold) or the model's
  weights, times (copies - 1);
- data: the bytes the workload put into its processes; load seconds and throughput (operations
  per second while loading) where the workload has a rate.

serve() only starts and loads a workload's first run, prints the JSON ready line that
`ksmpreload compare --wait-ready` waits for and holds it until SIGTERM: the command that
`ksmpreload compare --workload NAME` runs for each arm.

Needs root (the KSM knobs, page frames) and the workload's programs: Debian's redis-server,
memcached, stress-ng; redis-py, pymemcache, torch or gunicorn for their workloads.
"""

from __future__ import annotations

import json
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import NoReturn

from .. import kernel, scanning
from ..errors import EXIT_USAGE, KsmError
from .. import processes as processes_module
from ..measurement import Measurement, follow, measure
from . import SIZES, Loaded, Run, memcached, prefork, pytorch, redis, stress_ng

# name: (description, runs(settings, strategy, processes, method, workdir))
WORKLOADS = {
    "redis": (redis.DESCRIPTION, redis.runs),
    "memcached": (memcached.DESCRIPTION, memcached.runs),
    "memcached-slabs": (memcached.SLABS_DESCRIPTION, memcached.slab_runs),
    "pytorch": (pytorch.DESCRIPTION, pytorch.runs),
    "stress-ng": (stress_ng.DESCRIPTION, stress_ng.runs),
    "python-prefork": (prefork.DESCRIPTION, prefork.runs),
}
METHODS = stress_ng.METHODS


@dataclass
class RunResult(Measurement):
    label: str | None = None
    expected_saved_bytes: int | None = None
    data_bytes: int = 0
    load_seconds: float | None = None
    throughput: float | None = None
    throughput_unit: str | None = None
    details: dict = field(default_factory=dict)


def check_options(name: str, size: str = "small", processes: int | None = None, method: str | None = None) -> None:
    """KsmError (usage) for options the workload cannot take, before anything starts."""
    if name not in WORKLOADS:
        raise KsmError(f"unknown workload {name} (known: {', '.join(WORKLOADS)})", EXIT_USAGE)
    if size not in SIZES:
        raise KsmError(f"unknown size {size} (known: {', '.join(SIZES)})", EXIT_USAGE)
    if method and name != "stress-ng":
        raise KsmError(f"--method is for the stress-ng workload, not {name}", EXIT_USAGE)
    if processes and name == "stress-ng":
        raise KsmError(
            f"the stress-ng workload runs {stress_ng.WORKERS} workers: --processes does not apply", EXIT_USAGE
        )


def workload_runs(
    name: str, size: str, strategy: str, processes: int | None, method: str | None, workdir: str
) -> list[Run]:
    check_options(name, size, processes, method)
    return WORKLOADS[name][1](SIZES[size], strategy, processes, method, workdir)


def run(
    name: str,
    size: str = "small",
    strategy: str = "auto",
    processes: int | None = None,
    method: str | None = None,
    on_run: Callable[[str], None] | None = None,
    on_sample: Callable[[int], None] | None = None,
) -> dict:
    """Every run of the workload, loaded and measured in turn: a dict (the report)."""
    kernel.require_ksm()
    started = time.time()
    results = []
    with tempfile.TemporaryDirectory(prefix=f"ksmpreload-{name}.") as workdir:
        for spec in workload_runs(name, size, strategy, processes, method, workdir):
            if on_run:
                on_run(spec.label)
            with spec.load() as loaded:
                results.append(measure_run(spec, loaded, SIZES[size]["timeout"], on_sample))
    return {
        "workload": name,
        "size": size,
        "strategy": strategy,
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "runs": [asdict(result) for result in results],
    }


def measure_run(spec: Run, loaded: Loaded, timeout: float, on_sample: Callable[[int], None] | None = None) -> RunResult:
    result = RunResult(
        label=spec.label,
        expected_saved_bytes=spec.expected_saved_bytes,
        data_bytes=sum(loaded.data_by_pid.values()),
        load_seconds=loaded.load_seconds,
        throughput=loaded.throughput,
        throughput_unit=loaded.throughput_unit,
        details={**spec.details, **loaded.details},
    )
    pids = list(loaded.data_by_pid)
    with scanning.fast_scanning():
        follow(lambda: pids, time.monotonic(), timeout, result, on_sample)
        measure(pids, result, loaded.data_by_pid, with_potential=True)
        if loaded.after_merge:
            result.details.update(loaded.after_merge())
    return result


def serve(
    name: str, size: str = "small", strategy: str = "none", processes: int | None = None, method: str | None = None
) -> NoReturn:
    """Start and load the workload's first run, print the ready line and hold it until SIGTERM,
    SIGHUP or SIGINT (edge.run_cli unwinds the stack on each, which stops the processes), or
    until the process that started it ends. strategy none: its processes inherit the ksm-wrap
    this was started under."""
    processes_module.end_with_parent()
    with tempfile.TemporaryDirectory(prefix=f"ksmpreload-{name}.") as workdir:
        spec = workload_runs(name, size, strategy, processes, method, workdir)[0]
        with spec.load() as loaded:
            ready = {
                "ready": True,
                "workload": name,
                "size": size,
                "label": spec.label,
                "pids": list(loaded.data_by_pid),
                "data_bytes": sum(loaded.data_by_pid.values()),
                "throughput": loaded.throughput,
                "throughput_unit": loaded.throughput_unit,
            }
            print(json.dumps(ready), flush=True)
            while True:
                signal.pause()
