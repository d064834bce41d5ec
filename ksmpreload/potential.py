"""How much of some processes' memory could merge, and how much has: the duplicate potential
behind `ksmpreload doctor`.

For a set of processes:

1. /proc/<pid>/maps gives the VMAs; those that can hold KSM pages are read
   (kernel.can_hold_ksm_pages: private VMAs, anonymous or file-backed, the heap and stack
   included), and of them only the anonymous pages, as sharing.py does.
2. /proc/<pid>/pagemap, read in large batches (native.PfnArray), gives the pages present in
   RAM that are no file pages, with their PFNs. Swapped-out and never-touched pages are left
   alone: reading them through /proc/<pid>/mem would fault them in.
3. Those pages are read from /proc/<pid>/mem, one pread per run of up to
   native.READ_CHUNK_PAGES consecutive pages, and hashed in C as they arrive (XXH64; an
   all-zero page gets hash 0). A page that cannot be read (EIO, EFAULT) is skipped and
   counted as unreadable; a process whose memory reads as empty is gone and reported missing.
4. The hashes are sorted (the radix sort of sharing.py, on their top 32 bits) and grouped:
   pages with equal hashes hold equal contents.
5. What is merged now (root only): the PFNs are sorted and their distinct frames looked up
   in /proc/kpageflags, as sharing.py does: which pages map a KSM page or the zero page, and
   how many frames back the pages read.

Counted, over the set (PotentialReport.totals) and per process and VMA:
- pages read, zero_pages (all bytes zero), duplicate_pages (non-zero pages whose content
  another page of the set holds) in duplicate_contents distinct contents; of those pages,
  duplicates_across (the content is in two processes or more) and duplicates_within (it is
  in one process only, several times).
- the potential saving in pages: for each duplicated non-zero content with n copies, n - 1
  (saving_across: processes holding it - 1, saving_within: the rest); plus the zero pages,
  all of them with use_zero_pages (they can map the zero page: potential_pages_use_zero_pages),
  all but one without (one KSM page: potential_pages_no_zero_pages). potential_pages takes
  the kernel's use_zero_pages now.
- merged_pages, the saving now: pages read minus the frames that back them (with
  use_zero_pages, the zero page's frame is not counted). Pages shared since a fork count as
  merged too; merge efficiency = merged_pages / potential_pages.
- per process and VMA: ksm_pages (map a KSM page), zero_frame_pages (map the zero page) and
  unmerged_pages (zero or duplicate pages on a frame nothing else maps: what merging has
  left); per process ksm_stat's ksm_merging_pages and ksm_zero_pages.

Caveats: a snapshot of memory that keeps changing, each page as it was when read. Equal
64-bit hashes are taken for equal contents: with a million pages, a collision in about one
run in 10^7. KSM-merged pages read as their content, so they count as duplicates: the
potential includes what is merged already, as merge efficiency needs. Duplicates in
processes outside the set are not seen, and a KSM page whose twin is outside is merged but
not in the set's potential. Without root, other users' memory cannot be read (NeedsRoot),
and PFNs read as 0: the merged figures are then None. Cost: every present anonymous page is
read once (about 2.5 GiB/s on 2 vCPUs: docs/BENCHMARKS.md, "Duplicate potential speed"),
and the arrays take about 60 bytes per page at their peak.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Optional

from . import kernel, native
from .sharing import KEEP_MASK, KEEP_VALUE
from .timing import StepClock
from .sizes import MIB

FRAME_FIELDS = ("ksm_pages", "zero_frame_pages", "unmerged_pages")  # known with PFNs only


@dataclass
class PageCounts:
    """Anonymous pages read, and what they hold (the fields are the module docstring's)."""

    pages: int = 0
    zero_pages: int = 0
    duplicate_pages: int = 0
    duplicates_across: int = 0
    duplicates_within: int = 0
    ksm_pages: Optional[int] = None  # this and the next two: None without PFNs
    zero_frame_pages: Optional[int] = None
    unmerged_pages: Optional[int] = None


@dataclass
class RegionPotential(PageCounts):
    """One VMA."""

    start: int = 0
    end: int = 0
    perms: str = ""
    path: str = ""


@dataclass
class ProcessPotential(PageCounts):
    pid: int = 0
    comm: str = ""
    unreadable_pages: int = 0  # present but unreadable (EIO), skipped
    ksm_merging_pages: Optional[int] = None  # from ksm_stat
    ksm_zero_pages: Optional[int] = None
    regions: list = field(default_factory=list)


@dataclass
class PotentialReport:
    processes: dict  # pid -> ProcessPotential, in the order given
    totals: dict  # pages, unreadable_pages, native.CONTENT_FIELDS, frames, zero_frames
    missing: list  # pids that were gone
    page_size: int
    use_zero_pages: bool  # the kernel's setting, which potential_pages and merged_pages follow
    potential_pages_use_zero_pages: int
    potential_pages_no_zero_pages: int
    merged_pages: Optional[int]  # None without PFNs (not root)
    # of merged_pages, pages sharing a frame other than a KSM page's (since a fork): no remedy
    # can save them again; None without PFNs
    shared_outside_ksm_pages: Optional[int] = None

    @property
    def potential_pages(self) -> int:
        return self.potential_pages_use_zero_pages if self.use_zero_pages else self.potential_pages_no_zero_pages

    @property
    def potential_mib(self) -> float:
        return self.potential_pages * self.page_size / MIB

    @property
    def merged_mib(self) -> float | None:
        return None if self.merged_pages is None else self.merged_pages * self.page_size / MIB

    @property
    def efficiency(self) -> float | None:
        """merged_pages / potential_pages; None when unknown or nothing could merge."""
        if self.merged_pages is None or not self.potential_pages:
            return None
        return self.merged_pages / self.potential_pages

    def to_dict(self) -> dict:
        fields = {
            name: getattr(self, name)
            for name in (
                "page_size",
                "use_zero_pages",
                "potential_pages",
                "potential_pages_use_zero_pages",
                "potential_pages_no_zero_pages",
                "potential_mib",
                "merged_pages",
                "shared_outside_ksm_pages",
                "merged_mib",
                "efficiency",
            )
        }
        return {
            **fields,
            "totals": dict(self.totals),
            "missing": list(self.missing),
            "processes": [asdict(process) for process in self.processes.values()],
        }


def _read_process(pid, pages, region_offsets, clock):
    """Read and hash pid's pages into pages, appending where each region starts in it to
    region_offsets; returns its ProcessPotential, or None if it is gone."""
    unreadable, found = pages.unreadable[0], []

    def visit(region, first, end, pagemap_fd, mem_fd):
        start = pages.size
        pages.read_pagemap(pagemap_fd, first, end, KEEP_MASK, KEEP_VALUE, kernel.PAGEMAP_PFN_MASK)
        clock.step("pagemap")
        pages.read_hash(mem_fd, start)
        clock.step("read")
        found.append(RegionPotential(**region))
        region_offsets.append(start)

    comm = kernel.walk_ksm_regions(pid, visit, with_mem=True, after_maps=lambda: clock.step("maps"))
    if comm is None:
        return None
    process = ProcessPotential(pid=pid, comm=comm, regions=found)
    process.unreadable_pages = pages.unreadable[0] - unreadable
    return process


def _add_ksm_stat(process):
    """Fill in ksm_stat's counters; False if the process has gone meanwhile."""
    stat = kernel.process_ksm_stat(process.pid)
    if stat is None:
        return False
    process.ksm_merging_pages = stat.get("ksm_merging_pages")
    process.ksm_zero_pages = stat.get("ksm_zero_pages")
    return True


def _mark_frames(pages, kinds):
    """Add the frame bits to kinds (native.mark_frames); returns (frames backing the pages,
    how many of them are the zero page, how many are KSM pages)."""
    count = pages.size
    keys = native.sort_pfns(pages.frames.data, count)
    distinct, ndistinct = native.distinct_pfns(keys, count)
    flags_fd = kernel.open_page_flags_file(kernel.KPAGEFLAGS)
    try:
        flags = native.read_pfn_words(flags_fd, distinct, ndistinct)
    finally:
        os.close(flags_fd)
    ksm_mask, zero_mask = 1 << kernel.KPF_KSM, 1 << kernel.KPF_ZERO_PAGE
    native.mark_frames(keys, count, flags, ksm_mask, zero_mask, kinds)
    ksm_frames = native.select_pfns(distinct, flags, ndistinct, ksm_mask)[1]
    return ndistinct, native.select_pfns(distinct, flags, ndistinct, zero_mask)[1], ksm_frames


def _fill_counts(targets, offsets, kinds, frames_known):
    """Set the PageCounts of each target from the pages at positions [offsets[i], offsets[i+1])."""
    for target, row, first, end in zip(targets, native.count_kind_bits(kinds, offsets), offsets, offsets[1:]):
        target.pages = end - first
        for name, value in row.items():
            setattr(target, name, value if frames_known or name not in FRAME_FIELDS else None)


def potential(
    pids: Iterable[int],
    timings: dict[str, float] | None = None,
    pagemap_scan: str = "auto",
    chunk_pages: int | None = None,
) -> PotentialReport:
    """A PotentialReport of how much of the processes `pids` could merge and has (see the
    module docstring). A dict `timings` gets the seconds of each step (maps, pagemap, read,
    hash, ksm_stat, sort, group, frames, count); pagemap_scan as for sharing.sharing; chunk_pages:
    pages per pread of /proc/<pid>/mem (default native.READ_CHUNK_PAGES)."""
    clock = StepClock(timings)
    pages = native.PageHashes(scan=pagemap_scan, chunk_pages=chunk_pages)
    processes, missing, offsets, region_offsets = {}, [], [], []
    for pid in dict.fromkeys(pids):
        start, regions_before = pages.size, len(region_offsets)
        process = _read_process(pid, pages, region_offsets, clock)
        if process is None or not _add_ksm_stat(process):
            pages.truncate(start)  # drop what was read before it went away
            del region_offsets[regions_before:]
            missing.append(pid)
            continue
        processes[pid] = process
        offsets.append(start)
    count = pages.size
    offsets.append(count)
    clock.step("ksm_stat")
    if timings is not None:  # "read" timed reading and hashing: split them
        timings["hash"] = pages.seconds[1]
        timings["read"] = timings.get("read", 0.0) - pages.seconds[1]
    keys = native.sort_hashes(pages.hashes, count)
    clock.step("sort")
    kinds, totals = native.group_contents(keys, count, pages.hashes, offsets)
    clock.step("group")
    frames_known = pages.frames.counts[1] < pages.frames.counts[0]  # PFNs read as 0 without root
    frames, zero_frames, ksm_frames = _mark_frames(pages, kinds) if frames_known else (None, None, None)
    clock.step("frames")
    _fill_counts(processes.values(), offsets, kinds, frames_known)
    regions = [region for process in processes.values() for region in process.regions]
    _fill_counts(regions, region_offsets + [count], kinds, frames_known)
    clock.step("count")
    report = _report(processes, missing, totals, count, frames, zero_frames)
    if frames_known:
        ksm_sharing = sum(process.ksm_pages for process in processes.values()) - ksm_frames
        report.shared_outside_ksm_pages = max(report.merged_pages - ksm_sharing, 0)
    return report


def _report(processes, missing, totals, count, frames, zero_frames):
    use_zero_pages = bool(kernel.read_knob("use_zero_pages"))
    duplicate_saving = totals["saving_across"] + totals["saving_within"]
    zero = totals["zero_pages"]
    merged = None
    if frames is not None:
        merged = count - frames + (zero_frames if use_zero_pages else 0)
    unreadable = sum(process.unreadable_pages for process in processes.values())
    totals = {"pages": count, "unreadable_pages": unreadable, **totals, "frames": frames, "zero_frames": zero_frames}
    return PotentialReport(
        processes=processes,
        totals=totals,
        missing=missing,
        page_size=kernel.page_size(),
        use_zero_pages=use_zero_pages,
        potential_pages_use_zero_pages=duplicate_saving + zero,
        potential_pages_no_zero_pages=duplicate_saving + max(zero - 1, 0),
        merged_pages=merged,
    )
