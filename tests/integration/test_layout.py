"""Duplicates at any offset (ksmpreload/layout.py) on real processes: two CPython processes
holding equal bytes objects in different heap layouts have few equal pages but the same data,
and the doctor says so with its own finding."""

import contextlib
import json
import os
import subprocess
import sys

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


def measured_saving(prefix):
    """What KSM then saves for two holders started under `prefix`, merged at a fast scan rate."""
    with holders(6, 7, prefix=prefix) as (pids, _), scanning.fast_scanning():
        scanning.wait_until_settled(scanning.ignoring_flutter(lambda: merged_pages(pids)), timeout=120)
        return saving.saved_pages(pids) * kernel.page_size()


def test_predictions_match_what_each_remedy_then_saves():
    """The doctor reads two plain processes and predicts; then the same processes run under each
    remedy and merge: ksm-wrap within 20% of its prediction, as-is within 5% of what they hold."""
    with holders(6, 7) as (pids, held):
        done = subprocess.run(["ksmpreload", "doctor", "--json", *map(str, pids)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    predicted = {entry["remedy"]: entry for entry in json.loads(done.stdout)["predictions"]}
    wrapped = measured_saving(["ksm-wrap", "--quiet"])
    as_is = measured_saving(["ksm-wrap", "--quiet", "--strategy", "prctl", "--no-align"])
    assert wrapped >= 0.5 * held, (wrapped, held)
    assert abs(predicted["ksm-wrap"]["saved_bytes"] - wrapped) <= 0.2 * wrapped, (predicted, wrapped)
    assert abs(predicted["as-is"]["saved_bytes"] - as_is) <= 0.05 * held, (predicted, as_is, held)
