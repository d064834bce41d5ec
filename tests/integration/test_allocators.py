"""Every allocator's memory gets marked (madvise strategy), and the counters say which path
marked it: jemalloc shared (Debian's redis-server), jemalloc linked into the program, jemalloc
preloaded with its extent hooks counting (measurement mode) and after purges."""

import json
import os
import subprocess

import pytest

from conftest import JEMALLOC, ksm_stat, start_redis
from ksmpreload import kernel, scanning, shimstats

MARKED_SHARE = 0.99  # of the process's anonymous memory, in VMAs flagged mergeable


def coverage(pid):
    """Of the anonymous memory, the share in mergeable VMAs; a file's .bss (the anonymous
    mapping right after it) is the file's, which the shim never marks."""
    regions = kernel.process_regions(pid)
    after_file = {
        r["start"]
        for before, r in zip(regions, regions[1:])
        if before["path"].startswith("/") and before["end"] == r["start"]
    }
    marked, unmarked = kernel.mergeable_coverage([r for r in regions if r["start"] not in after_file])
    return marked / (marked + unmarked)


def test_redis_jemalloc_memory_is_marked_through_heap_and_mmap_paths(tmp_path):
    stats_dir = tmp_path / "stats"
    env = dict(os.environ, KSMPRELOAD_STATS_DIR=str(stats_dir))
    proc, client = start_redis(["ksm-wrap", "--strategy", "madvise"], env=env)
    try:
        pipe = client.pipeline(transaction=False)
        for i in range(3000):
            pipe.set(f"small:{i}", b"s" * 300)
            pipe.set(f"large:{i}", bytes([i % 251]) * 20000)
        pipe.execute()
        for i in range(0, 3000, 10):  # grows large blocks through realloc
            pipe.append(f"large:{i}", b"+" * 10000)
        pipe.execute()
        grown_intact = all(
            client.get(f"large:{i}") == bytes([i % 251]) * 20000 + b"+" * 10000 for i in range(0, 3000, 10)
        )
        share = coverage(proc.pid)
        counters = shimstats.read_process_stats(proc.pid, str(stats_dir))
    finally:
        client.shutdown(nosave=True)
        proc.wait(timeout=30)
    assert share >= MARKED_SHARE, f"only {share:.1%} of redis-server's anonymous memory is mergeable"
    assert counters["heap_regions"] > 0 and counters["mmap_regions"] > 0, counters
    assert grown_intact, "a value grown by APPEND under the shim reads back different"
    assert counters["realloc_copies"] == 0, "jemalloc's rallocx keeps blocks aligned: the shim copies none"


def test_static_jemalloc_is_marked_through_its_mappings(c_programs, shim_env):
    program = c_programs("static_jemalloc")
    if not os.path.exists(program):
        pytest.fail("static_jemalloc was not built: install libjemalloc-dev (libjemalloc.a)")
    env = shim_env(strategy="madvise")
    proc = subprocess.Popen([program], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pid = int(proc.stdout.readline())
        share = coverage(pid)
        counters = shimstats.read_process_stats(pid, env["KSMPRELOAD_STATS_DIR"])
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert share >= MARKED_SHARE, f"only {share:.1%} of its anonymous memory is mergeable"
    assert counters["heap_regions"] == 0, "its malloc is its own: the shim's never runs"
    assert counters["mmap_regions"] > 0 and counters["mmap_bytes"] >= 64 << 20, counters


def run_dup_buffers(program, env, distinct=64, copies=4):
    """Starts dup_buffers; returns (process, its report, its counters, its mergeable share)."""
    proc = subprocess.Popen(
        [program, str(distinct), str(copies)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    report = json.loads(proc.stdout.readline())
    counters = shimstats.read_process_stats(proc.pid, env["KSMPRELOAD_STATS_DIR"])
    return proc, report, counters, coverage(proc.pid)


def finish(proc):
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize("malloc_conf", ["", "dss:primary"])
def test_jemalloc_extent_hooks_find_nothing_left_unmarked(c_programs, shim_env, malloc_conf):
    """Measurement mode: hooks on every automatic arena count jemalloc's extents. With mappings
    (default) the mmap wrapper saw every one; with dss:primary some come from brk, unseen by
    it, but the heap path had marked them already: the share is the same either way."""
    program = c_programs("dup_buffers")
    shares = {}
    for hooks in (0, 1):
        env = shim_env(preload_after=[JEMALLOC], strategy="madvise", jemalloc_hooks=hooks)
        env["MALLOC_CONF"] = malloc_conf
        proc, report, counters, shares[hooks] = run_dup_buffers(program, env)
        finish(proc)
        if hooks:
            hooked = counters
    assert shares[0] >= MARKED_SHARE and shares[1] >= MARKED_SHARE, shares
    assert hooked["hook_arenas"] >= 1 and hooked["hook_extents"] >= 1, hooked
    if malloc_conf:
        assert hooked["hook_unseen_extents"] >= 1, "dss extents come from brk, not mmap"
    else:
        assert hooked["hook_unseen_extents"] == 0, hooked


def test_jemalloc_memory_reused_after_a_purge_merges(ksm_running, c_programs, shim_env):
    """Purging (MADV_DONTNEED/MADV_FREE) keeps a VMA's mergeable flag: blocks made from
    purged extents merge like fresh ones."""
    env = shim_env(preload_after=[JEMALLOC], strategy="madvise")
    env["DUP_BUFFERS_PURGE_FIRST"] = "1"
    proc, report, counters, _ = run_dup_buffers(c_programs("dup_buffers"), env)
    try:
        merged = scanning.wait_until_settled(lambda: ksm_stat(proc.pid)["ksm_merging_pages"])
    finally:
        finish(proc)
    mergeable = report["mergeable_pages"]
    assert merged >= 0.9 * mergeable, f"{merged} of {mergeable} duplicate pages merged after a purge"
