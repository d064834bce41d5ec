"""The governor's policy (governor.decide and its Tracker), from samples made up here: the rate
rises for memory ksmd has not looked at, falls once full scans stop gaining, and stays under
the CPU cap."""

import pytest

from ksmpreload.governor import (
    CAP_MARGIN,
    DEFAULT_PAGE_COST,
    MIN_PAGES_PER_SECOND,
    Sample,
    Settings,
    Tracker,
    decide,
    knob_values,
)

SETTINGS = Settings(max_cpu=10, target_seconds=60, settled_seconds=1200)


def sample(t, full_scans=0, saved=0, rmap_items=0, anonymous=100_000, cpu=0.0, scanned=0):
    return Sample(t, 1, full_scans, scanned, saved, rmap_items, anonymous, 1 if anonymous else 0, cpu)


def tracked(*samples):
    tracker = Tracker()
    for each in samples:
        tracker.update(each)
    return tracker


def test_memory_not_looked_at_yet_is_caught_up_in_the_target_time():
    now = sample(1, rmap_items=0)
    decision = decide(now, tracked(sample(0), now), SETTINGS)
    assert decision.mode == "catch-up" and decision.pages_per_second == pytest.approx(100_000 / 60, rel=0.01)
    assert "not looked at yet" in decision.reasons[0]


def test_full_scans_that_stop_gaining_slow_it_to_a_trickle():
    samples = [sample(t, full_scans=t, saved=50_000, rmap_items=100_000) for t in range(4)]  # one scan merged all
    decision = decide(samples[-1], tracked(sample(-1, saved=0, rmap_items=100_000), *samples), SETTINGS)
    assert decision.mode == "settled"
    assert decision.pages_per_second == pytest.approx(100_000 / 1200, rel=0.01)


def test_new_memory_gets_full_scans_to_merge_before_it_settles():
    """Settled, then a process arrives: the pass that takes its checksums cannot merge it, so it
    takes two more full scans, neither merging, to settle again."""
    settled = [sample(t, full_scans=t, saved=50_000, rmap_items=100_000) for t in range(4)]
    arrival = sample(4, full_scans=3, saved=50_000, rmap_items=100_000, anonymous=200_000)
    tracker = tracked(*settled, arrival)
    for t in (5, 6):  # the checksum pass, then one pass that merged nothing
        scan = sample(t, full_scans=t - 1, saved=50_000, rmap_items=200_000, anonymous=200_000)
        tracker.update(scan)
        assert decide(scan, tracker, SETTINGS).mode == "catch-up"
    last = sample(7, full_scans=6, saved=50_000, rmap_items=200_000, anonymous=200_000)
    tracker.update(last)
    assert decide(last, tracker, SETTINGS).mode == "settled"


def test_memory_taken_up_between_two_ticks_still_gets_its_merging_pass():
    """ksmd can checksum a whole new process between two ticks, so no tick sees it unseen: the
    growth of its rmap items clears the gains as well."""
    settled = [sample(t, full_scans=t, saved=50_000, rmap_items=100_000) for t in range(4)]
    checksummed = sample(4, full_scans=4, saved=50_000, rmap_items=200_000, anonymous=200_000)
    tracker = tracked(*settled, checksummed)
    assert decide(checksummed, tracker, SETTINGS).mode == "catch-up"


def test_slow_growth_while_settled_adds_up_to_new_memory():
    """Settled, a process (madvise: ksmd's rmap items are all the governor sees of it) grows by
    0.2% a tick, under the flutter of one tick; by the third tick it is more than that since the
    last full scan ended."""
    settled = [sample(t, full_scans=t, saved=50_000, rmap_items=1_000_000, anonymous=1_000_000) for t in range(4)]
    tracker = tracked(*settled)
    for t, mode in ((4, "settled"), (5, "settled"), (6, "catch-up")):
        grown = 1_000_000 + 2_000 * (t - 3)
        now = sample(t, full_scans=3, saved=50_000, rmap_items=grown, anonymous=grown)
        tracker.update(now)
        assert decide(now, tracker, SETTINGS).mode == mode, t


