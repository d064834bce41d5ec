#!/usr/bin/env python3
"""ksmd's scan-rate policies side by side on one scripted sequence (issue 18).

The sequence, scaled to --minutes (10 by default): two redis-servers start and load the same
values (0%); a steady period; two PyTorch workers arrive holding the same weights (40%); a
process of random data arrives (60%); the workers leave (80%); the end (100%). Every process
merges as a whole (PR_SET_MEMORY_MERGE before exec), so the policies differ only in how ksmd
scans. It is run once under each policy:

- default: KSM on at the kernel's default rate (100 pages every 20 ms);
- fixed: the rate `ksm-wrap --enable-ksm` sets (a pass over RAM about once a minute);
- advisor: the kernel's advisor, advisor_mode=scan-time, its defaults (6.8+);
- mom: the KubeVirt / oVirt MOM rules, from their published numbers: every 60 s (scaled), KSM on
  while free memory is under 20% of RAM, pages_to_scan +300 when on, -50 when not, within
  64..1250, sleep_millisecs 10 * 16 GiB / RAM (at least 10);
- governor: `ksmpreload governor` with its defaults.

Per policy: ksmd CPU-seconds, seconds from each arrival to 90% of the saving that phase
reached, the saving integrated over time (MiB x s), the saving at the end, and ksmd's share of
a core over the steady period (25-40%: nothing new to merge) and after the workers left (85-100%). Needs root and KSM; every knob is put back.

    sudo python3 scripts/bench_governor.py [--minutes 10] [--policies ...] [--json F] [--plot F.png]
    python3 scripts/bench_governor.py --minutes M --from-json F [--plot F.png]   # figures again
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import subprocess
import sys
import time

from ksmpreload import kernel
from ksmpreload.workloads import redis as redis_workload
from ksmpreload.workloads.servers import free_port

POLICIES = ("default", "fixed", "advisor", "mom", "governor")
KNOBS = ("run", "pages_to_scan", "sleep_millisecs", "advisor_mode", "smart_scan")
PHASES = ((0.0, "redis"), (0.4, "workers"), (0.6, "random"), (0.8, "workers leave"))
MIB = 1 << 20
HOLDER = """
import random, sys
kind, mib = sys.argv[1], int(sys.argv[2])
if kind == "torch":
    import torch
    torch.manual_seed(0)
    weights = torch.randn(mib * 1024 * 256)  # the same weights in every worker
else:
    data = [random.randbytes(1 << 20) for _ in range(mib)]
print("ready", flush=True)
sys.stdin.read()
"""


def merging_from_exec():
    ctypes.CDLL(None, use_errno=True).prctl(67, 1, 0, 0, 0)


def start(command):
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            preexec_fn=merging_from_exec, cwd="/", text=True)  # fmt: skip


def start_holder(kind, mib):
    proc = start([sys.executable, "-c", HOLDER, kind, str(mib)])
    assert proc.stdout.readline() == "ready\n", f"the {kind} holder did not start"
    return proc


def start_redis(values_mib):
    import redis

    port = free_port()
    proc = start(redis_workload.server_command(port))
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=60)
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(redis.exceptions.ConnectionError):
            if client.ping():
                break
        if time.monotonic() > deadline:
            raise SystemExit("redis-server did not start")
        time.sleep(0.05)
    # values of 64 KiB repeating one of 32 patterns of 64 bytes: their pages are equal wherever
    # jemalloc puts them (at a multiple of 64 bytes), so what merges does not depend on the layout
    patterns = [os.urandom(64) for _ in range(32)]
    redis_workload.load(client, ((f"k:{i}".encode(), patterns[i % 32] * 1024) for i in range(values_mib * 16)))
    return proc


def stop(procs):
    for proc in procs:
        proc.kill()
        proc.wait()


def mom_step():
    """One MOM/KubeVirt decision: KSM on under memory pressure (free < 20%), rate +300 / -50."""
    with open("/proc/meminfo") as meminfo:
        fields = {line.split(":")[0]: int(line.split()[1]) for line in meminfo}
    pressure = fields["MemAvailable"] < 0.2 * fields["MemTotal"]
    pages = kernel.read_knob("pages_to_scan")
    pages = min(pages + 300, 1250) if pressure else max(pages - 50, 64)
    kernel.write_knob("pages_to_scan", pages)
    kernel.write_knob("sleep_millisecs", max(10, round(10 * 16 * (1 << 30) / (fields["MemTotal"] * 1024))))
    kernel.write_knob("run", 1 if pressure else 0)


def set_policy(policy):
    """The knobs of a policy at its start; a governor process for `governor`."""
    if policy != "advisor" and kernel.read_knob("advisor_mode") not in (None, "none"):
        kernel.write_knob("advisor_mode", "none")
    kernel.write_knob("pages_to_scan", 100)
    kernel.write_knob("sleep_millisecs", 20)
    if policy == "default":
        kernel.write_knob("run", 1)
    elif policy == "fixed":
        kernel.write_knob("pages_to_scan", kernel.suggested_pages_to_scan(kernel.mem_total_bytes()))
        kernel.write_knob("run", 1)
    elif policy == "advisor":
        kernel.write_knob("advisor_mode", "scan-time")
        kernel.write_knob("run", 1)
    elif policy == "mom":
        mom_step()
    elif policy == "governor":
        return subprocess.Popen(["ksmpreload", "governor"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return None


def run_policy(policy, seconds, redis_mib, worker_mib, random_mib):
    """Samples (t, saved MiB, ksmd CPU s) every second over the sequence, under `policy`."""
    kernel.write_knob("run", 2)  # unmerge what the policy before left (done when the write returns)
    kernel.write_knob("run", 0)  # off, as a machine starts; run 2 would be an operator's unmerge to the governor
    governor = set_policy(policy)
    ksmd = kernel.ksmd_pid()
    cpu0, t0 = kernel.cpu_seconds(ksmd), time.monotonic()
    procs, workers, samples, done = [], [], [], set()
    mom_period, next_mom = 60 * seconds / 600, 0.0  # MOM's 60 s, scaled with the sequence
    try:
        while (now := time.monotonic() - t0) < seconds:
            for fraction, phase in PHASES:
                if now >= fraction * seconds and phase not in done:
                    done.add(phase)
                    if phase == "redis":
                        procs += [start_redis(redis_mib) for _ in range(2)]
                    elif phase == "workers":
                        workers = [start_holder("torch", worker_mib) for _ in range(2)]
                    elif phase == "random":
                        procs.append(start_holder("random", random_mib))
                    else:
                        stop(workers)
            if policy == "mom" and now >= next_mom:
                mom_step()
                next_mom += mom_period
            knobs = kernel.read_knobs()
            samples.append((round(now, 2), kernel.pages_saved(knobs) * kernel.page_size() / MIB,
                            kernel.cpu_seconds(ksmd) - cpu0))  # fmt: skip
            time.sleep(1)
    finally:
        stop(procs + workers)
        if governor:
            governor.terminate()
            governor.wait(timeout=30)
    return samples


def seconds_to_90_percent(samples, start, end):
    """Seconds from `start` until the saving had risen by 90% of what it rose to by `end` (its
    peak in that window over its value at `start`); None when it rose by less than 1 MiB."""
    window = [(t, saved) for t, saved, _ in samples if start <= t < end]
    if not window:
        return None
    base = window[0][1]
    gain = max(saved for _, saved in window) - base
    if gain < 1:
        return None
    return round(next(t for t, saved in window if saved - base >= 0.9 * gain) - start, 1)


def summary(samples, seconds):
    """The figures of one policy's samples."""
    integrated = sum(saved for _, saved, _ in samples)  # one sample a second
    ends = [fraction for fraction, _ in PHASES[1:]] + [1.0]
    ninety = {
        phase: seconds_to_90_percent(samples, fraction * seconds, end * seconds)
        for (fraction, phase), end in zip(PHASES[:3], ends)
    }
    return {
        "ksmd_cpu_seconds": round(samples[-1][2], 2),
        "seconds_to_90_percent": ninety,
        "integrated_saving_mib_s": round(integrated),
        "saving_at_end_mib": round(samples[-1][1], 1),
        "steady_ksmd_percent": ksmd_percent(samples, 0.25 * seconds, 0.4 * seconds),
        "end_ksmd_percent": ksmd_percent(samples, 0.85 * seconds, seconds),
    }


