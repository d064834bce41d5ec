"""`ksmpreload attach` and `detach` on running processes (issue 15): the process merges, keeps
running as it was (a read() it was blocked in gets its data, a sleep lasts as long as it should,
servers under load answer every request), and refusals and Ctrl-C leave it untouched."""

import contextlib
import ctypes
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import psutil
import pytest

from conftest import require, require_root_ksm
from ksmpreload import attached, kernel, scanning
from ksmpreload.processes import merged_pages
from ksmpreload.workloads.data import value, value_sizes

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


def unmerged(pids):
    """Detach has unmerged the pages of `pids`: the kernel breaks them at once, and its count
    (ksm_merging_pages) follows at ksmd's next pass over the process, within a few seconds here."""
    pids = list(pids)
    wait_for(lambda: merged_pages(pids) == 0, "the unmerge", timeout=20)


@contextlib.contextmanager
def c_program(c_programs, name):
    """One of tests/c's targets, once it has said it is ready (it then blocks reading stdin)."""
    proc = subprocess.Popen([c_programs(name)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"ready\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def finishes_after_a_byte(proc):
    """A tests/c target reads its byte and exits 0, as it would have without attach."""
    proc.stdin.write(b"x")
    proc.stdin.flush()
    return proc.wait(timeout=10) == 0


def answers(proc, line):
    """A reader gets `line` from its pipe and says so."""
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().split()[:2] == ["got", line]


def merge_any(pid):
    return (kernel.process_ksm_stat(pid) or {}).get("ksm_merge_any")


def test_attached_processes_merge_and_a_read_they_were_blocked_in_gets_its_data():
    with readers(2) as procs:
        pids = [str(proc.pid) for proc in procs]
        done = ksmpreload("attach", "--json", *pids)
        assert done.returncode == 0, done.stderr
        assert [entry["enabled"] for entry in json.loads(done.stdout)["processes"]] == [True, True]
        assert all(merge_any(proc.pid) == 1 for proc in procs)
        with scanning.fast_scanning():
            merged = scanning.wait_until_settled(lambda: merged_pages([proc.pid for proc in procs]), timeout=60)
            assert merged >= 0.9 * 2 * 64 * 64, merged  # 16 MiB twice: all but the pages of one copy share
            detached = ksmpreload("detach", *pids)
            assert detached.returncode == 0, detached.stderr
            assert all(merge_any(proc.pid) == 0 for proc in procs)
            unmerged(proc.pid for proc in procs)
        for proc in procs:
            assert answers(proc, "hello")
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
    with c_program(c_programs, "seccomp_strict") as proc:
        done = ksmpreload("attach", "--force", str(proc.pid))
        assert done.returncode == 1 and "seccomp strict mode" in done.stderr, done.stderr
        assert finishes_after_a_byte(proc), "it read its byte and exited as it would have"


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


def anonymous_marked(pid):
    """(start, end) of the anonymous regions of `pid` flagged mergeable."""
    return {
        (r["start"], r["end"]) for r in kernel.process_regions(pid) if kernel.is_anonymous_vma(r) and r["mergeable"]
    }


def test_the_madvise_way_marks_the_regions_and_detach_unmarks_them():
    with readers(2) as procs:
        pids = [str(proc.pid) for proc in procs]
        done = ksmpreload("attach", "--strategy", "madvise", "--threshold", "1M", "--json", *pids)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert [entry["strategy"] for entry in result["processes"]] == ["madvise", "madvise"]
        assert {entry["remedy"] for entry in result["predictions"]} >= {"as-is", "ksm-wrap"}
        for proc, entry in zip(procs, result["processes"]):
            assert merge_any(proc.pid) == 0 and len(anonymous_marked(proc.pid)) == entry["regions"] > 0
            assert all(end - start >= 1 << 20 for start, end in anonymous_marked(proc.pid))
        status = json.loads(ksmpreload("status", "--json").stdout)
        assert {p["pid"]: p["attached"] for p in status["processes"] if str(p["pid"]) in pids} == {
            proc.pid: "madvise" for proc in procs
        }
        with scanning.fast_scanning():
            merged = scanning.wait_until_settled(lambda: merged_pages([proc.pid for proc in procs]), timeout=60)
            assert merged >= 0.9 * 2 * 64 * 64, merged
            detached = ksmpreload("detach", *pids)
            assert detached.returncode == 0 and "unmarked" in detached.stdout, detached.stdout + detached.stderr
            assert not any(anonymous_marked(proc.pid) for proc in procs)
            unmerged(proc.pid for proc in procs)
        for proc in procs:
            assert answers(proc, "hello")


CTRL_C = """
import os, signal, sys
from ksmpreload import inject
from ksmpreload.cli import main

pid, where, at_call, strategy = sys.argv[1:5]
calls = []
def ctrl_c(real):
    def wrapped(self, *arguments):
        calls.append(arguments)
        if len(calls) == int(at_call):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C with the thread held
        return real(self, *arguments)
    return wrapped
setattr(inject.HeldThread, where, ctrl_c(getattr(inject.HeldThread, where)))
sys.argv = ["ksmpreload", "attach", "--no-predict", "--strategy", strategy, pid]
main()
"""


@pytest.mark.parametrize(
    "strategy, where, at_call, changed",
    [
        ("prctl", "_instruction_address", 1, False),  # before the call: nothing is done
        ("madvise", "call", 3, False),  # half-way: what was marked is unmarked
        ("prctl", "call", 1, True),  # during the call: it completes, and is shown
    ],
)
def test_ctrl_c_while_a_process_is_held(strategy, where, at_call, changed):
    with readers(1) as (proc,):
        before = anonymous_marked(proc.pid)
        done = subprocess.run(
            [sys.executable, "-c", CTRL_C, str(proc.pid), where, str(at_call), strategy],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr
        status = kernel.read_proc(proc.pid, "status")
        assert "TracerPid:\t0" in status and "State:\tS" in status, status
        assert merge_any(proc.pid) == int(changed)
        assert changed or anonymous_marked(proc.pid) == before, "marks made half-way are undone"
        assert (f"{proc.pid}: merging on" in done.stdout) == changed, done.stdout
        assert (attached.read(proc.pid) is not None) == changed, "a record exactly when it was changed"
        assert answers(proc, "after")


AS_NOBODY = """
import os, sys
from ksmpreload.cli import main  # imported as root: this interpreter lives under root's home

os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)  # every uid non-zero: the capabilities go too
sys.argv = ["ksmpreload", "attach", "--no-predict", sys.argv[1]]
main()
"""


def test_another_user_without_privilege_is_refused():
    """The tool run as nobody, without capabilities (as setpriv would run it; the interpreter
    is not reachable by nobody here, so it drops them itself): ptrace refuses, the target is
    untouched."""
    with readers(1) as (proc,):
        done = subprocess.run([sys.executable, "-c", AS_NOBODY, str(proc.pid)], capture_output=True, text=True,
                              timeout=60, cwd="/")  # fmt: skip
        assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
        assert "cannot trace" in done.stderr or "needs root" in done.stderr, done.stderr
        assert merge_any(proc.pid) == 0


class Writer(threading.Thread):
    """A client that keeps writing new keys to each server and reading them back, until stopped;
    what it wrote is checked at the end, and any error it met is kept."""

    def __init__(self, clients):
        super().__init__(daemon=True)
        self.clients, self.written, self.errors, self.halt = clients, 0, [], threading.Event()

    def run(self):
        try:
            while not self.halt.is_set():
                for client in self.clients:
                    key = f"w:{self.written}"
                    client.set(key, value(self.written + 10**6, 3000))
                    if client.get(key) != value(self.written + 10**6, 3000):
                        self.errors.append(f"{key} read back wrong")
                self.written += 1
        except Exception as error:  # kept for the test to report
            self.errors.append(repr(error))

    def stop(self):
        self.halt.set()
        self.join(timeout=60)


def merging_from_exec():
    ctypes.CDLL(None, use_errno=True).prctl(67, 1, 0, 0, 0)  # PR_SET_MEMORY_MERGE, inherited by exec (6.7+)


@contextlib.contextmanager
def redis_servers(count, merging_from_start):
    redis = pytest.importorskip("redis")
    from ksmpreload.workloads import redis as workload
    from ksmpreload.workloads.servers import free_port

    servers = []
    try:
        for _ in range(count):
            port = free_port()
            proc = subprocess.Popen(workload.server_command(port), stdout=subprocess.DEVNULL, cwd="/",
                                    preexec_fn=merging_from_exec if merging_from_start else None)  # fmt: skip
            client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=60)
            servers.append((proc, client))
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(redis.exceptions.ConnectionError):
                    if client.ping():
                        break
                assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
                time.sleep(0.05)
        yield servers
    finally:
        for proc, _ in servers:
            proc.kill()
            proc.wait()


REDIS_SIZES = value_sizes(24 << 20)
PATTERNS = [random.Random(index).randbytes(64) for index in range(32)]


def duplicate_items():
    """The keys and values loaded: each value repeats one of 32 patterns of 64 bytes, so each
    of its whole pages is one of 32 whatever the offset jemalloc puts it at (a multiple of 64
    bytes): what merges does not depend on the layout, which differs from run to run."""
    for index, size in enumerate(REDIS_SIZES):
        yield f"key:{index}".encode(), (PATTERNS[index % 32] * (size // 64 + 1))[:size]


def redis_run(attach_them, reach=None):
    """Merged pages of two redis-servers holding the same values: once KSM settles, with merging
    from their start; or, turned on by attach while a client writes, once they `reach` a count
    (within two minutes). Every key is read back."""
    from ksmpreload.workloads import redis as workload

    with redis_servers(2, merging_from_start=not attach_them) as servers:
        pids, clients = [proc.pid for proc, _ in servers], [client for _, client in servers]
        for client in clients:
            workload.load(client, duplicate_items())
        with scanning.fast_scanning():
            writer = Writer(clients)
            writer.start()
            time.sleep(0.5)
            if attach_them:
                done = ksmpreload("attach", "--no-predict", *map(str, pids))
                assert done.returncode == 0, done.stderr
            time.sleep(2)
            writer.stop()
            assert not writer.errors and writer.written > 10, (writer.errors, writer.written)
            if reach is None:
                merged = scanning.wait_until_settled(scanning.ignoring_flutter(lambda: merged_pages(pids)), timeout=120)
            else:
                wait_for(lambda: merged_pages(pids) >= reach, f"{reach} merged pages", timeout=120)
                merged = merged_pages(pids)
            for client in clients:
                keys, values = zip(*duplicate_items())
                assert client.mget(keys) == list(values)
                written = [f"w:{n}" for n in range(writer.written)]
                assert client.mget(written) == [value(n + 10**6, 3000) for n in range(writer.written)]
            if attach_them:
                assert ksmpreload("detach", *map(str, pids)).returncode == 0
                assert not any(merge_any(pid) for pid in pids)
                unmerged(pids)
        return merged


def test_redis_under_a_writing_client_merges_as_if_merging_from_its_start():
    require(shutil.which("redis-server"), "redis-server is missing (apt-get install redis-server)")
    from_start = redis_run(attach_them=False)
    assert from_start > 1000
    redis_run(attach_them=True, reach=0.9 * from_start)


def test_memcached_threads_in_epoll_wait_carry_on():
    pymemcache = pytest.importorskip("pymemcache.client.base")
    require(shutil.which("memcached"), "memcached is missing (apt-get install memcached)")
    from ksmpreload.workloads.servers import free_port

    port = free_port()
    proc = subprocess.Popen(["memcached", "-t", "4", "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-u", "root"])
    try:
        client = pymemcache.Client(("127.0.0.1", port), connect_timeout=5, timeout=30)
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                client.set("ready", b"1")
                break
            assert time.monotonic() < deadline, "memcached did not start"
            time.sleep(0.05)
        writer = Writer([client])
        writer.start()
        time.sleep(0.5)
        for _ in range(5):
            assert ksmpreload("attach", "--no-predict", str(proc.pid)).returncode == 0
            assert merge_any(proc.pid) == 1
            assert ksmpreload("detach", str(proc.pid)).returncode == 0
        writer.stop()
        assert not writer.errors and writer.written > 10, (writer.errors, writer.written)
        assert [client.get(f"w:{n}") for n in range(writer.written)] == [
            value(n + 10**6, 3000) for n in range(writer.written)
        ]
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


WSGI_APP = """
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
"""


def test_tree_attaches_a_gunicorn_master_and_its_workers_and_new_workers_inherit(tmp_path):
    pytest.importorskip("gunicorn")
    from ksmpreload.workloads.servers import free_port

    (tmp_path / "tiny_app.py").write_text(WSGI_APP)
    port = free_port()
    master = subprocess.Popen([sys.executable, "-m", "gunicorn", "--workers", "2", "--bind", f"127.0.0.1:{port}",
                               "tiny_app:app"], cwd=tmp_path, stderr=subprocess.DEVNULL)  # fmt: skip

    def workers():
        return [child.pid for child in psutil.Process(master.pid).children()]

    def get():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            return response.read()

    try:
        wait_for(lambda: len(workers()) == 2 and get() == b"ok")
        done = ksmpreload("attach", "--tree", "--no-predict", "--json", str(master.pid))
        assert done.returncode == 0, done.stderr
        attached = [entry["pid"] for entry in json.loads(done.stdout)["processes"]]
        assert attached[0] == master.pid and sorted(attached[1:]) == sorted(workers())
        assert all(merge_any(pid) == 1 for pid in attached) and get() == b"ok"
        os.kill(workers()[0], signal.SIGKILL)  # the master forks a new worker: it inherits merging
        wait_for(lambda: len(set(workers()) - set(attached)) == 1)
        (new,) = set(workers()) - set(attached)
        assert merge_any(new) == 1 and get() == b"ok"
    finally:
        master.terminate()
        master.wait(timeout=30)


def wait_for(condition, what="the condition", timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            if condition():
                return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_vfork_child_is_refused_and_its_parent_untouched(c_programs):
    with c_program(c_programs, "vfork_child") as parent:
        (child,) = psutil.Process(parent.pid).children()
        done = ksmpreload("attach", "--no-predict", str(child.pid))
        assert done.returncode == 1 and "shares its memory with its parent" in done.stderr, done.stderr
        assert merge_any(parent.pid) == 0
        assert finishes_after_a_byte(parent)


def test_one_failure_among_several_pids_reports_the_others_and_fails():
    with readers(1) as (proc,):
        done = ksmpreload("attach", "--no-predict", "--json", str(proc.pid), "999999")
        assert done.returncode == 1 and "999999" in done.stderr and len(done.stderr.splitlines()) == 1
        result = json.loads(done.stdout)
        assert [entry["pid"] for entry in result["processes"]] == [proc.pid] and merge_any(proc.pid) == 1
        assert [entry["pid"] for entry in result["failed"]] == [999999]


def test_detach_leaves_a_process_its_own_merging_unless_forced():
    own = subprocess.Popen([sys.executable, "-c", MERGE_ITSELF_AND_WAIT], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert own.stdout.readline() == "ready\n" and merge_any(own.pid) == 1
        done = ksmpreload("attach", "--no-predict", str(own.pid))
        assert done.returncode == 0 and "on already" in done.stdout and attached.read(own.pid) is None
        refused = ksmpreload("detach", str(own.pid))
        assert refused.returncode == 1 and "no record" in refused.stderr and merge_any(own.pid) == 1
        assert ksmpreload("detach", "--force", str(own.pid)).returncode == 0 and merge_any(own.pid) == 0
    finally:
        own.kill()
        own.wait()


MERGE_ITSELF_AND_WAIT = """
import sys, ksmpreload
ksmpreload.merge_this_process()
print("ready", flush=True)
sys.stdin.read()
"""


def test_bad_records_count_as_none_and_go(tmp_path):
    """A corrupt, foreign-shaped or stale record file: status reads on, attach treats the process
    as never attached, and root's next look removes the file."""
    with readers(1) as (proc,):
        os.makedirs(attached.RECORDS_DIR, exist_ok=True)
        for content in ("[]", "null", '{"pid": %d}' % proc.pid, '{"pid": %d, "strategy": "madvise", '
                        '"started": null, "regions": [[0, 1e23]]}' % proc.pid, "{not json"):  # fmt: skip
            path = os.path.join(attached.RECORDS_DIR, f"{proc.pid}.json")
            with open(path, "w") as record:
                record.write(content)
            status = ksmpreload("status", "--json")
            assert status.returncode == 0 and "Traceback" not in status.stderr, (content, status.stderr)
            assert not os.path.exists(path), f"{content!r} was not removed"
        stale = os.path.join(attached.RECORDS_DIR, "4000000.json")
        with open(stale, "w") as record:
            json.dump({"pid": 4000000, "started": 1.0, "strategy": "prctl", "regions": []}, record)
        assert ksmpreload("status").returncode == 0 and not os.path.exists(stale)
        done = ksmpreload("attach", "--no-predict", str(proc.pid))
        assert done.returncode == 0 and attached.read(proc.pid)["strategy"] == "prctl"


def test_a_process_under_a_seccomp_filter_is_refused_unless_forced(c_programs):
    with c_program(c_programs, "seccomp_filter") as proc:
        refused = ksmpreload("attach", "--no-predict", str(proc.pid))
        assert refused.returncode == 1 and "seccomp filter" in refused.stderr and "--force" in refused.stderr
        assert len(refused.stderr.splitlines()) == 1 and merge_any(proc.pid) == 0
        forced = ksmpreload("attach", "--no-predict", "--force", str(proc.pid))
        assert forced.returncode == 0 and merge_any(proc.pid) == 1, forced.stderr
        assert finishes_after_a_byte(proc), "it read its byte and exited as it would have"
