"""Why KSM is not merging: findings read from the kernel, each with its evidence, its cost in
memory, the cause in one sentence and the fix.

Three kinds of checks: the system (KSM itself and its knobs), a program's file (what
LD_PRELOAD can do with it, which allocator it carries) and a running process (where its
memory sits, how much of it KSM can and did merge). Findings are ordered by what they cost;
facts that cost nothing go to notes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from . import attribution, binary, kernel
from .errors import NeedsRoot
from .sizes import MIB

if TYPE_CHECKING:
    from .attribution import ProcessAttribution
    from .layout import LayoutReport
    from .potential import PotentialReport

SLOW_SCAN_SECONDS = kernel.FULL_SCAN_TARGET_SECONDS  # a full scan slower than this is a finding
NOT_SCANNED_SHARE = 0.5  # a process whose mergeable pages KSM has seen less than this share of
VOLATILE_SHARE = 0.2  # pages_volatile above this share of the pages KSM tracks
NO_DUPLICATES_SHARE = 0.01  # a potential below this share of the pages read: nothing to merge
HIDDEN_MIN_BYTES = 1 << 20  # duplicates at other offsets worth a finding: this much, and
HIDDEN_SHARE = 0.2  # this share of all duplicate content
GOOD_EFFICIENCY = 0.9  # merged / potential above this: nothing left to find
MYTH_NOTE = (
    "KSM needs no KVM and no particular hypervisor: it merges the memory of any process "
    "that marks it mergeable, on bare metal or in any VM."
)


@dataclass
class Finding:
    key: str  # stable name, for scripts and tests
    title: str
    cost_bytes: int  # memory this costs now (0: not measurable)
    cause: str
    fix: str
    evidence: dict = field(default_factory=dict)
    pid: int = 0  # 0: not about one process


def _mib(count):
    return f"{count / MIB:.1f} MiB"


# ---- the system -----------------------------------------------------------------------------


def ksm_off_finding(knobs: dict, waiting_bytes: int) -> Finding | None:
    if knobs.get("run") == 1:
        return None
    return Finding(
        "ksm_not_running",
        "KSM is not running",
        waiting_bytes,
        f"/sys/kernel/mm/ksm/run is {knobs.get('run')}, so ksmd scans nothing.",
        "ksmpreload ksm on   (or: echo 1 > /sys/kernel/mm/ksm/run)",
        {"run": knobs.get("run")},
    )


def slow_scan_finding(knobs: dict, scan_bytes: int) -> Finding | None:
    pages, sleep_ms = knobs.get("pages_to_scan", 100), knobs.get("sleep_millisecs", 20)
    seconds = kernel.full_scan_seconds(scan_bytes, pages, sleep_ms)
    if seconds <= SLOW_SCAN_SECONDS:
        return None
    suggested = kernel.suggested_pages_to_scan(max(scan_bytes, kernel.mem_total_bytes()), sleep_ms)
    return Finding(
        "scan_too_slow",
        "KSM scans too slowly for this much memory",
        scan_bytes,
        f"at {pages} pages every {sleep_ms} ms one pass over {_mib(scan_bytes)} of mergeable "
        f"memory takes {seconds:.0f} s, and pages merge only after two passes find them equal.",
        f"ksmpreload ksm tune --pages-to-scan {max(suggested, pages + 1)}",
        {
            "pages_to_scan": pages,
            "sleep_millisecs": sleep_ms,
            "mergeable_bytes": scan_bytes,
            "full_scan_seconds": round(seconds, 1),
        },
    )


def smart_scan_finding(knobs: dict, unmerged_bytes: int) -> Finding | None:
    if knobs.get("smart_scan") != 1 or unmerged_bytes <= 0:
        return None
    return Finding(
        "smart_scan",
        "smart_scan may hold back pages that did not merge at first",
        0,
        "with smart_scan on, ksmd skips a page that did not merge on earlier passes for up to "
        "hundreds of passes, so duplicates written later wait that long.",
        "echo 0 > /sys/kernel/mm/ksm/smart_scan",
        {"smart_scan": 1, "pages_skipped": knobs.get("pages_skipped")},
    )


def chain_finding(knobs: dict) -> Finding | None:
    shared, sharing, limit = knobs.get("pages_shared", 0), knobs.get("pages_sharing", 0), knobs.get("max_page_sharing")
    if not shared or not limit or sharing / shared < 0.9 * limit:
        return None
    return Finding(
        "max_page_sharing",
        "pages are shared up to max_page_sharing",
        0,
        f"on average {sharing / shared:.0f} mappings share each KSM page, near the limit of {limit}: "
        "beyond it KSM keeps extra copies of the same content.",
        f"echo {limit * 4} > /sys/kernel/mm/ksm/max_page_sharing   (after: ksmpreload ksm off; on)",
        {"pages_shared": shared, "pages_sharing": sharing, "max_page_sharing": limit},
    )


def system_findings(knobs: dict, scan_bytes: int, unmerged_bytes: int, waiting_bytes: int) -> list[Finding]:
    """waiting_bytes: what could merge and has not (the potential), else all the processes' memory."""
    found = [
        ksm_off_finding(knobs, waiting_bytes),
        slow_scan_finding(knobs, scan_bytes),
        smart_scan_finding(knobs, unmerged_bytes),
        chain_finding(knobs),
    ]
    return [finding for finding in found if finding]


