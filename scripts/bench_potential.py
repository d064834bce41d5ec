#!/usr/bin/env python3
"""How fast ksmpreload measures the duplicate potential of processes: potential.potential()
reads every present anonymous page of the processes from /proc/<pid>/mem, hashes it, and
sorts and counts the hashes.

For each total size (default 1, 2 and 4 GiB), PROCESSES workers (default 2) each hold
SIZE / PROCESSES of anonymous memory, the first DUPLICATE fraction (default half) the same in
every worker, the rest their own (the workers of scripts/bench_attribution.py, not made
mergeable: nothing is merged). Then, REPS times for each pread size in CHUNKS, we time
potential(pids) with its steps and report the median and fastest run, and GiB of the
workers' memory per second.

    sudo python3 scripts/bench_potential.py [--sizes 1,2,4] [--chunks 64] [--json]
"""

import json
import os
import statistics
import sys
import time

from bench_attribution import machine, run_worker, summary, workers_parser
from ksmpreload import kernel
from ksmpreload.potential import potential
from ksmpreload.processes import start_workers, stop_workers

GIB = 1 << 30


def measure(pids, chunk_pages, reps):
    runs, steps = [], []
    for _ in range(reps):
        timings, start = {}, time.perf_counter()
        report = potential(pids, timings=timings, chunk_pages=chunk_pages)
        runs.append(time.perf_counter() - start)
        steps.append(timings)
    gib = report.totals["pages"] * report.page_size / GIB
    return {
        "chunk_pages": chunk_pages,
        "pages_read": report.totals["pages"],
        "duplicate_pages": report.totals["duplicate_pages"],
        "potential_pages": report.potential_pages,
        **summary(runs, gib),
        "runs_s": runs,
        "read_hash_gib_s": gib / statistics.median(step["read"] + step["hash"] for step in steps),
        "steps_median_s": {name: statistics.median(step[name] for step in steps) for name in steps[0]},
    }


def measure_size(total_bytes, args):
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        str(total_bytes // args.processes),
        str(args.duplicate),
    ]
    workers = start_workers([[*command, str(seed)] for seed in range(1, args.processes + 1)])
    try:
        pids = [proc.pid for proc in workers]
        load_before = os.getloadavg()[0]
        rows = [measure(pids, chunk, args.reps) for chunk in args.chunks]
        load_after = os.getloadavg()[0]
    finally:
        stop_workers(workers)
    return [
        {
            "total_bytes": total_bytes,
            "held_bytes": sum(proc.report["bytes"] for proc in workers),
            "load_average": [load_before, load_after],
            **row,
        }
        for row in rows
    ]


def print_table(result):
    m = result["machine"]
    print(
        f"machine: nproc {m['nproc']}, {m['cpu']}, {m['mem_total_gib']} GiB, "
        f"kernel {m['kernel']}, {m['date']}; {result['processes']} workers, "
        f"{result['duplicate']:g} duplicated, {result['reps']} runs each; load average "
        f"{result['load_average'][0]:.2f} before, {result['load_average'][1]:.2f} after"
    )
    print(
        "| memory | pread | pages read | duplicate pages | potential() median s | min s "
        "| GiB/s (median) | GiB/s (best) | read+hash GiB/s | load avg |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in result["rows"]:
        print(
            f"| {row['total_bytes'] / GIB:g} GiB | {row['chunk_pages'] * kernel.page_size() >> 10} KiB "
            f"| {row['pages_read']} | {row['duplicate_pages']} | {row['median_s']:.3f} | {row['min_s']:.3f} "
            f"| {row['median_gib_s']:.2f} | {row['max_gib_s']:.2f} | {row['read_hash_gib_s']:.2f} "
            f"| {row['load_average'][0]:.2f}-{row['load_average'][1]:.2f} |"
        )
    print()
    print("steps, median s:")
    for row in result["rows"]:
        steps = ", ".join(f"{name} {seconds:.3f}" for name, seconds in row["steps_median_s"].items())
        print(f"  {row['total_bytes'] / GIB:g} GiB, {row['chunk_pages']} pages per pread: {steps}")


def main():
    parser = workers_parser(__doc__, "timed runs per size and chunk (default 5)")
    parser.add_argument(
        "--chunks", default="64", help="pages per pread of /proc/<pid>/mem to try, comma-separated (default 64)"
    )
    args = parser.parse_args()
    if run_worker(args):
        return
    if os.geteuid() != 0:
        raise SystemExit("bench_potential.py needs root (other processes' memory, page frame numbers)")
    args.chunks = [int(chunk) for chunk in args.chunks.split(",")]
    result = {
        "machine": machine(),
        "processes": args.processes,
        "duplicate": args.duplicate,
        "reps": args.reps,
        "rows": [],
        "load_average": [os.getloadavg()[0]],
    }
    for size in (int(float(size) * GIB) for size in args.sizes.split(",")):
        result["rows"] += measure_size(size, args)
        print(f"  measured {size / GIB:g} GiB", file=sys.stderr)
    result["load_average"].append(os.getloadavg()[0])
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
