#!/usr/bin/env python3
"""What the shim costs a malloc-heavy program: the same run with and without it, side by side.

Builds scripts/bench/malloc_heavy.c (cc -O2 -pthread, in a temporary directory), then for
each case ("small": 8..1024-byte blocks only; "mixed": 5% of new blocks 16..256 KiB) runs
the workload in four arms:

    glibc            no preload
    glibc+shim       LD_PRELOAD=<shim>
    jemalloc         LD_PRELOAD=<libjemalloc.so.2>
    jemalloc+shim    LD_PRELOAD="<shim> <libjemalloc.so.2>"

Repetitions are interleaved (one run of every arm per round; within each allocator the
shim goes second on even rounds and first on odd ones), so drift in the machine's speed
falls on both sides alike. Every arm has KSMPRELOAD_STATS_DIR=off. The shim is the installed
package's (ksmpreload.shim_path()), copied once at the start so that a reinstall during the
run cannot mix two builds. --noalign-arms adds each shim arm again with KSMPRELOAD_ALIGN=0.
The workload's checksum must be the same in every arm: the shim must not change results
(exit 1 if not).

Reported per case and arm: median, min and max of the allocation loop's wall time, and
shim/no-shim as the ratio of medians, of minimums, and the median of the per-round ratios;
also the median user+sys CPU time of the whole process and its ratio, and ksmd's CPU share
while the arm ran (other work on the machine shows up there).
With --instructions, the small case also runs once per arm under callgrind (fewer
iterations; only the workload's allocation_loop and what it calls is counted), which gives
a repeatable instruction ratio and the shim's own instructions per call.

    python3 scripts/bench_shim_cost.py [--reps 7] [--instructions] [--json]
"""

import argparse
import collections
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "bench", "malloc_heavy.c")
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
CASES = {"small": 0.0, "mixed": 0.05}


def say(text):
    print(text, file=sys.stderr, flush=True)


def installed_shim():
    # Run from scripts/, so this is the installed package, not the source tree.
    import ksmpreload

    return ksmpreload.shim_path()


def build_workload(directory, cc):
    program = os.path.join(directory, "malloc_heavy")
    subprocess.run([cc, "-O2", "-pthread", "-o", program, SOURCE], check=True)
    return program


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def ksmd_ticks():
    """utime+stime of ksmd in clock ticks, or None when there is no ksmd."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                text = f.read()
        except OSError:
            continue
        if text[text.index("(") + 1 : text.rindex(")")] == "ksmd":
            fields = text[text.rindex(")") + 2 :].split()
            return int(fields[11]) + int(fields[12])
    return None


def arm_env(arm, base):
    env = dict(base)
    env.pop("LD_PRELOAD", None)
    env.pop("KSMPRELOAD_ALIGN", None)
    env["KSMPRELOAD_STATS_DIR"] = "off"  # in every arm, so the environments differ only by LD_PRELOAD
    if arm.preload:
        env["LD_PRELOAD"] = arm.preload
    env.update(arm.env)
    return env


def run_workload(program, workload_args, env):
    ksmd_before = ksmd_ticks()
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    proc = subprocess.Popen(
        [program, *workload_args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out, err = proc.communicate()
    elapsed = time.monotonic() - start
    ksmd_after = ksmd_ticks()
    usage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"workload failed ({proc.returncode}): {err.strip()}")
    result = json.loads(out.strip().splitlines()[-1])
    # user+sys of the whole process (start-up included): less sensitive than wall time to
    # waiting for a CPU when other work shares the machine.
    result["cpu_seconds"] = (usage_after.ru_utime - usage_before.ru_utime) + (
        usage_after.ru_stime - usage_before.ru_stime
    )
    if ksmd_before is not None and ksmd_after is not None and elapsed > 0:
        result["ksmd_cpu"] = (ksmd_after - ksmd_before) / os.sysconf("SC_CLK_TCK") / elapsed
    return result


def shim_configuration(program, shim, base):
    """What the shim says about itself at start-up (strategy, threshold)."""
    env = arm_env(Arm("shim", None, shim, {}), base)
    env["KSMPRELOAD_VERBOSE"] = "1"
    proc = subprocess.run([program, "-t", "1", "-n", "1000"], env=env, capture_output=True, text=True, check=True)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ksmpreload:")]
    if not lines:
        raise RuntimeError(f"{shim} did not load (no 'ksmpreload:' line with KSMPRELOAD_VERBOSE=1)")
    return lines[-1]


Arm = collections.namedtuple("Arm", "name baseline preload env")


def arms(shim, jemalloc, noalign):
    """Groups of arms, one per allocator: no shim first, then the shim arms compared with it."""
    groups = []
    for allocator, library in [("glibc", None), ("jemalloc", jemalloc)]:
        if allocator == "jemalloc" and not jemalloc:
            continue
        with_shim = f"{shim} {library}" if library else shim
        group = [Arm(allocator, None, library, {}), Arm(f"{allocator}+shim", allocator, with_shim, {})]
        if noalign:
            group.append(Arm(f"{allocator}+shim,align=0", allocator, with_shim, {"KSMPRELOAD_ALIGN": "0"}))
        groups.append(group)
    return groups


def round_order(groups, index):
    """Each allocator's arms back to back, in reverse order every other round (A B, B A, ...)."""
    order = []
    for group in groups:
        order += group if index % 2 == 0 else group[::-1]
    return order