def system_notes(knobs: dict) -> list[str]:
    notes = [MYTH_NOTE]
    features = kernel.kernel_features()
    missing = [name for name, present in features.items() if not present]
    notes.append(
        "kernel features: " + ", ".join(f"{name} {'yes' if present else 'no'}" for name, present in features.items())
    )
    if missing:
        notes.append(f"this kernel lacks {', '.join(missing)}: some figures are not available")
    if "advisor_mode" in knobs:
        notes.append(f"advisor_mode is {knobs['advisor_mode']}")
    if not knobs.get("use_zero_pages"):
        notes.append("use_zero_pages is 0: pages of zeros merge into one KSM page instead of the zero page")
    thp = kernel.transparent_huge_pages_mode()
    if thp:
        notes.append(f"transparent huge pages: {thp} (KSM splits a huge page to merge its parts)")
    return notes


# ---- a program's file -----------------------------------------------------------------------


def binary_findings(path: str, pid: int = 0, loaded_libraries: Iterable[str] = ()) -> list[Finding]:
    found = []
    program = binary.inspect(path)
    if program.is_elf and program.preload_ignored_because:
        found.append(
            Finding(
                "preload_ignored",
                f"LD_PRELOAD cannot act on {os.path.basename(path)}",
                0,
                f"{path} {program.preload_ignored_because}: no shim inside, so nothing aligns or marks "
                "its allocations.",
                "ksm-wrap COMMAND   (it falls back to prctl(PR_SET_MEMORY_MERGE), inherited across exec)",
                {"static": program.static, "secure": program.secure_reason},
                pid,
            )
        )
    names, runtime = binary.allocators(path, loaded_libraries)
    if names:
        found.append(
            Finding(
                "allocator",
                f"the memory comes from {', '.join(names)}",
                0,
                "this allocator keeps blocks inside large extents of its own, at offsets that are not "
                "page-aligned, so madvise on a block's address fails (EINVAL) or marks a shared extent.",
                "ksm-wrap COMMAND   (marks the allocator's mappings whole and aligns large blocks)",
                {"allocators": names},
                pid,
            )
        )
    if runtime:
        found.append(
            Finding(
                "raw_syscalls",
                f"the {runtime} runtime maps memory with raw system calls",
                0,
                "an LD_PRELOAD wrapper of mmap never sees those mappings.",
                "ksm-wrap --strategy prctl COMMAND   (the whole process merges)",
                {"runtime": runtime},
                pid,
            )
        )
    return found


# ---- a running process ----------------------------------------------------------------------


def _mergeable_bytes(process):
    return sum(r.anonymous_kib for r in process.regions if r.mergeable) * 1024


def _loaded_libraries(process):
    return sorted({region.path for region in process.regions if region.path.startswith("/")})


