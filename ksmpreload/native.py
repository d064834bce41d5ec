"""The compiled helper (python/native.c, built by cffi) with Python errors."""
import errno
import os

from ._native import ffi, lib


def _check(result):
    if result < 0:
        raise OSError(-result, os.strerror(-result))
    return result


def set_memory_merge(enable=True):
    """prctl(PR_SET_MEMORY_MERGE): every compatible mapping of this process (and, on Linux
    6.7+, of what it execs) becomes mergeable. OSError(EINVAL) where the kernel lacks it."""
    _check(lib.ksm_prctl_set_merge(1 if enable else 0))


def memory_merge_enabled():
    return bool(_check(lib.ksm_prctl_get_merge()))


# ---- page frames (ksmpreload.sharing): cffi arrays in and out, no Python loop per page -------

PAGEMAP_CHUNK_WORDS = 1 << 18   # 2 MiB of pagemap per pread (1 GiB of 4 KiB pages)
PFN_READ_GAP = 8                # kpageflags/kpagecount: read through gaps this small (0 and 8
                                # measured alike, 128 and whole spans slower: docs/BENCHMARKS.md)
PFN_CHUNK_WORDS = 1 << 16       # at most 512 KiB per pread of those files
PROC_FIELDS = ("mapped", "distinct", "shared_in_set", "within_only", "within_only_mapped",
               "outside", "lone")
TOTAL_FIELDS = ("distinct", "mapped", "shared", "within_only", "outside", "lone")
assert len(PROC_FIELDS) == lib.KSM_PROC_FIELDS and len(TOTAL_FIELDS) == lib.KSM_TOTAL_FIELDS


def u64_array(count):
    return ffi.new("uint64_t[]", max(count, 1))


class PfnArray:
    """A growable array of uint64 (PFNs), filled by pagemap reads.

    Pagemap is read in windows of PAGEMAP_CHUNK_WORDS pages. Reading costs about 8 bytes and a
    few nanoseconds per virtual page even where nothing is mapped, so after a window with
    fewer than 1 in SPARSE_ONE_IN of its pages present the next one is read where PAGEMAP_SCAN
    (Linux 6.7+) finds present pages; that walk costs about as much again per present page,
    so a dense window switches back. scan = "auto" (that), "never" or "always"."""

    SPARSE_ONE_IN = 16

    def __init__(self, capacity=1 << 16, scan="auto"):
        self.data, self.capacity, self.size = u64_array(capacity), capacity, 0
        self.scan = scan
        self._buf = u64_array(PAGEMAP_CHUNK_WORDS)
        self._next = ffi.new("uint64_t *")
        self.counts = ffi.new("uint64_t[2]")   # entries kept, kept entries with PFN 0

    def _reserve(self, extra):
        if self.capacity - self.size >= extra:
            return
        capacity = max(self.capacity * 2, self.size + extra)
        data = u64_array(capacity)
        ffi.memmove(data, self.data, self.size * 8)
        self.data, self.capacity = data, capacity

    def read_pagemap(self, fd, first, end, keep_mask, keep_value, pfn_mask):
        """Append the PFNs of pages [first, end) whose pagemap entry matches: (entry &
        keep_mask) == keep_value, PFN = entry & pfn_mask (ksm_pagemap_read)."""
        page, sparse = first, self.scan == "always"
        while page < end:
            stop = min(end, page + PAGEMAP_CHUNK_WORDS)
            self._reserve(stop - page)
            out, room = self.data + self.size, self.capacity - self.size
            if sparse:
                got = lib.ksm_pagemap_read_present(fd, page, stop, lib.ksm_page_size(), self._buf,
                                                   PAGEMAP_CHUNK_WORDS, keep_mask, keep_value, pfn_mask,
                                                   out, room, self._next, self.counts)
                if got in (-errno.ENOTTY, -errno.EINVAL):   # no PAGEMAP_SCAN (before 6.7)
                    self.scan = "never"
                    sparse = False
                    continue
            else:
                got = lib.ksm_pagemap_read(fd, page, stop, self._buf, PAGEMAP_CHUNK_WORDS, keep_mask,
                                           keep_value, pfn_mask, out, room, self._next, self.counts)
            self.size += _check(got)
            if self.scan == "auto":
                sparse = got * self.SPARSE_ONE_IN < stop - page
            page = self._next[0]


def sort_pfns(pfns, count):
    """keys[i] = pfn << 32 | position, ascending by PFN (ksm_sort_pfns)."""
    keys, tmp = u64_array(count), u64_array(count)
    _check(lib.ksm_sort_pfns(pfns, count, keys, tmp))
    return keys


def distinct_pfns(keys, count):
    out = u64_array(count)
    return out, lib.ksm_distinct_pfns(keys, count, out)


def read_pfn_words(fd, pfns, count, max_gap=None):
    """The word of each of `count` ascending distinct PFNs in a file indexed by PFN, reading
    through gaps of at most max_gap (default PFN_READ_GAP) words."""
    max_gap = PFN_READ_GAP if max_gap is None else max_gap
    out, buf = u64_array(count), u64_array(PFN_CHUNK_WORDS)
    _check(lib.ksm_read_pfn_words(fd, pfns, count, max_gap, buf, PFN_CHUNK_WORDS, out))
    return out


def select_pfns(pfns, words, count, mask):
    out = u64_array(count)
    return out, lib.ksm_select_pfns(pfns, words, count, mask, out)


def attribute(keys, count, offsets, ksm_pfns, mapcounts, nksm):
    """Who maps which KSM page (ksm_attribute). offsets: n + 1 positions bounding each
    process's PFNs. Returns (entry kinds, per-process dicts, {(a, b): pages} by process
    index, totals dict)."""
    nprocs = len(offsets) - 1
    kinds = ffi.new("uint8_t[]", max(count, 1))
    per_proc = u64_array(nprocs * len(PROC_FIELDS))
    pairs = u64_array(nprocs * nprocs)
    totals = u64_array(len(TOTAL_FIELDS))
    _check(lib.ksm_attribute(keys, count, ffi.new("uint64_t[]", offsets), nprocs, ksm_pfns, mapcounts,
                             nksm, kinds, per_proc, pairs, totals))
    rows = [dict(zip(PROC_FIELDS, per_proc[p * len(PROC_FIELDS):(p + 1) * len(PROC_FIELDS)]))
            for p in range(nprocs)]
    pair_counts = {(a, b): pairs[a * nprocs + b] for a in range(nprocs) for b in range(a + 1, nprocs)}
    return kinds, rows, pair_counts, dict(zip(TOTAL_FIELDS, totals[0:len(TOTAL_FIELDS)]))


def count_kinds(kinds, offsets):
    """Per range [offsets[r], offsets[r+1]): (KSM pages, shared with another process of the
    set, shared within the process only)."""
    ranges = len(offsets) - 1
    out = u64_array(3 * ranges)
    lib.ksm_count_kinds(kinds, ffi.new("uint64_t[]", offsets), ranges, out)
    return [tuple(out[3 * r:3 * r + 3]) for r in range(ranges)]
