"""Kernel facts in one place: the KSM paths under /proc and /sys, their parsing, version checks.

Nothing else in ksmpreload opens /sys/kernel/mm/ksm or /proc/<pid>/ksm_stat directly.
"""

from __future__ import annotations

import errno
import os
import platform
import re
from collections import namedtuple
from collections.abc import Callable, Iterable

from .errors import KsmError, NeedsRoot, NoSuchProcess

KSM_DIR = "/sys/kernel/mm/ksm"
PROC_DIR = "/proc"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
RMAP_ITEM_BYTES = 64  # what the kernel charges per rmap_item in general_profit
FULL_SCAN_TARGET_SECONDS = 60  # suggested_pages_to_scan aims at one pass over RAM per minute
PAGES_TO_SCAN_RANGE = (100, 20000)

Feature = namedtuple("Feature", "name since what")

# What appeared when (mainline; "about" where dated from patch mails, see KSM-NOTES.md).
KERNEL_FEATURES = (
    Feature("ksm_stat", (6, 1), "/proc/<pid>/ksm_stat with ksm_rmap_items"),
    Feature(
        "prctl_merge", (6, 4), "prctl(PR_SET_MEMORY_MERGE); ksm_stat gains ksm_merging_pages and ksm_process_profit"
    ),
    Feature(
        "prctl_merge_exec",
        (6, 10),
        "prctl merging kept across execve and the exec'd process "
        "scanned (kept from about 6.7, scanned from about 6.10)",
    ),
    Feature("ksm_zero_pages", (6, 6), "ksm_zero_pages in ksm_stat and in /sys/kernel/mm/ksm"),
    Feature("smaps_ksm", (6, 6), "a 'KSM:' line per VMA in /proc/<pid>/smaps"),
    Feature("smart_scan", (6, 7), "/sys/kernel/mm/ksm/smart_scan and pages_skipped"),
    Feature("advisor", (6, 8), "advisor_mode: pages_to_scan is read-only unless it is none"),
    Feature("ksm_stat_flags", (6, 14), "'ksm_merge_any: yes|no' and 'ksm_mergeable: yes|no' in ksm_stat (about 6.14)"),
)


# ---- the running kernel ---------------------------------------------------------------------


def ksm_available() -> bool:
    return os.path.isdir(KSM_DIR)


def require_ksm() -> None:
    if not ksm_available():
        raise KsmError(f"this kernel has no KSM ({KSM_DIR} is missing: built without CONFIG_KSM)")


def page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """(major, minor) of `release` (default: the running kernel), e.g. '6.18.44-fc' -> (6, 18)."""
    release = release or platform.release()
    match = re.match(r"(\d+)\.(\d+)", release)
    if not match:
        raise ValueError(f"cannot read a kernel version from {release!r}")
    return int(match.group(1)), int(match.group(2))


def kernel_features(version: tuple[int, int] | None = None) -> dict[str, bool]:
    """{feature name: present} for `version` (default: the running kernel), from KERNEL_FEATURES."""
    version = version or kernel_version()
    return {feature.name: version >= feature.since for feature in KERNEL_FEATURES}


def prctl_merge_supported(version: tuple[int, int] | None = None) -> bool:
    """prctl(PR_SET_MEMORY_MERGE) exists (Linux 6.4+)."""
    return kernel_features(version)["prctl_merge"]


def mem_total_bytes() -> int:
    with open(os.path.join(PROC_DIR, "meminfo")) as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise KsmError("no MemTotal line in /proc/meminfo")


def vmstat() -> dict[str, int]:
    """/proc/vmstat as {name: count} (cow_ksm: copy-on-write faults on KSM pages, 6.4+)."""
    with open(os.path.join(PROC_DIR, "vmstat")) as f:
        return {name: int(count) for name, count in (line.split() for line in f if len(line.split()) == 2)}


# ---- values as the kernel prints them -------------------------------------------------------

INTEGER = re.compile(r"-?[0-9]{1,20}")  # what the kernel prints for a 64-bit number


def parse_value(text: str) -> int | bool | str:
    """One value from sysfs or procfs: '[a] b' -> 'a' (the selected choice), '-12' -> -12,
    'yes'/'no' -> True/False; any other text (a number too long for 64 bits too) is kept as
    a string."""
    text = text.strip()
    choice = re.search(r"\[([^\]]*)\]", text)
    if choice:
        return choice.group(1)
    if INTEGER.fullmatch(text):
        return int(text)
    return {"yes": True, "no": False}.get(text, text)


