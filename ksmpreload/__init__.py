"""ksmpreload: Kernel Samepage Merging for unmodified programs.

No `from __future__ import annotations` here or in entry.py: loading __future__ reads a file
before the console scripts can catch Ctrl-C, and the interrupt showed as a traceback of ours."""

import os
import sys

__version__ = "0.1.0"

SHIM_ENV = "KSMPRELOAD_SHIM"
SHIM = "libksmpreload.so"


def shim_path() -> str:
    """Path of libksmpreload.so: $KSMPRELOAD_SHIM if set (development), else the one pip put in
    this package, else the Debian package's, in the multiarch library directory (debian/rules)."""
    packaged = os.path.join(os.path.dirname(__file__), SHIM)
    if os.environ.get(SHIM_ENV) or os.path.exists(packaged):
        return os.environ.get(SHIM_ENV) or packaged
    return os.path.join("/usr/lib", getattr(sys.implementation, "_multiarch", ""), "ksmpreload", SHIM)


def merge_this_process() -> str:
    """Make this process's memory mergeable, for a program that cannot be restarted under ksm-wrap
    (a notebook, an embedded interpreter). prctl(PR_SET_MEMORY_MERGE, 1) where the kernel has it
    (6.4+: the whole process, and what it forks and execs later); else madvise(MADV_MERGEABLE)
    over its private anonymous mappings as they are now (memory mapped later is not covered).
    Nothing is aligned: equal data at different page offsets stays apart (docs/ATTACH.md).
    Returns "prctl" or "madvise"; OSError when neither works (no KSM in this kernel)."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(67, 1, 0, 0, 0) == 0:  # PR_SET_MEMORY_MERGE
        return "prctl"
    mark_anonymous_mergeable()
    return "madvise"


def mark_anonymous_mergeable() -> int:
    """madvise(MADV_MERGEABLE) over this process's private anonymous mappings as they are now;
    returns how many were marked, OSError when none could be."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    marked, failure = 0, 0
    with open("/proc/self/maps") as maps:
        regions = [line.split() for line in maps]
    for fields in regions:
        start, end = (int(value, 16) for value in fields[0].split("-"))
        if len(fields) < 6 and fields[1][3] == "p" and fields[1][:2] != "--":  # private anonymous, accessible
            if libc.madvise(start, end - start, 12) == 0:  # MADV_MERGEABLE
                marked += 1
            else:
                failure = ctypes.get_errno()
    if not marked:
        raise OSError(failure or 22, f"no mapping of this process could be marked: {os.strerror(failure or 22)}")
    return marked
