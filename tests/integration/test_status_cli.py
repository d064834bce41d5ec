"""The `status` and `ksm` commands, run through the real CLI on the running kernel."""

import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections import namedtuple
from unittest import mock

import pytest
from click.testing import CliRunner

from conftest import _read, _write, ksm_stat, require, wait_full_scans
from ksmpreload import kernel
from ksmpreload.cli import main
from mergeable_child import mergeable_process

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = [sys.executable, "-c", "from ksmpreload.cli import main; main()"]
SNAPSHOT_KEYS = {"ksm", "pages_saved", "mib_saved", "processes", "governor", "notes"}


Result = namedtuple("Result", "exit_code stdout stderr")


def run(*args):
    """`ksmpreload ARGS` through the real entry point, ksmpreload.cli.main, in this process
    (so monkeypatching works), with stdout and stderr captured apart."""
    code = 0
    with CliRunner().isolation() as streams, mock.patch.object(sys, "argv", ["ksmpreload", *args]):
        try:
            main()
        except SystemExit as done:
            code = done.code
    return Result(code, streams[0].getvalue().decode(), streams[1].getvalue().decode())


def require_ksm():
    require(kernel.ksm_available(), "the kernel has no KSM (/sys/kernel/mm/ksm missing)")


def assert_one_clear_error(result, exit_code, *words):
    """Nothing on stdout; on stderr exactly one line 'ksmpreload: ...' holding `words`."""
    assert result.exit_code == exit_code, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ksmpreload: "), result.stderr
    assert all(word in lines[0] for word in words), lines[0]


# ---- status ------------------------------------------------------------------------------


def test_status_shows_every_knob_one_per_line():
    require_ksm()
    result = run("status")
    assert (result.exit_code, result.stderr) == (0, ""), result
    lines = result.stdout.splitlines()
    for name in os.listdir(kernel.KSM_DIR):
        assert any(line.startswith(f"{name}: ") for line in lines), name
    assert "advisor_mode: none" in lines or "advisor_mode: scan-time" in lines
    assert any(line.startswith("pages saved (pages_sharing + ksm_zero_pages): ") for line in lines)


def test_status_json_is_one_consistent_object():
    require_ksm()
    result = run("status", "--json")
    assert (result.exit_code, result.stderr) == (0, ""), result
    snap = json.loads(result.stdout)
    assert set(snap) == SNAPSHOT_KEYS
    assert set(snap["ksm"]) == set(os.listdir(kernel.KSM_DIR))
    knobs = snap["ksm"]
    assert snap["pages_saved"] == knobs["pages_sharing"] + knobs.get("ksm_zero_pages", 0)
    mib = snap["pages_saved"] * kernel.page_size() / 2**20
    assert snap["mib_saved"] == pytest.approx(mib, abs=0.01)


def test_status_lists_a_merging_process(ksm_running):
    npages = 512
    with mergeable_process(npages) as child:
        wait_full_scans(3)  # a new mm joins behind ksmd's cursor: the scan under way misses it
        snap = json.loads(run("status", "--json").stdout)
        text = run("status").stdout
        merging = ksm_stat(child.pid)["ksm_merging_pages"]
    entry = next(p for p in snap["processes"] if p["pid"] == child.pid)
    assert entry["ksm_merging_pages"] >= npages and entry["ksm_merge_any"] is True
    assert "mergeable_child.py" in entry["cmdline"]
    assert snap["pages_saved"] >= npages - 1
    row = next(line for line in text.splitlines() if f" {child.pid} " in line)
    assert " python" in row and f" {merging} " in row
    assert " KiB " in row or " MiB " in row  # profit, human-readable


def test_status_without_ksm_says_so_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(kernel, "KSM_DIR", str(tmp_path / "no-ksm"))
    assert_one_clear_error(run("status"), 1, "no KSM", "CONFIG_KSM")


@pytest.mark.parametrize("seconds", ["0", "-1", "soon"])
def test_status_watch_needs_a_positive_interval(seconds):
    assert_one_clear_error(run("status", "--watch", seconds), 2, "--watch")


