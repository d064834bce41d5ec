"""The C helper's content-defined chunks (ksm_cdc_chunks, ksmpreload/layout.py): equal data
gives equal chunks wherever it starts; zeros hash to 0. No root, no KSM."""

import random

from ksmpreload import native


def chunks(data, owner=0):
    cap = len(data) // native.lib.KSM_CDC_MIN + 1
    out = native.ffi.new("struct ksm_chunk[]", cap)
    count = native.lib.ksm_cdc_chunks(data, len(data), owner, out, cap)
    return [(out[i].hash, out[i].length) for i in range(count)]


def test_chunks_cover_the_data_at_about_a_kibibyte_each():
    data = random.Random(1).randbytes(1 << 20)
    found = chunks(data)
    assert sum(length for _, length in found) == len(data)
    assert 600 < len(found) < 1500 and all(256 <= length <= 8192 for _, length in found[:-1])


def test_equal_data_at_another_offset_gives_the_same_chunks():
    data = random.Random(2).randbytes(256 << 10)
    plain = {digest for digest, _ in chunks(data)}
    for shift in (1, 7, 33, 4095):
        moved = {digest for digest, _ in chunks(random.Random(shift).randbytes(shift) + data)}
        assert len(plain & moved) >= 0.95 * len(plain), shift


def test_zero_bytes_hash_to_zero_and_nothing_else_does():
    found = chunks(bytes(64 << 10) + random.Random(3).randbytes(64 << 10))
    assert found[0][0] == 0 and sum(1 for digest, _ in found if digest == 0) >= 7
    assert all(digest for digest, _ in found[-50:])


def test_duplicates_are_counted_once_per_extra_copy_across_and_within():
    data = random.Random(4).randbytes(64 << 10)
    parts = [(data, 0), (random.Random(9).randbytes(100) + data, 1), (data, 1), (bytes(8192), 2)]
    out = native.ffi.new("struct ksm_chunk[]", 4096)
    size = 0
    for part, owner in parts:
        size += native.lib.ksm_cdc_chunks(part, len(part), owner, out + size, 4096 - size)
    totals = native.ffi.new("uint64_t[4]")
    native.lib.ksm_chunk_duplicates(out, size, totals)
    duplicate, across, within, zero = totals[0:4]
    assert 1.9 * len(data) <= duplicate <= 2 * len(data) and across == duplicate and within == 0
    assert zero == 8192
