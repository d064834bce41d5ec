"""Every failure of the blog post (../shared/seed/ksm-modern-workloads.md), built on the real
kernel, and `ksmpreload doctor` naming it. KSM knobs are changed inside
scanning.fast_scanning, which puts every one back."""

import ctypes
import errno
import json
import os
import signal
import subprocess

from conftest import start_redis
from ksmpreload import kernel, scanning

SYS_PIDFD_OPEN, SYS_PROCESS_MADVISE, MADV_MERGEABLE = 434, 440, 12


def doctor(*args):
    done = subprocess.run(
        ["ksmpreload", "doctor", "--json", "--quiet", *map(str, args)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def keys(report):
    return [finding["key"] for finding in report["findings"]]


def finding(report, key):
    return next(f for f in report["findings"] if f["key"] == key)


def start(command, wrap=()):
    """A program that prints a JSON line with its pid, then holds its memory until killed."""
    proc = subprocess.Popen([*wrap, *command], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    json.loads(proc.stdout.readline())
    return proc


def stop(proc):
    proc.kill()
    proc.wait(timeout=30)


def test_ksm_not_running(c_programs):
    proc = start([c_programs("dup_buffers"), "64", "4"], wrap=["ksm-wrap"])
    try:
        with scanning.fast_scanning():
            kernel.write_knob("run", 0)
            report = doctor(proc.pid)
    finally:
        stop(proc)
    assert keys(report)[0] == "ksm_not_running", keys(report)
    waiting = report["potential"]["potential_bytes"] - report["potential"]["merged_bytes"]
    assert finding(report, "ksm_not_running")["cost_bytes"] == waiting >= 5 << 20  # 3 of 4 copies of 7.4 MiB


def test_pages_to_scan_too_low_for_the_memory(c_programs):
    proc = start([c_programs("dup_buffers"), "64", "4"], wrap=["ksm-wrap"])
    try:
        with scanning.fast_scanning(pages_to_scan=1, sleep_ms=100):
            report = doctor(proc.pid)
    finally:
        stop(proc)
    slow = finding(report, "scan_too_slow")
    assert slow["evidence"]["full_scan_seconds"] > 60 and "--pages-to-scan" in slow["fix"], slow


def test_madvise_on_an_unaligned_address(c_programs):
    """The post's "madvise returns -1": blocks from malloc are not page-aligned (EINVAL)."""
    report = doctor("--as-is", "--", c_programs("unaligned_madvise"), "64")
    failed = finding(report, "madvise_unaligned")
    assert failed["evidence"]["einval"] == 64 and "page-aligned" in failed["cause"], failed
    assert finding(report, "not_mergeable")["cost_bytes"] >= 16 << 20


def test_memory_marked_from_outside_stays_unmergeable(c_programs):
    """The post's Redis plan: a script marking a running process's memory. madvise acts on the
    caller only, and process_madvise refuses MADV_MERGEABLE."""
    proc = start([c_programs("dup_buffers"), "64", "4"])
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pidfd = libc.syscall(SYS_PIDFD_OPEN, proc.pid, 0)
        iovec = (ctypes.c_void_p * 2)(0x10000, 4096)
        result = libc.syscall(SYS_PROCESS_MADVISE, pidfd, iovec, 1, MADV_MERGEABLE, 0)
        error = ctypes.get_errno()
        os.close(pidfd)
        report = doctor(proc.pid)
    finally:
        stop(proc)
    assert result == -1 and error == errno.EINVAL, (result, error)
    unmarked = finding(report, "not_mergeable")
    assert "process_madvise" in unmarked["cause"] and unmarked["fix"].startswith(f"ksmpreload attach {proc.pid}")
    assert "ksm-wrap" in unmarked["fix"], unmarked


def test_jemalloc_holds_the_data():
    """The post's Redis: zmalloc's blocks come from jemalloc, inside its own extents."""
    proc, client = start_redis()
    try:
        client.mset({f"key:{i}": b"v" * 20000 for i in range(500)})
        report = doctor(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    allocator = finding(report, "allocator")
    assert any("jemalloc" in name for name in allocator["evidence"]["allocators"]), allocator
    assert finding(report, "not_mergeable")["cost_bytes"] >= 10 << 20


def test_data_rewritten_faster_than_a_scan(c_programs):
    proc = start([c_programs("rewriter"), "32"], wrap=["ksm-wrap"])
    try:
        with scanning.fast_scanning():
            scanning.wait_full_scans(3)
            report = doctor(proc.pid)
    finally:
        stop(proc)
    volatile = finding(report, "volatile")
    assert volatile["evidence"]["pages_volatile"] >= 4096, volatile


def test_preload_ignored_for_a_static_program(c_programs):
    report = doctor("--", c_programs("merge_flag_static"))
    ignored = finding(report, "preload_ignored")
    assert ignored["evidence"]["static"] is True and "prctl" in ignored["fix"], ignored


def test_bad_input_gives_one_line():
    gone = subprocess.run(["ksmpreload", "doctor", "999999999"], capture_output=True, text=True)
    assert gone.returncode == 2 and gone.stderr.count("\n") == 1 and "999999999" in gone.stderr
    missing = subprocess.run(["ksmpreload", "doctor", "--", "/nonexistent/program"], capture_output=True, text=True)
    assert missing.returncode != 0 and missing.stderr.count("\n") == 1, missing.stderr


def test_program_that_unmarks_its_own_memory():
    """stress-ng madvises its buffers with random advice, MADV_UNMERGEABLE among them (one of
    two workers at times, in CI): the memory stays unmerged even under prctl, and the doctor
    names the program's call. Here the advice is chosen, not drawn."""
    with scanning.fast_scanning():
        report = doctor(
            "--timeout",
            "30",
            "--",
            "stress-ng",
            "--vm",
            "1",
            "--vm-bytes",
            "32M",
            "--vm-keep",
            "--vm-hang",
            "0",
            "--vm-method",
            "zero-one",
            "--vm-madvise",
            "unmergeable",
            "--quiet",
        )
    unmarked = finding(report, "unmarked_by_program")
    assert unmarked["evidence"]["program_unmerged_bytes"] >= 32 << 20, unmarked
    assert unmarked["cost_bytes"] >= 32 << 20 and "--no-madvise" in unmarked["fix"], unmarked
    assert "not_mergeable" not in keys(report)


# ---- the duplicate potential (the done-when) ----------------------------------------


def test_random_fill_has_no_duplicate_potential():
    """The post's stress-ng: 12 million pages scanned, none merged. A random fill method
    leaves nothing to merge, and the doctor says so."""
    with scanning.fast_scanning():
        report = doctor(
            "--timeout",
            "60",
            "--",
            "stress-ng",
            "--vm",
            "1",
            "--vm-bytes",
            "64M",
            "--vm-keep",
            "--vm-method",
            "rand-set",
            "--quiet",
        )
    none = finding(report, "no_duplicates")
    assert none["evidence"]["pages_read"] >= 16384, none  # the 64 MiB worker was read
    assert report["potential"]["potential_bytes"] - report["potential"]["merged_bytes"] < 1 << 20


def test_potential_of_two_redis_servers_is_what_ksm_then_merges():
    from test_merging import load_same_values
    from ksmpreload.potential import potential

    with scanning.fast_scanning():
        kernel.write_knob("run", 0)  # nothing merges until the potential is read
        servers = [start_redis(["ksm-wrap"]) for _ in range(2)]
        try:
            for _, client in servers:
                load_same_values(client)
            pids = [proc.pid for proc, _ in servers]
            before = doctor(*pids)["potential"]
            kernel.write_knob("run", 1)
            scanning.wait_until_settled(scanning.ignoring_flutter(lambda: sum(ksm_pages(pid) for pid in pids)))
            merged = potential(pids).merged_pages * kernel.page_size()
        finally:
            for proc, client in servers:
                client.shutdown(nosave=True)
                proc.wait(timeout=30)
    could = before["potential_bytes"] - before["merged_bytes"]
    assert could >= 40 << 20, before  # 1500 values of 32 KiB held twice
    assert 0.85 * could <= merged <= 1.05 * could, (could, merged)


def ksm_pages(pid):
    return (kernel.process_ksm_stat(pid) or {}).get("ksm_merging_pages", 0)
