"""`ksmpreload governor` on the real kernel (issue 18): it turns KSM on and scans fast when
mergeable memory appears, slows down once full scans stop gaining, keeps ksmd under its CPU
cap, leaves alone a knob someone else sets, puts back every knob on SIGTERM, and refuses a
second instance and bad flags in one line."""

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import require, require_root_ksm
from ksmpreload import governor, kernel

HOLDER = """
import ctypes, random, sys, time
ctypes.CDLL(None).prctl(67, 1, 0, 0, 0)  # PR_SET_MEMORY_MERGE: all of this process merges
size, kind = int(sys.argv[1]), sys.argv[2]
block = random.Random(3).randbytes(1 << 20)
if kind == "churning":  # pairs of equal blocks, 16 MiB of them new every half second: each scan merges
    pairs = [random.randbytes(1 << 20) for _ in range(size // 2)]
    data = [bytes(bytearray(block)) for block in pairs for _ in range(2)]
    print("ready", flush=True)
    for turn in range(10**9):
        for index in range(turn * 8 % (size // 2), turn * 8 % (size // 2) + 8):
            block = random.randbytes(1 << 20)
            data[2 * index : 2 * index + 2] = [block, bytes(bytearray(block))]
        time.sleep(0.5)
data = [random.randbytes(1 << 20) if kind == "random" else bytes(bytearray(block)) for _ in range(size)]
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture(autouse=True)
def root_ksm_and_knobs_back():
    require_root_ksm()
    before = {name: kernel.read_knob(name) for name in (*governor.GOVERNED_KNOBS, "advisor_mode")}
    yield before
    if kernel.read_knob("advisor_mode") not in (None, "none"):  # whatever a failed test left
        kernel.write_knob("advisor_mode", "none")
    for name, value in before.items():  # the advisor last: the rate is read-only under it
        if value is not None and kernel.read_knob(name) != value:
            kernel.write_knob(name, value)


@contextlib.contextmanager
def running_governor(*options):
    proc = subprocess.Popen(["ksmpreload", "governor", "--tick", "0.5", *options], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:

        def ticked():
            assert proc.poll() is None, f"the governor exited: {proc.stderr.read()}"
            return (governor.read_state() or {}).get("pid") == proc.pid

        wait_for(ticked, "the governor's first tick")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


@contextlib.contextmanager
def holder(mib, kind, wrap=()):
    proc = subprocess.Popen([*wrap, sys.executable, "-c", HOLDER, str(mib), kind], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline() == "ready\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def wait_for(condition, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def decision():
    return governor.read_state()["decision"]


def test_fast_when_memory_appears_a_trickle_once_scans_stop_gaining_knobs_back_on_sigterm(root_ksm_and_knobs_back):
    before = root_ksm_and_knobs_back
    with running_governor("--target-seconds", "4", "--settled-seconds", "80", "--max-cpu", "50") as proc:
        with holder(64, "same"):
            wait_for(lambda: decision()["mode"] == "catch-up" and kernel.read_knob("run") == 1, "catch-up")
            fast = decision()["pages_per_second"]
            assert kernel.read_knob("pages_to_scan") * 1000 / kernel.read_knob("sleep_millisecs") >= 0.8 * fast
            wait_for(lambda: decision()["mode"] == "settled", "settled", timeout=120)
            slow = decision()["pages_per_second"]
            assert slow <= fast / 5, (fast, slow)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert {name: kernel.read_knob(name) for name in before} == before
    assert governor.read_state() is None


def ksmd_share(seconds):
    ksmd = kernel.ksmd_pid()
    start_cpu, start = kernel.cpu_seconds(ksmd), time.monotonic()
    time.sleep(seconds)
    return (kernel.cpu_seconds(ksmd) - start_cpu) / (time.monotonic() - start)


def test_ksmd_stays_under_the_cpu_cap():
    """1 GiB of random data, settled: the governor wants a full scan in 20 s (13,000 pages a
    second, more than half a percent of a core here), and a 0.5% cap holds it below."""
    with running_governor("--settled-seconds", "20", "--max-cpu", "0.5"), holder(1024, "random"):
        wait_for(lambda: any("capped" in reason for reason in decision()["reasons"]), "the cap to bind")
        time.sleep(5)  # ksmd measured at the capped rate
        share = ksmd_share(10)
        assert any("capped" in reason for reason in decision()["reasons"]), decision()
    assert share <= 0.005 * 1.5, f"ksmd used {100 * share:.2f}% of a core under a 0.5% cap"


def test_a_knob_set_by_someone_else_is_left_alone():
    with running_governor():
        kernel.write_knob("pages_to_scan", 777)
        time.sleep(1.5)
        assert kernel.read_knob("pages_to_scan") == 777
    assert kernel.read_knob("pages_to_scan") == 777, "not put back over the operator's value"


def test_the_pin_file_keeps_its_hands_off(tmp_path, root_ksm_and_knobs_back):
    pin = tmp_path / "pin"
    pin.write_text("")
    with running_governor("--pin-file", str(pin)):
        with holder(16, "same"):
            time.sleep(2)
            assert governor.read_state()["pinned"]
            assert kernel.read_knob("pages_to_scan") == root_ksm_and_knobs_back["pages_to_scan"]


def test_a_pin_made_while_it_runs_keeps_its_hands_off_when_it_stops_too(tmp_path):
    pin = tmp_path / "pin"
    with running_governor("--pin-file", str(pin)) as proc, holder(16, "same"):
        wait_for(lambda: kernel.read_knob("run") == 1 and decision()["mode"] == "catch-up", "KSM on, catching up")
        pin.write_text("")
        wait_for(lambda: governor.read_state()["pinned"], "the pin seen")
        pinned = {name: kernel.read_knob(name) for name in governor.GOVERNED_KNOBS}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        assert {name: kernel.read_knob(name) for name in governor.GOVERNED_KNOBS} == pinned, (
            "the knobs are the operator's"
        )


def test_a_second_instance_and_bad_flags_are_refused_in_one_line():
    with running_governor():
        second = subprocess.run(["ksmpreload", "governor"], capture_output=True, text=True, timeout=30)
        assert second.returncode == 1 and "another governor runs" in second.stderr, second.stderr
        assert len(second.stderr.splitlines()) == 1
    bad_flags = (
        ["--max-cpu", "0"],
        ["--target-seconds", "-1"],
        ["--settled-seconds", "0"],
        ["--json"],
        ["--tick", "nan"],
    )
    for flags in bad_flags:
        bad = subprocess.run(["ksmpreload", "governor", *flags], capture_output=True, text=True, timeout=30)
        assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1, (flags, bad.stderr)


def test_once_changes_nothing_and_says_why():
    before = kernel.read_knobs()
    done = subprocess.run(["ksmpreload", "governor", "--once"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "mode: " in done.stdout and "because " in done.stdout, done.stderr
    after = kernel.read_knobs()
    assert {name: after[name] for name in governor.GOVERNED_KNOBS} == {n: before[n] for n in governor.GOVERNED_KNOBS}
    assert governor.read_state() is None, "--once leaves no state behind"


def test_unmerging_run_2_is_the_operators_and_never_written_back():
    """run 2 (unmerge everything) stays 2 while the governor runs and after it stops: writing
    it back at the end would unmerge what merged meanwhile."""
    kernel.write_knob("run", 2)
    with running_governor(), holder(16, "same"):
        time.sleep(2)
        assert kernel.read_knob("run") == 2
    assert kernel.read_knob("run") == 2


def test_a_killed_governors_changes_are_put_back_by_the_next(root_ksm_and_knobs_back):
    before = root_ksm_and_knobs_back
    with holder(64, "same"):
        with running_governor("--target-seconds", "4") as first:
            wait_for(lambda: kernel.read_knob("pages_to_scan") != before["pages_to_scan"], "a rate of its own")
            first.kill()
            first.wait()
        assert kernel.read_knob("pages_to_scan") != before["pages_to_scan"], "SIGKILL: nothing put back"
        with running_governor("--pin-file", "/nonexistent/pin"):
            pass  # its first tick: the knobs the killed one changed are put back first
    assert {name: kernel.read_knob(name) for name in governor.GOVERNED_KNOBS} == {
        name: before[name] for name in governor.GOVERNED_KNOBS
    }


def test_an_advisor_turned_on_by_the_operator_keeps_the_rate(root_ksm_and_knobs_back):
    require(kernel.read_knob("advisor_mode") is not None, "this kernel has no advisor (6.8+)")
    with running_governor() as proc, holder(16, "same"):
        time.sleep(1.5)
        kernel.write_knob("advisor_mode", "scan-time")
        time.sleep(1.5)
        assert proc.poll() is None and kernel.read_knob("advisor_mode") == "scan-time"
        assert {"advisor_mode", "pages_to_scan", "sleep_millisecs"} <= set(governor.read_state()["left_alone"])
    assert kernel.read_knob("advisor_mode") == "scan-time", "the operator's advisor stays on"
    kernel.write_knob("advisor_mode", "none")


def stress_ng_processes(parent):
    return [parent, *(child.pid for child in psutil.Process(parent).children(recursive=True))]


def test_unmark_idle_turns_merging_off_where_ksm_finds_nothing_and_leaves_the_rest():
    """Under ksm-wrap, stress-ng writing random values (rand-set) merges nothing, and a holder
    of equal blocks merges. With --unmark-idle --idle-seconds 5, stress-ng's processes have
    merging turned off (their rmap items go) and keep running; the holder keeps its merged
    pages. Machine-wide, as the governor is: any other idle ksm-wrap'd process is unmarked too."""
    require(shutil.which("stress-ng"), "stress-ng is missing (apt-get install stress-ng)")
    require(shutil.which("promtool"), "promtool is missing (apt-get install prometheus)")
    require(kernel.kernel_features()["ksm_stat_flags"], "ksm_stat has no ksm_merge_any before about 6.14")
    stress = subprocess.Popen(["ksm-wrap", "stress-ng", "--vm", "1", "--vm-bytes", "64M", "--vm-method", "rand-set",
                               "--vm-keep", "--timeout", "300"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        with holder(64, "same", wrap=["ksm-wrap"]) as same:
            wait_for(lambda: len(stress_ng_processes(stress.pid)) >= 3, "stress-ng's workers")
            stressing = stress_ng_processes(stress.pid)
            options = (
                "--unmark-idle",
                "--idle-seconds",
                "5",
                "--target-seconds",
                "1",
                "--settled-seconds",
                "10",
                "--max-cpu",
                "50",
            )
            with running_governor(*options):
                unmarked = lambda: {entry["pid"] for entry in governor.read_state()["unmarked"] if entry["unmarked"]}  # noqa: E731
                wait_for(lambda: set(stressing) <= unmarked(), "stress-ng's processes unmarked", timeout=120)
                assert same.pid not in unmarked()
                for pid in stressing:
                    assert not kernel.process_ksm_stat(pid)["ksm_merge_any"]
                wait_for(lambda: all(kernel.process_ksm_stat(pid)["ksm_rmap_items"] == 0 for pid in stressing),
                         "stress-ng's rmap items freed")  # fmt: skip
                holder_stat = kernel.process_ksm_stat(same.pid)
                assert holder_stat["ksm_merge_any"] and holder_stat["ksm_merging_pages"] >= 0.9 * 64 * 256
                assert governor_samples()[("ksmpreload_governor_unmarked_processes_total", ())] >= len(stressing)
            assert stress.poll() is None and all(psutil.pid_exists(pid) for pid in stressing)
    finally:
        stress.terminate()
        assert stress.wait(timeout=30) == 0, "stress-ng did not end cleanly after its merging was turned off"


def test_idle_seconds_without_unmark_idle_is_refused():
    bad = subprocess.run(["ksmpreload", "governor", "--idle-seconds", "5"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--idle-seconds goes with --unmark-idle" in bad.stderr


def governor_samples():
    scraped = subprocess.run(["ksmpreload", "exporter", "--once"], capture_output=True, text=True, timeout=60)
    assert scraped.returncode == 0, scraped.stderr
    checked = subprocess.run(["promtool", "check", "metrics"], input=scraped.stdout, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(scraped.stdout)
        for sample in family.samples
        if sample.name.startswith("ksmpreload_governor_")
    }


def test_status_and_the_exporter_show_the_running_governor():
    require(shutil.which("promtool"), "promtool is missing (apt-get install prometheus)")
    with running_governor() as proc, holder(16, "same"):
        wait_for(lambda: kernel.read_knob("run") == 1, "KSM on")
        status = json.loads(subprocess.run(["ksmpreload", "status", "--json"], capture_output=True, text=True).stdout)
        assert status["governor"]["pid"] == proc.pid and status["governor"]["decision"]["mode"] in (
            "catch-up",
            "settled",
        )
        samples = governor_samples()
        modes = {labels[0][1]: value for (name, labels), value in samples.items() if name == "ksmpreload_governor_mode"}
        assert samples[("ksmpreload_governor_running", ())] == 1
        assert sorted(modes.values()) == [0, 0, 1] and set(modes) == {"catch-up", "settled", "nothing"}
        assert samples[("ksmpreload_governor_pages_per_second", ())] > 0
        assert samples[("ksmpreload_governor_unmarked_processes_total", ())] == 0
        text = subprocess.run(["ksmpreload", "status"], capture_output=True, text=True).stdout
        assert f"governor: pid {proc.pid}, " in text
    assert governor_samples() == {("ksmpreload_governor_running", ()): 0}
