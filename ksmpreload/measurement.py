"""One measurement of a set of processes while KSM merges them: `ksmpreload compare` runs it on
every arm, the workloads (ksmpreload.workloads) on every run.

follow() samples the set every SAMPLE_SECONDS: [seconds, summed ksm_merging_pages, pages
saved (saving.py)], until merging settles: the merged pages have not moved by more than 64
pages or 0.5% (scanning.ignoring_flutter) for 9 full scans (scanning.wait_until_settled), and
have not moved either after a prune of the stable node chains; or until the timeout. When
none of the set's memory is mergeable it takes one sample: ksmd has nothing to scan, and full
scans may not advance.

measure() then reads each process and the set:
- saved, padding, net saved, rmap items: saving.py (the one definition);
- resident: RSS (a merged page counts in every process that maps it), and saved as % of it;
- seconds to 90%: when the saving first reached 90% of its last sampled value;
- with potential: the duplicate potential left (potential.py): pages with equal contents, of
  which those that are not all zeros, and the all-zero pages.

Page frames are read, so this needs root.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import psutil

from . import kernel, scanning, saving
from .processes import merged_pages

SAMPLE_SECONDS = 0.5


@dataclass
class ProcessMeasurement:
    pid: int
    comm: str
    rss_bytes: int
    merged_pages: int
    zero_pages: int
    rmap_items: int
    saved_bytes: int
    padding_bytes: int
    net_saved_bytes: int
    shim: bool
    data_bytes: int | None = None  # what the workload says it loaded into this process


@dataclass
class Measurement:
    processes: int = 0
    resident_bytes: int = 0
    merged_pages: int = 0
    zero_pages: int = 0
    saved_bytes: int = 0
    saved_percent: float = 0.0  # of resident_bytes
    padding_bytes: int = 0
    net_saved_bytes: int = 0
    rmap_items: int = 0
    seconds_to_90: float | None = None
    settle_seconds: float | None = None
    settled: bool = False  # merging settled before the timeout
    mergeable: bool = False  # some of the set's memory is marked mergeable
    samples: list = field(default_factory=list)  # [seconds, merged pages, pages saved]
    per_process: list = field(default_factory=list)  # ProcessMeasurement
    potential_bytes: int | None = None
    nonzero_potential_bytes: int | None = None
    zero_bytes: int | None = None
    vanished: list = field(default_factory=list)  # pids given that had ended when measured


def mergeable(pids: Iterable[int]) -> bool:
    """Some of the processes' memory sits in VMAs marked mergeable (smaps VmFlags mg)."""
    return any(kernel.mergeable_coverage(kernel.process_regions(pid) or [])[0] for pid in pids)


def follow(
    pids: Callable[[], list[int]],
    started: float,
    timeout: float,
    result: Measurement,
    on_sample: Callable[[int], None] | None = None,
) -> None:
    """Samples pids() into result.samples (times from `started`, a monotonic time) until the
    merged pages settle or `timeout` seconds from `started` have passed."""

    def sample():
        current = pids()
        pages = merged_pages(current)  # settling is judged by this count: ksm_stat, cheap and exact
        result.samples.append([round(time.monotonic() - started, 2), pages, round(saving.saved_pages(current), 1)])
        if on_sample:
            on_sample(pages)
        return pages

    result.mergeable = mergeable(pids())
    if not result.mergeable:
        sample()
        result.settled = True
    else:
        result.settled = _settle_through_chain_prunes(scanning.ignoring_flutter(sample), started, timeout)
    result.settle_seconds = round(time.monotonic() - started, 1)
    result.seconds_to_90 = seconds_to_share(result.samples)


def _settle_through_chain_prunes(sample, started, timeout):
    """Settled, and still so after a prune of the stable node chains (content held more than
    max_page_sharing times lives in chains of KSM pages): True, or False at the timeout."""
    prune_seconds = (kernel.read_knob("stable_node_chains_prune_millisecs") or 2000) / 1000
    while True:
        left = timeout - (time.monotonic() - started)
        if left <= 0:
            return False
        settled = scanning.wait_until_settled(sample, timeout=left, poll=SAMPLE_SECONDS)
        left = timeout - (time.monotonic() - started)
        if left <= 0:
            return False
        time.sleep(min(1.5 * prune_seconds, left))
        if sample() == settled:
            return time.monotonic() - started < timeout


def seconds_to_share(samples: list[list[float]], share: float = 0.9) -> float | None:
    """Seconds until the saving first reached `share` of its last value; None if nothing was saved."""
    final = samples[-1][2] if samples else 0
    return next((seconds for seconds, _, saved in samples if final and saved >= share * final), None)


def measure(
    pids: list[int], result: Measurement, data_by_pid: dict[int, int] | None = None, with_potential: bool = False
) -> Measurement:
    """Fills `result` (a Measurement) with each process of `pids` and the set's totals."""
    savings = saving.savings(pids)
    result.vanished = [pid for pid in pids if pid not in savings]
    result.per_process = [_process(one, (data_by_pid or {}).get(one.pid)) for one in savings.values()]
    rows = result.per_process
    result.processes = len(rows)
    result.resident_bytes = sum(row.rss_bytes for row in rows)
    result.merged_pages = sum(row.merged_pages for row in rows)
    result.zero_pages = sum(row.zero_pages for row in rows)
    result.saved_bytes = sum(row.saved_bytes for row in rows)
    result.padding_bytes = sum(row.padding_bytes for row in rows)
    result.rmap_items = sum(row.rmap_items for row in rows)
    result.net_saved_bytes = saving.net_saved_bytes(result.saved_bytes, result.padding_bytes, result.rmap_items)
    result.saved_percent = round(100 * result.saved_bytes / result.resident_bytes, 1) if result.resident_bytes else 0.0
    if with_potential:
        _add_potential(result, list(savings))
    return result


def _process(one, data_bytes):
    try:
        process = psutil.Process(one.pid)
        comm, rss = process.name(), process.memory_info().rss
    except psutil.NoSuchProcess:
        comm, rss = "", 0
    return ProcessMeasurement(
        pid=one.pid,
        comm=comm,
        rss_bytes=rss,
        merged_pages=one.merged_pages,
        zero_pages=one.zero_pages,
        rmap_items=one.rmap_items,
        saved_bytes=one.saved_bytes,
        padding_bytes=one.padding_bytes,
        net_saved_bytes=one.net_saved_bytes,
        shim=one.shim,
        data_bytes=data_bytes,
    )


def _add_potential(result, pids):
    from .potential import potential  # the compiled helper: imported when needed

    duplicate = potential(pids)
    page = duplicate.page_size
    result.potential_bytes = duplicate.potential_pages * page
    result.nonzero_potential_bytes = (duplicate.totals["saving_across"] + duplicate.totals["saving_within"]) * page
    result.zero_bytes = duplicate.totals["zero_pages"] * page
