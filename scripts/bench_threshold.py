#!/usr/bin/env python3
"""Choose the shim's default threshold by measurement.

For each threshold, one process holding buffers of log-uniform sizes (half of them in
identical copies, allocated with malloc between small blocks) runs under ksm-wrap. We
record its anonymous RSS when ready (what the alignment costs) and, after three full
scans, what KSM merged (what the alignment buys). Net = merged profit - extra RSS
against the same workload without alignment.

    sudo python3 scripts/bench_threshold.py [--mib 256] [--json]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

from ksmpreload import kernel, scanning
from ksmpreload.sizes import parse_size

HERE = os.path.dirname(os.path.abspath(__file__))
MIB = 1 << 20


def build_workload(directory):
    program = os.path.join(directory, "dup_workload")
    subprocess.run(["cc", "-O2", "-o", program, os.path.join(HERE, "bench", "dup_workload.c"), "-lm"], check=True)
    return program


def rss_anon_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon")


def run_arm(program, workload_args, wrap_args):
    proc = subprocess.Popen(
        ["ksm-wrap", *wrap_args, program, *workload_args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        ready = json.loads(proc.stdout.readline())
        rss = rss_anon_bytes(proc.pid)
        with open(f"/proc/{proc.pid}/maps") as maps:
            vmas = sum(1 for _ in maps)
        scanning.wait_full_scans(3, timeout=300)
        stat = kernel.process_ksm_stat(proc.pid)
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    return {
        "rss_anon": rss,
        "merging_pages": stat["ksm_merging_pages"],
        "profit": stat["ksm_process_profit"],
        "rmap_items": stat["ksm_rmap_items"],
        "duplicate_pages_if_aligned": ready["duplicate_pages_if_aligned"],
        "held_bytes": ready["held_bytes"],
        "vmas": vmas,
    }


def measure(args):
    workload_args = [str(args.mib), "50", "3", str(parse_size(args.min_size)), str(parse_size(args.max_size)), "7"]
    arms = [("no alignment", ["--no-align"])] + [
        (threshold, ["--threshold", threshold]) for threshold in args.thresholds.split(",")
    ]
    with tempfile.TemporaryDirectory() as directory, scanning.fast_scanning():
        program = build_workload(directory)
        results = []
        for name, wrap_args in arms:
            result = run_arm(program, workload_args, ["--strategy", args.strategy, *wrap_args])
            result["arm"] = name
            results.append(result)
            print(f"  measured {name}", file=sys.stderr)
    baseline = results[0]["rss_anon"]
    for result in results:
        result["extra_rss"] = result["rss_anon"] - baseline
        result["net_saving"] = result["profit"] - result["extra_rss"]
    return results


def print_table(results):
    print(
        f"duplicate data if every copy were page-aligned: "
        f"{results[0]['duplicate_pages_if_aligned'] * 4096 / MIB:.1f} MiB"
    )
    print("| arm | RssAnon MiB | extra MiB | merged MiB | profit MiB | net MiB | VMAs | rmap items |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['arm']} | {r['rss_anon'] / MIB:.1f} | {r['extra_rss'] / MIB:.1f} | "
            f"{r['merging_pages'] * 4096 / MIB:.1f} | {r['profit'] / MIB:.1f} | {r['net_saving'] / MIB:.1f} | {r['vmas']} | {r['rmap_items']} |"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB of buffers the process holds")
    parser.add_argument("--thresholds", default="4K,8K,16K,32K,64K,128K")
    parser.add_argument("--min-size", default="256", help="smallest buffer (log-uniform sizes)")
    parser.add_argument("--max-size", default="1M", help="largest buffer")
    parser.add_argument("--strategy", default="prctl", choices=["prctl", "madvise"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    for threshold in args.thresholds.split(","):
        parse_size(threshold)
    if os.geteuid() != 0:
        sys.exit("bench_threshold: needs root to set the KSM scan rate")
    results = measure(args)
    print(json.dumps(results, indent=2)) if args.json else print_table(results)


if __name__ == "__main__":
    main()
