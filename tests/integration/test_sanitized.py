"""The C tests under sanitizers and valgrind.

- ASan+UBSan on the test programs themselves, without the shim preloaded: ASan's malloc
  must come first in a process, so the shim cannot be injected in front of it (dlopen_shim
  still loads the shim, RTLD_LOCAL, beside ASan's malloc).
- The shim built with UBSan (KSMPRELOAD_SHIM_UBSAN; no ASan, it is a guest in processes
  with their own malloc) preloaded into the plain test programs: no UBSan report.
- valgrind memcheck on the test programs with the release shim preloaded: valgrind's
  malloc replaces libc's, and the shim's malloc calls through to it.
"""

import os
import re
import shutil
import subprocess

import pytest

from conftest import REPO, allocators, require

THRESHOLD = 16384
STRATEGIES = ["prctl", "madvise"]
PROGRAMS = ["shim_checks", "ctor_main", "ctor_lib", "dlopen_shim", "dup_buffers"]


def build(build_dir, *options, targets=PROGRAMS):
    """CMake build of the given targets; returns a name -> path function for tests/c."""
    subprocess.run(
        ["cmake", "-S", REPO, "-B", str(build_dir), "-DKSMPRELOAD_TESTS=ON", *options], check=True, capture_output=True
    )
    subprocess.run(["cmake", "--build", str(build_dir), "-j2", "--target", *targets], check=True, capture_output=True)
    return lambda name: str(build_dir / "tests" / "c" / name)


def run(command, env, timeout=120):
    return subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def base_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}
    env["KSMPRELOAD_STATS_DIR"] = str(tmp_path / "stats")
    env.update(extra)
    return env


def preload_env(tmp_path, shim, preload_after=(), strategy="prctl", **extra):
    env = base_env(tmp_path, KSMPRELOAD_STRATEGY=strategy, KSMPRELOAD_THRESHOLD=str(THRESHOLD), **extra)
    env["LD_PRELOAD"] = " ".join([shim, *preload_after])
    return env


def expect_ok(result, check=None, reports=()):
    output = f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.returncode == 0, output
    if check:
        assert f"ok {check}" in result.stdout, output
    for report in reports:
        assert not re.search(report, result.stderr, re.M), output


# ---- ASan + UBSan on the test programs, no shim preloaded ---------------------------------

ASAN_REPORTS = [r"ERROR: AddressSanitizer", r"ERROR: LeakSanitizer", r"runtime error:"]
# ASan's allocator must stay first, so large blocks are not page-aligned: SHIM_CHECKS_ALIGNED=0
# runs every check but that expectation. allocator_may_return_null: the enomem check asks for
# impossible sizes on purpose and wants NULL and ENOMEM, as C says, not ASan's report.
# ASan runs the allocation loops about four times slower: 5000 rounds per thread, not 20000.
ASAN_ENV = {
    "SHIM_CHECKS_ALIGNED": "0",
    "SHIM_CHECKS_ROUNDS": "5000",
    "ASAN_OPTIONS": "allocator_may_return_null=1:detect_leaks=1",
    "UBSAN_OPTIONS": "print_stacktrace=1",
}


@pytest.fixture(scope="session")
def asan_programs(tmp_path_factory):
    return build(tmp_path_factory.mktemp("asan-build"), "-DKSMPRELOAD_SANITIZE=ON", "-DCMAKE_BUILD_TYPE=Debug")


@pytest.mark.parametrize("check", ["alignment", "realloc", "errno", "enomem", "threads", "fork", "exec"])
def test_checks_under_asan(asan_programs, tmp_path, check):
    result = run([asan_programs("shim_checks"), check, str(THRESHOLD)], base_env(tmp_path, **ASAN_ENV))
    expect_ok(result, check, ASAN_REPORTS)


def test_library_constructors_under_asan(asan_programs, tmp_path):
    expect_ok(run([asan_programs("ctor_main")], base_env(tmp_path, **ASAN_ENV)), reports=ASAN_REPORTS)


def test_dup_buffers_under_asan(asan_programs, tmp_path):
    expect_ok(run([asan_programs("dup_buffers"), "16", "2"], base_env(tmp_path, **ASAN_ENV)), reports=ASAN_REPORTS)


def test_shim_dlopened_beside_asan(asan_programs, shim, tmp_path):
    """A library that exports malloc, loaded RTLD_LOCAL into an ASan process: its own
    malloc/free pairs work, and ASan reports nothing."""
    result = run([asan_programs("dlopen_shim"), shim], base_env(tmp_path, **ASAN_ENV))
    expect_ok(result, "dlopen", ASAN_REPORTS)


# ---- the shim built with UBSan, preloaded ------------------------------------------------

UBSAN_REPORTS = [r"runtime error:", r"ERROR: .*Sanitizer"]
# UBSan adds little cost; the thread check still needs no more than 5000 rounds to cover it.
UBSAN_ENV = {"UBSAN_OPTIONS": "print_stacktrace=1", "SHIM_CHECKS_ROUNDS": "5000"}


@pytest.fixture(scope="session")
def ubsan_build(tmp_path_factory):
    """The shim with -fsanitize=undefined (optimised as released, with line numbers), and the
    plain test programs plus ubsan_probe. Returns (shim path, name -> program path)."""
    build_dir = tmp_path_factory.mktemp("ubsan-shim-build")
    programs = build(
        build_dir,
        "-DKSMPRELOAD_SHIM_UBSAN=ON",
        "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
        targets=["ksmpreload", "ubsan_probe", *PROGRAMS],
    )
    return str(build_dir / "libksmpreload.so"), programs


