"""Which processes share which KSM pages (ksmpreload.sharing), on the real kernel; and the C
decoding behind it on synthetic pagemap and kpageflags words."""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ksm_stat, require_root_ksm
from ksmpreload import kernel, native, scanning
from ksmpreload.sharing import KEEP_MASK, sharing

MIB = 16
PAGE = os.sysconf("SC_PAGE_SIZE")
HELD_PAGES = MIB * (1 << 20) // PAGE


@pytest.fixture
def ksm_merging(ksm_running):
    """ksm_running with smart_scan off (restored after). With smart_scan, two copies of a page
    that ksmd skips on different scans can stay apart: seen here at 1,213 of 4,096 pages for
    346 full scans, all merged at once when smart_scan went to 0. These tests are about who
    shares what, not about how ksmd picks pages."""
    previous = kernel.write_knob("smart_scan", 0) if kernel.read_knob("smart_scan") else None
    try:
        yield
    finally:
        if previous is not None:
            kernel.write_knob("smart_scan", previous)


def start_worker(mib, seed):
    """A demo worker under ksm-wrap holding `mib` MiB that every worker with `seed` holds."""
    proc = subprocess.Popen(
        ["ksm-wrap", sys.executable, "-m", "ksmpreload.demo_worker", str(mib), str(seed)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    assert json.loads(proc.stdout.readline())["pid"] == proc.pid
    return proc


def start_dup_buffers(program, distinct, copies):
    proc = subprocess.Popen(
        ["ksm-wrap", program, str(distinct), str(copies)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    report = json.loads(proc.stdout.readline())
    assert report["pid"] == proc.pid
    return proc, report["mergeable_pages"]


def stop(*procs):
    for proc in procs:
        proc.stdin.close()
    for proc in procs:
        proc.wait(timeout=30)


def merging_pages(pid):
    return ksm_stat(pid)["ksm_merging_pages"]


def settle(pids, expect, timeout=120.0):
    """Wait until each pid of `expect` has that many merging pages (or fail after timeout),
    then until merging in pids settles: a steady count alone can stop short (see
    ksm_merging), so wait for what the test knows must merge."""
    deadline = time.monotonic() + timeout
    while any(merging_pages(pid) < pages for pid, pages in expect.items()):
        if time.monotonic() > deadline:
            knobs = {name: kernel.read_knob(name) for name in ("run", "pages_to_scan", "full_scans")}
            pytest.fail(
                f"not merged in {timeout:.0f} s: {[merging_pages(pid) for pid in expect]} of "
                f"{list(expect.values())} pages; KSM knobs now {knobs}"
            )
        time.sleep(0.2)
    scanning.wait_until_settled(lambda: [merging_pages(pid) for pid in pids])


def sharing_with_stats(pids):
    """sharing(pids) and each pid's ksm_merging_pages just before and just after it."""
    before = {pid: merging_pages(pid) for pid in pids}
    report = sharing(pids)
    after = {pid: merging_pages(pid) for pid in pids}
    return report, before, after


def assert_matches_ksm_stat(report, before, after, slack=4):
    for pid, process in report.processes.items():
        low, high = sorted((before[pid], after[pid]))
        assert low - slack <= process.ksm_pages <= high + slack, (pid, process.ksm_pages, low, high)
        assert sum(region.ksm_pages for region in process.regions) == process.ksm_pages


def test_two_processes_with_the_same_data_share_it_and_a_third_shares_nothing(ksm_merging):
    procs = [start_worker(MIB, 1), start_worker(MIB, 1), start_worker(MIB, 2)]
    a, b, c = pids = [proc.pid for proc in procs]
    try:
        settle(pids, {a: HELD_PAGES, b: HELD_PAGES})  # the data, all merged
        report, before, after = sharing_with_stats(pids)
    finally:
        stop(*procs)
    assert list(report.processes) == pids and not report.missing
    assert_matches_ksm_stat(report, before, after)
    assert report.shared(a, b) == report.shared(b, a) == report.pairs[(a, b)]
    # Both hold HELD_PAGES pages of the same data (and a few pages of the same interpreter, and
    # the last freed copies of that data that the shim's cache keeps: 1 MiB a thread at most).
    cache_pages = (1 << 20) // PAGE
    assert 0.9 * HELD_PAGES <= report.shared(a, b) <= 1.1 * HELD_PAGES + cache_pages, report.pairs
    for pid in (a, b):
        assert report.shared(pid, c) <= 0.02 * HELD_PAGES, report.pairs
        assert report.processes[pid].ksm_distinct >= report.shared(a, b)
    # The data sits in the heap or in anonymous mappings: the regions say where.
    for pid in (a, b):
        top = max(report.processes[pid].regions, key=lambda region: region.ksm_pages)
        assert top.path in ("", "[heap]") and top.ksm_shared >= 0.5 * HELD_PAGES, top
    assert report.totals["mapped"] == sum(process.ksm_pages for process in report.processes.values())
    json.dumps(report.to_dict())


def test_copies_inside_one_process_are_within_process_sharing(ksm_merging, c_programs):
    distinct, copies = 64, 4
    proc, mergeable = start_dup_buffers(c_programs("dup_buffers"), distinct, copies)
    try:
        settle([proc.pid], {proc.pid: 0.95 * mergeable})
        report, before, after = sharing_with_stats([proc.pid])
    finally:
        stop(proc)
    assert_matches_ksm_stat(report, before, after)
    process = report.processes[proc.pid]
    assert report.pairs == {}
    # `mergeable` pages in `copies` copies: each of mergeable / copies distinct pages mapped `copies` times.
    assert process.within_only >= 0.9 * mergeable / copies, process
    assert process.within_only_mapped >= 0.9 * mergeable, process
    assert process.shared_in_set == 0
    assert report.within_process == {proc.pid: process.within_only}
    assert sum(region.ksm_within for region in process.regions) == process.within_only_mapped


def test_copies_in_two_processes_are_shared_between_them_not_within(ksm_merging, c_programs):
    distinct, copies = 64, 2
    program = c_programs("dup_buffers")
    (first, mergeable), (second, _) = (
        start_dup_buffers(program, distinct, copies),
        start_dup_buffers(program, distinct, copies),
    )
    try:
        settle([first.pid, second.pid], {first.pid: 0.95 * mergeable, second.pid: 0.95 * mergeable})
        report, before, after = sharing_with_stats([first.pid, second.pid])
    finally:
        stop(first, second)
    assert_matches_ksm_stat(report, before, after)
    # All copies in both processes map one KSM page per distinct page.
    assert report.shared(first.pid, second.pid) >= 0.9 * mergeable / copies, report.pairs
    for process in report.processes.values():
        assert process.within_only <= 0.02 * mergeable, process
        assert process.ksm_pages >= 0.9 * mergeable


def test_a_process_that_is_gone_is_reported_missing():
    require_root_ksm()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    report = sharing([os.getpid(), proc.pid])
    assert report.missing == [proc.pid] and list(report.processes) == [os.getpid()]


def test_without_root_says_root_is_needed():
    """Root with the effective uid of nobody: capabilities are gone, PFNs read as 0."""
    require_root_ksm()
    code = (
        "import os, ksmpreload.sharing as s, ksmpreload.errors as e\n"
        "os.seteuid(65534)\n"
        "try:\n"
        "    s.sharing([os.getpid()])\n"
        "except e.KsmError as error:\n"
        "    print(error.message)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and "needs root" in result.stdout, result.stdout


def test_a_large_reservation_is_read_where_pages_are(tmp_path):
    """256 GiB reserved, 16 MiB written: every mode finds the same pages, and "auto" reads
    only where PAGEMAP_SCAN finds pages (reading every entry costs ~8 bytes per virtual page)."""
    require_root_ksm()
    code = (
        "import mmap, sys\n"
        "NORESERVE = 0x4000\n"
        "m = mmap.mmap(-1, 256 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | NORESERVE)\n"
        "m.madvise(mmap.MADV_NOHUGEPAGE)\n"
        "for i in range(0, 16 << 20, mmap.PAGESIZE): m[i] = 1\n"
        "print('ready', flush=True); sys.stdin.read()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        found, seconds = {}, {}
        for mode in ("never", "auto", "always"):
            timings = {}
            process = sharing([proc.pid], timings=timings, pagemap_scan=mode).processes[proc.pid]
            found[mode] = [(region.start, region.anon_pages) for region in process.regions]
            seconds[mode] = timings["pagemap"]
    finally:
        stop(proc)
    assert found["never"] == found["auto"] == found["always"]
    big = [pages for start, pages in found["auto"] if pages >= 4096]
    assert big and big[0] >= 16 << 20 // PAGE
    assert seconds["auto"] < seconds["never"] / 2, seconds


# ---- the C decoding, on synthetic words ---------------------------------------------------------

PRESENT, SWAPPED, FILE = kernel.PAGEMAP_PRESENT, kernel.PAGEMAP_SWAPPED, kernel.PAGEMAP_FILE
SOFT_DIRTY, EXCLUSIVE = 1 << 55, 1 << 56


def words_file(tmp_path, name, words):
    path = tmp_path / name
    path.write_bytes(b"".join(word.to_bytes(8, "little") for word in words))
    return os.open(path, os.O_RDONLY)


def test_pagemap_decoding_keeps_present_anonymous_pfns(tmp_path):
    entries = [
        PRESENT | EXCLUSIVE | SOFT_DIRTY | 0x1234,  # kept: flags above bit 54 dropped
        0,  # not present
        SWAPPED | 0x77,  # swapped: bits 0-54 are no PFN
        PRESENT | FILE | 0x99,  # a file page: never KSM
        PRESENT | 0x1234,  # the same frame again
        PRESENT | (1 << 54) | 5,  # the top PFN bit
        PRESENT,
    ]  # PFN 0: what non-root reads
    fd = words_file(tmp_path, "pagemap", entries)
    try:
        pfns = native.PfnArray(capacity=2)  # grows while reading
        pfns.read_pagemap(fd, 0, 100, KEEP_MASK, PRESENT, kernel.PAGEMAP_PFN_MASK)  # past the end
        assert list(pfns.data[0 : pfns.size]) == [0x1234, 0x1234, (1 << 54) | 5, 0]
        assert (pfns.counts[0], pfns.counts[1]) == (4, 1)
        pfns.read_pagemap(fd, 3, 5, KEEP_MASK, PRESENT, kernel.PAGEMAP_PFN_MASK)  # appends
        assert list(pfns.data[0 : pfns.size]) == [0x1234, 0x1234, (1 << 54) | 5, 0, 0x1234]
        scanned = native.PfnArray(scan="always")  # a plain file has no PAGEMAP_SCAN: falls back
        scanned.read_pagemap(fd, 0, 100, KEEP_MASK, PRESENT, kernel.PAGEMAP_PFN_MASK)
        assert list(scanned.data[0 : scanned.size]) == [0x1234, 0x1234, (1 << 54) | 5, 0]
        assert scanned.scan == "never"
    finally:
        os.close(fd)


def test_attribution_of_synthetic_frames(tmp_path):
    # Three processes: 0 and 1 share frame 10; 2 maps frame 30 twice; frame 20 is no KSM page;
    # 0 maps frame 40, which a process outside the set maps too.
    per_process = [[10, 20, 40], [20, 10], [30, 30, 50]]
    pfns = native.u64_array(8)
    flat = [pfn for process in per_process for pfn in process]
    pfns[0 : len(flat)] = flat
    offsets = [0, 3, 5, 8]
    keys = native.sort_pfns(pfns, len(flat))
    assert [key >> 32 for key in keys[0:8]] == sorted(flat)
    assert [key & 0xFFFFFFFF for key in keys[0:2]] == [0, 4], "stable: positions ascend within a frame"
    distinct, count = native.distinct_pfns(keys, len(flat))
    assert list(distinct[0:count]) == [10, 20, 30, 40, 50]

    ksm = 1 << kernel.KPF_KSM
    flags = [0] * 64
    flags[10] = flags[30] = flags[40] = ksm | 1
    flags[50] = ksm  # past the end of the file below: reads as 0
    fd = words_file(tmp_path, "kpageflags", flags[:45])
    try:
        words = native.read_pfn_words(fd, distinct, count, max_gap=0)
        assert list(words[0:count]) == [ksm | 1, 0, ksm | 1, ksm | 1, 0]
        assert list(native.read_pfn_words(fd, distinct, count, max_gap=100)[0:count]) == list(words[0:count])
    finally:
        os.close(fd)
    ksm_pfns, nksm = native.select_pfns(distinct, words, count, ksm)
    assert list(ksm_pfns[0:nksm]) == [10, 30, 40]
    mapcounts = native.u64_array(3)
    mapcounts[0:3] = [2, 2, 3]

    kinds, rows, pairs, totals = native.attribute(keys, len(flat), offsets, ksm_pfns, mapcounts, nksm)
    assert pairs == {(0, 1): 1, (0, 2): 0, (1, 2): 0}
    assert [row["mapped"] for row in rows] == [2, 1, 2]
    assert [row["distinct"] for row in rows] == [2, 1, 1]
    assert [row["within_only"] for row in rows] == [0, 0, 1]
    assert [row["within_only_mapped"] for row in rows] == [0, 0, 2]
    assert [row["outside"] for row in rows] == [1, 0, 0]
    # fair shares: frame 10 (2 mappings) 1/2 each, frame 30 (2) 1/2 each, frame 40 (3) 2/3
    assert [row["fair"] for row in rows] == pytest.approx([1 / 2 + 2 / 3, 1 / 2, 1], abs=1e-5)
    assert totals.pop("fair") == pytest.approx(1 + 1 + 2 / 3, abs=1e-5)
    assert totals == {"distinct": 3, "mapped": 5, "shared": 1, "within_only": 1, "outside": 1, "lone": 0}
    assert native.count_kinds(kinds, [0, 2, 3, 5, 8]) == [(1, 1, 0), (1, 0, 0), (1, 1, 0), (2, 0, 2)]