# ---- /sys/kernel/mm/ksm ---------------------------------------------------------------------


def knob_path(name: str, ksm_dir: str | None = None) -> str:
    return os.path.join(ksm_dir or KSM_DIR, name)


def read_knob(name: str, ksm_dir: str | None = None) -> int | bool | str | None:
    """The parsed value of one file under /sys/kernel/mm/ksm, or None if this kernel lacks it."""
    try:
        with open(knob_path(name, ksm_dir)) as f:
            return parse_value(f.read())
    except FileNotFoundError:
        return None


def read_knobs(ksm_dir: str | None = None) -> dict:
    """Every file under /sys/kernel/mm/ksm: ints as int, advisor_mode as the selected word."""
    ksm_dir = ksm_dir or KSM_DIR
    return {name: read_knob(name, ksm_dir) for name in sorted(os.listdir(ksm_dir))}


def write_knob(name: str, value: int | str) -> int | bool | str:
    """Write one KSM knob and return its previous value. Raises NeedsRoot, or KsmError with
    the reason in one line when the kernel refuses."""
    if os.geteuid() != 0:
        raise NeedsRoot(f"writing {knob_path(name)}")
    require_ksm()
    previous = read_knob(name)
    if previous is None:
        raise KsmError(f"this kernel has no KSM knob {name} ({knob_path(name)} is missing)")
    try:
        with open(knob_path(name), "w") as f:
            f.write(str(value))
    except OSError as error:
        raise KsmError(explain_write_error(name, value, error)) from None
    return previous


def explain_write_error(name: str, value: int | str, error: OSError) -> str:
    """One line saying why the kernel refused `value` for knob `name`, and the fix if known."""
    advisor = read_knob("advisor_mode")
    if error.errno == errno.EINVAL and name == "pages_to_scan" and advisor not in (None, "none"):
        return (
            f"cannot set pages_to_scan while advisor_mode is {advisor} (the advisor sets the "
            f"scan rate); first run: echo none > {knob_path('advisor_mode')}"
        )
    if error.errno == errno.EBUSY:
        return f"cannot change {name} while KSM has merged pages; unmerge first with: ksmpreload ksm unmerge"
    if error.errno == errno.EINVAL:
        return f"the kernel rejected {name} = {value} (invalid value)"
    return f"cannot write {value} to {knob_path(name)}: {error.strerror}"


def pages_saved(knobs: dict) -> int:
    """Pages KSM saves: pages_sharing + ksm_zero_pages (the latter exists from Linux 6.6)."""
    return knobs.get("pages_sharing", 0) + knobs.get("ksm_zero_pages", 0)


def full_scan_seconds(mem_total_bytes: int, pages_to_scan: int, sleep_ms: int) -> float:
    """Seconds ksmd needs for one pass over `mem_total_bytes` of memory, ignoring scan time."""
    return mem_total_bytes / page_size() / pages_to_scan * sleep_ms / 1000


