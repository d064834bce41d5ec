"""Who saves what: per process and per memory region, each region labelled by what made it.

Sources, all read from outside the processes:
- /proc/<pid>/ksm_stat: the process's merged pages, zero pages, profit (kernel.process_ksm_stat);
- /proc/<pid>/smaps: per VMA its size, anonymous KiB, KSM KiB and the mergeable flag (mg);
- the shim's counters file: alignment padding, and records of the regions it handled (which
  mmap, whose caller, which glibc chunk or arena, which jemalloc extent);
- for a set of processes, the KSM pages each pair shares (sharing.py, root only).

A label comes from facts only: a file path, the kernel's names ([heap], [stack]), a shim
record, or a layout glibc makes (a thread stack above its guard page, an arena heap on a
64 MiB boundary before its reserve). Anything else is "unlabelled".
"""

from __future__ import annotations

import bisect
import os
from dataclasses import asdict, dataclass, field
from collections.abc import Iterable
from typing import TYPE_CHECKING

from . import attached, kernel, saving, shimstats
from .errors import NeedsRoot, NoSuchProcess

if TYPE_CHECKING:
    from .sharing import SharingReport

GLIBC_HEAP_MAX = 64 << 20  # a glibc thread arena's heap: this size, aligned to it
GUARD_MAX = 1 << 20  # thread stack guards are a page to some KiB
UNLABELLED = "unlabelled"
KERNEL_NAMES = {"[heap]": "brk heap", "[stack]": "main stack"}
UNMERGED_MIN_KIB = 64  # smaller mergeable regions are not worth listing as unmerged


def _is_anonymous(region):
    return region["path"] == ""


def _adjacent_reserve(region, neighbour):
    """`neighbour` is an inaccessible anonymous VMA touching `region`."""
    return (
        neighbour is not None
        and _is_anonymous(neighbour)
        and neighbour["perms"].startswith("---")
        and (neighbour["end"] == region["start"] or neighbour["start"] == region["end"])
    )


class Records:
    """The shim's region records of one process, looked up by address."""

    def __init__(self, records: list[dict], regions: list[dict]) -> None:
        self.records = sorted(records, key=lambda record: record["start"])
        self.starts = [record["start"] for record in self.records]
        self.ends_so_far = []  # the highest end among records[:i + 1]: where a backward walk can stop
        for record in self.records:
            self.ends_so_far.append(max(record["end"], self.ends_so_far[-1] if self.ends_so_far else 0))
        self.objects = sorted(
            (r["start"], r["end"], os.path.basename(r["path"])) for r in regions if r["path"].startswith("/")
        )

    def covering(self, start: int, end: int) -> dict | None:
        """The record that covers most of [start, end), or None."""
        best, best_overlap = None, 0
        index = bisect.bisect_left(self.starts, end) - 1
        while index >= 0 and self.ends_so_far[index] > start:
            record = self.records[index]
            overlap = min(end, record["end"]) - max(start, record["start"])
            if overlap > best_overlap:
                best, best_overlap = record, overlap
            index -= 1
        return best

    def object_at(self, address: int) -> str | None:
        """The file mapped at `address` (a library, the program), or None."""
        index = bisect.bisect_right(self.objects, (address, float("inf"), "")) - 1
        if index >= 0 and self.objects[index][0] <= address < self.objects[index][1]:
            return self.objects[index][2]
        return None


def _record_label(record, records):
    if record["kind"] == "mmap" and record["caller"]:
        caller = records.object_at(record["caller"])
        return f"mmap by {caller}" if caller else "mmap"
    return record["kind"]


def region_label(index: int, regions: list[dict], records: Records) -> tuple[str, str]:
    """(label, source) of regions[index]: what made it, and where that is known from: "file",
    "kernel" (its name for the VMA), "shim" (a region record), "layout" (glibc's) or "none"."""
    region = regions[index]
    path = region["path"]
    if path.startswith("/"):
        return f"file {os.path.basename(path)}", "file"
    if path:
        return KERNEL_NAMES.get(path, path), "kernel"  # [vdso], [anon:...]: as the kernel names them
    record = records.covering(region["start"], region["end"])
    if record is not None:
        return _record_label(record, records), "shim"
    previous = regions[index - 1] if index > 0 else None
    following = regions[index + 1] if index + 1 < len(regions) else None
    if (
        region["perms"].startswith("rw")
        and region["start"] % GLIBC_HEAP_MAX == 0
        and _adjacent_reserve(region, following)
    ):
        return "glibc arena heap", "layout"
    if (
        region["perms"].startswith("rw")
        and _adjacent_reserve(region, previous)
        and previous["end"] - previous["start"] <= GUARD_MAX
    ):
        return "thread stack", "layout"
    return UNLABELLED, "none"


