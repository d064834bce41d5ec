"""Real test suites under the shim: what a program sees must not change.

CPython's own regression tests, stress-ng's memory stressors and Redis forking for BGSAVE run
with libksmpreload.so preloaded and without it; the results must be the same. These are
reduced runs sized for CI (about three and a half minutes in all on two cores); the full runs,
with the machine and the timings, are in docs/HARMLESS.md. KSM need not be running: the shim
marks memory all the same, and its counters show that it did.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest

from conftest import allocators, free_port

from ksmpreload.workloads.redis import server_command
from ksmpreload import shimstats

slow = pytest.mark.slow


def clean_environment():
    """os.environ without any preload or shim setting, for the runs without the shim."""
    return {
        name: value for name, value in os.environ.items() if name != "LD_PRELOAD" and not name.startswith("KSMPRELOAD_")
    }


class ShimActivity:
    """The counters files in a stats directory, read every 0.2 s while a run goes on (a
    process removes its file at normal exit) and once more at the end."""

    def __init__(self, directory):
        self.directory = str(directory)
        self.files = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._read()

    def _poll(self):
        while not self._stop.wait(0.2):
            self._read()

    def _read(self):
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        for name in names:
            try:
                with open(os.path.join(self.directory, name), "rb") as f:
                    self.files[name] = shimstats.parse_stats(f.read())
            except (OSError, ValueError):
                continue

    def large_blocks(self):
        """Large heap blocks and mappings the shim handled, over every process seen."""
        return sum(s["heap_regions"] + s["mmap_regions"] for s in self.files.values())

    def settings(self, slot):
        return {s[slot] for s in self.files.values()}

    def check(self, strategy, threshold=None):
        assert self.files, f"no process published counters in {self.directory}: was the shim loaded?"
        assert self.settings("strategy") == {strategy}
        if threshold is not None:
            assert self.settings("threshold") == {threshold}
        assert self.large_blocks() > 0, "the shim saw no large allocation or mapping"


# ---- CPython's regression tests ------------------------------------------------------------

# Debian-like Python installs may lack the multiprocessing test packages (this one has only
# test/_test_multiprocessing.py, which holds every test); these are CPython 3.11's own
# wrapper modules, written to a --testdir.
MP_INIT = """import os.path
from test import support


def load_tests(*args):
    return support.load_package_tests(os.path.dirname(__file__), *args)
"""
MP_MODULE = """from test._test_multiprocessing import install_tests_in_module_dict

