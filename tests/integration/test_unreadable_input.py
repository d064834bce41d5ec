"""The commands on input they cannot use: counters files that are cut short or corrupt (kept
mapped by live processes, so the readers take them as current), processes of another user
read without root, and processes that end before they are read. Each command either works
with what it can read and names what it skipped, or says in one line what it needs, with
exit 1; never a traceback."""

import json
import os
import subprocess
import sys

import pytest

from conftest import require, require_root_ksm
from counters_file import counters_file, with_u64
from ksmpreload import attribution, kernel, shimstats
from test_status_cli import assert_one_clear_error, run

NOBODY = 65534

# Copies a file to <dir>/<its pid>.stats and maps it, as the shim does, so that readers take
# it as the current counters file of a live process; also maps a file whose name is not UTF-8.
HOLDER = """
import mmap, os, sys
source, directory = sys.argv[1:]
path = os.path.join(directory, f"{os.getpid()}.stats")
with open(source, "rb") as f, open(path, "wb") as out:
    out.write(f.read())
odd = os.path.join(os.fsencode(directory), b"\\xff-%d.bin" % os.getpid())
with open(odd, "wb") as out:
    out.write(bytes(4096))
def held(name):
    with open(name, "rb") as f:
        return mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
maps = [held(path), held(odd)]
print("ready", flush=True)
sys.stdin.read()
"""
SLOTS = {"pid": 1, "strategy": 2, "padding_bytes": 4096, "heap_regions": 1}
GOOD = counters_file(SLOTS, [(0x10000, 0x100000, 1, 0)] * 4)
RING = GOOD.index(b"KSMREGN1") + 8
BAD_FILES = {
    "truncated": GOOD[:40],  # cut inside the slot values
    "huge count": with_u64(GOOD, 8, 2**63),
    "huge ring": with_u64(with_u64(GOOD, RING, 2**63), RING + 8, 2**63 + 5),  # counters fine, records not
}

# Python and its packages may sit under /root (mode 0700): import everything the commands
# use, rich's lazily imported parts included, then become nobody.
AS_NOBODY = f"""
import os, sys
import ksmpreload.cli, ksmpreload.diagnosis, ksmpreload.potential, ksmpreload.sharing
import rich._emoji_codes, rich.cells, rich.live, rich.progress
rich.cells.cell_len("\u2192\u2026\u00e9\u4e2d")  # loads rich's unicode tables, as tables with such text do
os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
sys.argv[0] = "ksmpreload"
ksmpreload.cli.main()
"""


def ksmpreload(*args, env=None):
    return subprocess.run(
        ["ksmpreload", *args], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )


def as_nobody(*args):
    return subprocess.run(
        [sys.executable, "-c", AS_NOBODY, *args], capture_output=True, text=True, timeout=300, cwd="/"
    )


