"""--unmark-idle's choice (idle.IdleUnmarker), from made-up ksm_stat entries: a process is
unmarked once KSM has merged (next to) nothing in it for the idle time and IDLE_SCANS full
scans since it last merged or grew, only where ksmpreload turned its merging on (an attach
record, or the shim with whole-process merging), one a tick, and a refusal is said and tried
again after another idle period."""

import pytest

from ksmpreload import attach, attached, idle, shimstats
from ksmpreload.errors import KsmError


@pytest.fixture(autouse=True)
def made_up_processes(monkeypatch):
    """Start times, attach records and the shim as the tests say, not as this machine has them."""
    world = {"starts": {}, "records": {}, "shim": {100: "prctl", 101: "prctl"}}
    monkeypatch.setattr(attached, "started", lambda pid: world["starts"].get(pid, 1.0))
    monkeypatch.setattr(attached, "read", lambda pid: world["records"].get(pid))
    monkeypatch.setattr(shimstats, "published_strategy", lambda pid: world["shim"].get(pid))
    return world


def process(pid=100, rmap=10_000, merged=0, merge_any=True):
    return {"pid": pid, "comm": "stress-ng", "ksm_rmap_items": rmap, "ksm_merging_pages": merged,
            "ksm_zero_pages": 0, "ksm_merge_any": merge_any}  # fmt: skip


def detached(pid, previous=True, regions=0, failed=0):
    return attach.Attached(pid, False, "madvise" if regions else "prctl", previous, regions, 0, failed, 0, False)


def unmarker(turned_off, idle_seconds=60, fail=None):
    def turn_off(pid):
        if fail:
            raise fail
        turned_off.append(pid)
        return detached(pid)

    return idle.IdleUnmarker(idle_seconds, turn_off)


def ticks(watcher, processes, times):
    """Ticks at each time, one full scan a second; what was done."""
    return [result for t in times for result in watcher.tick(processes, full_scans=t, now=t)]


def test_unmarked_after_the_idle_time_and_the_full_scans_and_only_once():
    off = []
    watcher = unmarker(off)
    assert watcher.tick([process()], full_scans=10, now=0) == []
    assert watcher.tick([process()], full_scans=20, now=59) == [], "not yet idle for 60 s"
    assert watcher.tick([process()], full_scans=12, now=100) == [], "only 2 full scans since"
    done = watcher.tick([process()], full_scans=13, now=100)
    assert off == [100] and done[0]["unmarked"] and done[0]["idle_seconds"] == 100 and done[0]["full_scans"] == 3
    assert watcher.tick([process()], full_scans=30, now=500) == [] and off == [100]
    assert watcher.results == done and watcher.unmarked == 1


def test_a_process_whose_pages_merge_is_never_idle():
    off = []
    ticks(unmarker(off), [process(merged=5_000)], range(0, 1000, 10))
    assert off == []


def test_a_few_merged_pages_are_tolerated_and_merging_restarts_the_clock():
    off = []
    watcher = unmarker(off)
    watcher.tick([process(rmap=1_000_000, merged=900)], full_scans=0, now=0)  # under one in 1000
    watcher.tick([process(rmap=1_000_000, merged=5_000)], full_scans=5, now=50)  # merging: from here again
    watcher.tick([process(rmap=1_000_000, merged=900)], full_scans=10, now=100)
    assert off == []
    watcher.tick([process(rmap=1_000_000, merged=900)], full_scans=10, now=120)
    assert off == [100]


def test_growth_restarts_the_clock():
    """New memory ksmd has only taken checksums of yet has not had its chance to merge."""
    off = []
    watcher = unmarker(off)
    watcher.tick([process(rmap=10_000)], full_scans=0, now=0)
    watcher.tick([process(rmap=50_000)], full_scans=5, now=59)
    watcher.tick([process(rmap=50_000)], full_scans=10, now=100)
    assert off == []
    watcher.tick([process(rmap=50_000)], full_scans=10, now=119)
    assert off == [100]


