"""The counters that libksmpreload.so keeps inside each process, read from outside.

Each process running the shim maps <stats dir>/<pid>.stats (format in docs/COUNTERS.md):
the magic "KSMPRLD1", a u64 slot count, the u64 slots, the slot names, NUL-separated, then
(8-byte aligned) a ring of records of the regions the shim handled, "KSMREGN1".
A file is current only while its process still maps it; others are left-overs.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import struct
import time

from . import kernel

MAGIC = b"KSMPRLD1"
REGIONS_MAGIC = b"KSMREGN1"
REGION_KINDS = {
    1: "mmap",
    2: "mapped before start",
    3: "glibc mmapped chunk",
    4: "glibc arena heap",
    5: "jemalloc extent",
}
HEADER_BYTES = 16  # magic, slot count
RECORD_BYTES = 32  # start, length, kind, caller
SLOT_NAME = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")  # the shim's slot names are C identifiers
STATS_FILE = re.compile(r"([0-9]+)\.stats")
SETTLE_SECONDS = 2  # a file younger than this may belong to a process about to map it
STRATEGIES = {1: "prctl", 2: "madvise", 3: "observe"}


def default_stats_dir(euid: int | None = None) -> str:
    """Where the shim publishes when KSMPRELOAD_STATS_DIR is unset (same rule as shim.c)."""
    euid = os.geteuid() if euid is None else euid
    return "/run/ksmpreload" if euid == 0 else f"/tmp/ksmpreload-{euid}"


def memory_cost_bytes(counters: dict | None) -> int:
    """What the shim costs a process in memory now, the one figure every net saving subtracts:
    the padding of its live aligned blocks, the table that keeps it, and the freed blocks its
    cache keeps for reuse (docs/COUNTERS.md). 0 without counters."""
    if not counters:
        return 0
    return sum(counters.get(slot, 0) for slot in ("padding_bytes", "padding_table_bytes", "cached_bytes"))


def stats_dir() -> str:
    return os.environ.get("KSMPRELOAD_STATS_DIR") or default_stats_dir()


def _as_the_kernel_names_it(directory):
    """`directory` as /proc/<pid>/maps names it: the shim takes /./, // and a trailing /, and
    refuses symlinks, so the lexical normal form is the real path (a leading // included)."""
    path = os.path.normpath(directory or stats_dir())
    return "/" + path.lstrip("/") if path.startswith("/") else path


def _u64(data, at):
    if at + 8 > len(data):
        raise ValueError("cut short")
    return struct.unpack_from("<Q", data, at)[0]


def _slots(data):
    """(slot values, slot names, where the names end) of a counters file; ValueError if the
    bytes are not one. Sizes are checked against the bytes before anything is unpacked."""
    if data[:8] != MAGIC:
        raise ValueError("not a ksmpreload counters file")
    count = _u64(data, 8)
    if count > (len(data) - HEADER_BYTES) // 8:
        raise ValueError(f"cut short or corrupt: {count} slots do not fit in {len(data)} bytes")
    values = struct.unpack_from(f"<{count}Q", data, HEADER_BYTES)
    names, at = [], HEADER_BYTES + 8 * count
    for _ in range(count):
        end = data.find(b"\0", at)
        if end < 0:
            raise ValueError("cut short in the slot names")
        if not SLOT_NAME.fullmatch(data[at:end]):
            raise ValueError(f"a slot name is no identifier: {data[at:end][:40]!r}")
        names.append(data[at:end].decode("ascii"))
        at = end + 1
    return values, names, at


def parse_stats(data: bytes) -> dict:
    """{slot name: value} from the bytes of a counters file; ValueError if it is not one."""
    values, names, _ = _slots(data)
    stats = dict(zip(names, values))
    stats["strategy"] = STRATEGIES.get(stats.get("strategy"), "unknown")
    return stats


def parse_regions(data: bytes) -> list[dict]:
    """The region records of a counters file, oldest first: [{start, end, kind, caller}];
    ValueError if it is not one or its records are cut short. Files from shims without
    records give [], and so does a ring whose capacity is not written yet (the shim writes
    the magic first)."""
    at = (_slots(data)[2] + 7) & ~7
    if data[at : at + 8] != REGIONS_MAGIC:
        return []
    capacity, written = _u64(data, at + 8), _u64(data, at + 16)
    kept = min(capacity, written)
    if kept > (len(data) - at - 24) // RECORD_BYTES:
        raise ValueError(f"cut short or corrupt: {kept} region records do not fit in {len(data)} bytes")
    records = []
    for index in range(written - kept, written):
        start, length, kind, caller = struct.unpack_from("<4Q", data, at + 24 + RECORD_BYTES * (index % capacity))
        if kind:  # 0: being written
            records.append(
                {
                    "start": start,
                    "end": start + length,
                    "kind": REGION_KINDS.get(kind, "unknown"),
                    "caller": caller or None,
                }
            )
    return records


def _maps_file(pid, path):
    maps = kernel.process_maps_text(pid)
    return maps is not None and any(line.rstrip().endswith(path) for line in maps.splitlines())


def _current_path(pid, directory):
    """The path of pid's counters file if pid maps it (the file is current), else None."""
    path = os.path.join(_as_the_kernel_names_it(directory), f"{pid}.stats")
    return path if _maps_file(pid, path) else None


def _parse_file(path, parse, problems, what="the counters file"):
    """parse(the bytes of `path`); None when it has gone, or cannot be read or parsed: then
    a line saying so is added to `problems` (a list; None drops it)."""
    try:
        with open(path, "rb") as f:
            return parse(f.read())
    except FileNotFoundError:
        return None  # its process ended meanwhile
    except OSError as error:
        reason = error.strerror
    except ValueError as error:
        reason = str(error)
    if problems is not None:
        problems.append(f"skipped {what} {path}: {reason}")
    return None


def read_process_stats(pid: int, directory: str | None = None, problems: list[str] | None = None) -> dict | None:
    """The counters of a live process running the shim, or None. A current file that does
    not parse gives None and a line in `problems` (a list, if given)."""
    path = _current_path(pid, directory)
    return _parse_file(path, parse_stats, problems) if path else None


def read_process_regions(pid: int, directory: str | None = None, problems: list[str] | None = None) -> list[dict]:
    """The region records of a live process running the shim ([] without any); a current
    file whose records do not parse gives [] and a line in `problems`."""
    path = _current_path(pid, directory)
    records = _parse_file(path, parse_regions, problems, "the region records of") if path else None
    return records or []


def all_process_stats(
    directory: str | None = None, prune: bool = True, problems: list[str] | None = None
) -> dict[int, dict]:
    """{pid: counters} of every live process that publishes; left-over files are removed
    (with prune). Current files that do not parse are skipped, each with a line in `problems`."""
    directory = _as_the_kernel_names_it(directory)
    try:
        names = os.listdir(directory)
    except OSError:
        return {}
    found = {}
    for name in names:
        match = STATS_FILE.fullmatch(name)
        if not match:
            continue
        pid, path = int(match.group(1)), os.path.join(directory, name)
        if not _maps_file(pid, path):
            if prune:
                _remove_left_over(path)
            continue
        stats = _parse_file(path, parse_stats, problems)
        if stats is not None:
            found[pid] = stats
    return found


def _remove_left_over(path):
    try:
        if time.time() - os.stat(path).st_mtime > SETTLE_SECONDS:
            os.unlink(path)
    except OSError:
        pass


COUNTERS_READ_BYTES = 64 << 10  # the counters and their names lie well within this; the records follow


def published_strategy(pid: int) -> str | None:
    """The strategy the shim in `pid` took (prctl, madvise, observe), from the counters file the
    process maps; None without the shim, before it published, or when the file is not that one.
    The path is the process's to change, so the file is opened through its root without
    following a last symlink or blocking (a FIFO), and must be the regular file the mapping
    names (device and inode), read no further than COUNTERS_READ_BYTES."""
    lines = (kernel.process_maps_text(pid) or "").splitlines()
    if not any(line.rstrip().endswith("libksmpreload.so") for line in lines):
        return None
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/") and fields[5].endswith(f"/{pid}.stats"):
            data = _read_mapped(pid, fields[3], fields[4], fields[5])
            with contextlib.suppress(ValueError):
                return parse_stats(data)["strategy"] if data else None
    return None


def _read_mapped(pid: int, device: str, inode: str, path: str) -> bytes | None:
    """The start of the file at `path` in pid's root when it is the mapped one (maps' device
    "major:minor" in hex, and inode), else None."""
    try:
        major, minor = (int(part, 16) for part in device.split(":"))
        fd = os.open(
            os.path.join(kernel.PROC_DIR, str(pid), "root", path[1:]), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
        )
    except (OSError, ValueError):
        return None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode) or (info.st_dev, str(info.st_ino)) != (os.makedev(major, minor), inode):
            return None
        try:
            return file.read(COUNTERS_READ_BYTES)
        except OSError:
            return None


def shim_loaded(pid: int) -> bool:
    """libksmpreload.so is mapped in the process (it may not have published counters yet)."""
    return _maps_file(pid, "libksmpreload.so")
