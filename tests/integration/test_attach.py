"""`ksmpreload attach` and `detach` on running processes (issue 15, first part: prctl on x86-64):
the process merges, keeps running as it was (a read() it was blocked in gets its data, a sleep
lasts as long as it should), and refusals leave the process untouched."""

import contextlib
import json
import platform
import shutil
import subprocess
import sys
import time

import pytest

from conftest import require, require_root_ksm
from ksmpreload import kernel, scanning
from ksmpreload.processes import merged_pages

READER = """
import random, sys
data = [random.Random(1).randbytes(256 << 10) for _ in range(64)]  # 16 MiB, the same in every reader
print("ready", flush=True)
line = sys.stdin.readline()
print("got", line.strip(), sum(block[7] for block in data), flush=True)
"""


@pytest.fixture(autouse=True)
def x86_64_root_ksm():
    require_root_ksm()
    require(platform.machine() == "x86_64", "attach is for x86-64 only so far")


def ksmpreload(*args):
    return subprocess.run(["ksmpreload", *args], capture_output=True, text=True, timeout=60)


@contextlib.contextmanager
def readers(count):
    """Python processes blocked in a read() on a pipe (stdin), each holding the same 16 MiB."""
    procs = [subprocess.Popen([sys.executable, "-c", READER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for _ in range(count)]  # fmt: skip
    try:
        for proc in procs:
            assert proc.stdout.readline() == "ready\n"
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def merge_any(pid):
    return (kernel.process_ksm_stat(pid) or {}).get("ksm_merge_any")


def test_attached_processes_merge_and_a_read_they_were_blocked_in_gets_its_data():
    with readers(2) as procs:
        pids = [str(proc.pid) for proc in procs]
        done = ksmpreload("attach", "--json", *pids)
        assert done.returncode == 0, done.stderr
        assert [entry["enabled"] for entry in json.loads(done.stdout)] == [True, True]
        assert all(merge_any(proc.pid) == 1 for proc in procs)
        with scanning.fast_scanning():
            merged = scanning.wait_until_settled(lambda: merged_pages([proc.pid for proc in procs]), timeout=60)
            assert merged >= 0.9 * 2 * 64 * 64, merged  # 16 MiB twice: all but the pages of one copy share
            detached = ksmpreload("detach", *pids)
            assert detached.returncode == 0, detached.stderr
            assert all(merge_any(proc.pid) == 0 for proc in procs)
            assert merged_pages([proc.pid for proc in procs]) == 0, "detach unmerges"
        for proc in procs:
            proc.stdin.write("hello\n")
            proc.stdin.flush()
            assert proc.stdout.readline().split()[:2] == ["got", "hello"]
            assert proc.wait(timeout=10) == 0


def test_a_sleep_lasts_as_long_as_it_should():
    sleeper = subprocess.Popen(
        [sys.executable, "-c", "import time; t = time.monotonic(); time.sleep(2); print(time.monotonic() - t)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    assert ksmpreload("attach", str(sleeper.pid)).returncode == 0
    slept = float(sleeper.stdout.read())
    assert sleeper.wait(timeout=10) == 0 and 2.0 <= slept < 3.0, slept


def test_refusals_leave_the_process_untouched():
    done = ksmpreload("attach", "999999999")
    assert done.returncode == 2 or "no process" in done.stderr  # beyond pid_max: click or the check
    ksmd = kernel.ksmd_pid()
    if ksmd:
        done = ksmpreload("attach", str(ksmd))
        assert done.returncode == 1 and "kernel thread" in done.stderr and len(done.stderr.splitlines()) == 1
    require(shutil.which("strace"), "strace is missing (apt-get install strace)")
    with readers(1) as (proc,):
        tracer = subprocess.Popen(["strace", "-q", "-o", "/dev/null", "-p", str(proc.pid)])
        try:
            deadline = time.monotonic() + 10
            while "TracerPid:\t0" in kernel.read_proc(proc.pid, "status") and time.monotonic() < deadline:
                time.sleep(0.05)
            done = ksmpreload("attach", str(proc.pid))
        finally:
            tracer.terminate()
            tracer.wait()
        assert done.returncode == 1 and "traced already" in done.stderr, done.stderr
        assert merge_any(proc.pid) == 0


def test_a_stopped_process_stays_stopped_and_carries_on_after_sigcont():
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        sleeper.send_signal(19)  # SIGSTOP
        deadline = time.monotonic() + 10
        while "T (stopped)" not in kernel.read_proc(sleeper.pid, "status") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ksmpreload("attach", str(sleeper.pid)).returncode == 0
        status = kernel.read_proc(sleeper.pid, "status")
        assert "T (stopped)" in status and "ShdPnd:\t0000000000000000" in status, status
        sleeper.send_signal(18)  # SIGCONT
        time.sleep(0.2)
        assert "S (sleeping)" in kernel.read_proc(sleeper.pid, "status") and merge_any(sleeper.pid) == 1
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_process_in_seccomp_strict_mode_is_refused_and_lives(c_programs):
    proc = subprocess.Popen([c_programs("seccomp_strict")], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"ready\n"
        done = ksmpreload("attach", "--force", str(proc.pid))
        assert done.returncode == 1 and "seccomp strict mode" in done.stderr, done.stderr
        proc.stdin.write(b"x")
        proc.stdin.flush()
        assert proc.wait(timeout=10) == 0, "it read its byte and exited as it would have"
    finally:
        proc.kill()
        proc.wait()


MERGE_ITSELF = """
import sys, ksmpreload
how = ksmpreload.merge_this_process() if sys.argv[1] == "whole" else ksmpreload.mark_anonymous_mergeable()
stat = dict(line.split(":", 1) if ":" in line else line.split(" ", 1) for line in open("/proc/self/ksm_stat"))
print(how, stat["ksm_merge_any"].strip(), stat["ksm_mergeable"].strip())
"""


def test_a_python_program_merges_itself():
    """ksmpreload.merge_this_process(): prctl on this kernel; the madvise way it falls back to
    (before 6.4) marks the anonymous mappings as they are, without merge-any."""
    whole = subprocess.run([sys.executable, "-c", MERGE_ITSELF, "whole"], capture_output=True, text=True, check=True)
    assert whole.stdout.split() == ["prctl", "yes", "yes"], whole.stdout
    marked = subprocess.run([sys.executable, "-c", MERGE_ITSELF, "madvise"], capture_output=True, text=True, check=True)
    count, merge_any, mergeable = marked.stdout.split()
    assert int(count) > 0 and merge_any == "no" and mergeable == "yes", marked.stdout
