"""The processes the tool starts and watches (compare, doctor, demo and the benchmarks):
ksm-wrap's command line, a process and its descendants, their merged pages and resident
memory, stopping them, and worker processes that say when their data is ready."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

import psutil

from . import kernel
from .errors import KsmError


def ksm_wrap_command() -> list[str]:
    """How to run ksm-wrap from Python: the installed script beside this interpreter, else
    `python -m` (which, run from a source checkout, would import the unbuilt package there)."""
    script = os.path.join(os.path.dirname(sys.executable), "ksm-wrap")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "ksmpreload.wrap"]


def process_tree(pid: int) -> list[int]:
    """pid and its descendants; [] when it is gone."""
    try:
        parent = psutil.Process(pid)
        return [parent.pid] + [child.pid for child in parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def merged_pages(pids: Iterable[int]) -> int:
    return sum((kernel.process_ksm_stat(pid) or {}).get("ksm_merging_pages", 0) for pid in pids)


def resident_bytes(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.NoSuchProcess:
        return 0


def stop_tree(proc: subprocess.Popen) -> None:
    """SIGTERM to the process and its descendants, the youngest first; SIGKILL after 15 s."""
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


def stop_parent_first(proc: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM to the process alone, for a parent that stops its own children (a prefork master,
    stress-ng: a child killed on its own would be replaced by a new one that outlives the run);
    after `grace` seconds SIGKILL to the tree, the parent first."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
        return
    except subprocess.TimeoutExpired:
        pass
    for pid in process_tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


PR_SET_PDEATHSIG = 1


def end_with_parent() -> None:
    """SIGTERM to this process when the one that started it ends (prctl PR_SET_PDEATHSIG), so
    that a killed `ksmpreload compare` leaves no workload behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getppid()
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it ended before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def start_workers(commands: Iterable[list[str]]) -> list[subprocess.Popen[str]]:
    """Starts every command, then waits for each one's JSON line (kept as `proc.report`): the
    workers hold their data until their stdin closes. Stopped (SIGTERM) if anything goes wrong
    meanwhile, Ctrl-C included."""
    # cwd "/": started in a source checkout, `-m ksmpreload...` would import the unbuilt package there.
    workers = []
    try:
        for command in commands:
            workers.append(spawn(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/"))
        for proc in workers:
            line = proc.stdout.readline()
            if not line:
                raise KsmError(f"a worker ({' '.join(proc.args[:4])} ...) exited before it was ready")
            proc.report = json.loads(line)
    except BaseException:
        stop_workers(workers, terminate=True)
        raise
    return workers


def stop_workers(workers: list[subprocess.Popen], terminate: bool = False) -> None:
    """Close their stdin (they end once they read its end), or SIGTERM them; reap them."""
    for proc in workers:
        if proc.stdin and not proc.stdin.closed:
            proc.stdin.close()
        if terminate:
            proc.terminate()
    for proc in workers:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def spawn(command: list[str], **options: Any) -> subprocess.Popen:
    """subprocess.Popen(command), with a program that cannot be run as a KsmError."""
    try:
        return subprocess.Popen(command, **options)
    except OSError as error:
        raise KsmError(f"cannot run {command[0]}: {error.strerror} (is it installed?)") from None
