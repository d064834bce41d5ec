"""Shared fixtures. Tests that need root and KSM skip elsewhere, but fail when CI=true."""
import os

import pytest

KSM_DIR = "/sys/kernel/mm/ksm"
IN_CI = os.environ.get("CI") == "true"


def require(condition, reason):
    """Skip with a reason, or fail when CI=true: CI must run every KSM test."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


def require_root_ksm():
    require(os.path.isdir(KSM_DIR), "the kernel has no KSM (/sys/kernel/mm/ksm missing)")
    require(os.geteuid() == 0, "needs root to set KSM knobs")


def _read(name):
    with open(os.path.join(KSM_DIR, name)) as f:
        return f.read().strip()


def _write(name, value):
    with open(os.path.join(KSM_DIR, name), "w") as f:
        f.write(str(value))


RESTORED_KNOBS = ("run", "pages_to_scan", "sleep_millisecs", "use_zero_pages", "max_page_sharing")


@pytest.fixture
def ksm_running():
    """KSM on with a fast scan rate for the test; every knob it changes is restored after."""
    require_root_ksm()
    advisor = _read("advisor_mode") if os.path.exists(os.path.join(KSM_DIR, "advisor_mode")) else None
    if advisor is not None and "[none]" not in advisor:
        _write("advisor_mode", "none")
    saved = {name: _read(name) for name in RESTORED_KNOBS}
    _write("pages_to_scan", 5000)
    _write("sleep_millisecs", 10)
    _write("run", 1)
    yield
    # max_page_sharing can only change while nothing is merged; restore run last.
    for name in ("pages_to_scan", "sleep_millisecs", "use_zero_pages", "run"):
        if _read(name) != saved[name]:
            _write(name, saved[name])
    if advisor is not None and "[none]" not in advisor:
        _write("advisor_mode", advisor.split("[")[1].split("]")[0])


def full_scans():
    return int(_read("full_scans"))


def wait_full_scans(count, timeout=120.0, poll=0.1):
    """Wait until ksmd has finished `count` more full scans than now."""
    import time
    target = full_scans() + count
    deadline = time.monotonic() + timeout
    while full_scans() < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"ksmd did not finish {count} full scans in {timeout}s")
        time.sleep(poll)


def ksm_stat(pid):
    """Parsed /proc/<pid>/ksm_stat: {'ksm_merging_pages': int, ...}; yes/no become bools."""
    fields = {}
    with open(f"/proc/{pid}/ksm_stat") as f:
        for line in f:
            key, value = line.replace(":", " ").split()
            fields[key] = {"yes": True, "no": False}.get(value, None) if not value.isdigit() else int(value)
    return fields
