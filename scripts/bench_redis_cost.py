#!/usr/bin/env python3
"""What the shim costs Redis: redis-benchmark against redis-server with and without it.

Arms (each a fresh redis-server on a free loopback port, no persistence):

    redis                no preload
    redis+shim           ksm-wrap redis-server ...                      (default strategy: auto)
    redis+shim,madvise   ksm-wrap --strategy madvise redis-server ...
    redis+shim,no-align  ksm-wrap --no-align redis-server ...            (with --noalign-arm)

For each value size, every round runs each arm once, in reverse order every other round
(A B C, C B A, ...), so drift in the machine's speed falls on all arms alike. A run starts
the server, runs

    redis-benchmark -h 127.0.0.1 -p PORT -q -t set,get,lpush,lpop -n N -d SIZE

(redis-benchmark itself never gets the shim), reads the server's CPU time and the shim's
counters, and stops the server. Reported per size, test and arm: median, min and max
requests/s; shim/no-shim as the ratio of medians and as the median and range of the
per-round ratios (above 1: faster with the shim); and the server's CPU time per run.
The shim is the installed package's, copied once at the start (a reinstall during the run
cannot mix two builds) and handed to ksm-wrap through KSMPRELOAD_SHIM; counters go to a
private directory. KSM may be on or off: this measures the shim, not ksmd (the report says
which it was).

    python3 scripts/bench_redis_cost.py [--reps 5] [--sizes 100,16K] [--requests 100000]
                                        [--noalign-arm] [--json]

Redis keeps every LPUSHed value until LPOP takes it: with -d 16K and -n 100000 the server
grows to about 2 GB.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from bench_shim_cost import cpu_model, installed_shim, ksm_run, loadavg, say, sha256

from ksmpreload.workloads.redis import server_command

TESTS = "set,get,lpush,lpop"
ARMS = [  # name, ksm-wrap options (None: no shim)
    ("redis", None),
    ("redis+shim", []),
    ("redis+shim,madvise", ["--strategy", "madvise"]),
]
NOALIGN_ARM = ("redis+shim,no-align", ["--no-align"])
BASELINE = "redis"


def parse_size(text):
    units = {"": 1, "K": 1024, "M": 1024**2}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1] if text and text[-1] in units else ""
    return int(text[:-1] if unit else text) * units[unit]


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_pong(port, proc, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode} before answering")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"redis-server on port {port} did not answer PING within {timeout:.0f} s")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def maps_shim(pid):
    with open(f"/proc/{pid}/maps") as f:
        return any("libksmpreload" in line for line in f)


def shim_counters(pid, stats_dir):
    from ksmpreload import shimstats  # the installed package, as for the shim

    stats = shimstats.read_process_stats(pid, stats_dir)
    keys = (
        "strategy",
        "threshold",
        "heap_regions",
        "mmap_regions",
        "realloc_copies",
        "madvise_calls",
        "madvise_einval",
        "madvise_enomem",
        "vma_budget_skips",
    )
    return {key: stats[key] for key in keys if key in stats} if stats else None


def parse_benchmark(output):
    """{TEST: requests/s} from redis-benchmark -q output (progress lines end with \\r)."""
    rates = {}
    for line in output.replace("\r", "\n").splitlines():
        name, sep, rest = line.partition(": ")
        if sep and " requests per second" in rest:
            rates[name.strip()] = float(rest.split()[0])
    return rates


def run_arm(arm, wrap_options, size, requests, workdir, shim, base_env):
    port = free_port()
    server = server_command(
        port, "--daemonize", "no", "--logfile", os.path.join(workdir, f"{arm}.log"), directory=workdir
    )
    env = dict(base_env)
    env.pop("LD_PRELOAD", None)
    env["KSMPRELOAD_STATS_DIR"] = os.path.join(workdir, "stats")
    if wrap_options is None:
        command = server
    else:
        env["KSMPRELOAD_SHIM"] = shim
        command = [sys.executable, "-m", "ksmpreload.wrap", *wrap_options, *server]
    # cwd: the temporary directory, so that `-m ksmpreload.wrap` finds the installed package.
    proc = subprocess.Popen(command, env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_pong(port, proc)
        has_shim = maps_shim(proc.pid)
        if has_shim != (wrap_options is not None):
            raise RuntimeError(f"{arm}: libksmpreload {'is' if has_shim else 'is not'} mapped in redis-server")
        cpu_before = cpu_seconds(proc.pid)
        client_env = {k: v for k, v in base_env.items() if k != "LD_PRELOAD"}
        bench = subprocess.run(
            [
                "redis-benchmark",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-q",
                "-t",
                TESTS,
                "-n",
                str(requests),
                "-d",
                str(size),
            ],
            env=client_env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        cpu = cpu_seconds(proc.pid) - cpu_before
        counters = shim_counters(proc.pid, env["KSMPRELOAD_STATS_DIR"]) if has_shim else None
        if bench.returncode != 0:
            raise RuntimeError(f"redis-benchmark failed ({bench.returncode}): {bench.stderr.strip()[-500:]}")
        rates = parse_benchmark(bench.stdout)
        if len(rates) != len(TESTS.split(",")):
            raise RuntimeError(f"could not read redis-benchmark's output: {bench.stdout[-500:]!r}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {"rates": rates, "server_cpu_seconds": cpu, "shim_counters": counters, "ksm_run": ksm_run()}


def summarise(runs, arms):
    """Per test and arm: median/min/max requests/s and the ratios to the no-shim arm."""
    tests = list(runs[arms[0]][0]["rates"])
    table = []
    for test in tests:
        base = [run["rates"][test] for run in runs[BASELINE]]
        for arm in arms:
            rates = [run["rates"][test] for run in runs[arm]]
            row = {
                "test": test,
                "arm": arm,
                "rates": rates,
                "median": statistics.median(rates),
                "min": min(rates),
                "max": max(rates),
            }
            if arm != BASELINE:
                paired = [r / b for r, b in zip(rates, base)]
                row.update(
                    ratio_median=row["median"] / statistics.median(base),
                    ratio_paired_median=statistics.median(paired),
                    ratio_paired_min=min(paired),
                    ratio_paired_max=max(paired),
                )
            table.append(row)
    cpu = []
    base_cpu = statistics.median(run["server_cpu_seconds"] for run in runs[BASELINE])
    for arm in arms:
        values = [run["server_cpu_seconds"] for run in runs[arm]]
        row = {"arm": arm, "cpu_seconds": values, "median": statistics.median(values)}
        if arm != BASELINE:
            row["ratio_median"] = row["median"] / base_cpu
        cpu.append(row)
    return table, cpu


def print_table(report):
    ksm = ", ".join(report.get("ksm_run_seen", [str(report["machine"]["ksm_run"])]))
    print(f"shim: {report['shim']} (sha256 {report['shim_sha256'][:12]}); KSM run: {ksm}")
    print(f"{report['redis']}; {report['reps']} interleaved rounds per arm, {report['requests']} requests per test")
    for size in report["sizes"]:
        print()
        print(
            f"value size {size['size']} bytes: redis-benchmark -q -t {TESTS} -n {report['requests']} -d {size['size']}"
        )
        print(
            f"  {'test':<6} {'arm':<20} {'median rps':>11} {'min rps':>10} {'max rps':>10} {'ratio(med)':>10} "
            f"{'paired':>7} {'paired range':>13}"
        )
        for row in size["table"]:

            def ratio(key, row=row):
                return f"{row[key]:.3f}" if key in row else "-"

            spread = (
                f"{row['ratio_paired_min']:.3f}-{row['ratio_paired_max']:.3f}" if "ratio_paired_min" in row else "-"
            )
            print(
                f"  {row['test']:<6} {row['arm']:<20} {row['median']:>11,.0f} {row['min']:>10,.0f} {row['max']:>10,.0f} "
                f"{ratio('ratio_median'):>10} {ratio('ratio_paired_median'):>7} {spread:>13}"
            )
        print(
            "  server CPU per run (s): "
            + ", ".join(
                f"{row['arm']} {row['median']:.2f}" + (f" ({row['ratio_median']:.3f})" if "ratio_median" in row else "")
                for row in size["cpu"]
            )
        )
        for arm, counters in size["shim_counters"].items():
            if counters:
                print(
                    f"  {arm} counters after its last run: "
                    + ", ".join(f"{key} {value}" for key, value in counters.items())
                )
    m = report["machine"]
    print()
    print(
        f"machine: {m['nproc']} CPUs, {m['cpu']}, kernel {m['kernel']}; load {report['load_before']} before, "
        f"{report['load_after']} after; {report['date']}"
    )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before them (default 1)")
    parser.add_argument("--sizes", default="100,16K", help="value sizes for -d, comma-separated (default 100,16K)")
    parser.add_argument("--requests", type=int, default=100_000, help="-n: requests per test (default 100000)")
    parser.add_argument(
        "--noalign-arm", action="store_true", help="also run ksm-wrap --no-align (what the page alignment costs)"
    )
    parser.add_argument("--shim", help="libksmpreload.so to preload (default: the installed package's)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    args = parser.parse_args()

    for tool in ("redis-server", "redis-benchmark"):
        if not shutil.which(tool):
            parser.error(f"{tool} not found (apt-get install redis-server redis-tools)")
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes: {args.sizes!r} is not a list of sizes")
    installed = os.path.abspath(args.shim or installed_shim())
    if not os.path.exists(installed):
        parser.error(f"no shim at {installed} (pip install . first)")
    arm_specs = ARMS + [NOALIGN_ARM] if args.noalign_arm else ARMS
    arms = [name for name, _ in arm_specs]
    base_env = dict(os.environ)

    with tempfile.TemporaryDirectory(prefix="bench_redis_cost.") as workdir:
        shim = os.path.join(workdir, "libksmpreload.so")
        shutil.copyfile(installed, shim)
        report = {
            "command": " ".join(["python3", os.path.relpath(os.path.abspath(sys.argv[0]))] + sys.argv[1:]),
            "shim": installed,
            "shim_sha256": sha256(shim),
            "redis": subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip(),
            "redis_benchmark": subprocess.run(
                ["redis-benchmark", "--version"], capture_output=True, text=True
            ).stdout.strip(),
            "reps": args.reps,
            "warmup_rounds": args.warmup,
            "requests": args.requests,
            "tests": TESTS,
            "machine": {
                "nproc": os.cpu_count(),
                "cpu": cpu_model(),
                "kernel": platform.release(),
                "ksm_run": ksm_run(),
            },
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "load_before": loadavg(),
            "sizes": [],
        }
        for size in sizes:
            runs = {arm: [] for arm in arms}
            for index in range(-args.warmup, args.reps):
                order = arm_specs if index % 2 == 0 else arm_specs[::-1]
                for arm, options in order:
                    result = run_arm(arm, options, size, args.requests, workdir, shim, base_env)
                    if index >= 0:
                        runs[arm].append(result)
                if index >= 0:
                    say(
                        f"  -d {size} round {index + 1}/{args.reps}: "
                        + "  ".join(f"{arm} SET {runs[arm][-1]['rates'].get('SET', 0):,.0f}/s" for arm in arms)
                    )
            table, cpu = summarise(runs, arms)
            report["sizes"].append(
                {
                    "size": size,
                    "runs": runs,
                    "table": table,
                    "cpu": cpu,
                    "shim_counters": {arm: runs[arm][-1]["shim_counters"] for arm in arms},
                }
            )
        if sha256(installed) != report["shim_sha256"]:
            say(f"note: {installed} changed while the benchmark ran; the figures are for the copy taken at the start")
            report["shim_changed_during_run"] = True
        report["load_after"] = loadavg()
        report["ksm_run_seen"] = sorted(
            {str(run["ksm_run"]) for size in report["sizes"] for arm_runs in size["runs"].values() for run in arm_runs}
        )

    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