@dataclass
class RegionAttribution:
    """One VMA with anonymous memory, and what made it."""

    start: int
    end: int
    perms: str
    path: str
    label: str  # what made it (region_label)
    source: str  # where the label is known from
    mergeable: bool
    size_kib: int
    rss_kib: int
    anonymous_kib: int
    ksm_kib: int
    anon_huge_kib: int
    shared_pages: int | None = None  # KSM pages another process of the set maps too (with sharing)
    within_pages: int | None = None  # KSM pages mapped again only inside this process (with sharing)


@dataclass
class ProcessAttribution:
    pid: int
    comm: str
    cmdline: str
    ksm_stat: dict
    shim: dict | None  # the shim's counters; None without the shim
    attached: str | None  # the strategy `ksmpreload attach` used on it (its record), or None
    merged_bytes: int
    padding_bytes: int
    saved_bytes: int | None = None  # set_savings: saving.py's fair share, or its estimate without root
    saved_is_estimate: bool | None = None
    net_saved_bytes: int | None = None
    ksm_smaps_kib: int = 0
    regions: list[RegionAttribution] = field(default_factory=list)


@dataclass
class UnmergedRegion:
    pid: int
    comm: str
    start: int
    end: int
    label: str
    unmerged_kib: int


@dataclass
class AttributionReport:
    processes: list[ProcessAttribution]
    sharing: dict | None  # SharingReport.to_dict(); None without root or with --no-sharing
    notes: list[str]
    unmerged: list[UnmergedRegion] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _region_entry(region, label, source):
    return RegionAttribution(
        start=region["start"],
        end=region["end"],
        perms=region["perms"],
        path=region["path"],
        label=label,
        source=source,
        mergeable=region["mergeable"],
        size_kib=(region["end"] - region["start"]) // 1024,
        rss_kib=region.get("Rss", 0),
        anonymous_kib=region.get("Anonymous", 0),
        ksm_kib=region.get("KSM", 0),
        anon_huge_kib=region.get("AnonHugePages", 0),
    )


def process_attribution(
    pid: int, stats_dir: str | None = None, notes: list[str] | None = None
) -> ProcessAttribution | None:
    """One process: its ksm_stat, the shim's counters, merged bytes, and its regions (those with
    anonymous memory) labelled; saved and net saved come from set_savings. None when the
    process is gone; NeedsRoot when it is another user's. A counters file that does not parse
    is left out, with a line in `notes` (a list, if given)."""
    try:
        stat = kernel.process_ksm_stat(pid)
        regions = kernel.process_regions(pid)
        comm, cmdline = kernel.read_proc(pid, "comm"), kernel.read_proc(pid, "cmdline")
    except PermissionError as error:
        raise kernel.needs_root(error) from None
    if stat is None or regions is None or comm is None or cmdline is None:
        return None
    counters = shimstats.read_process_stats(pid, stats_dir, notes)
    records = Records(shimstats.read_process_regions(pid, stats_dir, notes) if counters else [], regions)
    entries = [
        _region_entry(region, *region_label(index, regions, records))
        for index, region in enumerate(regions)
        if region.get("Anonymous", 0) or region.get("KSM", 0)
    ]
    return ProcessAttribution(
        pid=pid,
        comm=comm.strip(),
        cmdline=kernel.short_cmdline(cmdline, comm.strip()),
        ksm_stat=stat,
        shim=counters,
        attached=(attached.read(pid) or {}).get("strategy"),
        merged_bytes=stat.get("ksm_merging_pages", 0) * kernel.page_size(),
        padding_bytes=shimstats.memory_cost_bytes(counters),
        ksm_smaps_kib=sum(entry.ksm_kib for entry in entries),
        regions=entries,
    )