def no_traceback(done):
    assert "Traceback" not in done.stderr, done.stderr
    return done


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """{kind: (pid, path)}: a live process holding each of BAD_FILES mapped as its counters."""
    require(kernel.ksm_available(), "the kernel has no KSM (/sys/kernel/mm/ksm missing)")
    stats_dir = tmp_path_factory.mktemp("stats")
    held, procs = {}, []
    try:
        for kind, data in BAD_FILES.items():
            source = tmp_path_factory.mktemp("source") / "counters"
            source.write_bytes(data)
            proc = subprocess.Popen(
                [sys.executable, "-c", HOLDER, str(source), str(stats_dir)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(proc)
            assert proc.stdout.readline() == "ready\n"
            held[kind] = (proc.pid, str(stats_dir / f"{proc.pid}.stats"))
        yield {"KSMPRELOAD_STATS_DIR": str(stats_dir)}, held
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.wait(timeout=30)


def notes_naming(notes, held, kinds):
    """The notes that name the files of `kinds`; fails unless each is named exactly once."""
    for kind in kinds:
        path = held[kind][1]
        assert sum(path in note for note in notes) == 1, (kind, notes)
    return notes


def test_exporter_counts_and_names_bad_counters_files(bad_files):
    env, held = bad_files
    done = no_traceback(ksmpreload("exporter", "--once", env=env))
    assert done.returncode == 0
    notes_naming(done.stderr.splitlines(), held, ["truncated", "huge count"])
    assert "ksmpreload_unreadable_counters_files 2.0" in done.stdout.splitlines()


def test_top_notes_bad_counters_files(bad_files):
    env, held = bad_files
    done = no_traceback(ksmpreload("top", env=env))  # stdout is a pipe: one snapshot
    assert done.returncode == 0
    notes_naming(done.stdout.splitlines(), held, ["truncated", "huge count"])
    snapshot = json.loads(no_traceback(ksmpreload("top", "--json", env=env)).stdout)
    notes_naming(snapshot["notes"], held, ["truncated", "huge count"])


def test_report_notes_bad_counters_files(bad_files):
    env, held = bad_files
    pids = [str(pid) for pid, _ in held.values()]
    done = no_traceback(ksmpreload("report", "--json", *pids, env=env))
    assert done.returncode == 0
    result = json.loads(done.stdout)
    notes_naming(result["notes"], held, BAD_FILES)
    shim = {process["pid"]: process["shim"] for process in result["processes"]}
    assert shim[held["truncated"][0]] is None and shim[held["huge count"][0]] is None
    assert shim[held["huge ring"][0]]["padding_bytes"] == 4096


def test_doctor_notes_bad_counters_files(bad_files):
    env, held = bad_files
    pids = [str(pid) for pid, _ in held.values()]
    done = no_traceback(ksmpreload("doctor", "--json", *pids, env=env))
    assert done.returncode == 0
    notes_naming(json.loads(done.stdout)["notes"], held, BAD_FILES)


def test_a_bad_file_its_process_maps_is_noted_once_and_kept(bad_files):
    """Pruning removes left-overs only: a current file that does not parse stays, however old."""
    env, held = bad_files
    for _, path in held.values():
        os.utime(path, (0, 0))
    problems = []
    found = shimstats.all_process_stats(env["KSMPRELOAD_STATS_DIR"], prune=True, problems=problems)
    assert set(found) == {held["huge ring"][0]}
    notes_naming(problems, held, ["truncated", "huge count"])
    assert all(os.path.exists(path) for _, path in held.values())


# ---- without root ------------------------------------------------------------------------


@pytest.fixture
def root_process():
    """A process of root's, which nobody may not read."""
    require_root_ksm()
    proc = subprocess.Popen(["sleep", "300"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("command", ["report", "doctor"])
def test_another_users_process_without_root_is_one_line(root_process, command):
    done = no_traceback(as_nobody(command, str(root_process)))
    assert (done.returncode, done.stdout) == (1, ""), done
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ksmpreload: "), done.stderr
    assert f"reading /proc/{root_process}/" in lines[0] and "another user's process needs root" in lines[0]


@pytest.mark.parametrize("command", ["report", "doctor"])
def test_a_pid_that_never_existed_is_one_line_without_root(command):
    require_root_ksm()
    done = no_traceback(as_nobody(command, "999999999"))
    assert done.returncode == 2 and done.stdout == "" and done.stderr.count("\n") == 1, done
    assert "no such process: 999999999" in done.stderr


@pytest.mark.parametrize("args", [["status"], ["status", "--json"], ["top"], ["top", "--json"]])
def test_status_and_top_without_root_say_what_they_could_not_read(root_process, args):
    done = no_traceback(as_nobody(*args))
    assert done.returncode == 0 and done.stderr == "", done
    notes = json.loads(done.stdout)["notes"] if "--json" in args else done.stdout.splitlines()
    assert any("other users' processes" in note and "needs root" in note for note in notes), done.stdout
    assert any("whether a governor runs is not known" in note for note in notes), done.stdout


def test_exporter_without_root_counts_the_processes_it_could_not_read(root_process):
    done = no_traceback(as_nobody("exporter", "--once"))
    assert done.returncode == 0, done
    count = next(
        float(line.split()[1])
        for line in done.stdout.splitlines()
        if line.startswith("ksmpreload_unreadable_processes ")
    )
    assert count >= 1
    assert "ksmpreload_governor_running" not in done.stdout, "not known without root: left out, not 0"
    notes = done.stderr.splitlines()
    assert len(notes) == 2 and any("needs root" in note for note in notes), done.stderr
    assert any("whether a governor runs is not known" in note for note in notes), done.stderr


# ---- a process that ends between listing and reading ---------------------------------------


@pytest.mark.parametrize("command", ["report", "doctor"])
def test_a_process_that_ends_before_it_is_read_is_one_line(monkeypatch, command):
    """The pid exists when checked and has ended (and been reaped) when its files are read."""
    require(kernel.ksm_available(), "the kernel has no KSM (/sys/kernel/mm/ksm missing)")
    proc = subprocess.Popen(["sleep", "300"])
    read = attribution.process_attribution

    def end_then_read(pid, *args, **kwargs):
        proc.kill()
        proc.wait()
        return read(pid, *args, **kwargs)

    monkeypatch.setattr(attribution, "process_attribution", end_then_read)
    result = run(command, str(proc.pid))
    assert_one_clear_error(result, 1, f"no such process: {proc.pid}")
