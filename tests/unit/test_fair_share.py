"""The C helper's fair shares (native.attribute) on made-up page frames: a KSM page mapped c
times credits (c - 1)/c to each mapping, whoever maps it."""

import pytest

from ksmpreload import native


def attribute(frames_by_process, ksm_mapcounts):
    """native.attribute over processes' frame lists; ksm_mapcounts: {KSM frame: kpagecount}."""
    frames = [frame for process in frames_by_process for frame in process]
    offsets, position = [], 0
    for process in frames_by_process:
        offsets.append(position)
        position += len(process)
    offsets.append(position)
    pfns = native.ffi.new("uint64_t[]", frames)
    keys = native.sort_pfns(pfns, len(frames))
    ksm = sorted(ksm_mapcounts)
    ksm_pfns = native.ffi.new("uint64_t[]", ksm)
    counts = native.ffi.new("uint64_t[]", [ksm_mapcounts[frame] for frame in ksm])
    _, rows, _, totals = native.attribute(keys, len(frames), offsets, ksm_pfns, counts, len(ksm))
    return [row["fair"] for row in rows], totals["fair"]


def test_shares_of_pages_mapped_two_and_three_times():
    # frame 10: A, B, C; frame 11: A, B; frame 12: C twice; frame 13: not KSM
    shares, total = attribute([[10, 11, 13], [10, 11], [10, 12, 12]], {10: 3, 11: 2, 12: 2})
    assert shares == pytest.approx([2 / 3 + 1 / 2, 2 / 3 + 1 / 2, 2 / 3 + 1], abs=1e-5)
    assert total == pytest.approx(2 + 1 + 1, abs=1e-5)


def test_mappings_outside_the_set_keep_their_share():
    # frame 20 is mapped 4 times in all, once by each of A and B: they get 3/4 each
    shares, total = attribute([[20], [20]], {20: 4})
    assert shares == pytest.approx([0.75, 0.75], abs=1e-5) and total == pytest.approx(1.5, abs=1e-5)


def test_a_stale_count_below_the_mappings_read_counts_the_mappings():
    # kpagecount read after a process unmapped the page: 1, while the set was seen mapping it twice
    shares, _ = attribute([[30], [30]], {30: 1})
    assert shares == pytest.approx([0.5, 0.5], abs=1e-5)


def test_a_ksm_page_mapped_once_saves_nothing():
    shares, total = attribute([[40]], {40: 1})
    assert shares == [0.0] and total == 0.0
