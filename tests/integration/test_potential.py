"""How much of some processes' memory could merge (ksmpreload.potential), on the real kernel;
and its C pieces (hash, grouping, reading) on data whose answer is known."""

import ctypes
import json
import mmap
import os
import random
import subprocess
import sys
import time

import pytest

from conftest import require_root_ksm
from ksmpreload import kernel, native, scanning
from ksmpreload.potential import potential

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB_PAGES = (1 << 20) // PAGE
NOISE = 64  # pages a small C program holds besides its data (25 seen)


def start_worker(program, shared, private, zero, twin, seed, mergeable=False):
    """tests/c/potential_worker: one mapping of SHARED | PRIVATE | ZERO | TWIN twice (MiB)."""
    proc = subprocess.Popen(
        [program, *map(str, (shared, private, zero, twin, seed, int(mergeable)))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    proc.report = json.loads(proc.stdout.readline())
    assert proc.report["pid"] == proc.pid
    return proc


def stop(*procs):
    for proc in procs:
        proc.stdin.close()
    for proc in procs:
        proc.wait(timeout=30)


def data_region(report, proc):
    """The VMA of the worker's mapping."""
    address = proc.report["address"]
    regions = [r for r in report.processes[proc.pid].regions if r.start <= address < r.end]
    assert len(regions) == 1, report.processes[proc.pid].regions
    return regions[0]


def near(value, expected, slack=NOISE):
    return expected <= value <= expected + slack


def test_duplicates_across_and_within_processes_zero_pages_and_private_data(c_programs):
    require_root_ksm()
    shared, private, zero, twin = 16, 8, 4, 2
    program = c_programs("potential_worker")
    workers = [start_worker(program, shared, private, zero, twin, seed) for seed in (1, 2)]
    try:
        report = potential([proc.pid for proc in workers])
    finally:
        stop(*workers)
    assert list(report.processes) == [proc.pid for proc in workers] and not report.missing
    totals = report.totals
    # In each worker's mapping, exactly: the shared data is duplicated across the two, the
    # twin within each, the zero pages are zero, the private data has no duplicate.
    for proc in workers:
        region = data_region(report, proc)
        assert region.pages == (shared + private + zero + 2 * twin) * MIB_PAGES
        assert region.zero_pages == zero * MIB_PAGES
        assert region.duplicates_across == shared * MIB_PAGES
        assert region.duplicates_within == 2 * twin * MIB_PAGES
        assert region.duplicate_pages == region.duplicates_across + region.duplicates_within
        assert region.ksm_pages == 0 and region.unmerged_pages == (shared + 2 * twin + zero) * MIB_PAGES
        process = report.processes[proc.pid]
        assert near(process.duplicates_within, 2 * twin * MIB_PAGES), process
        assert process.pages == sum(r.pages for r in process.regions)
    assert near(totals["duplicates_across"], 2 * shared * MIB_PAGES, 2 * NOISE), totals
    assert near(totals["saving_across"], shared * MIB_PAGES), totals
    assert near(totals["saving_within"], 2 * twin * MIB_PAGES), totals
    assert near(totals["zero_pages"], 2 * zero * MIB_PAGES, 2 * NOISE), totals
    saving = totals["saving_across"] + totals["saving_within"]
    assert report.potential_pages_use_zero_pages == saving + totals["zero_pages"]
    assert report.potential_pages_no_zero_pages == saving + totals["zero_pages"] - 1
    # Not mergeable: nothing is merged.
    assert report.merged_pages <= NOISE and report.efficiency < 0.02, report.merged_pages
    json.dumps(report.to_dict())


def test_random_data_has_no_duplicate_potential(c_programs):
    require_root_ksm()
    worker = start_worker(c_programs("potential_worker"), 0, 64, 0, 0, 7)
    try:
        report = potential([worker.pid])
    finally:
        stop(worker)
    region = data_region(report, worker)
    assert region.pages == 64 * MIB_PAGES
    assert region.duplicate_pages == region.zero_pages == 0, region
    assert report.totals["pages"] >= 64 * MIB_PAGES
    assert report.totals["duplicate_pages"] <= NOISE and report.potential_pages <= NOISE, report.totals


def merging_pages(pid):
    return kernel.process_ksm_stat(pid)["ksm_merging_pages"]


def test_after_ksm_merges_the_workers_merge_efficiency_is_close_to_one(ksm_running, c_programs):
    shared, private, zero, twin = 16, 4, 2, 1
    program = c_programs("potential_worker")
    workers = [start_worker(program, shared, private, zero, twin, seed, mergeable=True) for seed in (1, 2)]
    pids = [proc.pid for proc in workers]
    mergeable = (shared + zero + 2 * twin) * MIB_PAGES
    try:
        deadline = time.monotonic() + 180
        while any(merging_pages(pid) < 0.95 * mergeable for pid in pids):
            assert time.monotonic() < deadline, [merging_pages(pid) for pid in pids]
            time.sleep(0.2)
        scanning.wait_until_settled(lambda: [merging_pages(pid) for pid in pids])
        report = potential(pids)
    finally:
        stop(*workers)
    # KSM pages read as their content: the potential is what it was before merging.
    assert near(report.totals["saving_across"], shared * MIB_PAGES), report.totals
    assert report.efficiency >= 0.9, (report.merged_pages, report.potential_pages)
    for proc in workers:
        region = data_region(report, proc)
        assert region.ksm_pages + region.zero_frame_pages >= 0.95 * mergeable, region
        assert region.unmerged_pages <= 0.05 * mergeable, region
        assert report.processes[proc.pid].ksm_merging_pages >= 0.95 * mergeable


def test_a_process_that_is_gone_is_reported_missing():
    require_root_ksm()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    report = potential([os.getpid(), proc.pid])
    assert report.missing == [proc.pid] and list(report.processes) == [os.getpid()]
    assert report.totals["pages"] == report.processes[os.getpid()].pages > 0


def test_every_pagemap_mode_reads_the_same_pages_of_a_large_reservation():
    """16 GiB reserved, 8 MiB written in two halves (one all zero): reading pagemap directly
    and only where PAGEMAP_SCAN finds pages read the same pages, with the same contents."""
    require_root_ksm()
    code = (
        "import mmap, sys\n"
        "NORESERVE = 0x4000\n"
        "m = mmap.mmap(-1, 16 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | NORESERVE)\n"
        "m.madvise(mmap.MADV_NOHUGEPAGE)\n"
        "for i in range(0, 8 << 20, mmap.PAGESIZE): m[i] = 1 if i < 4 << 20 else 0\n"
        "m[1 << 30:(1 << 30) + (4 << 20)] = bytes(4 << 20)\n"
        "print('ready', flush=True); sys.stdin.read()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        found = {}
        for mode in ("never", "always"):
            process = potential([proc.pid], pagemap_scan=mode).processes[proc.pid]
            found[mode] = [(r.start, r.pages, r.zero_pages, r.duplicate_pages) for r in process.regions]
    finally:
        stop(proc)
    assert found["never"] == found["always"]
    # 1024 pages "\x01\0\0...", 1024 + 1024 zero pages.
    assert any(pages >= 3 * 1024 and zero >= 2 * 1024 and dup >= 1024 for _, pages, zero, dup in found["never"])


# ---- the C pieces -----------------------------------------------------------------------------

P1, P2, P3, P4 = 0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x85EBCA77C2B2AE63
M64 = (1 << 64) - 1


def xxh64(data):
    """XXH64 with seed 0 of data whose length is a multiple of 32, written from the spec."""

    def rotl(x, r):
        return (x << r | x >> (64 - r)) & M64

    def round_(acc, word):
        return rotl((acc + word * P2) & M64, 31) * P1 & M64

    lanes = [(P1 + P2) & M64, P2, 0, -P1 & M64]
    for at in range(0, len(data), 8):
        lane = at // 8 % 4
        lanes[lane] = round_(lanes[lane], int.from_bytes(data[at : at + 8], "little"))
    h = (rotl(lanes[0], 1) + rotl(lanes[1], 7) + rotl(lanes[2], 12) + rotl(lanes[3], 18)) & M64
    for lane in lanes:
        h = ((h ^ round_(0, lane)) * P1 + P4) & M64
    h = (h + len(data)) & M64
    h = (h ^ h >> 33) * P2 & M64
    h = (h ^ h >> 29) * P3 & M64
    return h ^ h >> 32


def test_page_hash_is_xxh64_and_zero_pages_hash_to_zero():
    page = bytearray(random.Random(3).randbytes(PAGE))
    assert native.hash_page(page) == xxh64(page)
    assert native.hash_page(bytes(32)) == 0 and native.hash_page(bytes(PAGE)) == 0
    one_bit = bytearray(PAGE)
    one_bit[PAGE - 1] = 0x80
    assert native.hash_page(one_bit) == xxh64(one_bit) not in (0, native.hash_page(page))


def test_grouping_of_known_hashes():
    # Process 0: positions 0-4, process 1: positions 5-9. Hash 7 is in both, hash 9 twice in
    # process 1 only, hash 0 is a zero page; top | 5 and top | 3 share their top 32 bits (as
    # do all the small hashes: the insertion sort sorts them), each held by both processes.
    top = 1 << 40
    hashes = [7, 0, top | 5, 11, top | 3, 9, top | 3, 7, 9, top | 5]
    offsets = [0, 5, 10]
    array = native.u64_array(len(hashes))
    array[0 : len(hashes)] = hashes
    keys = native.sort_hashes(array, len(hashes))
    kinds, totals = native.group_contents(keys, len(hashes), array, offsets)
    assert totals == {
        "contents": 6,
        "zero_pages": 1,
        "duplicate_pages": 8,
        "duplicate_contents": 4,
        "duplicates_across": 6,
        "duplicates_within": 2,
        "saving_across": 3,
        "saving_within": 1,
    }
    zero, dup, across, within = 1, 2, 4, 8
    assert list(kinds[0:10]) == [
        dup | across,
        zero,
        dup | across,
        0,
        dup | across,
        dup | within,
        dup | across,
        dup | across,
        dup | within,
        dup | across,
    ]
    rows = native.count_kind_bits(kinds, offsets)
    assert [row["duplicates_across"] for row in rows] == [3, 3]
    assert [row["duplicates_within"] for row in rows] == [0, 2]
    assert [row["zero_pages"] for row in rows] == [1, 0]
    # Frames: positions 0 and 7 (hash 7) share frame 50; 1 (zero) maps the zero page (frame
    # 60); 5 maps a KSM page (frame 70); every other page has a frame of its own.
    pfns = [50, 60, 10, 11, 12, 70, 13, 50, 14, 15]
    frames = native.u64_array(10)
    frames[0:10] = pfns
    frame_keys = native.sort_pfns(frames, 10)
    distinct, count = native.distinct_pfns(frame_keys, 10)
    ksm, zero_frame = 1 << kernel.KPF_KSM, 1 << kernel.KPF_ZERO_PAGE
    flags = native.u64_array(count)
    flags[0:count] = [{60: zero_frame, 70: ksm}.get(pfn, 0) for pfn in distinct[0:count]]
    native.mark_frames(frame_keys, 10, flags, ksm, zero_frame, kinds)
    rows = native.count_kind_bits(kinds, [0, 10])
    assert rows[0]["ksm_pages"] == 1 and rows[0]["zero_frame_pages"] == 1
    # Unmerged: the duplicates on frames of their own (2, 4, 6, 8, 9); 0 and 7 share a frame,
    # 5 is a KSM page, the zero page maps the zero frame.
    unmerged = 64
    assert [i for i in range(10) if kinds[i] & unmerged] == [2, 4, 6, 8, 9]


def libc_mmap(pages):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    address = libc.mmap(
        None, pages * PAGE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0
    )
    assert address not in (None, ctypes.c_void_p(-1).value)
    return libc, address


def read_hash(fd, page_indices, chunk_pages=64):
    pages = native.PageHashes(chunk_pages=chunk_pages)
    count = len(page_indices)
    pages.frames.pages[0:count] = page_indices
    pages.frames.data[0:count] = range(100, 100 + count)
    pages.frames.size = count
    pages.read_hash(fd, 0)
    kept = pages.size
    return (
        list(pages.frames.pages[0:kept]),
        list(pages.frames.data[0:kept]),
        list(pages.hashes[0:kept]),
        pages.unreadable[0],
    )


def test_unreadable_pages_are_skipped_and_the_rest_read():
    libc, address = libc_mmap(4)
    contents = [random.Random(i).randbytes(PAGE) for i in range(4)]
    for i, content in enumerate(contents):
        ctypes.memmove(address + i * PAGE, content, PAGE)
    assert libc.munmap(address + 2 * PAGE, PAGE) == 0  # a hole in the middle of a run
    first = address // PAGE
    fd = os.open("/proc/self/mem", os.O_RDONLY)
    try:
        for chunk in (1, 2, 64):
            pages, pfns, hashes, unreadable = read_hash(fd, [0, first, first + 1, first + 2, first + 3], chunk)
            assert pages == [first, first + 1, first + 3] and unreadable == 2, (chunk, pages)
            assert pfns == [101, 102, 104]  # kept aligned with the pages
            assert hashes == [native.hash_page(contents[i]) for i in (0, 1, 3)]
    finally:
        os.close(fd)
        libc.munmap(address, 2 * PAGE)
        libc.munmap(address + 3 * PAGE, PAGE)


def test_a_process_gone_while_read_raises_process_lookup_error():
    require_root_ksm()
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "ready\n"
    fd = os.open(f"/proc/{proc.pid}/mem", os.O_RDONLY)
    try:
        stack = next(region for region in kernel.process_maps(proc.pid) if region["path"] == "[stack]")
        last = stack["end"] // PAGE - 1
        assert read_hash(fd, [last])[0] == [last]  # readable while it runs
        stop(proc)
        with pytest.raises(ProcessLookupError):
            read_hash(fd, [last])
    finally:
        os.close(fd)