def ksmd_percent(samples, start, end):
    """ksmd's share of a core from `start` to `end` (seconds into the sequence), in percent."""
    window = [(t, cpu) for t, _, cpu in samples if start <= t < end]
    if len(window) < 2:
        return None
    return round(100 * (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0]), 2)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (saving, cpu) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    for policy, entry in results.items():
        times = [t for t, _, _ in entry["samples"]]
        saving.plot(times, [saved for _, saved, _ in entry["samples"]], label=policy)
        cpu.plot(times, [c for _, _, c in entry["samples"]], label=policy)
    saving.set_ylabel("KSM saving, MiB")
    cpu.set_ylabel("ksmd CPU seconds")
    cpu.set_xlabel("seconds into the sequence")
    saving.legend()
    figure.savefig(path, dpi=100, bbox_inches="tight")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--redis-mib", type=int, default=128, help="values each redis-server holds")
    parser.add_argument("--worker-mib", type=int, default=256, help="weights each PyTorch worker holds")
    parser.add_argument("--random-mib", type=int, default=256)
    parser.add_argument("--json")
    parser.add_argument("--plot")
    parser.add_argument("--from-json", help="no run: the figures and plot again from a --json file of a run")
    args = parser.parse_args()
    seconds, results = args.minutes * 60, {}
    if args.from_json:
        with open(args.from_json) as saved_run:
            results = {policy: {**summary(e["samples"], seconds), "samples": e["samples"]}
                       for policy, e in json.load(saved_run).items()}  # fmt: skip
        for policy, entry in results.items():
            print(policy, json.dumps({k: v for k, v in entry.items() if k != "samples"}))
        if args.plot:
            plot(results, args.plot)
        return
    saved = {name: kernel.read_knob(name) for name in KNOBS}
    try:
        for policy in args.policies.split(","):
            if policy not in POLICIES:
                raise SystemExit(f"no policy {policy!r}: {', '.join(POLICIES)}")
            samples = run_policy(policy, seconds, args.redis_mib, args.worker_mib, args.random_mib)
            results[policy] = {**summary(samples, seconds), "samples": samples}
            print(policy, json.dumps({k: v for k, v in results[policy].items() if k != "samples"}), flush=True)
    finally:
        kernel.write_knob("run", 2)
        if saved["advisor_mode"] not in (None, kernel.read_knob("advisor_mode")):
            kernel.write_knob("advisor_mode", "none")
        for name in ("pages_to_scan", "sleep_millisecs", "smart_scan", "advisor_mode", "run"):
            if saved[name] is not None and kernel.read_knob(name) != saved[name]:
                kernel.write_knob(name, saved[name])
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
