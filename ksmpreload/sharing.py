"""Which processes share which KSM pages, and where in their memory those pages sit.

For a set of processes (root only: the kernel shows page frame numbers to CAP_SYS_ADMIN):

1. /proc/<pid>/maps gives the VMAs. Only those that can hold KSM pages are read
   (kernel.can_hold_ksm_pages): private VMAs, anonymous or file-backed, since KSM merges the
   anonymous pages of private mappings, including the copied-on-write pages of a library's
   data. The mergeable flag is not checked: it is only in smaps, whose page-table walk costs
   about as much as reading pagemap (docs/BENCHMARKS.md), under prctl merging nearly every
   private VMA has it, and a private VMA without it only costs its pagemap read.
2. /proc/<pid>/pagemap is read per VMA in large preads (native.PAGEMAP_CHUNK_WORDS); the C
   helper keeps the PFNs of present pages that are not file pages (KSM pages never are).
   Where a window of the VMA turns out mostly empty, the next one is read only where the
   kernel finds present pages (ioctl PAGEMAP_SCAN, Linux 6.7+; native.PfnArray), so a large
   reservation with little in it costs little.
3. All PFNs of the set are sorted once (radix sort in C) and their distinct values looked up
   in /proc/kpageflags (bit KPF_KSM); the KSM ones in /proc/kpagecount. Both files are read
   in runs of nearby PFNs, one pread per run.
4. One pass over the sorted PFNs tells, for each KSM page, which processes of the set map
   it and how often: the pair counts, sharing within one process only, and per page whether
   it is shared, from which the per-VMA counts follow.

This is a snapshot of memory that keeps changing: pages merged, broken by a write or freed
between two reads are counted as they were when read. KSM zero pages (use_zero_pages) map
the zero page, which is no KSM page: they are not counted here (ksm_stat has ksm_zero_pages).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from . import kernel, native
from .errors import NeedsRoot
from .timing import StepClock

KEEP_MASK = kernel.PAGEMAP_PRESENT | kernel.PAGEMAP_SWAPPED | kernel.PAGEMAP_FILE
KEEP_VALUE = kernel.PAGEMAP_PRESENT  # present, in RAM, not a file page


@dataclass
class RegionSharing:
    """One VMA: its anonymous pages in RAM (present, no file page) and the KSM pages among them."""

    start: int
    end: int
    perms: str
    path: str
    anon_pages: int = 0
    ksm_pages: int = 0
    ksm_shared: int = 0  # KSM pages another process of the set maps too
    ksm_within: int = 0  # KSM pages mapped again only inside this process


@dataclass
class ProcessSharing:
    pid: int
    comm: str
    anon_pages: int = 0  # anonymous pages in RAM (present, no file page), as read
    ksm_pages: int = 0  # of its pages, those mapping a KSM page (= ksm_merging_pages)
    ksm_distinct: int = 0  # distinct KSM pages it maps
    shared_in_set: int = 0  # ... also mapped by another process of the set
    within_only: int = 0  # ... mapped more than once here and by no other process of the set
    within_only_mapped: int = 0  # its pages mapping those
    mapped_outside: int = 0  # distinct KSM pages also mapped by processes outside the set
    lone: int = 0  # distinct KSM pages mapped once in all (nothing shares them now)
    fair_saved: float = 0.0  # its fair share of the pages KSM saves (saving.py), zero pages aside
    regions: list = field(default_factory=list)


@dataclass
class SharingReport:
    processes: dict  # pid -> ProcessSharing, in the order given
    pairs: dict  # (pid_a, pid_b) -> distinct KSM pages both map, pid_a before pid_b
    totals: dict  # over the set: distinct, mapped, shared, within_only, outside, lone, fair
    missing: list  # pids that were gone
    page_size: int

    def shared(self, pid_a: int, pid_b: int) -> int:
        """Distinct KSM pages both processes map."""
        return self.pairs.get((pid_a, pid_b), self.pairs.get((pid_b, pid_a), 0))

    @property
    def within_process(self) -> dict[int, int]:
        """pid -> distinct KSM pages shared only within that process."""
        return {pid: process.within_only for pid, process in self.processes.items()}

    def to_dict(self) -> dict:
        return {
            "page_size": self.page_size,
            "processes": [asdict(process) for process in self.processes.values()],
            "pairs": [{"pids": [a, b], "pages": pages} for (a, b), pages in self.pairs.items()],
            "within_process": [{"pid": pid, "pages": pages} for pid, pages in self.within_process.items()],
            "totals": dict(self.totals),
            "missing": list(self.missing),
        }


def _read_process(pid, pfns, region_offsets):
    """Append pid's PFNs to pfns and where each region's start in pfns to region_offsets;
    returns its ProcessSharing, or None if it is gone."""
    found = []

    def visit(region, first, end, pagemap_fd, mem_fd):
        offset = pfns.size
        pfns.read_pagemap(pagemap_fd, first, end, KEEP_MASK, KEEP_VALUE, kernel.PAGEMAP_PFN_MASK)
        found.append(RegionSharing(**region, anon_pages=pfns.size - offset))
        region_offsets.append(offset)

    comm = kernel.walk_ksm_regions(pid, visit)
    return None if comm is None else ProcessSharing(pid=pid, comm=comm, regions=found)


def sharing(pids: Iterable[int], timings: dict[str, float] | None = None, pagemap_scan: str = "auto") -> SharingReport:
    """A SharingReport of the KSM pages the processes `pids` map (see the module docstring).
    A dict `timings` gets the seconds of each step; pagemap_scan ("auto", "never", "always")
    says when to read pagemap only where PAGEMAP_SCAN finds present pages (native.PfnArray).
    Raises NeedsRoot without root: the kernel then shows every PFN as 0 and keeps
    /proc/kpageflags closed."""
    kernel.require_ksm()
    clock = StepClock(timings)
    pfns = native.PfnArray(scan=pagemap_scan)
    processes, missing, offsets, region_offsets = {}, [], [], []
    for pid in dict.fromkeys(pids):
        start, regions_before = pfns.size, len(region_offsets)
        process = _read_process(pid, pfns, region_offsets)
        if process is None:
            pfns.size = start  # drop what was read before it went away
            del region_offsets[regions_before:]
            missing.append(pid)
            continue
        processes[pid] = process
        offsets.append(start)
        process.anon_pages = pfns.size - start
    offsets.append(pfns.size)
    clock.step("pagemap")
    kept, zero_pfns = pfns.counts[0], pfns.counts[1]
    if kept and zero_pfns == kept:
        raise NeedsRoot("reading page frame numbers from /proc/<pid>/pagemap (they read as 0)")
    flags_fd = kernel.open_page_flags_file(kernel.KPAGEFLAGS)
    try:
        count_fd = kernel.open_page_flags_file(kernel.KPAGECOUNT)
        try:
            return _attribute(processes, missing, pfns, offsets, region_offsets, flags_fd, count_fd, clock)
        finally:
            os.close(count_fd)
    finally:
        os.close(flags_fd)


def _attribute(processes, missing, pfns, offsets, region_offsets, flags_fd, count_fd, clock):
    count = pfns.size
    keys = native.sort_pfns(pfns.data, count)
    distinct, ndistinct = native.distinct_pfns(keys, count)
    clock.step("sort")
    flags = native.read_pfn_words(flags_fd, distinct, ndistinct)
    ksm_pfns, nksm = native.select_pfns(distinct, flags, ndistinct, 1 << kernel.KPF_KSM)
    clock.step("kpageflags")
    mapcounts = native.read_pfn_words(count_fd, ksm_pfns, nksm)
    clock.step("kpagecount")
    kinds, rows, pair_counts, totals = native.attribute(keys, count, offsets, ksm_pfns, mapcounts, nksm)

    regions = [region for process in processes.values() for region in process.regions]
    for region, (ksm, shared, within) in zip(regions, native.count_kinds(kinds, region_offsets + [count])):
        region.ksm_pages, region.ksm_shared, region.ksm_within = ksm, shared, within
    order = list(processes)
    for pid, row in zip(order, rows):
        process = processes[pid]
        process.ksm_pages, process.ksm_distinct = row["mapped"], row["distinct"]
        process.shared_in_set, process.within_only = row["shared_in_set"], row["within_only"]
        process.within_only_mapped, process.mapped_outside = row["within_only_mapped"], row["outside"]
        process.lone, process.fair_saved = row["lone"], row["fair"]
    pairs = {(order[a], order[b]): pages for (a, b), pages in pair_counts.items()}
    clock.step("attribute")
    return SharingReport(processes=processes, pairs=pairs, totals=totals, missing=missing, page_size=kernel.page_size())
