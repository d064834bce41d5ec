"""A child process with real KSM activity: prctl(PR_SET_MEMORY_MERGE) and identical pages.

Run as a script (`python mergeable_child.py NPAGES [zero]`): it opts its whole address space
into KSM, maps NPAGES pages that all hold the same bytes (zeros with `zero`), prints "ready"
and waits until its stdin closes. `mergeable_process(npages)` runs it for a test.

`python mergeable_child.py distinct TOKEN COUNT`: COUNT pages, page i holding "TOKEN i"
repeated, marked with madvise(MADV_MERGEABLE) alone (nothing else of the process merges).
`distinct_pages_process(token, count)` runs it.
"""

import contextlib
import ctypes
import mmap
import subprocess
import sys

PR_SET_MEMORY_MERGE = 67
PATTERN = b"ksmpreload test page "


def opt_into_ksm():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MEMORY_MERGE, 1) failed")


def identical_pages(npages, zero=False):
    pattern = b"\0" if zero else PATTERN
    page = (pattern * (mmap.PAGESIZE // len(pattern) + 1))[: mmap.PAGESIZE]
    # Private: KSM silently ignores shared mappings (Python's default for mmap(-1, ...)).
    region = mmap.mmap(-1, npages * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_NOHUGEPAGE)
    for i in range(npages):
        region[i * mmap.PAGESIZE : (i + 1) * mmap.PAGESIZE] = page
    return region


def distinct_pages(token, count):
    region = mmap.mmap(-1, count * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_NOHUGEPAGE)
    for i in range(count):
        text = f"{token} {i} ".encode()
        region[i * mmap.PAGESIZE : (i + 1) * mmap.PAGESIZE] = (text * (mmap.PAGESIZE // len(text) + 1))[: mmap.PAGESIZE]
    region.madvise(mmap.MADV_MERGEABLE)
    return region


@contextlib.contextmanager
def mergeable_process(npages, zero=False):
    """Yield the Popen of a running child holding `npages` identical, KSM-enabled pages."""
    with _child([str(npages)] + (["zero"] if zero else [])) as child:
        yield child


@contextlib.contextmanager
def distinct_pages_process(token, count):
    """Yield the Popen of a running child whose page i holds "token i" (madvise only)."""
    with _child(["distinct", token, str(count)]) as child:
        yield child


@contextlib.contextmanager
def _child(arguments):
    args = [sys.executable, __file__, *arguments]
    child = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"mergeable child did not start (said {line!r})")
        yield child
    finally:
        child.stdin.close()
        child.wait(timeout=30)


def main(npages, zero):
    opt_into_ksm()
    region = identical_pages(npages, zero)
    print("ready", flush=True)
    sys.stdin.read()
    region.close()


def main_distinct(token, count):
    region = distinct_pages(token, count)
    print("ready", flush=True)
    sys.stdin.read()
    region.close()


if __name__ == "__main__":
    if sys.argv[1] == "distinct":
        main_distinct(sys.argv[2], int(sys.argv[3]))
    else:
        main(int(sys.argv[1]), sys.argv[2:] == ["zero"])
