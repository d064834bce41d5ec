#!/usr/bin/env python3
"""Which path marks jemalloc's memory: the mmap wrapper, or extent hooks on its arenas.

Debian's redis-server (shared libjemalloc 5.3) runs under `ksm-wrap --strategy madvise`, so
only what the shim marks is mergeable, in four arms: jemalloc's default configuration and
MALLOC_CONF=dss:primary (extents from brk instead of mmap), each with the mmap path alone
and with the counting extent hooks (KSMPRELOAD_JEMALLOC_HOOKS=1) as well. After loading it
with

    redis-benchmark -t set,lpush -n 100000 -r 100000 -d 2000
    redis-benchmark -t set -n 20000 -r 20000 -d 40000

it reports the anonymous memory in mergeable VMAs and in the others (smaps), the RSS, and the
shim's counters: extents the hooks saw, and those the mmap wrapper had not.

    python3 scripts/bench_jemalloc_paths.py [--json]
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile

from bench_redis_cost import free_port, wait_for_pong
from bench_shim_cost import cpu_model, installed_shim

from ksmpreload import kernel, shimstats
from ksmpreload.workloads.redis import server_command

ARMS = [
    ("default", "", "0"),
    ("default+hooks", "", "1"),
    ("dss", "dss:primary", "0"),
    ("dss+hooks", "dss:primary", "1"),
]
LOADS = [
    ["-t", "set,lpush", "-n", "100000", "-r", "100000", "-d", "2000"],
    ["-t", "set", "-n", "20000", "-r", "20000", "-d", "40000"],
]
COUNTERS = (
    "heap_regions",
    "mmap_regions",
    "madvise_calls",
    "hook_arenas",
    "hook_extents",
    "hook_bytes",
    "hook_unseen_extents",
    "hook_unseen_bytes",
    "hook_recommits",
)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def run_arm(malloc_conf, hooks, shim, workdir):
    port = free_port()
    env = dict(
        os.environ,
        KSMPRELOAD_SHIM=shim,
        KSMPRELOAD_STATS_DIR=os.path.join(workdir, "stats"),
        KSMPRELOAD_JEMALLOC_HOOKS=hooks,
        MALLOC_CONF=malloc_conf,
    )
    command = [
        sys.executable,
        "-m",
        "ksmpreload.wrap",
        "--strategy",
        "madvise",
        *server_command(port, directory=workdir),
    ]
    proc = subprocess.Popen(command, env=env, cwd=workdir, stdout=subprocess.DEVNULL)
    try:
        wait_for_pong(port, proc)
        for load in LOADS:
            subprocess.run(
                ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-q", *load],
                stdout=subprocess.DEVNULL,
                check=True,
            )
        marked, unmarked = kernel.mergeable_coverage(kernel.process_regions(proc.pid))
        stats = shimstats.read_process_stats(proc.pid, env["KSMPRELOAD_STATS_DIR"])
        return {
            "mergeable_kib": marked,
            "unmarked_kib": unmarked,
            "rss_kib": rss_kib(proc.pid),
            "counters": {key: stats.get(key, 0) for key in COUNTERS},
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def print_table(results):
    print(f"{'arm':<15} {'mergeable KiB':>14} {'other KiB':>10} {'RSS KiB':>10}  counters")
    for arm, row in results.items():
        counters = ", ".join(f"{key} {value:,}" for key, value in row["counters"].items() if value)
        print(f"{arm:<15} {row['mergeable_kib']:>14,} {row['unmarked_kib']:>10,} {row['rss_kib']:>10,}  {counters}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    shim = installed_shim()
    with tempfile.TemporaryDirectory() as workdir:
        results = {arm: run_arm(conf, hooks, shim, workdir) for arm, conf, hooks in ARMS}
    if args.json:
        print(json.dumps({"cpu": cpu_model(), "results": results}, indent=2))
    else:
        print_table(results)


if __name__ == "__main__":
    main()
