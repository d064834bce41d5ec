"""Records of `ksmpreload attach` (docs/ATTACH.md): one JSON file a process in RECORDS_DIR, so
that detach undoes exactly what attach did and status, top and report can say which processes
were attached. Root's only: another user's file there would decide what detach unmarks. A
record counts while a process of its pid and start time runs; anything else found there (an
ended process's, a corrupt or foreign file) counts as no record, and root removes it."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import time

import psutil

from . import kernel

RECORDS_DIR = "/run/ksmpreload/attached"
STRATEGIES = ("prctl", "madvise")
MAX_RECORD_BYTES = 16 << 20
MAX_ADDRESS = 1 << 64


def started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _trusted_dir() -> bool:
    """RECORDS_DIR is a directory owned by root that no one else may write."""
    try:
        info = os.lstat(RECORDS_DIR)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == 0 and not info.st_mode & 0o022


def why_not_recordable() -> str | None:
    """None when records can be written (made if missing), else why not."""
    if os.geteuid() != 0:
        return "records are root's"
    with contextlib.suppress(FileExistsError):
        os.makedirs(RECORDS_DIR, mode=0o755)
    return None if _trusted_dir() else f"{RECORDS_DIR} is not a directory that only root may write"


def _path(pid: int) -> str:
    return os.path.join(RECORDS_DIR, f"{pid}.json")


def write(pid: int, strategy: str, regions: list[tuple[int, int]]) -> None:
    """Records an attach, atomically; OSError (a full disk) leaves no file."""
    record = {"pid": pid, "started": started(pid), "strategy": strategy, "regions": regions, "time": time.time()}
    with tempfile.NamedTemporaryFile("w", dir=RECORDS_DIR, prefix=".attach-", delete=False) as temporary:
        try:
            json.dump(record, temporary)
            temporary.flush()
            os.fsync(temporary.fileno())
            os.replace(temporary.name, _path(pid))
        except BaseException:
            os.unlink(temporary.name)
            raise


def _region(entry) -> tuple[int, int] | None:
    page = kernel.page_size()
    if not isinstance(entry, list) or len(entry) != 2 or not all(type(value) is int for value in entry):
        return None
    start, end = entry
    return (start, end) if 0 <= start < end <= MAX_ADDRESS and not start % page and not end % page else None


def valid(record) -> dict | None:
    """The record if it has the shape attach writes, else None."""
    if not isinstance(record, dict) or type(record.get("pid")) is not int:
        return None
    if record.get("strategy") not in STRATEGIES or not isinstance(record.get("regions"), list):
        return None
    if not isinstance(record.get("started"), (int, float, type(None))):
        return None
    regions = [_region(entry) for entry in record["regions"]]
    return None if None in regions else {**record, "regions": regions}


def _parse(path: str) -> dict | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if info.st_uid != 0 or not stat.S_ISREG(info.st_mode) or info.st_size > MAX_RECORD_BYTES:
            return None
        try:
            return valid(json.loads(file.read()))
        except (OSError, ValueError):
            return None


def read(pid: int) -> dict | None:
    """The record of the running process `pid`'s attach, or None."""
    if not _trusted_dir():
        return None
    record = _parse(_path(pid))
    if record is None or record["pid"] != pid or record["started"] != started(pid):
        return None
    return record


def remove(pid: int) -> bool:
    try:
        os.unlink(_path(pid))
        return True
    except OSError:
        return False


def attached_processes() -> dict[int, dict]:
    """{pid: record} of the running processes attach turned merging on in; as root, files that
    count for no running process are removed."""
    if not _trusted_dir():
        return {}
    found = {}
    for name in os.listdir(RECORDS_DIR):
        pid = name.removesuffix(".json")
        if not (name.endswith(".json") and pid.isascii() and pid.isdigit()):
            continue
        record = read(int(pid))
        if record:
            found[int(pid)] = record
        elif os.geteuid() == 0:
            remove(int(pid))
    return found