def test_status_watch_prints_one_snapshot_per_interval(monkeypatch):
    require_ksm()
    sleeps = []

    def sleep_then_ctrl_c(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", sleep_then_ctrl_c)
    result = run("status", "--watch", "1.5")
    assert (result.exit_code, result.stderr) == (0, ""), result
    assert sleeps == [1.5, 1.5, 1.5]
    assert result.stdout.count("pages saved (") == 3


def read_until(fd, predicate, timeout=30.0):
    """Read from fd until predicate(all output so far) holds; return the output."""
    output, deadline = b"", time.monotonic() + timeout
    while not predicate(output) and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            try:
                output += os.read(fd, 65536)
            except OSError:  # a pty reports EIO once the other side is closed
                break
    return output


def test_status_watch_json_lines_until_ctrl_c():
    """The real CLI in a subprocess, stdout a pipe: JSON lines, and SIGINT exits 0."""
    require_ksm()
    child = subprocess.Popen(
        CLI + ["status", "--json", "--watch", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    # two snapshots, however long one takes (it reads every KSM process of the machine)
    first = read_until(child.stdout.fileno(), lambda out: out.count(b"\n") >= 2)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=30)
    lines = (first + out).decode().splitlines()
    assert child.returncode == 0, err
    assert len(lines) >= 2 and all(set(json.loads(line)) == SNAPSHOT_KEYS for line in lines)
    assert err == b""


def test_status_watch_redraws_on_a_terminal_until_ctrl_c():
    """The real CLI on a 24x100 pseudo-terminal (rich.live): every knob and the pages saved
    fit on the screen, it redraws, and SIGINT exits 0 with the cursor shown again."""
    require_ksm()
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    child = subprocess.Popen(
        CLI + ["status", "--watch", "0.2"],
        stdout=follower,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    os.close(follower)
    output = read_until(leader, lambda out: out.count(b"pages saved (") >= 2)
    child.send_signal(signal.SIGINT)
    output += read_until(leader, lambda out: False, timeout=2)
    assert child.wait(timeout=30) == 0, child.stderr.read()
    os.close(leader)
    assert output.count(b"pages saved (") >= 2
    # SIGINT may stop a frame half-way through a character (the box lines are UTF-8)
    screen = output.decode(errors="replace")
    assert all(f"{name}: " in screen for name in os.listdir(kernel.KSM_DIR))  # none cropped
    assert "\x1b[?25h" in screen  # rich.live showed the cursor again


# ---- ksm on / off / unmerge / tune ---------------------------------------------------------


def test_ksm_off_on_unmerge_say_what_changed(ksm_running):
    assert run("ksm", "off").stdout.splitlines() == ["run: 1 -> 0"]
    assert _read("run") == "0"
    assert run("ksm", "on").stdout.splitlines()[0] == "run: 0 -> 1"
    assert _read("run") == "1"
    assert run("ksm", "unmerge").stdout.splitlines() == ["run: 1 -> 2"]
    assert _read("run") == "2"


def test_ksm_on_suggests_a_scan_rate_when_a_pass_takes_over_a_minute(ksm_running):
    _write("run", 0)
    _write("pages_to_scan", 100)
    sleep_ms = int(_read("sleep_millisecs"))
    memory = kernel.mem_total_bytes()
    suggested = kernel.suggested_pages_to_scan(memory, sleep_ms)
    require(suggested > 100, "this machine's RAM is scanned within a minute at 100 pages")
    lines = run("ksm", "on").stdout.splitlines()
    assert lines[0] == "run: 0 -> 1"
    seconds = round(kernel.full_scan_seconds(memory, 100, sleep_ms))
    assert lines[1].startswith(f"hint: at pages_to_scan 100 one pass over all RAM takes about {seconds} s")
    assert f"--pages-to-scan {suggested}`" in lines[1]
    _write("pages_to_scan", suggested)
    assert run("ksm", "on").stdout.splitlines() == ["run: 1 -> 1"]


def test_ksm_unmerge_unmerges(ksm_running):
    npages = 256
    with mergeable_process(npages) as child:
        wait_full_scans(3)
        assert ksm_stat(child.pid)["ksm_merging_pages"] >= npages
        assert run("ksm", "unmerge").exit_code == 0
        assert ksm_stat(child.pid)["ksm_merging_pages"] == 0
    assert int(_read("pages_sharing")) == 0


@pytest.mark.parametrize("option, knob", [("--pages-to-scan", "pages_to_scan"), ("--sleep-ms", "sleep_millisecs")])
def test_ksm_tune_changes_the_knob(ksm_running, option, knob):
    before = int(_read(knob))
    result = run("ksm", "tune", option, str(before + 7))
    assert result.exit_code == 0, result
    assert result.stdout.splitlines() == [f"{knob}: {before} -> {before + 7}"]
    assert int(_read(knob)) == before + 7


def test_ksm_tune_both_at_once(ksm_running):
    result = run("ksm", "tune", "--pages-to-scan", "1234", "--sleep-ms", "33")
    assert result.exit_code == 0, result
    assert (_read("pages_to_scan"), _read("sleep_millisecs")) == ("1234", "33")


@pytest.mark.parametrize(
    "args, words",
    [
        ([], ["--pages-to-scan", "--sleep-ms"]),
        (["--pages-to-scan", "-5"], ["--pages-to-scan"]),
        (["--pages-to-scan", "0"], ["--pages-to-scan"]),
        (["--sleep-ms", "fast"], ["--sleep-ms"]),
    ],
)
def test_ksm_tune_bad_input(args, words):
    assert_one_clear_error(run("ksm", "tune", *args), 2, *words)


@pytest.mark.parametrize("args", [["on"], ["off"], ["unmerge"], ["tune", "--pages-to-scan", "300"]])
def test_ksm_commands_need_root(ksm_running, monkeypatch, args):
    before = kernel.read_knobs()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = run("ksm", *args)
    assert_one_clear_error(result, 1, "needs root")
    after = kernel.read_knobs()
    assert (after["run"], after["pages_to_scan"]) == (before["run"], before["pages_to_scan"])


def test_tune_under_the_advisor_names_the_fix(ksm_running):
    require(kernel.read_knob("advisor_mode") is not None, "no advisor_mode (Linux < 6.8)")
    _write("advisor_mode", "scan-time")
    try:
        result = run("ksm", "tune", "--pages-to-scan", "300")
    finally:
        _write("advisor_mode", "none")  # resets pages_to_scan; ksm_running restores it
    assert_one_clear_error(result, 1, "advisor_mode is scan-time", "echo none >")


def test_max_page_sharing_while_merged_says_unmerge(ksm_running):
    before = kernel.read_knob("max_page_sharing")
    with mergeable_process(256):
        wait_full_scans(3)
        assert kernel.read_knob("pages_shared") > 0
        try:
            with pytest.raises(kernel.KsmError, match="unmerge first"):
                kernel.write_knob("max_page_sharing", before + 1)
        finally:
            if kernel.read_knob("max_page_sharing") != before:
                _write("run", 2)
                _write("max_page_sharing", before)


@pytest.mark.parametrize("script", ["ksmpreload", "ksm-wrap"])
def test_ctrl_c_while_the_cli_starts_is_no_traceback(script):
    """The installed scripts, interrupted at moments while they still import: no traceback
    from ksmpreload's code (an interrupt inside Python's own start-up is Python's to report)."""
    import re
    import shutil

    path = shutil.which(script)
    require(path, f"{script} is not installed")
    args = {"ksmpreload": ["status"], "ksm-wrap": ["true"]}[script]
    for delay in (0.02, 0.05, 0.08, 0.11, 0.14, 0.2, 0.3):
        child = subprocess.Popen([path, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=30)
        assert not re.search(r'File "[^"]*/ksmpreload/[^"]*\.py"', err), (delay, err)


def test_ctrl_c_that_python_wrapped_during_import_exits_130(tmp_path, monkeypatch):
    """A Ctrl-C inside a class body's __set_name__ (pyelftools' cached_property, imported by
    ksm-wrap) reaches the entry point as a RuntimeError: it still ends quietly with 130 (CI
    saw the traceback once); any other import error is raised as it is."""
    from ksmpreload import entry

    (tmp_path / "interrupted_module.py").write_text(
        "try:\n    raise KeyboardInterrupt\nexcept KeyboardInterrupt as error:\n"
        "    raise RuntimeError('Error calling __set_name__') from error\n"
    )
    (tmp_path / "broken_module.py").write_text("raise ValueError('broken')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as ended:
        entry._run("interrupted_module")
    assert ended.value.code == 130
    with pytest.raises(ValueError):
        entry._run("broken_module")
