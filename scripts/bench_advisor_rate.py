#!/usr/bin/env python3
"""What the kernel's advisor (advisor_mode=scan-time, 6.8+) does with the scan rate when memory
to merge appears: one process holding --mib of 1 MiB blocks of 7 kinds (merging as a whole),
then the advisor and KSM on; each second: pages_to_scan, full_scans, pages saved, ksmd's CPU
seconds. Why the governor turns the advisor off while it runs (docs/GOVERNOR.md). Root; every
knob it changed is put back.

    sudo python3 scripts/bench_advisor_rate.py [--mib 512] [--seconds 40] [--json F]
"""

import argparse
import ctypes
import json
import subprocess
import sys
import time

from ksmpreload import kernel

HOLDER = "import sys; a = [bytes([i % 7]) * (1 << 20) for i in range(int(sys.argv[1]))]; print('r', flush=True); sys.stdin.read()"
KNOBS = ("run", "pages_to_scan", "sleep_millisecs", "advisor_mode")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--seconds", type=int, default=40)
    parser.add_argument("--json")
    args = parser.parse_args()
    saved = {name: kernel.read_knob(name) for name in KNOBS}
    if saved["advisor_mode"] is None:
        raise SystemExit("this kernel has no advisor (advisor_mode: 6.8 or newer)")
    merge_any = lambda: ctypes.CDLL(None).prctl(67, 1, 0, 0, 0)  # noqa: E731
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(args.mib)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, preexec_fn=merge_any, text=True)  # fmt: skip
    rows = []
    try:
        holder.stdout.readline()
        kernel.write_knob("advisor_mode", "scan-time")
        kernel.write_knob("run", 1)
        ksmd = kernel.ksmd_pid()
        cpu0 = kernel.cpu_seconds(ksmd)
        for second in range(1, args.seconds + 1):
            time.sleep(1)
            knobs = kernel.read_knobs()
            rows.append({"second": second, "pages_to_scan": knobs["pages_to_scan"], "full_scans": knobs["full_scans"],
                         "pages_saved": kernel.pages_saved(knobs),
                         "ksmd_cpu_seconds": round(kernel.cpu_seconds(ksmd) - cpu0, 2)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    finally:
        holder.kill()  # its merged pages go with it
        holder.wait()
        for name in ("advisor_mode", "pages_to_scan", "sleep_millisecs", "run"):  # the advisor first: it owns the rate
            if kernel.read_knob(name) != saved[name]:
                kernel.write_knob(name, saved[name])
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out)


if __name__ == "__main__":
    main()
