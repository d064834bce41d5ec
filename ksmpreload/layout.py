"""Duplicate content at any offset: what page hashing (potential.py) cannot see.

KSM merges whole pages with equal bytes. Equal data that sits at different offsets within its
pages (behind a glibc chunk header, jemalloc's cache-oblivious offset, a slab slot) makes no
equal pages, yet it is duplicate: page-aligned, it would merge (what ksm-wrap does for blocks
of its threshold and more). This reads the anonymous pages in RAM of a set of processes
(pagemap, /proc/<pid>/mem: root), cuts each run of consecutive pages into content-defined
chunks (the C helper's ksm_cdc_chunks: boundaries where a rolling hash of the last 64 bytes
has its low 10 bits zero, so equal data gives equal chunks wherever it starts), and counts
the chunks whose bytes occur more than once:

- duplicate_bytes: what storing each distinct chunk once would save, sum of (copies - 1) x
  length over chunks that are not all zeros;
- across processes / within one: whether the copies are in two processes or more, or all in
  one;
- in_place_bytes: duplicate chunks whose copies all start at the same offset in their pages
  (where, as-is, whole pages can be equal: the page potential counts those);
- aligned_gain_bytes: what page-aligning the blocks that hold the other duplicates adds (the C
  helper's ksm_chunk_analysis): a run of consecutive duplicate chunks of one region is taken
  for one block of the run's length plus run_edge_bytes (the expected part of the block in the
  chunks at its two ends, which also hold other bytes); from ksm-wrap's threshold up, its whole
  pages count, and its partial last page too where the process's allocator gives large blocks
  whole pages (jemalloc, mimalloc, tcmalloc: `allocators`), weighted by the share of each
  content's copies beyond the first that sit away from its most common page offset. Every
  copy is counted: the doctor scales it to the copies beyond the first.
- slab_item_bytes: in memcached processes, what slab classes of whole pages would let merge:
  every item then starts at one offset in its page, so all its pages but the first (the item's
  header differs between servers) can merge, whatever the order items were stored in.

A page frame is read once: a page that several processes map (shared since a fork, or merged
by KSM already) is no duplicate left to find. Pages of all zeros are left to the page
potential (KSM's zero pages). A process that ends, or memory that changes while it is read,
gives approximate numbers, never an error.
"""

from __future__ import annotations

import collections
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import binary, kernel, native
from .errors import NeedsRoot

KEEP_MASK = kernel.PAGEMAP_PRESENT | kernel.PAGEMAP_SWAPPED | kernel.PAGEMAP_FILE
KEEP_VALUE = kernel.PAGEMAP_PRESENT
READ_PAGES = 256  # pages read at once (1 MiB): a run longer than that is cut there
CHUNK_BYTES = native.ffi.sizeof("struct ksm_chunk")
WINDOW_PER_THREAD = 4  # runs read and cut at a time, a thread: bounds the chunks held in flight
REGIONS_SHOWN = 8  # per process, those with the most duplicate bytes
ALIGNED_RUN = 8 * 1024  # ksm-wrap's default threshold: shorter blocks it leaves where they are


@dataclass
class LayoutReport:
    bytes_read: int = 0
    chunks: int = 0
    zero_bytes: int = 0  # in chunks of all zero bytes (not counted as duplicates here)
    duplicate_bytes: int = 0
    duplicate_bytes_across: int = 0  # of chunks with copies in two processes or more
    duplicate_bytes_within: int = 0  # of chunks whose copies are all in one process
    duplicate_chunk_bytes: int = 0  # every copy of the duplicate chunks
    in_place_bytes: int = 0  # of those, chunks whose copies all start at one offset in their pages
    aligned_gain_bytes: int = 0  # pages that aligning the blocks of the other runs adds, every copy
    aligned_runs: int = 0  # runs counted in aligned_gain_bytes
    run_edge_bytes: int = 0  # the part of a block outside its run of duplicate chunks, both ends
    allocators: dict[int, list[str]] = field(default_factory=dict)  # pid -> allocators other than glibc's
    programs: dict[int, str] = field(default_factory=dict)  # pid -> comm
    missing: list[int] = field(default_factory=list)  # pids gone before they were read
    partial: list[int] = field(default_factory=list)  # pids that ended while they were read
    processes: list[dict] = field(default_factory=list)  # per process and region: Owners.detail
    pairs: list[dict] = field(default_factory=list)  # {"pids": [a, b], "shared_bytes"}, largest first


