#!/usr/bin/env python3
"""Large-block churn with and without the shim, side by side, per allocator (issue 12).

Builds scripts/bench/large_churn.c (cc -O2 -pthread, in a temporary directory) and runs it for
each allocator (glibc; jemalloc, mimalloc, tcmalloc where Debian's library is installed),
pattern (loop, calloc, realloc, threads, handoff, mixed: see the C file) and size (the shim's 8 KiB
threshold up to 16 MiB), alone and under the shim (LD_PRELOAD="<shim> <allocator>",
KSMPRELOAD_STATS_DIR=off). Rounds are sized so that each run writes about --mib MiB; blocks of
64 KiB and less run --min-rounds at least (a loop of 8 KiB blocks takes well under a
millisecond otherwise, too short to time on a shared machine).
Repetitions are interleaved (alone, shim; shim, alone; ...), so drift falls on both sides.

A third arm, `floor` (scripts/bench/align_floor.c), only calls the allocator's posix_memalign(4096)
for blocks from 8 KiB: what page alignment through the allocator's API costs before the shim adds
anything (patterns loop, threads, handoff and mixed, which call malloc and free only). With
--baseline SHIM, another build of the shim runs as a fourth arm in the same interleaved order
(before and after a change, in one run).

Reported per case: the median loop time of each arm and shim/alone as the ratio of medians;
minor faults per round and peak RSS of each arm (from getrusage, median); and, from one extra
run of each arm under `strace -f -c`, the mapping system calls (mmap, munmap, mremap, brk,
madvise) per round. The checksum of what the workload read back must match between arms
(exit 1 if not: the shim changed a result).

    python3 scripts/bench_large_churn.py [--reps 5] [--mib 256] [--min-rounds 65536] [--sizes 8K,256K,16M]
        [--patterns loop,calloc] [--allocators glibc,jemalloc] [--json FILE]
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "bench", "large_churn.c")
FLOOR_SOURCE = os.path.join(HERE, "bench", "align_floor.c")
FLOOR_PATTERNS = {"loop", "threads", "handoff", "mixed"}  # those that call malloc and free only
LIBS = "/usr/lib/x86_64-linux-gnu"
ALLOCATORS = {
    "glibc": "",
    "jemalloc": f"{LIBS}/libjemalloc.so.2",
    "mimalloc": f"{LIBS}/libmimalloc.so.2",
    "tcmalloc": f"{LIBS}/libtcmalloc_minimal.so.4",
}
PATTERNS = ["loop", "calloc", "realloc", "threads", "handoff", "mixed"]
SIZES = ["8K", "64K", "256K", "1M", "4M", "16M"]
SMALL_BLOCK = 64 << 10
MAPPING_CALLS = ("mmap", "munmap", "mremap", "brk", "madvise")


def say(text):
    print(text, file=sys.stderr, flush=True)


def parse_size(text):
    units = {"K": 10, "M": 20, "G": 30}
    return int(text[:-1]) << units[text[-1]] if text[-1] in units else int(text)


def build(directory):
    program = os.path.join(directory, "large_churn")
    subprocess.run(["cc", "-O2", "-pthread", "-o", program, SOURCE], check=True)
    floor = os.path.join(directory, "align_floor.so")
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", floor, FLOOR_SOURCE, "-ldl"], check=True)
    return program, floor


def environment(allocator, shim):
    preload = " ".join(path for path in (shim, ALLOCATORS[allocator]) if path)
    return dict(os.environ, LD_PRELOAD=preload, KSMPRELOAD_STATS_DIR="off")


def run_once(command, env):
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return json.loads(result.stdout)


def mapping_calls(command, env):
    """Mapping system calls of one run, counted by strace -f -c."""
    result = subprocess.run(
        ["strace", "-f", "-qq", "-c", "-U", "calls,name", "-e", "trace=" + ",".join(MAPPING_CALLS), *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    counts = {
        fields[1]: int(fields[0])
        for fields in map(str.split, result.stderr.splitlines())
        if len(fields) == 2 and fields[0].isdigit()
    }
    return sum(counts.get(name, 0) for name in MAPPING_CALLS)


def measure_case(program, libraries, allocator, pattern, size, rounds, reps):
    """libraries: {"shim": path, "floor": path}; the floor arm runs only for FLOOR_PATTERNS."""
    command = [program, pattern, str(size), str(rounds)]
    arms = {"alone": environment(allocator, ""), "shim": environment(allocator, libraries["shim"])}
    if pattern in FLOOR_PATTERNS:
        arms["floor"] = environment(allocator, libraries["floor"])
    if libraries.get("baseline"):
        arms["baseline"] = environment(allocator, libraries["baseline"])
    runs = {arm: [] for arm in arms}
    for rep in range(reps):
        for arm in list(arms) if rep % 2 == 0 else reversed(list(arms)):
            runs[arm].append(run_once(command, arms[arm]))
    checksums = {run["checksum"] for arm in runs for run in runs[arm]}
    case = {
        "allocator": allocator,
        "pattern": pattern,
        "size": size,
        "rounds": rounds,
        "checksums_match": len(checksums) == 1,
    }
    for arm, env in arms.items():
        if arm in ("floor", "baseline"):
            case[f"{arm}_seconds"] = statistics.median(run["seconds"] for run in runs[arm])
            case[f"{arm}_ratio"] = case[f"{arm}_seconds"] / statistics.median(run["seconds"] for run in runs["alone"])
            continue
        case[arm] = {
            "seconds": statistics.median(run["seconds"] for run in runs[arm]),
            "faults_per_round": statistics.median(run["minor_faults"] for run in runs[arm]) / rounds,
            "max_rss_kib": statistics.median(run["max_rss_kib"] for run in runs[arm]),
            "mapping_calls_per_round": mapping_calls(command, env) / rounds,
        }
    case["time_ratio"] = case["shim"]["seconds"] / case["alone"]["seconds"]
    case["rss_ratio"] = case["shim"]["max_rss_kib"] / case["alone"]["max_rss_kib"]
    return case


def markdown(cases):
    baseline = any("baseline_ratio" in c for c in cases)
    lines = [
        "| allocator | pattern | size | time shim/alone |"
        + (" baseline/alone |" if baseline else "")
        + " floor/alone | alone s | shim s | faults/round alone → shim "
        "| map calls/round alone → shim | peak RSS MiB alone → shim |",
        "|---|---|---:|---:|" + ("---:|" if baseline else "") + "---:|---:|---:|---|---|---|",
    ]
    for c in cases:
        a, s = c["alone"], c["shim"]
        floor = f"{c['floor_ratio']:.2f}" if "floor_ratio" in c else "—"
        before = f" {c['baseline_ratio']:.2f} |" if baseline else ""
        lines.append(
            f"| {c['allocator']} | {c['pattern']} | {size_text(c['size'])} | {c['time_ratio']:.2f} |{before} {floor} "
            f"| {a['seconds']:.4f} | {s['seconds']:.4f} "
            f"| {a['faults_per_round']:.1f} → {s['faults_per_round']:.1f} "
            f"| {a['mapping_calls_per_round']:.2f} → {s['mapping_calls_per_round']:.2f} "
            f"| {a['max_rss_kib'] / 1024:.1f} → {s['max_rss_kib'] / 1024:.1f} |"
        )
    return "\n".join(lines)


def size_text(size):
    for suffix, shift in (("M", 20), ("K", 10)):
        if size % (1 << shift) == 0:
            return f"{size >> shift}{suffix}"
    return str(size)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--mib", type=int, default=256, help="MiB each run allocates and writes (rounds = this / size)")
    parser.add_argument("--min-rounds", type=int, default=65536, help="rounds at least, for blocks of 64 KiB and less")
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--patterns", default=",".join(PATTERNS))
    parser.add_argument("--allocators", default=",".join(ALLOCATORS))
    parser.add_argument("--baseline", metavar="SHIM", help="another build of the shim, run as a fourth arm")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    import ksmpreload

    allocators = [a for a in args.allocators.split(",") if not ALLOCATORS[a] or os.path.exists(ALLOCATORS[a])]
    if not shutil.which("strace"):
        sys.exit("strace is missing (apt-get install strace)")
    with tempfile.TemporaryDirectory() as directory:
        say(f"shim: {ksmpreload.shim_path()} (KSMPRELOAD_SHIM chooses another)")
        shim = shutil.copy(ksmpreload.shim_path(), os.path.join(directory, "libksmpreload.so"))
        program, floor = build(directory)
        libraries = {"shim": shim, "floor": floor}
        if args.baseline:
            libraries["baseline"] = shutil.copy(args.baseline, os.path.join(directory, "baseline.so"))
        cases = []
        for allocator in allocators:
            for pattern in args.patterns.split(","):
                for size in map(parse_size, args.sizes.split(",")):
                    rounds = max(args.min_rounds if size <= SMALL_BLOCK else 16, (args.mib << 20) // size)
                    case = measure_case(program, libraries, allocator, pattern, size, rounds, args.reps)
                    say(
                        f"{allocator} {pattern} {size_text(size)}: {case['time_ratio']:.2f}x, "
                        f"map calls/round {case['alone']['mapping_calls_per_round']:.2f} -> "
                        f"{case['shim']['mapping_calls_per_round']:.2f}"
                    )
                    cases.append(case)
    print(
        f"machine: {platform.node()}, {os.cpu_count()} CPUs, kernel {platform.release()}; "
        f"reps {args.reps}, {args.mib} MiB written per run, {args.min_rounds} rounds at least up to {size_text(SMALL_BLOCK)}\n"
    )
    print(markdown(cases))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"reps": args.reps, "mib": args.mib, "min_rounds": args.min_rounds, "cases": cases}, f, indent=1)
    if not all(case["checksums_match"] for case in cases):
        sys.exit("the shim changed a result: checksums differ between arms")


if __name__ == "__main__":
    main()
