"""Duplicates at any offset (ksmpreload/layout.py) on real processes: two CPython processes
holding equal bytes objects in different heap layouts have few equal pages but the same data,
and the doctor says so with its own finding."""

import contextlib
import json
import os
import subprocess
import sys

from conftest import REPO
from ksmpreload import layout, potential

HOLDER = os.path.join(REPO, "tests", "bytes_holder.py")


@contextlib.contextmanager
def holders(*seeds):
    """Processes of bytes_holder.py, one per seed; yields (pids, bytes each holds)."""
    procs = [
        subprocess.Popen([sys.executable, HOLDER, str(seed)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for seed in seeds
    ]
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
