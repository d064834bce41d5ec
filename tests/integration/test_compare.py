"""`ksmpreload compare` end to end on the real kernel: two arms, JSON, Markdown and PNG."""

import json
import os
import shutil
import subprocess

from conftest import require, require_root_ksm
from ksmpreload.compare import ALLOCATORS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_compare_two_arms_with_json_markdown_and_plot(c_programs, tmp_path):
    require_root_ksm()
    markdown, plot = tmp_path / "compare.md", tmp_path / "compare.png"
    done = subprocess.run(
        [
            "ksmpreload",
            "compare",
            "--strategies",
            "none,prctl",
            "--timeout",
            "60",
            "--json",
            "--markdown",
            str(markdown),
            "--plot",
            str(plot),
            "--",
            c_programs("unaligned_madvise"),
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    arms = {arm["strategy"]: arm for arm in json.loads(done.stdout)}
    held = 64 * 256 * 1024  # 64 blocks of the same bytes: all but one page of content can go
    assert arms["none"]["saved_bytes"] == 0, arms["none"]
    assert arms["prctl"]["saved_bytes"] >= 0.9 * held, arms["prctl"]
    assert arms["prctl"]["saved_percent"] > 50 and arms["prctl"]["rmap_items"] > 0
    assert arms["prctl"]["seconds_to_90"] is not None
    # the none arm's prediction for the remedy prctl applies (ksm-wrap), beside its measurement
    assert arms["none"]["predicted_bytes"] is None
    assert abs(arms["prctl"]["predicted_bytes"] - arms["prctl"]["saved_bytes"]) <= 0.2 * arms["prctl"]["saved_bytes"]
    seconds, merged, saved = arms["prctl"]["samples"][-1]  # what the plot draws: the saving over time
    assert merged > saved >= 0.9 * held / 4096, arms["prctl"]["samples"]
    text = markdown.read_text()
    rows = {
        line.split("|")[2].strip(): [cell.strip() for cell in line.split("|")[1:-1]]
        for line in text.splitlines()
        if line.startswith("| glibc |")
    }
    assert rows["none"][2:5] == [
        "1",
        f"{arms['none']['resident_bytes'] / 2**20:,.1f} → {arms['none']['resident_bytes'] / 2**20:,.1f}",
        "0.0",
    ], rows
    assert float(rows["prctl"][4]) >= 0.9 * held / 2**20, rows
    assert plot.read_bytes()[:8] == PNG_MAGIC and plot.stat().st_size > 10_000


def test_compare_rejects_an_unknown_strategy():
    done = subprocess.run(
        ["ksmpreload", "compare", "--strategies", "none,fast", "--", "true"], capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "fast" in done.stderr, done.stderr


def test_compare_a_workload_under_four_allocators(tmp_path):
    """A workload loads its data, then says so (its ready line): only its servers are measured,
    and its load rate is the arm's throughput. memcached uses malloc: each preloaded
    allocator serves it, and the shim aligns and marks under each."""
    require_root_ksm()
    for name in ALLOCATORS:
        library, package = ALLOCATORS[name]
        require(not library or os.path.exists(library), f"{package} is not installed")
    require(shutil.which("memcached") is not None, "memcached is not installed")
    done = subprocess.run(
        [
            "ksmpreload",
            "compare",
            "--allocators",
            ",".join(ALLOCATORS),
            "--strategies",
            "madvise",
            "--timeout",
            "60",
            "--json",
            "--workload",
            "memcached",
            "--processes",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    arms = json.loads(done.stdout)
    assert [arm["allocator"] for arm in arms] == list(ALLOCATORS)
    value_pages = 16 << 20 >> 12  # the small size: 16 MiB of values per server, most in large ones
    for arm in arms:
        assert arm["processes"] == 2 and arm["throughput_unit"] == "sets/s" and arm["throughput"] > 100, arm
        assert arm["allocator_loaded"] == (None if arm["allocator"] == "glibc" else 2), arm
        assert arm["saved_bytes"] >= 0.5 * value_pages * 4096, arm
        # memcached's slabs are 1 MiB blocks: aligned, they reach no further pages (mimalloc
        # gives them 1.5 MiB of usable size, which once counted as 20 MiB of padding)
        assert arm["padding_bytes"] < 0.05 * arm["saved_bytes"], arm


def test_compare_says_which_arms_it_could_not_measure():
    require_root_ksm()
    done = subprocess.run(
        ["ksmpreload", "compare", "--strategies", "none", "--wait-ready", "--load-timeout", "1", "--", "sleep", "30"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "no ready line in 1 s" in done.stdout, done.stdout
    assert done.stderr.strip() == "ksmpreload: not measured: glibc, none (see the table)", done.stderr
    done = subprocess.run(
        ["ksmpreload", "compare", "--strategies", "none", "--json", "--", "false"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and json.loads(done.stdout)[0]["failure"] == "exited with 1", done.stdout
