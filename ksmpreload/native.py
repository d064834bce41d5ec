"""The compiled helper (python/native.c, built by cffi) with Python errors."""

from __future__ import annotations

from dataclasses import dataclass

import errno
import os
from typing import TYPE_CHECKING

from ._native import ffi, lib

if TYPE_CHECKING:
    from cffi import FFI


def _check(result):
    if result < 0:
        raise OSError(-result, os.strerror(-result))
    return result


def set_memory_merge(enable: bool = True) -> None:
    """prctl(PR_SET_MEMORY_MERGE): every compatible mapping of this process (and, on Linux
    6.7+, of what it execs) becomes mergeable. OSError(EINVAL) where the kernel lacks it."""
    _check(lib.ksm_prctl_set_merge(1 if enable else 0))


def memory_merge_enabled() -> bool:
    return bool(_check(lib.ksm_prctl_get_merge()))


# ---- page frames (ksmpreload.sharing): cffi arrays in and out, no Python loop per page -------

PAGEMAP_CHUNK_WORDS = 1 << 18  # 2 MiB of pagemap per pread (1 GiB of 4 KiB pages)
PFN_READ_GAP = 8  # kpageflags/kpagecount: read through gaps this small (0 and 8
# measured alike, 128 and whole spans slower: docs/BENCHMARKS.md)
PFN_CHUNK_WORDS = 1 << 16  # at most 512 KiB per pread of those files
PROC_FIELDS = ("mapped", "distinct", "shared_in_set", "within_only", "within_only_mapped", "outside", "lone", "fair")
TOTAL_FIELDS = ("distinct", "mapped", "shared", "within_only", "outside", "lone", "fair")
assert len(PROC_FIELDS) == lib.KSM_PROC_FIELDS and len(TOTAL_FIELDS) == lib.KSM_TOTAL_FIELDS


def u64_array(count: int) -> FFI.CData:
    return ffi.new("uint64_t[]", max(count, 1))


def _grown(array, used, capacity):
    """A new uint64 array of `capacity` words starting with the first `used` of `array`."""
    grown = u64_array(capacity)
    ffi.memmove(grown, array, used * 8)
    return grown


class PfnArray:
    """A growable array of uint64 (PFNs), filled by pagemap reads.

    Pagemap is read in windows of PAGEMAP_CHUNK_WORDS pages. Reading costs about 8 bytes and a
    few nanoseconds per virtual page even where nothing is mapped, so after a window with
    fewer than 1 in SPARSE_ONE_IN of its pages present the next one is read where PAGEMAP_SCAN
    (Linux 6.7+) finds present pages; that walk costs about as much again per present page,
    so a dense window switches back. scan = "auto" (that), "never" or "always"."""

    SPARSE_ONE_IN = 16

    def __init__(self, capacity: int = 1 << 16, scan: str = "auto", with_pages: bool = False) -> None:
        self.data, self.capacity, self.size = u64_array(capacity), capacity, 0
        self.pages = u64_array(capacity) if with_pages else ffi.NULL  # page index of each PFN
        self.scan = scan
        self._buf = u64_array(PAGEMAP_CHUNK_WORDS)
        self._next = ffi.new("uint64_t *")
        self.counts = ffi.new("uint64_t[2]")  # entries kept, kept entries with PFN 0

    def _reserve(self, extra):
        if self.capacity - self.size >= extra:
            return
        capacity = max(self.capacity * 2, self.size + extra)
        self.data = _grown(self.data, self.size, capacity)
        if self.pages != ffi.NULL:
            self.pages = _grown(self.pages, self.size, capacity)
        self.capacity = capacity

    def read_pagemap(self, fd: int, first: int, end: int, keep_mask: int, keep_value: int, pfn_mask: int) -> None:
        """Append the PFNs of pages [first, end) whose pagemap entry matches: (entry &
        keep_mask) == keep_value, PFN = entry & pfn_mask (ksm_pagemap_read)."""
        page, sparse = first, self.scan == "always"
        while page < end:
            stop = min(end, page + PAGEMAP_CHUNK_WORDS)
            self._reserve(stop - page)
            out, room = self.data + self.size, self.capacity - self.size
            pages = self.pages + self.size if self.pages != ffi.NULL else ffi.NULL
            # the buffer, what to keep, and where to put it: the same for both readers
            rest = (self._buf, PAGEMAP_CHUNK_WORDS, keep_mask, keep_value, pfn_mask, out, pages, room, self._next)
            if sparse:
                got = lib.ksm_pagemap_read_present(fd, page, stop, lib.ksm_page_size(), *rest, self.counts)
                if got in (-errno.ENOTTY, -errno.EINVAL):  # no PAGEMAP_SCAN (before 6.7)
                    self.scan = "never"
                    sparse = False
                    continue
            else:
                got = lib.ksm_pagemap_read(fd, page, stop, *rest, self.counts)
            self.size += _check(got)
            if self.scan == "auto":
                sparse = got * self.SPARSE_ONE_IN < stop - page
            page = self._next[0]