def test_ubsan_shim_is_instrumented(ubsan_build):
    from elftools.elf.elffile import ELFFile

    with open(ubsan_build[0], "rb") as f:
        elf = ELFFile(f)
        needed = [
            tag.needed for tag in elf.get_section_by_name(".dynamic").iter_tags() if tag.entry.d_tag == "DT_NEEDED"
        ]
        imports = [s.name for s in elf.get_section_by_name(".dynsym").iter_symbols() if s["st_shndx"] == "SHN_UNDEF"]
    assert any(name.startswith("libubsan.so") for name in needed), needed
    assert any(name.startswith("__ubsan_handle_") for name in imports), imports


def test_ubsan_report_gets_through_the_shim(ubsan_build, tmp_path):
    """libubsan's report path maps and allocates memory through the shim's mmap and malloc
    (libbacktrace's allocator, dlsym's error message): a finding is still reported and stops
    the program, so a finding inside the shim would be seen too."""
    shim, programs = ubsan_build
    result = run([programs("ubsan_probe")], preload_env(tmp_path, shim, **UBSAN_ENV))
    assert result.returncode != 0, result.stdout + result.stderr
    assert "runtime error: signed integer overflow" in result.stderr, result.stderr
    assert "ubsan_probe.c" in result.stderr, result.stderr


@pytest.mark.parametrize("preload_after", allocators())
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("check", ["alignment", "realloc", "errno", "enomem", "threads", "fork", "exec"])
def test_checks_under_ubsan_shim(ubsan_build, tmp_path, check, strategy, preload_after):
    shim, programs = ubsan_build
    env = preload_env(tmp_path, shim, preload_after, strategy, **UBSAN_ENV)
    expect_ok(run([programs("shim_checks"), check, str(THRESHOLD)], env), check, UBSAN_REPORTS)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_library_constructors_under_ubsan_shim(ubsan_build, tmp_path, strategy):
    shim, programs = ubsan_build
    result = run([programs("ctor_main")], preload_env(tmp_path, shim, (), strategy, **UBSAN_ENV))
    expect_ok(result, reports=UBSAN_REPORTS)
    assert '"late_block_aligned": true' in result.stdout


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dup_buffers_under_ubsan_shim(ubsan_build, tmp_path, strategy):
    shim, programs = ubsan_build
    result = run([programs("dup_buffers"), "16", "2"], preload_env(tmp_path, shim, (), strategy, **UBSAN_ENV))
    expect_ok(result, reports=UBSAN_REPORTS)


# ---- valgrind memcheck with the release shim preloaded -----------------------------------

VALGRIND = [
    "valgrind",
    "-q",
    "--error-exitcode=99",
    "--leak-check=full",
    "--errors-for-leak-kinds=definite",
    # valgrind 3.19 replaces the allocation functions of every object that exports them, the
    # shim's included (--trace-redir=yes shows libksmpreload.so's malloc redirected): the
    # shim's malloc would never run. A somalloc synonym that names no loaded library keeps the
    # replacement to libc and libstdc++, so the shim's malloc runs and calls through to
    # valgrind's. It does not name the shim; no suppressions are needed so far.
    "--soname-synonyms=somalloc=nouserintercepts",
]
# Under valgrind's serialised threads the allocation loops run some 50 times slower.
VALGRIND_ROUNDS = "1000"


def valgrind_run(program, *args, env, leak_check=True):
    command = VALGRIND if leak_check else [*VALGRIND, "--leak-check=no"]
    return run([*command, program, *args], env, timeout=300)


@pytest.fixture(scope="session")
def valgrind_ready():
    require(shutil.which("valgrind"), "valgrind is not installed")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("check", ["alignment", "realloc", "errno", "threads"])
def test_checks_under_valgrind(valgrind_ready, c_programs, shim, tmp_path, check, strategy):
    """Not run here: enomem (valgrind 3.19's calloc returns NULL without setting errno, and it
    reports the impossible sizes the check asks for on purpose as 'fishy' arguments) and exec
    (the exec'd program runs outside valgrind; the native runs in test_shim.py cover it)."""
    env = preload_env(tmp_path, shim, (), strategy, SHIM_CHECKS_ROUNDS=VALGRIND_ROUNDS)
    result = valgrind_run(c_programs("shim_checks"), check, str(THRESHOLD), env=env)
    expect_ok(result, check, [r"^==\d+=="])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fork_under_valgrind(valgrind_ready, c_programs, shim, tmp_path, strategy):
    """Without leak checking: a forked child has only the forking thread, so the blocks the
    check's other, allocating thread held at the fork are unreachable in the child and
    memcheck calls them definitely lost when it _exits. The parent's leaks are checked by
    the other checks, threads included (the same allocating loop)."""
    env = preload_env(tmp_path, shim, (), strategy, SHIM_CHECKS_ROUNDS=VALGRIND_ROUNDS)
    result = valgrind_run(c_programs("shim_checks"), "fork", str(THRESHOLD), env=env, leak_check=False)
    expect_ok(result, "fork", [r"^==\d+=="])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_library_constructors_under_valgrind(valgrind_ready, c_programs, shim, tmp_path, strategy):
    result = valgrind_run(c_programs("ctor_main"), env=preload_env(tmp_path, shim, (), strategy))
    expect_ok(result, reports=[r"^==\d+=="])
    assert '"late_block_aligned": true' in result.stdout, "the shim's malloc ran (valgrind's does not page-align)"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dup_buffers_under_valgrind(valgrind_ready, c_programs, shim, tmp_path, strategy):
    result = valgrind_run(c_programs("dup_buffers"), "16", "2", env=preload_env(tmp_path, shim, (), strategy))
    expect_ok(result, reports=[r"^==\d+=="])