def test_merging_ksmpreload_did_not_turn_on_is_left_alone(made_up_processes):
    """Its own prctl, its own madvise, a shim that only observes or took madvise (a service's
    MemoryKSM under `doctor --as-is`), and init."""
    off = []
    made_up_processes["shim"].update({202: "observe", 203: "madvise"})
    made_up_processes["records"][1] = {"strategy": "prctl"}
    others = [process(pid=200), process(pid=201, merge_any=False), process(pid=202), process(pid=203), process(pid=1)]
    ticks(unmarker(off), others, (0, 100, 200))
    assert off == []


def test_before_the_kernel_shows_merge_any_the_shims_word_is_enough():
    off = []
    before_6_14 = {key: value for key, value in process().items() if key != "ksm_merge_any"}
    ticks(unmarker(off), [before_6_14], (0, 100))
    assert off == [100]


def test_an_attach_record_makes_it_ours_and_starts_the_clock(made_up_processes):
    """A process watched for long under its own madvise, then attached: not unmarked at once."""
    off = []
    watcher = unmarker(off)
    ticks(watcher, [process(pid=300, merge_any=False)], (0, 100, 200))
    made_up_processes["records"][300] = {"strategy": "madvise"}
    ticks(watcher, [process(pid=300, merge_any=False)], (201,))
    assert off == []
    ticks(watcher, [process(pid=300, merge_any=False)], (300,))
    assert off == [300]


def test_one_a_tick():
    off = []
    watcher = unmarker(off)
    both = [process(pid=100), process(pid=101)]
    ticks(watcher, both, (0, 100))
    assert off == [100]
    ticks(watcher, both, (101,))
    assert off == [100, 101]


@pytest.mark.parametrize(
    "failure", [KsmError("100 is traced already (by 7)"), ProcessLookupError(3, "No such process")]
)
def test_a_refusal_is_said_and_tried_again_after_twice_the_idle_time(failure):
    watcher = unmarker([], fail=failure)
    done = ticks(watcher, [process()], (0, 60))
    assert len(done) == 1 and not done[0]["unmarked"] and done[0]["why"] and watcher.unmarked == 0
    assert ticks(watcher, [process()], (179,)) == []
    assert len(ticks(watcher, [process()], (180, 181))) == 1, "tried again after 120 s"
    assert ticks(watcher, [process()], (419,)) == [] and len(ticks(watcher, [process()], (420,))) == 1, "then 240 s"


def test_attached_again_after_an_unmark_it_is_watched_again(made_up_processes):
    off = []
    watcher = unmarker(off)
    ticks(watcher, [process()], (0, 100))
    assert off == [100]
    ticks(watcher, [process(merge_any=False)], (150,))  # merging off, as the unmark left it
    made_up_processes["records"][100] = {"strategy": "prctl"}  # ksmpreload attach 100
    ticks(watcher, [process()], (200, 300))
    assert off == [100, 100]


def test_a_madvise_detach_whose_every_region_was_refused_is_not_counted():
    watcher = idle.IdleUnmarker(60, lambda pid: detached(pid, regions=3, failed=3))
    done = ticks(watcher, [process()], (0, 100))
    assert not done[0]["unmarked"] and watcher.unmarked == 0


def test_merging_found_off_already_is_not_counted():
    watcher = idle.IdleUnmarker(60, lambda pid: detached(pid, previous=False))
    done = ticks(watcher, [process()], (0, 100))
    assert not done[0]["unmarked"] and watcher.unmarked == 0


def test_without_the_kernels_per_process_merged_count_nothing_is_idle():
    off = []
    before_6_4 = {key: value for key, value in process().items() if key != "ksm_merging_pages"}
    ticks(unmarker(off), [before_6_4], range(0, 1000, 100))
    assert off == []


def test_a_reused_pid_starts_over(made_up_processes):
    off = []
    watcher = unmarker(off)
    watcher.tick([process()], full_scans=0, now=0)
    made_up_processes["starts"][100] = 2.0  # the process exited and another took its pid
    watcher.tick([process()], full_scans=5, now=100)
    assert off == []
    watcher.tick([process()], full_scans=10, now=200)
    assert off == [100]


def test_the_unmark_runs_in_a_child_and_its_refusal_comes_back_as_one_error():
    with pytest.raises(KsmError, match="no process 999999999"):
        idle._turn_off(999_999_999)