def sort_pfns(pfns: FFI.CData, count: int) -> FFI.CData:
    """keys[i] = pfn << 32 | position, ascending by PFN (ksm_sort_pfns)."""
    keys, tmp = u64_array(count), u64_array(count)
    _check(lib.ksm_sort_pfns(pfns, count, keys, tmp))
    return keys


def distinct_pfns(keys: FFI.CData, count: int) -> tuple[FFI.CData, int]:
    out = u64_array(count)
    return out, lib.ksm_distinct_pfns(keys, count, out)


def read_pfn_words(fd: int, pfns: FFI.CData, count: int, max_gap: int | None = None) -> FFI.CData:
    """The word of each of `count` ascending distinct PFNs in a file indexed by PFN, reading
    through gaps of at most max_gap (default PFN_READ_GAP) words."""
    max_gap = PFN_READ_GAP if max_gap is None else max_gap
    out, buf = u64_array(count), u64_array(PFN_CHUNK_WORDS)
    _check(lib.ksm_read_pfn_words(fd, pfns, count, max_gap, buf, PFN_CHUNK_WORDS, out))
    return out


def select_pfns(pfns: FFI.CData, words: FFI.CData, count: int, mask: int) -> tuple[FFI.CData, int]:
    out = u64_array(count)
    return out, lib.ksm_select_pfns(pfns, words, count, mask, out)


def attribute(
    keys: FFI.CData, count: int, offsets: list[int], ksm_pfns: FFI.CData, mapcounts: FFI.CData, nksm: int
) -> tuple[FFI.CData, list[dict], dict[tuple[int, int], int], dict]:
    """Who maps which KSM page (ksm_attribute). offsets: n + 1 positions bounding each
    process's PFNs. Returns (entry kinds, per-process dicts, {(a, b): pages} by process
    index, totals dict)."""
    nprocs = len(offsets) - 1
    kinds = ffi.new("uint8_t[]", max(count, 1))
    per_proc = u64_array(nprocs * len(PROC_FIELDS))
    pairs = u64_array(nprocs * nprocs)
    totals = u64_array(len(TOTAL_FIELDS))
    _check(
        lib.ksm_attribute(
            keys,
            count,
            ffi.new("uint64_t[]", offsets),
            nprocs,
            ksm_pfns,
            mapcounts,
            nksm,
            kinds,
            per_proc,
            pairs,
            totals,
        )
    )
    width = len(PROC_FIELDS)
    rows = [_fair_in_pages(dict(zip(PROC_FIELDS, per_proc[p * width : (p + 1) * width]))) for p in range(nprocs)]
    pair_counts = {(a, b): pairs[a * nprocs + b] for a in range(nprocs) for b in range(a + 1, nprocs)}
    return kinds, rows, pair_counts, _fair_in_pages(dict(zip(TOTAL_FIELDS, totals[0 : len(TOTAL_FIELDS)])))


def _fair_in_pages(fields):
    """ "fair" (fixed point in C) as pages: the mappings' fair share of what KSM saves."""
    fields["fair"] /= lib.KSM_FAIR_UNIT
    return fields


def count_kinds(kinds: FFI.CData, offsets: list[int]) -> list[tuple[int, int, int]]:
    """Per range [offsets[r], offsets[r+1]): (KSM pages, shared with another process of the
    set, shared within the process only)."""
    ranges = len(offsets) - 1
    out = u64_array(3 * ranges)
    lib.ksm_count_kinds(kinds, ffi.new("uint64_t[]", offsets), ranges, out)
    return [tuple(out[3 * r : 3 * r + 3]) for r in range(ranges)]


