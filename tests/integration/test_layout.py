"""Duplicates at any offset (ksmpreload/layout.py) on real processes: two CPython processes
holding equal bytes objects in different heap layouts have few equal pages but the same data,
and the doctor says so with its own finding."""

import contextlib
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO
from ksmpreload import kernel, layout, potential, saving, scanning
from ksmpreload.processes import merged_pages

HOLDER = os.path.join(REPO, "tests", "bytes_holder.py")


@contextlib.contextmanager
def holders(*seeds, prefix=()):
    """Processes of bytes_holder.py, one per seed (after `prefix`, a ksm-wrap command line);
    yields (pids, bytes each holds)."""
    procs = [
        subprocess.Popen([*prefix, sys.executable, HOLDER, str(seed)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
        for seed in seeds
    ]  # fmt: skip
    try:
        held = [int(proc.stdout.readline().split()[1]) for proc in procs]
        yield [proc.pid for proc in procs], held[0]
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.wait(timeout=30)


def test_equal_data_in_other_layouts_is_duplicate_at_any_offset_not_in_whole_pages():
    with holders(1, 2) as (pids, held):
        found = layout.duplicates_at_any_offset(pids)
        pages = potential.potential(pids)
    page_duplicates = (pages.totals["saving_across"] + pages.totals["saving_within"]) * pages.page_size
    assert found.duplicate_bytes_across >= 0.9 * held, (found, held)
    assert page_duplicates <= 0.3 * held, (page_duplicates, held)
    assert found.missing == [] and found.bytes_read >= 2 * held


def test_a_process_gone_before_it_is_read_is_left_out():
    with holders(3) as (pids, _):
        gone = subprocess.Popen(["true"])
        gone.wait()
        found = layout.duplicates_at_any_offset([*pids, gone.pid])
    assert found.missing == [gone.pid] and found.bytes_read > 0


def test_doctor_finds_the_duplicates_that_layout_hides():
    with holders(4, 5) as (pids, held):
        done = subprocess.run(
            ["ksmpreload", "doctor", "--json", *map(str, pids)], capture_output=True, text=True, timeout=300
        )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    hidden = [finding for finding in report["findings"] if finding["key"] == "duplicates_hidden_by_layout"]
    assert hidden and hidden[0]["cost_bytes"] >= 0.6 * held, report["findings"]
    assert "ksm-wrap" in hidden[0]["fix"]
    assert "no_duplicates" not in [finding["key"] for finding in report["findings"]]
    assert report["potential"]["any_offset"]["duplicate_bytes_across"] >= 0.9 * held
    shown = [(region["pid"], region["other_offset_bytes"]) for region in hidden[0]["evidence"]["regions"]]
    assert {pid for pid, _ in shown} == set(pids) and sum(size for _, size in shown) >= 0.5 * held, shown
    any_offset = report["potential"]["any_offset"]
    assert [process["pid"] for process in any_offset["processes"]] == pids
    assert all(process["other_offset_bytes"] >= 0.4 * held for process in any_offset["processes"]), any_offset
    assert any_offset["pairs"][0]["pids"] == pids and any_offset["pairs"][0]["shared_bytes"] >= 0.9 * held


def test_doctor_text_shows_each_process_and_the_pairs_that_share():
    with holders(8, 9) as (pids, held):
        done = subprocess.run(["ksmpreload", "doctor", *map(str, pids)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for pid in pids:
        assert f"- pid {pid} (glibc): " in done.stdout and f"     pid {pid} 0x" in done.stdout, done.stdout
    assert f"- pids {pids[0]} and {pids[1]} both hold" in done.stdout, done.stdout
    assert "predicted saving by remedy" in done.stdout and "- ksm-wrap: " in done.stdout


def predicted(pids):
    """The doctor's predictions for `pids`, read as they are: {remedy: saved bytes}."""
    done = subprocess.run(["ksmpreload", "doctor", "--json", *map(str, pids)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return {entry["remedy"]: entry["saved_bytes"] for entry in json.loads(done.stdout)["predictions"]}


@contextlib.contextmanager
def started(commands, prefix=()):
    """The commands started (after `prefix`, a ksm-wrap command line), each past its first line of
    output; yields their pids. Closing stdin ends them."""
    procs = [subprocess.Popen([*prefix, *command], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for command in commands]  # fmt: skip
    try:
        for proc in procs:
            assert proc.stdout.readline(), f"{proc.args} ended early"
        yield [proc.pid for proc in procs]
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.wait(timeout=30)


def measured_saving(commands, prefix):
    """What KSM then saves for the commands started under `prefix`, merged at a fast scan rate."""
    with started(commands, prefix) as pids, scanning.fast_scanning():
        scanning.wait_until_settled(scanning.ignoring_flutter(lambda: merged_pages(pids)), timeout=120)
        return saving.saved_pages(pids) * kernel.page_size()


def glibc_buffers(c_programs):
    """Two C processes holding the same 400 buffers of 8-64 KiB among small blocks, the second's
    heap shifted by 1,000 bytes (dup_buffers)."""
    return [[c_programs("dup_buffers"), "400", "1", str(shift)] for shift in (0, 1000)]


def python_bytes(c_programs):
    """Two CPython processes holding the same bytes objects in other orders (bytes_holder.py)."""
    return [[sys.executable, HOLDER, str(seed)] for seed in (6, 7)]


@pytest.mark.parametrize("processes", [glibc_buffers, python_bytes])
def test_predictions_match_what_each_remedy_then_saves(c_programs, processes):
    """The doctor reads two plain processes and predicts; then the same processes run under each
    remedy and merge: each prediction within 20% of what that remedy then saves."""
    commands = processes(c_programs)
    with started(commands) as pids:
        before = predicted(pids)
    wrapped = measured_saving(commands, ["ksm-wrap", "--quiet"])
    as_is = measured_saving(commands, ["ksm-wrap", "--quiet", "--strategy", "prctl", "--no-align"])
    assert wrapped >= 4 * as_is, (wrapped, as_is, "the layout hides most duplicates")
    assert abs(before["ksm-wrap"] - wrapped) <= 0.2 * wrapped, (before, wrapped)
    assert abs(before["as-is"] - as_is) <= 0.2 * wrapped, (before, as_is)


FORKED_HOLDER = """
import os, random, sys
data = random.Random(1).randbytes(20 << 20)
child = os.fork()
print("ready", flush=True)
sys.stdin.read()
if child:
    os.waitpid(child, 0)
"""


def test_pages_shared_since_a_fork_are_no_saving_to_predict():
    """A parent and its forked child share 20 MiB of frames: equal pages, but nothing KSM can
    save; each process's id given twice, once as a thread id would be, counts once."""
    proc = subprocess.Popen([sys.executable, "-c", FORKED_HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        assert proc.stdout.readline() and proc.stdout.readline()
        child = int(subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()[0])
        found = predicted([proc.pid, child, proc.pid])
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert found["as-is"] < 1 << 20 and found["ksm-wrap"] < 1 << 20, found


def test_doctor_on_a_zombie_and_a_process_that_ends_says_so_without_a_traceback():
    zombie = subprocess.Popen(["true"])
    with holders(10) as (pids, _):
        time.sleep(0.5)  # `true` has ended, not yet waited for: a zombie
        done = subprocess.run(["ksmpreload", "doctor", str(zombie.pid), *map(str, pids)], capture_output=True,
                              text=True, timeout=300)  # fmt: skip
    zombie.wait()
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert f"process {zombie.pid} ended while it was read" in done.stdout, done.stdout
