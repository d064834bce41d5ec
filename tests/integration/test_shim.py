"""The shim inside real processes: the C checks under LD_PRELOAD (glibc and jemalloc),
from other libraries' constructors, loaded with dlopen, and with bad configuration."""

import os
import subprocess

import pytest

from conftest import allocators

CHECKS = ["alignment", "realloc", "errno", "enomem", "threads", "fork", "exec"]
THRESHOLD = 16384


def run(program, *args, env=None):
    return subprocess.run([program, *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("preload_after", allocators())
@pytest.mark.parametrize("strategy", ["prctl", "madvise"])
@pytest.mark.parametrize("check", CHECKS)
def test_check_holds_under_shim(c_programs, shim_env, check, strategy, preload_after):
    env = shim_env(preload_after, strategy=strategy, threshold=THRESHOLD)
    result = run(c_programs("shim_checks"), check, str(THRESHOLD), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ok {check}" in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize("check", ["alignment", "realloc", "threads", "fork", "exec"])
def test_check_fails_without_shim(c_programs, check):
    """The checks can fail: without the shim, glibc does not page-align large blocks."""
    result = run(c_programs("shim_checks"), check, str(THRESHOLD))
    assert result.returncode == 1
    assert f"FAIL {check}" in result.stdout


def test_blocks_from_library_constructors_before_main(c_programs, shim_env):
    result = run(c_programs("ctor_main"), env=shim_env(threshold=THRESHOLD))
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"late_block_aligned": true' in result.stdout


def test_loaded_with_dlopen(c_programs, shim):
    result = run(c_programs("dlopen_shim"), shim)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "ok dlopen"


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("THRESHOLD", "abc", "KSMPRELOAD_THRESHOLD='abc' is not a size"),
        ("THRESHOLD", "100", "KSMPRELOAD_THRESHOLD='100' is not a size"),
        ("STRATEGY", "fast", "KSMPRELOAD_STRATEGY='fast' is not auto, prctl, madvise or observe; using auto"),
        ("ALIGN", "yes", "KSMPRELOAD_ALIGN='yes' is not 0 or 1; using 1"),
    ],
)
def test_invalid_environment_value_names_variable_and_default(c_programs, shim_env, name, value, expected):
    env = shim_env(**{name.lower(): value})
    result = run(c_programs("shim_checks"), "alignment", "16384", env=env)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ksmpreload: ") and expected in lines[0], result.stderr
    assert result.returncode == 0, "the program runs on with the default"


def test_counters_published_while_running(c_programs, shim_env, tmp_path):
    """A process's counters file holds its pid, configuration and the large blocks it made."""
    from ksmpreload import shimstats

    env = shim_env(strategy="madvise", threshold=THRESHOLD)
    proc = subprocess.Popen(
        [c_programs("dup_buffers"), "16", "2"], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        proc.stdout.readline()
        stats = shimstats.read_process_stats(proc.pid, str(tmp_path / "stats"))
        assert stats is not None
        assert stats["pid"] == proc.pid and stats["strategy"] == "madvise" and stats["threshold"] == THRESHOLD
        large_buffers = (
            sum(1 for i in range(16) if [8192, 12288, 16384, 20000, 32768, 40960, 50000, 65536][i % 8] >= THRESHOLD) * 2
        )
        assert stats["heap_regions"] == large_buffers
        assert stats["madvise_calls"] >= 1 and stats["madvise_einval"] == 0
        assert oct(os.stat(tmp_path / "stats" / f"{proc.pid}.stats").st_mode & 0o777) == "0o600"
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert not (tmp_path / "stats" / f"{proc.pid}.stats").exists(), "removed at exit"
