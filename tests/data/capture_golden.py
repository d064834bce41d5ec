"""Capture the golden files in this directory from the running kernel (needs root and KSM).

    sudo python tests/data/capture_golden.py

Runs two KSM-enabled children (identical pattern pages, and zero pages with
use_zero_pages=1), lets ksmd merge them, then copies /proc/<pid>/ksm_stat of each, of a
process without KSM and of a kernel thread, every file of /sys/kernel/mm/ksm, and
advisor_mode as printed in each mode; KERNEL records the release and page size. Every knob
it changes is restored. No other process may use KSM meanwhile: the capture checks that
general_profit is explained by its two children alone, which the tests rely on.
"""

import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]
from conftest import wait_full_scans  # noqa: E402
from mergeable_child import mergeable_process  # noqa: E402

KSM_DIR = "/sys/kernel/mm/ksm"
CHANGED = ("advisor_mode", "pages_to_scan", "sleep_millisecs", "use_zero_pages", "run")
VERSION = ".".join(platform.release().split(".")[:2])


def read(path):
    with open(path) as f:
        return f.read()


def knob(name):
    return read(os.path.join(KSM_DIR, name)).strip()


def set_knob(name, value):
    with open(os.path.join(KSM_DIR, name), "w") as f:
        f.write(str(value))


def save(name, text):
    with open(os.path.join(HERE, name), "w") as f:
        f.write(text)


def selected(text):
    return text.split("[")[1].split("]")[0] if "[" in text else text


def capture_advisor_modes():
    for mode in ("scan-time", "none"):
        set_knob("advisor_mode", mode)
        save(f"advisor_mode_{mode}_{VERSION}.txt", read(os.path.join(KSM_DIR, "advisor_mode")))


def capture_sysfs(dirname):
    os.makedirs(os.path.join(HERE, dirname), exist_ok=True)
    for name in sorted(os.listdir(KSM_DIR)):
        save(os.path.join(dirname, name), read(os.path.join(KSM_DIR, name)))


def check_only_children(stats):
    """general_profit = (pages_sharing + ksm_zero_pages) * page size - 64 * all rmap_items."""
    rmap_items = sum(int(text.split()[1]) for text in stats)  # first line: ksm_rmap_items N
    saved = int(knob("pages_sharing")) + int(knob("ksm_zero_pages"))
    if int(knob("general_profit")) != saved * os.sysconf("SC_PAGE_SIZE") - 64 * rmap_items:
        raise SystemExit("another process uses KSM (general_profit does not add up): stop it and capture again")


def capture_merging():
    set_knob("pages_to_scan", 5000)
    set_knob("sleep_millisecs", 10)
    set_knob("use_zero_pages", 1)
    set_knob("run", 1)
    with mergeable_process(1024) as pattern, mergeable_process(512, zero=True) as zeros:
        wait_full_scans(3)
        stats = [read(f"/proc/{child.pid}/ksm_stat") for child in (pattern, zeros)]
        capture_sysfs(f"sys_kernel_mm_ksm_{VERSION}_merging")
        check_only_children(stats)
        save(f"ksm_stat_{VERSION}_prctl_merging.txt", stats[0])
        save(f"ksm_stat_{VERSION}_prctl_zero_pages.txt", stats[1])
    save(f"ksm_stat_{VERSION}_not_involved.txt", read("/proc/self/ksm_stat"))
    save(f"ksm_stat_{VERSION}_kernel_thread.txt", read("/proc/2/ksm_stat"))


def main():
    saved = {name: knob(name) for name in CHANGED}
    set_knob("advisor_mode", "none")  # pages_to_scan is writable only without the advisor
    try:
        capture_advisor_modes()
        capture_merging()
    finally:
        set_knob("advisor_mode", "none")
        for name in CHANGED[1:]:
            set_knob(name, saved[name])
        set_knob("advisor_mode", selected(saved["advisor_mode"]))
    save("KERNEL", f"release {platform.release()}\npage_size {os.sysconf('SC_PAGE_SIZE')}\n")


if __name__ == "__main__":
    main()
