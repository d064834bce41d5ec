"""The counters-file parsers (ksmpreload.shimstats, format in docs/COUNTERS.md) either parse
or raise their one plain error, ValueError, whatever the bytes (hypothesis): arbitrary bytes,
every cut and flipped bytes of valid files (built from the format, and a real shim's file),
counts and rings far beyond the file. Valid files built from the format round-trip."""

import os
import struct
import subprocess
import sys
import tracemalloc

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from counters_file import counters_file, slots_bytes, with_u64
from ksmpreload import shimstats

U64 = st.integers(0, 2**64 - 1)
SLOT_NAMES = st.from_regex(r"[a-z_][a-z0-9_]{0,24}", fullmatch=True)
SLOTS = st.dictionaries(SLOT_NAMES, U64, max_size=40)
RECORDS = st.lists(st.tuples(U64, U64, st.integers(0, 7), U64), max_size=24)


# ---- counters files, built from docs/COUNTERS.md (tests/counters_file.py) ----------------------


def expected_stats(slots):
    return {**slots, "strategy": shimstats.STRATEGIES.get(slots.get("strategy"), "unknown")}


def expected_records(entries, written):
    """Record i sits in entry i mod capacity; the last `capacity` are kept; kind 0: being written."""
    capacity = len(entries)
    found = []
    for index in range(max(written - capacity, 0), written):
        start, length, kind, caller = entries[index % capacity]
        if kind:
            found.append(
                {
                    "start": start,
                    "end": start + length,
                    "kind": shimstats.REGION_KINDS.get(kind, "unknown"),
                    "caller": caller or None,
                }
            )
    return found


def parses_or_plain_error(parse, data):
    """parse(data), or None when it raises ValueError; anything else fails the test."""
    try:
        return parse(data)
    except ValueError:
        return None


VALID_LAYOUTS = st.tuples(SLOTS, RECORDS.filter(bool), st.integers(0, 50))
VALID_FILES = VALID_LAYOUTS.map(lambda layout: counters_file(layout[0], layout[1], len(layout[1]) + layout[2]))


@given(SLOTS, RECORDS.filter(bool), st.integers(0, 100))
def test_a_valid_counters_file_round_trips(slots, entries, wraps):
    written = len(entries) + wraps
    data = counters_file(slots, entries, written)
    assert shimstats.parse_stats(data) == expected_stats(slots)
    assert shimstats.parse_regions(data) == expected_records(entries, written)


@given(SLOTS, RECORDS, st.integers(0, 24))
def test_a_ring_not_yet_full_is_read_up_to_written(slots, entries, written):
    """written < capacity: entries past `written` are never read, whatever they hold."""
    written = min(written, len(entries))
    data = counters_file(slots, entries + [(1, 2, 1, 3)] * 8, written)
    assert shimstats.parse_regions(data) == expected_records(entries[:written], written)


@given(SLOTS)
def test_a_file_without_region_records_has_none(slots):
    assert shimstats.parse_regions(counters_file(slots)) == []
    assert shimstats.parse_regions(counters_file(slots) + b"\0" * 7) == []


@given(st.binary(max_size=400))
@example(b"")
@example(shimstats.MAGIC)
@example(shimstats.MAGIC + b"\xff" * 8)
def test_arbitrary_bytes_parse_or_raise_value_error(data):
    for candidate in (data, shimstats.MAGIC + data):
        parses_or_plain_error(shimstats.parse_stats, candidate)
        parses_or_plain_error(shimstats.parse_regions, candidate)


@given(VALID_LAYOUTS, st.data())
def test_every_truncation_is_a_plain_error_or_a_prefix_that_parses(layout, draw):
    """Cut before the end of the names: ValueError; after: the same counters. A ring cut
    anywhere gives no records (or ValueError), never records read past the end."""
    slots, entries, wraps = layout
    data = counters_file(slots, entries, len(entries) + wraps)
    length = draw.draw(st.integers(0, len(data) - 1))
    if length < len(slots_bytes(slots)):
        with pytest.raises(ValueError):
            shimstats.parse_stats(data[:length])
    else:
        assert shimstats.parse_stats(data[:length]) == expected_stats(slots)
    assert parses_or_plain_error(shimstats.parse_regions, data[:length]) in (None, [])


@given(VALID_FILES, st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8))
def test_flipped_bytes_parse_or_raise_value_error(data, flips):
    mutated = bytearray(data)
    for position, value in flips:
        mutated[position % len(mutated)] = value
    parses_or_plain_error(shimstats.parse_stats, bytes(mutated))
    parses_or_plain_error(shimstats.parse_regions, bytes(mutated))