install_tests_in_module_dict(globals(), {method!r}, {selection})
"""
MP_PARTS = {
    "processes": 'only_type="processes"',
    "threads": 'only_type="threads"',
    "manager": 'only_type="manager"',
    "misc": "exclude_types=True",
}


def write_multiprocessing_tests(directory, methods=("fork", "forkserver", "spawn")):
    """test_multiprocessing_<method>.test_<part> packages under `directory`, as in CPython 3.11."""
    for method in methods:
        package = os.path.join(directory, f"test_multiprocessing_{method}")
        os.makedirs(package, exist_ok=True)
        with open(os.path.join(package, "__init__.py"), "w") as f:
            f.write(MP_INIT)
        for part, selection in MP_PARTS.items():
            with open(os.path.join(package, f"test_{part}.py"), "w") as f:
                f.write(MP_MODULE.format(method=method, selection=selection))
    return str(directory)


FORKSERVER = "test_multiprocessing_forkserver.test_processes"
# Memory, threads and processes, about 30 s with -j2 on two cores. Left out to fit: the lock
# primitive classes of test_threading (threads, fork with threads and subinterpreters stay),
# test_subprocess's ProcessTestCase and its NoPoll twin (POSIXProcessTestCase keeps fork,
# exec, fds and preexec_fn) and the forkserver Process class.
REGRTEST_SELECTION = {
    "test.test_mmap": ["test.test_mmap.*"],
    "test.test_bytes": ["test.test_bytes.*"],
    "test.test_gc": ["test.test_gc.*"],
    "test.test_threading": [
        f"test.test_threading.{name}.*"
        for name in (
            "ThreadTests",
            "ThreadJoinOnShutdown",
            "SubinterpThreadingTests",
            "ThreadingExceptionTests",
            "AtexitTests",
            "TimerTests",
            "ExceptHookTests",
            "InterruptMainTests",
            "MiscTestCase",
        )
    ],
    "test.test_thread": ["test.test_thread.*"],
    "test.test_fork1": ["test.test_fork1.*"],
    "test.test_subprocess": ["test.test_subprocess.POSIXProcessTestCase.*", "test.test_subprocess.RunFuncTestCase.*"],
    FORKSERVER: [
        f"{FORKSERVER}.WithProcessesTest{name}.*"
        for name in ("Heap", "SharedMemory", "Array", "Value", "Queue", "Pool", "Connection")
    ],
}
# Fails here with and without the shim: a .pth file of this Python imports threading at
# start-up, and this test asserts that `python -I` has not imported it.
REGRTEST_IGNORE = ["test_import_from_another_thread"]


# `python -m test` with SIGINT handled: a shell's background job inherits SIGINT ignored, and
# then the tests that expect KeyboardInterrupt fail with and without the shim alike.
REGRTEST = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'test'; runpy.run_module('test', run_name='__main__', alter_sys=True)"
)


def regrtest(env, workdir, testdir):
    command = [
        sys.executable,
        "-c",
        REGRTEST,
        "--testdir",
        testdir,
        "-j2",
        "--timeout",
        "300",
        "--tempdir",
        str(workdir / "regrtest"),
    ]
    for patterns in REGRTEST_SELECTION.values():
        for pattern in patterns:
            command += ["-m", pattern]
    for pattern in REGRTEST_IGNORE:  # after the -m patterns: the last filter given wins
        command += ["-i", pattern]
    command += list(REGRTEST_SELECTION)
    result = subprocess.run(command, env=env, cwd=workdir, capture_output=True, text=True, timeout=900)
    return result, regrtest_summary(result.stdout)


def regrtest_summary(output):
    """The final report of regrtest (which files passed, failed or skipped, test counts, the
    result) without its duration."""
    lines = output.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("== Tests result:")]
    assert starts, "regrtest printed no result:\n" + output[-3000:]
    return [line for line in lines[starts[-1] :] if line.strip() and not line.startswith("Total duration:")]


@pytest.fixture(scope="module")
def mp_testdir(tmp_path_factory):
    return write_multiprocessing_tests(tmp_path_factory.mktemp("mp-tests"), methods=("forkserver",))


@pytest.fixture(scope="module")
def regrtest_without_shim(tmp_path_factory, mp_testdir):
    result, summary = regrtest(clean_environment(), tmp_path_factory.mktemp("regrtest-plain"), mp_testdir)
    assert "Result: SUCCESS" in summary, result.stdout[-5000:] + result.stderr[-2000:]
    return summary


@slow
@pytest.mark.parametrize(
    "strategy, threshold",
    [("prctl", None), ("madvise", None), ("prctl", 4096), ("madvise", 4096)],
    ids=["prctl", "madvise", "prctl-4K", "madvise-4K"],
)
def test_cpython_regrtest_same_under_shim(regrtest_without_shim, mp_testdir, shim_env, tmp_path, strategy, threshold):
    settings = {"strategy": strategy} if threshold is None else {"strategy": strategy, "threshold": threshold}
    env = shim_env(**settings)
    with ShimActivity(env["KSMPRELOAD_STATS_DIR"]) as activity:
        result, summary = regrtest(env, tmp_path, mp_testdir)
    assert summary == regrtest_without_shim, result.stdout[-8000:] + result.stderr[-2000:]
    activity.check(strategy, threshold)


def test_regrtest_summary_shows_a_failure():
    """The comparison can fail: one failing test changes the summary."""
    passing = [
        "== Tests result: SUCCESS ==",
        "All 8 tests OK.",
        "Total duration: 31.0 sec",
        "Total tests: run=1,020 (filtered) skipped=58",
        "Result: SUCCESS",
    ]
    failing = [
        "== Tests result: FAILURE ==",
        "1 test failed:",
        "    test.test_mmap",
        "7 tests OK.",
        "Total duration: 31.0 sec",
        "Total tests: run=1,020 (filtered) failures=1 skipped=58",
        "Result: FAILURE",
    ]
    assert regrtest_summary("\n".join(["0:00:01 [1/8] test.test_mmap passed", *passing])) == [
        line for line in passing if not line.startswith("Total duration")
    ]
    assert regrtest_summary("\n".join(failing)) != regrtest_summary("\n".join(passing))


# ---- stress-ng -----------------------------------------------------------------------------

STRESSORS = ["malloc", "mmap", "brk", "fork", "vm"]
STRESS_ARGS = [
    "--malloc",
    "1",
    "--malloc-bytes",
    "256K",
    "--malloc-touch",
    "--malloc-pthreads",
    "2",
    "--mmap",
    "1",
    "--mmap-bytes",
    "16M",
    "--brk",
    "1",
    "--fork",
    "1",
    "--vm",
    "1",
    "--vm-bytes",
    "64M",
    "--timeout",
    "3s",
    "--metrics-brief",
    "--verify",
]


@pytest.mark.skipif(not shutil.which("stress-ng"), reason="stress-ng missing")
@pytest.mark.parametrize("preload_after", allocators())
@pytest.mark.parametrize(
    "strategy, threshold",
    [(None, None), ("prctl", None), ("madvise", 4096)],
    ids=["without-shim", "prctl", "madvise-4K"],
)
def test_stress_ng_memory_stressors(shim_env, tmp_path, preload_after, strategy, threshold):
    if strategy is None:
        env = clean_environment()
        if preload_after:
            env["LD_PRELOAD"] = " ".join(preload_after)
    else:
        settings = {"strategy": strategy} if threshold is None else {"strategy": strategy, "threshold": threshold}
        env = shim_env(preload_after, **settings)
    with ShimActivity(tmp_path / "stats") as activity:
        result = subprocess.run(
            ["stress-ng", *STRESS_ARGS, "--temp-path", str(tmp_path)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "successful run completed" in output
    assert not [line for line in output.splitlines() if re.search(r"fail|error", line, re.I)], output
    reported = set(re.findall(r"metrc: \[\d+\] (\w+) +\d+ ", output))
    assert reported >= set(STRESSORS), output
    if strategy is None:
        assert not activity.files
    else:
        activity.check(strategy, threshold)


# ---- Redis: BGSAVE forks while clients write -----------------------------------------------

KEYS, BATCH = 3000, 250
VALUE_SIZES = (64, 1000, 5000, 9000, 20000, 70000)  # about half at or above the 8K threshold


def value_for(key, generation):
    """A value that can be recomputed from its key and generation, of a size set by the key."""
    digest = hashlib.sha256(f"{key}/{generation}".encode()).hexdigest().encode()
    size = VALUE_SIZES[int(digest[:4], 16) % len(VALUE_SIZES)]
    return (digest * (size // len(digest) + 1))[:size]


def start_redis(prefix, port, directory, env):
    import redis

    log = directory / f"redis-{port}.log"
    proc = subprocess.Popen(
        [*prefix, *server_command(port, "--dbfilename", "dump.rdb", "--logfile", str(log), directory=directory)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=60)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.ping()
            return proc, client, log
        except (redis.ConnectionError, redis.BusyLoadingError):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"redis-server did not start: {proc.communicate()[1]}")
            time.sleep(0.05)


def stop_redis(proc, client):
    client.shutdown(nosave=True)
    assert proc.wait(timeout=30) == 0


def wait_no_bgsave(client, timeout=60):
    deadline = time.monotonic() + timeout
    while client.info("persistence")["rdb_bgsave_in_progress"]:
        assert time.monotonic() < deadline, "BGSAVE still running"
        time.sleep(0.05)


def start_bgsave(client):
    """BGSAVE now; False when one is still running (Redis then refuses a second)."""
    import redis

    try:
        client.bgsave(schedule=False)
        return True
    except redis.ResponseError as error:
        assert "already in progress" in str(error), error
        return False


def bgsave_after_now(client):
    """A BGSAVE that forks after every write made so far, and its completion."""
    while True:
        wait_no_bgsave(client)
        if start_bgsave(client):
            break
    time.sleep(0.05)
    wait_no_bgsave(client)


def write_while_saving(client):
    """Keys written in batches, a BGSAVE after each batch, and the previous batch overwritten
    while that BGSAVE's child runs. Returns {key: generation} of the final values."""
    generations = {}
    batches = [[f"harmless:{i}" for i in range(start, start + BATCH)] for start in range(0, KEYS, BATCH)]
    for number, keys in enumerate(batches):
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.set(key, value_for(key, 0))
            generations[key] = 0
        pipe.execute()
        start_bgsave(client)
        if number:
            pipe = client.pipeline(transaction=False)
            for key in batches[number - 1]:
                pipe.set(key, value_for(key, 1))
                generations[key] = 1
            pipe.execute()
    return generations