def suggested_pages_to_scan(mem_total_bytes: int, sleep_ms: int = 20) -> int:
    """A pages_to_scan with which one full scan of all RAM takes about a minute.

    ksmd wakes every `sleep_ms` ms and scans `pages_to_scan` pages, so a pass over R pages
    takes R / pages_to_scan * sleep_ms ms (the time spent scanning is ignored). Solving for
    FULL_SCAN_TARGET_SECONDS (60 s) gives R * sleep_ms / 60000, rounded up and clamped to
    PAGES_TO_SCAN_RANGE: at least 100 (the kernel's default), at most 20000 (to bound the CPU
    ksmd uses on very large machines). 24 GiB of 4 KiB pages at 20 ms: 2098.
    """
    if sleep_ms <= 0:
        raise ValueError("sleep_ms must be positive")
    ram_pages = mem_total_bytes // page_size()
    wanted = -(-ram_pages * sleep_ms // (FULL_SCAN_TARGET_SECONDS * 1000))
    low, high = PAGES_TO_SCAN_RANGE
    return max(low, min(high, wanted))


# ---- /proc/<pid> ----------------------------------------------------------------------------

KSM_STAT_TYPES = {
    "ksm_rmap_items": int,
    "ksm_zero_pages": int,
    "ksm_merging_pages": int,
    "ksm_process_profit": int,
    "ksm_merge_any": bool,
    "ksm_mergeable": bool,
}


def parse_ksm_stat(text: str) -> dict:
    """/proc/<pid>/ksm_stat as a dict. Takes 'key value' lines and, from about 6.14,
    'key: yes|no' lines; numbers become int, yes/no bool; unknown fields are kept. A line
    that is not 'key value', or gives a known field (KSM_STAT_TYPES) a value of another
    type, is skipped."""
    fields = {}
    for line in text.split("\n"):
        parts = line.replace(":", " ", 1).split(None, 1)
        if len(parts) != 2:
            continue
        value = parse_value(parts[1])
        if type(value) is KSM_STAT_TYPES.get(parts[0], type(value)):
            fields[parts[0]] = value
    return fields


def read_proc(pid: int, name: str) -> str | None:
    """Text of /proc/<pid>/<name>, or None if the process (or the file) is gone.
    PermissionError passes through: the caller decides what an unreadable process means."""
    try:
        with open(os.path.join(PROC_DIR, str(pid), name), errors="replace") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None


def process_maps_text(pid: int) -> str | None:
    """/proc/<pid>/maps as text (paths with their bytes kept, surrogateescape), or None when it
    cannot be read."""
    try:
        with open(os.path.join(PROC_DIR, str(pid), "maps"), errors="surrogateescape") as maps:
            return maps.read()
    except OSError:
        return None


def transparent_huge_pages_mode() -> str:
    """The chosen transparent huge page mode (always, madvise, never), or "" when unknown."""
    try:
        with open(THP_ENABLED) as f:
            text = f.read()
    except OSError:
        return ""
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else text.strip()


def executable_path(pid: int) -> str:
    return os.path.join(PROC_DIR, str(pid), "exe")


def process_alive(pid: int) -> bool:
    """The process exists and is no zombie (a zombie's maps and memory read as empty)."""
    stat = read_proc(pid, "stat")
    return stat is not None and stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] != "Z"


def thread_group(pid: int) -> int:
    """The process (thread group) that `pid` belongs to: itself, or the process of a thread id."""
    status = read_proc(pid, "status") or ""
    for line in status.splitlines():
        if line.startswith("Tgid:"):
            return int(line.split()[1])
    return pid