def time_case(program, name, workload_args, groups, reps, warmup, base):
    arm_list = [arm.name for group in groups for arm in group]
    runs = {arm: [] for arm in arm_list}
    cpu = {arm: [] for arm in arm_list}
    ksmd = {arm: [] for arm in arm_list}
    checksums = {}
    for index in range(-warmup, reps):
        for spec in round_order(groups, index):
            arm = spec.name
            result = run_workload(program, workload_args, arm_env(spec, base))
            checksums.setdefault(arm, set()).add((result["checksum"], result["ops"]))
            if index >= 0:
                runs[arm].append(result["seconds"])
                cpu[arm].append(result["cpu_seconds"])
                if "ksmd_cpu" in result:
                    ksmd[arm].append(result["ksmd_cpu"])
        if index >= 0:
            say(f"  {name} round {index + 1}/{reps}: " + "  ".join(f"{arm} {runs[arm][-1]:.3f}s" for arm in arm_list))
    return runs, cpu, ksmd, checksums


def summarise(runs, cpu, ksmd, groups):
    rows = []
    for arm, baseline, _, _ in (spec for group in groups for spec in group):
        seconds = runs[arm]
        row = {
            "arm": arm,
            "runs": seconds,
            "median": statistics.median(seconds),
            "min": min(seconds),
            "max": max(seconds),
            "cpu_runs": cpu[arm],
            "cpu_median": statistics.median(cpu[arm]),
        }
        if ksmd[arm]:
            row["ksmd_cpu_median"] = statistics.median(ksmd[arm])
        if baseline:
            base = runs[baseline]
            row["ratio_median"] = row["median"] / statistics.median(base)
            row["ratio_min"] = row["min"] / min(base)
            row["ratio_paired_median"] = statistics.median(s / b for s, b in zip(seconds, base))
            row["cpu_ratio_median"] = row["cpu_median"] / statistics.median(cpu[baseline])
        rows.append(row)
    return rows


CALLGRIND_TOTAL = re.compile(r"^(?:summary|totals):\s+(\d+)", re.M)


def callgrind_arm(program, workload_args, env, directory, arm):
    out_file = os.path.join(directory, f"callgrind.{arm}.out")
    command = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out_file}",
        "--toggle-collect=allocation_loop",
        program,
        *workload_args,
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"callgrind failed for {arm}: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    with open(out_file) as f:
        result["ir"] = int(CALLGRIND_TOTAL.findall(f.read())[-1])
    result["shim_functions"] = shim_functions(out_file)
    return result


def shim_functions(out_file):
    """Self Ir and call count of each function of libksmpreload.so, read from the callgrind file.

    Parsed here rather than with callgrind_annotate, which merges same-named functions of
    different objects (jemalloc's "free" and the shim's are both "???:free")."""
    names = {"ob": {}, "fn": {}}
    ob = fn = call_ob = call_fn = None
    pending_call = None
    self_ir, calls = {}, {}

    def name(kind, value):
        match = re.match(r"\((\d+)\)(?: (.*))?$", value)
        if not match:
            return value
        if match.group(2) is not None:
            names[kind][match.group(1)] = match.group(2)
        return names[kind].get(match.group(1), value)

    with open(out_file) as f:
        for line in f:
            line = line.rstrip("\n")
            key, _, value = line.partition("=")
            if key == "ob":
                ob = name("ob", value)
            elif key == "fn":
                fn, call_ob = name("fn", value), None
            elif key == "cob":
                call_ob = name("ob", value)
            elif key == "cfn":
                call_fn = name("fn", value)
            elif key == "calls":
                pending_call = (call_ob or ob, call_fn, int(value.split()[0]))
                call_ob = None
            elif line and (line[0].isdigit() or line[0] in "+-*"):
                parts = line.split()
                cost = int(parts[1]) if len(parts) > 1 else 0
                if pending_call:
                    target = pending_call[:2]
                    calls[target] = calls.get(target, 0) + pending_call[2]
                    pending_call = None
                else:
                    self_ir[(ob, fn)] = self_ir.get((ob, fn), 0) + cost
    functions = {}

    def shim(obj):
        return bool(obj) and os.path.basename(obj).startswith("libksmpreload")

    for (obj, function), cost in self_ir.items():
        if shim(obj):
            functions.setdefault(function, {})["self_ir"] = cost
    for (obj, function), count in calls.items():
        if shim(obj):
            functions.setdefault(function, {})["calls"] = count
    for entry in functions.values():
        if entry.get("calls"):
            entry["ir_per_call"] = entry.get("self_ir", 0) / entry["calls"]
    return functions


