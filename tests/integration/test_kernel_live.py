"""ksmpreload.kernel on the running kernel: what it says is there, this process's and other
processes' ksm_stat (the parsers' tests on captured files are in tests/unit)."""

import json
import os
import subprocess
import sys

from conftest import REPO, require, require_root_ksm, wait_full_scans
from ksmpreload import kernel
from mergeable_child import mergeable_process

AS_NOBODY = """
import json, os
from ksmpreload.kernel import ksm_processes
os.setgroups([]); os.setgid(65534); os.setuid(65534)  # after imports: Python may sit in /root
print(json.dumps(ksm_processes()))
"""


def require_ksm_stat():
    require(os.path.exists(f"/proc/{os.getpid()}/ksm_stat"), "no /proc/<pid>/ksm_stat (Linux < 6.1)")


def _merge_flag_after_exec():
    """PR_GET_MEMORY_MERGE in a process exec'd after setting the flag."""
    after = "from ksmpreload import native; print(int(native.memory_merge_enabled()))"
    before = (
        "import os, sys; from ksmpreload import native; native.set_memory_merge(True); "
        f"os.execv(sys.executable, [sys.executable, '-c', {after!r}])"
    )
    done = subprocess.run([sys.executable, "-c", before], capture_output=True, text=True, timeout=60, cwd="/")
    return done.stdout.strip()


def test_features_said_present_exist_on_this_kernel():
    """KERNEL_FEATURES against the running kernel: what it promises is really there."""
    require(kernel.ksm_available(), "the kernel has no KSM")
    features = kernel.kernel_features()
    stat = kernel.process_ksm_stat(os.getpid()) or {}
    with open(f"/proc/{os.getpid()}/smaps") as f:
        smaps = f.read()
    checks = {
        "ksm_stat": "ksm_rmap_items" in stat,
        "prctl_merge": "ksm_process_profit" in stat,
        "ksm_zero_pages": ("ksm_zero_pages" in stat and kernel.read_knob("ksm_zero_pages") is not None),
        "smaps_ksm": "\nKSM:" in smaps,
        "smart_scan": kernel.read_knob("smart_scan") is not None,
        "advisor": kernel.read_knob("advisor_mode") is not None,
        "ksm_stat_flags": "ksm_merge_any" in stat and "ksm_mergeable" in stat,
        "prctl_merge_exec": _merge_flag_after_exec() == "1",
    }
    assert set(checks) == set(features)
    assert [name for name, present in features.items() if present and not checks[name]] == []


def test_process_ksm_stat_of_this_process():
    require_ksm_stat()
    stat = kernel.process_ksm_stat(os.getpid())
    assert isinstance(stat["ksm_rmap_items"], int)


def test_ksm_processes_as_unprivileged_user_skips_unreadable_processes():
    """As nobody, a root process's ksm_stat cannot be read (EACCES): it is skipped, no crash."""
    require_root_ksm()
    require_ksm_stat()
    with mergeable_process(16) as child:  # prctl sets merge_any at once: no scan needed
        assert kernel.uses_ksm(kernel.process_ksm_stat(child.pid))
        result = subprocess.run(
            [sys.executable, "-c", AS_NOBODY],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": REPO},
            timeout=60,
        )
    assert result.returncode == 0, result.stderr
    assert child.pid not in [entry["pid"] for entry in json.loads(result.stdout)]


def test_ksm_processes_finds_a_prctl_process(ksm_running):
    npages = 512
    with mergeable_process(npages) as child:
        wait_full_scans(3)  # a new mm joins behind ksmd's cursor: the scan under way misses it
        entry = next(e for e in kernel.ksm_processes() if e["pid"] == child.pid)
        assert entry["comm"].startswith("python")
        assert "mergeable_child.py" in entry["cmdline"]
        assert entry["ksm_merge_any"] is True
        assert entry["ksm_merging_pages"] >= npages
        assert kernel.pages_saved(kernel.read_knobs()) >= npages - 1