@given(SLOTS, st.integers(0, 2**64 - 1))
@example({"pid": 1}, 2**63)
@example({"pid": 1}, 2**64 - 1)
def test_a_count_of_slots_beyond_the_file_is_a_plain_error(slots, count):
    data = counters_file(slots, [(4096, 4096, 1, 0)])
    data = with_u64(data, 8, max(count, (len(data) - 16) // 8 + 1))
    with pytest.raises(ValueError, match="cut short"):
        shimstats.parse_stats(data)
    with pytest.raises(ValueError, match="cut short"):
        shimstats.parse_regions(data)


def test_an_oversized_count_allocates_nothing_big():
    data = shimstats.MAGIC + struct.pack("<Q", 2**63) + b"pid\0" * 1000
    tracemalloc.start()
    try:
        with pytest.raises(ValueError):
            shimstats.parse_stats(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def with_ring_header(data, capacity, written):
    at = data.index(shimstats.REGIONS_MAGIC) + 8
    return with_u64(with_u64(data, at, capacity), at + 8, written)


@given(SLOTS, RECORDS.filter(bool), st.sampled_from([2**40, 2**63, 2**64 - 1]), U64)
@example({"pid": 1}, [(1, 2, 1, 0)], 2**63, 2**63 + 5)
def test_an_oversized_ring_is_a_plain_error(slots, entries, capacity, written):
    """capacity far beyond the file: the records written must be in it, no loop over the rest."""
    data = with_ring_header(counters_file(slots, entries), capacity, written)
    if written > len(entries):
        with pytest.raises(ValueError, match="cut short"):
            shimstats.parse_regions(data)
    else:
        assert shimstats.parse_regions(data) == expected_records(entries[:written], written)


@pytest.mark.parametrize(
    "capacity, written, expected",
    [
        (0, 0, []),
        (0, 5, []),  # the shim writes the magic before the capacity: no records yet
        (4, 0, []),
        (4, 2, [{"start": 4096, "end": 8192, "kind": "mmap", "caller": None}] * 2),
    ],
)
def test_region_ring_edges(capacity, written, expected):
    data = with_ring_header(counters_file({"pid": 1}, [(4096, 4096, 1, 0)] * 4), capacity, written)
    assert shimstats.parse_regions(data) == expected


@pytest.mark.parametrize("cut", [1, 31, 32, 33])
def test_records_cut_short_are_a_plain_error(cut):
    data = counters_file({"pid": 1}, [(4096, 4096, 1, 0)] * 4)
    with pytest.raises(ValueError, match="cut short"):
        shimstats.parse_regions(data[:-cut])


@pytest.mark.parametrize(
    "names", [b"", b"pid", b"pid\0strat", b"\xff\xfe\0pad\0", b"pid\0a b\0", b"pid\0\0", "pid\0stratégie\0".encode()]
)
def test_slot_names_missing_cut_or_not_identifiers_are_a_plain_error(names):
    data = shimstats.MAGIC + struct.pack("<QQQ", 2, 1, 2) + names
    with pytest.raises(ValueError):
        shimstats.parse_stats(data)
    with pytest.raises(ValueError):
        shimstats.parse_regions(data)


# ---- a real shim's counters file -------------------------------------------------------------

ALLOCATE = "import sys; block = bytearray(8 << 20); print('ready', flush=True); sys.stdin.read()"


@pytest.fixture(scope="module")
def real_counters_file(tmp_path_factory):
    """The bytes of the counters file of a Python process that allocated 8 MiB under the shim."""
    import ksmpreload

    stats_dir = tmp_path_factory.mktemp("stats")
    env = {**os.environ, "LD_PRELOAD": ksmpreload.shim_path(), "KSMPRELOAD_STATS_DIR": str(stats_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-c", ALLOCATE], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline() == "ready\n"
        with open(stats_dir / f"{proc.pid}.stats", "rb") as f:
            return proc.pid, f.read()
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_a_real_counters_file_parses(real_counters_file):
    pid, data = real_counters_file
    stats = shimstats.parse_stats(data)
    assert stats["pid"] == pid and stats["strategy"] in ("prctl", "madvise")
    assert stats["heap_regions"] + stats["mmap_regions"] >= 1
    records = shimstats.parse_regions(data)
    assert records and all(record["end"] > record["start"] for record in records)


def test_every_truncation_of_a_real_file_is_a_plain_error_or_parses(real_counters_file):
    """Every length up to past the last record written (the rest of the ring is zeros, never
    read while the ring is not full)."""
    _, data = real_counters_file
    full_stats, full_records = shimstats.parse_stats(data), shimstats.parse_regions(data)
    ring = data.index(shimstats.REGIONS_MAGIC)
    written = struct.unpack_from("<Q", data, ring + 16)[0]
    records_end = ring + 24 + 32 * written
    for length in list(range(records_end + 64)) + [len(data) - 1]:
        cut = data[:length]
        assert parses_or_plain_error(shimstats.parse_stats, cut) in (None, full_stats), length
        records = parses_or_plain_error(shimstats.parse_regions, cut)
        assert records == full_records if length >= records_end else records in (None, []), length
    assert full_records


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), min_size=1, max_size=6))
def test_flipped_bytes_of_a_real_file_parse_or_raise_value_error(real_counters_file, flips):
    _, data = real_counters_file
    mutated = bytearray(data)
    for position, value in flips:
        mutated[position] = value
    parses_or_plain_error(shimstats.parse_stats, bytes(mutated))
    parses_or_plain_error(shimstats.parse_regions, bytes(mutated))
