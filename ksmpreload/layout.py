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
from dataclasses import dataclass, field

from . import kernel, native
from .errors import NeedsRoot

KEEP_MASK = kernel.PAGEMAP_PRESENT | kernel.PAGEMAP_SWAPPED | kernel.PAGEMAP_FILE
KEEP_VALUE = kernel.PAGEMAP_PRESENT
READ_PAGES = 256  # pages read at once (1 MiB): a run longer than that is cut there


@dataclass
class LayoutReport:
    bytes_read: int = 0
    chunks: int = 0
    zero_bytes: int = 0  # in chunks of all zero bytes (not counted as duplicates here)
    duplicate_bytes: int = 0
    duplicate_bytes_across: int = 0  # of chunks with copies in two processes or more
    duplicate_bytes_within: int = 0  # of chunks whose copies are all in one process
    missing: list[int] = field(default_factory=list)  # pids gone before they were read


class _Chunks:
    """hash -> [copies, length, first pid, in more than one process]"""

    def __init__(self) -> None:
        self.seen: dict[int, list] = {}
        self.buffer_chunks = 0

    def add(self, data: bytes, pid: int, report: LayoutReport) -> None:
        cap = len(data) // native.lib.KSM_CDC_MIN + 1
        hashes, lengths = native.ffi.new("uint64_t[]", cap), native.ffi.new("uint32_t[]", cap)
        count = native.lib.ksm_cdc_chunks(data, len(data), hashes, lengths, cap)
        report.chunks += count
        for i in range(count):
            digest, length = hashes[i], lengths[i]
            if not digest:
                report.zero_bytes += length
                continue
            entry = self.seen.get(digest)
            if entry is None:
                self.seen[digest] = [1, length, pid, False]
            else:
                entry[0] += 1
                entry[3] = entry[3] or entry[2] != pid


def _runs(pages):
    """(first page, pages) of the runs of consecutive page numbers, at most READ_PAGES each."""
    start = 0
    while start < len(pages):
        end = start + 1
        while end < len(pages) and end - start < READ_PAGES and pages[end] == pages[end - 1] + 1:
            end += 1
        yield pages[start], end - start
        start = end


def _read_process(pid: int, chunks: _Chunks, report: LayoutReport, frames_read: set[int]) -> bool:
    """Reads pid's anonymous pages in RAM into `chunks`, but frames read already; False if it is gone."""
    page = kernel.page_size()

    def visit(region, first, end, pagemap_fd, mem_fd):
        present = native.PfnArray(with_pages=True)
        present.read_pagemap(pagemap_fd, first, end, KEEP_MASK, KEEP_VALUE, kernel.PAGEMAP_PFN_MASK)
        new = []
        for at in range(present.size):
            frame = present.data[at]
            if frame and frame in frames_read:  # 0: a frame number the kernel did not show
                continue
            frames_read.add(frame)
            new.append(present.pages[at])
        for first_page, pages in _runs(new):
            try:
                data = os.pread(mem_fd, pages * page, first_page * page)
            except OSError:  # EIO: unmapped since the pagemap read
                continue
            report.bytes_read += len(data)
            chunks.add(data, pid, report)

    return kernel.walk_ksm_regions(pid, visit, with_mem=True) is not None


def duplicates_at_any_offset(pids: list[int]) -> LayoutReport:
    """The duplicate content of the processes `pids`, wherever it sits (module docstring).
    NeedsRoot without root: /proc/<pid>/mem and page frames are root's."""
    if os.geteuid() != 0:
        raise NeedsRoot("finding duplicates at any offset (reading /proc/<pid>/mem)")
    report, chunks, frames_read = LayoutReport(), _Chunks(), set()
    for pid in dict.fromkeys(pids):
        if not _read_process(pid, chunks, report, frames_read):
            report.missing.append(pid)
    for copies, length, _, across in chunks.seen.values():
        if copies > 1:
            saved = (copies - 1) * length
            report.duplicate_bytes += saved
            if across:
                report.duplicate_bytes_across += saved
            else:
                report.duplicate_bytes_within += saved
    return report