def by_label(process: ProcessAttribution) -> dict[str, dict]:
    """{label: {regions, anonymous_kib, ksm_kib, shared_pages}} over one process's regions, most KSM first."""
    totals = {}
    for region in process.regions:
        entry = totals.setdefault(region.label, {"regions": 0, "anonymous_kib": 0, "ksm_kib": 0, "shared_pages": 0})
        entry["regions"] += 1
        entry["anonymous_kib"] += region.anonymous_kib
        entry["ksm_kib"] += region.ksm_kib
        entry["shared_pages"] += region.shared_pages or 0
    return dict(sorted(totals.items(), key=lambda item: (-item[1]["ksm_kib"], -item[1]["anonymous_kib"])))


def unmerged_regions(processes: list[ProcessAttribution], limit: int = 10) -> list[UnmergedRegion]:
    """The biggest regions that are mergeable but hold little merged."""
    found = [
        UnmergedRegion(process.pid, process.comm, region.start, region.end, region.label,
                       region.anonymous_kib - region.ksm_kib)
        for process in processes
        for region in process.regions
        if region.mergeable
    ]  # fmt: skip
    found = [entry for entry in found if entry.unmerged_kib >= UNMERGED_MIN_KIB]
    return sorted(found, key=lambda entry: -entry.unmerged_kib)[:limit]


def set_savings(processes: list[ProcessAttribution], report: SharingReport | None = None) -> None:
    """Each process's saved and net saved bytes (saving.py): its fair share from `report` (a
    SharingReport), or without one the estimate from ksm_stat."""
    page, knobs = kernel.page_size(), kernel.read_knobs()
    for process in processes:
        stat = process.ksm_stat
        read = report.processes.get(process.pid) if report else None
        if read is not None:
            pages = read.fair_saved + stat.get("ksm_zero_pages", 0)
        else:
            pages = saving.estimated_saved_pages(stat, knobs)
        process.saved_bytes, process.saved_is_estimate = round(pages * page), read is None
        process.net_saved_bytes = saving.net_saved_bytes(
            process.saved_bytes, process.padding_bytes, stat.get("ksm_rmap_items", 0)
        )


def attach_sharing(processes: list[ProcessAttribution], report: SharingReport) -> None:
    """Adds each region's KSM pages shared with another process of the set, and those mapped
    again only within its process, from a SharingReport (read a moment after smaps: a VMA
    that changed in between counts where its start now lies)."""
    for process in processes:
        regions = process.regions
        starts = [region.start for region in regions]
        for region in regions:
            region.shared_pages = region.within_pages = 0
        read = report.processes.get(process.pid)
        for found in read.regions if read else []:
            index = bisect.bisect_right(starts, found.start) - 1
            if index >= 0 and found.start < regions[index].end:
                regions[index].shared_pages += found.ksm_shared
                regions[index].within_pages += found.ksm_within


def attribution(
    pids: list[int] | None = None, stats_dir: str | None = None, with_sharing: bool = True
) -> AttributionReport:
    """The whole report: processes (all KSM users when `pids` is None), the sharing matrix
    (None without root, with a note), and the biggest mergeable regions left unmerged."""
    from .sharing import sharing

    notes = []
    if pids is None:
        listed, unreadable = kernel.ksm_processes_and_unreadable()
        pids = [process["pid"] for process in listed]
        notes += kernel.unreadable_notes(unreadable)
    processes = [entry for entry in (process_attribution(pid, stats_dir, notes) for pid in pids) if entry]
    result = AttributionReport(processes=processes, sharing=None, notes=notes)
    report = None
    if with_sharing and processes:
        try:
            report = sharing([process.pid for process in processes])
            attach_sharing(processes, report)
            result.sharing = report.to_dict()
        except NeedsRoot as error:
            result.notes.append(f"no sharing matrix, and saved is estimated from ksm_stat: {error}")
    set_savings(processes, report)
    result.unmerged = unmerged_regions(processes)
    return result


def require_read(pids: Iterable[int], read: Iterable[int]) -> None:
    """NoSuchProcess naming those of `pids` (which the user named) that are not among the pids
    `read`: they ended before they were read."""
    read = set(read)
    ended = [pid for pid in pids if pid not in read]
    if ended:
        raise NoSuchProcess(ended, while_read=True)
