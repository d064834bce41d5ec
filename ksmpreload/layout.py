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
  one.

A page frame is read once: a page that several processes map (shared since a fork, or merged
by KSM already) is no duplicate left to find. Pages of all zeros are left to the page
potential (KSM's zero pages). A process that ends, or memory that changes while it is read,
gives approximate numbers, never an error.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import kernel, native
from .errors import NeedsRoot

KEEP_MASK = kernel.PAGEMAP_PRESENT | kernel.PAGEMAP_SWAPPED | kernel.PAGEMAP_FILE
KEEP_VALUE = kernel.PAGEMAP_PRESENT
READ_PAGES = 256  # pages read at once (1 MiB): a run longer than that is cut there
CHUNK_BYTES = native.ffi.sizeof("struct ksm_chunk")
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
    aligned_run_bytes: int = 0  # whole pages of duplicate runs of ALIGNED_RUN bytes and more, less one a run
    aligned_runs: int = 0
    missing: list[int] = field(default_factory=list)  # pids gone before they were read


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

    def count_duplicates(self, report: LayoutReport) -> None:
        # in read order first: chunk_duplicates sorts them
        runs = native.chunk_runs(self.array, self.size, kernel.page_size(), ALIGNED_RUN)
        report.aligned_run_bytes, report.aligned_runs, report.duplicate_chunk_bytes = runs
        duplicates = native.chunk_duplicates(self.array, self.size)
        report.duplicate_bytes, report.duplicate_bytes_across, report.duplicate_bytes_within = duplicates[:3]
        report.zero_bytes = duplicates[3]
        report.chunks = self.size


def _runs(pages):
    """(first page, pages) of the runs of consecutive page numbers, at most READ_PAGES each."""
    start = 0
    while start < len(pages):
        end = start + 1
        while end < len(pages) and end - start < READ_PAGES and pages[end] == pages[end - 1] + 1:
            end += 1
        yield pages[start], end - start
        start = end


def _chunk_run(mem_fd, first_page, pages, owner):
    """(bytes read, chunks, count) of one run of pages; (0, None, 0) if it cannot be read. On a
    worker thread: pread and the C helper run without the GIL."""
    page = kernel.page_size()
    try:
        data = os.pread(mem_fd, pages * page, first_page * page)
    except OSError:  # EIO: unmapped since the pagemap read
        return 0, None, 0
    cap = len(data) // native.lib.KSM_CDC_MIN + 1
    found = native.ffi.new("struct ksm_chunk[]", cap)
    return len(data), found, native.lib.ksm_cdc_chunks(data, len(data), owner, found, cap)


def _read_process(pid, owner, chunks, report, frames_read, pool) -> bool:
    """Reads pid's anonymous pages in RAM into `chunks`, but frames read already, a region's
    runs on the pool's threads; False if the process is gone."""

    def visit(region, first, end, pagemap_fd, mem_fd):
        present = native.PfnArray(with_pages=True)
        present.read_pagemap(pagemap_fd, first, end, KEEP_MASK, KEEP_VALUE, kernel.PAGEMAP_PFN_MASK)
        runs = _runs(frames_read.new_pages(present))
        for read, found, count in pool.map(lambda run: _chunk_run(mem_fd, *run, owner), runs):
            report.bytes_read += read
            if count:
                chunks.append(found, count)

    return kernel.walk_ksm_regions(pid, visit, with_mem=True) is not None


def duplicates_at_any_offset(pids: list[int], threads: int | None = None) -> LayoutReport:
    """The duplicate content of the processes `pids`, wherever it sits (module docstring), read
    and cut on `threads` threads (default: one per CPU). NeedsRoot without root:
    /proc/<pid>/mem and page frames are root's."""
    if os.geteuid() != 0:
        raise NeedsRoot("finding duplicates at any offset (reading /proc/<pid>/mem)")
    report, chunks, frames_read = LayoutReport(), _Chunks(), native.FrameSet()
    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        for owner, pid in enumerate(dict.fromkeys(pids)):
            if not _read_process(pid, owner, chunks, report, frames_read, pool):
                report.missing.append(pid)
    chunks.count_duplicates(report)
    return report
