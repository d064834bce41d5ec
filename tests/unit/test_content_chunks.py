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
    found = native.chunk_analysis(out, size, [0, 1, 2], 3, 4096, 8192, [0] * 3)
    duplicate, across, within, zero = (found.totals[name] for name in native.DUPLICATE_FIELDS)
    per_owner, pairs = found.per_owner, found.pairs
    assert 1.9 * len(data) <= duplicate <= 2 * len(data) and across == duplicate and within == 0
    assert zero == 8192
    # three copies: each owner's fair share is 2/3 of what it holds (owner 1 holds two)
    assert abs(per_owner[0] + per_owner[2] - duplicate) <= 0.001 * duplicate and per_owner[4] == 0
    assert abs(per_owner[2] - 2 * per_owner[0]) <= 0.01 * duplicate
    # of the copies beyond the first, one is at the offset of the others (owner 1's second part)
    assert 0.49 * per_owner[0] <= per_owner[1] <= 0.51 * per_owner[0], "one copy of three is elsewhere"
    assert pairs[0] == pairs[2] == pairs[4] == 0 and pairs[1] == pairs[3]
    assert 0.95 * len(data) <= pairs[1] <= len(data)


def test_copies_in_place_are_told_apart_from_copies_at_other_offsets():
    """Regions 0 (process 0) and 1 (process 1) hold one content at the same page offsets; regions
    2 and 3 (both of process 1) another, 512 bytes apart."""
    data, other = random.Random(5).randbytes(64 << 10), random.Random(6).randbytes(64 << 10)
    out = native.ffi.new("struct ksm_chunk[]", 4096)
    size = 0
    for part, owner in [(data, 0), (data, 1), (other, 2), (random.Random(7).randbytes(512) + other, 3)]:
        size += native.lib.ksm_cdc_chunks(part, len(part), owner, out + size, 4096 - size)
    found = native.chunk_analysis(out, size, [0, 1, 1, 1], 2, 4096, 8192, [0] * 4)
    duplicate, across, within, _ = (found.totals[name] for name in native.DUPLICATE_FIELDS)
    per_owner, pairs = found.per_owner, found.pairs
    assert across == len(data) and 0.95 * len(other) <= within <= len(other)
    half = len(data) // 2
    assert 0.999 * half <= per_owner[0] == per_owner[2] <= half and per_owner[1] == per_owner[3] == 0, "in place"
    assert per_owner[5] == per_owner[4] and per_owner[7] == per_owner[6] > 0.45 * len(other), "at other offsets"
    assert pairs == [0, len(data), len(data), 0]


def analysed(parts, flags=0):
    """chunk_analysis of parts [(bytes, owner)], one process an owner, each with `flags`."""
    out = native.ffi.new("struct ksm_chunk[]", 8192)
    size = 0
    for part, owner in parts:
        size += native.lib.ksm_cdc_chunks(part, len(part), owner, out + size, 8192 - size)
    owners = max(owner for _, owner in parts) + 1
    return native.chunk_analysis(out, size, list(range(owners)), owners, 4096, 8192, [flags] * owners)


def test_aligning_blocks_at_other_offsets_adds_their_pages_and_blocks_in_place_add_nothing():
    """Two owners hold the same 40 blocks of 20,000 bytes between other bytes: at other page
    offsets, each run of duplicates is taken for a block of its length plus the edge estimate,
    whose 4 whole pages (5 with the last, partial one) count once aligned; in place, nothing."""
    rng = random.Random(8)
    blocks = [rng.randbytes(20000) for _ in range(40)]

    def holder(shift):
        noise = random.Random(shift)
        return b"".join(noise.randbytes(3000 + shift) + block for block in blocks)

    elsewhere = analysed([(holder(0), 0), (holder(1000), 1)])
    totals = elsewhere.totals
    assert (
        1000 <= totals["run_edge_bytes"] <= 3000 and totals["in_place_bytes"] < 0.05 * totals["duplicate_chunk_bytes"]
    )
    pages = totals["aligned_gain_bytes"] / 4096  # an estimate: a few runs reach a fifth whole page
    assert totals["aligned_runs"] == 80 and 80 * 4 <= pages <= 1.1 * 80 * 4, pages
    with_last = analysed([(holder(0), 0), (holder(1000), 1)], native.WHOLE_LAST_PAGE).totals["aligned_gain_bytes"]
    assert 80 * 5 <= with_last / 4096 <= 1.1 * 80 * 5, with_last / 4096
    in_place = analysed([(holder(0), 0), (holder(0), 1)]).totals
    assert in_place["aligned_gain_bytes"] == 0 and in_place["in_place_bytes"] == in_place["duplicate_chunk_bytes"] > 0
    assert totals["slab_item_bytes"] == 0, "counted for memcached's items only"
    # as memcached items in slab classes of whole pages: all pages but the first, the last one too
    slabs = analysed([(holder(0), 0), (holder(1000), 1)], native.SLAB_ITEMS).totals["slab_item_bytes"] / 4096
    assert 80 * 4 <= slabs <= 1.1 * 80 * 4, slabs


def test_a_third_copy_elsewhere_adds_one_copy_of_pages_not_three():
    """Two owners hold the blocks at the same offsets (as-is, their pages can be equal), a third at
    other offsets: aligning adds the third copy's pages only."""
    rng = random.Random(9)
    blocks = [rng.randbytes(20000) for _ in range(40)]

    def holder(shift):
        noise = random.Random(shift)
        return b"".join(noise.randbytes(3000 + shift) + block for block in blocks)

    found = analysed([(holder(0), 0), (holder(0), 1), (holder(1000), 2)]).totals
    extra_copies = found["duplicate_bytes"] / found["duplicate_chunk_bytes"]
    pages = found["aligned_gain_bytes"] * extra_copies / 4096
    assert 40 * 4 <= pages <= 1.1 * 40 * 4, pages


def test_every_pair_of_many_processes_is_counted():
    data = random.Random(10).randbytes(4096)
    found = analysed([(data, owner) for owner in range(70)])
    pairs = [found.pairs[a * 70 + b] for a in range(70) for b in range(70) if a != b]
    assert min(pairs) == max(pairs) >= 0.9 * len(data)
