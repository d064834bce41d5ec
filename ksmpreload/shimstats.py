"""The counters that libksmpreload.so keeps inside each process, read from outside.

Each process running the shim maps <stats dir>/<pid>.stats (format in docs/COUNTERS.md):
the magic "KSMPRLD1", a u64 slot count, the u64 slots, the slot names, NUL-separated, then
(8-byte aligned) a ring of records of the regions the shim handled, "KSMREGN1".
A file is current only while its process still maps it; others are left-overs.
"""
import os
import struct
import time

MAGIC = b"KSMPRLD1"
REGIONS_MAGIC = b"KSMREGN1"
REGION_KINDS = {1: "mmap", 2: "mapped before start", 3: "glibc mmapped chunk", 4: "glibc arena heap",
                5: "jemalloc extent"}
SETTLE_SECONDS = 2  # a file younger than this may belong to a process about to map it
STRATEGIES = {1: "prctl", 2: "madvise", 3: "observe"}


def default_stats_dir(euid=None):
    """Where the shim publishes when KSMPRELOAD_STATS_DIR is unset (same rule as shim.c)."""
    euid = os.geteuid() if euid is None else euid
    return "/run/ksmpreload" if euid == 0 else f"/tmp/ksmpreload-{euid}"


def stats_dir():
    return os.environ.get("KSMPRELOAD_STATS_DIR") or default_stats_dir()


def parse_stats(data):
    """{slot name: value} from the bytes of a counters file; ValueError if it is not one."""
    if len(data) < 16 or data[:8] != MAGIC:
        raise ValueError("not a ksmpreload counters file")
    (count,) = struct.unpack_from("<Q", data, 8)
    values_end = 16 + 8 * count
    values = struct.unpack_from(f"<{count}Q", data, 16)
    names = data[values_end:].split(b"\0")[:count]
    if len(names) != count:
        raise ValueError("counters file is cut short")
    stats = dict(zip((name.decode() for name in names), values))
    stats["strategy"] = STRATEGIES.get(stats.get("strategy"), "unknown")
    return stats


def _slot_names_end(data):
    (count,) = struct.unpack_from("<Q", data, 8)
    at = 16 + 8 * count
    for _ in range(count):
        at = data.index(b"\0", at) + 1
    return at


def parse_regions(data):
    """The region records of a counters file, oldest first: [{start, end, kind, caller}].
    Files from shims without records give []."""
    at = (_slot_names_end(data) + 7) & ~7
    if data[at:at + 8] != REGIONS_MAGIC:
        return []
    capacity, written = struct.unpack_from("<QQ", data, at + 8)
    first = written - capacity if written > capacity else 0
    records = []
    for index in range(first, written):
        start, length, kind, caller = struct.unpack_from("<4Q", data, at + 24 + 32 * (index % capacity))
        if kind:  # 0: being written
            records.append({"start": start, "end": start + length, "kind": REGION_KINDS.get(kind, "unknown"),
                            "caller": caller or None})
    return records


def _maps_file(pid, path):
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return any(line.rstrip().endswith(path) for line in maps)
    except OSError:
        return False


def _read_current_file(pid, directory):
    path = os.path.join(directory or stats_dir(), f"{pid}.stats")
    if not _maps_file(pid, path):
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def read_process_stats(pid, directory=None):
    """The counters of a live process running the shim, or None."""
    data = _read_current_file(pid, directory)
    try:
        return parse_stats(data) if data else None
    except ValueError:
        return None


def read_process_regions(pid, directory=None):
    """The region records of a live process running the shim ([] without any)."""
    data = _read_current_file(pid, directory)
    try:
        return parse_regions(data) if data and data[:8] == MAGIC else []
    except (ValueError, struct.error):
        return []


def all_process_stats(directory=None, prune=True):
    """{pid: counters} of every live process that publishes; left-over files are removed."""
    directory = directory or stats_dir()
    try:
        names = os.listdir(directory)
    except OSError:
        return {}
    found = {}
    for name in names:
        pid = name[:-len(".stats")]
        if not (name.endswith(".stats") and pid.isdigit()):
            continue
        stats = read_process_stats(int(pid), directory)
        if stats is not None:
            found[int(pid)] = stats
        elif prune:
            _remove_left_over(os.path.join(directory, name))
    return found


def _remove_left_over(path):
    try:
        if time.time() - os.stat(path).st_mtime > SETTLE_SECONDS:
            os.unlink(path)
    except OSError:
        pass


def shim_loaded(pid):
    """libksmpreload.so is mapped in the process (it may not have published counters yet)."""
    return _maps_file(pid, "libksmpreload.so")
