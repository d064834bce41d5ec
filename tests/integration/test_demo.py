"""The README's first command: `ksmpreload demo` on the real kernel."""

import json
import subprocess

from conftest import require_root_ksm
from ksmpreload import kernel


def test_demo_merges_the_workers_data_and_restores_knobs():
    require_root_ksm()
    before = kernel.read_knobs()
    result = subprocess.run(
        ["ksmpreload", "demo", "--json", "--mib", "16", "--workers", "3"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    held = 16 << 20
    assert len(summary["workers"]) == 3
    assert all(worker["merging_pages"] >= 0.9 * held / kernel.page_size() for worker in summary["workers"])
    assert summary["saved_bytes"] >= 0.9 * 2 * held, "three copies merged into one save two"
    after = kernel.read_knobs()
    for knob in ("run", "pages_to_scan", "sleep_millisecs"):
        assert after[knob] == before[knob]


def test_demo_rejects_bad_input():
    result = subprocess.run(["ksmpreload", "demo", "--mib", "0"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("ksmpreload: Invalid value for '--mib'") and result.stderr.count("\n") == 1