def instructions(program, workload_args, groups, base, directory):
    results = {}
    specs = [spec for group in groups for spec in group]
    for spec in specs:
        say(f"  callgrind: {spec.name}")
        results[spec.name] = callgrind_arm(program, workload_args, arm_env(spec, base), directory, spec.name)
    rows = []
    for arm, baseline, _, _ in specs:
        r = results[arm]
        row = {
            "arm": arm,
            "ir": r["ir"],
            "ops": r["ops"],
            "checksum": r["checksum"],
            "shim_functions": r["shim_functions"],
        }
        if baseline:
            b = results[baseline]
            row["ir_ratio"] = r["ir"] / b["ir"]
            row["extra_ir_per_op"] = (r["ir"] - b["ir"]) / r["ops"]
        rows.append(row)
    return rows


def glibc_version():
    return platform.libc_ver()[1] or os.confstr("CS_GNU_LIBC_VERSION")


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def ksm_run():
    try:
        with open("/sys/kernel/mm/ksm/run") as f:
            return f.read().strip()
    except OSError:
        return None


def print_table(report):
    print(f"shim: {report['shim']} (sha256 {report['shim_sha256'][:12]}); {report['shim_says']}")
    print(
        f"workload: {report['threads']} threads x {report['iterations']} iterations, "
        f"{report['slots']} slots per thread; {report['reps']} interleaved rounds per arm"
    )
    for case in report["cases"]:
        print()
        print(
            f"case {case['case']} (large fraction {case['large_fraction']}), checksum {case['checksum']}, "
            f"{case['ops']} allocator calls per run"
        )
        print(
            f"  {'arm':<24} {'median s':>9} {'min s':>8} {'max s':>8} {'ratio(med)':>10} {'ratio(min)':>10} "
            f"{'paired':>7} {'cpu s':>7} {'cpu ratio':>9} {'ksmd':>5}"
        )
        for row in case["rows"]:

            def ratio(key, row=row):
                return f"{row[key]:.3f}" if key in row else "-"

            ksmd = f"{row['ksmd_cpu_median'] * 100:.0f}%" if "ksmd_cpu_median" in row else "-"
            print(
                f"  {row['arm']:<24} {row['median']:>9.4f} {row['min']:>8.4f} {row['max']:>8.4f} "
                f"{ratio('ratio_median'):>10} {ratio('ratio_min'):>10} {ratio('ratio_paired_median'):>7} "
                f"{row['cpu_median']:>7.3f} {ratio('cpu_ratio_median'):>9} {ksmd:>5}"
            )
    if report.get("instructions"):
        ins = report["instructions"]
        print()
        print(
            f"callgrind, case small, {ins['iterations']} iterations per thread (Ir of allocation_loop and its callees)"
        )
        print(f"  {'arm':<24} {'Ir':>14} {'Ir ratio':>9} {'extra Ir/call':>13}  shim Ir per call")
        for row in ins["rows"]:
            per_call = ", ".join(
                f"{name} {f['ir_per_call']:.1f}"
                for name, f in sorted(row["shim_functions"].items())
                if "ir_per_call" in f
            )
            ratio = f"{row['ir_ratio']:.4f}" if "ir_ratio" in row else "-"
            extra = f"{row['extra_ir_per_op']:.1f}" if "extra_ir_per_op" in row else "-"
            print(f"  {row['arm']:<24} {row['ir']:>14,} {ratio:>9} {extra:>13}  {per_call}")
    print()
    print(
        f"machine: {report['machine']['nproc']} CPUs, {report['machine']['cpu']}, kernel {report['machine']['kernel']}, "
        f"glibc {report['machine']['glibc']}, KSM run={report['machine']['ksm_run']}, "
        f"load {report['load_before']} before, {report['load_after']} after"
    )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit status 1 when a checksum differs between arms.",
    )
    parser.add_argument("--reps", type=int, default=7, help="timed runs per arm and case (default 7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before them (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="workload threads (default 2)")
    parser.add_argument("--iterations", type=int, default=10_000_000, help="iterations per thread (default 10000000)")
    parser.add_argument("--slots", type=int, default=4096, help="working-set slots per thread (default 4096)")
    parser.add_argument(
        "--mixed-fraction",
        type=float,
        default=CASES["mixed"],
        help="fraction of large (16..256 KiB) new blocks in the mixed case (default 0.05)",
    )
    parser.add_argument("--cases", default="small,mixed", help="comma-separated: small, mixed (default both)")
    parser.add_argument("--shim", help="libksmpreload.so to preload (default: the installed package's)")
    parser.add_argument("--jemalloc", default=JEMALLOC, help=f"jemalloc to preload (default {JEMALLOC})")
    parser.add_argument("--no-jemalloc", action="store_true", help="only the glibc arms")
    parser.add_argument(
        "--noalign-arms",
        action="store_true",
        help="also run each shim arm with KSMPRELOAD_ALIGN=0 (what the page alignment costs)",
    )
    parser.add_argument(
        "--instructions", action="store_true", help="also count instructions under callgrind, once per arm, small case"
    )
    parser.add_argument(
        "--cg-iterations", type=int, default=200_000, help="iterations per thread under callgrind (default 200000)"
    )
    parser.add_argument("--cc", default="cc", help="C compiler (default cc)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    args = parser.parse_args()

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for case in cases:
        if case not in CASES:
            parser.error(f"unknown case {case!r}")
    fractions = dict(CASES, mixed=args.mixed_fraction)
    jemalloc = None if args.no_jemalloc else args.jemalloc
    if jemalloc and not os.path.exists(jemalloc):
        parser.error(f"{jemalloc} not found (apt-get install libjemalloc2, or --no-jemalloc)")
    if args.instructions and not shutil.which("valgrind"):
        parser.error("--instructions needs valgrind")

    installed = os.path.abspath(args.shim or installed_shim())
    if not os.path.exists(installed):
        parser.error(f"no shim at {installed} (pip install . first)")
    base = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="bench_shim_cost.") as directory:
        program = build_workload(directory, args.cc)
        # A copy taken now: a reinstall while the benchmark runs cannot mix two shims in one table.
        shim = os.path.join(directory, "libksmpreload.so")
        shutil.copyfile(installed, shim)
        groups = arms(shim, jemalloc, args.noalign_arms)
        report = {
            "command": " ".join(["python3", os.path.relpath(os.path.abspath(sys.argv[0]))] + sys.argv[1:]),
            "shim": installed,
            "shim_sha256": sha256(shim),
            "shim_says": shim_configuration(program, shim, base),
            "jemalloc": jemalloc,
            "threads": args.threads,
            "iterations": args.iterations,
            "slots": args.slots,
            "reps": args.reps,
            "warmup_rounds": args.warmup,
            "machine": {
                "nproc": os.cpu_count(),
                "cpu": cpu_model(),
                "kernel": platform.release(),
                "glibc": glibc_version(),
                "ksm_run": ksm_run(),
            },
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "load_before": loadavg(),
            "cases": [],
        }
        mismatch = False
        for case in cases:
            workload_args = [
                "-t",
                str(args.threads),
                "-n",
                str(args.iterations),
                "-w",
                str(args.slots),
                "-l",
                str(fractions[case]),
            ]
            say(f"case {case}: {' '.join(workload_args)}")
            runs, cpu, ksmd, checksums = time_case(program, case, workload_args, groups, args.reps, args.warmup, base)
            distinct = set().union(*checksums.values())
            if len(distinct) != 1:
                say(f"CHECKSUM MISMATCH in case {case}: {checksums}")
                mismatch = True
            checksum, ops = sorted(distinct)[0]
            report["cases"].append(
                {
                    "case": case,
                    "large_fraction": fractions[case],
                    "checksum": checksum,
                    "ops": ops,
                    "checksums_by_arm": {a: sorted(c) for a, c in checksums.items()},
                    "rows": summarise(runs, cpu, ksmd, groups),
                }
            )
        if args.instructions:
            workload_args = ["-t", str(args.threads), "-n", str(args.cg_iterations), "-w", str(args.slots), "-l", "0"]
            say(f"callgrind, case small: {' '.join(workload_args)}")
            rows = instructions(program, workload_args, groups, base, directory)
            if len({row["checksum"] for row in rows}) != 1:
                say(f"CHECKSUM MISMATCH under callgrind: {[(r['arm'], r['checksum']) for r in rows]}")
                mismatch = True
            report["instructions"] = {"iterations": args.cg_iterations, "rows": rows}
        if sha256(installed) != report["shim_sha256"]:
            say(f"note: {installed} changed while the benchmark ran; the figures are for the copy taken at the start")
            report["shim_changed_during_run"] = True
        report["load_after"] = loadavg()

    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_table(report)
    if mismatch:
        say("FAIL: the workload's checksum differs between arms; the shim changed the program's results")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