def test_a_full_scan_that_still_merges_keeps_it_fast():
    samples = [sample(t, full_scans=t, saved=10_000 * t, rmap_items=100_000) for t in range(4)]
    decision = decide(samples[-1], tracked(*samples), SETTINGS)
    assert decision.mode == "catch-up" and "merged 10000 pages" in decision.reasons[0]


def test_no_process_using_ksm_scans_at_the_minimum():
    now = sample(1, anonymous=0)
    decision = decide(now, tracked(sample(0, anonymous=0), now), SETTINGS)
    assert decision.mode == "nothing" and decision.pages_per_second == MIN_PAGES_PER_SECOND


def test_the_cpu_cap_bounds_the_rate_by_the_measured_cost_of_a_page():
    # 1 s of ksmd CPU for 100,000 pages scanned: 10 us a page, so 10% of a core is 10,000 pages/s
    before, now = sample(0, anonymous=10_000_000), sample(1, anonymous=10_000_000, cpu=1.0, scanned=100_000)
    tracker = tracked(before, now)
    decision = decide(now, tracker, SETTINGS)
    assert tracker.cpu_share == pytest.approx(1.0) and tracker.page_cost == pytest.approx(1e-5)
    assert decision.pages_per_second == pytest.approx(CAP_MARGIN * 10_000)
    assert any("capped" in reason for reason in decision.reasons)


def test_until_ksmd_is_measured_the_default_cost_bounds_the_rate():
    before, now = sample(0, anonymous=100_000_000), sample(1, anonymous=100_000_000, cpu=0.01, scanned=500)
    tracker = tracked(before, now)
    assert tracker.page_cost == DEFAULT_PAGE_COST, "10 ms for 500 pages is too little to tell"
    decision = decide(now, tracker, SETTINGS)
    assert decision.pages_per_second == pytest.approx(CAP_MARGIN * 0.1 / DEFAULT_PAGE_COST)


@pytest.mark.parametrize("rate", [MIN_PAGES_PER_SECOND, 333, 1_666.7, 102_900])
def test_knob_values_scan_about_the_rate(rate):
    pages, sleep = knob_values(rate)
    assert pages >= 1 and 10 <= sleep <= 2000
    assert pages * 1000 / sleep == pytest.approx(rate, rel=0.15)


def test_without_pages_scanned_the_cost_comes_from_the_rate_set():
    """Before 6.7 there is no pages_scanned: ksmd's CPU over the rate it was set to."""
    before = Sample(0, 1, 0, None, 0, 0, 10_000_000, 1, 0.0, rate=10_000.0)
    now = Sample(1, 1, 0, None, 0, 0, 10_000_000, 1, 0.1, rate=10_000.0)
    tracker = tracked(before, now)
    assert tracker.cpu_share == pytest.approx(0.1) and tracker.page_cost == pytest.approx(1e-5)


def test_over_the_cap_for_a_whole_window_at_one_rate_cuts_in_proportion():
    """Ten ticks at 5,000 pages/s with ksmd at 20% of a core (a 10% cap): half of it, less the
    margin. The cut needs the whole window at that rate, so it is not compounded tick by tick."""
    samples = [Sample(t, 1, 0, 5_000 * t, 0, 0, 10_000_000, 1, 0.2 * t, rate=5_000.0) for t in range(11)]
    tracker = tracked(*samples)
    assert tracker.steady_at(5_000.0) and tracker.cpu_share == pytest.approx(0.2)
    assert decide(samples[-1], tracker, SETTINGS).pages_per_second == pytest.approx(5_000 * CAP_MARGIN * 0.1 / 0.2)
    tracker.update(Sample(11, 1, 0, 55_000, 0, 0, 10_000_000, 1, 2.2, rate=2_000.0))
    assert not tracker.steady_at(2_000.0), "a new rate: its window starts again"
