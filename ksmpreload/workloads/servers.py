"""Starting and stopping the workloads' processes: under ksm-wrap with a strategy, or without
it (strategy none), on a free loopback port, with their output in a log file."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterable
from types import ModuleType

from ..errors import KsmError
from ..processes import ksm_wrap_command, spawn, stop_tree

STRATEGIES = ("auto", "prctl", "madvise", "none")


def wrapped(command: list[str], strategy: str) -> list[str]:
    """The command under ksm-wrap with `strategy`, or as it is for none. --quiet: KSM may be off
    while the workload loads; the runner turns it on to measure."""
    return list(command) if strategy == "none" else [*ksm_wrap_command(), "--quiet", "--strategy", strategy, *command]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(command: list[str], strategy: str, port: int, workdir: str, timeout: float = 30.0) -> subprocess.Popen:
    """The server behind ksm-wrap (or not), once it accepts connections on `port`."""
    log_path = os.path.join(workdir, f"{os.path.basename(command[0])}-{port}.log")
    with open(log_path, "w") as log:
        proc = spawn(wrapped(command, strategy), stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd="/")
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            ended = proc.poll()
            stop([proc])
            with open(log_path) as log:
                said = " ".join(log.read()[-500:].split()) or "nothing in its log"
            how = f"exited with {ended}" if ended is not None else f"not listening after {timeout:.0f} s"
            raise KsmError(f"{command[0]} did not start on port {port} ({how}): {said}")
        time.sleep(0.05)


def stop(procs: Iterable[subprocess.Popen]) -> None:
    """Stop the processes and their descendants (stop_tree: SIGTERM, SIGKILL after 15 s)."""
    for proc in procs:
        stop_tree(proc)


def require_module(name: str, package: str | None = None) -> ModuleType:
    """Import the Python module a workload drives its servers with, or say what to install."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise KsmError(f"this workload needs the Python module {name}: pip install {package or name}") from None