def unmarked_finding(process: ProcessAttribution) -> Finding | None:
    unmarked = [r for r in process.regions if not r.mergeable and r.anonymous_kib and not r.path.startswith("/")]
    total = sum(r.anonymous_kib for r in unmarked) * 1024
    marked = _mergeable_bytes(process)
    if total < MIB or total < 0.1 * (total + marked):
        return None
    biggest = sorted(unmarked, key=lambda r: -r.anonymous_kib)[:5]
    evidence = {
        "unmarked_bytes": total,
        "marked_bytes": marked,
        "regions": [
            {"start": hex(r.start), "end": hex(r.end), "made_by": r.label, "anonymous_kib": r.anonymous_kib}
            for r in biggest
        ],
    }
    unmerged_by_program = (process.shim or {}).get("program_unmerged_bytes", 0)
    if unmerged_by_program:
        calls = process.shim.get("program_madvise_unmergeable", 0)
        return Finding(
            "unmarked_by_program",
            f"{process.comm} unmarked its own memory",
            total,
            f"it called madvise(MADV_UNMERGEABLE) {calls} times, on {_mib(unmerged_by_program)}: KSM "
            "leaves that memory alone even under prctl(PR_SET_MEMORY_MERGE). stress-ng does this at "
            "random to its buffers.",
            "stress-ng: add --no-madvise; otherwise find the call in the program (ltrace -e madvise)",
            {**evidence, "program_unmerged_bytes": unmerged_by_program, "program_madvise_unmergeable": calls},
            process.pid,
        )
    return Finding(
        "not_mergeable",
        f"{_mib(total)} of {process.comm}'s memory is not mergeable",
        total,
        "nothing marked it: KSM scans only VMAs marked by madvise(MADV_MERGEABLE) or "
        "prctl(PR_SET_MEMORY_MERGE) in the process itself; no interface marks them from outside "
        "(process_madvise refuses MADV_MERGEABLE), so attach runs that one call inside it.",
        f"ksmpreload attach {process.pid}   (now, no restart: whole-process merging, blocks left where "
        f"they are); at its next restart: ksm-wrap {process.cmdline}   (aligns them too)",
        evidence,
        process.pid,
    )


def not_scanned_finding(process: ProcessAttribution, knobs: dict) -> Finding | None:
    mergeable_pages = _mergeable_bytes(process) // kernel.page_size()
    seen = process.ksm_stat.get("ksm_rmap_items", 0) + process.ksm_stat.get("ksm_merging_pages", 0)
    if knobs.get("run") != 1 or mergeable_pages < 256 or seen >= NOT_SCANNED_SHARE * mergeable_pages:
        return None
    unseen = (mergeable_pages - seen) * kernel.page_size()
    return Finding(
        "not_scanned_yet",
        f"KSM has not scanned most of {process.comm}'s mergeable memory yet",
        unseen,
        f"ksmd has looked at {seen} of its {mergeable_pages} mergeable pages; the rest waits for the next passes.",
        "wait one or two full scans, or speed them up: ksmpreload ksm tune --pages-to-scan N",
        {"mergeable_pages": mergeable_pages, "pages_seen": seen},
        process.pid,
    )