# ---- page contents (ksmpreload.potential): pages read from /proc/<pid>/mem and hashed ------------

READ_CHUNK_PAGES = 64  # pages per pread of /proc/<pid>/mem (256 KiB: docs/BENCHMARKS.md)
KIND_FIELDS = (
    "zero_pages",
    "duplicate_pages",
    "duplicates_across",
    "duplicates_within",
    "ksm_pages",
    "zero_frame_pages",
    "unmerged_pages",
)  # the bits of ksm_group_contents' kinds, in order
CONTENT_FIELDS = (
    "contents",
    "zero_pages",
    "duplicate_pages",
    "duplicate_contents",
    "duplicates_across",
    "duplicates_within",
    "saving_across",
    "saving_within",
)
assert len(KIND_FIELDS) == lib.KSM_KIND_BITS and len(CONTENT_FIELDS) == lib.KSM_CONTENT_FIELDS


def hash_page(data: bytes | bytearray | memoryview) -> int:
    """ksm_hash_page of a bytes-like page: XXH64 (seed 0), 0 for all zero bytes."""
    return lib.ksm_hash_page(ffi.from_buffer(data), len(data))


class PageHashes:
    """Pages of processes as read: the PFN (frames.data), page index (frames.pages) and content
    hash (hashes) of each, in arrays that grow. Pagemap finds the pages (PfnArray), then
    read_hash reads and hashes them."""

    def __init__(self, scan: str = "auto", chunk_pages: int | None = None) -> None:
        self.frames = PfnArray(scan=scan, with_pages=True)
        self.hashes = u64_array(self.frames.capacity)
        self.chunk_pages = chunk_pages or READ_CHUNK_PAGES
        self._buf = ffi.new("unsigned char[]", self.chunk_pages * lib.ksm_page_size())
        self.unreadable = ffi.new("uint64_t[1]")  # pages present but unreadable, dropped
        self.seconds = ffi.new("double[2]")  # reading, hashing

    @property
    def size(self) -> int:
        return self.frames.size

    def truncate(self, size: int) -> None:
        self.frames.size = size

    def read_pagemap(self, fd: int, first: int, end: int, keep_mask: int, keep_value: int, pfn_mask: int) -> None:
        """Append the pages [first, end) that pagemap shows as wanted (PfnArray.read_pagemap)."""
        start = self.frames.size
        self.frames.read_pagemap(fd, first, end, keep_mask, keep_value, pfn_mask)
        if len(self.hashes) < self.frames.capacity:
            self.hashes = _grown(self.hashes, start, self.frames.capacity)

    def read_hash(self, mem_fd: int, start: int) -> None:
        """Read and hash the pages from position `start` on (ksm_read_hash_pages); those that
        cannot be read are dropped. ProcessLookupError when the process is gone."""
        frames = self.frames
        kept = _check(
            lib.ksm_read_hash_pages(
                mem_fd,
                frames.pages + start,
                frames.data + start,
                frames.size - start,
                lib.ksm_page_size(),
                self._buf,
                self.chunk_pages,
                self.hashes + start,
                self.unreadable,
                self.seconds,
            )
        )
        frames.size = start + kept


def sort_hashes(hashes: FFI.CData, count: int) -> FFI.CData:
    """keys[i] = top 32 bits of hashes[i] << 32 | i, sorted by those bits (ksm_sort_hashes)."""
    keys, tmp = u64_array(count), u64_array(count)
    _check(lib.ksm_sort_hashes(hashes, count, keys, tmp))
    return keys


def group_contents(
    keys: FFI.CData, count: int, hashes: FFI.CData, offsets: list[int]
) -> tuple[FFI.CData, dict[str, int]]:
    """Pages grouped by content (ksm_group_contents). offsets: n + 1 positions bounding each
    process's pages. Returns (kinds: a bit per KIND_FIELDS per page, CONTENT_FIELDS totals)."""
    kinds = ffi.new("uint8_t[]", max(count, 1))
    totals = u64_array(len(CONTENT_FIELDS))
    lib.ksm_group_contents(keys, count, hashes, ffi.new("uint64_t[]", offsets), len(offsets) - 1, kinds, totals)
    return kinds, dict(zip(CONTENT_FIELDS, totals[0 : len(CONTENT_FIELDS)]))


