"""ksmpreload.kernel: parsers against golden files captured from Linux 6.18 (tests/data,
made by tests/data/capture_golden.py). The same functions on the running kernel are in
tests/integration/test_kernel_live.py."""

import os
import subprocess

import pytest

from conftest import REPO
from ksmpreload import kernel

DATA = os.path.join(REPO, "tests", "data")
GOLDEN_KNOBS = os.path.join(DATA, "sys_kernel_mm_ksm_6.18_merging")
MERGING = "ksm_stat_6.18_prctl_merging.txt"
ZERO_PAGES = "ksm_stat_6.18_prctl_zero_pages.txt"
NOT_INVOLVED = "ksm_stat_6.18_not_involved.txt"
KERNEL_THREAD = "ksm_stat_6.18_kernel_thread.txt"
WITH_PROFIT = (MERGING, ZERO_PAGES, NOT_INVOLVED)


def golden(name):
    with open(os.path.join(DATA, name)) as f:
        return f.read()


def golden_kernel():
    """tests/data/KERNEL: 'release ...' and 'page_size ...' of the machine that captured."""
    return dict(line.split(None, 1) for line in golden("KERNEL").splitlines())


def golden_page_size():
    return int(golden_kernel()["page_size"])


# ---- /proc/<pid>/ksm_stat, golden ----------------------------------------------------------


@pytest.mark.parametrize("name", WITH_PROFIT)
def test_every_ksm_stat_line_becomes_one_field(name):
    text = golden(name)
    fields = kernel.parse_ksm_stat(text)
    assert len(fields) == len(text.splitlines())
    assert all(":" not in key and " " not in key for key in fields)


@pytest.mark.parametrize("name", WITH_PROFIT)
def test_parsed_ksm_stat_satisfies_the_kernels_profit_formula(name):
    """ksm_process_profit = (merging + zero pages) * page size - 64 * rmap_items (6.6+)."""
    stat = kernel.parse_ksm_stat(golden(name))
    saved = stat["ksm_merging_pages"] + stat["ksm_zero_pages"]
    expected = saved * golden_page_size() - kernel.RMAP_ITEM_BYTES * stat["ksm_rmap_items"]
    assert stat["ksm_process_profit"] == expected


def test_colon_lines_become_bools_and_counters_ints():
    merging = kernel.parse_ksm_stat(golden(MERGING))
    idle = kernel.parse_ksm_stat(golden(NOT_INVOLVED))
    assert (merging["ksm_merge_any"], merging["ksm_mergeable"]) == (True, True)
    assert (idle["ksm_merge_any"], idle["ksm_mergeable"]) == (False, False)
    assert all(type(merging[key]) is int for key in merging if not key.startswith("ksm_merge"))


def test_negative_profit_and_unknown_fields_are_kept():
    extra = "ksm_process_profit -48832\nksm_new_counter 7\nksm_new_flag: yes\nksm_new_mode: lazy\n"
    text = golden(MERGING) + extra
    fields = kernel.parse_ksm_stat(text)
    assert fields["ksm_process_profit"] == -48832
    new = (fields["ksm_new_counter"], fields["ksm_new_flag"], fields["ksm_new_mode"])
    assert new == (7, True, "lazy")


def test_kernel_thread_has_empty_ksm_stat():
    assert kernel.parse_ksm_stat(golden(KERNEL_THREAD)) == {}


@pytest.mark.parametrize(
    "name, involved", [(MERGING, True), (ZERO_PAGES, True), (NOT_INVOLVED, False), (KERNEL_THREAD, False)]
)
def test_uses_ksm(name, involved):
    assert kernel.uses_ksm(kernel.parse_ksm_stat(golden(name))) is involved


# ---- /sys/kernel/mm/ksm, golden ------------------------------------------------------------


def test_read_knobs_reads_every_file_as_int_but_advisor_mode():
    knobs = kernel.read_knobs(GOLDEN_KNOBS)
    assert sorted(knobs) == sorted(os.listdir(GOLDEN_KNOBS))
    assert knobs["advisor_mode"] == "none"
    for name, value in knobs.items():
        if name != "advisor_mode":
            assert value == int(golden(os.path.join(GOLDEN_KNOBS, name))), name


@pytest.mark.parametrize("mode", ["none", "scan-time"])
def test_advisor_mode_gives_the_selected_word(mode):
    assert kernel.parse_value(golden(f"advisor_mode_{mode}_6.18.txt")) == mode


def test_pages_saved_explains_general_profit():
    """The golden capture had only two KSM processes, so general_profit must equal
    pages_saved * page size minus 64 bytes per rmap_item of those two."""
    knobs = kernel.read_knobs(GOLDEN_KNOBS)
    stats = [kernel.parse_ksm_stat(golden(name)) for name in (MERGING, ZERO_PAGES)]
    rmap_items = sum(stat["ksm_rmap_items"] for stat in stats)
    expected = kernel.pages_saved(knobs) * golden_page_size() - kernel.RMAP_ITEM_BYTES * rmap_items
    assert knobs["general_profit"] == expected


def test_pages_saved_without_zero_page_counter():
    assert kernel.pages_saved({"pages_sharing": 12, "pages_shared": 3}) == 12


# ---- versions and features -----------------------------------------------------------------


def test_kernel_version_of_the_golden_kernel():
    assert kernel.kernel_version(golden_kernel()["release"]) == (6, 18)


@pytest.mark.parametrize(
    "release, version", [("5.15.0-91-generic", (5, 15)), ("6.8.0-rc3", (6, 8)), ("4.19.325", (4, 19))]
)
def test_kernel_version(release, version):
    assert kernel.kernel_version(release) == version