class _Owners:
    """The regions read, numbered in read order (a chunk's owner), and whose process each is."""

    def __init__(self, pids: list[int]) -> None:
        self.pids, self.regions, self.process_of = pids, [], []
        self.index = {pid: number for number, pid in enumerate(pids)}

    def add(self, pid: int, region: dict) -> int:
        self.regions.append((pid, region))
        self.process_of.append(self.index[pid])
        return len(self.regions) - 1

    def detail(self, per_owner: list[int], pairs: list[int], gone: list[int]) -> tuple[list[dict], list[dict]]:
        """(per process: its fair share of the duplicate bytes, the part at other page offsets,
        and its REGIONS_SHOWN regions with most; pairs of processes that share content)."""
        processes = {pid: {"pid": pid, "duplicate_bytes": 0, "other_offset_bytes": 0, "regions": []}
                     for pid in self.pids if pid not in gone}  # fmt: skip
        for owner, (pid, region) in enumerate(self.regions):
            duplicate, other = per_owner[2 * owner], per_owner[2 * owner + 1]
            if pid not in processes or not duplicate:
                continue
            processes[pid]["duplicate_bytes"] += duplicate
            processes[pid]["other_offset_bytes"] += other
            entry = {"start": hex(region["start"]), "end": hex(region["end"]), "path": region["path"]}
            processes[pid]["regions"].append({**entry, "duplicate_bytes": duplicate, "other_offset_bytes": other})
        for process in processes.values():
            process["regions"] = sorted(process["regions"], key=lambda r: -r["duplicate_bytes"])[:REGIONS_SHOWN]
        count = len(self.pids)
        shared = [
            {"pids": [self.pids[a], self.pids[b]], "shared_bytes": pairs[a * count + b]}
            for a in range(count)
            for b in range(a + 1, count)
            if pairs[a * count + b]
        ]
        return list(processes.values()), sorted(shared, key=lambda pair: -pair["shared_bytes"])


class _Chunks:
    """Every chunk read, as the C helper's struct ksm_chunk (16 bytes each: about 16 MiB per GiB
    read at the average chunk of 1 KiB), in one growing array."""

    def __init__(self) -> None:
        self.capacity, self.size = 1 << 16, 0
        self.array = native.ffi.new("struct ksm_chunk[]", self.capacity)

    def append(self, found, count: int) -> None:
        if self.capacity - self.size < count:
            self.capacity = max(2 * self.capacity, self.size + count)
            grown = native.ffi.new("struct ksm_chunk[]", self.capacity)
            native.ffi.memmove(grown, self.array, self.size * CHUNK_BYTES)
            self.array = grown
        native.ffi.memmove(self.array + self.size, found, count * CHUNK_BYTES)
        self.size += count

    def count_duplicates(self, report: LayoutReport, owners: _Owners) -> None:
        flags = [_owner_flags(report, pid) for pid, _ in owners.regions]
        found = native.chunk_analysis(
            self.array, self.size, owners.process_of, len(owners.pids), kernel.page_size(), ALIGNED_RUN, flags
        )
        for name, value in found.totals.items():
            setattr(report, name, value)
        report.chunks = self.size
        report.processes, report.pairs = owners.detail(found.per_owner, found.pairs, report.missing)


def _owner_flags(report: LayoutReport, pid: int) -> int:
    """The C helper's flags for a region of pid: whole last pages (an allocator other than glibc's:
    its large blocks are whole pages), memcached's slab items."""
    whole = native.WHOLE_LAST_PAGE if report.allocators.get(pid) else 0
    return whole | (native.SLAB_ITEMS if report.programs.get(pid) == "memcached" else 0)


