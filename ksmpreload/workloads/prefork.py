"""python-prefork: a gunicorn master loads an index of ordinary Python objects (prefork_app.py)
and forks N workers; each worker runs a full garbage collection (prefork_hooks.py), so
copy-on-write has copied the master's pages into every worker although their contents are
equal. With ksm-wrap on the master, merging is inherited across fork and KSM can fold the
copies back.

Besides the measurement, the run reports the summed PSS of master and workers (what they really
take: each page divided among the processes that map it) at four points, and two request load
runs (requests/s, p50 and p99 latency, and the copy-on-write faults on KSM pages: cow_ksm of
/proc/vmstat, machine-wide):
  pss_ready          the workers have started and collected garbage;
  load_before_merge  requests for drive_seconds, before KSM scans;
  pss_before_merge   after them: the requests' reference counts have copied more pages;
  (merging, measured)
  pss_after_merge    once merging settled;
  load_after_merge   requests for drive_seconds, KSM still scanning: each write to a merged page
                     (a reference count) is a copy-on-write fault;
  pss_after_load     after them.

"saved" (saving.py) counts what the KSM pages save by the kernel's accounting: a page that all
processes still shared from the fork, once KSM adopts it as a KSM page, counts as saving c - 1
pages although the fork already shared it. The PSS figures show what the processes really take."""

from __future__ import annotations

import contextlib
import http.client
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator

import psutil

from .. import kernel
from ..errors import KsmError
from ..processes import process_tree, spawn, stop_parent_first
from . import Loaded, Run, counted
from .servers import free_port, require_module, wrapped

DESCRIPTION = "a gunicorn master with an index of Python objects and N forked workers, under request load"
CONNECTIONS = 8  # client threads of the load run
START_TIMEOUT = 300


def gunicorn_command(port: int, workers: int) -> list[str]:
    return [sys.executable, "-m", "gunicorn", "--preload", "--workers", str(workers), "--bind", f"127.0.0.1:{port}",
            "--config", "python:ksmpreload.workloads.prefork_hooks", "--log-level", "warning",
            "ksmpreload.workloads.prefork_app:app"]  # fmt: skip


def pss_bytes(pids: Iterable[int]) -> int:
    """The processes' summed PSS: each page divided among the processes that map it."""
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += psutil.Process(pid).memory_full_info().pss
    return total


def cow_ksm() -> int:
    """Copy-on-write faults on KSM pages, machine-wide (/proc/vmstat)."""
    return kernel.vmstat().get("cow_ksm", 0)


def drive(port: int, seconds: float, connections: int = CONNECTIONS) -> dict:
    """Requests from `connections` threads for `seconds`: requests/s, p50 and p99 in ms, and
    cow_ksm during the run."""
    latencies, errors, stop_at = [], [], time.monotonic() + seconds

    def client(number):
        request = 0
        while time.monotonic() < stop_at:
            began = time.monotonic()
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                connection.request("GET", f"/items?{number}-{request}")
                connection.getresponse().read()
                connection.close()
            except (OSError, http.client.HTTPException) as error:
                errors.append(str(error))
                continue
            latencies.append(time.monotonic() - began)
            request += 1

    faults_before, began = cow_ksm(), time.monotonic()
    threads = [threading.Thread(target=client, args=(number,)) for number in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    ordered = sorted(latencies)
    return {
        "requests": len(ordered),
        "errors": len(errors),
        "requests_per_s": round(len(ordered) / elapsed, 1),
        "p50_ms": round(1000 * ordered[len(ordered) // 2], 2) if ordered else None,
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2) if ordered else None,
        "cow_ksm": cow_ksm() - faults_before,
    }


def wait_until_ready(proc: subprocess.Popen, ready_dir: str, workers: int) -> dict[int, int]:
    """{pid: index bytes} of the master and its workers once every worker has collected."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        names = os.listdir(ready_dir)
        if "master" in names and sum(name.startswith("worker-") for name in names) >= workers:
            with open(os.path.join(ready_dir, "master")) as f:
                index_bytes = int(f.read())
            return {pid: index_bytes for pid in process_tree(proc.pid)}
        if proc.poll() is not None:
            raise KsmError(f"gunicorn exited with {proc.returncode} before its workers were ready")
        time.sleep(0.1)
    raise KsmError(f"gunicorn's {workers} workers were not ready in {START_TIMEOUT} s")


@contextlib.contextmanager
def server(objects: int, workers: int, strategy: str, drive_seconds: float, workdir: str) -> Iterator[Loaded]:
    require_module("gunicorn")
    ready_dir = os.path.join(workdir, f"ready-{time.monotonic_ns()}")
    os.mkdir(ready_dir)
    env = {**os.environ, "KSMPRELOAD_PREFORK_OBJECTS": str(objects), "KSMPRELOAD_PREFORK_READY": ready_dir}
    port = free_port()
    with open(os.path.join(workdir, f"gunicorn-{port}.log"), "w") as log:
        proc = spawn(wrapped(gunicorn_command(port, workers), strategy), env=env, cwd="/",
                     stdin=subprocess.DEVNULL, stdout=log, stderr=log)  # fmt: skip
    try:
        data_by_pid = wait_until_ready(proc, ready_dir, workers)
        pids = list(data_by_pid)
        details = {"pss_ready_bytes": pss_bytes(pids), "load_before_merge": drive(port, drive_seconds)}
        details["pss_before_merge_bytes"] = pss_bytes(pids)

        def after_merge():
            merged = {"pss_after_merge_bytes": pss_bytes(pids), "load_after_merge": drive(port, drive_seconds)}
            merged["pss_after_load_bytes"] = pss_bytes(pids)
            return merged

        yield Loaded(data_by_pid, details=details, after_merge=after_merge)
    finally:
        stop_parent_first(proc)


def runs(settings: dict, strategy: str, processes: int | None, method: str | None, workdir: str) -> list[Run]:
    workers = processes or 4
    return [
        Run(
            f"1 master + {counted(workers, 'worker')}, {settings['index_objects']:,} objects",
            lambda: server(settings["index_objects"], workers, strategy, settings["drive_seconds"], workdir),
            details={"workers": workers, "objects": settings["index_objects"]},
        )
    ]