def volatile_finding(knobs: dict) -> Finding | None:
    if knobs.get("run") != 1:
        return None  # the counters keep their last values while ksmd is stopped
    tracked = sum(knobs.get(name, 0) for name in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile"))
    volatile = knobs.get("pages_volatile", 0)
    if not tracked or volatile < VOLATILE_SHARE * tracked:
        return None
    return Finding(
        "volatile",
        "pages change faster than KSM scans them",
        volatile * kernel.page_size(),
        f"{volatile} of the {tracked} pages KSM tracks changed between two passes (pages_volatile): "
        "KSM merges only pages that keep their content from one pass to the next.",
        "keep duplicate data still (write it once), or scan faster: ksmpreload ksm tune --pages-to-scan N",
        {"pages_volatile": volatile, "pages_tracked": tracked},
    )


def padding_finding(process: ProcessAttribution) -> Finding | None:
    padding = process.padding_bytes
    if padding < MIB or padding < 0.1 * max(process.merged_bytes, 1):
        return None
    return Finding(
        "alignment_padding",
        f"aligning {process.comm}'s large blocks costs {_mib(padding)}",
        padding,
        "page-aligned blocks use more memory than the allocator would give unaligned.",
        "ksm-wrap --threshold 16K ...   (align fewer, larger blocks)",
        {"padding_bytes": padding, "merged_bytes": process.merged_bytes},
        process.pid,
    )


def own_madvise_finding(process: ProcessAttribution) -> Finding | None:
    shim = process.shim or {}
    einval, failed = shim.get("program_madvise_einval", 0), shim.get("program_madvise_failed", 0)
    if not einval and not failed:
        return None
    return Finding(
        "madvise_unaligned" if einval else "madvise_failed",
        f"{process.comm}'s own madvise(MADV_MERGEABLE) calls failed",
        0,
        f"{einval + failed} of its {shim.get('program_madvise_mergeable', 0)} calls returned -1"
        + (
            f", {einval} with EINVAL: madvise needs a page-aligned address, and a block from malloc "
            "starts inside a page."
            if einval
            else "."
        ),
        "drop the program's own madvise calls and run it under ksm-wrap (it aligns large blocks and "
        "marks them); in code: madvise the page-aligned range inside the block, or use "
        "posix_memalign(4096) for the buffer",
        {
            "program_madvise_mergeable": shim.get("program_madvise_mergeable", 0),
            "einval": einval,
            "other_failures": failed,
        },
        process.pid,
    )


def huge_pages_finding(process: ProcessAttribution) -> Finding | None:
    huge_kib = sum(region.anon_huge_kib for region in process.regions if region.mergeable)
    if huge_kib * 1024 < MIB:
        return None
    return Finding(
        "huge_pages",
        f"{_mib(huge_kib * 1024)} of {process.comm}'s mergeable memory is in huge pages",
        0,
        "ksmd must split a transparent huge page before it can merge its 4 KiB parts, and "
        "khugepaged may collapse them again.",
        "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled   (if it is 'always')",
        {"anon_huge_kib": huge_kib},
        process.pid,
    )


def process_findings(process: ProcessAttribution, knobs: dict, programs_seen: set[str]) -> list[Finding]:
    """The process's findings, and its program file's unless `programs_seen` has it already."""
    found = [
        unmarked_finding(process),
        not_scanned_finding(process, knobs),
        padding_finding(process),
        own_madvise_finding(process),
        huge_pages_finding(process),
    ]
    found = [finding for finding in found if finding]
    exe = kernel.executable_path(process.pid)
    try:
        program = os.path.realpath(os.readlink(exe))
    except OSError:  # a kernel thread, a zombie, or a process that has just ended: no program file
        return found
    if program in programs_seen:
        return found
    programs_seen.add(program)
    return found + binary_findings(exe, process.pid, _loaded_libraries(process))


# ---- the duplicate potential: what could merge against what has --------------------------------


def _ksm_merged_pages(report):
    return sum(process.ksm_merging_pages or 0 for process in report.processes.values())


def no_duplicates_finding(report: PotentialReport, layout: LayoutReport | None = None) -> Finding | None:
    """Little to gain and nothing merged by KSM (pages shared since a fork count as merged and
    are duplicates in the potential, so what is left to gain is what counts), and no duplicate
    content at other offsets either (when that could be read)."""
    totals = report.totals
    left_to_gain = report.potential_pages - (report.merged_pages or 0)
    small = NO_DUPLICATES_SHARE * totals["pages"]
    if totals["pages"] < 256 or left_to_gain >= small or _ksm_merged_pages(report) >= small:
        return None
    if layout and layout.duplicate_bytes >= small * report.page_size:
        return None
    return Finding(
        "no_duplicates",
        "the data is not duplicate",
        0,
        f"of {totals['pages']} pages read, {totals['duplicate_pages']} have a twin (most already shared "
        f"since a fork) and {totals['zero_pages']} are zero: KSM has next to nothing to merge, however "
        "it is set up.",
        "none for KSM: merging needs pages with the same content (for stress-ng, a --vm-method that "
        "writes a pattern, such as zero-one)",
        {
            "pages_read": totals["pages"],
            "duplicate_pages": totals["duplicate_pages"],
            "zero_pages": totals["zero_pages"],
            "potential_pages": report.potential_pages,
            "merged_pages": report.merged_pages,
            "ksm_merging_pages": _ksm_merged_pages(report),
        },
    )


def hidden_duplicates_finding(
    report: PotentialReport, layout: LayoutReport, processes: list[ProcessAttribution]
) -> Finding | None:
    """Duplicate content that whole-page hashing does not see: equal data at different offsets
    within its pages, which page-aligning the blocks that hold it (ksm-wrap) makes mergeable."""
    page_duplicates = (report.totals["saving_across"] + report.totals["saving_within"]) * report.page_size
    hidden = layout.duplicate_bytes - page_duplicates
    if hidden < HIDDEN_MIN_BYTES or hidden < HIDDEN_SHARE * layout.duplicate_bytes:
        return None
    unwrapped = [process for process in processes if not process.shim]
    as_is, wrapped = predictions(report, layout)[:2]
    gain = wrapped["saved_bytes"] - as_is["saved_bytes"]
    allocators = sorted({name for names in layout.allocators.values() for name in names}) or ["glibc"]
    fix = (
        "; ".join(f"ksm-wrap {process.cmdline}" for process in unwrapped[:3])
        + "   (restart under the shim: it page-aligns blocks of 8 KiB and more)"
        if unwrapped
        else "ksm-wrap --threshold 4K ...   (align smaller blocks too)"
    )
    return Finding(
        "duplicates_hidden_by_layout",
        f"{_mib(hidden)} of duplicate data sits at different offsets in its pages",
        hidden,
        f"these processes hold {_mib(layout.duplicate_bytes)} of duplicate content at any offset "
        f"({_mib(layout.duplicate_bytes_across)} across processes), but only {_mib(page_duplicates)} "
        "of it fills equal whole pages: KSM merges pages, and equal data behind different "
        f"allocator headers or slots makes different pages (allocator: {', '.join(allocators)}). "
        f"Page-aligned, about {_mib(gain)} more would merge (the ksm-wrap prediction).",
        fix,
        {
            "predicted_gain_bytes": gain,
            "allocators": {str(pid): names or ["glibc"] for pid, names in layout.allocators.items()},
            "regions": _hidden_regions(layout, processes),
            "any_offset_duplicate_bytes": layout.duplicate_bytes,
            "across_processes_bytes": layout.duplicate_bytes_across,
            "within_process_bytes": layout.duplicate_bytes_within,
            "page_duplicate_bytes": page_duplicates,
            "bytes_read": layout.bytes_read,
        },
    )


def _hidden_regions(layout: LayoutReport, processes: list[ProcessAttribution]) -> list[dict]:
    """The 5 regions with the most duplicate bytes at other page offsets (a page or more), with
    what made them."""
    labels = {(hex(region.start), hex(region.end)): region.label for p in processes for region in p.regions}
    regions = [
        {
            "pid": process["pid"],
            **region,
            "made_by": labels.get((region["start"], region["end"]), attribution.UNLABELLED),
        }
        for process in layout.processes
        for region in process["regions"]
        if region["other_offset_bytes"] >= 4096
    ]
    return sorted(regions, key=lambda region: -region["other_offset_bytes"])[:5]


def _labels_by_range(processes):
    return {(region.start, region.end): region.label for p in processes for region in p.regions}


def unmerged_duplicates_finding(report: PotentialReport, processes: list[ProcessAttribution]) -> Finding | None:
    if report.merged_pages is None:
        return None
    unmerged = (report.potential_pages - report.merged_pages) * report.page_size
    if unmerged < MIB or (report.efficiency or 0) >= GOOD_EFFICIENCY:
        return None
    labels = _labels_by_range(processes)
    regions = sorted(
        (
            (process.pid, region)
            for process in report.processes.values()
            for region in process.regions
            if region.unmerged_pages
        ),
        key=lambda entry: -entry[1].unmerged_pages,
    )[:5]
    return Finding(
        "unmerged_duplicates",
        f"{_mib(unmerged)} of duplicate memory is not merged",
        unmerged,
        f"these processes hold {report.potential_mib:.1f} MiB that could merge and "
        f"{report.merged_mib:.1f} MiB that has (efficiency {report.efficiency:.0%}); the other findings "
        "say why (not mergeable, not scanned yet, changing), and these regions hold the rest.",
        "see the findings above; once they are fixed, run the doctor again",
        {
            "potential_bytes": report.potential_pages * report.page_size,
            "merged_bytes": report.merged_pages * report.page_size,
            "regions": [
                {
                    "pid": pid,
                    "start": hex(region.start),
                    "end": hex(region.end),
                    "made_by": labels.get((region.start, region.end), attribution.UNLABELLED),
                    "anonymous_kib": region.unmerged_pages * report.page_size // 1024,
                }
                for pid, region in regions
            ],
        },
    )


def predictions(report: PotentialReport, layout: LayoutReport) -> list[dict]:
    """What each remedy would save, from what was read before it: one entry per remedy."""
    page = report.page_size
    as_is = (report.potential_pages - (report.shared_outside_ksm_pages or 0)) * page  # a fork's sharing is no saving
    extra_copies = layout.duplicate_bytes / layout.duplicate_chunk_bytes if layout.duplicate_chunk_bytes else 0.0
    gain = round(layout.aligned_gain_bytes * extra_copies)
    # Content that repeats within its pages (one byte over and over) is equal page by page wherever
    # it sits: as-is counts it already, and its runs at other offsets must not add it again.
    wrapped = max(as_is, min(as_is + gain, _zero_page_bytes(report) + layout.duplicate_bytes))
    padding = layout.aligned_runs * page // 2
    return [
        {
            "remedy": "as-is",
            "saved_bytes": as_is,
            "how": "mark the memory mergeable (prctl, or the program's own madvise) and leave its layout",
            "model": "the pages with equal contents now (the duplicate potential), zero pages included, "
            "less those that share a frame already (since a fork)",
        },
        {
            "remedy": "ksm-wrap",
            "saved_bytes": wrapped,
            "padding_bytes": padding,
            "net_saved_bytes": wrapped - padding,
            "how": "restart the processes under ksm-wrap: blocks of 8 KiB and more page-aligned and marked",
            "model": "as-is, plus the blocks whose duplicate content sits at other offsets in their pages: "
            f"each run of duplicate chunks is taken for a block of its length plus {layout.run_edge_bytes} "
            "bytes (the parts in the chunks at its ends); from 8 KiB up its whole pages merge once aligned, "
            "and its partial last page where the allocator gives large blocks whole pages (jemalloc, "
            "mimalloc, tcmalloc), for the copies beyond the first; padding about half a page a block. "
            "At most the zero pages plus what storing each distinct chunk once saves (duplicate_bytes): "
            "content that repeats within a page merges as-is wherever it sits. Leaves out: blocks made by mmap (aligned already), headers inside a block that differ "
            "between processes, and small blocks whose runs join into one (counted as one block).",
        },
        *_memcached_prediction(report, layout, extra_copies),
    ]


def remedy_predictions(pids: list[int]) -> list[dict]:
    """predictions() for the processes `pids`, read now (NeedsRoot, ProcessLookupError)."""
    from .layout import duplicates_at_any_offset
    from .potential import potential  # the compiled helper: imported when needed, not with the CLI

    return predictions(potential(pids), duplicates_at_any_offset(pids))


def memcached_page_slab_sizes() -> str:
    """memcached's -o option for slab classes of 1 to 128 whole pages."""
    return "slab_sizes=" + "-".join(str(kernel.page_size() << i) for i in range(8))


def _zero_page_bytes(report: PotentialReport) -> int:
    """The part of the page potential that zero pages make."""
    return (report.potential_pages - report.totals["saving_across"] - report.totals["saving_within"]) * report.page_size


def _memcached_prediction(report: PotentialReport, layout: LayoutReport, extra_copies: float) -> list[dict]:
    """The slab-class remedy, when every process read is memcached (none otherwise)."""
    programs = [layout.programs.get(pid) for pid in report.processes]
    if not programs or any(program != "memcached" for program in programs):
        return []
    zero_part = _zero_page_bytes(report)
    duplicates = round(layout.slab_item_bytes * extra_copies)
    return [
        {
            "remedy": "memcached-page-slabs",
            "saved_bytes": zero_part + duplicates,
            "duplicate_bytes": duplicates,
            "how": f"restart memcached with -o {memcached_page_slab_sizes()} under ksm-wrap, and load it again",
            "model": "slab classes of whole pages put every item at one offset in its page, whatever order "
            "it was stored in: each duplicate item (a run of duplicate chunks plus the edge estimate) "
            "merges all its pages but the first, which holds its header (pointers and times that differ "
            "between servers), for the copies beyond the first (duplicate_bytes), plus the zero pages read "
            "now. Leaves out what the classes cost: an item takes a whole number of pages (memcached's "
            "`stats slabs` shows the items per class), and the zero pages that makes, which KSM merges back.",
        }
    ]


def potential_summary(
    pids: list[int], processes: list[ProcessAttribution], notes: list[str]
) -> tuple[list[Finding], dict | None]:
    """(findings, summary) from the duplicate potential of `pids`; a note when it cannot be read."""
    from .potential import potential  # the compiled helper: imported when needed, not with the CLI

    from .layout import duplicates_at_any_offset

    try:
        report = potential(pids)
        layout = duplicates_at_any_offset(pids)
    except (NeedsRoot, ProcessLookupError) as error:
        notes.append(f"no duplicate potential: {error}")
        return [], None
    if layout.partial or layout.missing:
        ended = ", ".join(map(str, layout.partial + layout.missing))
        notes.append(f"process {ended} ended while it was read: the figures at any offset are partial")
    found = [
        no_duplicates_finding(report, layout),
        unmerged_duplicates_finding(report, processes),
        hidden_duplicates_finding(report, layout, processes),
    ]
    summary = {
        "potential_bytes": report.potential_pages * report.page_size,
        "merged_bytes": None if report.merged_pages is None else report.merged_pages * report.page_size,
        "efficiency": report.efficiency,
        "totals": dict(report.totals),
        "any_offset": {**asdict(layout), "allocators": {str(pid): names for pid, names in layout.allocators.items()}},
        "predictions": predictions(report, layout),
    }
    return [finding for finding in found if finding], summary


# ---- all together ---------------------------------------------------------------------------


def diagnose(pids: Sequence[int] = (), program: str | None = None) -> dict:
    """Findings for the system, the processes `pids` and the file `program` (for `doctor --`).
    A process that has ended is left out; NeedsRoot for another user's."""
    kernel.require_ksm()
    knobs = kernel.read_knobs()
    notes = system_notes(knobs)
    processes = [p for p in (attribution.process_attribution(pid, notes=notes) for pid in pids) if p]
    scan_bytes = sum(_mergeable_bytes(p) for p in processes)
    unmerged = max(scan_bytes - sum(p.merged_bytes for p in processes), 0)
    found, summary = potential_summary([p.pid for p in processes], processes, notes) if processes else ([], None)
    if summary and summary["merged_bytes"] is not None:
        waiting = max(summary["potential_bytes"] - summary["merged_bytes"], 0)
    else:
        waiting = sum(r.anonymous_kib for p in processes for r in p.regions) * 1024
    findings = system_findings(knobs, scan_bytes, unmerged, waiting) + found  # a tie goes to the system
    volatile = volatile_finding(knobs)
    findings += [volatile] if volatile else []
    programs_seen = set()
    for process in processes:
        findings += process_findings(process, knobs, programs_seen)
    if program and not pids:
        findings += binary_findings(program)
    findings.sort(key=lambda finding: -finding.cost_bytes)
    return {
        "findings": [asdict(finding) for finding in findings],
        "notes": notes,
        "potential": summary,
        "predictions": summary.pop("predictions") if summary else [],
        "processes": [
            {
                "pid": p.pid,
                "comm": p.comm,
                "merged_bytes": p.merged_bytes,
                "mergeable_bytes": _mergeable_bytes(p),
            }
            for p in processes
        ],
        "ksm": {
            name: knobs.get(name)
            for name in (
                "run",
                "pages_to_scan",
                "sleep_millisecs",
                "full_scans",
                "pages_shared",
                "pages_sharing",
                "pages_volatile",
            )
        },
    }
