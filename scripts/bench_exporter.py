#!/usr/bin/env python3
"""How long one exporter scrape takes with many KSM processes (issue 16: under 1 s at 1,000).

Starts N `sleep` processes that merge as a whole (prctl(PR_SET_MEMORY_MERGE) before their exec,
which keeps it: each shows ksm_merge_any in its ksm_stat, so every scrape reads it), then times a whole scrape (every metric family collected and rendered as text,
ksmpreload exporter --once's work) --reps times in this process, for each N, side by side:
with the regions of the default 50 processes (--region-processes) and of all of them.
Root; KSM's knobs are not touched.

    sudo python3 scripts/bench_exporter.py [--processes 100,1000] [--reps 5]
"""

import argparse
import ctypes
import os
import platform
import statistics
import subprocess
import sys
import time

PR_SET_MEMORY_MERGE = 67
DEFAULT_REGION_PROCESSES = 50  # the exporter's --region-processes default


def merge_as_a_whole():
    """In the child, before exec: prctl(PR_SET_MEMORY_MERGE, 1), which exec keeps."""
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) != 0:
        os._exit(3)


def start_merging_sleepers(count):
    """`count` sleep processes that merge as a whole."""
    procs = [subprocess.Popen(["sleep", "600"], preexec_fn=merge_as_a_whole) for _ in range(count)]
    time.sleep(0.5)
    if any(proc.poll() is not None for proc in procs):
        stop(procs)
        sys.exit("could not start the processes with PR_SET_MEMORY_MERGE (kernel 6.4 or newer, root)")
    return procs


def stop(procs):
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait()


def scrape_seconds(reps, region_processes):
    from prometheus_client import generate_latest

    from ksmpreload.commands.exporter import metrics_registry

    registry, times = metrics_registry(region_processes=region_processes), []
    for _ in range(reps):
        started = time.perf_counter()
        text = generate_latest(registry)
        times.append(time.perf_counter() - started)
    return times, len(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", default="100,1000")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, kernel {platform.release()}\n")
    print("| KSM processes started | regions of | scrape median s | fastest s | slowest s | metrics text KiB |")
    print("|---:|---|---:|---:|---:|---:|")
    for count in map(int, args.processes.split(",")):
        procs = start_merging_sleepers(count)
        try:
            for shown in (DEFAULT_REGION_PROCESSES, count):  # the default, and every process (as before)
                times, size = scrape_seconds(args.reps, shown)
                print(f"| {count} | {shown} processes | {statistics.median(times):.3f} | {min(times):.3f} "
                      f"| {max(times):.3f} | {size / 1024:.0f} |")  # fmt: skip
        finally:
            stop(procs)


if __name__ == "__main__":
    main()
