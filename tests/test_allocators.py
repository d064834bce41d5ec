"""Every allocator's memory gets marked (madvise strategy), and the counters say which path
marked it: jemalloc shared (Debian's redis-server), jemalloc linked into the program."""
import os
import socket
import subprocess
import time

import pytest

from ksmpreload import kernel, shimstats

MARKED_SHARE = 0.99  # of the process's anonymous memory, in VMAs flagged mergeable


def coverage(pid):
    marked, unmarked = kernel.mergeable_coverage(kernel.process_regions(pid))
    return marked / (marked + unmarked)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_redis_jemalloc_memory_is_marked_through_heap_and_mmap_paths(tmp_path):
    import redis
    port, stats_dir = free_port(), tmp_path / "stats"
    env = dict(os.environ, KSMPRELOAD_STATS_DIR=str(stats_dir))
    proc = subprocess.Popen(["ksm-wrap", "--strategy", "madvise", "redis-server", "--port", str(port),
                             "--bind", "127.0.0.1", "--save", "", "--loglevel", "warning"],
                            env=env, stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    try:
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        pipe = client.pipeline(transaction=False)
        for i in range(3000):
            pipe.set(f"small:{i}", b"s" * 300)
            pipe.set(f"large:{i}", bytes([i % 251]) * 20000)
        pipe.execute()
        share = coverage(proc.pid)
        counters = shimstats.read_process_stats(proc.pid, str(stats_dir))
    finally:
        client.shutdown(nosave=True)
        proc.wait(timeout=30)
    assert share >= MARKED_SHARE, f"only {share:.1%} of redis-server's anonymous memory is mergeable"
    assert counters["heap_regions"] > 0 and counters["mmap_regions"] > 0, counters


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
