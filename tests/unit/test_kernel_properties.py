"""The parsers of /proc/<pid>/ksm_stat, smaps and maps (ksmpreload.kernel) never raise,
whatever the text (hypothesis): garbage, truncated and corrupted lines, non-numeric fields,
numbers too long for 64 bits are skipped, and what they return has the types its readers
use. Mutations start from the golden captures in tests/data."""

import mmap
import os
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conftest import REPO
from ksmpreload import kernel, shimstats

DATA = os.path.join(REPO, "tests", "data")
KSM_STAT_COUNTERS = ("ksm_rmap_items", "ksm_zero_pages", "ksm_merging_pages", "ksm_process_profit")
KSM_STAT_FLAGS = ("ksm_merge_any", "ksm_mergeable")


def golden(name):
    with open(os.path.join(DATA, name)) as f:
        return f.read()


# ---- /proc/<pid>/ksm_stat --------------------------------------------------------------------


def assert_ksm_stat_types(fields):
    assert all(type(fields[name]) is int for name in KSM_STAT_COUNTERS if name in fields), fields
    assert all(type(fields[name]) is bool for name in KSM_STAT_FLAGS if name in fields), fields
    assert isinstance(kernel.uses_ksm(fields), bool)


@given(st.text())
@example("ksm_merging_pages abc\nksm_merge_any: maybe\nksm_rmap_items\n: 5\n")
@example("ksm_process_profit " + "9" * 5000)
def test_any_ksm_stat_text_parses_with_typed_known_fields(text):
    assert_ksm_stat_types(kernel.parse_ksm_stat(text))


@pytest.mark.parametrize(
    "name",
    ["ksm_stat_6.18_prctl_merging.txt", "ksm_stat_6.18_not_involved.txt", "ksm_stat_6.18_dup_buffers_madvise.txt"],
)
def test_every_truncation_of_a_golden_ksm_stat_parses(name):
    text = golden(name)
    full = kernel.parse_ksm_stat(text)
    for length in range(len(text) + 1):
        fields = kernel.parse_ksm_stat(text[:length])
        assert_ksm_stat_types(fields)
        complete_lines = text[:length].count("\n")
        assert list(fields)[:complete_lines] == list(full)[:complete_lines]


@given(st.text(max_size=40), st.integers(0, 10))
def test_a_garbage_line_in_ksm_stat_leaves_the_others(garbage, where):
    lines = golden("ksm_stat_6.18_prctl_merging.txt").splitlines()
    full = kernel.parse_ksm_stat("\n".join(lines))
    fields = kernel.parse_ksm_stat("\n".join(lines[:where] + [garbage] + lines[where:]))
    assert_ksm_stat_types(fields)
    overridden = kernel.parse_ksm_stat(garbage)
    assert all(fields[key] == value for key, value in full.items() if key not in overridden)


# ---- /proc/<pid>/smaps and maps --------------------------------------------------------------


def assert_well_formed(regions, smaps=True):
    """VMAs as their readers use them: an address range, 4 perms, a path; from smaps also
    the mergeable flag and fields in KiB."""
    for region in regions:
        assert type(region["start"]) is int and type(region["end"]) is int
        assert 0 <= region["start"] < region["end"] < 2**64
        assert len(region["perms"]) == 4 and isinstance(region["path"], str)
        assert isinstance(region["mergeable"], bool) if smaps else len(region) == 4
        assert all(
            type(value) is int
            for key, value in region.items()
            if key not in ("start", "end", "perms", "path", "mergeable")
        ), region
        kernel.can_hold_ksm_pages(region)
    if smaps:
        kernel.mergeable_coverage(regions)


SMAPS_LINES = st.sampled_from(
    [
        "7f0000000000-7f0000001000 rw-p 00000000 00:00 0 ",
        "7f0000001000-7f0000000000 rw-p 00000000 00:00 0",
        "fffffffffffffffffffff-ffffffffffffffffffffff rw-p 00000000 00:00 0",
        "Rss:  12 kB",
        "Rss: x kB",
        "Rss: " + "9" * 5000 + " kB",
        "VmFlags: rd wr mg",
        "VmFlags:",
        " kB",
        ":: kB",
        "KSM: -1 kB",
        "55d0c0000000-55d0c0021000 r--p 00000000 08:01 1234 /usr/bin/x (deleted)",
        "Anonymous: 8 kB",
    ]
) | st.text(max_size=60)


@given(st.lists(SMAPS_LINES, max_size=30))
def test_any_smaps_text_gives_well_formed_regions(lines):
    assert_well_formed(kernel.parse_smaps("\n".join(lines)))


@given(st.text())
def test_arbitrary_text_gives_well_formed_regions(text):
    assert_well_formed(kernel.parse_smaps(text))


SMAPS = "smaps_6.18_dup_buffers_madvise.txt"
HEADER = re.compile(r"[0-9a-f]+-[0-9a-f]+ ")


@settings(max_examples=200)
@given(st.data())
def test_a_truncated_golden_smaps_keeps_the_vmas_before_the_cut(draw):
    text = golden(SMAPS)
    full = kernel.parse_smaps(text)
    prefix = text[: draw.draw(st.integers(0, len(text)))]
    regions = kernel.parse_smaps(prefix)
    assert_well_formed(regions)
    complete_headers = sum(1 for line in prefix.split("\n")[:-1] if HEADER.match(line))
    assert len(regions) in (complete_headers, complete_headers + 1)  # the last header may be cut
    assert [r["start"] for r in regions] == [r["start"] for r in full[: len(regions)]]


@given(st.integers(0, 10**6), st.text(max_size=50))
def test_a_corrupted_line_of_a_golden_smaps_spoils_at_most_its_vma(where, garbage):
    """A header lost or a field line garbled: that VMA may be lost or wrong, every other one
    is parsed as in the intact file (its fields are not overwritten by the lost VMA's)."""
    full = kernel.parse_smaps(golden(SMAPS))
    lines = golden(SMAPS).split("\n")
    where %= len(lines)
    regions = kernel.parse_smaps("\n".join(lines[:where] + [garbage] + lines[where + 1 :]))
    assert_well_formed(regions)
    assert sum(region in full for region in regions) >= len(full) - 1


def test_maps_of_a_process_mapping_a_file_whose_name_is_not_utf8(tmp_path):
    """A path in /proc/<pid>/maps is bytes: a name that is not UTF-8 is read, not fatal."""
    path = os.path.join(os.fsencode(tmp_path), b"\xff\xfe.bin")
    with open(path, "wb") as f:
        f.write(b"x" * 4096)
    for name in (f"{os.getpid()}.stats", "\u00b2\u00b3.stats"):  # not mapped; not a pid
        (tmp_path / name).write_bytes(b"KSMPRLD1")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ):
        regions = kernel.process_maps(os.getpid())
        assert shimstats.read_process_stats(os.getpid(), str(tmp_path)) is None
        assert shimstats.all_process_stats(str(tmp_path)) == {}
    assert_well_formed(regions, smaps=False)
    assert any(region["path"].endswith(".bin") for region in regions)


@given(st.text())
def test_any_sysfs_or_procfs_value_parses(text):
    value = kernel.parse_value(text)
    assert isinstance(value, (int, str, bool))
