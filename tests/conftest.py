"""Shared fixtures. tests/unit needs neither root nor KSM; tests/integration runs on the real
kernel as root: elsewhere it skips, and fails when CI=true."""

import os

import pytest

from ksmpreload import scanning
from ksmpreload.kernel import KSM_DIR, process_ksm_stat

IN_CI = os.environ.get("CI") == "true"


def require(condition, reason):
    """Skip with a reason, or fail when CI=true: CI must run every KSM test."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


def require_root_ksm():
    require(os.path.isdir(KSM_DIR), "the kernel has no KSM (/sys/kernel/mm/ksm missing)")
    require(os.geteuid() == 0, "needs root to set KSM knobs")


def _read(name):
    with open(os.path.join(KSM_DIR, name)) as f:
        return f.read().strip()


def _write(name, value):
    with open(os.path.join(KSM_DIR, name), "w") as f:
        f.write(str(value))


@pytest.fixture(autouse=True)
def integration_needs_root_and_ksm(request):
    if "integration" in request.node.path.parts:
        require_root_ksm()


@pytest.fixture
def ksm_running():
    """KSM on with a fast scan rate for the test; every knob it changes is restored after."""
    require_root_ksm()
    with scanning.fast_scanning():
        yield


def wait_full_scans(count, timeout=120.0):
    """Wait until ksmd has finished `count` more full scans than now."""
    scanning.wait_full_scans(count, timeout)


def ksm_stat(pid):
    """Parsed /proc/<pid>/ksm_stat (ksmpreload.kernel.parse_ksm_stat); raises if pid is gone."""
    stat = process_ksm_stat(pid)
    if stat is None:
        raise FileNotFoundError(f"/proc/{pid}/ksm_stat: no such process or no ksm_stat")
    return stat


# ---- the shim and the C test programs -------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def allocators():
    """Parameters for tests under glibc's malloc and under Debian's jemalloc (LD_PRELOAD after the shim)."""
    return [
        pytest.param((), id="glibc"),
        pytest.param(
            (JEMALLOC,),
            id="jemalloc",
            marks=pytest.mark.skipif(not os.path.exists(JEMALLOC), reason="libjemalloc2 missing"),
        ),
    ]


@pytest.fixture(scope="session")
def c_programs(tmp_path_factory):
    """The C test programs of tests/c, built with CMake; returns a path -> program function."""
    import subprocess

    build = tmp_path_factory.mktemp("c-build")
    subprocess.run(
        ["cmake", "-S", REPO, "-B", str(build), "-DKSMPRELOAD_TESTS=ON", "-DCMAKE_BUILD_TYPE=Debug"],
        check=True,
        capture_output=True,
    )
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    return lambda name: str(build / "tests" / "c" / name)


@pytest.fixture(scope="session")
def shim():
    import ksmpreload

    path = ksmpreload.shim_path()
    assert os.path.isfile(path), f"the installed package has no shim at {path}"
    return path


@pytest.fixture
def shim_env(shim, tmp_path):
    """Environment that preloads the shim, with its counters in a private directory."""

    def make(preload_after=(), **settings):
        env = dict(os.environ)
        env["LD_PRELOAD"] = " ".join([shim, *preload_after])
        env["KSMPRELOAD_STATS_DIR"] = str(tmp_path / "stats")
        for name, value in settings.items():
            env[f"KSMPRELOAD_{name.upper()}"] = str(value)
        return env

    return make


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: runs a real program or test suite for tens of seconds (deselect with -m 'not slow')"
    )


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(prefix=(), args=(), env=None, timeout=30):
    """Debian's redis-server on a free loopback port (no persistence), started behind `prefix`
    (e.g. ["ksm-wrap"]); returns (process, redis-py client) once it answers PING."""
    import subprocess
    import time

    import redis

    from ksmpreload.workloads.redis import server_command

    port = free_port()
    proc = subprocess.Popen(
        [*prefix, *server_command(port, "--loglevel", "warning", *args)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=60)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            return proc, client
        except (redis.ConnectionError, redis.BusyLoadingError):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"redis-server did not start: {proc.communicate()[1]}")
            time.sleep(0.05)