def mark_frames(keys: FFI.CData, count: int, flags: FFI.CData, ksm_mask: int, zero_mask: int, kinds: FFI.CData) -> None:
    """Add to kinds what backs each page (ksm_mark_frames): keys from sort_pfns, flags the
    kpageflags word of each distinct PFN."""
    lib.ksm_mark_frames(keys, count, flags, ksm_mask, zero_mask, kinds)


def count_kind_bits(kinds: FFI.CData, offsets: list[int]) -> list[dict[str, int]]:
    """Per range [offsets[r], offsets[r+1]): {KIND_FIELDS name: pages with that bit}."""
    ranges, width = len(offsets) - 1, len(KIND_FIELDS)
    out = u64_array(ranges * width)
    lib.ksm_count_kind_bits(kinds, ffi.new("uint64_t[]", offsets), ranges, out)
    return [dict(zip(KIND_FIELDS, out[r * width : (r + 1) * width])) for r in range(ranges)]


# ---- content-defined chunks (ksmpreload.layout) -------------------------------------------------


RUN_FIELDS = (
    "aligned_gain_bytes",
    "aligned_runs",
    "duplicate_chunk_bytes",
    "in_place_bytes",
    "run_edge_bytes",
    "slab_item_bytes",
)
WHOLE_LAST_PAGE, SLAB_ITEMS = lib.KSM_WHOLE_LAST_PAGE, lib.KSM_SLAB_ITEMS  # an owner's flags
DUPLICATE_FIELDS = ("duplicate_bytes", "duplicate_bytes_across", "duplicate_bytes_within", "zero_bytes")


@dataclass
class ChunkAnalysis:
    """What ksm_chunk_analysis counts of a set of chunks: totals ({RUN_FIELDS and DUPLICATE_FIELDS
    name: value}); per owner (a region), its fair share of the duplicate bytes and the part of it
    at other page offsets, two words an owner; pairs: the bytes of the contents each pair of
    processes both hold, a flat processes x processes matrix."""

    totals: dict[str, int]
    per_owner: list[int]
    pairs: list[int]


def chunk_analysis(
    chunks, count: int, process_of: list[int], processes: int, page: int, min_run: int, owner_flags: list[int]
) -> ChunkAnalysis:
    """Counts chunks[0:count], in the order they were read (ksm_chunk_analysis). process_of[owner]
    numbers the owner's process, 0 to processes - 1; owner_flags[owner]: WHOLE_LAST_PAGE (its
    allocator gives large blocks whole pages), SLAB_ITEMS (memcached's items)."""
    runs, duplicates = u64_array(len(RUN_FIELDS)), u64_array(len(DUPLICATE_FIELDS))
    per_owner, pairs = u64_array(2 * len(process_of)), u64_array(processes**2)
    owners = ffi.new("uint32_t[]", process_of or [0])
    flags = ffi.new("uint8_t[]", owner_flags or [0])
    _check(lib.ksm_chunk_analysis(chunks, count, owners, processes, page, min_run, flags, runs, duplicates,
                                  per_owner, pairs))  # fmt: skip
    totals = {**dict(zip(RUN_FIELDS, runs)), **dict(zip(DUPLICATE_FIELDS, duplicates))}
    return ChunkAnalysis(totals, list(per_owner)[: 2 * len(process_of)], list(pairs)[: processes**2])


class FrameSet:
    """The page frames read so far (ksm_frame_set: 16 bytes a frame at most)."""

    def __init__(self) -> None:
        self._set = ffi.gc(lib.ksm_frame_set_new(), lib.ksm_frame_set_free)
        if self._set == ffi.NULL:
            raise MemoryError("no memory for a frame set")

    def new_pages(self, present: PfnArray) -> list[int]:
        """The page numbers of `present` (a PfnArray with pages) whose frames were not seen
        before; their frames are seen from now on."""
        out = u64_array(present.size)
        kept = _check(lib.ksm_frame_set_filter(self._set, present.data, present.pages, present.size, out))
        return list(out[0:kept])
