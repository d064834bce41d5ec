#!/usr/bin/env python3
"""How fast the doctor finds duplicates at any offset (ksmpreload/layout.py), side by side:

- cut alone: the C helper's content-defined chunking of random bytes held in memory, GiB/s
  on one thread, and on every CPU (threads: cffi releases the GIL);
- read alone: the holders' anonymous memory read from /proc/PID/mem in runs of 1 MiB (as the
  analysis reads it), on one thread and on every CPU: what the kernel's copy from another
  process allows;
- the whole analysis of PROCESSES CPython processes (tests/bytes_holder.py, the same bytes
  objects in other heap layouts: COUNT values of 12-60 KiB each), on one thread and on every
  CPU, GiB of their memory read per second; the chunk array it holds, MiB per GiB read.

    sudo python3 scripts/bench_layout.py [--processes 2] [--count 3000] [--reps 5] [--json]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

from ksmpreload import layout, native

GIB = 1 << 30
HOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "bytes_holder.py")


def on_threads(work, parts):
    """Seconds to run work(part) for every part at once, a thread each."""
    threads = [threading.Thread(target=work, args=(part,)) for part in parts]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def cut(parts):
    def one(data):
        cap = len(data) // native.lib.KSM_CDC_MIN + 1
        native.lib.ksm_cdc_chunks(data, len(data), 0, native.ffi.new("struct ksm_chunk[]", cap), cap)

    return on_threads(one, parts)


def cut_rates(reps, cpus):
    data = os.urandom(256 << 20)
    alone = [cut([data]) for _ in range(reps)]
    step = len(data) // cpus
    spread = [cut([data[i * step : (i + 1) * step] for i in range(cpus)]) for _ in range(reps)]
    return len(data) / statistics.median(alone) / GIB, len(data) / statistics.median(spread) / GIB


def memory_runs(pid):
    """(mem fd, [(offset, bytes)]) of the process's private anonymous memory, in runs of 1 MiB."""
    runs = []
    for line in open(f"/proc/{pid}/maps"):
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if len(fields) < 6 and fields[1].startswith("rw") and fields[1][3] == "p":
            runs += [(at, min(1 << 20, end - at)) for at in range(start, end, 1 << 20)]
    return os.open(f"/proc/{pid}/mem", os.O_RDONLY), runs


def read_rates(pids, reps, cpus):
    """GiB/s reading every run once, on one thread and on `cpus` threads (runs dealt in turn)."""
    work = [(fd, at, size) for fd, runs in map(memory_runs, pids) for at, size in runs]
    total = sum(size for _, _, size in work)

    def read(part):
        buffer = bytearray(1 << 20)
        for fd, at, size in part:
            try:
                os.preadv(fd, [memoryview(buffer)[:size]], at)
            except OSError:  # a page range not in RAM or gone: the analysis skips it too
                pass

    one = statistics.median(on_threads(read, [work]) for _ in range(reps))
    spread = statistics.median(on_threads(read, [work[i::cpus] for i in range(cpus)]) for _ in range(reps))
    for fd in {fd for fd, _, _ in work}:
        os.close(fd)
    return total / one / GIB, total / spread / GIB


def analysis_rates(pids, reps, cpus):
    rates = {}
    for threads in (1, cpus):
        seconds, found = [], None
        for _ in range(reps):
            started = time.perf_counter()
            found = layout.duplicates_at_any_offset(pids, threads=threads)
            seconds.append(time.perf_counter() - started)
        rates[threads] = found.bytes_read / statistics.median(seconds) / GIB
    return rates, found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    holders = [
        subprocess.Popen([sys.executable, HOLDER, str(seed), str(args.count)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
        for seed in range(1, args.processes + 1)
    ]  # fmt: skip
    try:
        for proc in holders:
            proc.stdout.readline()
        rates, found = analysis_rates([proc.pid for proc in holders], args.reps, cpus)
        read_one, read_all = read_rates([proc.pid for proc in holders], args.reps, cpus)
    finally:
        for proc in holders:
            proc.stdin.close()
            proc.wait()
    cut_one, cut_all = cut_rates(args.reps, cpus)
    result = {
        "cpus": cpus,
        "kernel": platform.release(),
        "cut_gib_s": {"1": round(cut_one, 2), str(cpus): round(cut_all, 2), "ratio": round(cut_all / cut_one, 2)},
        "read_gib_s": {"1": round(read_one, 2), str(cpus): round(read_all, 2), "ratio": round(read_all / read_one, 2)},
        "analysis_gib_s": {
            "1": round(rates[1], 2),
            str(cpus): round(rates[cpus], 2),
            "ratio": round(rates[cpus] / rates[1], 2),
        },  # fmt: skip
        "read_mib": round(found.bytes_read / (1 << 20), 1),
        "duplicate_mib": round(found.duplicate_bytes / (1 << 20), 1),
        "chunk_array_mib_per_gib": round(found.chunks * layout.CHUNK_BYTES / found.bytes_read * 1024, 1),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"| | 1 thread | {cpus} threads | ratio |")
    print("|---|---:|---:|---:|")
    rows = (("cutting alone, GiB/s", "cut_gib_s"), ("reading /proc/PID/mem alone, GiB/s", "read_gib_s"),
            ("whole analysis, GiB/s", "analysis_gib_s"))  # fmt: skip
    for name, key in rows:
        row = result[key]
        print(f"| {name} | {row['1']} | {row[str(cpus)]} | {row['ratio']} |")
    print(f"read {result['read_mib']} MiB, {result['duplicate_mib']} MiB duplicate; "
          f"chunk array {result['chunk_array_mib_per_gib']} MiB per GiB read")  # fmt: skip


if __name__ == "__main__":
    main()