def check_values(client, generations):
    keys = sorted(generations)
    wrong = []
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        for key, value in zip(chunk, client.mget(chunk)):
            if value != value_for(key, generations[key]):
                wrong.append(key)
    assert not wrong, f"{len(wrong)} of {len(keys)} keys read back wrong, first {wrong[:5]}"


@slow
@pytest.mark.skipif(
    not shutil.which("redis-server") or not shutil.which("redis-benchmark"),
    reason="redis-server or redis-benchmark missing",
)
@pytest.mark.parametrize(
    "wrap_args, strategy",
    [(None, None), ((), "prctl"), (("--strategy", "madvise"), "madvise")],
    ids=["without-shim", "ksm-wrap", "ksm-wrap-madvise"],
)
def test_redis_bgsave_under_load_keeps_every_value(shim, tmp_path, wrap_args, strategy):
    env = clean_environment()
    env["KSMPRELOAD_SHIM"] = shim  # ksm-wrap preloads the shim under test
    env["KSMPRELOAD_STATS_DIR"] = str(tmp_path / "stats")
    prefix = [] if wrap_args is None else ["ksm-wrap", *wrap_args]
    proc, client, log = start_redis(prefix, free_port(), tmp_path, env)
    port = client.connection_pool.connection_kwargs["port"]
    benchmark_log = open(tmp_path / "benchmark.log", "w")
    benchmark = subprocess.Popen(
        [
            "redis-benchmark",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-c",
            "4",
            "-n",
            "10000000",
            "-r",
            "5000",
            "-d",
            "10000",
            "-t",
            "set,lpush,incr",
            "-q",
        ],
        stdout=benchmark_log,
        stderr=subprocess.STDOUT,
    )
    try:
        with ShimActivity(tmp_path / "stats") as activity:
            generations = write_while_saving(client)
            bgsave_after_now(client)
            keys_in_db = client.dbsize()
            counters = shimstats.read_process_stats(proc.pid, str(tmp_path / "stats"))
            with open(f"/proc/{proc.pid}/maps") as maps:
                shim_mapped = os.path.realpath(shim) in maps.read()
        assert benchmark.poll() is None, "redis-benchmark stopped early"
        persistence = client.info("persistence")
        check_values(client, generations)
    finally:
        benchmark.kill()
        benchmark.wait()
        benchmark_log.close()
        stop_redis(proc, client)

    assert persistence["rdb_last_bgsave_status"] == "ok", persistence
    assert persistence["rdb_saves"] >= 2, persistence
    text = log.read_text()
    assert text.count("Background saving started by pid") >= 2, text
    assert text.count("Background saving terminated with success") >= 2, text
    assert keys_in_db > KEYS + 100, "the benchmark's keys are missing: its load did not run alongside"
    if strategy is None:
        assert not shim_mapped and not activity.files
    else:
        assert shim_mapped
        assert counters is not None and counters["strategy"] == strategy, counters
        assert counters["heap_regions"] > 0, counters
        activity.check(strategy)

    # The snapshot the forked child wrote, loaded by a server without the shim.
    proc, client, _ = start_redis([], free_port(), tmp_path, clean_environment())
    try:
        check_values(client, generations)
    finally:
        stop_redis(proc, client)
