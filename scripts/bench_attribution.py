#!/usr/bin/env python3
"""How fast ksmpreload attributes KSM pages to processes and regions: the whole report
(attribution.attribution: smaps, labels, shim records and the sharing matrix), and its parts.

For each total size (default 1, 2 and 4 GiB), PROCESSES workers start under ksm-wrap, each
holding SIZE / PROCESSES of anonymous memory: the first DUPLICATE fraction of every worker's
pages is the same in all workers, the rest is its own; no two pages of one worker are equal.
KSM merges them at a fast scan rate (every knob restored after, scanning.fast_scanning)
until merging settles. Then, REPS times each, we time the whole attribution report
(attribution.attribution(pids): what `ksmpreload report --json` computes), sharing(pids)
alone (with its steps) and reading plus parsing every worker's /proc/<pid>/smaps
(kernel.parse_smaps), and report the median and fastest run in seconds and GiB of the
workers' memory per second.

    sudo python3 scripts/bench_attribution.py [--sizes 1,2,4] [--processes 2] [--json]
"""

import argparse
import json
import mmap
import os
import platform
import random
import statistics
import struct
import sys
import time

from ksmpreload import attribution, kernel, native, scanning
from ksmpreload.sharing import sharing
from ksmpreload.processes import start_workers, stop_workers

GIB = 1 << 30
TEMPLATE_PAGES = 4096


# ---- the worker -----------------------------------------------------------------------------


def hold(total_bytes, duplicate, seed):
    """An anonymous private mapping of total_bytes: pages [0, duplicate * pages) are the same in
    every worker, the others stamped with `seed`; each page is stamped with its index."""
    page = mmap.PAGESIZE
    pages = total_bytes // page
    shared = int(pages * duplicate)
    region = mmap.mmap(-1, pages * page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_NOHUGEPAGE)
    template = random.Random(12345).randbytes(TEMPLATE_PAGES * page)
    stamp = struct.Struct("<QQ")
    for first in range(0, pages, TEMPLATE_PAGES):
        count = min(TEMPLATE_PAGES, pages - first)
        region[first * page : (first + count) * page] = template[: count * page]
        for index in range(first, first + count):
            stamp.pack_into(region, index * page, 0 if index < shared else seed, index)
    return region


def worker(total_bytes, duplicate, seed):
    region = hold(total_bytes, duplicate, seed)
    print(json.dumps({"pid": os.getpid(), "bytes": len(region)}), flush=True)
    sys.stdin.read()


# ---- the measurement ------------------------------------------------------------------------


