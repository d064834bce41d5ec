#!/usr/bin/env python3
"""Python workloads that churn large blocks, with and without ksm-wrap, side by side (issue 12).

Each workload runs in a fresh interpreter, alone and under `ksm-wrap` (KSMPRELOAD_STATS_DIR=off),
repetitions interleaved (alone, shim; shim, alone; ...). Reported: the median time of the timed
part of each arm and shim/alone as the ratio of medians, and the median peak RSS (VmHWM).

    numpy-empty    np.empty(1 << 15) (256 KiB) 20,000 times
    numpy-zeros    np.zeros(1 << 15) 20,000 times
    bytes          bytes(n) and bytearray(n) of 64 KiB to 4 MiB, 20,000 of each
    torch          inference: 8 x Linear(1024, 1024), batch 256 (1 MiB activations), 200 batches
    numpy-suite    numpy's core test suite (numpy/_core/tests, not slow): its wall time, and
                   its pass/fail/skip counts, which must be equal in both arms (--numpy-suite)

    python3 scripts/bench_python_workloads.py [--reps 5] [--numpy-suite] [--json FILE]
"""

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time

WORKLOADS = {
    "numpy-empty": """
import numpy as np, time
start = time.perf_counter()
for _ in range(20000):
    np.empty(1 << 15)
seconds = time.perf_counter() - start
""",
    "numpy-zeros": """
import numpy as np, time
start = time.perf_counter()
for _ in range(20000):
    np.zeros(1 << 15)
seconds = time.perf_counter() - start
""",
    "bytes": """
import time
sizes = [(64 << 10) << (i % 7) for i in range(20000)]
start = time.perf_counter()
for size in sizes:
    bytes(size)
    bytearray(size)
seconds = time.perf_counter() - start
""",
    "torch": """
import time, torch
torch.manual_seed(0)
torch.set_num_threads(1)
model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)]).eval()
batch = torch.randn(256, 1024)
with torch.no_grad():
    for _ in range(20):
        model(batch)
    start = time.perf_counter()
    for _ in range(200):
        model(batch)
    seconds = time.perf_counter() - start
""",
}
REPORT = """
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
import json
print(json.dumps({"seconds": seconds, "peak_kib": peak}))
"""


def say(text):
    print(text, file=sys.stderr, flush=True)


def command(arm, program):
    prefix = ["ksm-wrap"] if arm == "shim" else []
    return [*prefix, sys.executable, *program]


def run_workload(arm, name):
    result = subprocess.run(
        command(arm, ["-c", WORKLOADS[name] + REPORT]),
        capture_output=True,
        text=True,
        env=dict(os.environ, KSMPRELOAD_STATS_DIR="off"),
        timeout=1200,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{name} ({arm}) failed: {result.stderr.strip()[-500:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_numpy_suite(arm):
    program = [
        "-m",
        "pytest",
        "--pyargs",
        "numpy._core",
        "-m",
        "not slow",
        "-q",
        "-p",
        "no:cacheprovider",
        "--no-header",
    ]
    start = time.perf_counter()
    result = subprocess.run(
        command(arm, program),
        capture_output=True,
        text=True,
        cwd="/tmp",
        env=dict(os.environ, KSMPRELOAD_STATS_DIR="off"),
        timeout=3600,
    )
    seconds = time.perf_counter() - start
    counts = dict(
        (word, int(number))
        for number, word in re.findall(
            r"(\d+) (passed|failed|skipped|xfailed|xpassed|errors?)", result.stdout.splitlines()[-1]
        )
    )
    return {"seconds": seconds, "counts": counts}


def compare(name, reps, run):
    runs = {"alone": [], "shim": []}
    for rep in range(reps):
        for arm in ("alone", "shim") if rep % 2 == 0 else ("shim", "alone"):
            runs[arm].append(run(arm))
    case = {"workload": name, "reps": reps}
    for arm, results in runs.items():
        case[arm] = {
            "seconds": statistics.median(r["seconds"] for r in results),
            "all_seconds": [round(r["seconds"], 4) for r in results],
        }
        if "peak_kib" in results[0]:
            case[arm]["peak_kib"] = statistics.median(r["peak_kib"] for r in results)
        if "counts" in results[0]:
            case[arm]["counts"] = results[0]["counts"]
            case[arm]["counts_equal"] = all(r["counts"] == results[0]["counts"] for r in results)
    case["ratio"] = case["shim"]["seconds"] / case["alone"]["seconds"]
    say(f"{name}: alone {case['alone']['seconds']:.3f} s, shim {case['shim']['seconds']:.3f} s, {case['ratio']:.3f}x")
    return case


def markdown(cases):
    lines = [
        "| workload | alone s (median) | ksm-wrap s (median) | ksm-wrap/alone | peak RSS MiB alone → ksm-wrap |",
        "|---|---:|---:|---:|---|",
    ]
    for c in cases:
        peak = (
            f"{c['alone']['peak_kib'] / 1024:.0f} → {c['shim']['peak_kib'] / 1024:.0f}"
            if "peak_kib" in c["alone"]
            else ""
        )
        lines.append(
            f"| {c['workload']} | {c['alone']['seconds']:.3f} | {c['shim']['seconds']:.3f} "
            f"| {c['ratio']:.3f} | {peak} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--numpy-suite", action="store_true", help="also numpy's core test suite (minutes a run)")
    parser.add_argument("--suite-reps", type=int, default=2)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    import ksmpreload

    say(f"ksm-wrap: {shutil.which('ksm-wrap')}, shim {ksmpreload.shim_path()} (KSMPRELOAD_SHIM chooses another)")
    cases = [
        compare(name, args.reps, lambda arm, name=name: run_workload(arm, name))
        for name in args.workloads.split(",")
        if name
    ]
    if args.numpy_suite:
        suite = compare("numpy-suite", args.suite_reps, run_numpy_suite)
        say(f"numpy-suite counts: alone {suite['alone']['counts']}, shim {suite['shim']['counts']}")
        cases.append(suite)
    print(
        f"machine: {platform.node()}, {os.cpu_count()} CPUs, kernel {platform.release()}, "
        f"Python {platform.python_version()}\n"
    )
    print(markdown(cases))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(cases, f, indent=1)
    suites = [c for c in cases if "counts" in c["alone"]]
    if any(c["alone"]["counts"] != c["shim"]["counts"] for c in suites):
        sys.exit("the numpy suite's results differ between arms")


if __name__ == "__main__":
    main()
