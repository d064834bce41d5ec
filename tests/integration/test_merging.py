"""Merging on the real kernel, judged by the ksm_stat of the processes the tests start."""

import json
import subprocess

import pytest

from conftest import ksm_stat, start_redis
from ksmpreload import scanning, shimstats

DISTINCT, COPIES = 64, 4


def start_dup_buffers(program, *wrap_args):
    proc = subprocess.Popen(
        ["ksm-wrap", *wrap_args, program, str(DISTINCT), str(COPIES)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    report = json.loads(proc.stdout.readline())
    assert report["pid"] == proc.pid
    return proc, report["mergeable_pages"]


def merged_pages(*pids):
    return sum(ksm_stat(pid)["ksm_merging_pages"] for pid in pids)


def merged_pages_when_settled(*pids, flutter=False):
    """Once merging settles; with flutter, a few pages that keep merging and breaking (redis's
    clock and counters) do not hold it up (the wait once ran into its 120 s timeout in CI)."""
    count = (lambda: merged_pages(*pids)) if not flutter else scanning.ignoring_flutter(lambda: merged_pages(*pids))
    return scanning.wait_until_settled(count)


def stop(proc):
    proc.stdin.close()
    proc.wait(timeout=30)


@pytest.mark.parametrize("strategy", ["auto", "prctl", "madvise"])
def test_duplicate_buffers_merge(ksm_running, c_programs, strategy):
    proc, mergeable = start_dup_buffers(c_programs("dup_buffers"), "--strategy", strategy)
    try:
        merged = merged_pages_when_settled(proc.pid)
    finally:
        stop(proc)
    assert merged >= 0.9 * mergeable, f"{merged} of {mergeable} duplicate pages merged"


@pytest.mark.parametrize("strategy", ["prctl", "madvise"])
def test_without_alignment_most_duplicates_stay_apart(ksm_running, c_programs, strategy):
    """glibc's chunk headers put identical buffers at different page offsets."""
    proc, mergeable = start_dup_buffers(c_programs("dup_buffers"), "--strategy", strategy, "--no-align")
    try:
        merged = merged_pages_when_settled(proc.pid)
    finally:
        stop(proc)
    assert merged < 0.5 * mergeable, f"{merged} of {mergeable} merged even without alignment"


VALUES, VALUE_BYTES = 1500, 32 * 1024


def load_same_values(client):
    import random

    pipe = client.pipeline(transaction=False)
    for i in range(VALUES):
        pipe.set(f"key:{i}", random.Random(i).randbytes(VALUE_BYTES))
    pipe.execute()


def test_two_redis_servers_with_the_same_values_merge(ksm_running):
    servers = [start_redis(["ksm-wrap", "--strategy", "madvise"]) for _ in range(2)]
    try:
        for _, client in servers:
            load_same_values(client)
        merged_pages_when_settled(*(proc.pid for proc, _ in servers), flutter=True)
        stats = [ksm_stat(proc.pid) for proc, _ in servers]
        counters = [shimstats.read_process_stats(proc.pid) for proc, _ in servers]
        for _, client in servers:  # what was written is still what is read
            assert client.get("key:7") == __import__("random").Random(7).randbytes(VALUE_BYTES)
    finally:
        for proc, client in servers:
            client.shutdown(nosave=True)
            proc.wait(timeout=30)
    value_pages = VALUES * VALUE_BYTES // 4096
    for stat, counter in zip(stats, counters):
        assert stat["ksm_merge_any"] is False, "madvise strategy: no whole-process merging"
        assert stat["ksm_merging_pages"] >= 0.9 * value_pages, stat
        assert counter["strategy"] == "madvise" and counter["mmap_regions"] > 0, counter
