"""Counters files of the shim built byte by byte from docs/COUNTERS.md, for tests."""

import struct

from ksmpreload import shimstats


def slots_bytes(slots):
    """Magic, count, the u64 slots and the NUL-terminated names of {name: value}."""
    names = b"".join(name.encode() + b"\0" for name in slots)
    return shimstats.MAGIC + struct.pack(f"<Q{len(slots)}Q", len(slots), *slots.values()) + names


def counters_file(slots, entries=None, written=None, capacity=None):
    """A counters file: the slots, then (with `entries`) the region ring padded to 8 bytes:
    `entries` [(start, length, kind, caller)] are its first entries, the rest of its
    `capacity` (default: as many as given) zero; `written` defaults to len(entries)."""
    data = slots_bytes(slots)
    if entries is None:
        return data
    capacity = len(entries) if capacity is None else capacity
    written = len(entries) if written is None else written
    ring = b"".join(struct.pack("<4Q", *entry) for entry in entries)
    ring += bytes(32 * capacity - len(ring))
    return data + bytes(-len(data) % 8) + shimstats.REGIONS_MAGIC + struct.pack("<QQ", capacity, written) + ring


def with_u64(data, offset, value):
    """`data` with the u64 at `offset` replaced."""
    changed = bytearray(data)
    struct.pack_into("<Q", changed, offset, value)
    return bytes(changed)