def start_bench_workers(total_bytes, processes, duplicate):
    command = [sys.executable, os.path.abspath(__file__), "--worker"]
    each = str(total_bytes // processes)
    workers = start_workers(
        [["ksm-wrap", *command, each, str(duplicate), str(seed)] for seed in range(1, processes + 1)]
    )
    for proc in workers:
        proc.held = proc.report["bytes"]
    return workers


def merging_pages(pids):
    return sum(kernel.process_ksm_stat(pid)["ksm_merging_pages"] for pid in pids)


def read_smaps(pids):
    return [kernel.parse_smaps(kernel.read_proc(pid, "smaps")) for pid in pids]


def summary(seconds, gib):
    median, best = statistics.median(seconds), min(seconds)
    return {"median_s": median, "min_s": best, "median_gib_s": gib / median, "max_gib_s": gib / best}


def measure_size(total_bytes, args):
    workers = start_bench_workers(total_bytes, args.processes, args.duplicate)
    try:
        pids = [proc.pid for proc in workers]
        started = time.monotonic()
        merged = scanning.wait_until_settled(lambda: merging_pages(pids), timeout=args.settle_timeout)
        settle_s = time.monotonic() - started
        load_before = os.getloadavg()[0]
        runs, steps, smaps_runs, report_runs = [], [], [], []
        for _ in range(args.reps):
            start = time.perf_counter()
            attribution.attribution(pids)
            report_runs.append(time.perf_counter() - start)
            timings, start = {}, time.perf_counter()
            report = sharing(pids, timings=timings, pagemap_scan=args.pagemap_scan)
            runs.append(time.perf_counter() - start)
            steps.append(timings)
            start = time.perf_counter()
            regions = read_smaps(pids)
            smaps_runs.append(time.perf_counter() - start)
        after = merging_pages(pids)
    finally:
        stop_workers(workers)
    page = kernel.page_size()
    read_pages = sum(process.anon_pages for process in report.processes.values())
    gib = read_pages * page / GIB
    return {
        "total_bytes": total_bytes,
        "processes": args.processes,
        "duplicate": args.duplicate,
        "held_bytes": sum(proc.held for proc in workers),
        "pages_read": read_pages,
        "vmas_read": sum(len(process.regions) for process in report.processes.values()),
        "vmas_in_smaps": sum(len(r) for r in regions),
        "ksm_merging_pages": [merged, after],
        "ksm_pages_found": report.totals["mapped"],
        "ksm_distinct": report.totals["distinct"],
        "shared_between_first_two": report.shared(pids[0], pids[1]) if len(pids) > 1 else 0,
        "settle_s": settle_s,
        "load_average": [load_before, os.getloadavg()[0]],
        "sharing": summary(runs, gib),
        "sharing_runs_s": runs,
        "sharing_steps_median_s": {name: statistics.median(step[name] for step in steps) for name in steps[0]},
        "smaps": summary(smaps_runs, gib),
        "smaps_runs_s": smaps_runs,
        "report": summary(report_runs, gib),
        "report_runs_s": report_runs,
    }


def machine():
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "mem_total_gib": round(kernel.mem_total_bytes() / GIB, 1),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def print_table(result):
    m = result["machine"]
    print(f"machine: nproc {m['nproc']}, {m['cpu']}, {m['mem_total_gib']} GiB, kernel {m['kernel']}, {m['date']}")
    print(f"pagemap_scan {result['pagemap_scan']}, kpageflags gap {result['pfn_read_gap']}, {result['reps']} runs each")
    print(
        "| memory | pages read | KSM pages (ksm_stat) | report median s | min s | sharing() median s "
        "| min s | GiB/s (median) | smaps median s | GiB/s | load avg |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in result["sizes"]:
        share, smaps, report = row["sharing"], row["smaps"], row["report"]
        print(
            f"| {row['total_bytes'] / GIB:g} GiB | {row['pages_read']} | {row['ksm_pages_found']} "
            f"({row['ksm_merging_pages'][0]}) | {report['median_s']:.3f} | {report['min_s']:.3f} "
            f"| {share['median_s']:.3f} | {share['min_s']:.3f} "
            f"| {share['median_gib_s']:.1f} | {smaps['median_s']:.3f} | {smaps['median_gib_s']:.1f} "
            f"| {row['load_average'][0]:.2f}-{row['load_average'][1]:.2f} |"
        )
    print()
    print("sharing() steps, median s:")
    for row in result["sizes"]:
        steps = ", ".join(f"{name} {seconds:.3f}" for name, seconds in row["sharing_steps_median_s"].items())
        print(f"  {row['total_bytes'] / GIB:g} GiB: {steps}")


def workers_parser(doc, reps_help):
    """The options of the benchmarks that run these workers (this one and bench_potential.py)."""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1,2,4", help="total GiB held by the workers, comma-separated")
    parser.add_argument("--processes", type=int, default=2, help="workers per size (default 2)")
    parser.add_argument(
        "--duplicate",
        type=float,
        default=0.5,
        help="fraction of each worker's pages that all workers hold (default 0.5)",
    )
    parser.add_argument("--reps", type=int, default=5, help=reps_help)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    return parser


def run_worker(args):
    """True when this process is a worker (--worker): it held its memory until stdin closed."""
    if args.worker:
        worker(int(args.worker[0]), float(args.worker[1]), int(args.worker[2]))
    return bool(args.worker)


def main():
    parser = workers_parser(__doc__, "timed runs per size (default 5)")
    parser.add_argument(
        "--pagemap-scan",
        choices=("auto", "never", "always"),
        default="auto",
        help="when to read pagemap only where PAGEMAP_SCAN finds pages (default auto)",
    )
    parser.add_argument(
        "--gap",
        type=int,
        default=native.PFN_READ_GAP,
        help=f"read kpageflags through gaps of up to this many PFNs (default {native.PFN_READ_GAP})",
    )
    parser.add_argument("--pages-to-scan", type=int, default=20000, help="KSM rate while merging (default 20000)")
    parser.add_argument("--settle-timeout", type=float, default=600, help="seconds to wait for merging")
    args = parser.parse_args()
    if run_worker(args):
        return
    if os.geteuid() != 0:
        raise SystemExit("bench_attribution.py needs root (KSM knobs, page frame numbers)")
    native.PFN_READ_GAP = args.gap
    sizes = [int(float(size) * GIB) for size in args.sizes.split(",")]
    result = {
        "machine": machine(),
        "pagemap_scan": args.pagemap_scan,
        "pfn_read_gap": args.gap,
        "reps": args.reps,
        "sizes": [],
    }
    with scanning.fast_scanning(pages_to_scan=args.pages_to_scan):
        for size in sizes:
            result["sizes"].append(measure_size(size, args))
            print(f"  measured {size / GIB:g} GiB", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