def test_kernel_version_rejects_garbage():
    with pytest.raises(ValueError):
        kernel.kernel_version("unknown")


@pytest.mark.parametrize("version, supported", [((5, 15), False), ((6, 3), False), ((6, 4), True), ((7, 0), True)])
def test_prctl_merge_supported(version, supported):
    assert kernel.prctl_merge_supported(version) is supported


def test_features_of_6_6():
    features = kernel.kernel_features((6, 6))
    assert features["ksm_zero_pages"] and features["smaps_ksm"]
    assert not features["smart_scan"] and not features["ksm_stat_flags"]


# ---- scan rate -----------------------------------------------------------------------------


@pytest.mark.parametrize("gib, sleep_ms", [(4, 20), (24, 20), (64, 10), (8, 50)])
def test_suggested_scan_rate_gives_a_one_minute_pass(gib, sleep_ms):
    memory = gib << 30
    pages_to_scan = kernel.suggested_pages_to_scan(memory, sleep_ms)
    assert 100 < pages_to_scan < 20000
    seconds = kernel.full_scan_seconds(memory, pages_to_scan, sleep_ms)
    assert 59 <= seconds <= 60


@pytest.mark.parametrize("memory, expected", [(64 << 20, 100), (8 << 40, 20000)])
def test_suggested_scan_rate_is_clamped(memory, expected):
    assert kernel.suggested_pages_to_scan(memory) == expected


def test_suggested_scan_rate_rejects_zero_sleep():
    with pytest.raises(ValueError):
        kernel.suggested_pages_to_scan(1 << 30, 0)


def test_mem_total_matches_psutil():
    psutil = pytest.importorskip("psutil")
    assert kernel.mem_total_bytes() == psutil.virtual_memory().total


def test_page_size_matches_mmap():
    import mmap

    assert kernel.page_size() == mmap.PAGESIZE


# ---- /proc/<pid> on the running kernel -----------------------------------------------------


def test_process_ksm_stat_of_a_gone_process_is_none():
    child = subprocess.Popen(["true"])
    child.wait()
    assert kernel.process_ksm_stat(child.pid) is None


def test_short_cmdline():
    redis = "/usr/bin/redis-server\0--port\0 6380\0"
    assert kernel.short_cmdline(redis, "redis-server") == "redis-server --port  6380"
    assert kernel.short_cmdline("", "kthreadd") == "[kthreadd]"
    long = kernel.short_cmdline("x" * 200 + "\0", "x", limit=40)
    assert len(long) == 40 and long.endswith("…")


def fake_proc(root, name, ksm_stat, comm=None, cmdline=None):
    """A /proc/<pid> directory under `root` holding the given files (None: file absent)."""
    os.makedirs(os.path.join(root, name))
    for file, text in (("ksm_stat", ksm_stat), ("comm", comm), ("cmdline", cmdline)):
        if text is not None:
            with open(os.path.join(root, name, file), "w") as f:
                f.write(text)


def test_ksm_processes_on_a_fake_proc(monkeypatch, tmp_path):
    """Golden ksm_stat files in a fake /proc: involved processes are listed with their fields;
    uninvolved ones, kernel threads and one that vanished before its comm was read are not."""
    root = str(tmp_path)
    fake_proc(root, "100", golden(MERGING), "python3\n", "python3\0app.py\0")
    fake_proc(root, "101", golden(NOT_INVOLVED), "bash\n", "bash\0")
    fake_proc(root, "2", golden(KERNEL_THREAD), "kthreadd\n", "")
    fake_proc(root, "102", golden(ZERO_PAGES))  # gone after its ksm_stat was read
    fake_proc(root, "self", golden(MERGING), "x\n", "x\0")  # not a pid
    monkeypatch.setattr(kernel, "PROC_DIR", root)
    found = kernel.ksm_processes()
    expected = {"pid": 100, "comm": "python3", "cmdline": "python3 app.py", **kernel.parse_ksm_stat(golden(MERGING))}
    assert found == [expected]


# ---- smaps, captured from dup_buffers under `ksm-wrap --strategy madvise` after merging settled


def test_smaps_ksm_lines_add_up_to_the_processes_merging_pages():
    regions = kernel.parse_smaps(golden("smaps_6.18_dup_buffers_madvise.txt"))
    stat = kernel.parse_ksm_stat(golden("ksm_stat_6.18_dup_buffers_madvise.txt"))
    assert sum(region.get("KSM", 0) for region in regions) == stat["ksm_merging_pages"] * 4


def test_smaps_shows_the_heap_kept_in_three_vmas_with_the_middle_marked():
    regions = kernel.parse_smaps(golden("smaps_6.18_dup_buffers_madvise.txt"))
    heap = [region for region in regions if region["path"] == "[heap]"]
    assert [region["mergeable"] for region in heap] == [False, True, False]
    assert heap[2]["end"] - heap[2]["start"] == 4096, "the top page stays unmarked so brk can grow it"
    assert all(region["KSM"] == 0 for region in regions if not region["mergeable"])


def test_smaps_fields_and_coverage():
    regions = kernel.parse_smaps(golden("smaps_6.18_dup_buffers_madvise.txt"))
    program = next(region for region in regions if region["path"].endswith("/dup_buffers"))
    assert program["perms"] == "r--p" and program["Size"] > 0
    marked, unmarked = kernel.mergeable_coverage(regions)
    assert marked > 0 and marked >= 20 * unmarked