def ksmd_pid() -> int | None:
    """The pid of the kernel thread ksmd (a child of kthreadd, pid 2), or None where it is not
    seen (no KSM, or a pid namespace that hides kernel threads)."""
    children = read_proc(2, "task/2/children") or ""
    for pid in map(int, children.split()):
        if (read_proc(pid, "comm") or "").strip() == "ksmd":
            return pid
    return None


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of the process (/proc/<pid>/stat), or None if it is gone."""
    stat = read_proc(pid, "stat")
    if stat is None:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15


def process_exists(pid: int) -> bool:
    return os.path.exists(os.path.join(PROC_DIR, str(pid)))


def require_processes(pids: Iterable[int]) -> None:
    """NoSuchProcess naming those of `pids` (which the user named) that do not exist."""
    gone = [pid for pid in pids if not process_exists(pid)]
    if gone:
        raise NoSuchProcess(gone)


def needs_root(error: PermissionError) -> NeedsRoot:
    """NeedsRoot for a PermissionError on a /proc/<pid> file (another user's process)."""
    return NeedsRoot(f"reading {error.filename} of another user's process")


def open_process_file(pid: int, name: str) -> int | None:
    """A read-only fd of /proc/<pid>/<name>, or None if the process is gone; NeedsRoot for
    another user's process."""
    try:
        return os.open(os.path.join(PROC_DIR, str(pid), name), os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return None
    except PermissionError as error:
        raise needs_root(error) from None


def open_page_flags_file(path: str) -> int:
    """A read-only fd of /proc/kpageflags or /proc/kpagecount, which only root may read."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except PermissionError:
        raise NeedsRoot(f"reading {path}") from None
    except FileNotFoundError:
        raise KsmError(f"{path} is missing (kernel built without CONFIG_PROC_PAGE_MONITOR)") from None


def process_ksm_stat(pid: int) -> dict | None:
    """Parsed /proc/<pid>/ksm_stat, or None when the process is gone or the file missing.
    A kernel thread or zombie has an empty file: {}."""
    text = read_proc(pid, "ksm_stat")
    return None if text is None else parse_ksm_stat(text)


def uses_ksm(stat: dict) -> bool:
    """Whether a parsed ksm_stat shows the process involved with KSM in any way."""
    counters = ("ksm_rmap_items", "ksm_merging_pages", "ksm_zero_pages")
    flags = ("ksm_merge_any", "ksm_mergeable")
    return any(stat.get(name, 0) > 0 for name in counters) or any(stat.get(f) for f in flags)


def short_cmdline(raw: str, comm: str, limit: int = 80) -> str:
    """A NUL-separated /proc/<pid>/cmdline as one line of at most `limit` characters, the
    program without its directory ('/usr/bin/redis-server x' -> 'redis-server x')."""
    args = raw.rstrip("\0").split("\0")
    args[0] = os.path.basename(args[0])
    text = " ".join(args) or f"[{comm}]"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def pids() -> list[int]:
    return sorted(int(entry) for entry in os.listdir(PROC_DIR) if entry.isascii() and entry.isdigit())


def ksm_process(pid: int) -> dict | None:
    """{pid, comm, cmdline, ksm_stat fields...} if `pid` uses KSM; None if it does not or has
    vanished meanwhile. PermissionError when it cannot be read (another user's process)."""
    stat = process_ksm_stat(pid)
    if not stat or not uses_ksm(stat):
        return None
    comm, cmdline = read_proc(pid, "comm"), read_proc(pid, "cmdline")
    if comm is None or cmdline is None:
        return None
    comm = comm.strip()
    return {"pid": pid, "comm": comm, "cmdline": short_cmdline(cmdline, comm), **stat}


def ksm_processes_and_unreadable() -> tuple[list[dict], int]:
    """(every process whose ksm_stat shows KSM involvement, by pid; how many processes could
    not be read: other users', without root)."""
    found, unreadable = [], 0
    for pid in pids():
        try:
            entry = ksm_process(pid)
        except PermissionError:
            unreadable += 1
            continue
        if entry is not None:
            found.append(entry)
    return found, unreadable


def ksm_processes() -> list[dict]:
    """Every process whose ksm_stat shows KSM involvement that can be read, by pid."""
    return ksm_processes_and_unreadable()[0]


def unreadable_notes(count: int) -> list[str]:
    """What a command notes about `count` processes it could not read ([] for none)."""
    return (
        [f"{count} other users' processes were not read: reading their /proc/PID/ksm_stat needs root"] if count else []
    )


# ---- regions: /proc/<pid>/smaps ---------------------------------------------------------------

_SMAPS_HEADER = re.compile(r"([0-9a-f]{1,16})-([0-9a-f]{1,16}) (\S{4}) \S+ \S+ [0-9]+\s*(.*)")
_SMAPS_FIELD = re.compile(r"(\w+):\s+([0-9]{1,20}) kB")


def _smaps_header(line):
    """The VMA a header line starts, or None: not a header, or not a range (start < end)."""
    header = _SMAPS_HEADER.fullmatch(line)
    if not header or int(header.group(1), 16) >= int(header.group(2), 16):
        return None
    start, end, perms, path = header.groups()
    return {"start": int(start, 16), "end": int(end, 16), "perms": perms, "path": path, "mergeable": False}


def _add_smaps_line(region, line):
    """Adds a field or VmFlags line to `region`; returns the VMA the next lines belong to:
    None after a field seen twice (a header was lost: they are not this VMA's)."""
    if line.startswith("VmFlags:"):
        region["mergeable"] = "mg" in line.split()[1:]
        return region
    field = _SMAPS_FIELD.fullmatch(line)
    if field and field.group(1) in region:
        return None
    if field:
        region[field.group(1)] = int(field.group(2))
    return region


def parse_smaps(text: str) -> list[dict]:
    """One dict per VMA of a /proc/<pid>/smaps text: start, end, perms, path ('' for anonymous),
    every 'Name: N kB' field in KiB under its name, and mergeable (VmFlags has 'mg').
    Other lines are skipped, and so are those after a header that could not be read."""
    regions, current = [], None
    for line in text.split("\n"):
        region = _smaps_header(line)
        if region:
            regions.append(region)
            current = region
        elif current is not None:
            current = _add_smaps_line(current, line)
    return regions


def process_regions(pid: int) -> list[dict] | None:
    """parse_smaps of a live process, or None when it is gone."""
    text = read_proc(pid, "smaps")
    return None if text is None else parse_smaps(text)


def is_anonymous_vma(region: dict) -> bool:
    """No file behind it: what allocators map (the brk heap included), not a library's data."""
    return region["path"] in ("", "[heap]")


def mergeable_coverage(regions: Iterable[dict]) -> tuple[int, int]:
    """(KiB in anonymous VMAs flagged mergeable, KiB in the other anonymous VMAs)."""
    anonymous = [r for r in regions if is_anonymous_vma(r)]
    marked = sum(r.get("Anonymous", 0) for r in anonymous if r["mergeable"])
    return marked, sum(r.get("Anonymous", 0) for r in anonymous) - marked


# ---- page frames: /proc/<pid>/pagemap, /proc/kpageflags, /proc/kpagecount (sharing.py) ------
# Documentation/admin-guide/mm/pagemap.rst. One 64-bit word per virtual page (pagemap) or per
# page frame (kpageflags, kpagecount). PFNs read as 0 without CAP_SYS_ADMIN (Linux 4.2+).

PAGEMAP_PFN_MASK = (1 << 55) - 1  # bits 0-54: the page frame number, when present
PAGEMAP_FILE = 1 << 61  # a file page or shared anonymous memory (never KSM)
PAGEMAP_SWAPPED = 1 << 62
PAGEMAP_PRESENT = 1 << 63
KPAGEFLAGS = "/proc/kpageflags"
KPAGECOUNT = "/proc/kpagecount"  # how many page-table entries map each frame
KPF_KSM = 21  # kpageflags bit: a KSM page
KPF_ZERO_PAGE = 24  # kpageflags bit: the zero page (or the huge zero page)
# Kernel-provided mappings: never KSM memory (and [vsyscall] lies outside what pagemap shows).
SPECIAL_MAPPINGS = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]")


def pagemap_path(pid: int) -> str:
    return os.path.join(PROC_DIR, str(pid), "pagemap")


def process_maps(pid: int) -> list[dict] | None:
    """The VMAs of /proc/<pid>/maps (start, end, perms, path), or None when the process is gone.
    maps lines are smaps' header lines, so parse_smaps reads them (no page-table walk)."""
    text = read_proc(pid, "maps")
    return (
        None
        if text is None
        else [{key: region[key] for key in ("start", "end", "perms", "path")} for region in parse_smaps(text)]
    )


def can_hold_ksm_pages(region: dict) -> bool:
    """KSM merges anonymous pages of private VMAs only: private anonymous memory and the
    copied-on-write pages of private file mappings (a library's .data, relro). Shared
    mappings and the kernel's own ones never hold KSM pages."""
    return region["perms"][3] == "p" and region["path"] not in SPECIAL_MAPPINGS


def walk_ksm_regions(
    pid: int,
    visit: Callable[[dict, int, int, int, int | None], None],
    with_mem: bool = False,
    after_maps: Callable[[], None] | None = None,
    after_visits: Callable[[], None] | None = None,
) -> str | None:
    """The one page walker of sharing.py and potential.py: for each VMA of `pid` that can hold
    KSM pages, visit(region, first_page, end_page, pagemap_fd, mem_fd) (mem_fd: /proc/<pid>/mem
    with with_mem, else None); after_maps() once the VMAs are read; after_visits() once every
    region is visited, the files still open (for reads still under way). Returns the process's
    comm, or None when it is gone (also when it ends half-way); NeedsRoot for another user's
    process."""
    try:
        regions, comm = process_maps(pid), read_proc(pid, "comm")
    except PermissionError as error:
        raise needs_root(error) from None
    if after_maps:
        after_maps()
    if regions is None or comm is None:
        return None
    fds = [open_process_file(pid, "pagemap")]
    try:
        if with_mem and fds[0] is not None:
            fds.append(open_process_file(pid, "mem"))
        if None in fds:
            return None
        mem_fd = fds[1] if with_mem else None
        page = page_size()
        for region in filter(can_hold_ksm_pages, regions):
            visit(region, region["start"] // page, region["end"] // page, fds[0], mem_fd)
    except ProcessLookupError:
        return None
    finally:
        if after_visits and None not in fds:
            after_visits()
        for fd in fds:
            if fd is not None:
                os.close(fd)
    return comm.strip()
