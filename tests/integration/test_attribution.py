"""Attribution on the real kernel: `ksmpreload report` says which pair of processes shares the
merged pages and which regions (labelled by what made them) hold them."""

import json
import os
import subprocess
import sys

from conftest import JEMALLOC, ksm_stat
from ksmpreload import attribution, scanning

DISTINCT, COPIES = 64, 4

THREADS_AND_ARENAS = """
import sys, threading
big = bytearray(1 << 20)                       # a glibc mmapped chunk
ready = threading.Barrier(4)
def hold():
    blocks = [bytearray(50000) for _ in range(8)]  # from a thread arena's heap
    ready.wait(); ready.wait()
threads = [threading.Thread(target=hold) for _ in range(3)]
for t in threads: t.start()
ready.wait()
print("ready", flush=True)
sys.stdin.read()
ready.wait()
"""


def start_wrapped(command, env=None):
    proc = subprocess.Popen(
        ["ksm-wrap", "--strategy", "madvise", *command],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return proc, proc.stdout.readline()


def finish(proc):
    proc.stdin.close()
    proc.wait(timeout=30)


def report_json(*pids):
    done = subprocess.run(
        ["ksmpreload", "report", "--json", *map(str, pids)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


def test_sharing_matrix_gives_merged_pages_to_the_pair_and_the_shim_regions(ksm_running, c_programs):
    env = dict(os.environ, LD_PRELOAD=JEMALLOC)  # ksm-wrap puts the shim first
    started = [start_wrapped([c_programs("dup_buffers"), str(DISTINCT), str(COPIES)], env) for _ in range(2)]
    try:
        pids = [json.loads(line)["pid"] for _, line in started]
        mergeable = json.loads(started[0][1])["mergeable_pages"]
        scanning.wait_until_settled(lambda: sum(ksm_stat(pid)["ksm_merging_pages"] for pid in pids))
        report = report_json(*pids)
    finally:
        for proc, _ in started:
            finish(proc)
    pair = report["sharing"]["pairs"]
    assert [entry["pids"] for entry in pair] == [pids], pair
    distinct_pages = mergeable // COPIES  # every process holds COPIES copies of the same pages
    assert pair[0]["pages"] >= 0.9 * distinct_pages, f"{pair[0]['pages']} of {distinct_pages} pages shared"
    for process in report["processes"]:
        shared = [
            (region["label"], region["source"], region["shared_pages"])
            for region in process["regions"]
            if region["shared_pages"]
        ]
        in_shim_regions = sum(pages for _, source, pages in shared if source == "shim")
        assert in_shim_regions >= 0.9 * mergeable, f"shared pages by region: {shared}"
        assert process["merged_bytes"] > 0 and process["net_saved_bytes"] <= process["merged_bytes"]


def test_regions_are_labelled_by_what_made_them():
    proc, line = start_wrapped([sys.executable, "-c", THREADS_AND_ARENAS])
    try:
        assert line.strip() == "ready"
        process = attribution.process_attribution(proc.pid)
    finally:
        finish(proc)
    labels = attribution.by_label(process)
    assert labels["thread stack"]["regions"] >= 3, labels.keys()
    assert "glibc arena heap" in labels and "glibc mmapped chunk" in labels, labels.keys()
    assert any(label.startswith("mmap by") and "python" in label for label in labels), labels.keys()
    assert labels["brk heap"]["anonymous_kib"] > 0


def test_report_formats_and_bad_pid(tmp_path):
    proc, _ = start_wrapped([sys.executable, "-c", THREADS_AND_ARENAS])
    try:
        markdown = subprocess.run(
            ["ksmpreload", "report", "--markdown", "--no-sharing", str(proc.pid)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        finish(proc)
    assert f"### Regions of {proc.pid} (python" in markdown and "| thread stack |" in markdown
    gone = subprocess.run(["ksmpreload", "report", "999999999"], capture_output=True, text=True)
    assert gone.returncode == 2 and gone.stderr.count("\n") == 1 and "999999999" in gone.stderr


def test_top_snapshot_sorts_filters_and_stops_on_ctrl_c(ksm_running, c_programs):
    small, _ = start_wrapped([c_programs("dup_buffers"), "8", "2"])
    big, _ = start_wrapped([c_programs("dup_buffers"), "64", "4"])
    try:
        scanning.wait_until_settled(
            lambda: ksm_stat(big.pid)["ksm_merging_pages"] + ksm_stat(small.pid)["ksm_merging_pages"]
        )
        snap = json.loads(
            subprocess.run(["ksmpreload", "top", "--json"], capture_output=True, text=True, check=True).stdout
        )
        table = subprocess.run(
            ["ksmpreload", "top", "--filter", "dup_buffers 64"], capture_output=True, text=True, check=True
        ).stdout
        ctrl_c = interrupt_top_on_a_terminal()
    finally:
        finish(small)
        finish(big)
    order = [row["pid"] for row in snap["processes"] if row["pid"] in (small.pid, big.pid)]
    assert order == [big.pid, small.pid], snap["processes"]
    assert snap["totals"]["net_saved"] == sum(row["net_saved"] for row in snap["processes"])
    assert str(big.pid) in table and str(small.pid) not in table
    assert ctrl_c == (0, ""), ctrl_c


def interrupt_top_on_a_terminal():
    """Runs `ksmpreload top` on a pseudo-terminal, reading what it draws, presses Ctrl-C:
    (exit code, stderr)."""
    import pty
    import signal
    from test_status_cli import read_until

    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        ["ksmpreload", "top", "--interval", "0.2"], stdin=terminal, stdout=terminal, stderr=subprocess.PIPE, text=True
    )
    os.close(terminal)
    read_until(controller, lambda out: out.count(b"total (") >= 2)
    proc.send_signal(signal.SIGINT)
    read_until(controller, lambda out: False, timeout=2)  # drain: a full terminal would block it
    _, stderr = proc.communicate(timeout=30)
    os.close(controller)
    return proc.returncode, stderr