def _runs(pages):
    """(first page, pages) of the runs of consecutive page numbers, at most READ_PAGES each."""
    start = 0
    while start < len(pages):
        end = start + 1
        while end < len(pages) and end - start < READ_PAGES and pages[end] == pages[end - 1] + 1:
            end += 1
        yield pages[start], end - start
        start = end


_buffers = threading.local()  # a read buffer per worker thread, reused: a fresh one faults in every page


def _read_buffer(size: int) -> bytearray:
    if len(getattr(_buffers, "data", b"")) < size:
        _buffers.data = bytearray(size)
    return _buffers.data


def _chunk_run(mem_fd, first_page, pages, owner):
    """(bytes read, chunks, count) of one run of pages; (0, None, 0) if it cannot be read. On a
    worker thread: preadv and the C helper run without the GIL."""
    page = kernel.page_size()
    buffer = _read_buffer(READ_PAGES * page)
    try:
        read = os.preadv(mem_fd, [memoryview(buffer)[: pages * page]], first_page * page)
    except OSError:  # EIO: unmapped since the pagemap read
        return 0, None, 0
    cap = read // native.lib.KSM_CDC_MIN + 1
    found = native.ffi.new("struct ksm_chunk[]", cap)
    return read, found, native.lib.ksm_cdc_chunks(native.ffi.from_buffer(buffer), read, owner, found, cap)


def _read_process(pid, owners, chunks, report, frames_read, pool, window) -> bool:
    """Reads pid's anonymous pages in RAM into `chunks`, but frames read already, each region an
    owner. Runs of pages are read and cut on the pool's threads, across regions, at most `window`
    at a time; their chunks join `chunks` in read order. False if the process is gone."""
    pending, present = collections.deque(), native.PfnArray(with_pages=True)

    def take_oldest():
        read, found, count = pending.popleft().result()
        report.bytes_read += read
        if count:
            chunks.append(found, count)

    def visit(region, first, end, pagemap_fd, mem_fd):
        owner = owners.add(pid, region)
        present.size = 0  # one array for every region of the process: each allocation zeroes 2 MiB
        present.read_pagemap(pagemap_fd, first, end, KEEP_MASK, KEEP_VALUE, kernel.PAGEMAP_PFN_MASK)
        for run in _runs(frames_read.new_pages(present)):
            pending.append(pool.submit(_chunk_run, mem_fd, *run, owner))
            while len(pending) > window:
                take_oldest()

    def finish():
        while pending:
            take_oldest()

    # finish runs before the walk closes the files, also when a visit raises: no read is left in flight
    return kernel.walk_ksm_regions(pid, visit, with_mem=True, after_visits=finish) is not None


def allocators_of(pid: int) -> list[str]:
    """The allocators other than glibc's that the process's program carries or has loaded."""
    maps = kernel.process_maps(pid) or []
    libraries = {region["path"] for region in maps if region.get("path", "").startswith("/")}
    try:
        return binary.allocators(kernel.executable_path(pid), libraries)[0]
    except OSError:
        return []


def duplicates_at_any_offset(pids: list[int], threads: int | None = None) -> LayoutReport:
    """The duplicate content of the processes `pids`, wherever it sits (module docstring), read
    and cut on `threads` threads (default: one per CPU). NeedsRoot without root:
    /proc/<pid>/mem and page frames are root's."""
    if os.geteuid() != 0:
        raise NeedsRoot("finding duplicates at any offset (reading /proc/<pid>/mem)")
    report, chunks, frames_read = LayoutReport(), _Chunks(), native.FrameSet()
    owners, threads = _Owners(list(dict.fromkeys(pids))), threads or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for pid in owners.pids:
            report.allocators[pid] = allocators_of(pid)
            report.programs[pid] = (kernel.read_proc(pid, "comm") or "").strip()
            if not _read_process(pid, owners, chunks, report, frames_read, pool, WINDOW_PER_THREAD * threads):
                report.missing.append(pid)
            elif not kernel.process_alive(pid):  # ended while it was read: what was read counts
                report.partial.append(pid)
    chunks.count_duplicates(report, owners)
    return report
